"""Distributed checkpoints: every rank saves and loads its share through DCP, one atomic commit.

Under an initialized process group of more than one rank, `trainstate.save` comes here. What is
global and what is per rank follows from the state itself:

* modules and optimizers are global: their state dicts are taken with
  ``torch.distributed.checkpoint.state_dict`` (DTensor shards under FSDP2, plain tensors under
  DDP), DCP plans them (replicated tensors are written once, shards by their owners) and they
  reshard on load, to any world size;
* everything else (RNG streams, data-loader positions, user values) is per rank: its tensors are
  saved under a rank-qualified key, and top-level entries whose saved value differs between ranks
  are kept for every rank. With the same world size each rank gets its own back; with another one
  they cannot be resharded, and restoring them is refused (``strict``) or skipped with a warning.

Values that are not tensors go to the manifest's JSON tree, as in a single-process checkpoint.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, Metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainstate._version import __version__
from trainstate.distributed import active_world
from trainstate.distributed.dcp_io import ShardReader, ShardWriter, rank_errors, sharded_section
from trainstate.errors import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsupportedValueError,
)
from trainstate.format.codec import TAG, Encoder, StateSnapshot, qualified_type
from trainstate.format.header import valid_shape
from trainstate.format.manifest import FORMAT_VERSION, MAX_MANIFEST_BYTES, FileEntry, Manifest
from trainstate.format.reader import CheckpointReader
from trainstate.format.tensorfile import dtype_from_name, dtype_name
from trainstate.format.torch_codecs import unwrap_module
from trainstate.format.tree import Path, any_node, format_path, rebuild
from trainstate.format.writer import environment
from trainstate.storage.base import Storage

__all__ = [
    "ShardedLoader",
    "ShardedPlan",
    "SharedLive",
    "plan_sharded",
    "refuse_lost",
    "save_sharded",
    "view_for_rank",
    "write_sharded",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ saving
def _module_of(optimizer: torch.optim.Optimizer, modules: list[torch.nn.Module], where: str) -> torch.nn.Module:
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules:
        if params <= {id(p) for p in module.parameters()}:
            return module
    raise UnsupportedValueError(
        f"{where}: the optimizer's parameters are not those of any module in the state; save the model beside it "
        "(a distributed optimizer state is keyed by parameter names, which come from its module)"
    )


def _modules_in(state: Mapping[str, Any]) -> list[torch.nn.Module]:
    found: list[torch.nn.Module] = []
    rebuild(dict(state), lambda v, p: found.append(unwrap_module(v)) if isinstance(v, torch.nn.Module) else None)
    return found


def _global_states(state: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[Path]]:
    """``state`` with modules and optimizers replaced by their distributed state dicts, and their paths."""
    modules = _modules_in(state)
    paths: list[Path] = []

    def leaf(value: Any, path: Path) -> Any:
        if isinstance(value, torch.nn.Module):
            module = unwrap_module(value)
            paths.append(path)
            return StateSnapshot(_module_type(module), get_model_state_dict(module))
        if isinstance(value, torch.optim.Optimizer):
            paths.append(path)
            module = _module_of(value, modules, f"{where}: key {format_path(path)!r}")
            return StateSnapshot(qualified_type(value), get_optimizer_state_dict(module, value))
        return value

    return rebuild(dict(state), leaf), paths


def _module_type(module: torch.nn.Module) -> str:
    """The recorded type of a module; FSDP2's ``fully_shard`` swaps in a subclass (``FSDPLinear``)
    whose name says nothing about the model: record the class it was made from."""
    kind = type(module)
    if kind.__name__.startswith("FSDP") and len(kind.__bases__) == 2:
        original = kind.__bases__[1]
        return f"{original.__module__}.{original.__qualname__}"
    return qualified_type(module)


def _rank_key(rank: int, key: str) -> str:
    return f"rank{rank}/{key}"


class _ShardSink:
    """Tensor sink for a distributed save: each tensor becomes a DCP state-dict entry."""

    def __init__(self, rank: int, global_paths: list[Path]) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._rank = rank
        self._global = global_paths

    def add(self, path: Path, tensor: torch.Tensor) -> dict[str, Any]:
        is_global = any(path[: len(g)] == g for g in self._global)
        base = format_path(path)
        key = base
        dcp_key = key if is_global else _rank_key(self._rank, key)
        suffix = 0
        while dcp_key in self.tensors:  # distinct paths that format alike (keys 1 and "1")
            suffix += 1
            key = f"{base}#{suffix}"
            dcp_key = key if is_global else _rank_key(self._rank, key)
        self.tensors[dcp_key] = tensor.detach()
        ref: dict[str, Any] = {
            TAG: "tensor",
            "shard": key,
            "dtype": dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
        }
        if not is_global:
            ref["per_rank"] = True
        return ref


@dataclass
class ShardedPlan:
    """A distributed save planned on this rank: the tensors DCP writes (``sink``), the JSON tree and
    encoded metadata of the manifest, agreed on by every rank (see `plan_sharded`)."""

    where: str
    sink: _ShardSink
    tree: str
    metadata: Any


def plan_sharded(
    state: Mapping[str, Any],
    where: str,
    *,
    metadata: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    stage: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    group: dist.ProcessGroup | None = None,
) -> ShardedPlan:
    """Step one of a distributed save, collective over ``group``: take the modules' and optimizers'
    distributed state dicts, ``stage`` them (an async save copies them into host buffers here) and
    encode the tree. A state that fails on any rank fails on every rank, before any file is written."""
    world = active_world()
    assert world is not None
    rank, world_size = world
    plan: ShardedPlan | None = None
    error: Exception | None = None
    try:
        captured, global_paths = _global_states(state, where)
        staged = stage(captured) if stage is not None else captured
        sink = _ShardSink(rank, global_paths)
        tree = Encoder(sink, allow_pickle=allow_pickle, where=f"{where}: ").encode(staged)
        meta = Encoder(None, where=f"{where}: metadata ").encode(dict(metadata or {}))
        plan = ShardedPlan(where, sink, json.dumps(tree, separators=(",", ":"), allow_nan=False), meta)
    except Exception as exc:  # reported to every rank, then raised
        error = exc
    statuses: list[Any] = [None] * world_size
    dist.all_gather_object(statuses, None if error is None else f"{type(error).__name__}: {error}", group=group)
    failed = {r: text for r, text in enumerate(statuses) if text is not None}
    if error is not None:
        raise error
    if failed:
        raise UnsupportedValueError(f"{where}: rank(s) {sorted(failed)} could not save their state: {failed}")
    assert plan is not None
    return plan


def save_sharded(
    storage: Storage,
    name: str,
    state: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    allow_pickle: bool = False,
) -> None:
    """The collective `trainstate.save`: every rank calls it with its own state. Nothing is
    published unless every rank's part was written; any rank's failure is raised on all ranks."""
    plan = plan_sharded(state, storage.where(name), metadata=metadata, allow_pickle=allow_pickle)
    write_sharded(storage, name, plan, overwrite=overwrite)


def write_sharded(
    storage: Storage,
    name: str,
    plan: ShardedPlan,
    *,
    overwrite: bool = True,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Steps two and three of a distributed save, collective over ``group``: one transaction that the
    coordinator begins and every other rank joins, DCP writes every rank's share, the coordinator
    commits. Safe in a background thread when ``group`` is a gloo group of its own (an async save)."""
    world = active_world()
    assert world is not None
    rank, world_size = world
    where = plan.where
    # Every rank's tree goes to the coordinator only (it writes the manifest; a large optimizer's
    # tree times the world size must not sit on every rank).
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(plan.tree, gathered, dst=0, group=group)
    trees = [json.loads(text) for text in gathered] if gathered is not None else []
    pending = None
    begun: list[Any] = [None]
    if rank == 0:
        try:
            pending = storage.begin(name, overwrite=overwrite)
            begun = [pending.transaction_id]
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it
            begun = [f"error: {type(exc).__name__}: {exc}"]
            error: Exception | None = exc
        else:
            error = None
    dist.broadcast_object_list(begun, src=0, group=group)
    if begun[0].startswith("error: "):
        if rank == 0 and error is not None:
            raise error
        raise CheckpointWriteError(f"{where}: the coordinator could not start the save ({begun[0][7:]})")
    if pending is None:
        pending = storage.join(name, begun[0])

    def finish(dcp_metadata: Metadata, files: list[FileEntry]) -> None:  # on the coordinator
        manifest = Manifest(
            tree=trees[0],
            files=tuple(files),
            metadata=plan.metadata,
            environment=environment(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            trainstate_version=__version__,
            torch_version=torch.__version__,
            format_version=FORMAT_VERSION,
            sharded={"world_size": world_size, "tensors": sharded_section(dcp_metadata), "per_rank": _per_rank(trees)},
        )
        data = manifest.to_json()
        if len(data) > MAX_MANIFEST_BYTES:  # loading would refuse it: fail the save on every rank instead
            raise UnsupportedValueError(
                f"{where}: the manifest would be {len(data) / 2**20:.1f} MiB, over the {MAX_MANIFEST_BYTES // 2**20} "
                "MiB that loading accepts; store bulk values as tensors, not as Python lists, ints or bytes"
            )
        pending.commit(data)

    # DCP plans and writes; the coordinator's finish commits; failures reach every rank.
    try:
        dcp.save(
            plan.sink.tensors,
            storage_writer=ShardWriter(pending, rank, finish),
            planner=DefaultSavePlanner(),
            process_group=group,
        )
    except CheckpointException as exc:
        pending.abort()
        errors = rank_errors(exc.failures)
        ranks = sorted(errors)
        first = errors[ranks[0]]
        if isinstance(first, CheckpointError) and len(ranks) == 1 and ranks[0] == rank:
            raise first from None  # this rank's own error, as it is
        raise CheckpointWriteError(
            f"{where}: the save failed on rank(s) {ranks}, nothing was committed: {first}"
        ) from None
    except (RuntimeError, dist.DistError) as exc:  # a collective failed: a peer died or stopped responding
        pending.abort()
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointWriteError(
            f"{where}: the save was aborted on rank {rank}, nothing was committed: another rank failed or stopped "
            f"responding ({detail})"
        ) from exc
    except BaseException:
        pending.abort()
        raise


def _per_rank(trees: list[Any]) -> dict[str, list[Any]]:
    """Top-level entries whose saved value differs between ranks, with every rank's value."""
    top: list[dict[str, Any]] = [
        tree["v"] if isinstance(tree, dict) and isinstance(tree.get("v"), dict) else {} for tree in trees
    ]
    keys: set[str] = set().union(*top)
    return {k: [t.get(k) for t in top] for k in sorted(keys) if any(t.get(k) != top[0].get(k) for t in top)}


# ----------------------------------------------------------------------------------------- loading
def view_for_rank(reader: CheckpointReader) -> tuple[Any, int, list[str]]:
    """The tree this process restores from, the saved rank whose per-rank tensors it reads, and the
    per-rank entries it cannot have (the world size changed: they hold rank 0's values)."""
    sharded = reader.manifest.sharded
    saved_world = sharded.get("world_size")
    per_rank = sharded.get("per_rank") or {}
    if type(saved_world) is not int or saved_world < 1 or not isinstance(per_rank, dict):
        raise CorruptCheckpointError(f"{reader.where}: malformed sharded section")
    world = active_world()
    rank, world_size = world if world is not None else (0, 1)
    tree = reader.manifest.tree
    if world_size != saved_world:
        lost = sorted(set(per_rank) | _per_rank_entries(tree))
        return tree, 0, lost
    if not isinstance(tree, dict) or not isinstance(tree.get("v"), dict):
        raise CorruptCheckpointError(f"{reader.where}: the saved state is not a mapping")
    values = dict(tree["v"])
    for key, nodes in per_rank.items():
        if not isinstance(nodes, list) or len(nodes) != saved_world:
            raise CorruptCheckpointError(
                f"{reader.where}: key {key!r}: per-rank values for {saved_world} ranks expected"
            )
        values[key] = nodes[rank]
    return {**tree, "v": values}, rank, []


def _per_rank_entries(tree: Any) -> set[str]:
    """Top-level entries holding per-rank tensors."""
    values = tree.get("v") if isinstance(tree, dict) else None
    return {k for k, v in values.items() if _holds_per_rank(v)} if isinstance(values, dict) else set()


def _holds_per_rank(node: Any) -> bool:
    return any_node(node, lambda item: item.get(TAG) == "tensor" and item.get("per_rank") is True)


class ShardedLoader:
    """Tensor source for a sharded checkpoint: each reference becomes a DCP state-dict entry (the
    live DTensor or tensor it restores into, else a fresh full tensor); `fill` runs one DCP load."""

    def __init__(
        self,
        reader: CheckpointReader,
        *,
        saved_rank: int,
        verify: bool = True,
        map_location: Any = None,
        destinations: Any = None,
    ) -> None:
        self._reader = reader
        self._saved_rank = saved_rank
        self._meta = map_location == "meta" or (isinstance(map_location, torch.device) and map_location.type == "meta")
        self._destinations = destinations
        # Validated before anything is allocated: every tensor's chunks tile it and fit in their files.
        self._shards = ShardReader(reader, verify=verify)
        self._saved = self._shards.read_metadata().state_dict_metadata
        self.state_dict: dict[str, torch.Tensor] = {}
        self._used: set[int] = set()

    def get(self, ref: dict[str, Any], path: Path) -> torch.Tensor:
        where = f"{self._reader.where}: key {format_path(path)!r}"
        key = ref.get("shard")
        if not isinstance(key, str):
            raise CorruptCheckpointError(f"{where}: a tensor of a sharded checkpoint must name its shard entry")
        dcp_key = _rank_key(self._saved_rank, key) if ref.get("per_rank") else key
        saved = self._saved.get(dcp_key)
        dtype = dtype_from_name(ref.get("dtype"), where=where)
        shape = ref.get("shape")
        if not (
            isinstance(saved, TensorStorageMetadata)
            and valid_shape(shape)
            and list(saved.size) == shape
            and saved.properties.dtype == dtype
        ):
            raise CorruptCheckpointError(f"{where}: no saved tensor {dcp_key!r:.80} of {dtype}{shape!r:.40}")
        if self._meta:
            tensor = torch.empty(shape, dtype=dtype, device="meta")
        elif dcp_key in self.state_dict:
            tensor = self.state_dict[dcp_key]
        else:
            dest = self._destinations(path) if self._destinations else None
            fits = isinstance(dest, torch.Tensor) and dest.dtype == dtype and list(dest.shape) == shape
            if fits and id(dest) not in self._used:
                self._used.add(id(dest))
                tensor = dest.detach()  # type: ignore[union-attr]
            else:
                tensor = torch.empty(shape, dtype=dtype)
            self.state_dict[dcp_key] = tensor
        if ref.get("param"):
            return torch.nn.Parameter(tensor, requires_grad=bool(ref.get("requires_grad", True)))
        return tensor.requires_grad_(True) if ref.get("requires_grad") and not tensor.requires_grad else tensor

    def fill(self) -> None:
        if self._meta:
            return
        reader = self._shards
        planner = DefaultLoadPlanner(allow_partial_load=True)
        try:
            with warnings.catch_warnings():  # a single process reading a sharded checkpoint is intended
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(self.state_dict, storage_reader=reader, planner=planner, no_dist=active_world() is None)
        except CheckpointException as exc:
            errors = rank_errors(exc.failures)
            first = errors[min(errors)]
            if isinstance(first, CheckpointError):
                raise first from None
            raise CorruptCheckpointError(
                f"{self._reader.where}: loading failed on rank(s) {sorted(errors)}: {type(first).__name__}: {first}"
            ) from None


class SharedLive:
    """How live objects give and take state for a sharded checkpoint: modules and optimizers through
    ``torch.distributed.checkpoint.state_dict`` (keyed by parameter names, DTensor shards under
    FSDP2), everything else through its own state_dict / load_state_dict."""

    def __init__(self, state: Mapping[str, Any], *, strict: bool) -> None:
        self._modules = _modules_in(state)
        self._strict = strict

    def state_of(self, target: Any) -> Any:
        if isinstance(target, torch.nn.Module):
            return get_model_state_dict(target)
        if isinstance(target, torch.optim.Optimizer):
            return get_optimizer_state_dict(_module_of(target, self._modules, "restore"), target)
        return target.state_dict()

    def load_into(self, target: Any, decoded: Any) -> bool:
        """Restore a module or optimizer; False for anything else (restored the usual way)."""
        if isinstance(target, torch.nn.Module):
            set_model_state_dict(target, decoded, options=StateDictOptions(strict=self._strict))
            return True
        if isinstance(target, torch.optim.Optimizer):
            set_optimizer_state_dict(_module_of(target, self._modules, "restore"), target, decoded)
            return True
        return False


def refuse_lost(
    lost: list[str], state: Mapping[str, Any] | None, reader: CheckpointReader, *, strict: bool
) -> set[str]:
    """Per-rank entries the live ``state`` names but cannot get (world size changed): raised under
    ``strict``, else skipped with a warning naming them; returns the keys to skip."""
    if state is None:
        return set()
    named = [k for k in lost if k in state]
    if not named:
        return set()
    saved = reader.manifest.sharded.get("world_size")
    world = active_world()
    now = world[1] if world else 1
    message = (
        f"{reader.where}: per-rank state {named} was saved by {saved} ranks and cannot be resharded to {now}; "
        "each rank's RNG streams and data position belong to that rank"
    )
    if strict:
        raise StateMismatchError(message + " (strict=False skips it, leaving those objects as they are)")
    logger.warning("%s; not restored (strict=False)", message)
    return set(named)
