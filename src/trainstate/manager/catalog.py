"""The catalog of a checkpoint directory, read from manifests alone: what the CheckpointManager
indexes and what ``trainstate ls`` / ``prune`` show come from this one scan."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from trainstate.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from trainstate.format.manifest import Manifest
from trainstate.format.reader import CheckpointReader
from trainstate.manager.policies import CheckpointInfo
from trainstate.storage import MANIFEST_NAME, QUARANTINE_DIR, Storage

__all__ = ["CatalogEntry", "checkpoint_info", "parse_step_name", "read_catalog", "step_name"]

_NAME_RE = re.compile(r"step_(\d{8,})")


def step_name(step: int) -> str:
    """The directory name of a manager checkpoint: ``step_name(300) == "step_00000300"``."""
    return f"step_{step:08d}"


def parse_step_name(name: str) -> int | None:
    """Inverse of `step_name`; None for a name the manager did not give."""
    match = _NAME_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def checkpoint_info(name: str, metadata: Any, *, where: str) -> CheckpointInfo:
    """What the manager knows of its checkpoint ``name`` from the manifest's metadata: the one
    definition of a valid manager checkpoint. Raises CorruptCheckpointError unless
    ``metadata.step`` is the very int the name gives and ``metrics`` maps names to numbers."""
    named = parse_step_name(name)
    step = metadata.get("step") if isinstance(metadata, dict) else None
    if named is None or type(step) is not int or step != named:
        raise CorruptCheckpointError(f"{where}: the manifest says step {step!r}, the name says {named}")
    metrics = metadata.get("metrics") or {}
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in metrics.items()
    ):
        raise CorruptCheckpointError(f"{where}: the manifest's metrics are not a mapping of names to numbers")
    return CheckpointInfo(step, {k: float(v) for k, v in metrics.items()})


@dataclass
class CatalogEntry:
    """One entry of a checkpoint directory as the catalog found it.

    ``status``: ``ok`` (a committed checkpoint whose manifest reads), ``corrupt`` (its manifest
    does not, or a manager checkpoint's step/metrics are invalid), ``incomplete`` (no manifest:
    never committed), ``unreadable`` (it cannot be read: ``error`` says why; that is not damage),
    ``vanished`` (removed while it was being read, e.g. by a concurrent writer's retention).
    """

    name: str
    status: str
    step: int | None = None
    problem: str = ""
    manifest: Manifest | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    info: CheckpointInfo | None = None  # for a valid manager checkpoint
    error: OSError | None = None


def read_catalog(storage: Storage) -> list[CatalogEntry]:
    """Every checkpoint-like entry of ``storage`` (manifests only), in listing order. Directories
    that are neither checkpoints nor named like one (logs, plots, the quarantine) are left out."""
    entries = []
    for name in storage.list():
        if name == QUARANTINE_DIR:
            continue
        entry = catalog_entry(storage, name)
        if entry is not None:
            entries.append(entry)
    return entries


def catalog_entry(storage: Storage, name: str) -> CatalogEntry | None:
    """`read_catalog`'s view of one entry; None for something that is not a checkpoint at all."""
    where = storage.where(name)
    named = parse_step_name(name)
    try:
        files = storage.files(name)
    except NotADirectoryError:
        return None  # a plain file beside the checkpoints
    except FileNotFoundError:
        return CatalogEntry(name, "vanished", named)
    except OSError as exc:
        problem = f"{where}: cannot read it: {os.strerror(exc.errno or 0) if exc.errno else exc}"
        return CatalogEntry(name, "unreadable", named, problem, error=exc)
    if MANIFEST_NAME not in files:
        if named is None and not any(f.endswith(".safetensors") for f in files):
            return None
        return CatalogEntry(name, "incomplete", named, f"{where}: no {MANIFEST_NAME} (never committed)")
    try:
        with CheckpointReader(storage, name) as reader:
            manifest, metadata = reader.manifest, reader.metadata()
    except CheckpointNotFoundError as exc:
        if not storage.exists(name):
            return CatalogEntry(name, "vanished", named)
        return CatalogEntry(name, "corrupt", named, str(exc))
    except CheckpointError as exc:
        return CatalogEntry(name, "corrupt", named, str(exc))
    except OSError as exc:
        return CatalogEntry(name, "unreadable", named, f"{where}: cannot read it: {exc}", error=exc)
    entry = CatalogEntry(name, "ok", named, manifest=manifest, metadata=metadata if isinstance(metadata, dict) else {})
    if named is not None:
        try:
            entry.info = checkpoint_info(name, metadata, where=where)
        except CheckpointError as exc:
            entry.status, entry.problem = "corrupt", str(exc)
    elif type(entry.metadata.get("step")) is int:
        entry.step = entry.metadata["step"]
    return entry
