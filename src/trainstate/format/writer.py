"""Writing a checkpoint: encode the state, lay tensors into shards, write them in parallel, manifest last."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from trainstate._version import __version__
from trainstate.errors import CheckpointError, CheckpointWriteError, UnsupportedValueError
from trainstate.format import tree
from trainstate.format.codec import TAG, Encoder, Path, format_path, is_plain_str
from trainstate.format.hashing import new_hasher
from trainstate.format.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest
from trainstate.format.tensorfile import MAX_HEADER_BYTES, alias_key, dtype_name, encode_file
from trainstate.storage.base import PendingCheckpoint

__all__ = ["DEFAULT_SHARD_BYTES", "SavePlan", "environment", "execute_save", "plan_save"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 512 * 1024 * 1024
_MAX_WRITERS = 4
_MIN_ENTRY_SPLIT = 1 << 20
_MAX_FILE_HEADER = MAX_HEADER_BYTES // 4  # a generous margin under the reader's cap
_FILE_PATTERN = "tensors-{:05d}.safetensors"


def environment() -> dict[str, Any]:
    """Facts about the saving process that a resume may want to compare against."""
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    return {
        "world_size": dist.get_world_size() if initialized else 1,
        "rank": dist.get_rank() if initialized else 0,
        "cuda_device_count": torch.cuda.device_count(),
        "hostname": platform.node(),
        "python": platform.python_version(),
    }


_RESERVED_KEYS = frozenset({"__metadata__"})  # the safetensors header's own entry


def _file_key(path: Path) -> str:
    """The safetensors key of a tensor: its path, made valid UTF-8 (keys with lone surrogates)."""
    key = format_path(path)
    return key if is_plain_str(key) else key.encode("utf-8", "backslashreplace").decode()


class _ShardPlanner:
    """Tensor sink: assigns each distinct tensor a unique key and a shard; aliases are stored once.

    A reference names its key only where it differs from the tensor's path (collisions, aliases):
    the path is already in the tree, and repeating it doubled the manifest of a large model.
    """

    def __init__(self, shard_bytes: int) -> None:
        self.shards: list[list[tuple[str, torch.Tensor]]] = []
        self._shard_bytes = shard_bytes
        self._fill = 0
        self._header = 0
        self._keys: set[str] = set()
        self._aliases: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._entry: Any = None

    def add(self, path: Path, tensor: torch.Tensor) -> dict[str, Any]:
        alias = alias_key(tensor)
        if alias in self._aliases:
            return self._ref(self._aliases[alias], path)
        key = _file_key(path)
        if key in self._keys or key in _RESERVED_KEYS:
            key = next(f"{key}#{i}" for i in range(1, len(self._keys) + 2) if f"{key}#{i}" not in self._keys)
        self._keys.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        # A new top-level entry (model, optimizer...) starts a new file once the current one holds
        # something substantial: a load into a live model then only re-reads the model's files.
        new_entry = bool(path) and path[0] != self._entry and self._fill >= _MIN_ENTRY_SPLIT
        # Readers cap a safetensors header (as safetensors itself does): millions of tiny tensors
        # are spread over several files rather than written into one that could not be read.
        header = len(json.dumps(key)) + 80 + 21 * tensor.dim()
        full = self._fill + nbytes > self._shard_bytes or self._header + header > _MAX_FILE_HEADER
        if not self.shards or (self._fill > 0 and (full or new_entry)):
            self.shards.append([])
            self._fill = self._header = 0
        self._header += header
        self._entry = path[0] if path else None
        self.shards[-1].append((key, tensor))
        self._fill += nbytes
        ref = {
            TAG: "tensor",
            "file": _FILE_PATTERN.format(len(self.shards) - 1),
            "key": key,
            "dtype": dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
        }
        if tensor.device.type != "cpu":
            ref["device"] = str(tensor.device)
        # The tensor stays referenced (in `shards`) while the alias keys, which hold its address, are used.
        self._aliases[alias] = ref
        return self._ref(ref, path)

    @staticmethod
    def _ref(ref: dict[str, Any], path: Path) -> dict[str, Any]:
        if ref["key"] != format_path(path):
            return ref
        return {k: v for k, v in ref.items() if k != "key"}


@dataclass(frozen=True)
class SavePlan:
    """Everything a save will write, decided before any I/O: the encoded tree and metadata, and the
    tensors of each file (``(key, tensor)`` write items). Tensors are referenced, not copied."""

    tree: Any
    metadata: Any
    shards: list[list[tuple[str, torch.Tensor]]]
    where: str = ""


def plan_save(
    state: Any,
    *,
    metadata: Any = None,
    allow_pickle: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    where: str = "",
) -> SavePlan:
    """Encode ``state`` and lay its tensors out in files. Every check that can fail on the state
    (types, names, sizes, the manifest limit) fails here, in the caller's thread, before anything is
    queued or written."""
    planner = _ShardPlanner(shard_bytes)
    prefix = f"{where}: " if where else ""
    tree = Encoder(planner, allow_pickle=allow_pickle, where=prefix).encode(state)
    meta = Encoder(None, where=f"{prefix}metadata.").encode(metadata)
    # The files list (~150 bytes a file) is all that the final manifest adds to this.
    estimate = len(json.dumps([tree, meta], separators=(",", ":"), ensure_ascii=False)) + 150 * len(planner.shards)
    if estimate > MAX_MANIFEST_BYTES - 64 * 1024:
        raise UnsupportedValueError(_oversized(estimate, tree, prefix))
    return SavePlan(tree, meta, planner.shards, where)


def execute_save(
    plan: SavePlan, pending: PendingCheckpoint, *, environment_extra: dict[str, Any] | None = None
) -> Manifest:
    """Write ``plan`` through ``pending``, manifest last, committing only if every file succeeded.

    On any error the pending checkpoint is aborted and the error re-raised; nothing is published.
    """
    try:
        files = _write_shards(pending, plan.shards)
        manifest = Manifest(
            tree=plan.tree,
            files=tuple(files),
            metadata=plan.metadata,
            environment={**environment(), **(environment_extra or {})},
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            trainstate_version=__version__,
            torch_version=torch.__version__,
        )
        data = manifest.to_json()
        if len(data) > MAX_MANIFEST_BYTES:
            raise UnsupportedValueError(_oversized(len(data), manifest.tree, f"{plan.where}: "))
        pending.commit(data)
        return manifest
    except BaseException as exc:
        pending.abort()
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise CheckpointWriteError(f"{plan.where}: {exc}") from exc
        raise


def _oversized(size: int, tree: Any, prefix: str) -> str:
    """Why a manifest is too big, naming the entry that makes it so (loads refuse over the cap)."""
    path: Path = ()
    node: Any = tree
    while True:
        children = _children(node)
        sizes = sorted(((len(json.dumps(v, separators=(",", ":"))), k) for k, v in children), reverse=True)
        if not sizes:
            break
        child_size, key = sizes[0]
        if child_size < size / 4 or len(path) > 20:
            break
        path, node = (*path, key), dict(children)[key]
    where = format_path(path) if path else "the state"
    return (
        f"{prefix}the manifest would be {size / 2**20:.1f} MiB, over the {MAX_MANIFEST_BYTES // 2**20} MiB that "
        f"loading accepts; most of it is {where!r}: store bulk values as tensors or numpy arrays (they go to the "
        "tensor files), not as Python lists, ints or bytes"
    )


def _children(node: Any) -> list[tuple[Any, Any]]:
    """Children for the size report; keys stay as encoded (only their size matters here)."""
    try:
        return tree.children(node, lambda key, path: key if isinstance(key, (int, str)) else repr(key)) or []
    except CheckpointError:
        return []


def _write_shards(pending: PendingCheckpoint, shards: list[list[tuple[str, torch.Tensor]]]) -> list[FileEntry]:
    def write(index: int) -> FileEntry:
        hasher = new_hasher()
        _, chunks = encode_file(shards[index], hasher)
        name = _FILE_PATTERN.format(index)
        size = pending.write(name, chunks)
        return FileEntry(name, size, hasher.hexdigest())

    if len(shards) <= 1:
        return [write(i) for i in range(len(shards))]
    # Files are independent; os.write and hashing release the GIL, so threads overlap the I/O.
    with ThreadPoolExecutor(max_workers=min(_MAX_WRITERS, len(shards), os.cpu_count() or 1)) as pool:
        futures = [pool.submit(write, i) for i in range(len(shards))]
        return [f.result() for f in futures]
