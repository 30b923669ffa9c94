"""Promises 5 and 6: two writers never interleave (one holds the lock, the other fails clearly or waits),
and a reader restoring while a writer saves and prunes always gets a complete checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainstate

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from concurrent_writer import tagged_state  # noqa: E402

WRITER = HERE / "concurrent_writer.py"


def start(directory: Path, writer: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(directory), "--writer", writer, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(proc: subprocess.Popen, word: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == word:
            return
    raise AssertionError(f"writer ended before printing {word!r}: {proc.stderr.read() if proc.stderr else ''}")


def assert_not_interleaved(directory: Path) -> dict[int, str]:
    """Every committed checkpoint verifies and is entirely one writer's."""
    owners = {}
    manager = trainstate.CheckpointManager(directory, keep_last=None)
    for step in manager.steps():
        loaded = trainstate.load(manager.path(step))
        writer = loaded["writer"]
        expected = tagged_state(writer, step)
        assert torch.equal(loaded["tag"], expected["tag"]) and torch.equal(loaded["noise"], expected["noise"])
        owners[step] = writer
    manager.close()
    return owners


@pytest.mark.slow
def test_two_writers_one_lock_no_interleaving(tmp_path):
    holder = start(tmp_path, "A", "--first-step", "1", "--steps", "3", "--hold")
    try:
        wait_for(holder, "saved 3")
        rival = subprocess.run(
            [sys.executable, str(WRITER), str(tmp_path), "--writer", "B", "--first-step", "10"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rival.returncode == 3, rival.stderr
        assert "another writer holds the lock" in rival.stderr and str(tmp_path) in rival.stderr
        assert assert_not_interleaved(tmp_path) == {1: "A", 2: "A", 3: "A"}

        patient = start(tmp_path, "C", "--first-step", "100", "--steps", "2", "--lock-timeout", "120")
        assert holder.stdin is not None
        holder.stdin.write("\n")  # A finishes and releases the lock; C, waiting on it, goes ahead
        holder.stdin.flush()
        assert holder.wait(timeout=120) == 0
        out, err = patient.communicate(timeout=120)
        assert patient.returncode == 0, err
        assert "saved 101" in out
    finally:
        for proc in (holder,):
            if proc.poll() is None:
                proc.kill()
    assert assert_not_interleaved(tmp_path) == {1: "A", 2: "A", 3: "A", 100: "C", 101: "C"}


@pytest.mark.slow
def test_reader_restoring_while_a_writer_saves_and_prunes(tmp_path):
    writer = start(tmp_path, "W", "--first-step", "1", "--steps", "150", "--keep-last", "2")
    try:
        wait_for(writer, "saved 1")
        restores = 0
        seen = set()
        reader = trainstate.CheckpointManager(tmp_path, keep_last=2)
        while writer.poll() is None or restores == 0:
            target = {"tag": None, "noise": None, "step": None, "writer": None}
            step = reader.restore(target)
            assert step is not None and target["step"] == step
            expected = tagged_state("W", step)
            assert torch.equal(target["noise"], expected["noise"]) and torch.equal(target["tag"], expected["tag"])
            restores += 1
            seen.add(step)
        reader.close()
        assert writer.wait(timeout=120) == 0, writer.stderr.read() if writer.stderr else ""
    finally:
        if writer.poll() is None:
            writer.kill()
    print(f"restores during writes: {restores}, distinct steps restored: {len(seen)}")
    assert restores >= 10 and len(seen) >= 3  # the reader really raced the writer
