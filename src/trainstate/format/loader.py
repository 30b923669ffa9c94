"""The load planner: tensors referenced by a manifest, checked against their file headers, allocated
(or matched to live destinations) and read by `execute_load`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, Union

import torch

from trainstate.errors import CorruptCheckpointError
from trainstate.format.codec import Path, format_path
from trainstate.format.header import HeaderEntry, read_header, valid_shape
from trainstate.format.load_plan import LoadPlan, ReadItem, execute_load
from trainstate.format.manifest import FileEntry
from trainstate.format.reader import CheckpointReader
from trainstate.format.tensorfile import dtype_from_name, stored_as

__all__ = ["MapLocation", "TensorLoader"]

logger = logging.getLogger(__name__)

MapLocation = Union[None, str, torch.device, dict[str, str], Callable[[Any, str], Any]]  # noqa: UP007 - runtime alias
Destinations = Callable[[Path], "torch.Tensor | None"]


def _available(device: torch.device) -> bool:
    if device.type == "meta":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return device.type == "cpu"


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
