"""Loads as data: a `LoadPlan` of read items (file, byte range, destination), and `execute_load`.

Planning (`reader.TensorLoader`, while the manifest tree is decoded) decides where each saved
tensor's bytes go: into a live tensor that fits (in place) or a fresh one. Execution knows
nothing of trees: it reads byte ranges of files into destinations, verifying hashes, in the order
that keeps live objects safe. A distributed or object-store reader plugs in at this seam: it
consumes the same read items.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from trainstate.errors import CorruptCheckpointError
from trainstate.format.hashing import new_hasher
from trainstate.format.header import read_exact_into
from trainstate.format.tensorfile import byte_view

if TYPE_CHECKING:
    from trainstate.format.reader import CheckpointReader

__all__ = ["LoadPlan", "ReadItem", "execute_load"]

MAX_READERS = 4


@dataclass
class ReadItem:
    """The bytes ``[start, end)`` of ``file`` (safetensors tensor ``key``) read into ``target``.

    ``target`` is a contiguous CPU tensor: a live one (``in_place``: a parameter or optimizer
    moment whose load_state_dict would copy into it anyway) or freshly allocated. ``finals`` are
    copies on other devices (``map_location``), filled from ``target`` after the read.
    """

    file: str
    key: str
    start: int
    end: int
    target: torch.Tensor
    in_place: bool
    finals: list[torch.Tensor] = field(default_factory=list)

    def final_on(self, device: torch.device) -> torch.Tensor:
        """The copy of this tensor on ``device`` (made once, filled after the read)."""
        for tensor in self.finals:
            if tensor.device == device:
                return tensor
        tensor = torch.empty(self.target.shape, dtype=self.target.dtype, device=device)
        self.finals.append(tensor)
        return tensor


@dataclass
class LoadPlan:
    """Read items by file, in the order they were planned."""

    by_file: dict[str, dict[str, ReadItem]] = field(default_factory=dict)

    def item(self, file: str, key: str) -> ReadItem | None:
        return self.by_file.get(file, {}).get(key)

    def add(self, item: ReadItem) -> ReadItem:
        self.by_file.setdefault(item.file, {})[item.key] = item
        return item

    def items(self, file: str) -> list[ReadItem]:
        """One file's items in byte order (one forward pass over the file)."""
        return sorted(self.by_file.get(file, {}).values(), key=lambda item: item.start)

    def __iter__(self) -> Iterator[ReadItem]:
        for items in self.by_file.values():
            yield from items.values()

    @property
    def nbytes(self) -> int:
        return sum(item.end - item.start for item in self)


def execute_load(plan: LoadPlan, reader: CheckpointReader, *, verify: bool = True) -> None:
    """Read every item of ``plan`` from ``reader``'s files. Raises CorruptCheckpointError on any mismatch.

    Only files with items are opened. When bytes go straight into live tensors, every file is
    verified before the first byte lands in one, so a damaged checkpoint never leaves a live object
    half-restored: files holding only fresh tensors are hashed while they are read (one pass);
    files with live targets are hashed first and read after everything else verified (two passes,
    the second from the page cache). From an object store, where a second pass is a second
    download, such files are read once into staging tensors and copied into the live ones after
    every file verified.
    """
    names = [e.name for e in reader.manifest.files if e.name in plan.by_file]
    if not verify:
        _each(names, lambda name: _read_file(plan, reader, name, verify=False))
        return
    live = [n for n in names if any(item.in_place for item in plan.by_file[n].values())]
    fresh = [n for n in names if n not in live]
    if reader.storage.remote and live:
        staged = LoadPlan()
        pairs = []
        for item in (i for n in live for i in plan.by_file[n].values()):
            copy = staged.add(ReadItem(item.file, item.key, item.start, item.end, torch.empty_like(item.target), False))
            pairs.append((item, copy))
        _each(fresh, lambda name: _read_file(plan, reader, name, verify=True))
        _each(live, lambda name: _read_file(staged, reader, name, verify=True))
        for item, copy in pairs:
            item.target.copy_(copy.target)
            for final in item.finals:
                final.copy_(item.target)
        return
    _each(live, lambda name: reader.verify_file(reader.file(name, where="file list")))
    _each(fresh, lambda name: _read_file(plan, reader, name, verify=True))
    _each(live, lambda name: _read_file(plan, reader, name, verify=False))


def _each(names: list[str], work: Callable[[str], object]) -> None:
    if len(names) <= 1:
        for name in names:
            work(name)
        return
    with ThreadPoolExecutor(max_workers=min(MAX_READERS, len(names))) as pool:
        for future in [pool.submit(work, n) for n in names]:
            future.result()


def _read_file(plan: LoadPlan, reader: CheckpointReader, name: str, *, verify: bool) -> None:
    entry = reader.file(name, where="file list")
    items = plan.items(name)
    where = os.path.join(reader.where, name)
    header_len = items[0].start if items else 0
    # The items cover the whole file (the usual case): hash what is read, one pass.
    stream_hash = verify and items and header_len + sum(i.end - i.start for i in items) == entry.size
    if verify and not stream_hash:
        reader.verify_file(entry)
    hasher = new_hasher() if stream_hash else None
    with reader.opened(entry) as f:
        if hasher is not None:
            head = bytearray(header_len)
            read_exact_into(f, memoryview(head), where=where)
            hasher.update(head)
        for item in items:
            f.seek(item.start)
            view = byte_view(item.target)
            read_exact_into(f, view, where=where)
            if hasher is not None:
                hasher.update(view)
    if hasher is not None and hasher.hexdigest() != entry.hash:
        raise CorruptCheckpointError(f"{where}: content hash mismatch (the file is damaged or was modified)")
    for item in items:
        for final in item.finals:
            final.copy_(item.target)
