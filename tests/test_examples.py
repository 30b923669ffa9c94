"""The shipped examples: the tutorial's 3+2 epoch resume must match 5 uninterrupted epochs bit for bit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_main_demo_kills_resumes_and_reports_identical():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "resume_demo.py"), "--total-steps", "30", "--kill-at", "12"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    resumed = re.search(r"resumed from the checkpoint of step (\d+)", out.stdout)
    assert resumed and 10 <= int(resumed.group(1)) < 30  # killed after step 12 (or a little later)
    assert "identical: True" in out.stdout and "NO" not in out.stdout
