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
from trainstate.errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError, UnsupportedValueError
from trainstate.format import tree
from trainstate.format.codec import TAG, Encoder, Path, format_path, is_plain_str
from trainstate.format.hashing import new_hasher
from trainstate.format.header import MAX_HEADER_BYTES
from trainstate.format.manifest import MAX_MANIFEST_BYTES, FileEntry, Manifest
from trainstate.format.tensorfile import alias_key, dtype_name, encode_file
from trainstate.storage.base import PendingCheckpoint

__all__ = ["DEFAULT_SHARD_BYTES", "Reuse", "SavePlan", "environment", "execute_save", "frozen_paths", "plan_save"]

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

    def __init__(self, shard_bytes: int, frozen: frozenset[Path] = frozenset()) -> None:
        self.shards: list[list[tuple[str, torch.Tensor]]] = []
        self._shard_bytes = shard_bytes
        self._frozen = frozen
        # The file being filled per group: frozen parameters get files of their own, so that an
        # incremental save finds them unchanged (and links them) while everything else moves.
        self._open: dict[bool, list[Any]] = {}  # frozen? -> [shard index, fill, header bytes, entry]
        self._keys: set[str] = set()
        self._aliases: dict[tuple[Any, ...], dict[str, Any]] = {}

    def add(self, path: Path, tensor: torch.Tensor) -> dict[str, Any]:
        alias = alias_key(tensor)
        if alias in self._aliases:
            return self._ref(self._aliases[alias], path)
        key = _file_key(path)
        if key in self._keys or key in _RESERVED_KEYS:
            key = next(f"{key}#{i}" for i in range(1, len(self._keys) + 2) if f"{key}#{i}" not in self._keys)
        self._keys.add(key)
        nbytes = tensor.numel() * tensor.element_size()
        group = path in self._frozen
        current = self._open.get(group)
        entry = path[0] if path else None
        # A new top-level entry (model, optimizer...) starts a new file once the current one holds
        # something substantial: a load into a live model then only re-reads the model's files.
        # Readers cap a safetensors header (as safetensors itself does): millions of tiny tensors
        # are spread over several files rather than written into one that could not be read.
        header = len(json.dumps(key)) + 80 + 21 * tensor.dim()
        if current is not None:
            _, fill, head, last = current
            new_entry = bool(path) and entry != last and fill >= _MIN_ENTRY_SPLIT
            full = fill + nbytes > self._shard_bytes or head + header > _MAX_FILE_HEADER
            if fill > 0 and (full or new_entry):
                current = None
        if current is None:
            self.shards.append([])
            current = self._open[group] = [len(self.shards) - 1, 0, 0, entry]
        current[1] += nbytes
        current[2] += header
        current[3] = entry
        self.shards[current[0]].append((key, tensor))
        ref = {
            TAG: "tensor",
            "file": _FILE_PATTERN.format(current[0]),
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


def frozen_paths(state: Any) -> frozenset[Path]:
    """The paths (in ``state``) of parameters that do not train (``requires_grad=False``) of every
    module in it: what `plan_save` puts into files of their own."""
    from trainstate.format.codec import is_stateful
    from trainstate.format.torch_codecs import unwrap_module

    found: set[Path] = set()

    def walk(value: Any, path: Path) -> None:
        if isinstance(value, torch.nn.Module):
            module = unwrap_module(value)
            found.update((*path, name) for name, p in module.named_parameters() if not p.requires_grad)
        elif isinstance(value, dict) and not is_stateful(value):
            for key, child in value.items():
                walk(child, (*path, key))

    walk(state, ())
    return frozenset(found)


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
    frozen: frozenset[Path] = frozenset(),
) -> SavePlan:
    """Encode ``state`` and lay its tensors out in files. Every check that can fail on the state
    (types, names, sizes, the manifest limit) fails here, in the caller's thread, before anything is
    queued or written. Tensors at the ``frozen`` paths (parameters that do not train) go to files of
    their own."""
    planner = _ShardPlanner(shard_bytes, frozen)
    prefix = f"{where}: " if where else ""
    tree = Encoder(planner, allow_pickle=allow_pickle, where=prefix).encode(state)
    meta = Encoder(None, where=f"{prefix}metadata.").encode(metadata)
    # The files list (~150 bytes a file) is all that the final manifest adds to this.
    estimate = len(json.dumps([tree, meta], separators=(",", ":"), ensure_ascii=False)) + 150 * len(planner.shards)
    if estimate > MAX_MANIFEST_BYTES - 64 * 1024:
        raise UnsupportedValueError(_oversized(estimate, tree, prefix))
    return SavePlan(tree, meta, planner.shards, where)


@dataclass(frozen=True)
class Reuse:
    """A committed checkpoint whose files an incremental save may link instead of rewriting:
    ``source`` (its name in the same storage) and its files by name."""

    source: str
    files: dict[str, FileEntry]


def execute_save(
    plan: SavePlan,
    pending: PendingCheckpoint,
    *,
    environment_extra: dict[str, Any] | None = None,
    reuse: Reuse | None = None,
) -> Manifest:
    """Write ``plan`` through ``pending``, manifest last, committing only if every file succeeded.

    With ``reuse``, a file whose bytes equal (by size and content hash) the same-named file of that
    checkpoint is linked (`PendingCheckpoint.link`) rather than written: its bytes are hashed in
    memory first (a pass at memory speed, which is also the hash the manifest needs), then either
    linked or written. On any error the pending checkpoint is aborted and the error re-raised;
    nothing is published.
    """
    try:
        files = _write_shards(pending, plan.shards, reuse)
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


class _NoHash:
    def update(self, data: Any) -> None:
        return None


def _write_shards(
    pending: PendingCheckpoint, shards: list[list[tuple[str, torch.Tensor]]], reuse: Reuse | None = None
) -> list[FileEntry]:
    def write(index: int) -> FileEntry:
        name = _FILE_PATTERN.format(index)
        previous = reuse.files.get(name) if reuse is not None else None
        hasher = new_hasher()
        if previous is not None:  # hash first: unchanged files are linked, the rest written unhashed
            _, chunks = encode_file(shards[index], hasher)
            size = sum(len(chunk) for chunk in chunks)  # the generator hashes what it yields
            digest = hasher.hexdigest()
            if (size, digest) == (previous.size, previous.hash):
                assert reuse is not None
                try:
                    return FileEntry(name, pending.link(name, reuse.source), digest)
                except CheckpointNotFoundError:  # the source went meanwhile: write it after all
                    pass
            _, chunks = encode_file(shards[index], _NoHash())  # type: ignore[arg-type]
            return FileEntry(name, pending.write(name, chunks), digest)
        _, chunks = encode_file(shards[index], hasher)
        size = pending.write(name, chunks)
        return FileEntry(name, size, hasher.hexdigest())

    if len(shards) <= 1:
        return [write(i) for i in range(len(shards))]
    # Files are independent; os.write and hashing release the GIL, so threads overlap the I/O.
    with ThreadPoolExecutor(max_workers=min(_MAX_WRITERS, len(shards), os.cpu_count() or 1)) as pool:
        futures = [pool.submit(write, i) for i in range(len(shards))]
        return [f.result() for f in futures]
