"""trainstate diff: changed tensors with exact statistics, added/removed/reshaped keys, values, metrics."""

from __future__ import annotations

import json

import pytest
import torch

import trainstate


def _flat(value, prefix=""):
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def test_manager_steps(cli, run_dir):
    a, b = run_dir / "step_00000100", run_dir / "step_00000300"
    result = cli("diff", a, b, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    ta, tb = _flat(trainstate.load(a)), _flat(trainstate.load(b))
    expected = {}
    for key, x in ta.items():
        y = tb[key]
        if isinstance(x, torch.Tensor) and not torch.equal(x, y):
            x64, y64 = x.double(), y.double()
            delta = (x64 - y64).abs()
            expected[key] = (
                delta.max().item(),
                (torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(x64)).item(),
            )
    changed = {row["key"]: row for row in report["tensors"]["changed"]}
    assert sorted(changed) == sorted(expected)
    assert sorted(k for k in changed if not k.startswith(("model.", "optimizer.state."))) == ["rng.torch"]
    assert len([k for k in changed if k.startswith("optimizer.state.")]) == 12
    for key, (max_abs, rel) in expected.items():
        assert changed[key]["max_abs"] == pytest.approx(max_abs, rel=1e-6)
        assert changed[key]["rel_l2"] == pytest.approx(rel, rel=1e-5)
    assert changed["optimizer.state.0.step"]["max_abs"] == 2.0 and changed["optimizer.state.0.step"]["rel_l2"] == 2.0
    rel = [row["rel_l2"] for row in report["tensors"]["changed"]]
    assert rel == sorted(rel, reverse=True)
    assert report["tensors"]["unchanged"] == 1  # the numpy generator state (nothing drew from numpy)
    assert report["tensors"]["added"] == report["tensors"]["removed"] == report["tensors"]["reshaped"] == []
    assert {v["key"]: (v["a"], v["b"]) for v in report["values"]} == {
        "optimizer.param_groups.0.lr": (0.01, 0.005),
        "scheduler.last_epoch": (1, 3),
        "scheduler._step_count": (2, 4),
        "scheduler._last_lr": ([0.01], [0.005]),
        "epoch": (1, 3),
    }
    assert report["metadata"] == [
        {"key": "step", "a": 100, "b": 300},
        {"key": "metrics.loss", "a": 0.9, "b": 0.2},
        {"key": "metrics.acc", "a": 0.1, "b": 0.7},
    ]


def test_human_output(cli, run_dir):
    result = cli("diff", run_dir / "step_00000100", run_dir / "step_00000300", "--limit", "3")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        f"A  {run_dir / 'step_00000100'}",
        f"B  {run_dir / 'step_00000300'}",
        "tensors: 17 changed, 1 unchanged, 0 added, 0 removed, 0 reshaped",
    ]
    assert lines[4].split() == ["changed", "dtype/shape", "max", "|Δ|", "rel", "L2"]
    assert len([line for line in lines if line.startswith("optimizer.state.") or line.startswith("model.")]) == 3
    assert "optimizer.param_groups.0.lr  0.01" in result.stdout
    assert result.stderr == "... 14 more changed tensors (--limit 0 shows all)\n"


def test_added_removed_reshaped(cli, tmp_path):
    trainstate.save(tmp_path / "a", {"w": torch.ones(4), "x": torch.ones(3), "gone": torch.zeros(2), "lr": 0.1})
    trainstate.save(
        tmp_path / "b", {"w": torch.tensor([1.0, 1.0, 1.0, 3.0]), "x": torch.ones(2, 2), "new": 7, "lr": 0.2}
    )
    report = json.loads(cli("diff", tmp_path / "a", tmp_path / "b", "--json").stdout)
    assert report["tensors"]["changed"] == [
        {"key": "w", "dtype": "float32", "shape": [4], "max_abs": 2.0, "rel_l2": 1.0}  # |(0,0,0,2)| / |(1,1,1,1)|
    ]
    assert report["tensors"]["reshaped"] == [{"key": "x", "a": "float32[3]", "b": "float32[2, 2]"}]
    assert report["tensors"]["removed"] == [{"key": "gone", "value": "float32[2]"}]
    assert report["tensors"]["added"] == [{"key": "new", "value": 7}]
    assert report["values"] == [{"key": "lr", "a": 0.1, "b": 0.2}]


def test_identical_and_nan(cli, tmp_path):
    state = {"w": torch.tensor([1.0, float("nan")]), "i": torch.arange(3)}
    trainstate.save(tmp_path / "a", state)
    trainstate.save(tmp_path / "b", state)
    result = cli("diff", tmp_path / "a", tmp_path / "b")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[2:] == [
        "tensors: 0 changed, 2 unchanged, 0 added, 0 removed, 0 reshaped",
        "identical",
    ]


def test_filter_and_small_batches(cli, run_dir):
    args = ("diff", run_dir / "step_00000100", run_dir / "step_00000500", "--json", "-f", "model.*")
    whole = json.loads(cli(*args).stdout)
    batched = json.loads(cli(*args, "--batch-mib", "1").stdout)
    assert [r["key"] for r in whole["tensors"]["changed"]] == [r["key"] for r in batched["tensors"]["changed"]]
    assert {r["key"] for r in whole["tensors"]["changed"]} == {
        "model.0.weight",
        "model.0.bias",
        "model.2.weight",
        "model.2.bias",
    }
    assert whole["values"] == []


def test_subprocess(subprocess_runs, run_dir):
    run = subprocess_runs["diff"]
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["a"] == str(run_dir / "step_00000100") and report["b"] == str(run_dir / "step_00000300")
    assert len(report["tensors"]["changed"]) == 17 and report["tensors"]["unchanged"] == 1


def test_batches_bound_the_bytes_read_at_once():
    from trainstate.cli._tree import TensorRef
    from trainstate.cli.diff import _batches

    refs = [TensorRef({}, "float32", (n,), 4) for n in (100, 200, 300, 50)]
    pairs = [((f"t{i}",), r, r) for i, r in enumerate(refs)]
    groups = _batches(pairs, limit=1400)  # 400, 800, 1200 and 200 bytes
    assert [[p[0][0] for p in g] for g in groups] == [["t0", "t1"], ["t2", "t3"]]
    assert [[p[0][0] for p in g] for g in _batches(pairs, limit=1)] == [["t0"], ["t1"], ["t2"], ["t3"]]
