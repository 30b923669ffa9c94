"""trainstate inspect: summary, optimizer settings, tree, filters, small values, manifest-only reading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import trainstate
from trainstate.format.manifest import SINGLE_PROCESS_VERSION

MODEL = {"0.weight": [8, 4], "0.bias": [8], "2.weight": [2, 8], "2.bias": [2]}


def test_json_summary(cli, run_dir):
    result = cli("inspect", run_dir / "step_00000300", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["path"] == str(run_dir / "step_00000300")
    assert report["format_version"] == SINGLE_PROCESS_VERSION
    assert report["torch_version"] == torch.__version__
    assert report["metadata"] == {"step": 300, "metrics": {"loss": 0.2, "acc": 0.7}}
    summary = {row["key"]: row for row in report["summary"]}
    assert [(k, r["category"], r["type"], r["tensors"]) for k, r in summary.items()] == [
        ("model", "model", "torch.nn.modules.container.Sequential", 4),
        ("optimizer", "optimizer", "torch.optim.adamw.AdamW", 12),
        ("scheduler", "scheduler", "torch.optim.lr_scheduler.StepLR", 0),
        ("rng", "rng", "trainstate.rng.RNGState", 2),
        ("epoch", "user value", None, 0),
    ]
    assert summary["model"]["parameters"] == report["parameters"] == 8 * 4 + 8 + 2 * 8 + 2
    assert summary["model"]["bytes"] == 4 * (8 * 4 + 8 + 2 * 8 + 2)
    assert summary["rng"]["bytes"] == 624 * 4 + torch.get_rng_state().numel()  # numpy MT state + torch state
    [optimizer] = report["optimizers"]
    assert optimizer["key"] == "optimizer" and optimizer["type"] == "torch.optim.adamw.AdamW"
    [group] = optimizer["param_groups"]
    assert group["params"] == 4
    assert group["lr"] == 0.005  # StepLR(step_size=2, gamma=0.5) after 3 steps
    assert group["initial_lr"] == 0.01 and group["betas"] == [0.9, 0.999] and group["weight_decay"] == 0.01
    assert report["schedulers"] == [
        {"key": "scheduler", "type": "torch.optim.lr_scheduler.StepLR", "last_epoch": 3, "last_lr": [0.005]}
    ]
    tensors = {t["key"]: t for t in report["tensors"]}
    assert {k[len("model.") :]: t["shape"] for k, t in tensors.items() if k.startswith("model.")} == MODEL
    assert tensors["optimizer.state.0.exp_avg"]["dtype"] == "float32"
    assert tensors["rng.numpy.1"]["dtype"] == "numpy.uint32" and tensors["rng.numpy.1"]["shape"] == [624]
    assert report["values"]["epoch"] == 3
    assert report["values"]["scheduler.gamma"] == 0.5
    assert report["values"]["rng.numpy.0"] == "MT19937"


def test_human_output(cli, run_dir):
    result = cli("inspect", run_dir / "step_00000300")
    assert result.exit_code == 0
    out = result.stdout
    assert f"checkpoint   {run_dir / 'step_00000300'}" in out
    assert "metrics      loss=0.2  acc=0.7" in out
    assert "optimizer optimizer  AdamW" in out
    assert "scheduler scheduler  StepLR  last_epoch=3  last lr=[0.005]" in out
    assert "0.weight  float32[8, 4]  128 B" in out
    assert "model  Sequential  4 tensors, 232 B" in out
    assert "│   │   ├── 0  3 tensors" in out  # optimizer.state.0 collapsed at the default depth 3
    assert "exp_avg_sq" not in out
    assert "exp_avg_sq  float32[8, 4]" in cli("inspect", run_dir / "step_00000300", "--depth", "0").stdout


def test_filter_and_values(cli, run_dir):
    result = cli("inspect", run_dir / "step_00000500", "--filter", "model.*", "--values", "--json")
    report = json.loads(result.stdout)
    assert [t["key"] for t in report["tensors"]] == [f"model.{k}" for k in MODEL]
    saved = trainstate.load(run_dir / "step_00000500")["model"]
    small = {k: v for k, v in report["values"].items()}
    assert sorted(small) == ["model.0.bias", "model.2.bias", "model.2.weight"]  # <= 16 elements; 0.weight has 32
    for key in ("0.bias", "2.bias", "2.weight"):
        assert small[f"model.{key}"] == saved[key].tolist()
    wider = json.loads(
        cli("inspect", run_dir / "step_00000500", "-f", "model", "--values", "--max-elements", "32", "--json").stdout
    )
    assert wider["values"]["model.0.weight"] == saved["0.weight"].tolist()
    text = cli("inspect", run_dir / "step_00000500", "-f", "model.2.bias", "--values").stdout
    shown = ", ".join(f"{v:.6g}" for v in saved["2.bias"].tolist())
    assert f"2.bias  float32[2]  8 B  = [{shown}]" in text


def test_never_reads_tensor_data(cli, run_copy):
    path = run_copy / "step_00000300"
    os.remove(path / "tensors-00000.safetensors")
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)["tensors"]) == 18


def test_not_a_checkpoint(cli, run_dir, sources):
    result = cli("inspect", run_dir)
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {run_dir}: is a directory of checkpoints (step_00000100, step_00000200, step_00000300, ...), "
        "not one checkpoint; name one of them\n"
    )
    result = cli("inspect", sources["torch"])
    assert result.exit_code == 1
    assert "is a file, not a trainstate checkpoint directory; convert it first: trainstate convert" in result.stderr


def test_subprocess(subprocess_runs, run_dir):
    run = subprocess_runs["inspect"]
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["metadata"]["step"] == 300
    assert [o["param_groups"][0]["lr"] for o in report["optimizers"]] == [0.005]
    missing = subprocess_runs["missing"]
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == f"error: {subprocess_runs['_out'].stdout}/nope: no such checkpoint\n"


def test_pickled_values_are_never_unpickled(cli, tmp_path):
    trainstate.save(tmp_path / "p", {"s": {1, 2}, "w": torch.ones(2), "epoch": 4}, allow_pickle=True)
    report = json.loads(cli("inspect", tmp_path / "p", "--json").stdout)
    assert report["values"] == {"s": "<pickled value, not loaded>", "epoch": 4}
    assert [(r["key"], r["category"]) for r in report["summary"]] == [
        ("s", "user value"),
        ("w", "tensor"),
        ("epoch", "user value"),
    ]
    text = cli("inspect", tmp_path / "p").stdout
    assert "epoch        4" in text and "data         1 tensor, " in text


def test_golden_v1_fixture(cli):
    golden = Path(__file__).resolve().parents[1] / "fixtures" / "v1"
    report = json.loads(cli("inspect", golden, "--json").stdout)
    assert report["metadata"] == {"step": 7, "metrics": {"loss": 0.25}}
    assert report["optimizers"][0]["key"] == "optimizer"
    assert cli("verify", golden).exit_code == 0


@pytest.mark.parametrize("crafted", ["[(", "f8, i4", "(lambda: 1)()", "O", 7])
def test_crafted_numpy_dtype_is_a_clear_error(cli, tmp_path, crafted):
    import numpy as np

    from trainstate.format import MANIFEST_NAME, Manifest

    trainstate.save(tmp_path / "c", {"a": np.arange(3.0)})
    path = tmp_path / "c" / MANIFEST_NAME
    manifest = Manifest.from_json(path.read_bytes(), where=str(path))
    manifest.tree["v"]["a"]["np_dtype"] = crafted
    path.write_bytes(manifest.to_json())
    for args in (
        ("inspect", tmp_path / "c"),
        ("inspect", tmp_path / "c", "--values"),
        ("inspect", tmp_path / "c", "--json"),
    ):
        result = cli(*args)
        assert result.exit_code == 1, result.stdout
        assert "invalid numpy dtype" in result.stderr and "internal error" not in result.stderr


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("mode", [["--values"], ["--json", "--values"]], ids=["table", "json"])
def test_every_golden_checkpoint_prints(version, mode):
    """Found by the hostile campaign: a 6,000-digit int (Python refuses to print it in decimal) and a
    key with a lone surrogate (a strict UTF-8 stdout refuses it) crashed inspect; both now print."""
    from typer.testing import CliRunner

    from trainstate.cli.app import app

    result = CliRunner().invoke(app, ["inspect", str(Path(__file__).parent.parent / "fixtures" / f"v{version}"), *mode])
    assert result.exit_code == 0, result.output
    if version >= 2:
        assert "surrogate \\udcff" in result.stdout or "surrogate \\\\udcff" in result.stdout
        assert "-0x" in result.stdout  # the huge negative int, in hexadecimal
