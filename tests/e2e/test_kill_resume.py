"""The headline promise, tested for real: a training subprocess killed at random moments (SIGKILL,
also mid-save; SIGTERM) and restarted produces the same per-step losses and final state, bit for bit,
as an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import trainstate
from support import assert_same

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "examples" / "train.py"
KILL_DURING_SAVE = Path(__file__).parent / "kill_during_save.py"
TOTAL = 40  # 100 samples / batch 8 = 13 batches per epoch: epochs end at steps 13, 26, 39
pytestmark = pytest.mark.slow


@dataclass
class Run:
    losses: dict[int, str] = field(default_factory=dict)
    starts: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _launch(
    script: Path,
    directory: Path,
    args: list[str],
    run: Run,
    *,
    stop_at: int | None = None,
    sig: signal.Signals = signal.SIGKILL,
    env: dict[str, str] | None = None,
    total: int = TOTAL,
) -> int:
    cmd = [sys.executable, str(script), "--dir", str(directory), "--total-steps", str(total), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=ROOT
    )
    assert proc.stdout is not None
    signalled = False
    for line in proc.stdout:
        run.outputs.append(line)
        words = line.split()
        if words[:1] == ["start"]:
            run.starts.append(int(words[1]))
        if words[:1] == ["step"]:
            run.losses[int(words[1])] = words[words.index("loss") + 1]  # a rerun step overrides the killed run's
            if stop_at is not None and int(words[1]) == stop_at and not signalled:
                proc.send_signal(sig)
                signalled = True
    stderr = proc.stderr.read() if proc.stderr else ""
    code = proc.wait(timeout=120)
    run.outputs.append(stderr)
    return code


def _final(directory: Path) -> dict:
    return trainstate.load(directory / "final")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[tuple[str, ...], tuple[Run, dict]]:
    """Uninterrupted runs, computed once per loader configuration."""
    cache: dict[tuple[str, ...], tuple[Run, dict]] = {}

    def get(args: list[str]) -> tuple[Run, dict]:
        key = tuple(args)
        if key not in cache:
            directory = tmp_path_factory.mktemp("reference")
            run = Run()
            assert _launch(TRAIN, directory, args, run) == 0, "".join(run.outputs)
            assert sorted(run.losses) == list(range(1, TOTAL + 1))
            cache[key] = (run, _final(directory))
        return cache[key]

    return get  # type: ignore[return-value]


def _assert_identical(reference_run: tuple[Run, dict], run: Run, directory: Path) -> None:
    expected, expected_final = reference_run
    assert run.losses == expected.losses, [s for s in expected.losses if expected.losses[s] != run.losses.get(s)][:5]
    assert_same(_final(directory), expected_final)


KILL_STEPS = sorted(random.Random(20261123).sample(range(3, TOTAL - 1), 4))


@pytest.mark.parametrize("kill_at", KILL_STEPS)
def test_sigkill_at_random_steps_resumes_bit_identically(tmp_path, reference, kill_at):
    args = ["--save-every", "4"]
    run = Run()
    assert _launch(TRAIN, tmp_path, args, run, stop_at=kill_at) == -signal.SIGKILL
    printed = max(run.losses)  # the run may have got a little past kill_at before the signal landed
    assert _launch(TRAIN, tmp_path, args, run) == 0, "".join(run.outputs)
    # every save before the printed step had committed; nothing after the last printed step can have
    assert run.starts[0] == 0 and 4 * ((kill_at - 1) // 4) <= run.starts[1] <= printed
    _assert_identical(reference(args), run, tmp_path)


def test_sigkill_twice_including_inside_a_save(tmp_path, reference):
    args = ["--save-every", "4"]
    run = Run()
    code = _launch(KILL_DURING_SAVE, tmp_path, args, run, env={"KILL_DURING_SAVE_STEP": "12"})
    assert code == -signal.SIGKILL and max(run.losses) == 12
    assert trainstate.CheckpointManager(tmp_path).steps() == [4, 8]  # step 12 never became visible
    assert _launch(TRAIN, tmp_path, args, run, stop_at=31) == -signal.SIGKILL
    assert _launch(TRAIN, tmp_path, args, run) == 0, "".join(run.outputs)
    assert run.starts == [0, 8, run.starts[2]] and run.starts[2] >= 28
    _assert_identical(reference(args), run, tmp_path)


def test_resume_from_a_checkpoint_on_the_last_batch_of_an_epoch(tmp_path, reference):
    args = ["--save-every", "13"]  # checkpoints exactly at the epoch ends 13, 26, 39
    run = Run()
    code = _launch(KILL_DURING_SAVE, tmp_path, args, run, env={"KILL_DURING_SAVE_STEP": "26"})
    assert code == -signal.SIGKILL and max(run.losses) == 26  # died saving 26: resumes from 13
    assert _launch(TRAIN, tmp_path, args, run) == 0, "".join(run.outputs)
    assert run.starts[1] == 13
    _assert_identical(reference(args), run, tmp_path)


def test_sigterm_takes_an_emergency_checkpoint_and_exits_cleanly(tmp_path, reference):
    args = ["--save-every", "10"]
    run = Run()
    assert _launch(TRAIN, tmp_path, args, run, stop_at=17, sig=signal.SIGTERM) == 0
    assert any(line.startswith("stopping: preempted by SIGTERM") for line in run.outputs)
    emergency = max(run.losses)  # the loop saves right after printing the step in which the signal landed
    assert trainstate.CheckpointManager(tmp_path).latest_step() == emergency >= 17
    assert _launch(TRAIN, tmp_path, args, run) == 0, "".join(run.outputs)
    assert run.starts[1] == emergency
    _assert_identical(reference(args), run, tmp_path)


def test_async_saves_resume_bit_identically(tmp_path, reference):
    args = ["--save-every", "4", "--async-save"]
    run = Run()
    assert _launch(TRAIN, tmp_path, args, run, stop_at=22) == -signal.SIGKILL
    assert _launch(TRAIN, tmp_path, args, run) == 0, "".join(run.outputs)
    _assert_identical(reference(["--save-every", "4"]), run, tmp_path)  # async changes nothing


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_bit_identically(tmp_path, reference, workers):
    """torchdata's StatefulDataLoader as a live object; with 2 workers its prefetching is handled by it,
    and the workers forked after the first save must not keep the dead run's directory lock."""
    args = ["--save-every", "5", "--loader", "stateful", "--workers", str(workers)]
    run = Run()
    assert _launch(TRAIN, tmp_path, args, run, stop_at=17) == -signal.SIGKILL
    printed = max(run.losses)
    assert _launch(TRAIN, tmp_path, args, run) == 0, "".join(run.outputs)
    assert 15 <= run.starts[1] <= printed
    _assert_identical(reference(args), run, tmp_path)


def test_killed_run_with_damaged_newest_checkpoints_falls_back_and_finishes(tmp_path, reference):
    """The trial's case: the data files of the two newest checkpoints damaged (manifests intact), then a
    restart. It must resume from the third, save and retain normally past the damaged steps, and finish
    with the uninterrupted run's losses and final state; the damaged ones are kept aside, not deleted."""
    args = ["--save-every", "4"]
    run = Run()
    assert _launch(TRAIN, tmp_path, args, run, stop_at=22) == -signal.SIGKILL
    steps = trainstate.CheckpointManager(tmp_path).steps()
    assert len(steps) == 3  # keep_last=3
    for step in steps[-2:]:
        for data in (tmp_path / f"step_{step:08d}").glob("*.safetensors"):
            raw = bytearray(data.read_bytes())
            raw[len(raw) // 2] ^= 0x40
            data.write_bytes(bytes(raw))
    assert _launch(TRAIN, tmp_path, args, run) == 0, "".join(run.outputs)
    assert run.starts[1] == steps[0]
    _assert_identical(reference(args), run, tmp_path)
    aside = sorted(p.name.partition("@")[0] for p in (tmp_path / "trainstate-quarantine").iterdir())
    assert aside == [f"step_{s:08d}" for s in steps[-2:]]
    assert trainstate.CheckpointManager(tmp_path).latest_step() == TOTAL


# The same training through `trainstate.Run` (examples/train.py --loop run): killed and resumed, it must
# produce the hand-wired manager loop's uninterrupted losses and final state, bit for bit.
RUN_LOOP = ["--loop", "run"]


@pytest.mark.parametrize("kill_at", KILL_STEPS[:1])
def test_run_wrapper_sigkilled_resumes_as_the_manager_loop(tmp_path, reference, kill_at):
    args = ["--save-every", "4"]
    run = Run()
    assert _launch(TRAIN, tmp_path, [*args, *RUN_LOOP], run, stop_at=kill_at) == -signal.SIGKILL
    assert _launch(TRAIN, tmp_path, [*args, *RUN_LOOP], run) == 0, "".join(run.outputs)
    assert run.starts[0] == 0 and 4 * ((kill_at - 1) // 4) <= run.starts[1] <= max(run.losses)
    _assert_identical(reference(args), run, tmp_path)


def test_run_wrapper_killed_inside_a_save_and_preempted(tmp_path, reference):
    args = ["--save-every", "13"]  # checkpoints at the epoch ends 13, 26, 39
    run = Run()
    code = _launch(KILL_DURING_SAVE, tmp_path, [*args, *RUN_LOOP], run, env={"KILL_DURING_SAVE_STEP": "26"})
    assert code == -signal.SIGKILL and max(run.losses) == 26
    assert _launch(TRAIN, tmp_path, [*args, *RUN_LOOP], run, stop_at=30, sig=signal.SIGTERM) == 0
    assert run.starts[1] == 13 and any(line.startswith("stopping: preempted by SIGTERM") for line in run.outputs)
    emergency = max(run.losses)
    assert trainstate.CheckpointManager(tmp_path).latest_step() == emergency >= 30
    assert _launch(TRAIN, tmp_path, [*args, *RUN_LOOP], run) == 0, "".join(run.outputs)
    assert run.starts[2] == emergency
    _assert_identical(reference(args), run, tmp_path)
