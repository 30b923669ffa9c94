"""The storage conformance suite: what every backend must do, tested through the protocol alone.

Each test runs against every backend in ``BACKENDS``: the local filesystem, and the object-store
backend over ``memory://`` and over a real S3 API server (moto in server mode, see s3support). The
fault-injection part wraps a backend in ``faulty_storage.FaultyStorage`` and fails each mutating
call of a CheckpointManager save in turn.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import trainstate
from faulty_storage import Faults, FaultyStorage
from support import assert_same
from trainstate import CheckpointExistsError, CheckpointManager, CheckpointNotFoundError, CheckpointWriteError
from trainstate.format.reader import CheckpointReader
from trainstate.storage import MANIFEST_NAME, LocalStorage, ObjectStorage, Storage


def _s3(tmp: Path, endpoint: str) -> Storage:
    from s3support import new_bucket, options

    # stale_after=0: a dead lease-less writer's leftovers go at the next cleanup, as locally
    return ObjectStorage(f"s3://{new_bucket(endpoint)}/{tmp.name}", options(endpoint), stale_after=0.0, lease_ttl=2)


BACKENDS: dict[str, Callable[..., Storage]] = {
    "local": lambda tmp, endpoint: LocalStorage(tmp / "root"),
    "memory": lambda tmp, endpoint: ObjectStorage(f"memory://{uuid.uuid4().hex}/{tmp.name}", stale_after=0.0),
    "s3": _s3,
}


def _make(request, backend: str, tmp: Path) -> Storage:
    endpoint = request.getfixturevalue("s3_endpoint") if backend == "s3" else ""
    return BACKENDS[backend](tmp, endpoint)


@pytest.fixture(params=list(BACKENDS))
def storage(request, tmp_path) -> Storage:
    return _make(request, request.param, tmp_path)


def _commit(storage: Storage, name: str, files: dict[str, bytes], manifest: bytes = b"{}") -> None:
    pending = storage.begin(name)
    for filename, data in files.items():
        pending.write(filename, [data])
    pending.commit(manifest)


def _read(storage: Storage, name: str, filename: str) -> bytes:
    with storage.open(name, filename) as f:
        return f.read()


def test_nothing_is_visible_until_commit_and_everything_after(storage):
    pending = storage.begin("a")
    pending.write("data.bin", [b"x" * 10, b"y"])
    assert storage.list() == [] and not storage.exists("a")
    pending.commit(b'{"m": 1}')
    assert storage.list() == ["a"] and storage.exists("a", MANIFEST_NAME)
    assert _read(storage, "a", "data.bin") == b"x" * 10 + b"y" and storage.size("a", "data.bin") == 11
    assert _read(storage, "a", MANIFEST_NAME) == b'{"m": 1}'


def test_a_joined_transaction_is_committed_by_its_coordinator_only(storage):
    """A distributed save: rank 0 begins, the others join by transaction id and write their files."""
    coordinator = storage.begin("a")
    participant = storage.join("a", coordinator.transaction_id)  # in practice another process
    coordinator.write("shard-0.bin", [b"0"])
    participant.write("shard-1.bin", [b"1"])
    with pytest.raises(CheckpointWriteError, match="only the coordinator commits"):
        participant.commit(b"{}")
    assert storage.list() == []
    coordinator.commit(b"{}")
    assert _read(storage, "a", "shard-1.bin") == b"1" and _read(storage, "a", "shard-0.bin") == b"0"


def test_a_participant_s_abort_takes_only_its_files_and_the_coordinator_s_takes_all(storage):
    coordinator = storage.begin("a")
    participant = storage.join("a", coordinator.transaction_id)
    coordinator.write("shard-0.bin", [b"0"])
    participant.write("shard-1.bin", [b"1"])
    participant.abort()
    coordinator.commit(b"{}")
    assert sorted(storage.files("a")) == [MANIFEST_NAME, "shard-0.bin"]
    again = storage.begin("b")
    storage.join("b", again.transaction_id).write("shard-1.bin", [b"1"])
    again.abort()
    assert storage.list() == ["a"] and storage.cleanup() == []


def test_joining_a_transaction_that_is_not_there_is_a_write_error(storage):
    gone = storage.begin("a")
    gone.abort()
    with pytest.raises(CheckpointWriteError, match="shared by every rank"):
        storage.join("a", gone.transaction_id)
    with pytest.raises(ValueError, match="not a transaction"):
        storage.join("a", "../elsewhere")


def test_abort_leaves_nothing(storage):
    pending = storage.begin("a")
    pending.write("data.bin", [b"x"])
    pending.abort()
    pending.abort()  # safe to repeat
    assert storage.list() == [] and storage.cleanup() == []


def test_replace_is_atomic_and_an_open_reader_never_mixes_old_and_new(storage):
    _commit(storage, "a", {"data.bin": b"old"})
    reader = storage.open("a", "data.bin")
    _commit(storage, "a", {"data.bin": b"new!"})
    if storage.root.startswith("s3://"):  # the old attempt's objects are gone: the reader is told so
        with pytest.raises(CheckpointNotFoundError, match="removed while it was being read"):
            reader.read()
    else:  # a local reader's open file (memory://: its copy) keeps the old bytes
        assert reader.read() == b"old"
    reader.close()
    assert _read(storage, "a", "data.bin") == b"new!" and storage.list() == ["a"]


def test_no_overwrite_keeps_the_old_checkpoint(storage):
    _commit(storage, "a", {"data.bin": b"old"})
    with pytest.raises(CheckpointExistsError):
        storage.begin("a", overwrite=False)
    assert _read(storage, "a", "data.bin") == b"old"


def test_delete_and_missing_paths(storage):
    _commit(storage, "a", {"data.bin": b"x"})
    storage.delete("a")
    storage.delete("a")  # missing: not an error
    assert storage.list() == [] and not storage.exists("a") and not storage.exists("a", "data.bin")
    with pytest.raises(CheckpointNotFoundError):
        storage.open("a", "data.bin")
    with pytest.raises(CheckpointNotFoundError):
        storage.size("a", "data.bin")


def test_link_keeps_each_checkpoint_self_contained(storage):
    _commit(storage, "a", {"data.bin": b"payload"})
    pending = storage.begin("b")
    assert pending.link("data.bin", "a") == 7
    pending.commit(b"{}")
    storage.delete("a")
    assert _read(storage, "b", "data.bin") == b"payload"


def test_quarantine_moves_a_checkpoint_out_of_the_listing(storage):
    _commit(storage, "step_00000003", {"data.bin": b"x"})
    moved = storage.quarantine("step_00000003")
    assert "step_00000003" not in storage.list() and not storage.exists("step_00000003")
    assert "step_00000003" in moved


def test_a_writer_that_dies_at_any_step_loses_nothing_committed(storage):
    if storage.root.startswith("memory://"):
        pytest.skip("memory:// lives in one process: a forked writer's objects are not seen here")
    _commit(storage, "a", {"data.bin": b"committed"})
    for dies_after in ("begin", "write", "write twice"):
        pid = os.fork()
        if pid == 0:  # the writer: stops dead after the given step, never commits or aborts
            try:
                pending = storage.begin("a")
                if dies_after != "begin":
                    pending.write("data.bin", [b"partial"])
                if dies_after == "write twice":
                    pending.write("more.bin", [b"partial"])
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert storage.list() == ["a"] and _read(storage, "a", "data.bin") == b"committed"
        assert len(storage.cleanup()) == 1  # the dead writer's leftovers go, and only they
        assert storage.cleanup() == []


# --------------------------------------------------------------------------- fault injection
def _state(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), float(step)), "b": torch.arange(step, step + 3)}


def _calls_of_a_save(request, tmp_path: Path, backend: str) -> list[str]:
    faults = Faults()
    with CheckpointManager(FaultyStorage(_make(request, backend, tmp_path / "probe"), faults), keep_last=2) as manager:
        manager.save(1, _state(1))
        manager.save(2, _state(2))
        faults.calls.clear()
        manager.save(3, _state(3))  # writes step 3 and deletes step 1 (retention)
    return list(faults.calls)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_fault_at_every_mutating_call_of_a_save(request, tmp_path, backend):
    calls = _calls_of_a_save(request, tmp_path, backend)
    assert calls[0] == "begin step_00000003" and "commit" in calls and calls[-1] == "delete step_00000001"
    for index, call in enumerate(calls, start=1):
        root = tmp_path / f"case{index}"
        faults = Faults()
        storage = FaultyStorage(_make(request, backend, root), faults)
        with CheckpointManager(storage, keep_last=2) as manager:
            manager.save(1, _state(1))
            manager.save(2, _state(2))
            faults.fail_at = len(faults.calls) + index
            if call.startswith("delete"):  # retention after the commit: the save stands, retried next time
                assert manager.save(3, _state(3))
                assert manager.steps() == [1, 2, 3]
            else:
                with pytest.raises(CheckpointWriteError, match=f"injected: {call} failed"):
                    manager.save(3, _state(3))
                assert manager.steps() == [1, 2], call
            for step in manager.steps():
                with CheckpointReader(storage, f"step_{step:08d}") as reader:
                    assert_same(trainstate.api.restore(reader, None), _state(step))
            faults.fail_at = None
            assert manager.save(4, _state(4))  # still usable; every leftover cleaned
            assert manager.steps() == [3, 4] if call.startswith("delete") else manager.steps() == [2, 4]
        assert not [e for e in storage.list() if e.startswith(".")]
