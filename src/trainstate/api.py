"""``save`` and ``load``: one-shot checkpoints of nested state with live objects restored in place."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainstate.distributed import active_world
from trainstate.errors import CorruptCheckpointError, StateMismatchError, UnsupportedValueError
from trainstate.format.codec import is_stateful
from trainstate.format.loader import MapLocation, TensorLoader
from trainstate.format.reader import CheckpointReader
from trainstate.format.torch_codecs import unwrap_module
from trainstate.format.tree import Path, children, format_path, holds_tensors, matching_leaves, tag, unwrap
from trainstate.format.writer import DEFAULT_SHARD_BYTES, SavePlan, execute_save, frozen_paths, plan_save
from trainstate.loaders import adapt_for_save, is_stateful_loader, restore_loader
from trainstate.storage import StorageOptions, split_path

__all__ = ["Peek", "load", "peek", "plan_state", "restore", "save", "tensor_source"]

logger = logging.getLogger(__name__)


def save(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    allow_pickle: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    storage_options: StorageOptions | None = None,
) -> None:
    """Save ``state`` as a checkpoint directory at ``path``, atomically.

    Live objects (anything with ``state_dict()``/``load_state_dict()``) are saved through their
    state dict; tensors go to safetensors files, everything else to ``manifest.json``. Either the
    whole checkpoint is committed or nothing changes on disk; an existing checkpoint at ``path``
    is replaced in one atomic step.

    Args:
        path: Directory to create (its parent is created if needed).
        state: Mapping of names to live objects, tensors and plain values.
        metadata: JSON-like values stored in the manifest (readable without loading tensors).
        overwrite: Replace an existing checkpoint at ``path``; if False, raise CheckpointExistsError.
        allow_pickle: Pickle values of unsupported types instead of raising (loading then needs it too).
        shard_bytes: Target size of each tensor file; files are written in parallel.
        storage_options: For a URL ``path`` (``s3://bucket/run/ckpt``): options of its fsspec
            filesystem (credentials, ``endpoint_url``, ...).

    Example:
        >>> import torch, trainstate
        >>> model = torch.nn.Linear(2, 2)
        >>> trainstate.save("/tmp/ts-doc/ckpt", {"model": model, "epoch": 3})
        >>> trainstate.load("/tmp/ts-doc/ckpt", {"model": model})["epoch"]
        3
    """
    storage, name = split_path(path, storage_options)
    world = active_world()
    # No directory lock: the commit is atomic by itself, so this works beside a CheckpointManager
    # saving into the same directory (``save(run_dir / "best", ...)``).
    if world is None or world[0] == 0:
        storage.cleanup()
    if world is not None:  # collective: every rank saves its share, the coordinator commits
        from trainstate.distributed.sharded import save_sharded

        save_sharded(
            storage, name, adapt_for_save(state), metadata=metadata, overwrite=overwrite, allow_pickle=allow_pickle
        )
        return
    plan = plan_state(
        state, metadata=metadata, allow_pickle=allow_pickle, shard_bytes=shard_bytes, where=storage.where(name)
    )
    execute_save(plan, storage.begin(name, overwrite=overwrite))


def plan_state(
    state: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    where: str = "",
    frozen: frozenset[Path] | None = None,
) -> SavePlan:
    """The plan of saving ``state`` (live objects through their state dicts, loaders adapted): all
    the checks that can fail on the state, done in the caller's thread before any I/O. Frozen
    parameters get files of their own (``frozen``: their paths, when ``state`` is a staged copy
    that no longer holds the modules)."""
    if not isinstance(state, Mapping):
        raise UnsupportedValueError(f"{where}: state must be a mapping of names to values, got {type(state).__name__}")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise UnsupportedValueError(f"{where}: metadata must be a mapping, got {type(metadata).__name__}")
    return plan_save(
        adapt_for_save(state),
        metadata=dict(metadata or {}),
        allow_pickle=allow_pickle,
        shard_bytes=shard_bytes,
        where=where,
        frozen=frozen_paths(state) if frozen is None else frozen,
    )


def load(
    path: str | os.PathLike[str],
    state: Mapping[str, Any] | None = None,
    *,
    map_location: MapLocation = None,
    strict: bool = True,
    verify: bool = True,
    allow_pickle: bool = False,
    rename: Rename | None = None,
    storage_options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Load a checkpoint; restore live objects in ``state`` in place and return the saved entries.

    Without ``state`` the saved tree comes back as plain data, as ``torch.load`` would return it.
    With ``state``, each live object in it is restored with ``load_state_dict`` (tensors are read
    straight into existing CPU parameters where they fit) and appears as itself in the result;
    saved plain values come back too, but saved entries holding tensors that ``state`` does not
    name are not read (``load(path, {"model": model})`` reads only the model's files).

    Args:
        path: A checkpoint directory written by `save`.
        state: Optional mapping like the one saved, holding the live objects to restore.
        map_location: As for ``torch.load``: a device, a string, a ``{saved: target}`` dict, or a
            callable ``(storage, location) -> storage``. By default tensors return to the device
            they were saved from, or to the CPU when that device does not exist here.
        strict: Raise StateMismatchError on missing/unexpected keys and shape or dtype mismatches of
            module tensors; with False, load what fits and log a warning for the rest.
        verify: Check content hashes (on by default; disable only for trusted hot paths).
        allow_pickle: Permit values that were saved with ``allow_pickle=True``.
        rename: Applied to every saved key of a module's state dict before it is matched against the
            live module (``lambda k: k.removeprefix("backbone.")``); return None to drop a key. A
            ``torch.compile`` / DDP wrapper needs none: trainstate saves the wrapped module's own
            keys and drops an ``_orig_mod.``/``module.`` prefix the live module does not have.
        storage_options: For a URL ``path``: options of its fsspec filesystem.

    Example:
        >>> import torch, trainstate
        >>> trainstate.save("/tmp/ts-doc/plain", {"w": torch.ones(2), "step": 7})
        >>> trainstate.load("/tmp/ts-doc/plain")
        {'w': tensor([1., 1.]), 'step': 7}
    """
    storage, name = split_path(path, storage_options)
    with CheckpointReader(storage, name) as reader:
        return restore(
            reader,
            state,
            map_location=map_location,
            strict=strict,
            verify=verify,
            allow_pickle=allow_pickle,
            rename=rename,
        )


@dataclass(frozen=True)
class Peek:
    """What a checkpoint holds, read from its manifest alone: no tensor data is read or verified.

    Attributes:
        path: The checkpoint directory.
        step: ``metadata["step"]`` when it is an int (every CheckpointManager checkpoint), else None.
        metadata: The ``metadata`` it was saved with (a manager's also holds step, metrics and what
            ``CheckpointManager.save(metadata=...)`` added).
        state: The saved tree as `load` would return it, with every tensor on the ``meta`` device
            (shape and dtype, no data) and numpy arrays as meta tensors of their bytes' dtype.
    """

    path: str
    step: int | None
    metadata: dict[str, Any]
    state: dict[str, Any]


def peek(path: str | os.PathLike[str], *, storage_options: StorageOptions | None = None) -> Peek:
    """Read a checkpoint's plain values and metadata without reading any tensor data.

    For building the live objects a checkpoint is then loaded into (a model from the config saved
    beside it), or for a quick look.

    Example:
        >>> import torch, trainstate
        >>> trainstate.save("/tmp/ts-doc/peek", {"w": torch.ones(2, 3), "config": {"width": 3}}, metadata={"step": 5})
        >>> found = trainstate.peek("/tmp/ts-doc/peek")
        >>> found.state["config"], found.state["w"].shape, found.step
        ({'width': 3}, torch.Size([2, 3]), 5)
    """
    storage, name = split_path(path, storage_options)
    with CheckpointReader(storage, name) as reader:
        return peek_reader(reader)


def tensor_source(
    reader: CheckpointReader,
    *,
    map_location: MapLocation = None,
    verify: bool = True,
    destinations: Callable[[Path], torch.Tensor | None] | None = None,
) -> tuple[Any, Any, Any]:
    """``(tree, loader, sharded view)`` for decoding ``reader``'s tree: a `TensorLoader`, or for a
    distributed checkpoint a DCP-backed loader over this rank's view of the tree."""
    if reader.manifest.sharded is None:
        loader: Any = TensorLoader(reader, map_location=map_location, verify=verify, destinations=destinations)
        return reader.manifest.tree, loader, None
    from trainstate.distributed.sharded import ShardedLoader, view_for_rank

    tree, saved_rank, lost = view_for_rank(reader)
    loader = ShardedLoader(
        reader, saved_rank=saved_rank, verify=verify, map_location=map_location, destinations=destinations
    )
    return tree, loader, lost


def peek_reader(reader: CheckpointReader) -> Peek:
    """`peek` at an opened checkpoint."""
    tree, loader, _ = tensor_source(reader, map_location="meta", verify=False)
    state = reader.decode(tree, loader)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{reader.where}: the saved state is a {type(state).__name__}, not a mapping")
    metadata = reader.metadata()
    metadata = metadata if isinstance(metadata, dict) else {}
    step = metadata.get("step")
    return Peek(reader.where, step if type(step) is int else None, metadata, state)


def restore(
    reader: CheckpointReader,
    state: Mapping[str, Any] | None = None,
    *,
    map_location: MapLocation = None,
    strict: bool = True,
    verify: bool = True,
    allow_pickle: bool = False,
    rename: Rename | None = None,
    on_unnamed: Callable[[list[str]], None] | None = None,
) -> dict[str, Any]:
    """`load` from an opened checkpoint; ``on_unnamed`` gets the saved live objects and tensors that
    ``state`` does not name (not restored; tensors among them not even read)."""
    destinations: dict[Path, torch.Tensor] = {}
    tree, loader, lost = tensor_source(reader, map_location=map_location, verify=verify, destinations=destinations.get)
    live: Any = None
    if lost is not None and state is not None:  # a sharded checkpoint: modules and optimizers through DCP
        from trainstate.distributed.sharded import SharedLive, refuse_lost

        skipped = refuse_lost(lost, state, reader, strict=strict)
        state = {k: v for k, v in state.items() if k not in skipped}
        live = SharedLive(state, strict=strict)
    restorer = _Restorer(
        reader, loader, destinations, strict=strict, allow_pickle=allow_pickle, rename=rename, live=live
    )
    if state is None:
        result = reader.decode(tree, loader, allow_pickle=allow_pickle)
    else:
        result = restorer.walk(tree, state, ())
    if not isinstance(result, dict):
        raise CorruptCheckpointError(f"{reader.where}: the saved state is a {type(result).__name__}, not a mapping")
    loader.fill()
    restorer.apply()
    if restorer.unnamed and on_unnamed is not None:
        on_unnamed(restorer.unnamed)
    return result


_IN_PLACE_TYPES = (torch.nn.Module, torch.optim.Optimizer)
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DistributedDataParallel / DataParallel
Rename = Callable[[str], "str | None"]


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _contains_stateful(value: Any) -> bool:
    if is_stateful(value):
        return True
    if isinstance(value, Mapping):
        return any(_contains_stateful(v) for v in value.values())
    return False


class _Restorer:
    """Walks the target state beside the saved tree; collects live objects to restore after the read."""

    def __init__(
        self,
        reader: CheckpointReader,
        loader: TensorLoader,
        destinations: dict[Path, torch.Tensor],
        *,
        strict: bool,
        allow_pickle: bool,
        rename: Rename | None = None,
        live: Any = None,
    ) -> None:
        self._reader = reader
        self._rename = rename
        self._live_adapter = live  # SharedLive for a sharded checkpoint: DCP's state-dict API
        self._loader = loader
        self._destinations = destinations
        self._strict = strict
        self._allow_pickle = allow_pickle
        self._pending: list[tuple[Any, Any, Path]] = []
        self.unnamed: list[str] = []  # saved live objects and tensors the target state does not name

    def _decode(self, node: Any, path: Path) -> Any:
        return self._reader.decode(node, self._loader, allow_pickle=self._allow_pickle, path=path)

    def walk(self, node: Any, target: Any, path: Path) -> Any:
        if is_stateful(target):
            self._live(unwrap(node), unwrap_module(target), path)
            return target
        if not isinstance(target, Mapping) or tag(node) not in ("dict", "odict"):
            return self._decode(node, path)
        result: dict[Any, Any] = {}
        for key, child in children(node, self._decode, where=self._reader.where, path=path) or []:
            if key in target:
                result[key] = self.walk(child, target[key], (*path, key))
                continue
            tensors = holds_tensors(child)
            if tensors or tag(child) == "stateful":
                self.unnamed.append(format_path((*path, key)))  # a live object's state, or tensors
            if not tensors:  # plain values live in the manifest: returned, as torch.load would
                result[key] = self._decode(child, (*path, key))
            # tensors not asked for are not read: a load of the model alone reads only its files
        for key, value in target.items():
            if key not in result and _contains_stateful(value):
                self._mismatch(
                    f"key {format_path((*path, key))!r}: missing from the checkpoint "
                    f"(saved keys: {', '.join(map(str, result)) or 'none'})"
                )
        return result

    def _live(self, node: Any, target: Any, path: Path) -> None:
        live_state = self._live_adapter.state_of(target) if self._live_adapter else target.state_dict()
        if isinstance(target, _IN_PLACE_TYPES):
            # Their load_state_dict copies into (or adopts) these very tensors, so reading the bytes
            # straight into them is the same result without a second copy of the state.
            self._destinations.update(matching_leaves(live_state, _is_tensor, path))
        decoded = self._decode(node, path)
        if isinstance(target, torch.nn.Module):
            decoded = self._check_module(decoded, live_state, path)
        elif isinstance(target, torch.optim.Optimizer):
            self._check_optimizer(decoded, live_state, path)
        self._pending.append((target, decoded, path))

    def _check_optimizer(self, decoded: Any, expected: Mapping[str, Any], path: Path) -> None:
        """What ``Optimizer.load_state_dict`` would refuse, refused before any byte is read in place."""
        groups = decoded.get("param_groups") if isinstance(decoded, dict) else None
        if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
        ):
            raise StateMismatchError(
                f"{self._reader.where}: key {format_path(path)!r}: saved value is not an optimizer state dict"
            )
        saved = [len(g["params"]) for g in groups]
        live = [len(g["params"]) for g in expected["param_groups"]]
        if saved != live:
            raise StateMismatchError(
                f"{self._reader.where}: key {format_path(path)!r}: the checkpoint's optimizer has parameter groups "
                f"of sizes {saved}, the live one {live}; build the optimizer over the same parameters and groups"
            )

    def _check_module(self, decoded: Any, expected: Mapping[str, Any], path: Path) -> Any:
        if not isinstance(decoded, dict):
            raise StateMismatchError(
                f"{self._reader.where}: key {format_path(path)!r}: saved value is a "
                f"{type(decoded).__name__}, not a module state dict"
            )
        decoded = self._plain_keys(decoded, expected)
        missing = [k for k in expected if k not in decoded]
        unexpected = [k for k in decoded if k not in expected]
        if missing or unexpected:
            self._mismatch(f"key {format_path(path)!r}: missing keys {missing}, unexpected keys {unexpected}")
        for key, saved in list(decoded.items()):
            live = expected.get(key)
            if not (isinstance(saved, torch.Tensor) and isinstance(live, torch.Tensor)):
                continue
            if saved.shape != live.shape or saved.dtype != live.dtype:
                what = (
                    f"key {format_path((*path, key))!r}: {saved.dtype}{list(saved.shape)} in the checkpoint, "
                    f"{live.dtype}{list(live.shape)} in the live object"
                )
                if saved.shape == live.shape and not self._strict:
                    # As load_state_dict itself would: the values are copied with a cast.
                    logger.warning("%s: %s: cast to %s (strict=False)", self._reader.where, what, live.dtype)
                    continue
                self._mismatch(what)
                del decoded[key]
        return decoded

    def _plain_keys(self, decoded: dict[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
        """Saved module keys as the live module names them: ``rename`` applied, and a wrapper's
        ``_orig_mod.`` / ``module.`` prefix dropped when the live module has none (state dicts of
        compiled or DDP models saved by other tools)."""
        rename = self._rename
        for prefix in _WRAPPER_PREFIXES:
            if rename is None and decoded and all(str(k).startswith(prefix) for k in decoded):
                if not any(str(k).startswith(prefix) for k in expected):
                    rename = lambda key, prefix=prefix: key[len(prefix) :]  # noqa: E731
        if rename is None:
            return decoded
        renamed: dict[str, Any] = type(decoded)()
        for key, value in decoded.items():
            new = rename(key)
            if new is not None:
                renamed[new] = value
        meta = getattr(decoded, "_metadata", None)
        if isinstance(meta, dict):  # per-module versions, keyed by module prefix ("" is the root)
            versions = type(meta)()
            for prefix, version in meta.items():
                new_prefix = rename(f"{prefix}.") if prefix else ""
                if new_prefix is not None:
                    versions[new_prefix.removesuffix(".")] = version
            renamed._metadata = versions  # type: ignore[attr-defined]
        return renamed

    def _mismatch(self, message: str) -> None:
        if self._strict:
            raise StateMismatchError(f"{self._reader.where}: {message}")
        logger.warning("%s: %s (ignored, strict=False)", self._reader.where, message)

    def apply(self) -> None:
        """Hand each live object its state: modules and optimizers first (their structure was checked
        against the checkpoint already), then the rest, whose own load_state_dict is the only judge."""
        pending = sorted(self._pending, key=lambda item: not isinstance(item[0], _IN_PLACE_TYPES))
        for done, (target, decoded, path) in enumerate(pending):
            try:
                if self._live_adapter is not None and self._live_adapter.load_into(target, decoded):
                    pass
                elif isinstance(target, torch.nn.Module):
                    target.load_state_dict(decoded, strict=self._strict)
                elif is_stateful_loader(target):
                    restore_loader(target, decoded)
                else:
                    target.load_state_dict(decoded)
            except Exception as exc:
                restored = ", ".join(format_path(p) for _, _, p in pending[:done]) or "none"
                untouched = ", ".join(format_path(p) for _, _, p in pending[done + 1 :]) or "none"
                detail = f"{exc}".replace("\n", " ")
                raise StateMismatchError(
                    f"{self._reader.where}: key {format_path(path)!r}: {type(target).__name__}.load_state_dict "
                    f"rejected the saved state ({detail}); already restored: {restored}; not restored: {untouched}"
                ) from exc
        for target, _, _ in pending:
            restored_hook = getattr(target, "_trainstate_restored", None)
            if callable(restored_hook):  # e.g. ResumableSampler notes the global RNG once everything is back
                restored_hook()
