"""Round-trip campaign: every value ``save`` accepts comes back from ``load`` equal, with the same types."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import trainstate
from support import tensor_bytes
from trainstate import CheckpointError

# ------------------------------------------------------------------------------------ the property


def check_roundtrip(state: dict[str, Any], directory: str, *, refusal_names: str | None = None) -> str:
    """Save ``state`` and load it back; returns ``"saved"`` or ``"refused"``.

    Fails on: a non-CheckpointError from save, a refusal whose message does not name the key path
    (``refusal_names``, or else a top-level key of ``state`` as a path token), a load that raises
    (write-only checkpoint) or returns anything not `assert_same_value` to ``state``.
    """
    path = os.path.join(directory, "ckpt")
    try:
        trainstate.save(path, state)
    except CheckpointError as exc:
        message = str(exc)
        for location in (path, os.path.realpath(path), directory, os.path.realpath(directory)):
            message = message.replace(location, "<ckpt>")
        if refusal_names is not None:
            assert refusal_names in message, f"refusal does not name the key path {refusal_names!r}: {exc}"
        else:
            assert any(_names_key(message, key) for key in state), f"refusal does not name a key path: {exc}"
        return "refused"
    except Exception as exc:
        raise AssertionError(f"save raised {type(exc).__name__}, not a CheckpointError: {exc}") from exc
    try:
        loaded = trainstate.load(path)
    except Exception as exc:
        raise AssertionError(f"write-only checkpoint: save succeeded, load raised {type(exc).__name__}: {exc}") from exc
    assert_same_value(state, loaded)
    return "saved"


def _names_key(message: str, key: str) -> bool:
    """Whether ``key`` appears in ``message`` as a path token (``v``, ``v.a.0``), not inside a word."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?=[.:'\"\s,)\]]|$)", message) is not None


def assert_same_value(original: Any, loaded: Any) -> None:
    """Deep, type-exact equality; a tensor object that occurs twice must load as one object twice."""
    _Compare().same(original, loaded, "<state>")


class _Compare:
    def __init__(self) -> None:
        self.tensors: dict[int, torch.Tensor] = {}  # id(original tensor) -> the loaded one

    def same(self, a: Any, b: Any, where: str) -> None:
        assert type(b) is type(a), f"{where}: type {type(a).__name__} came back as {type(b).__name__}"
        if isinstance(a, torch.Tensor):
            self._tensor(a, b, where)
        elif isinstance(a, np.ndarray):
            _ndarray(a, b, where)
        elif isinstance(a, np.generic):
            assert b.dtype.str == a.dtype.str, f"{where}: numpy scalar dtype {a.dtype.str} -> {b.dtype.str}"
            assert b.tobytes() == a.tobytes(), f"{where}: numpy scalar {a!r} came back as {b!r}"
        elif isinstance(a, dict):
            assert len(b) == len(a), f"{where}: {len(a)} keys came back as {len(b)}"
            for i, (ka, kb) in enumerate(zip(a, b, strict=True)):
                self.same(ka, kb, f"{where}<key {i}>")
            for ka, kb in zip(a, b, strict=True):
                self.same(a[ka], b[kb], f"{where}[{ka!r}]")
        elif isinstance(a, (list, tuple)):  # torch.Size too (type checked above)
            assert len(b) == len(a), f"{where}: length {len(a)} came back as {len(b)}"
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                self.same(x, y, f"{where}[{i}]")
        elif isinstance(a, float):
            assert struct.pack("<d", b) == struct.pack("<d", a), f"{where}: float {_bits(a)} came back as {_bits(b)}"
        elif isinstance(a, torch.dtype):
            assert b is a, f"{where}: {a} came back as {b}"
        elif a is None or isinstance(a, (bool, int, str, bytes, torch.device)):
            assert b == a, f"{where}: {_short(a)} came back as {_short(b)}"
        else:
            raise AssertionError(f"{where}: no comparison for {type(a).__name__} (extend the test)")

    def _tensor(self, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
        if id(a) in self.tensors:
            assert b is self.tensors[id(a)], f"{where}: one tensor object twice in the state came back as two"
            return
        self.tensors[id(a)] = b
        assert b.layout == torch.strided, f"{where}: layout {b.layout}"
        assert b.dtype == a.dtype, f"{where}: dtype {a.dtype} came back as {b.dtype}"
        assert b.shape == a.shape, f"{where}: shape {list(a.shape)} came back as {list(b.shape)}"
        assert b.device == a.device, f"{where}: device {a.device} came back as {b.device}"
        assert b.requires_grad == a.requires_grad, f"{where}: requires_grad {a.requires_grad} -> {b.requires_grad}"
        assert torch.equal(tensor_bytes(b), tensor_bytes(a)), f"{where}: tensor values differ"


def _ndarray(a: np.ndarray, b: np.ndarray, where: str) -> None:
    assert b.dtype == a.dtype and b.dtype.str == a.dtype.str, f"{where}: dtype {a.dtype.str} -> {b.dtype.str}"
    assert b.shape == a.shape, f"{where}: shape {a.shape} came back as {b.shape}"
    if isinstance(a, np.ma.MaskedArray):
        assert np.ma.getmaskarray(b).tobytes() == np.ma.getmaskarray(a).tobytes(), f"{where}: mask differs"
        assert np.ma.getdata(b).tobytes() == np.ma.getdata(a).tobytes(), f"{where}: masked array data differs"
        assert np.asarray(b.fill_value).tobytes() == np.asarray(a.fill_value).tobytes(), f"{where}: fill_value"
    else:
        assert b.tobytes() == a.tobytes(), f"{where}: array values differ"


def _bits(x: float) -> str:
    return f"{x!r}(0x{struct.unpack('<Q', struct.pack('<d', x))[0]:016x})"


def _short(x: Any) -> str:
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 1000:
        return f"<int of {x.bit_length()} bits>"  # repr of > 4300 digits raises
    text = repr(x)
    return text if len(text) <= 80 else f"{text[:60]}...<{len(text)} chars>"


def _float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<Q", bits))[0])


def roundtrip(state: dict[str, Any], **kwargs: Any) -> str:
    with tempfile.TemporaryDirectory() as directory:
        return check_roundtrip(state, directory, **kwargs)


# ------------------------------------------------------------------------------------ value families

TORCH_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
# torch implements _neg_view().resolve_neg() (neg_cpu) only for these.
NEG_DTYPES = frozenset(TORCH_DTYPES) - {torch.uint16, torch.uint32, torch.uint64, torch.bool}
NEG_DTYPES -= {torch.float8_e4m3fn, torch.float8_e5m2}
NUMPY_DTYPES = ["|b1", "|i1", "|u1"] + [f"{o}{k}{n}" for k, n in [("i", 2), ("i", 4), ("i", 8)] for o in "<>"]
NUMPY_DTYPES += [f"{o}{k}{n}" for k, n in [("u", 2), ("u", 4), ("u", 8), ("f", 2), ("f", 4), ("f", 8)] for o in "<>"]
NUMPY_DTYPES += [f"{o}c{n}" for n in (8, 16) for o in "<>"]
NAN_PAYLOAD = _float(0x7FF8000000000001)
SPECIAL_FLOATS = [
    0.0,
    -0.0,
    math.inf,
    -math.inf,
    math.nan,
    -math.nan,
    NAN_PAYLOAD,
    _float(0xFFF8000000000001),  # negative NaN with a payload
    _float(0x7FF0000000000001),  # signalling NaN
    5e-324,
    1.7976931348623157e308,
    0.1,
]
BOUNDARY_INTS = [0, -1, 2**53 - 1, 2**53, 2**53 + 1, -(2**53), -(2**53) - 1, 2**63 - 1, 2**63, 2**64, -(2**64)]
ODD_STRINGS = ["", "\udcff", "\ud800", "a\udcffb", "\x00", "é", "\U0001f600", "__metadata__", "a.b", "x#1", "#1", "@"]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    if dtype == torch.bool:
        data = bytes(b & 1 for b in data)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape).clone()


def _pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic bytes covering every value (0x7f.., 0xff.. give NaN/inf patterns)."""
    return bytes((i * 167 + seed * 31 + 11) % 256 for i in range(n))


def _array(dtype: str, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    kind = np.dtype(dtype)
    if kind.kind == "b":
        data = bytes(b & 1 for b in data)
    return np.frombuffer(data, dtype=kind).reshape(shape).copy()


def _big_int(digits: int, negative: bool, low: int = 0) -> int:
    value = 10 ** (digits - 1) + low  # built arithmetically: str -> int is capped at 4300 digits
    return -value if negative else value


# ------------------------------------------------------------------------------------ strategies
# Non-JSON leaves are drawn as small specs (readable in hypothesis reports, no 5000-digit reprs) and
# built per example; `Ref`s point into a per-example pool of tensors so that one object can occur
# several times and views of it can occur beside it.


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: bytes
    kind: str  # plain | grad | param | frozen_param

    def build(self) -> torch.Tensor:
        t = _tensor(self.dtype, self.shape, self.data)
        differentiable = self.dtype.is_floating_point or self.dtype.is_complex
        if self.kind == "grad" and differentiable:
            return t.requires_grad_()
        if self.kind in ("param", "frozen_param"):
            return torch.nn.Parameter(t, requires_grad=self.kind == "param" and differentiable)
        return t


@dataclasses.dataclass(frozen=True)
class Ref:
    index: int
    view: str  # same | transpose | step | conj | neg | conj_of_neg


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    layout: str  # c | fortran | transpose | step | masked | matrix
    mask: tuple[bool, ...]

    def build(self) -> np.ndarray:
        a = _array(self.dtype, self.shape, self.data)
        if self.layout == "fortran":
            return np.asfortranarray(a)
        if self.layout == "transpose":
            return a.T
        if self.layout == "step" and a.ndim:
            return a[::2]
        if self.layout == "masked":
            return np.ma.masked_array(a, mask=np.array(self.mask, dtype=bool).reshape(a.shape))
        if self.layout == "matrix" and a.ndim == 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                return np.asmatrix(a)
        return a


@dataclasses.dataclass(frozen=True)
class ScalarSpec:
    dtype: str
    data: bytes

    def build(self) -> np.generic:
        return _array(self.dtype, (1,), self.data)[0]


@dataclasses.dataclass(frozen=True)
class BigInt:
    digits: int
    negative: bool
    low: int

    def build(self) -> int:
        return _big_int(self.digits, self.negative, self.low)


def _view(t: torch.Tensor, view: str) -> torch.Tensor:
    if view == "transpose" and t.ndim >= 2:
        return t.transpose(0, t.ndim - 1)
    if view == "step" and t.ndim >= 1:
        return t[::2]
    if view == "conj" and t.is_complex():
        return t.conj()
    if view == "neg" and t.dtype in NEG_DTYPES:
        return t._neg_view()
    if view == "conj_of_neg" and t.is_complex():
        return t._neg_view().conj()
    return t


def materialize(tree: Any, pool: list[torch.Tensor]) -> Any:
    if isinstance(tree, Ref):
        return _view(pool[tree.index % len(pool)], tree.view)
    if isinstance(tree, (TensorSpec, ArraySpec, ScalarSpec, BigInt)):
        return tree.build()
    if isinstance(tree, list):
        return [materialize(x, pool) for x in tree]
    if isinstance(tree, tuple):
        return tuple(materialize(x, pool) for x in tree)
    if isinstance(tree, dict):
        out = OrderedDict() if type(tree) is OrderedDict else {}
        for k, v in tree.items():
            out[k] = materialize(v, pool)
        return out
    return tree


DIMS = st.sampled_from([1, 2, 3, 0, 2, 3])  # some empty tensors, not most


def _raw(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


@st.composite
def tensor_specs(draw: st.DrawFn) -> TensorSpec:
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = tuple(draw(st.lists(DIMS, max_size=4)))
    data = draw(_raw(math.prod(shape) * dtype.itemsize))
    return TensorSpec(dtype, shape, data, draw(st.sampled_from(["plain", "plain", "grad", "param", "frozen_param"])))


@st.composite
def array_specs(draw: st.DrawFn) -> ArraySpec:
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    shape = tuple(draw(st.lists(DIMS, max_size=3)))
    numel = math.prod(shape)
    data = draw(_raw(numel * np.dtype(dtype).itemsize))
    layout = draw(st.sampled_from(["c", "c", "fortran", "transpose", "step", "masked", "matrix"]))
    mask = tuple(draw(st.lists(st.booleans(), min_size=numel, max_size=numel)))
    return ArraySpec(dtype, shape, data, layout, mask)


NATIVE_SCALARS = ["|b1", "|i1", "|u1", "<i2", "<i4", "<i8", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8", "<c8", "<c16"]
scalar_specs = st.sampled_from(NATIVE_SCALARS).flatmap(
    lambda d: _raw(np.dtype(d).itemsize).map(lambda data: ScalarSpec(d, data))
)
floats = st.one_of(st.floats(), st.sampled_from(SPECIAL_FLOATS), st.integers(0, 2**64 - 1).map(_float))
ints = st.one_of(
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(BOUNDARY_INTS),
    st.builds(BigInt, st.integers(4000, 5000), st.booleans(), st.integers(0, 10**6)),
)
texts = st.one_of(
    st.text(alphabet=st.one_of(st.characters(), st.sampled_from(["\udcff", "\ud800", "\udfff", ".", "#"])), max_size=8),
    st.sampled_from(ODD_STRINGS),
)
hashable_keys = st.one_of(texts, st.integers(-(2**64), 2**64), st.booleans(), st.none(), floats)
keys = st.one_of(hashable_keys, st.lists(hashable_keys, max_size=3).map(tuple))
refs = st.builds(
    Ref, st.integers(0, 3), st.sampled_from(["same", "same", "transpose", "step", "conj", "neg", "conj_of_neg"])
)
LEAF_GROUPS = [  # drawn group first (one_of would flatten them): tensors, arrays and plain values about equally often
    st.one_of(st.none(), st.booleans(), ints, floats, texts, st.binary(max_size=16)),
    refs,
    refs,
    st.one_of(array_specs(), scalar_specs),
    st.one_of(
        st.lists(st.integers(0, 4), max_size=3).map(torch.Size),
        st.sampled_from(TORCH_DTYPES),
        st.sampled_from([torch.device("cpu"), torch.device("cpu", 0)]),
    ),
]
leaves = st.integers(0, len(LEAF_GROUPS) - 1).flatmap(LEAF_GROUPS.__getitem__)


NESTERS: dict[str, Callable[[Any], Any]] = {
    "list": lambda x: [x],
    "tuple": lambda x: (x,),
    "dict": lambda x: {"k": x},
    "int_dict": lambda x: {7: x},
    "odict": lambda x: OrderedDict([("a.b", x)]),
}


def _nest(value: Any, kinds: list[str]) -> Any:
    for kind in kinds:
        value = NESTERS[kind](value)
    return value


def _extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(keys, children, max_size=4).map(OrderedDict),
        st.builds(_nest, children, st.lists(st.sampled_from(sorted(NESTERS)), min_size=5, max_size=7)),
    )


trees = st.recursive(leaves, _extend, max_leaves=12)


@settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    print_blob=True,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain phase: it re-runs failures at length
    report_multiple_bugs=False,  # shrink the first bug only, so a failing run stays short
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(pool_specs=st.lists(tensor_specs(), min_size=1, max_size=4), tree=trees)
def test_roundtrip_campaign(pool_specs: list[TensorSpec], tree: Any) -> None:
    pool = [spec.build() for spec in pool_specs]
    value = materialize(tree, pool)
    with tempfile.TemporaryDirectory() as directory:
        check_roundtrip({"v": value}, directory)


# ------------------------------------------------------------------------------------ pinned cases


def _case(value: Any, id: str) -> Any:
    return pytest.param(value, id=id)


@pytest.mark.parametrize(
    "value",
    [
        _case(None, "none"),
        _case(True, "true"),
        _case(False, "false"),
        *[_case(v, f"int_{v}") for v in BOUNDARY_INTS],
        _case(_big_int(4000, False), "int_4000_digits"),
        _case(_big_int(4000, True), "int_minus_4000_digits"),
        _case(_big_int(4001, False, 7), "int_4001_digits"),
        _case(_big_int(4300, False), "int_4300_digits"),
        _case(_big_int(4301, False), "int_4301_digits"),
        _case(_big_int(5000, True, 123), "int_minus_5000_digits"),
        *[_case(v, f"float_{_bits(v)}") for v in SPECIAL_FLOATS],
        *[_case(s, f"str_{s.encode('unicode_escape', 'backslashreplace').decode()}") for s in ODD_STRINGS],
        _case("x" * 100_000, "str_100k"),
        _case(b"", "bytes_empty"),
        _case(b"\x00\xff\x7f", "bytes_small"),
        _case(_pattern(3 << 20), "bytes_3mb"),
    ],
)
def test_python_scalars(value: Any) -> None:
    roundtrip({"v": value})


@pytest.mark.parametrize(
    "value",
    [
        _case((), "empty_tuple"),
        _case([], "empty_list"),
        _case({}, "empty_dict"),
        _case(OrderedDict(), "empty_odict"),
        _case((1, [2, (3,)], "x"), "tuple_list_nesting"),
        _case([1, (), [], {}], "list_of_empties"),
        _case(_nest(1.5, ["list", "dict", "tuple", "odict", "int_dict", "list", "tuple"]), "nested_7_levels"),
        _case(OrderedDict([("b", 1), ("a", 2)]), "odict_order"),
        _case({"b": 1, "a": 2}, "dict_order"),
        _case({3: "a", -1: "b", 2**70: "c"}, "int_keys"),
        _case({(1, "a"): 1, (): 2, ((1,), None): 3}, "tuple_keys"),
        _case({True: 1, False: 0}, "bool_keys"),
        _case({None: 1}, "none_key"),
        _case({0.5: 1, -0.0: 2, math.inf: 3, math.nan: 4}, "float_keys"),
        _case({1: "int", "1": "str", (1,): "tuple", None: "none", 2.5: "float"}, "mixed_keys"),
        _case(OrderedDict([(2, "b"), (1, "a")]), "odict_int_keys"),
        _case({s: i for i, s in enumerate(ODD_STRINGS)}, "odd_str_keys"),
        _case({"@": "tag", "v": [1], "items": 2, "__metadata__": {"format": "pt"}}, "codec_like_keys"),
        _case({"\udcff": {"\ud800": 1}}, "surrogate_keys"),
    ],
)
def test_containers(value: Any) -> None:
    roundtrip({"v": value})


@pytest.mark.parametrize("key", ["__metadata__", "a.b", "", "x#1", "@", "\udcff"])
def test_top_level_keys(key: str) -> None:
    """Top-level keys become tensor names in the safetensors header (``__metadata__`` is reserved there)."""
    roundtrip({key: torch.arange(3.0), "x": torch.ones(2), "n": 1})


def test_tensor_names_that_collide_after_formatting() -> None:
    value = {"a": {"b": torch.ones(2)}, "a.b": torch.zeros(2), "a.b#1": torch.full((2,), 2.0), "x#1": torch.ones(1)}
    roundtrip({"v": value, "v.a": torch.ones(3)})


SHAPES = [(), (0,), (2, 0, 3), (5,), (2, 3), (2, 1, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "0d")
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_tensor_dtypes_and_shapes(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _tensor(dtype, shape, _pattern(math.prod(shape) * dtype.itemsize, seed=len(shape)))
    roundtrip({"v": t, "w": [t.clone()]})


def _complex() -> torch.Tensor:
    return torch.tensor([1 + 2j, -3.5 - 0.5j, complex(0.0, -0.0)], dtype=torch.complex64)


def _real() -> torch.Tensor:
    return torch.tensor([1.0, -0.0, math.inf, NAN_PAYLOAD], dtype=torch.float64)


def _same_twice(t: Any) -> list[Any]:
    return [t, t]


def _channels_last() -> torch.Tensor:
    return torch.arange(18.0).reshape(1, 2, 3, 3).to(memory_format=torch.channels_last)


def _non_leaf() -> torch.Tensor:
    return torch.ones(3, requires_grad=True) * 2


def _linear_state() -> Any:
    torch.manual_seed(0)
    return torch.nn.Linear(2, 3).state_dict()


def _base_and(view: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor, *, first: bool = True) -> Any:
    v = view(base)
    return [base, v] if first else [v, base]


TENSOR_CASES: dict[str, Callable[[], Any]] = {
    "transpose": lambda: torch.arange(12.0).reshape(3, 4).t(),
    "step_slice": lambda: torch.arange(24).reshape(4, 6)[::2, 1::3],
    "storage_offset": lambda: torch.arange(10.0)[3:],
    "expanded_stride_0": lambda: torch.ones(1, 3).expand(4, 3),
    "channels_last": _channels_last,
    "base_and_step_view": lambda: _base_and(lambda t: t[:, ::2], torch.arange(12.0).reshape(3, 4)),
    "base_and_transpose": lambda: _base_and(lambda t: t.t(), torch.arange(6.0).reshape(2, 3)),
    "same_tensor_twice": lambda: _same_twice(torch.arange(4.0)),
    "same_empty_tensor_twice": lambda: _same_twice(torch.empty(0, 3)),
    "same_0d_tensor_twice": lambda: _same_twice(torch.tensor(1.5)),
    "conj_view": lambda: _complex().conj(),
    "conj_view_and_base": lambda: _base_and(torch.conj, _complex()),
    "base_after_conj_view": lambda: _base_and(torch.conj, _complex(), first=False),
    "conj_view_complex128": lambda: _base_and(torch.conj, _complex().to(torch.complex128)),
    "neg_view": lambda: _real()._neg_view(),
    "neg_view_and_base": lambda: _base_and(lambda t: t._neg_view(), _real()),
    "base_after_neg_view": lambda: _base_and(lambda t: t._neg_view(), _real(), first=False),
    "neg_view_int8": lambda: _base_and(lambda t: t._neg_view(), torch.tensor([-128, 0, 5], dtype=torch.int8)),
    "neg_of_conj_and_base": lambda: _base_and(lambda t: t.conj()._neg_view(), _complex()),
    "requires_grad_leaf": lambda: torch.ones(3, requires_grad=True),
    "requires_grad_non_leaf": _non_leaf,
    "requires_grad_complex": lambda: _complex().requires_grad_(),
    "parameter": lambda: torch.nn.Parameter(torch.arange(3.0)),
    "parameter_frozen": lambda: torch.nn.Parameter(torch.arange(3.0), requires_grad=False),
    "parameter_int_frozen": lambda: torch.nn.Parameter(torch.arange(3), requires_grad=False),
    "parameter_0d": lambda: torch.nn.Parameter(torch.tensor(2.0)),
    "same_parameter_twice": lambda: _same_twice(torch.nn.Parameter(torch.arange(3.0))),
    "same_frozen_parameter_twice": lambda: _same_twice(torch.nn.Parameter(torch.ones(2), requires_grad=False)),
    "parameter_and_detached_alias": lambda: _base_and(torch.Tensor.detach, torch.nn.Parameter(torch.ones(2))),
    "parameter_and_transpose": lambda: _base_and(torch.t, torch.nn.Parameter(torch.ones(2, 3))),
    "module_state_dict": _linear_state,
}


@pytest.mark.parametrize("build", TENSOR_CASES.values(), ids=TENSOR_CASES.keys())
def test_tensor_views_and_identity(build: Callable[[], Any]) -> None:
    roundtrip({"v": build()})


@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3)], ids=["0d", "empty", "1d", "2d"])
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_dtypes_and_shapes(dtype: str, shape: tuple[int, ...]) -> None:
    roundtrip({"v": _array(dtype, shape, _pattern(math.prod(shape) * np.dtype(dtype).itemsize))})


def _grid(dtype: str = "<f8") -> np.ndarray:
    return _array(dtype, (3, 4), _pattern(12 * np.dtype(dtype).itemsize))


def _matrix() -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(_grid())


NUMPY_CASES: dict[str, Callable[[], Any]] = {
    "0d_float64": lambda: np.array(1.5),
    "0d_big_endian": lambda: np.array(1.5, dtype=">f8"),
    "0d_bool": lambda: np.array(True),
    "fortran_order": lambda: np.asfortranarray(_grid()),
    "transposed": lambda: _grid().T,
    "step_slice": lambda: _grid()[::2, ::3],
    "big_endian_step_slice": lambda: _grid(">f8")[:, 1::2],
    "negative_stride": lambda: _grid()[::-1],
    "read_only": lambda: np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8),
    "masked": lambda: np.ma.masked_array(np.arange(4.0), mask=[True, False, True, False]),
    "masked_no_mask": lambda: np.ma.masked_array(np.arange(3)),
    "masked_fill_value": lambda: np.ma.masked_array(np.arange(3.0), mask=[0, 1, 0], fill_value=-7.0),
    "matrix": _matrix,
    "same_array_twice": lambda: _same_twice(np.arange(3)),
}
SCALAR_CASES: dict[str, Any] = {
    "float32": np.float32(1.5),
    "float64_neg_zero": np.float64(-0.0),
    "float64_nan_payload": np.float64(NAN_PAYLOAD),
    "float16": np.float16(-2.5),
    "int8": np.int8(-128),
    "int64": np.int64(-(2**63)),
    "uint64": np.uint64(2**64 - 1),
    "bool_true": np.bool_(True),
    "bool_false": np.bool_(False),
    "complex64": np.complex64(1 - 2j),
    "complex128": np.complex128(complex(math.inf, -0.0)),
}


@pytest.mark.parametrize("build", NUMPY_CASES.values(), ids=NUMPY_CASES.keys())
def test_numpy_layouts_and_subclasses(build: Callable[[], Any]) -> None:
    """Masked arrays and matrices may be refused (naming the key); if saved, mask and type must survive."""
    roundtrip({"v": {"a": build()}}, refusal_names="v.a")


@pytest.mark.parametrize("value", SCALAR_CASES.values(), ids=SCALAR_CASES.keys())
def test_numpy_scalars(value: Any) -> None:
    roundtrip({"v": [value]})


TORCH_VALUES: dict[str, Any] = {
    "size_empty": torch.Size([]),
    "size": torch.Size([2, 0, 3]),
    **{f"dtype_{str(d).removeprefix('torch.')}": d for d in [*TORCH_DTYPES, torch.complex32, torch.quint8]},
    "device_cpu": torch.device("cpu"),
    "device_cpu_0": torch.device("cpu", 0),
    "device_meta": torch.device("meta"),
    "device_cuda_1": torch.device("cuda", 1),
}


@pytest.mark.parametrize("value", TORCH_VALUES.values(), ids=TORCH_VALUES.keys())
def test_torch_values(value: Any) -> None:
    roundtrip({"v": (value, [value])})


def _quiet(build: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build()

    return run


REFUSED: dict[str, Callable[[], Any]] = {
    "sparse_coo": lambda: torch.eye(3).to_sparse(),
    "sparse_csr": _quiet(lambda: torch.eye(3).to_sparse_csr()),
    "nested_jagged": _quiet(lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)),
    "nested_default": _quiet(lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])),
    "nested_strided": _quiet(lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.strided)),
    "quantized": _quiet(lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8)),
    "meta_tensor": lambda: torch.empty(3, device="meta"),
    "uninitialized_parameter": _quiet(torch.nn.parameter.UninitializedParameter),
    "uninitialized_buffer": _quiet(torch.nn.parameter.UninitializedBuffer),
    "set": lambda: {1, 2},
    "empty_set": set,
    "frozenset": lambda: frozenset({1}),
    "lambda": lambda: lambda: 1,
    "object": object,
    "numpy_object_array": lambda: np.array([object()]),
    "numpy_str_array": lambda: np.array(["a"]),
}


@pytest.mark.parametrize("build", REFUSED.values(), ids=REFUSED.keys())
def test_refused_values(build: Callable[[], Any]) -> None:
    assert roundtrip({"v": {"bad": [1, build()]}}, refusal_names="v.bad.1") == "refused"
