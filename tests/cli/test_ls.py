"""trainstate ls: rows, markers, status of damaged checkpoints, JSON, manifest-only reading."""

from __future__ import annotations

import json
import os
import shutil

from cli_sources import ACC, LOSS, STEPS


def _disk(path) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def test_table_rows_and_markers(cli, run_dir):
    result = cli("ls", run_dir, "--monitor", "loss")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["checkpoint", "step", "epoch", "acc", "loss", "size", "age", "status"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == [f"step_{s:08d}" for s in STEPS]
    assert [r[1] for r in rows] == [str(s) for s in STEPS]
    assert [r[2] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r[3] for r in rows] == [f"{a:.4g}" for a in ACC]
    assert [r[4] for r in rows] == [f"{x:.4g}" for x in LOSS]
    assert rows[2][-2:] == ["ok", "best"]  # loss 0.2 at step 300
    assert rows[4][-2:] == ["ok", "latest"]
    assert [r[-1] for r in rows[:2] + rows[3:4]] == ["ok", "ok", "ok"]
    assert result.stderr.strip() == "5 of 5 checkpoints ok; latest step 500; best step 300 by loss (min)"


def test_json(cli, run_dir):
    result = cli("ls", run_dir, "--json", "--monitor", "acc", "--mode", "max")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [r["step"] for r in rows] == STEPS
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["metrics"] for r in rows] == [{"loss": x, "acc": a} for x, a in zip(LOSS, ACC, strict=True)]
    assert [r["status"] for r in rows] == ["ok"] * 5
    assert [r["latest"] for r in rows] == [False, False, False, False, True]
    assert [r["best"] for r in rows] == [False, False, False, True, False]
    assert [r["size"] for r in rows] == [_disk(run_dir / r["name"]) for r in rows]
    assert all(r["problem"] is None and r["age_s"] >= 0 for r in rows)
    assert result.stderr == ""


def test_without_monitor_best_needs_a_single_metric(cli, run_dir):
    rows = json.loads(cli("ls", run_dir, "--json").stdout)
    assert not any(r["best"] for r in rows)  # two metrics (loss, acc): best is ambiguous


def test_one_checkpoint_path(cli, run_dir):
    rows = json.loads(cli("ls", run_dir / "step_00000200", "--json").stdout)
    assert [(r["name"], r["step"], r["status"], r["latest"]) for r in rows] == [("step_00000200", 200, "ok", True)]


def test_damaged_and_incomplete_checkpoints(cli, run_copy):
    data = run_copy / "step_00000200" / "tensors-00000.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0x10
    data.write_bytes(bytes(raw))  # bit flip: the manifest is fine, only --verify sees it
    (run_copy / "step_00000400" / "manifest.json").write_text("{}")  # corrupt manifest
    os.remove(run_copy / "step_00000500" / "manifest.json")  # never committed
    (run_copy / ".trainstate-tmp-step_00000600-abc").mkdir()  # a writer died mid-save
    (run_copy / "logs").mkdir()  # unrelated directories are not listed

    rows = {r["name"]: r for r in json.loads(cli("ls", run_copy, "--json").stdout)}
    assert sorted(rows) == [f"step_{s:08d}" for s in STEPS]
    assert rows["step_00000200"]["status"] == "ok"
    assert rows["step_00000400"]["status"] == "corrupt"
    assert "step_00000400/manifest.json: not a trainstate manifest" in rows["step_00000400"]["problem"]
    assert rows["step_00000500"]["status"] == "incomplete"
    assert rows["step_00000500"]["problem"].endswith("step_00000500: no manifest.json (never committed)")
    assert rows["step_00000300"]["latest"]  # the newest *committed* one

    verify_run = cli("ls", run_copy, "--json", "--verify")
    assert verify_run.exit_code == 1  # --verify fails the command when a checkpoint fails
    verified = {r["name"]: r for r in json.loads(verify_run.stdout)}
    assert verified["step_00000200"]["status"] == "corrupt"
    assert verified["step_00000200"]["problem"].endswith(
        "step_00000200/tensors-00000.safetensors: content hash mismatch (the file is damaged or was modified)"
    )
    assert [n for n, r in verified.items() if r["status"] == "ok"] == ["step_00000100", "step_00000300"]

    human = cli("ls", run_copy)
    assert human.exit_code == 0
    assert "1 temporary entry" in human.stderr and "warning:" in human.stderr


def test_reads_manifests_only(cli, run_copy):
    for step in STEPS:  # no tensor data at all: ls still answers from the manifests
        os.remove(run_copy / f"step_{step:08d}" / "tensors-00000.safetensors")
    rows = json.loads(cli("ls", run_copy, "--json").stdout)
    assert [r["status"] for r in rows] == ["ok"] * 5
    assert [r["metrics"]["loss"] for r in rows] == LOSS


def test_errors(cli, tmp_path):
    result = cli("ls", tmp_path / "missing")
    assert result.exit_code == 1
    assert result.stderr == f"error: {tmp_path / 'missing'}: no such directory\n"
    as_json = cli("ls", tmp_path / "missing", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout) == {
        "error": f"{tmp_path / 'missing'}: no such directory",
        "type": "CheckpointNotFoundError",
    }
    empty = cli("ls", tmp_path)
    assert empty.exit_code == 0 and empty.stdout.strip() == f"{tmp_path}: no checkpoints"
    assert cli("ls", tmp_path, "--mode", "middle").exit_code == 2


def test_subprocess(subprocess_runs, run_dir):
    run = subprocess_runs["ls"]
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [(r["name"], r["step"], r["metrics"]["loss"], r["latest"]) for r in rows] == [
        (f"step_{s:08d}", s, x, s == 500) for s, x in zip(STEPS, LOSS, strict=True)
    ]


def test_empty_after_removal(cli, run_copy):
    for step in STEPS:
        shutil.rmtree(run_copy / f"step_{step:08d}")
    assert json.loads(cli("ls", run_copy, "--json").stdout) == []


def test_verify_of_intact_checkpoints_exits_zero(cli, run_dir):
    assert cli("ls", run_dir, "--verify").exit_code == 0
