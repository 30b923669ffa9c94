"""The storage protocol: where checkpoint directories live and how one is committed atomically."""

from __future__ import annotations

import builtins
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from types import TracebackType
from typing import Protocol

from trainstate.errors import CorruptCheckpointError

__all__ = [
    "MANIFEST_NAME",
    "QUARANTINE_DIR",
    "TEMP_PREFIX",
    "PendingCheckpoint",
    "ReadableFile",
    "Storage",
    "check_checkpoint_name",
    "check_name",
]

MANIFEST_NAME = "manifest.json"
"""The file whose presence makes a checkpoint exist; it is written last."""

QUARANTINE_DIR = "trainstate-quarantine"
"""Where checkpoints that failed verification are moved aside (kept for a post mortem, never deleted
silently): ``trainstate ls`` shows them, ``trainstate prune --quarantined`` removes them."""

TEMP_PREFIX = ".trainstate-tmp-"
"""Entries whose name starts with this are in-progress or abandoned writes, never checkpoints."""

Buffer = bytes | bytearray | memoryview


class ReadableFile(Protocol):
    """What readers need from an opened checkpoint file (a raw local file, or an fsspec file)."""

    def read(self, size: int = -1, /) -> bytes: ...

    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> ReadableFile: ...

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


# A checkpoint or file name is one plain path component: no separators, no "..", no NUL,
# nothing hidden. Anything else in a manifest is hostile or corrupt.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=-]{0,254}")


def check_name(name: str, *, where: str) -> str:
    """Return ``name`` if it is a safe single path component, else raise CorruptCheckpointError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise CorruptCheckpointError(f"{where}: unsafe file name {name!r} (must be one plain path component)")
    return name


def check_checkpoint_name(name: str, *, where: str) -> str:
    """Return ``name`` if a checkpoint may be called so, else raise ValueError stating the rule.

    Anything a filesystem takes as one entry is allowed (spaces, unicode, ``@``, ``:``, a leading
    ``.`` or ``-``): no ``/`` or NUL, not ``.`` or ``..``, at most 255 bytes, and not starting with
    the prefix of trainstate's temporaries.
    """
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\0" in name
        or len(name.encode("utf-8", "surrogateescape")) > 255
        or name.startswith(TEMP_PREFIX)
    ):
        raise ValueError(
            f"{where}: {name!r} cannot name a checkpoint: use one path component of at most 255 bytes, "
            f"without '/' or NUL, not '.' or '..', not starting with {TEMP_PREFIX!r}"
        )
    return name


class PendingCheckpoint(ABC):
    """A storage transaction: one checkpoint being written. Files go in with `write` (or `link`),
    then `commit` writes the manifest last and publishes all or nothing; `abort` discards it.

    A distributed save has one transaction: the coordinator `begin`s it and shares its
    `transaction_id`; every other rank `Storage.join`s it, writes its own files, and leaves the
    commit (and any abort) to the coordinator."""

    transaction_id: str = ""

    @abstractmethod
    def write(self, filename: str, chunks: Iterable[Buffer]) -> int:
        """Write one file from ``chunks`` and make it durable; returns its size.

        The file is invisible to readers until `commit`. Different files may be written from
        different threads at once. Raises CheckpointWriteError on any I/O failure.
        """

    @abstractmethod
    def link(self, filename: str, source: str) -> int:
        """Add file ``filename`` of committed checkpoint ``source`` (same storage) without rewriting
        it: a hard link locally, a server-side copy on an object store; returns its size. The
        checkpoint stays self-contained (deleting ``source`` later never breaks it). Raises
        CheckpointNotFoundError if the source file is missing, CheckpointWriteError on failure."""

    @abstractmethod
    def commit(self, manifest: bytes) -> None:
        """Write ``manifest`` last (as `MANIFEST_NAME`) and publish every file at once. Before this
        returns nothing is visible; after it, everything is, durably. Raises CheckpointWriteError
        (nothing published) on failure."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written so far. Never raises; safe to call after a failed commit."""


class Storage(ABC):
    """A directory that holds checkpoints, each a sub-directory of plain files."""

    root: str
    remote: bool = False
    """Whether reading a byte again costs another transfer (an object store), not a page-cache hit."""

    @abstractmethod
    def begin(self, name: str, *, overwrite: bool = True) -> PendingCheckpoint:
        """Start writing checkpoint ``name``. With ``overwrite`` an existing checkpoint is replaced
        atomically at commit; without, commit raises CheckpointExistsError. Anything else that
        exists under ``name`` (a directory of other files, a plain file) is never replaced:
        CheckpointExistsError, at begin and again at commit. Raises ValueError for a name that
        `check_checkpoint_name` refuses."""

    def join(self, name: str, transaction_id: str) -> PendingCheckpoint:
        """Take part in the transaction ``transaction_id`` that another process began for ``name``:
        the result writes files into it; its `commit` raises and its `abort` discards only its own
        files. Raises CheckpointWriteError if the transaction is not visible here (no shared storage)."""
        raise NotImplementedError(f"{type(self).__name__} does not support distributed saves")

    @abstractmethod
    def open(self, name: str, filename: str) -> ReadableFile:
        """Open a committed file for reading. Raises CheckpointNotFoundError if it is missing,
        CorruptCheckpointError if it is not a regular file, and OSError (naming the path) for
        anything that is not about the checkpoint (permissions, too many open files)."""

    @abstractmethod
    def size(self, name: str, filename: str) -> int:
        """Size in bytes of a file. Raises CheckpointNotFoundError if it is missing."""

    @abstractmethod
    def exists(self, name: str, filename: str | None = None) -> bool:
        """Whether checkpoint ``name`` (or one of its files) exists. Never raises for a missing path;
        raises OSError (naming the path) when it cannot tell, e.g. permission denied."""

    @abstractmethod
    def files(self, name: str) -> builtins.list[str]:
        """Names of the files in checkpoint ``name`` (committed or not). Raises FileNotFoundError if
        it is missing, NotADirectoryError if it is not a checkpoint directory, OSError (naming the
        path) when it cannot be read."""

    @abstractmethod
    def list(self) -> builtins.list[str]:
        """Names of the entries in the root, excluding in-progress temporaries. Missing root: []."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove checkpoint ``name`` so it is no longer listed as committed, then its files.
        A missing checkpoint is not an error."""

    @abstractmethod
    def quarantine(self, name: str) -> str:
        """Move checkpoint ``name`` into `QUARANTINE_DIR` under a new unique name (atomically: it is
        listed under one name or the other) and return that path relative to the root. Only call
        while holding the writer lock. Raises CheckpointWriteError if it cannot be moved."""

    @abstractmethod
    def cleanup(self) -> builtins.list[str]:
        """Remove leftovers of writers that died mid-save (never a live writer's work in progress,
        in this process or another); returns what was removed. Needs no lock."""

    @abstractmethod
    def lock(self, *, timeout: float = 0.0) -> None:
        """Take the single-writer lock of a managed directory (a CheckpointManager, ``prune``),
        waiting up to ``timeout`` seconds. Raises CheckpointLockedError if another writer holds it.
        A one-shot write of a single checkpoint does not need it: its commit is atomic by itself."""

    @abstractmethod
    def unlock(self) -> None:
        """Release the writer lock if held."""

    def where(self, name: str) -> str:
        """How checkpoint ``name`` is named in messages (a path or URL)."""
        return os.path.join(self.root, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"
