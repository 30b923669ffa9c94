"""Reading a checkpoint: its manifest validated, its files opened, sized and hash-verified (no torch).

Tensors are read by `trainstate.format.loader.TensorLoader`, which takes a reader.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from trainstate.errors import CheckpointNotFoundError, CorruptCheckpointError
from trainstate.format.codec import Decoder, Path
from trainstate.format.hashing import new_hasher
from trainstate.format.header import HeaderEntry, read_exact_into, read_header
from trainstate.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest
from trainstate.storage.base import ReadableFile, Storage

if TYPE_CHECKING:
    from trainstate.format.loader import TensorLoader

__all__ = ["CheckpointReader", "Progress", "open_file_budget"]

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]
_CHUNK = 16 << 20


class CheckpointReader:
    """One committed checkpoint: its validated manifest, and access to its files."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.where = storage.where(name)
        self._handles: dict[str, ReadableFile] | None = None
        self._handles_lock = threading.Lock()
        where = os.path.join(self.where, MANIFEST_NAME)
        try:
            manifest_file = storage.open(name, MANIFEST_NAME)
        except FileNotFoundError:  # asked only on failure: listing 1,000 checkpoints opens 1,000 manifests
            if not storage.exists(name):
                raise CheckpointNotFoundError(f"{self.where}: no such checkpoint") from None
            raise CheckpointNotFoundError(
                f"{self.where}: no {MANIFEST_NAME}; not a committed trainstate checkpoint"
            ) from None
        with manifest_file as f:
            size = _opened_size(f, lambda: storage.size(name, MANIFEST_NAME))
            if size > MAX_MANIFEST_BYTES:
                raise CorruptCheckpointError(f"{where}: manifest is {size} bytes, over the {MAX_MANIFEST_BYTES} cap")
            data = bytearray(size)
            read_exact_into(f, memoryview(data), where=where)
        self.manifest = Manifest.from_json(bytes(data), where=where)
        self._files = {entry.name: entry for entry in self.manifest.files}

    def file(self, name: str, *, where: str) -> FileEntry:
        entry = self._files.get(name) if isinstance(name, str) else None
        if entry is None:
            raise CorruptCheckpointError(
                f"{self.where}: {where}: refers to file {name!r} that the manifest does not list"
            )
        return entry

    @contextmanager
    def opened(self, entry: FileEntry) -> Iterator[ReadableFile]:
        """A data file opened at offset 0, its size checked against the manifest.

        The first call opens *every* data file at once and keeps them open until `close`, so a
        checkpoint deleted by retention while it is being read stays readable through its handles.
        A checkpoint with more files than a quarter of the open-file limit is opened one file at a
        time instead (a concurrent deletion then fails the read with CheckpointNotFoundError).
        """
        with self._handles_lock:
            if self._handles is None and len(self.manifest.files) <= open_file_budget():
                handles: dict[str, ReadableFile] = {}
                try:
                    for item in self.manifest.files:
                        handles[item.name] = self._open_sized(item)
                except BaseException:
                    for handle in handles.values():
                        handle.close()
                    raise
                self._handles = handles
            held = self._handles.get(entry.name) if self._handles is not None else None
        if held is not None:
            held.seek(0)
            yield held
            return
        f = self._open_sized(entry)
        try:
            yield f
        finally:
            f.close()

    def _open_sized(self, entry: FileEntry) -> ReadableFile:
        f = self.storage.open(self.name, entry.name)
        actual = _opened_size(f, lambda: self.storage.size(self.name, entry.name))
        if actual != entry.size:
            f.close()
            raise CorruptCheckpointError(
                f"{os.path.join(self.where, entry.name)}: size is {actual} bytes, "
                f"manifest says {entry.size} (truncated or replaced)"
            )
        return f

    def close(self) -> None:
        """Close the data files opened by reads. The reader can still answer manifest questions."""
        with self._handles_lock:
            handles, self._handles = self._handles or {}, None
        for handle in handles.values():
            handle.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def verify_file(self, entry: FileEntry, progress: Progress | None = None) -> dict[str, HeaderEntry]:
        """Check size, safetensors header and content hash of one file; returns its validated header.

        Uses the reader's open handles once a read opened them; otherwise opens just this file, so
        that every bad file of a damaged checkpoint can be named. ``progress`` gets byte counts.
        """
        where = os.path.join(self.where, entry.name)
        with self._handles_lock:
            held = self._handles[entry.name] if self._handles is not None else None
        f = held if held is not None else self._open_sized(entry)
        try:
            f.seek(0)
            _, header = read_header(f, entry.size, where=where)
            f.seek(0)
            _hash_stream(f, entry, where, progress)
        finally:
            if held is None:
                f.close()
        return header

    def verify(self) -> None:
        """Check every file of the checkpoint; raises CorruptCheckpointError naming the first bad one."""
        for entry in self.manifest.files:
            self.verify_file(entry)

    def decode(self, node: Any, loader: TensorLoader | None, *, allow_pickle: bool = False, path: Path = ()) -> Any:
        """Decode a subtree of the manifest, allocating (not yet filling) its tensors in ``loader``."""
        return Decoder(loader, allow_pickle=allow_pickle, where=self.where).decode(node, path)

    def metadata(self) -> Any:
        return self.decode(self.manifest.metadata, None)


def _opened_size(f: ReadableFile, by_name: Callable[[], int]) -> int:
    """The size of the file behind ``f`` (fstat, immune to a rename under us; an object store's file
    knows it from opening), else by its name."""
    known = getattr(f, "size", None)
    if type(known) is int:
        return known
    try:
        return os.fstat(f.fileno()).st_size  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return by_name()


def open_file_budget() -> int:
    """How many data files one reader may hold open at once: a quarter of the soft open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1024 if soft == resource.RLIM_INFINITY else max(8, min(1024, soft // 4))


def _hash_stream(f: ReadableFile, entry: FileEntry, where: str, progress: Progress | None = None) -> None:
    hasher = new_hasher()
    buffer = bytearray(min(_CHUNK, max(entry.size, 1)))
    view = memoryview(buffer)
    remaining = entry.size
    while remaining:
        n = f.readinto(view[: min(len(view), remaining)])
        if not n:
            raise CorruptCheckpointError(f"{where}: file ended early (truncated)")
        hasher.update(view[:n])
        remaining -= n
        if progress is not None:
            progress(n)
    if hasher.hexdigest() != entry.hash:
        raise CorruptCheckpointError(f"{where}: content hash mismatch (the file is damaged or was modified)")
