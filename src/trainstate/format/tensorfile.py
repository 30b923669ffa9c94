"""Safetensors files written straight from tensor buffers, and read back with validation first.

We write the layout ourselves instead of calling ``safetensors.torch.save_file`` because that
function first turns every tensor into ``bytes`` (a second full copy of the state in memory);
here each tensor's own buffer goes to ``os.write``. Every file still loads with
``safetensors.torch.load_file``. Reading validates the header completely (size cap, dtypes,
shapes, contiguous in-range offsets) before a single tensor is allocated.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from trainstate.errors import CorruptCheckpointError
from trainstate.format.dtypes import SAFETENSORS_CODES, DtypeInfo, stored_as_name
from trainstate.format.hashing import Hasher

__all__ = [
    "SAFETENSORS_DTYPES",
    "alias_key",
    "TensorRecord",
    "byte_view",
    "dtype_from_name",
    "dtype_name",
    "encode_file",
]

_ALIGN = 8
_COALESCE_BELOW = 1 << 20  # small tensors are batched into one write
_COALESCE_BUFFER = 4 << 20


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


# Read from the module's own namespace: getattr(torch, name) could import submodules lazily.
_DTYPES: dict[str, torch.dtype] = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}


def dtype_from_name(name: object, *, where: str) -> torch.dtype:
    """Inverse of `dtype_name`; only names of real ``torch.dtype`` objects are accepted."""
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CorruptCheckpointError(f"{where}: unknown dtype {name!r}")
    return dtype


def alias_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the exact view ``tensor`` is: equal keys mean the very same elements (tied
    weights, a tensor referenced twice). Callers keep ``tensor`` alive while they use the key (it
    holds an address). An empty tensor has no elements to share: it is only itself."""
    if tensor.numel() == 0:
        return ("empty", id(tensor))
    return (
        tensor.untyped_storage().data_ptr(),
        tensor.device,
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
        tensor.is_conj(),
        tensor.is_neg(),
    )


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying."""
    if tensor.numel() == 0:  # any strides count as contiguous then, and a byte view may refuse them
        return memoryview(b"")
    flat = tensor.reshape(-1)
    if flat.stride(0) != 1:  # "contiguous" with a size-1 dim of any stride (t[::2] of 2 elements)
        flat = flat.as_strided((flat.numel(),), (1,))
    array = flat.view(torch.uint8).numpy()
    return memoryview(cast(bytes, array)).cast("B")  # numpy arrays are buffers; the stubs disagree


@dataclass(frozen=True)
class TensorRecord:
    """How one tensor is stored: its safetensors dtype/shape may differ from the real ones for dtypes
    safetensors lacks (those are stored as raw ``U8`` bytes)."""

    key: str
    st_dtype: str
    st_shape: tuple[int, ...]
    nbytes: int


def _record(key: str, tensor: torch.Tensor) -> TensorRecord:
    nbytes = tensor.numel() * tensor.element_size()
    st = SAFETENSORS_DTYPES.get(tensor.dtype)
    if st is None:
        return TensorRecord(key, "U8", (nbytes,), nbytes)
    return TensorRecord(key, st, tuple(tensor.shape), nbytes)


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    if tensor.device.type != "cpu":
        tensor = tensor.detach().to("cpu")
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return byte_view(tensor.detach().resolve_conj().resolve_neg())


def encode_file(
    items: Sequence[tuple[str, torch.Tensor]], hasher: Hasher
) -> tuple[list[TensorRecord], Iterator[memoryview]]:
    """Lay out one safetensors file; returns the records and the chunks to write, hashed on the way.

    Tensors are ordered by item size (largest first) so every offset stays naturally aligned while
    the data region has no gaps, which the safetensors format requires. At most one tensor is
    copied at a time (device or non-contiguous sources); contiguous CPU tensors are not copied.
    """
    ordered = sorted(items, key=lambda kv: -kv[1].element_size())
    records = [_record(key, t) for key, t in ordered]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for rec in records:
        header[rec.key] = {
            "dtype": rec.st_dtype,
            "shape": list(rec.st_shape),
            "data_offsets": [offset, offset + rec.nbytes],
        }
        offset += rec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % _ALIGN)

    def chunks() -> Iterator[memoryview]:
        head = memoryview(struct.pack("<Q", len(text)) + text)
        hasher.update(head)
        yield head
        batch = bytearray()
        for _, tensor in ordered:
            data = _host_bytes(tensor)
            if len(data) < _COALESCE_BELOW:
                batch += data
                if len(batch) < _COALESCE_BUFFER:
                    continue
                data, batch = memoryview(batch), bytearray()
            elif batch:
                hasher.update(batch)
                yield memoryview(batch)
                batch = bytearray()
            hasher.update(data)
            yield data
        if batch:
            hasher.update(batch)
            yield memoryview(batch)

    return records, chunks()


SAFETENSORS_DTYPES: dict[torch.dtype, str] = {getattr(torch, name): code for name, code in SAFETENSORS_CODES.items()}


def stored_as(dtype: torch.dtype, shape: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    """The safetensors (dtype, shape) a tensor of ``dtype``/``shape`` is stored under."""
    return stored_as_name(DtypeInfo(dtype_name(dtype), dtype.itemsize, SAFETENSORS_DTYPES.get(dtype)), shape)
