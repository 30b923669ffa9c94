"""Promise 2: disk full and I/O errors at any write, fsync, rename or mkdir of a save give a typed error
naming the failing step, leave earlier checkpoints byte-identical, and the manager stays usable."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import types

import pytest
import torch

import trainstate
from support import snapshot
from trainstate.storage import TEMP_PREFIX, local

INJECTED = (errno.ENOSPC, errno.EIO)


def state(step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    return {"a": torch.randn(64, 256, generator=generator), "b": torch.randn(70_000, generator=generator), "step": step}


class FaultyOs(types.SimpleNamespace):
    """The storage layer's view of ``os``: counts mutating calls and fails the ``fail_at``-th one."""

    def __init__(self, fail_at: int | None = None, code: int = errno.ENOSPC) -> None:
        super().__init__()
        self.fail_at, self.code, self.calls = fail_at, code, []

    def __getattr__(self, name: str):
        return getattr(os, name)

    def _tick(self, op: str, target: object) -> None:
        self.calls.append((op, str(target)))
        if len(self.calls) - 1 == self.fail_at:
            raise OSError(self.code, os.strerror(self.code))

    def write(self, fd, data):
        self._tick("write", fd)
        return os.write(fd, data)

    def fsync(self, fd):
        self._tick("fsync", fd)
        return os.fsync(fd)

    def rename(self, src, dst):
        self._tick("rename", dst)
        return os.rename(src, dst)

    def mkdir(self, path, *args, **kwargs):
        self._tick("mkdir", path)
        return os.mkdir(path, *args, **kwargs)

    def open(self, path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            self._tick("create", path)
        return os.open(path, flags, *args, **kwargs)


EXPECTED_STEP = {
    "write": "writing failed",
    "fsync": "fsync",
    "rename": "rename",
    "mkdir": "creating the temporary",
    "create": "opening failed",
}


def _prepared(directory) -> trainstate.CheckpointManager:
    manager = trainstate.CheckpointManager(directory, keep_last=2)
    manager.save(1, state(1))
    manager.save(2, state(2))
    return manager


def _calls_of_one_save(tmp_path) -> tuple[list[tuple[str, str]], int]:
    """The mutating calls of saving step 3 (commit + retention), and how many belong to the commit."""
    manager = _prepared(tmp_path / "count")
    faulty = FaultyOs()
    local.os = faulty  # type: ignore[attr-defined]
    try:
        manager.save(3, state(3))
    finally:
        local.os = os  # type: ignore[attr-defined]
        manager.close()
    published = next(
        i for i, (op, target) in enumerate(faulty.calls) if op == "rename" and target.endswith("step_00000003")
    )
    return faulty.calls, published + 2  # + the fsync of the parent directory (open + fsync)


def test_every_failing_call_of_a_save_is_reported_and_loses_nothing(tmp_path, monkeypatch, caplog):
    calls, commit_calls = _calls_of_one_save(tmp_path)
    assert {op for op, _ in calls} >= {"mkdir", "create", "write", "fsync", "rename"}
    cases = 0
    for index, (op, _) in enumerate(calls):
        for code in INJECTED:
            directory = tmp_path / f"case-{index}-{code}"
            manager = _prepared(directory)
            before = {n: snapshot(directory / n) for n in ("step_00000001", "step_00000002")}
            monkeypatch.setattr(local, "os", FaultyOs(index, code))
            if index < commit_calls:
                with pytest.raises(trainstate.CheckpointWriteError) as caught:
                    manager.save(3, state(3))
                assert caught.value.errno == code, (op, caught.value)
                assert os.strerror(code) in str(caught.value) and EXPECTED_STEP[op] in str(caught.value), str(
                    caught.value
                )
                monkeypatch.setattr(local, "os", os)
                assert manager.steps() == [1, 2]
                assert {n: snapshot(directory / n) for n in before} == before  # byte-identical
            else:  # retention after a successful commit: the save stands, deletion is retried later
                assert manager.save(3, state(3)) is True
                monkeypatch.setattr(local, "os", os)
                assert (
                    "retention could not remove step 1" in caplog.text
                    or "fsync after removing step_00000001 failed" in caplog.text
                )
                caplog.clear()
            manager.save(4, state(4))  # still usable; the next save cleans every leftover
            assert manager.steps() == [3, 4] if index >= commit_calls else manager.steps() == [2, 4]
            assert not [e for e in os.listdir(directory) if e.startswith(TEMP_PREFIX)]
            restored = {"a": None, "b": None, "step": None}
            assert manager.restore(restored) == 4 and torch.equal(restored["a"], state(4)["a"])
            manager.close()
            shutil.rmtree(directory)
            cases += 1
    assert cases == 2 * len(calls) and len(calls) >= 12


@pytest.fixture
def small_filesystem(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_real_disk_full_on_a_small_filesystem(small_filesystem):
    manager = trainstate.CheckpointManager(small_filesystem / "run", keep_last=None)
    small = {"w": torch.arange(50_000, dtype=torch.float32)}  # 200 kB
    manager.save(1, small)
    manager.save(2, small)
    before = snapshot(small_filesystem / "run")
    with pytest.raises(trainstate.CheckpointWriteError, match="No space left on device") as caught:
        manager.save(3, {"w": torch.zeros(400_000)})  # 1.6 MB: cannot fit
    assert caught.value.errno == errno.ENOSPC
    assert snapshot(small_filesystem / "run") == before and manager.steps() == [1, 2]
    assert not [e for e in os.listdir(small_filesystem / "run") if e.startswith(TEMP_PREFIX)]  # aborted in place
    manager.save(3, small)  # the space came back: usable
    restored = {"w": None}
    assert manager.restore(restored) == 3 and torch.equal(restored["w"], small["w"])
    manager.close()
