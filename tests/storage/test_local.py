"""LocalStorage: the commit protocol's syscall order, atomic replace, locking, leftovers."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

import trainstate
from trainstate.storage import TEMP_PREFIX, LocalStorage
from trainstate.storage import local as local_module


def _recorder(monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_exchange = os.fsync, os.rename, local_module._exchange

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(dst)))
        return real_rename(src, dst)

    def exchange(src, dst):
        events.append(("exchange", str(dst)))
        return real_exchange(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(local_module, "_exchange", exchange)
    return events


@pytest.mark.parametrize("replace", [False, True], ids=["new", "replace"])
def test_every_file_and_directory_is_fsynced_in_commit_order(tmp_path, monkeypatch, replace):
    storage = LocalStorage(tmp_path)
    if replace:
        pending = storage.begin("ckpt")
        pending.write("old.bin", [b"old"])
        pending.commit(b"{}")
    events = _recorder(monkeypatch)
    pending = storage.begin("ckpt")
    pending.write("a.bin", [b"a" * 10])
    pending.commit(b"{}")  # writes the manifest last

    publish = next(i for i, (kind, _) in enumerate(events) if kind in ("rename", "exchange"))
    synced_before = {os.path.basename(p) for kind, p in events[:publish] if kind == "fsync"}
    tmp_name = next(
        os.path.basename(p)
        for kind, p in events[:publish]
        if kind == "fsync" and os.path.basename(p).startswith(TEMP_PREFIX)
    )
    assert {"a.bin", "manifest.json", tmp_name} <= synced_before  # files, then their directory
    assert events[publish] == ("exchange" if replace else "rename", str(tmp_path / "ckpt"))
    assert ("fsync", str(tmp_path)) in events[publish + 1 :]  # the parent, after the rename
    manifest_sync = events.index(("fsync", str(tmp_path / tmp_name / "manifest.json")))
    data_sync = next(i for i, (k, p) in enumerate(events) if k == "fsync" and p.endswith("a.bin"))
    assert data_sync < manifest_sync
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["a.bin", "manifest.json"]
    assert not [e for e in os.listdir(tmp_path) if e.startswith(TEMP_PREFIX)]


def test_fsync_failure_is_fatal_and_publishes_nothing(tmp_path, monkeypatch):
    trainstate.save(tmp_path / "ckpt", {"v": 1})

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(trainstate.CheckpointWriteError, match="fsync failed: Input/output error"):
        trainstate.save(tmp_path / "ckpt", {"v": 2})
    monkeypatch.undo()
    assert trainstate.load(tmp_path / "ckpt") == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def _hold_lock(root, ready, release):
    storage = LocalStorage(root)
    storage.lock()
    ready.set()
    release.wait(30)
    storage.unlock()


def test_second_writer_gets_a_clear_error_then_succeeds_after_release(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(trainstate.CheckpointLockedError, match="another writer holds the lock"):
            LocalStorage(tmp_path).lock(timeout=0.2)
    finally:
        release.set()
        holder.join(30)
    storage = LocalStorage(tmp_path)
    storage.lock()
    storage.unlock()


def _writer_in_a_child(tmp_path, *, then: str) -> tuple[int, int]:
    """Fork a writer that begins a checkpoint, writes a file, reports, then waits or dies."""
    ready, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            pending = LocalStorage(tmp_path).begin("ckpt")
            pending.write("a.bin", [b"partial"])
            os.write(ready[1], b"x")
            if then == "wait":
                os.read(go[0], 1)
        finally:
            os._exit(0)  # dies: never commits, never aborts
    assert os.read(ready[0], 1) == b"x"
    return pid, go[1]


def test_cleanup_removes_leftovers_of_a_dead_writer(tmp_path):
    pid, _ = _writer_in_a_child(tmp_path, then="die")
    os.waitpid(pid, 0)
    assert LocalStorage(tmp_path).list() == [] and len(os.listdir(tmp_path)) == 1
    trainstate.save(tmp_path / "other", {"v": 1})  # the next writer cleans up
    assert sorted(os.listdir(tmp_path)) == ["other"]


def test_cleanup_never_removes_a_live_writers_work(tmp_path):
    pid, go = _writer_in_a_child(tmp_path, then="wait")
    try:
        leftover = os.listdir(tmp_path)
        assert LocalStorage(tmp_path).cleanup() == [] and os.listdir(tmp_path) == leftover  # locked by the child
        pending = LocalStorage(tmp_path).begin("mine")  # and this process's own work in progress
        assert LocalStorage(tmp_path).cleanup() == [] and len(os.listdir(tmp_path)) == 2
        pending.abort()
    finally:
        os.write(go, b"x")
        os.waitpid(pid, 0)
    assert LocalStorage(tmp_path).cleanup() == leftover and os.listdir(tmp_path) == []


def test_one_shot_save_beside_a_running_manager_needs_no_lock(tmp_path):
    with trainstate.CheckpointManager(tmp_path, lock_timeout=0) as manager:
        manager.save(1, {"w": torch.ones(1)})  # the manager now holds the directory's writer lock
        trainstate.save(tmp_path / "best", {"w": torch.ones(1)})  # at once, no CheckpointLockedError
        manager.save(2, {"w": torch.ones(1)})
        assert manager.steps() == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["best", "step_00000001", "step_00000002"]


def test_delete_hides_the_checkpoint_before_removing_files(tmp_path):
    trainstate.save(tmp_path / "ckpt", {"v": 1})
    storage = LocalStorage(tmp_path)
    storage.delete("ckpt")
    storage.delete("ckpt")  # missing: not an error
    assert storage.list() == [] and os.listdir(tmp_path) == []


def test_root_that_is_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(trainstate.CheckpointWriteError, match="not a directory"):
        trainstate.save(tmp_path / "f" / "ckpt", {"v": 1})


def test_unsafe_names_are_refused(tmp_path):
    storage = LocalStorage(tmp_path)
    for bad in ["..", "../x", "a/b", "/abs", "", ".hidden", "a\x00b"]:
        with pytest.raises(trainstate.CorruptCheckpointError, match="unsafe file name"):
            storage.open("ckpt", bad)


def test_forked_children_do_not_keep_the_writer_lock(tmp_path):
    """A DataLoader worker forked after the first save must not hold a killed trainer's lock."""
    storage = LocalStorage(tmp_path)
    storage.lock()
    read_end, write_end = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker": outlives its parent's lock unless the fd was closed at fork
        os.close(write_end)
        os.write(ready_write, b"r")  # fork hooks have run by the time the child executes this
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    os.close(ready_write)
    try:
        assert os.read(ready_read, 1) == b"r"
        fd, storage._lock_fd = storage._lock_fd, None
        local_module._HELD_LOCKS.discard(fd)
        os.close(fd)  # the parent dies without unlocking, as under SIGKILL; the child still runs
        other = LocalStorage(tmp_path)
        other.lock(timeout=0)  # would raise CheckpointLockedError if the child had inherited the lock
        other.unlock()
    finally:
        os.write(write_end, b"x")
        os.close(write_end)
        os.close(ready_read)
        os.waitpid(pid, 0)


def test_a_checkpoint_writer_does_not_clean_up_a_single_file_being_written(tmp_path):
    """Regression (seen when `trainstate export` and `convert` ran side by side in one directory): the
    cleanup of a checkpoint writer removed the temporary file of an atomic single-file write."""
    from trainstate.storage import atomic_write_file

    with atomic_write_file(tmp_path / "weights.safetensors") as f:
        f.write(b"part one, ")
        trainstate.save(tmp_path / "ckpt", {"v": 1})  # takes the lock and cleans leftovers
        f.write(b"part two")
    assert (tmp_path / "weights.safetensors").read_bytes() == b"part one, part two"
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "weights.safetensors"]


def test_link_adds_a_committed_file_without_rewriting_it(tmp_path):
    storage = LocalStorage(tmp_path)
    first = storage.begin("a")
    first.write("data.bin", [b"payload"])
    first.commit(b"{}")
    second = storage.begin("b")
    assert second.link("data.bin", "a") == len(b"payload")
    second.commit(b"{}")
    assert os.stat(tmp_path / "b" / "data.bin").st_ino == os.stat(tmp_path / "a" / "data.bin").st_ino
    storage.delete("a")  # self-contained: b keeps its file
    assert (tmp_path / "b" / "data.bin").read_bytes() == b"payload"
    third = storage.begin("c")
    with pytest.raises(trainstate.CheckpointNotFoundError, match="no such file to link"):
        third.link("data.bin", "a")
    third.abort()
    assert sorted(os.listdir(tmp_path)) == ["b"]
