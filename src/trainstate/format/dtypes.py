"""Tensor dtype names as the manifest writes them, their sizes and safetensors codes, without torch.

``trainstate ls``/``inspect``/``verify`` describe tensors from the manifest alone; importing torch
for a name-to-size table would cost them more than everything else they do. The table below is
checked against the installed torch by the tests; a name it lacks (a dtype newer torch added) is
looked up in torch itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainstate.errors import CorruptCheckpointError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DtypeInfo",
    "SAFETENSORS_CODES",
    "SAFETENSORS_ITEMSIZE",
    "dtype_info",
    "numpy_dtype",
    "numpy_dtype_info",
    "stored_as_name",
]


@dataclass(frozen=True)
class DtypeInfo:
    """A torch dtype by name: its canonical name (``float32``), bytes per element, safetensors code."""

    name: str
    itemsize: int
    safetensors: str | None  # None: stored as raw ``U8`` bytes (safetensors has no such dtype)


SAFETENSORS_CODES: dict[str, str] = {  # canonical torch dtype name -> safetensors dtype
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
SAFETENSORS_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "C64": 8, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
}  # fmt: skip

# Every dtype attribute of torch 2.13 (aliases included, as `dtype_from_name` accepts them):
# name -> (canonical name, itemsize). Sub-byte dtypes take one byte per element in torch.
_ITEMSIZE_BY_CANONICAL = {
    **{name: SAFETENSORS_ITEMSIZE[code] for name, code in SAFETENSORS_CODES.items()},
    "complex128": 16, "complex32": 4, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1, "bits8": 1, "bits16": 2,
    "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "qint8": 1, "qint32": 4, "quint8": 1, "quint2x4": 1, "quint4x2": 1,
    **{f"int{n}": 1 for n in range(1, 8)}, **{f"uint{n}": 1 for n in range(1, 8)},
}  # fmt: skip
_ALIASES = {
    "bit": "uint1", "cdouble": "complex128", "cfloat": "complex64", "chalf": "complex32", "double": "float64",
    "float": "float32", "half": "float16", "int": "int32", "long": "int64", "short": "int16",
}  # fmt: skip
_KNOWN: dict[str, DtypeInfo] = {
    name: DtypeInfo(canonical, _ITEMSIZE_BY_CANONICAL[canonical], SAFETENSORS_CODES.get(canonical))
    for name, canonical in {**{n: n for n in _ITEMSIZE_BY_CANONICAL}, **_ALIASES}.items()
}


def dtype_info(name: object, *, where: str) -> DtypeInfo:
    """The dtype called ``name`` (a name of a real ``torch.dtype``); CorruptCheckpointError otherwise."""
    if isinstance(name, str):
        known = _KNOWN.get(name)
        if known is not None:
            return known
        if name.isidentifier() and not name.startswith("_"):  # newer than this table: ask torch
            from trainstate.format.tensorfile import dtype_from_name, dtype_name

            dtype = dtype_from_name(name, where=where)
            canonical = dtype_name(dtype)
            return DtypeInfo(canonical, dtype.itemsize, SAFETENSORS_CODES.get(canonical))
    raise CorruptCheckpointError(f"{where}: unknown dtype {name!r}")


def stored_as_name(info: DtypeInfo, shape: Sequence[int]) -> tuple[str, tuple[int, ...]]:
    """The safetensors (dtype, shape) a tensor of this dtype and ``shape`` is stored under."""
    if info.safetensors is not None:
        return info.safetensors, tuple(shape)
    numel = 1
    for dim in shape:
        numel *= dim
    return "U8", (numel * info.itemsize,)


_NUMPY_DTYPE = re.compile(r"[<>|=][biufc][0-9]{1,2}")


def numpy_dtype(text: object) -> np.dtype:
    """Only the plain dtype strings the encoder writes (``<f8``, ``|b1``...): ``np.dtype`` would
    otherwise parse arbitrary text, with Python's compiler, for structured dtypes."""
    if not isinstance(text, str) or not _NUMPY_DTYPE.fullmatch(text):
        raise ValueError(f"invalid numpy dtype {text!r}")
    import numpy as np

    return np.dtype(text)


_NUMPY_KINDS = {"b": "bool", "i": "int", "u": "uint", "f": "float", "c": "complex"}


def numpy_dtype_info(text: object) -> DtypeInfo:
    """`numpy_dtype`'s name (``float64``, ``bool``) and size, without importing numpy."""
    if not isinstance(text, str) or not _NUMPY_DTYPE.fullmatch(text):
        raise ValueError(f"invalid numpy dtype {text!r}")
    kind, size = text[1], int(text[2:])
    return DtypeInfo(_NUMPY_KINDS[kind] + ("" if kind == "b" else str(8 * size)), size, None)
