"""Reading ``torch.save`` files and PyTorch Lightning ``.ckpt`` checkpoints (both are ``torch.load`` files)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from trainstate.convert.common import ReadOptions, Source, SourceFormat, _number, _plain, _top_level_metadata
from trainstate.convert.unpickle import load_torch_file
from trainstate.errors import (
    UnsupportedFormatError,
)

__all__ = ["LIGHTNING", "TORCH_FILE"]

logger = logging.getLogger(__name__)


_LIGHTNING_MOVED = ("state_dict", "optimizer_states", "lr_schedulers")


def _is_lightning(obj: Any) -> bool:
    return isinstance(obj, Mapping) and (
        "pytorch-lightning_version" in obj
        or "lightning_version" in obj
        or {"state_dict", "global_step", "epoch"} <= set(obj)
    )


def _read_file(path: str, options: ReadOptions) -> Source:
    """A ``torch.save`` file; a Lightning checkpoint when it looks like one (unless ``--from torch``)."""
    trust_pickle, native, progress = options.trust_pickle, options.native, options.progress
    if os.path.isdir(path):
        raise UnsupportedFormatError(f"{path}: is a directory; torch.save and Lightning checkpoints are files")
    progress(f"loading {os.path.basename(path)}")
    obj = load_torch_file(path, trust_pickle=trust_pickle)
    if _is_lightning(obj) and options.detected:
        return _from_lightning(path, _plain(obj), native=native)
    obj = _plain(obj)
    if isinstance(obj, dict):
        return Source("torch", path, obj, _top_level_metadata(obj))
    # trainstate stores a mapping; a bare tensor or list goes under one key, undone by to_torch_file.
    return Source("torch", path, {"data": obj}, {"wrapped": "data"})


def _read_lightning(path: str, options: ReadOptions) -> Source:
    source = _read_file(path, ReadOptions(options.trust_pickle, options.native, options.progress, detected=True))
    if source.kind != "lightning":
        raise UnsupportedFormatError(f"{path}: not a Lightning checkpoint (no 'state_dict'/'global_step')")
    return source


def _from_lightning(path: str, ckpt: dict[str, Any], *, native: bool) -> Source:
    metadata: dict[str, Any] = {}
    if type(ckpt.get("global_step")) is int:
        metadata["step"] = ckpt["global_step"]
    if type(ckpt.get("epoch")) is int:
        metadata["epoch"] = ckpt["epoch"]
    metrics = {}
    for callback in (ckpt.get("callbacks") or {}).values():  # ModelCheckpoint records its monitored score
        if isinstance(callback, Mapping) and isinstance(callback.get("monitor"), str):
            value = _number(callback.get("current_score"))
            if value is not None:
                metrics[callback["monitor"]] = value
    if metrics:
        metadata["metrics"] = metrics
    if native:
        return Source("lightning", path, ckpt, metadata)
    state: dict[str, Any] = {"model": ckpt["state_dict"]}
    for key, single, several in (
        ("optimizer_states", "optimizer", "optimizers"),
        ("lr_schedulers", "scheduler", "schedulers"),
    ):
        items = ckpt.get(key) or []
        if len(items) == 1:
            state[single] = items[0]
        elif items:
            state[several] = list(items)
    state["lightning"] = {k: v for k, v in ckpt.items() if k not in _LIGHTNING_MOVED}
    return Source("lightning", path, state, metadata)


TORCH_FILE = SourceFormat("torch", os.path.isfile, _read_file)
"""Any file is tried as a ``torch.save`` file (the last format detection tries)."""
LIGHTNING = SourceFormat("lightning", None, _read_lightning)
"""Told apart from a plain ``torch.save`` file only once loaded, so never detected from the path."""
