"""trainstate's `StorageWriter` / `StorageReader` for torch.distributed.checkpoint (DCP).

DCP plans (sharding, deduplication of replicated tensors, resharding on load); these classes do
the I/O through trainstate's storage transaction: each rank writes its chunks into one safetensors
file, hashed while written; the coordinator's `finish` puts DCP's metadata (every tensor's chunks
and where they are) into trainstate's JSON manifest and commits. DCP's own ``.metadata`` pickle is
never written or read, and only tensors are handed to DCP (everything else is in the manifest's
JSON tree), so DCP never ``torch.save``s a value either.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import Metadata, StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from trainstate.errors import CorruptCheckpointError, UnsupportedFormatError, UnsupportedValueError
from trainstate.format.hashing import new_hasher
from trainstate.format.header import read_header, valid_shape
from trainstate.format.load_plan import LoadPlan as ReadPlan
from trainstate.format.load_plan import ReadItem as ByteRange
from trainstate.format.load_plan import execute_load
from trainstate.format.manifest import FileEntry
from trainstate.format.reader import CheckpointReader
from trainstate.format.tensorfile import dtype_from_name, dtype_name, encode_file, stored_as
from trainstate.storage.base import PendingCheckpoint

__all__ = ["ShardReader", "ShardWriter", "chunk_key", "chunk_problems", "rank_errors", "shard_file"]


def rank_errors(failures: dict[int, Any]) -> dict[int, BaseException]:
    """The original error of each failed rank in a DCP ``CheckpointException`` (DCP wraps them as
    ``(exception, traceback summary)``)."""
    out = {}
    for rank, failure in failures.items():
        error = failure[0] if isinstance(failure, tuple) and failure else failure
        out[rank] = error if isinstance(error, BaseException) else RuntimeError(str(error))
    return out


def shard_file(rank: int) -> str:
    return f"shard-{rank:05d}.safetensors"


def chunk_key(index: MetadataIndex) -> str:
    """The safetensors key of one chunk: the tensor's key and the chunk's offsets."""
    offsets = ",".join(str(o) for o in index.offset) if index.offset is not None else ""
    return f"{index.fqn}@{offsets}"


@dataclasses.dataclass(frozen=True)
class _Stored:
    """Where a chunk went (DCP's ``storage_data`` of a WriteResult): file, key, and the file entry."""

    file: str
    key: str
    entry: FileEntry


class ShardWriter(StorageWriter):
    """Writes this rank's chunks through ``pending``; ``on_finish(metadata, files)`` (coordinator)
    builds and commits the manifest."""

    def __init__(
        self, pending: PendingCheckpoint, rank: int, on_finish: Callable[[Metadata, list[FileEntry]], None]
    ) -> None:
        self._pending = pending
        self._rank = rank
        self._on_finish = on_finish

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        items: list[tuple[str, torch.Tensor]] = []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:  # never: only tensors are handed to DCP
                raise UnsupportedValueError(f"{item.index.fqn}: DCP asked to pickle a value; trainstate never does")
            tensor = planner.resolve_data(item)
            assert isinstance(tensor, torch.Tensor)
            items.append((chunk_key(item.index), tensor.detach()))
        results: list[WriteResult] = []
        if items:
            name = shard_file(self._rank)
            hasher = new_hasher()
            _, chunks = encode_file(items, hasher)
            size = self._pending.write(name, chunks)
            entry = FileEntry(name, size, hasher.hexdigest())
            for item, (key, tensor) in zip(plan.items, items, strict=True):
                results.append(
                    WriteResult(item.index, tensor.numel() * tensor.element_size(), _Stored(name, key, entry))
                )
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rank in results for r in rank}
        files = {r.storage_data.entry.name: r.storage_data.entry for rank in results for r in rank}
        self._on_finish(metadata, sorted(files.values(), key=lambda e: e.name))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def storage_meta(self) -> None:
        return None


def sharded_section(metadata: Metadata) -> dict[str, Any]:
    """DCP's metadata as the manifest's JSON: for each tensor its dtype, global shape, and chunks
    (offsets, sizes, file, key)."""
    tensors: dict[str, Any] = {}
    for fqn, info in metadata.state_dict_metadata.items():
        if not isinstance(info, TensorStorageMetadata):
            raise UnsupportedValueError(f"{fqn}: only tensors are saved through DCP")
        chunks = []
        for chunk in info.chunks:
            stored = metadata.storage_data[MetadataIndex(fqn, chunk.offsets)]
            chunks.append(
                {"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), "file": stored.file, "key": stored.key}
            )
        tensors[fqn] = {"dtype": dtype_name(info.properties.dtype), "shape": list(info.size), "chunks": chunks}
    return tensors


_Chunks = dict[MetadataIndex, tuple[str, str]]
_Sizes = dict[tuple[str, str], tuple[torch.dtype, tuple[int, ...]]]


def _metadata(reader: CheckpointReader) -> tuple[Metadata, _Chunks, _Sizes]:
    """The manifest's ``sharded`` section as DCP metadata, validated like the rest of the manifest."""
    section = reader.manifest.sharded
    tensors = section.get("tensors") if isinstance(section, dict) else None
    if not isinstance(tensors, dict):
        raise CorruptCheckpointError(f"{reader.where}: the sharded section has no tensor list")
    entries: dict[str, Any] = {}
    where_of: _Chunks = {}
    sizes_of: _Sizes = {}
    for fqn, info in tensors.items():
        where = f"{reader.where}: key {fqn!r}"
        if not isinstance(info, dict) or not valid_shape(info.get("shape")) or not isinstance(info.get("chunks"), list):
            raise CorruptCheckpointError(f"{where}: malformed sharded tensor entry")
        dtype = dtype_from_name(info.get("dtype"), where=where)
        shape = torch.Size(info["shape"])
        chunks = []
        for chunk in info["chunks"]:
            if not isinstance(chunk, dict):
                raise CorruptCheckpointError(f"{where}: malformed chunk {chunk!r:.60}")
            offsets, sizes = chunk.get("offsets"), chunk.get("sizes")
            if not (valid_shape(offsets) and valid_shape(sizes) and len(offsets) == len(sizes) == len(shape)) or any(
                o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)
            ):
                raise CorruptCheckpointError(f"{where}: chunk {chunk!r:.80} does not fit the shape {list(shape)}")
            file, key = chunk.get("file"), chunk.get("key")
            entry = reader.file(file, where=f"key {fqn!r}")  # type: ignore[arg-type]
            if math.prod(sizes) * dtype.itemsize > entry.size:
                raise CorruptCheckpointError(f"{where}: chunk {key!r:.60} is larger than its file {file!r}")
            if not isinstance(key, str):
                raise CorruptCheckpointError(f"{where}: invalid chunk key {key!r}")
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
            where_of[MetadataIndex(fqn, torch.Size(offsets))] = (file, key)  # type: ignore[assignment]
            sizes_of[(file, key)] = (dtype, tuple(sizes))  # type: ignore[index]
        covered = sum(math.prod(c.sizes) for c in chunks)
        if covered != math.prod(shape):  # chunks tile the tensor: allocation is bounded by the files' bytes
            raise CorruptCheckpointError(
                f"{where}: its chunks hold {covered} elements, its shape {list(shape)} needs {math.prod(shape)}"
            )
        entries[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype), shape, chunks)
    return Metadata(state_dict_metadata=entries, storage_data=where_of), where_of, sizes_of


def chunk_problems(reader: CheckpointReader, headers: dict[str, dict[str, Any]]) -> list[str]:
    """What `trainstate verify` reports for a sharded checkpoint beyond file hashes: each chunk whose
    file, header entry, dtype or shape disagrees with the manifest (``headers``: verified files)."""
    try:
        _, _, sizes_of = _metadata(reader)
    except CorruptCheckpointError as exc:
        return [str(exc)]
    problems = []
    for (file, key), (dtype, sizes) in sizes_of.items():
        if file not in headers:
            continue  # the file itself failed verification, reported already
        stored = headers[file].get(key)
        where = f"{reader.where}/{file}"
        if stored is None:
            problems.append(f"{where}: chunk {key!r} is missing from the file")
        elif (stored.st_dtype, stored.shape) != stored_as(dtype, sizes):
            problems.append(
                f"{where}: chunk {key!r}: stored as {stored.st_dtype}{list(stored.shape)}, "
                f"manifest says {dtype_name(dtype)}{list(sizes)}"
            )
    return problems


class ShardReader(StorageReader):
    """Reads the chunks DCP's load plan asks for: staged into fresh tensors through trainstate's
    reader (headers validated, every file hashed while read), and copied into the destinations only
    once every rank's reads verified, so a damaged checkpoint never leaves a live object
    half-restored on any rank."""

    def __init__(self, reader: CheckpointReader, *, verify: bool = True, group: Any = None) -> None:
        self._reader = reader
        self._verify = verify
        self._group = group
        self._metadata, self._where_of, self._sizes_of = _metadata(reader)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = True) -> ShardReader:
        """A reader for ``dcp.load(state_dict, storage_reader=ShardReader.open(path))``: a sharded
        trainstate checkpoint read by DCP itself (keys as DCP flattens ``{"model": ..., "optimizer":
        ...}``: ``model.0.weight``; tensors only, so pass ``DefaultLoadPlanner(allow_partial_load=True)``
        when the state dict also holds plain values such as ``param_groups``)."""
        from trainstate.storage import split_path

        reader = CheckpointReader(*split_path(path))
        if reader.manifest.sharded is None:
            raise UnsupportedFormatError(f"{reader.where}: not a distributed (format 3) checkpoint")
        return cls(reader, verify=verify)

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        staged: dict[tuple[str, str], torch.Tensor] = {}
        error: BaseException | None = None
        try:
            staged = self._stage({self._where_of[item.storage_index] for item in plan.items})
        except Exception as exc:  # reported to every rank below, then raised here
            error = exc
        self._agree(error)
        for item in plan.items:
            chunk = staged[self._where_of[item.storage_index]]
            for dim, (offset, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                chunk = chunk.narrow(dim, offset, length)
            target = planner.resolve_tensor(item).detach()
            target.copy_(chunk)
            planner.commit_tensor(item, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _stage(self, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], torch.Tensor]:
        plan = ReadPlan()
        out = {}
        headers: dict[str, dict[str, Any]] = {}  # each file's header parsed once
        for file, key in sorted(wanted):
            if file not in headers:
                entry = self._reader.file(file, where=f"chunk {key!r}")
                with self._reader.opened(entry) as f:
                    _, headers[file] = read_header(f, entry.size, where=f"{self._reader.where}/{file}")
            stored = headers[file].get(key)
            if stored is None:
                raise CorruptCheckpointError(f"{self._reader.where}/{file}: chunk {key!r} is missing from the file")
            dtype, sizes = self._sizes_of[(file, key)]
            if (stored.st_dtype, stored.shape) != stored_as(dtype, sizes):
                raise CorruptCheckpointError(
                    f"{self._reader.where}/{file}: chunk {key!r} is stored as {stored.st_dtype}{list(stored.shape)}, "
                    f"the manifest says {dtype}{list(sizes)}"
                )
            target = torch.empty(sizes, dtype=dtype)
            plan.add(ByteRange(file, key, stored.start, stored.end, target, in_place=False))
            out[(file, key)] = target
        execute_load(plan, self._reader, verify=self._verify)
        return out

    def _agree(self, error: BaseException | None) -> None:
        """Every rank learns whether every rank's reads verified; only then does any byte land."""
        if not (dist.is_available() and dist.is_initialized()):
            if error is not None:
                raise error
            return
        outcomes: list[Any] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}", self._group)
        if error is not None:
            raise error
        failed = {rank: text for rank, text in enumerate(outcomes) if text is not None}
        if failed:
            detail = "; ".join(f"rank {rank}: {text}" for rank, text in failed.items())
            raise CorruptCheckpointError(f"{self._reader.where}: reading failed on rank(s) {sorted(failed)}: {detail}")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False
