"""The safetensors file header: read and validated completely before anything is allocated (no torch).

Checks the size cap, dtypes, shapes and that the offsets cover the data region exactly, without
gaps or overlaps, so that a hostile file cannot make a reader allocate or read beyond its bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TypeGuard

from trainstate.errors import CorruptCheckpointError
from trainstate.format.dtypes import SAFETENSORS_ITEMSIZE as _ITEMSIZE
from trainstate.storage.base import ReadableFile

__all__ = ["MAX_HEADER_BYTES", "MAX_NDIM", "HeaderEntry", "read_exact_into", "read_header", "valid_shape"]

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_NDIM = 1024
"""Most dimensions a tensor may have; `save` refuses more, and readers enforce the same limit."""
_INT64_MAX = 2**63 - 1


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
