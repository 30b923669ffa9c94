"""trainstate verify: exit codes, every bad file and key named, JSON, quiet, progress bar on a terminal."""

from __future__ import annotations

import json
import os

from cli_sources import STEPS, edit_manifest

from trainstate.format import MANIFEST_NAME


def test_intact(cli, run_dir):
    result = cli("verify", run_dir)
    assert result.exit_code == 0
    size = os.path.getsize(run_dir / "step_00000100" / "tensors-00000.safetensors")
    assert result.stdout.splitlines() == [
        f"ok    {run_dir / f'step_{s:08d}'}  (1 file, {size / 1024:.1f} KiB)" for s in STEPS
    ]
    assert result.stderr == "5 of 5 checkpoints intact\n"
    one = cli("verify", run_dir / "step_00000300", "--json")
    assert json.loads(one.stdout) == [
        {"path": str(run_dir / "step_00000300"), "ok": True, "files": 1, "bytes": size, "problems": []}
    ]


def _rename_tensor_key(checkpoint, old: str, new: str) -> None:
    def rename(node):
        if node.get("key") == old:
            node["key"] = new

    edit_manifest(checkpoint, rename)


def test_names_every_bad_file_and_key(cli, run_copy):
    data = run_copy / "step_00000200" / "tensors-00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x01
    data.write_bytes(bytes(raw))
    os.truncate(run_copy / "step_00000400" / "tensors-00000.safetensors", 100)
    os.remove(run_copy / "step_00000500" / MANIFEST_NAME)
    _rename_tensor_key(run_copy / "step_00000100", "model.0.bias", "model.0.bogus")

    result = cli("verify", run_copy)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    c = {s: run_copy / f"step_{s:08d}" for s in STEPS}
    assert lines == [
        f"FAIL  {c[100]}",
        f"      {c[100]}/tensors-00000.safetensors: key 'model.0.bias': "
        "tensor 'model.0.bogus' is missing from the file",
        f"FAIL  {c[200]}",
        f"      {c[200]}/tensors-00000.safetensors: content hash mismatch (the file is damaged or was modified)",
        lines[4],
        f"FAIL  {c[400]}",
        f"      {c[400]}/tensors-00000.safetensors: size is 100 bytes, manifest says "
        f"{os.path.getsize(c[300] / 'tensors-00000.safetensors')} (truncated or replaced)",
        f"FAIL  {c[500]}",
        f"      {c[500]}: no manifest.json (never committed)",
    ]
    assert lines[4].startswith(f"ok    {c[300]}")
    assert result.stderr == "1 of 5 checkpoints intact\n"

    quiet = cli("verify", run_copy, "-q")
    assert quiet.exit_code == 1
    assert [line for line in quiet.stdout.splitlines() if not line.startswith("  ")] == [
        f"FAIL  {c[s]}" for s in (100, 200, 400, 500)
    ]
    assert quiet.stderr == ""

    report = json.loads(cli("verify", c[200], c[300], "--json").stdout)
    assert [(r["path"], r["ok"], len(r["problems"])) for r in report] == [
        (str(c[200]), False, 1),
        (str(c[300]), True, 0),
    ]


def test_not_a_checkpoint(cli, tmp_path):
    result = cli("verify", tmp_path)
    assert result.exit_code == 1
    assert result.stderr == f"error: {tmp_path}: no checkpoints here\n"


def test_subprocess(subprocess_runs, run_dir):
    run = subprocess_runs["verify"]
    assert run.returncode == 0, run.stderr
    assert [line.split()[:2] for line in run.stdout.splitlines()] == [
        ["ok", str(run_dir / f"step_{s:08d}")] for s in STEPS
    ]
    assert run.stderr == "5 of 5 checkpoints intact\n"


def test_progress_bar_on_a_terminal(subprocess_runs, run_dir):
    run = subprocess_runs["verify-tty"]
    assert run.returncode == 0, run.stdout
    assert "verifying" in run.stdout  # rich's progress bar, drawn only on a terminal
    assert "\x1b[" in run.stdout  # with terminal control codes
    assert f"{run_dir / 'step_00000500'}" in run.stdout and "5 of 5 checkpoints intact" in run.stdout
