"""The shipped examples: the tutorial's 3+2 epoch resume must match 5 uninterrupted epochs bit for bit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainstate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import tutorial_resume  # noqa: E402


@pytest.mark.parametrize("live", [False, True], ids=["state_dicts", "live_objects"])
def test_tutorial_resume_is_bit_identical(tmp_path, live):
    model, optimizer = tutorial_resume.fresh()
    uninterrupted = tutorial_resume.train(model, optimizer, 5)
    resumed, resumed_model = tutorial_resume.resumed_run(str(tmp_path / "ckpt"), live=live)
    assert resumed == uninterrupted
    assert torch.equal(resumed_model.weight, model.weight) and torch.equal(resumed_model.bias, model.bias)


def test_tutorial_script_reports_identical():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "tutorial_resume.py"), "--live"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "identical: True" in out.stdout


def _demo(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "resume_demo.py"), *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return " ".join(out.stdout.split())  # rich wraps long lines


def test_main_demo_kills_resumes_and_reports_identical(tmp_path):
    out = _demo("--total-steps", "30", "--kill-at", "12", "--dir", str(tmp_path / "demo"))
    killed = re.search(r"kill -9 after step (\d+) \(epoch (\d) of 3, (mid-epoch|at its last batch)\)", out)
    assert killed and int(killed.group(1)) >= 12, out  # the run may get a little past 12 before the signal lands
    assert killed.group(3) == ("at its last batch" if int(killed.group(1)) % 13 == 0 else "mid-epoch")
    resumed = re.search(r"resumed from the checkpoint of step (\d+)", out)
    assert resumed and 10 <= int(resumed.group(1)) <= int(killed.group(1)), out
    assert "identical: True" in out and "NO" not in out
    assert trainstate.CheckpointManager(tmp_path / "demo" / "resumed").latest_step() == 30  # kept for the CLI


def test_main_demo_says_what_happened_when_there_was_nothing_to_resume():
    out = _demo("--total-steps", "8", "--kill-at", "50")
    assert "the run finished before step 50: nothing was killed" in out and "identical: True" in out
