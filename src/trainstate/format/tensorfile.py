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
from typing import Any, TypeGuard, cast

import torch

from trainstate.errors import CorruptCheckpointError
from trainstate.format.hashing import Hasher
from trainstate.storage.base import ReadableFile

__all__ = [
    "MAX_NDIM",
    "SAFETENSORS_DTYPES",
    "HeaderEntry",
    "valid_shape",
    "alias_key",
    "TensorRecord",
    "byte_view",
    "dtype_from_name",
    "dtype_name",
    "encode_file",
    "read_exact_into",
    "read_header",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024
_ALIGN = 8
_COALESCE_BELOW = 1 << 20  # small tensors are batched into one write
_COALESCE_BUFFER = 4 << 20

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "C64": 8,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


# Read from the module's own namespace: getattr(torch, name) could import submodules lazily.
_DTYPES: dict[str, torch.dtype] = {name: v for name, v in vars(torch).items() if isinstance(v, torch.dtype)}
MAX_NDIM = 1024
"""Most dimensions a tensor may have; `save` refuses more, and readers enforce the same limit."""
_INT64_MAX = 2**63 - 1


def dtype_from_name(name: object, *, where: str) -> torch.dtype:
    """Inverse of `dtype_name`; only names of real ``torch.dtype`` objects are accepted."""
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CorruptCheckpointError(f"{where}: unknown dtype {name!r}")
    return dtype


def valid_shape(shape: object) -> TypeGuard[list[int]]:
    """A list of non-negative ints whose strides fit in int64 (also when another dim is 0)."""
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        return False
    extent = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            return False
        extent *= max(dim, 1)
    return extent <= _INT64_MAX


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


@dataclass(frozen=True)
class HeaderEntry:
    """A validated tensor entry of a safetensors header; offsets are absolute in the file."""

    st_dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_exact_into(f: ReadableFile, view: memoryview, *, where: str) -> None:
    """Fill ``view`` from ``f``; a short read means the file was truncated under us."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CorruptCheckpointError(f"{where}: file ended early (truncated)")
        got += n


def read_header(f: ReadableFile, file_size: int, *, where: str) -> tuple[bytes, dict[str, HeaderEntry]]:
    """Read and fully validate a safetensors header; returns its raw bytes and the entries."""
    if file_size < 8:
        raise CorruptCheckpointError(f"{where}: {file_size} bytes is too small for a safetensors file")
    prefix = bytearray(8)
    read_exact_into(f, memoryview(prefix), where=where)
    (length,) = struct.unpack("<Q", prefix)
    if length > min(MAX_HEADER_BYTES, file_size - 8):
        raise CorruptCheckpointError(f"{where}: header length {length} exceeds the file ({file_size} bytes) or the cap")
    raw = bytearray(length)
    read_exact_into(f, memoryview(raw), where=where)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: safetensors header is not a JSON object")
    base = 8 + length
    data_len = file_size - base
    entries: dict[str, HeaderEntry] = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        entries[key] = _parse_entry(spec, base, data_len, where=f"{where}: tensor {key!r}")
    cursor = base
    for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if entry.start != cursor:
            raise CorruptCheckpointError(
                f"{where}: tensor {key!r} starts at {entry.start - base}, expected {cursor - base} (gap or overlap)"
            )
        cursor = entry.end
    if cursor != file_size:
        raise CorruptCheckpointError(f"{where}: tensor data ends at {cursor} but the file has {file_size} bytes")
    return bytes(prefix + raw), entries


def _parse_entry(spec: object, base: int, data_len: int, *, where: str) -> HeaderEntry:
    if not isinstance(spec, dict):
        raise CorruptCheckpointError(f"{where}: entry is not an object")
    st_dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(st_dtype, str) or st_dtype not in _ITEMSIZE:
        raise CorruptCheckpointError(f"{where}: unsupported dtype {st_dtype!r}")
    if not valid_shape(shape):
        raise CorruptCheckpointError(f"{where}: invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise CorruptCheckpointError(
            f"{where}: data_offsets {offsets!r} out of range (data region is {data_len} bytes)"
        )
    numel = 1
    for dim in shape:
        numel *= dim
    if numel * _ITEMSIZE[st_dtype] != offsets[1] - offsets[0]:
        raise CorruptCheckpointError(
            f"{where}: shape {shape} of {st_dtype} needs {numel * _ITEMSIZE[st_dtype]} bytes, "
            f"offsets give {offsets[1] - offsets[0]}"
        )
    return HeaderEntry(st_dtype, tuple(shape), base + offsets[0], base + offsets[1])


def stored_as(dtype: torch.dtype, shape: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    """The safetensors (dtype, shape) a tensor of ``dtype``/``shape`` is stored under."""
    st = SAFETENSORS_DTYPES.get(dtype)
    if st is not None:
        return st, tuple(shape)
    numel = 1
    for dim in shape:
        numel *= dim
    return "U8", (numel * dtype.itemsize,)
