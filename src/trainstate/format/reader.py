"""Reading a checkpoint: manifest first, headers validated before allocation, hashes verified."""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Union

import torch

from trainstate.errors import CheckpointNotFoundError, CorruptCheckpointError
from trainstate.format.codec import Decoder, Path, format_path
from trainstate.format.hashing import new_hasher
from trainstate.format.load_plan import LoadPlan, ReadItem, execute_load
from trainstate.format.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, FileEntry, Manifest
from trainstate.format.tensorfile import (
    HeaderEntry,
    dtype_from_name,
    read_exact_into,
    read_header,
    stored_as,
    valid_shape,
)
from trainstate.storage.base import ReadableFile, Storage

__all__ = ["CheckpointReader", "MapLocation", "Progress", "TensorLoader", "open_file_budget"]

logger = logging.getLogger(__name__)

MapLocation = Union[None, str, torch.device, dict[str, str], Callable[[Any, str], Any]]  # noqa: UP007 - runtime alias
Destinations = Callable[[Path], "torch.Tensor | None"]
Progress = Callable[[int], None]
_CHUNK = 16 << 20


class CheckpointReader:
    """One committed checkpoint: its validated manifest, and access to its files."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.storage = storage
        self.name = name
        self.where = storage.where(name)
        self._handles: dict[str, ReadableFile] | None = None
        self._handles_lock = threading.Lock()
        if not storage.exists(name):
            raise CheckpointNotFoundError(f"{self.where}: no such checkpoint")
        if not storage.exists(name, MANIFEST_NAME):
            raise CheckpointNotFoundError(f"{self.where}: no {MANIFEST_NAME}; not a committed trainstate checkpoint")
        where = os.path.join(self.where, MANIFEST_NAME)
        with storage.open(name, MANIFEST_NAME) as f:
            size = _opened_size(f, lambda: storage.size(name, MANIFEST_NAME))
            if size > MAX_MANIFEST_BYTES:
                raise CorruptCheckpointError(f"{where}: manifest is {size} bytes, over the {MAX_MANIFEST_BYTES} cap")
            data = bytearray(size)
            read_exact_into(f, memoryview(data), where=where)
        self.manifest = Manifest.from_json(bytes(data), where=where)
        self._files = {entry.name: entry for entry in self.manifest.files}

    def file(self, name: str, *, where: str) -> FileEntry:
        entry = self._files.get(name) if isinstance(name, str) else None
        if entry is None:
            raise CorruptCheckpointError(
                f"{self.where}: {where}: refers to file {name!r} that the manifest does not list"
            )
        return entry

    @contextmanager
    def opened(self, entry: FileEntry) -> Iterator[ReadableFile]:
        """A data file opened at offset 0, its size checked against the manifest.

        The first call opens *every* data file at once and keeps them open until `close`, so a
        checkpoint deleted by retention while it is being read stays readable through its handles.
        A checkpoint with more files than a quarter of the open-file limit is opened one file at a
        time instead (a concurrent deletion then fails the read with CheckpointNotFoundError).
        """
        with self._handles_lock:
            if self._handles is None and len(self.manifest.files) <= open_file_budget():
                handles: dict[str, ReadableFile] = {}
                try:
                    for item in self.manifest.files:
                        handles[item.name] = self._open_sized(item)
                except BaseException:
                    for handle in handles.values():
                        handle.close()
                    raise
                self._handles = handles
            held = self._handles.get(entry.name) if self._handles is not None else None
        if held is not None:
            held.seek(0)
            yield held
            return
        f = self._open_sized(entry)
        try:
            yield f
        finally:
            f.close()

    def _open_sized(self, entry: FileEntry) -> ReadableFile:
        f = self.storage.open(self.name, entry.name)
        actual = _opened_size(f, lambda: self.storage.size(self.name, entry.name))
        if actual != entry.size:
            f.close()
            raise CorruptCheckpointError(
                f"{os.path.join(self.where, entry.name)}: size is {actual} bytes, "
                f"manifest says {entry.size} (truncated or replaced)"
            )
        return f

    def close(self) -> None:
        """Close the data files opened by reads. The reader can still answer manifest questions."""
        with self._handles_lock:
            handles, self._handles = self._handles or {}, None
        for handle in handles.values():
            handle.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def verify_file(self, entry: FileEntry, progress: Progress | None = None) -> dict[str, HeaderEntry]:
        """Check size, safetensors header and content hash of one file; returns its validated header.

        Uses the reader's open handles once a read opened them; otherwise opens just this file, so
        that every bad file of a damaged checkpoint can be named. ``progress`` gets byte counts.
        """
        where = os.path.join(self.where, entry.name)
        with self._handles_lock:
            held = self._handles[entry.name] if self._handles is not None else None
        f = held if held is not None else self._open_sized(entry)
        try:
            f.seek(0)
            _, header = read_header(f, entry.size, where=where)
            f.seek(0)
            _hash_stream(f, entry, where, progress)
        finally:
            if held is None:
                f.close()
        return header

    def verify(self) -> None:
        """Check every file of the checkpoint; raises CorruptCheckpointError naming the first bad one."""
        for entry in self.manifest.files:
            self.verify_file(entry)

    def decode(self, node: Any, loader: TensorLoader | None, *, allow_pickle: bool = False, path: Path = ()) -> Any:
        """Decode a subtree of the manifest, allocating (not yet filling) its tensors in ``loader``."""
        return Decoder(loader, allow_pickle=allow_pickle, where=self.where).decode(node, path)

    def metadata(self) -> Any:
        return self.decode(self.manifest.metadata, None)


def _opened_size(f: ReadableFile, by_name: Callable[[], int]) -> int:
    """The size of the file behind ``f`` (fstat, immune to a rename under us; an object store's file
    knows it from opening), else by its name."""
    known = getattr(f, "size", None)
    if type(known) is int:
        return known
    try:
        return os.fstat(f.fileno()).st_size  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return by_name()


def open_file_budget() -> int:
    """How many data files one reader may hold open at once: a quarter of the soft open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1024 if soft == resource.RLIM_INFINITY else max(8, min(1024, soft // 4))


def _available(device: torch.device) -> bool:
    if device.type == "meta":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return device.type == "cpu"


def _hash_stream(f: ReadableFile, entry: FileEntry, where: str, progress: Progress | None = None) -> None:
    hasher = new_hasher()
    buffer = bytearray(min(_CHUNK, max(entry.size, 1)))
    view = memoryview(buffer)
    remaining = entry.size
    while remaining:
        n = f.readinto(view[: min(len(view), remaining)])
        if not n:
            raise CorruptCheckpointError(f"{where}: file ended early (truncated)")
        hasher.update(view[:n])
        remaining -= n
        if progress is not None:
            progress(n)
    if hasher.hexdigest() != entry.hash:
        raise CorruptCheckpointError(f"{where}: content hash mismatch (the file is damaged or was modified)")


def _wrap(tensor: torch.Tensor, param: bool, requires_grad: bool) -> torch.Tensor:
    if param:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.detach().requires_grad_(requires_grad) if requires_grad else tensor


class TensorLoader:
    """The load planner: as the tree is decoded, each referenced tensor is checked against its file
    header and becomes a `ReadItem` of ``plan`` (its destination allocated, not yet filled); `fill`
    executes the plan.

    ``destinations`` may offer an existing tensor (a live parameter) for a path; if its dtype,
    shape and layout fit, bytes go straight into it and no second copy of the state is held. Such
    files are hash-verified before any byte lands in a live tensor.
    """

    def __init__(
        self,
        reader: CheckpointReader,
        *,
        map_location: MapLocation = None,
        verify: bool = True,
        destinations: Destinations | None = None,
    ) -> None:
        self._reader = reader
        self._map_location = map_location
        self._verify = verify
        self._destinations = destinations
        self._headers: dict[str, dict[str, HeaderEntry]] = {}
        self.plan = LoadPlan()
        self._wrappers: dict[tuple[Any, ...], torch.Tensor] = {}  # Parameters etc. handed out, one per tensor
        self._used_destinations: set[int] = set()
        self._warned_devices: set[str] = set()

    def _header(self, entry: FileEntry) -> dict[str, HeaderEntry]:
        if entry.name not in self._headers:
            with self._reader.opened(entry) as f:
                _, self._headers[entry.name] = read_header(
                    f, entry.size, where=os.path.join(self._reader.where, entry.name)
                )
        return self._headers[entry.name]

    def get(self, ref: dict[str, Any], path: Path) -> torch.Tensor:
        where = f"key {format_path(path)!r}"
        entry = self._reader.file(ref.get("file"), where=where)  # type: ignore[arg-type]
        key, shape_raw = ref.get("key", format_path(path)), ref.get("shape")
        if not isinstance(key, str):
            raise CorruptCheckpointError(f"{self._reader.where}: {where}: invalid tensor key {key!r}")
        dtype = dtype_from_name(ref.get("dtype"), where=f"{self._reader.where}: {where}")
        if not valid_shape(shape_raw):
            raise CorruptCheckpointError(f"{self._reader.where}: {where}: invalid shape {shape_raw!r}")
        shape = tuple(shape_raw)
        device = self._device_for(ref.get("device", "cpu"), where=where)
        param = bool(ref.get("param"))
        requires_grad = bool(ref.get("requires_grad", param))
        if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
            raise CorruptCheckpointError(f"{self._reader.where}: {where}: a {dtype} tensor cannot require grad")
        if device is not None and device.type == "meta":  # as torch.load(map_location="meta"): no data read
            return _wrap(torch.empty(shape, dtype=dtype, device="meta"), param, requires_grad)
        header = self._header(entry)
        stored = header.get(key)
        file_where = os.path.join(self._reader.where, entry.name)
        if stored is None:
            raise CorruptCheckpointError(f"{file_where}: {where}: tensor {key!r} is missing from the file")
        if (stored.st_dtype, stored.shape) != stored_as(dtype, shape):
            raise CorruptCheckpointError(
                f"{file_where}: {where}: stored as {stored.st_dtype}{list(stored.shape)}, "
                f"manifest says {dtype}{list(shape)}"
            )
        item = self.plan.item(entry.name, key)
        if item is None:
            item = self.plan.add(self._new_item(entry.name, key, stored, dtype, shape, path))
        tensor = item.target
        if device is not None and device != tensor.device:
            tensor = item.final_on(device)
        if not (param or requires_grad):
            return tensor
        # One object per saved tensor: the same Parameter saved twice comes back as one Parameter.
        wrapper_key = (entry.name, key, tensor.device, param, requires_grad)
        wrapper = self._wrappers.get(wrapper_key)
        if wrapper is None:
            wrapper = self._wrappers[wrapper_key] = _wrap(tensor, param, requires_grad)
        return wrapper

    def _new_item(
        self, file: str, key: str, stored: HeaderEntry, dtype: torch.dtype, shape: tuple[int, ...], path: Path
    ) -> ReadItem:
        dest = self._destinations(path) if self._destinations else None
        if (
            isinstance(dest, torch.Tensor)
            and dest.dtype == dtype
            and tuple(dest.shape) == shape
            and dest.device.type == "cpu"
            and dest.is_contiguous()
            and id(dest) not in self._used_destinations
            and not dest.is_conj()
            and not dest.is_neg()
        ):
            self._used_destinations.add(id(dest))
            return ReadItem(file, key, stored.start, stored.end, dest.detach(), in_place=True)
        return ReadItem(file, key, stored.start, stored.end, torch.empty(shape, dtype=dtype), in_place=False)

    def _device_for(self, saved: object, *, where: str) -> torch.device | None:
        """Where a tensor saved on ``saved`` goes; None keeps the CPU copy."""
        try:
            if not isinstance(saved, str) or len(saved) > 64:
                raise ValueError(saved)
            device = torch.device(saved)
        except (RuntimeError, ValueError):
            raise CorruptCheckpointError(f"{self._reader.where}: {where}: invalid device {saved!r}") from None
        loc = self._map_location
        if callable(loc):
            probe = loc(torch.UntypedStorage(0), saved)
            return None if probe is None else probe.device
        if isinstance(loc, dict):
            loc = loc.get(saved)
        if loc is not None:
            device = torch.device(loc)
            if not _available(device):
                raise ValueError(f"map_location {loc!r}: device {device} is not available in this process")
            return None if device.type == "cpu" else device
        if device.type in ("cpu", "meta"):
            return None
        if _available(device):
            return device
        if saved not in self._warned_devices:
            self._warned_devices.add(saved)
            logger.warning(
                "%s: tensors saved on %s are loaded on cpu (device not available here)", self._reader.where, saved
            )
        return None

    def fill(self) -> None:
        """Execute the plan: read (and verify) every allocated tensor (see `execute_load`)."""
        execute_load(self.plan, self._reader, verify=self._verify)
