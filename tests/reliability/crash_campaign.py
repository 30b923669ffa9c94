"""Crash campaign: forked writers save through CheckpointManager in a loop and are SIGKILLed at random
instants; after every kill we check what a restart would see. Prints one JSON summary line.

    python tests/reliability/crash_campaign.py DIR --kills 200 --seed 0

Runs as its own process (torch imported once, one thread, so forking is safe and cheap). The phase a
writer was in when killed is recorded through a shared byte that instrumentation updates. Two kills
in three come at a random instant; every third targets a phase (the writer kills itself on its n-th
entry into it), so the short phases (manifest write, rename) are covered too.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import select
import signal
import sys
import time
from collections import Counter

import torch

import trainstate
from trainstate.storage import TEMP_PREFIX, local

PHASES = [
    "encode",
    "tensor write",
    "file fsync",
    "manifest write",
    "directory fsync",
    "rename",
    "retention delete",
    "between saves",
]


def expected_state(step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {
        "weights": torch.randn(256, 1024, generator=generator),
        "moments": torch.randn(300_000, generator=generator).to(torch.bfloat16),
        "indices": torch.randint(0, 1000, (100_000,), generator=generator),
        "small": {"scale": torch.rand(7, generator=generator), "step": step},
    }


def _instrument(phase: mmap.mmap) -> None:
    """Record the save phase in the shared byte; behaviour is unchanged."""

    def mark(name: str) -> None:
        phase[0] = PHASES.index(name)
        if phase[1] == phase[0]:  # a targeted kill: die on the n-th entry into this phase
            phase[2] -= 1
            if phase[2] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, attribute, name, restore=None):
        original = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            previous = phase[0]
            mark(name(*args) if callable(name) else name)
            try:
                return original(*args, **kwargs)
            finally:
                if restore == "previous":
                    phase[0] = previous

        setattr(owner, attribute, wrapper)

    wrap(
        local._LocalPending,
        "write",
        lambda self, filename, chunks: "manifest write" if filename == "manifest.json" else "tensor write",
    )
    wrap(local.os, "fsync", "file fsync", restore="previous")
    wrap(local, "_fsync_dir", "directory fsync", restore="previous")
    wrap(local.os, "rename", "rename", restore="previous")
    wrap(local.LocalStorage, "delete", "retention delete")
    wrap(trainstate.CheckpointManager, "save", "encode")


def writer(directory: str, phase: mmap.mmap, report: int) -> None:
    _instrument(phase)
    with trainstate.CheckpointManager(directory, keep_last=3) as manager:
        step = manager.latest_step() or 0
        while True:
            step += 1
            os.write(report, f"start {step}\n".encode())
            manager.save(step, expected_state(step), metrics={"step": float(step)}, force=True)
            phase[0] = PHASES.index("between saves")
            os.write(report, f"done {step}\n".encode())


def check(directory: str, last_reported: int | None, started: int | None) -> tuple[int | None, list[str]]:
    """Restore like a restarted job would; return the step and any violated promise."""
    problems = []
    manager = trainstate.CheckpointManager(directory, keep_last=3)
    for step in manager.steps():  # everything listed is complete and exact
        got = trainstate.load(manager.path(step))
        if not _same(got, expected_state(step)):
            problems.append(f"listed step {step} has wrong content")
    target = {"weights": None, "moments": None, "indices": None, "small": None}
    restored = manager.restore(target)  # plain entries of the mapping are replaced by the saved ones
    manager.close()
    if last_reported is not None and (restored is None or restored < last_reported):
        problems.append(f"restored {restored}, but step {last_reported} had committed")
    if restored is not None and started is not None and restored > started:
        problems.append(f"restored {restored}, which was never started")
    if restored is not None and not _same(target, expected_state(restored)):
        problems.append(f"restored step {restored} differs from what was saved")
    return restored, problems


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _exits_within(pid: int, *, seconds: float) -> bool:
    pidfd = os.pidfd_open(pid)
    try:
        return bool(select.select([pidfd], [], [], seconds)[0])
    finally:
        os.close(pidfd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    phase = mmap.mmap(-1, 3)  # [current phase, targeted phase or 255, countdown]

    started = time.perf_counter()
    with trainstate.CheckpointManager(args.directory, keep_last=3) as manager:  # warm-up: time one save
        manager.save(0, expected_state(0))
    save_seconds = time.perf_counter() - started
    max_delay = max(0.02, 4 * save_seconds)

    phases: Counter[str] = Counter()
    problems: list[str] = []
    restores = leftovers_seen = 0
    last_reported: int | None = 0
    last_started = 0
    targeted = [p for p in PHASES if p not in ("between saves",)]
    for kill in range(args.kills):
        target = targeted[(kill // 3) % len(targeted)] if kill % 3 == 2 else None
        phase[1] = PHASES.index(target) if target else 255
        phase[2] = rng.randint(1, 3)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: never returns
            os.close(read_end)
            try:
                writer(args.directory, phase, write_end)
            finally:
                os._exit(1)
        os.close(write_end)
        if target is None:
            time.sleep(rng.uniform(0, max_delay))  # the random instant of the crash (the experiment, not a sync)
            os.kill(pid, signal.SIGKILL)
        elif not _exits_within(pid, seconds=30):
            os.kill(pid, signal.SIGKILL)
            problems.append(f"targeted kill in {target!r} never happened")
        os.waitpid(pid, 0)
        phases[f"{PHASES[phase[0]]}{' (targeted)' if target else ''}"] += 1
        with os.fdopen(read_end) as pipe:
            events = [line.split() for line in pipe.read().splitlines()]
        last_reported = max((int(step) for kind, step in events if kind == "done"), default=last_reported)
        last_started = max([last_started, *(int(step) for kind, step in events if kind == "start")])
        leftovers_seen += any(e.startswith(TEMP_PREFIX) for e in os.listdir(args.directory))
        restored, found = check(args.directory, last_reported, last_started)
        restores += restored is not None
        problems += found

    with trainstate.CheckpointManager(args.directory, keep_last=3) as manager:  # the next writer cleans up
        manager.save((manager.latest_step() or 0) + 1, expected_state(0))
    leftovers_after = [e for e in os.listdir(args.directory) if e.startswith(TEMP_PREFIX)]
    print(
        json.dumps(
            {
                "kills": args.kills,
                "restores": restores,
                "problems": problems,
                "phases": dict(phases),
                "kills_with_leftovers": leftovers_seen,
                "leftovers_after_next_save": leftovers_after,
                "save_seconds": round(save_seconds, 4),
            }
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
