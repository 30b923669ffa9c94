"""The codecs of torch and numpy values (tensors, numpy arrays and scalars, ``torch.Size``/``dtype``/``device``).

Registered into `trainstate.format.codec` when this module is first imported: by every `Encoder`,
and by a `Decoder` that meets one of these tags, so plain manifest values decode without torch.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from trainstate.errors import UnsupportedValueError
from trainstate.format.codec import TAG, Codec, Decoder, Encoder, Path, _b64, _b64encode, format_path, register
from trainstate.format.dtypes import numpy_dtype
from trainstate.format.header import MAX_NDIM
from trainstate.format.tensorfile import dtype_from_name, dtype_name

__all__ = ["unwrap_module"]


def _encode_tensor(value: torch.Tensor, path: Path, enc: Encoder) -> dict[str, Any]:
    if value.is_sparse or value.layout != torch.strided:
        raise UnsupportedValueError(
            f"{enc.where}{format_path(path)}: {value.layout} tensors are not supported; call .to_dense()"
        )
    if value.is_nested:
        raise UnsupportedValueError(
            f"{enc.where}{format_path(path)}: nested tensors are not supported; save tensor.unbind() (a list) instead"
        )
    if isinstance(value, UninitializedTensorMixin):
        raise UnsupportedValueError(
            f"{enc.where}{format_path(path)}: uninitialized lazy parameter (LazyLinear...); "
            "run one forward pass before saving so it has a shape"
        )
    if value.is_quantized or value.device.type == "meta":
        raise UnsupportedValueError(
            f"{enc.where}{format_path(path)}: {'quantized' if value.is_quantized else 'meta'} tensors cannot be saved"
        )
    if value.dim() > MAX_NDIM:
        raise UnsupportedValueError(
            f"{enc.where}{format_path(path)}: {value.dim()} dimensions; at most {MAX_NDIM} are supported"
        )
    ref = enc.tensor(value, path)
    if isinstance(value, torch.nn.Parameter):
        return {**ref, "param": True, "requires_grad": value.requires_grad}
    if value.requires_grad:
        return {**ref, "requires_grad": True}
    return ref


def _encode_ndarray(value: np.ndarray, path: Path, enc: Encoder) -> dict[str, Any]:
    if type(value) is not np.ndarray and not isinstance(value, np.memmap):
        # A subclass carries more than its data (a masked array's mask, np.matrix's semantics).
        raise UnsupportedValueError(
            f"{enc.where}{format_path(path)}: numpy {type(value).__module__}.{type(value).__qualname__} is not "
            "supported (it would load as a plain ndarray); save its parts (e.g. .data and .mask) as arrays"
        )
    if value.dtype.hasobject or value.dtype.fields is not None or value.dtype.kind not in "biufc":
        raise UnsupportedValueError(
            f"{enc.where}{format_path(path)}: numpy arrays of dtype {value.dtype} are not supported"
        )
    array = np.asarray(value) if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d arrays 0-d
    node: dict[str, Any] = {"np_dtype": value.dtype.str}
    if not value.dtype.isnative:
        # Stored as raw bytes so that decoding is a zero-copy view (tensors are filled after decoding).
        array, node["np_shape"] = array.reshape(-1).view(np.uint8), list(value.shape)
    try:
        with warnings.catch_warnings():  # a read-only array is only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(array)
    except TypeError:
        raise UnsupportedValueError(
            f"{enc.where}{format_path(path)}: numpy dtype {value.dtype} has no torch equivalent"
        ) from None
    return {**enc.tensor(tensor, path), TAG: "ndarray", **node}


def _decode_ndarray(node: dict[str, Any], path: Path, dec: Decoder) -> np.ndarray | torch.Tensor:
    dtype = numpy_dtype(node["np_dtype"])
    if dtype.hasobject or dtype.kind not in "biufc":
        raise ValueError(f"numpy dtype {dtype} is not allowed")
    tensor = dec.tensor(node, path)
    if tensor.is_meta:  # map_location="meta" (peek): shape and dtype only, there is no data to view
        return tensor
    array = tensor.cpu().numpy()  # not filled yet: only zero-copy views from here
    if "np_shape" in node:
        return array.view(dtype).reshape([int(d) for d in node["np_shape"]])
    if array.dtype != dtype:
        raise ValueError(f"stored dtype {array.dtype} does not match {dtype}")
    return array


def unwrap_module(value: Any) -> Any:
    """The module inside ``torch.compile`` (``_orig_mod``), ``DistributedDataParallel`` and
    ``DataParallel`` (``module``) wrappers, else ``value``: a checkpoint must not depend on how the
    model happened to be wrapped (their state dict keys carry ``_orig_mod.`` / ``module.``)."""
    while isinstance(value, torch.nn.Module):
        if type(value).__name__ == "OptimizedModule":
            inner = getattr(value, "_orig_mod", None)
        elif isinstance(value, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            inner = getattr(value, "module", None)
        else:
            return value
        if not isinstance(inner, torch.nn.Module):
            return value
        value = inner
    return value


def _decode_device(node: dict[str, Any], path: Path, dec: Decoder) -> torch.device:
    if not isinstance(node["v"], str) or len(node["v"]) > 64:
        raise ValueError("device must be a short string")
    try:
        return torch.device(node["v"])
    except RuntimeError:
        raise ValueError(f"invalid device {node['v']!r}") from None


def _decode_size(node: dict[str, Any]) -> torch.Size:
    dims = node["v"]
    if not isinstance(dims, list) or not all(type(x) is int and -(2**63) <= x < 2**63 for x in dims):
        raise ValueError("a size is a list of 64-bit integers")  # torch.Size takes more, then cannot print it
    return torch.Size(dims)


def _encode_npscalar(value: np.generic, path: Path, enc: Encoder) -> dict[str, Any]:
    if value.dtype.kind not in "biufc":
        raise UnsupportedValueError(
            f"{enc.where}{format_path(path)}: numpy scalars of dtype {value.dtype} are not supported"
        )
    return {TAG: "npscalar", "dtype": value.dtype.str, "v": _b64encode(value.tobytes())}


def _decode_npscalar(node: dict[str, Any], path: Path, dec: Decoder) -> np.generic:
    dtype = numpy_dtype(node["dtype"])
    if dtype.kind not in "biufc":
        raise ValueError(f"numpy dtype {dtype} is not allowed")
    return np.frombuffer(_b64(node), dtype=dtype, count=1)[0]


_CODECS = [
    Codec("npscalar", (np.generic,), _encode_npscalar, _decode_npscalar),
    Codec(
        "size",
        (torch.Size,),
        lambda v, p, e: {TAG: "size", "v": list(v)},
        lambda n, p, d: _decode_size(n),
    ),
    Codec(
        "dtype",
        (torch.dtype,),
        lambda v, p, e: {TAG: "dtype", "v": dtype_name(v)},
        lambda n, p, d: dtype_from_name(n["v"], where=f"{d.where}: {format_path(p)}"),
    ),
    Codec("device", (torch.device,), lambda v, p, e: {TAG: "device", "v": str(v)}, _decode_device),
    Codec("tensor", (torch.Tensor, torch.nn.Parameter), _encode_tensor, lambda n, p, d: d.tensor(n, p)),
    Codec("ndarray", (np.ndarray,), _encode_ndarray, _decode_ndarray),
]


for _codec in _CODECS:
    register(_codec, subclasses=_codec.tag in ("tensor", "ndarray", "npscalar"))
