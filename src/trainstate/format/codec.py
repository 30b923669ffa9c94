"""The value codec: nested Python/torch/numpy values <-> the JSON tree stored in the manifest.

Plain JSON values stand for themselves (str, bool, None, finite floats, ints below 2**53, lists);
everything else is an object tagged by ``"@"``. Each tag has one `Codec` in a registry, so adding
a type is adding an entry, not another branch. Tensors are not embedded: the encoder hands them to
a `TensorSink` and stores a reference; the decoder asks a `TensorSource` for them.
"""

from __future__ import annotations

import base64
import math
import pickle
import re
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from trainstate.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError, UnsupportedValueError
from trainstate.format.tree import TAG, Path, dict_entries, format_path

if TYPE_CHECKING:
    import torch

__all__ = [
    "TAG",
    "Codec",
    "Decoder",
    "StateSnapshot",
    "Encoder",
    "TensorSink",
    "TensorSource",
    "format_path",
    "is_plain_str",
    "is_stateful",
    "qualified_type",
]

MAX_DEPTH = 100
_SAFE_INT = 2**53


def is_stateful(value: object) -> bool:
    """Whether ``value`` is a live object saved through ``state_dict()``/``load_state_dict()``."""
    return (
        not isinstance(value, (dict, type))
        and _by_isinstance(value) is None  # a tensor subclass with a state_dict is still a tensor
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


class TensorSink(Protocol):
    def add(self, path: Path, tensor: torch.Tensor) -> dict[str, Any]: ...


class TensorSource(Protocol):
    def get(self, ref: dict[str, Any], path: Path) -> torch.Tensor: ...


@dataclass
class Encoder:
    """Encodes one value tree; ``sink`` receives tensors (None forbids them, e.g. in metadata)."""

    sink: TensorSink | None
    allow_pickle: bool = False
    where: str = ""
    _depth: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        _torch_codecs()  # values to encode may be torch objects: their codecs must be registered

    def encode(self, value: Any, path: Path = ()) -> Any:
        if self._depth >= MAX_DEPTH:
            raise UnsupportedValueError(f"{self.where}{format_path(path)}: nested deeper than {MAX_DEPTH} levels")
        self._depth += 1
        try:
            return self._encode(value, path)
        finally:
            self._depth -= 1

    def _encode(self, value: Any, path: Path) -> Any:
        kind = type(value)
        if kind is str:
            return _encode_str(value)
        if kind is bool or value is None:
            return value
        codec = _BY_TYPE.get(kind) or _by_isinstance(value)
        if codec is None and is_stateful(value):
            codec = _BY_TAG["stateful"]
        if codec is None:
            if self.allow_pickle:
                return {TAG: "pickle", "v": base64.b64encode(pickle.dumps(value)).decode()}
            raise UnsupportedValueError(
                f"{self.where}{format_path(path)}: cannot save a value of type {kind.__module__}.{kind.__qualname__} "
                "without pickle; convert it to a supported type, give it state_dict()/load_state_dict(), "
                "or pass allow_pickle=True"
            )
        return codec.encode(value, path, self)

    def tensor(self, tensor: torch.Tensor, path: Path) -> dict[str, Any]:
        if self.sink is None:
            raise UnsupportedValueError(
                f"{self.where}{format_path(path)}: tensors are not allowed here (metadata is JSON only)"
            )
        return self.sink.add(path, tensor)


@dataclass
class Decoder:
    """Decodes a JSON tree; ``source`` provides tensors referenced from it."""

    source: TensorSource | None
    allow_pickle: bool = False
    where: str = ""
    _depth: int = field(default=0, init=False, repr=False)

    def decode(self, node: Any, path: Path = ()) -> Any:
        # Real nesting depth, not the path length: dict keys and live-object wrappers nest too.
        if self._depth >= MAX_DEPTH:
            raise CorruptCheckpointError(f"{self.where}: {format_path(path)}: nested deeper than {MAX_DEPTH} levels")
        self._depth += 1
        try:
            return self._decode(node, path)
        except _SourceError as wrapped:
            if self._depth > 1:
                raise
            raise wrapped.error from None  # the original, with its own traceback
        finally:
            self._depth -= 1

    def _decode(self, node: Any, path: Path) -> Any:
        if isinstance(node, list):
            return [self.decode(item, (*path, i)) for i, item in enumerate(node)]
        if not isinstance(node, dict):
            return node
        tag = node.get(TAG)
        if not isinstance(tag, str):
            raise CorruptCheckpointError(f"{self.where}: {format_path(path)}: unknown value tag {tag!r}")
        codec = _BY_TAG.get(tag)
        if codec is None and tag in TORCH_TAGS:  # the first torch value this process decodes
            _torch_codecs()
            codec = _BY_TAG.get(tag)
        if codec is None:
            raise CorruptCheckpointError(f"{self.where}: {format_path(path)}: unknown value tag {tag!r}")
        try:
            return codec.decode(node, path, self)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError, IndexError, AttributeError, RuntimeError) as exc:
            raise CorruptCheckpointError(
                f"{self.where}: {format_path(path)}: malformed {tag!r} value ({exc})"
            ) from None

    def tensor(self, node: dict[str, Any], path: Path) -> torch.Tensor:
        if self.source is None:
            raise CorruptCheckpointError(f"{self.where}: {format_path(path)}: tensor reference where none is allowed")
        try:
            return self.source.get(node, path)
        except CheckpointError:
            raise
        except Exception as exc:
            # Not about the checkpoint's bytes (out of memory, a map_location that raises, a device
            # that is not here): it must reach the caller as it is, never pass for corruption.
            raise _SourceError(exc) from None


class _SourceError(Exception):
    """Carries an error of the tensor source through the decoder's malformed-value handling."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class Codec:
    """One tagged value kind: which Python types it takes and how they map to JSON."""

    tag: str
    types: tuple[type, ...]
    encode: Callable[[Any, Path, Encoder], Any]
    decode: Callable[[dict[str, Any], Path, Decoder], Any]


def is_plain_str(text: str) -> bool:
    """Whether ``text`` is valid Unicode for JSON (no lone surrogates, as ``os.listdir`` can return)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _encode_str(text: str) -> Any:
    return text if is_plain_str(text) else {TAG: "str", "v": _b64encode(text.encode("utf-8", "surrogatepass"))}


def _decode_str(node: dict[str, Any], path: Path, dec: Decoder) -> str:
    return _b64(node).decode("utf-8", "surrogatepass")


def _key(key: Any, path: Path, enc: Encoder) -> Any:
    codec = _by_isinstance(key)
    if codec is not None and codec.tag in ("tensor", "ndarray"):
        raise UnsupportedValueError(
            f"{enc.where}{format_path(path)}: dict key of type {type(key).__name__} is not supported"
        )
    return enc.encode(key, path)


def _encode_dict(value: dict[Any, Any], path: Path, enc: Encoder) -> dict[str, Any]:
    tag = "odict" if type(value) is OrderedDict else "dict"
    if all(type(k) is str and is_plain_str(k) for k in value):
        node = {TAG: tag, "v": {k: enc.encode(v, (*path, k)) for k, v in value.items()}}
    else:
        node = {TAG: tag, "items": [[_key(k, path, enc), enc.encode(v, (*path, k))] for k, v in value.items()]}
    # nn.Module state dicts carry per-module versions in `_metadata`; load_state_dict reads them.
    extra = getattr(value, "_metadata", None)
    if tag == "odict" and isinstance(extra, dict):
        node["meta"] = enc.encode(extra, (*path, "_metadata"))
    return node


def _decode_dict(node: dict[str, Any], path: Path, dec: Decoder) -> dict[Any, Any]:
    out: dict[Any, Any] = OrderedDict() if node[TAG] == "odict" else {}
    keyed = "v" in node  # string keys as they are; else encoded keys, decoded here
    for key_node, value_node in dict_entries(node, where=dec.where, path=path):
        k = key_node if keyed else dec.decode(key_node, path)
        hash(k)
        out[k] = dec.decode(value_node, (*path, k))
    if "meta" in node and isinstance(out, OrderedDict):
        out._metadata = dec.decode(node["meta"], (*path, "_metadata"))  # type: ignore[attr-defined]
    return out


def _encode_int(value: int, path: Path, enc: Encoder) -> Any:
    # Hexadecimal: Python limits decimal conversion to 4300 digits, power-of-two bases have no limit.
    return value if -_SAFE_INT < value < _SAFE_INT else {TAG: "int", "v": hex(value)}


_CANONICAL_NAN = struct.pack("<d", math.nan)


def _encode_float(value: float, path: Path, enc: Encoder) -> Any:
    if math.isfinite(value):
        return value
    node = {TAG: "float", "v": repr(value)}
    bits = struct.pack("<d", value)
    if math.isnan(value) and bits != _CANONICAL_NAN:  # a NaN's sign and payload are data too
        node["bits"] = bits.hex()
    return node


def _decode_float(node: dict[str, Any], path: Path, dec: Decoder) -> float:
    if node["v"] not in ("nan", "inf", "-inf"):
        raise ValueError(f"not a non-finite float: {node['v']!r}")
    if "bits" not in node:
        return float(node["v"])
    bits = bytes.fromhex(node["bits"])
    (value,) = struct.unpack("<d", bits)
    if node["v"] != "nan" or not math.isnan(value):
        raise ValueError("bits must encode a NaN")
    return float(value)


_HEX_INT = re.compile(r"-?0x[0-9a-f]+")
_DECIMAL_INT = re.compile(r"-?[0-9]{1,4300}")  # format 1 wrote decimal; int() parses up to 4300 digits


def _decode_big_int(node: dict[str, Any], path: Path, dec: Decoder) -> int:
    text = node["v"]
    if isinstance(text, str) and _HEX_INT.fullmatch(text):
        return int(text, 16)
    if isinstance(text, str) and _DECIMAL_INT.fullmatch(text):
        return int(text)
    raise ValueError("int must be a hexadecimal or decimal string")


def _b64(node: dict[str, Any]) -> bytes:
    return base64.b64decode(node["v"], validate=True)


def _decode_pickle(node: dict[str, Any], path: Path, dec: Decoder) -> Any:
    if not dec.allow_pickle:
        raise UnsafeCheckpointError(
            f"{dec.where}: {format_path(path)}: value was saved with pickle; "
            "pass allow_pickle=True only if you trust this file"
        )
    return pickle.loads(_b64(node))  # noqa: S301 - explicit opt-in above


class StateSnapshot:
    """A live object's state dict taken at one moment (an async capture, a distributed state dict),
    saved exactly like the object itself: `qualified_type` records the original's type."""

    def __init__(self, type_name: str, state: Any) -> None:
        self.stateful_type = type_name
        self._state = state

    def state_dict(self) -> Any:
        return self._state

    def load_state_dict(self, state: Any) -> None:  # pragma: no cover - never restored into
        raise TypeError("a state snapshot cannot be restored into")


def _encode_stateful(value: Any, path: Path, enc: Encoder) -> dict[str, Any]:
    from trainstate.format.torch_codecs import unwrap_module  # a module saved through its wrapper

    value = unwrap_module(value)
    return {TAG: "stateful", "type": qualified_type(value), "v": enc.encode(value.state_dict(), path)}


def qualified_type(value: Any) -> str:
    """The recorded type name of a live object (a snapshot may carry its original's)."""
    name = getattr(value, "stateful_type", None)
    if isinstance(name, str):
        return name
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


_CODECS = [
    Codec("dict", (dict, OrderedDict), _encode_dict, _decode_dict),
    Codec("odict", (), _encode_dict, _decode_dict),
    Codec(
        "tuple",
        (tuple,),
        lambda v, p, e: {TAG: "tuple", "v": [e.encode(x, (*p, i)) for i, x in enumerate(v)]},
        lambda n, p, d: (
            tuple(d.decode(x, (*p, i)) for i, x in enumerate(n["v"])) if isinstance(n["v"], list) else _malformed()
        ),
    ),
    Codec(
        "list", (list,), lambda v, p, e: [e.encode(x, (*p, i)) for i, x in enumerate(v)], lambda n, p, d: _malformed()
    ),
    Codec("str", (), lambda v, p, e: _encode_str(v), _decode_str),
    Codec("int", (int,), _encode_int, _decode_big_int),
    Codec("float", (float,), _encode_float, _decode_float),
    Codec("bytes", (bytes,), lambda v, p, e: {TAG: "bytes", "v": _b64encode(v)}, lambda n, p, d: _b64(n)),
    Codec("stateful", (), _encode_stateful, lambda n, p, d: d.decode(n["v"], p)),
    Codec("pickle", (), lambda v, p, e: None, _decode_pickle),
]


def _malformed() -> Any:
    raise TypeError("malformed value")


TORCH_TAGS = frozenset({"size", "dtype", "device", "tensor", "ndarray", "npscalar"})
"""Tags whose codecs need torch or numpy (`trainstate.format.torch_codecs`): registered on first use, so that
reading a manifest's plain values (``trainstate ls``) never imports torch."""

_BY_TYPE: dict[type, Codec] = {}
_BY_TAG: dict[str, Codec] = {}
_BY_BASE: list[tuple[type, Codec]] = []  # accepted with their subclasses: tensors, numpy arrays and scalars


def register(codec: Codec, *, subclasses: bool = False) -> None:
    """Add (or replace) the codec of ``codec.tag``; with ``subclasses`` it also takes subclasses of its types."""
    _BY_TYPE.update(dict.fromkeys(codec.types, codec))
    if codec.tag != "list":  # a JSON list stands for itself; the codec only encodes
        _BY_TAG[codec.tag] = codec
    if subclasses:
        _BY_BASE.extend((kind, codec) for kind in codec.types)


def _torch_codecs() -> None:
    import trainstate.format.torch_codecs  # noqa: F401 - registers its codecs when first imported


def _by_isinstance(value: object) -> Codec | None:
    """The codec of a subclass we accept: tensor subclasses (Parameter, buffers), numpy scalars/arrays."""
    for kind, codec in _BY_BASE:
        if isinstance(value, kind):
            return codec
    return None


for _codec in _CODECS:
    register(_codec)
