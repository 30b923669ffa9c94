"""trainstate plot: a PNG of metrics over steps, its data as JSON, and the install hint without matplotlib."""

from __future__ import annotations

import json
import sys

import pytest
from cli_sources import ACC, LOSS, STEPS

PNG = b"\x89PNG\r\n\x1a\n"


def test_png_and_series(cli, run_dir, tmp_path):
    out = tmp_path / "curves.png"
    result = cli("plot", run_dir, "-m", "loss", "-m", "acc:max", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["series"] == {
        "loss": [{"step": s, "value": v} for s, v in zip(STEPS, LOSS, strict=True)],
        "acc": [{"step": s, "value": v} for s, v in zip(STEPS, ACC, strict=True)],
    }
    assert report["best"] == {
        "loss": {"step": 300, "value": 0.2, "mode": "min"},
        "acc": {"step": 400, "value": 0.8, "mode": "max"},
    }
    assert out.read_bytes()[:8] == PNG
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (960, 744)  # 8 x (2.2 + 2 x 2) inches at 120 dpi


def test_default_all_metrics(cli, run_dir, tmp_path):
    result = cli("plot", run_dir, "-o", tmp_path / "all.png")
    assert result.exit_code == 0
    assert result.stdout == f"wrote {tmp_path / 'all.png'}: acc, loss over 10 points from 5 checkpoints\n"


def test_errors(cli, run_dir, tmp_path, monkeypatch):
    missing = cli("plot", run_dir, "-m", "val_loss", "-o", tmp_path / "x.png")
    assert missing.exit_code == 1
    assert missing.stderr == f"error: {run_dir}: no checkpoint has metric 'val_loss' (metrics found: acc, loss)\n"
    assert cli("plot", run_dir, "-o", tmp_path / "x.jpg").exit_code == 2
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    result = cli("plot", run_dir, "-o", tmp_path / "x.png")
    assert result.exit_code == 1
    assert result.stderr == "error: plot needs matplotlib: pip install 'trainstate[plot]'\n"
    assert not (tmp_path / "x.png").exists()


def test_subprocess(subprocess_runs):
    run = subprocess_runs["plot"]
    assert run.returncode == 0, run.stderr
    out = subprocess_runs["_out"].stdout + "/curve.png"
    assert run.stdout == f"wrote {out}: loss, acc over 10 points from 5 checkpoints\n"
    with open(out, "rb") as f:
        assert f.read(8) == PNG


@pytest.fixture(autouse=True)
def _agg(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
