"""A storage that wraps another and fails its N-th mutating call: fault injection through the storage
protocol itself, for any backend, instead of patching one backend's private names."""

from __future__ import annotations

import builtins
import errno
from collections.abc import Iterable
from typing import Any

from trainstate.errors import CheckpointWriteError
from trainstate.storage.base import Buffer, PendingCheckpoint, ReadableFile, Storage


class Faults:
    """Counts mutating calls; the ``fail_at``-th one raises (None: record only)."""

    def __init__(self, fail_at: int | None = None, code: int = errno.EIO) -> None:
        self.fail_at, self.code = fail_at, code
        self.calls: list[str] = []

    def __call__(self, what: str) -> None:
        self.calls.append(what)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            error = CheckpointWriteError(f"injected: {what} failed: [Errno {self.code}]; nothing was committed")
            error.errno = self.code
            raise error


class FaultyPending(PendingCheckpoint):
    def __init__(self, inner: PendingCheckpoint, faults: Faults) -> None:
        self._inner, self._faults = inner, faults

    def write(self, filename: str, chunks: Iterable[Buffer]) -> int:
        self._faults(f"write {filename}")
        return self._inner.write(filename, chunks)

    def link(self, filename: str, source: str) -> int:
        self._faults(f"link {filename}")
        return self._inner.link(filename, source)

    def commit(self, manifest: bytes) -> None:
        self._faults("commit")
        self._inner.commit(manifest)

    def abort(self) -> None:
        self._inner.abort()  # never fails: the protocol promises it


class FaultyStorage(Storage):
    """``inner`` with a `Faults` counter in front of every call that changes something."""

    def __init__(self, inner: Storage, faults: Faults) -> None:
        self._inner, self.faults = inner, faults
        self.root, self.remote = inner.root, inner.remote

    def where(self, name: str) -> str:
        return self._inner.where(name)

    def begin(self, name: str, *, overwrite: bool = True) -> PendingCheckpoint:
        self.faults(f"begin {name}")
        return FaultyPending(self._inner.begin(name, overwrite=overwrite), self.faults)

    def delete(self, name: str) -> None:
        self.faults(f"delete {name}")
        self._inner.delete(name)

    def quarantine(self, name: str) -> str:
        self.faults(f"quarantine {name}")
        return self._inner.quarantine(name)

    def open(self, name: str, filename: str) -> ReadableFile:
        return self._inner.open(name, filename)

    def size(self, name: str, filename: str) -> int:
        return self._inner.size(name, filename)

    def exists(self, name: str, filename: str | None = None) -> bool:
        return self._inner.exists(name, filename)

    def files(self, name: str) -> builtins.list[str]:
        return self._inner.files(name)

    def list(self) -> builtins.list[str]:
        return self._inner.list()

    def cleanup(self) -> builtins.list[str]:
        return self._inner.cleanup()

    def lock(self, *, timeout: float = 0.0) -> None:
        self._inner.lock(timeout=timeout)

    def unlock(self) -> None:
        self._inner.unlock()

    def __getattr__(self, name: str) -> Any:  # backend extras (none are mutating)
        return getattr(self._inner, name)
