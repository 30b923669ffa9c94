"""Finding the checkpoints of a directory and their state from manifests alone; verifying their files."""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainstate.cli._tree import TensorRef, children, leaves
from trainstate.cli._ui import parse_time
from trainstate.errors import CheckpointError, CheckpointNotFoundError
from trainstate.format import MANIFEST_NAME, CheckpointReader, Manifest
from trainstate.format.codec import format_path
from trainstate.format.dtypes import dtype_info, stored_as_name
from trainstate.format.header import HeaderEntry
from trainstate.manager import CheckpointInfo, KeepBest, parse_step_name
from trainstate.manager.catalog import catalog_entry
from trainstate.storage import (
    QUARANTINE_DIR,
    TEMP_PREFIX,
    Storage,
    local_path,
    open_storage,
    scheme_of,
    split_path,
)

__all__ = [
    "Entry",
    "Scan",
    "open_checkpoint",
    "reader_at",
    "scan",
    "set_storage_options",
    "storage_at",
    "storage_options",
    "verify_entry",
]

_OPTIONS: dict[str, Any] = {}
"""The ``--storage-option`` values of this invocation, for every URL it names."""


def set_storage_options(options: dict[str, Any]) -> None:
    _OPTIONS.clear()
    _OPTIONS.update(options)


def storage_options() -> dict[str, Any]:
    return dict(_OPTIONS)


def storage_at(directory: str) -> Storage:
    """The storage of a directory path or URL (URLs get this invocation's storage options)."""
    return open_storage(directory, _OPTIONS if scheme_of(directory) != "file" else None)


def reader_at(path: str) -> CheckpointReader:
    """A reader of the checkpoint at a path or URL."""
    return CheckpointReader(*split_path(path, _OPTIONS if scheme_of(path) != "file" else None))


@dataclass
class Entry:
    """One checkpoint directory as `scan` found it."""

    name: str
    path: str
    status: str  # "ok", "corrupt", "incomplete", "unreadable" or "quarantined"
    problem: str = ""
    step: int | None = None
    manifest: Manifest | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    size: int = 0
    mtime: float = 0.0

    @property
    def metrics(self) -> dict[str, float]:
        raw = self.metadata.get("metrics")
        if not isinstance(raw, dict):
            return {}
        return {str(k): float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def metric(self, name: str) -> float | None:
        value = self.metrics.get(name)
        return value if value is not None and math.isfinite(value) else None

    @property
    def epoch(self) -> Any:
        if "epoch" in self.metadata:
            return self.metadata["epoch"]
        if self.manifest is not None:  # a plain top-level "epoch" of the saved state
            try:
                value = dict(children(self.manifest.tree) or []).get("epoch")
            except (CheckpointError, TypeError):  # a malformed tree is reported by verify, not here
                return None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
        return None

    @property
    def created(self) -> _dt.datetime:
        parsed = parse_time(self.manifest.created) if self.manifest is not None else None
        return parsed or _dt.datetime.fromtimestamp(self.mtime, tz=_dt.timezone.utc)


@dataclass
class Scan:
    directory: str
    entries: list[Entry]
    leftovers: list[str]  # temporary entries of a writer that is saving now or died mid-save
    single: bool = False  # the directory is itself one checkpoint

    @property
    def committed(self) -> list[Entry]:
        return [e for e in self.entries if e.status == "ok"]

    def latest(self) -> Entry | None:
        stepped = [e for e in self.committed if e.step is not None]
        return max(stepped, key=lambda e: e.step or 0) if stepped else None

    def best(self, monitor: str, mode: str) -> Entry | None:
        """The manager's own choice of best (KeepBest: finite values only, older wins ties)."""
        stepped = {e.step: e for e in self.committed if e.step is not None}
        infos = [CheckpointInfo(step, e.metrics) for step, e in stepped.items()]
        best = KeepBest(1, monitor, "max" if mode == "max" else "min").keep(infos)
        return stepped[next(iter(best))] if best else None

    def metric_names(self) -> list[str]:
        return sorted({name for e in self.committed for name in e.metrics})


def _disk_size(path: str) -> int:
    try:
        return sum(entry.stat(follow_symlinks=False).st_size for entry in os.scandir(path) if entry.is_file())
    except OSError:
        return 0


def _entry(storage: Storage, name: str) -> Entry | None:
    """The catalog's entry (the manager's own view of it), with its size and age on disk."""
    found = catalog_entry(storage, name)
    if found is None or found.status == "vanished":
        return None
    path = storage.where(name)
    if storage.remote:  # sizes from the manifest (no request per file), age from its creation time
        size = sum(f.size for f in found.manifest.files) if found.manifest is not None else 0
        mtime = 0.0
    else:
        size = _disk_size(path)
        try:
            mtime = os.lstat(path).st_mtime
        except OSError:
            mtime = 0.0
    return Entry(
        name=name,
        path=path,
        status=found.status,
        problem=found.problem,
        step=found.step,
        manifest=found.manifest,
        metadata=found.metadata,
        size=size,
        mtime=mtime,
    )


def scan(directory: str) -> Scan:
    """Every checkpoint in ``directory`` (or ``directory`` itself if it is one), sorted by step.

    Reads manifests only. Raises CheckpointNotFoundError if the directory does not exist.
    """
    if scheme_of(directory) != "file":
        return _scan_url(directory.rstrip("/"))
    directory = local_path(directory)
    if os.path.lexists(os.path.join(directory, MANIFEST_NAME)):
        storage, name = split_path(directory)
        entry = _entry(storage, name)
        assert entry is not None
        return Scan(directory, [entry], [], single=True)
    if os.path.isfile(directory):
        raise CheckpointNotFoundError(f"{directory}: is a file, not a checkpoint directory")
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"{directory}: no such directory")
    storage = storage_at(directory)
    leftovers = sorted(n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX))
    return Scan(directory, _entries(storage) + _quarantined(directory), leftovers)


def _entries(storage: Storage) -> list[Entry]:
    entries = [e for name in storage.list() if name != QUARANTINE_DIR and (e := _entry(storage, name)) is not None]
    return sorted(entries, key=lambda e: (e.step is None, e.step or 0, e.name))


def _scan_url(directory: str) -> Scan:
    """`scan` of a URL: an object store has no directories, so "missing" is "nothing there"."""
    parent, name = split_path(directory, _OPTIONS)
    if parent.exists(name, MANIFEST_NAME):
        entry = _entry(parent, name)
        if entry is not None:
            return Scan(directory, [entry], [], single=True)
    storage = storage_at(directory)
    found = _entries(storage) + _quarantined(directory)
    if not found and not storage.list():
        raise CheckpointNotFoundError(f"{directory}: nothing there (no such directory, bucket or checkpoint)")
    return Scan(directory, found, [])


def _quarantined(directory: str) -> list[Entry]:
    """Checkpoints that `CheckpointManager.restore` moved aside after they failed verification."""
    aside = storage_at(f"{directory}/{QUARANTINE_DIR}")
    found = []
    for name in aside.list():
        entry = _entry(aside, name)
        if entry is None:
            continue
        why = entry.problem or "a data file failed verification"
        entry.name = f"{QUARANTINE_DIR}/{name}"
        entry.step = parse_step_name(name.partition("@")[0])
        entry.status, entry.problem = "quarantined", f"{entry.path}: moved aside by restore(): {why}"
        found.append(entry)
    return sorted(found, key=lambda e: (e.step or 0, e.name))


def open_checkpoint(path: str) -> CheckpointReader:
    """A reader for the trainstate checkpoint at ``path``, with a hint when it is something else."""
    if scheme_of(path) != "file":
        parent, name = split_path(path, _OPTIONS)
        if not parent.exists(name, MANIFEST_NAME) and storage_at(path.rstrip("/")).list():
            raise CheckpointNotFoundError(
                f"{path}: is a directory of checkpoints, not one checkpoint; name one of them"
            )
        return CheckpointReader(parent, name)
    full = local_path(path)
    if os.path.isfile(full):
        raise CheckpointNotFoundError(
            f"{full}: is a file, not a trainstate checkpoint directory; convert it first: "
            f"trainstate convert {path} <new checkpoint dir>"
        )
    if os.path.isdir(full) and not os.path.lexists(os.path.join(full, MANIFEST_NAME)):
        found = scan(full)
        if found.entries:
            names = ", ".join(e.name for e in found.entries[:3])
            raise CheckpointNotFoundError(
                f"{full}: is a directory of checkpoints ({names}{', ...' if len(found.entries) > 3 else ''}), "
                "not one checkpoint; name one of them"
            )
    return CheckpointReader(*split_path(full))


# ------------------------------------------------------------------------------------- verifying
def verify_entry(reader: CheckpointReader, advance: Callable[[int], None] = lambda n: None) -> list[str]:
    """Every problem of a committed checkpoint: each bad file, then each tensor key whose file, entry,
    dtype or shape disagrees with the manifest. Empty when the checkpoint is intact."""
    problems: list[str] = []
    headers: dict[str, dict[str, HeaderEntry]] = {}
    for entry in reader.manifest.files:
        try:
            headers[entry.name] = reader.verify_file(entry, progress=advance)
        except CheckpointError as exc:
            problems.append(str(exc))
            advance(entry.size)
    if reader.manifest.sharded is not None:  # tensors are chunks, listed in the sharded section
        from trainstate.distributed.dcp_io import chunk_problems

        return problems + chunk_problems(reader, headers)
    listed = {e.name for e in reader.manifest.files}
    try:
        for path, value in leaves(reader.manifest.tree, where=reader.where):
            if not isinstance(value, TensorRef):
                continue
            key = format_path(path)
            stored_key = value.node.get("key", key)
            if value.file not in listed:
                problems.append(
                    f"{reader.where}: key {key!r}: refers to file {value.file!r} the manifest does not list"
                )
            elif value.file in headers:
                stored = headers[value.file].get(str(stored_key))
                where = os.path.join(reader.where, value.file)
                if stored is None:
                    problems.append(f"{where}: key {key!r}: tensor {stored_key!r} is missing from the file")
                else:
                    dtype, shape = value.node.get("dtype"), value.node.get("shape")  # as stored, also for numpy
                    expected = stored_as_name(dtype_info(dtype, where=f"{reader.where}: key {key!r}"), shape or [])
                    if (stored.st_dtype, stored.shape) != expected:
                        problems.append(
                            f"{where}: key {key!r}: stored as {stored.st_dtype}{list(stored.shape)}, "
                            f"manifest says {dtype}{shape}"
                        )
    except CheckpointError as exc:
        problems.append(str(exc))
    return problems
