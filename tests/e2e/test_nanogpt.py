"""A nanoGPT-style training script (examples/nanogpt.py: global-RNG batches, dropout, AdamW, cosine LR,
a checkpoint right after each evaluation with the next batch prefetched), SIGKILLed right after a save,
between saves and inside a save, resumes with every iteration's loss and the final weights bit-identical
to an uninterrupted run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from test_kill_resume import KILL_DURING_SAVE, Run, _assert_identical, _final, _launch

import trainstate

NANOGPT = Path(__file__).resolve().parents[2] / "examples" / "nanogpt.py"
TOTAL = 40  # saves after the evaluations at iterations 5, 10, ..., 35 (keep_last=2)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Run, dict]:
    directory = tmp_path_factory.mktemp("gpt-reference")
    run = Run()
    assert _launch(NANOGPT, directory, [], run, total=TOTAL) == 0, "".join(run.outputs)
    assert sorted(run.losses) == list(range(1, TOTAL + 1))
    return run, _final(directory)


def test_killed_three_ways_and_resumed_is_bit_identical(tmp_path, uninterrupted):
    run = Run()
    env = {"KILL_DURING_SAVE_SCRIPT": "nanogpt.py", "KILL_DURING_SAVE_STEP": "10"}
    assert _launch(KILL_DURING_SAVE, tmp_path, [], run, total=TOTAL, env=env) == -signal.SIGKILL  # inside a save
    assert max(run.losses) == 10 and trainstate.CheckpointManager(tmp_path).steps() == [5]
    assert _launch(NANOGPT, tmp_path, [], run, total=TOTAL, stop_at=16) == -signal.SIGKILL  # after saving 15
    assert _launch(NANOGPT, tmp_path, [], run, total=TOTAL, stop_at=23) == -signal.SIGKILL  # between saves
    assert _launch(NANOGPT, tmp_path, [], run, total=TOTAL) == 0, "".join(run.outputs)
    assert run.starts[:2] == [0, 5] and run.starts[2] >= 15 and run.starts[3] >= 20
    _assert_identical(uninterrupted, run, tmp_path)
