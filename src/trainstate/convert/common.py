"""What every converter shares: the `Source` a reader returns, and turning framework containers into plain data."""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import pathlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainstate.errors import (
    CorruptCheckpointError,
)
from trainstate.format.tree import format_path, rebuild

__all__ = ["Progress", "ReadOptions", "Source", "SourceFormat"]

logger = logging.getLogger(__name__)


Progress = Callable[[str], None]


@dataclass(frozen=True)
class ReadOptions:
    """How a source is read: see `trainstate.convert.read_source`. ``detected`` is whether the kind
    was detected (a ``.ckpt`` is then read as Lightning) rather than asked for."""

    trust_pickle: bool = False
    native: bool = False
    progress: Progress = lambda _: None  # noqa: E731
    detected: bool = True


@dataclass(frozen=True)
class SourceFormat:
    """One foreign checkpoint format: its name, whether a path looks like it, and how to read it.
    `detect` only looks at names on disk (cheap, no unpickling); ``None`` means "only when asked"."""

    kind: str
    detect: Callable[[str], bool] | None
    read: Callable[[str, ReadOptions], Source]


_DCP_METADATA = ".metadata"


@dataclass
class Source:
    """A foreign checkpoint read into memory: the state to save, its metadata, and what was left out."""

    kind: str
    path: str
    state: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _plain(value: Any) -> Any:
    """Framework containers -> the plain types trainstate stores: dict subclasses and Namespaces become
    dicts, paths become strings. Tensors are never copied, so tied tensors stay one object."""
    return rebuild(value, _plain_leaf)


def _plain_leaf(value: Any, path: tuple[Any, ...]) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return rebuild(dict(value.items()), _plain_leaf, path)
    if isinstance(value, argparse.Namespace):
        return rebuild(dict(vars(value)), _plain_leaf, path)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    return value


def _drop(value: Any, patterns: Sequence[str], path: tuple[Any, ...] = ()) -> Any:
    """``value`` without the entries whose dotted key path matches one of ``patterns``."""
    if not patterns or not isinstance(value, dict):
        return value
    out = type(value)() if type(value) is OrderedDict else {}
    if hasattr(value, "_metadata"):
        out._metadata = value._metadata  # type: ignore[attr-defined]
    for key, child in value.items():
        sub = (*path, key)
        if not any(fnmatch.fnmatchcase(format_path(sub), p) for p in patterns):
            out[key] = _drop(child, patterns, sub)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        return float(value.item())
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return float(value)
    return None


def _top_level_metadata(state: Mapping[Any, Any]) -> dict[str, Any]:
    """Step, epoch and float metrics that a plain ``torch.save`` dict holds at its top level."""
    meta: dict[str, Any] = {}
    for key in ("step", "global_step", "iteration"):
        if type(state.get(key)) is int:
            meta["step"] = state[key]
            break
    if type(state.get("epoch")) is int:
        meta["epoch"] = state["epoch"]
    metrics = {str(k): v for k, v in state.items() if type(v) is float}
    if metrics:
        meta["metrics"] = metrics
    return meta


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
