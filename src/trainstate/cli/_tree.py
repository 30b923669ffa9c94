"""Reading the manifest's tree without touching tensor data: leaves, subtrees, and what each part is."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trainstate.errors import CorruptCheckpointError
from trainstate.format import tree
from trainstate.format.codec import Decoder
from trainstate.format.dtypes import dtype_info, numpy_dtype_info
from trainstate.format.tree import TENSOR_TAGS, Path, format_path
from trainstate.format.tree import tag as _tag
from trainstate.format.tree import unwrap as _unwrap

__all__ = [
    "TensorRef",
    "category",
    "children",
    "find",
    "is_tensor",
    "leaves",
    "matches",
    "optimizer_states",
    "plain",
    "scheduler_states",
    "stateful_type",
]

PICKLED = "<pickled value, not loaded>"
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class TensorRef:
    """A tensor (or numpy array) as the manifest describes it; its data stays on disk."""

    node: dict[str, Any]
    dtype: str
    shape: tuple[int, ...]
    itemsize: int

    @classmethod
    def of(cls, node: dict[str, Any], where: str) -> TensorRef:
        numpy_dtype = node.get("np_dtype")
        shape = node.get("np_shape", node.get("shape"))
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CorruptCheckpointError(f"{where}: invalid shape {shape!r}")
        if numpy_dtype is not None:
            try:
                info = numpy_dtype_info(numpy_dtype)  # the codec's strict grammar, never np.dtype on raw text
            except ValueError:
                raise CorruptCheckpointError(f"{where}: invalid numpy dtype {numpy_dtype!r}") from None
            return cls(node, f"numpy.{info.name}", tuple(shape), info.itemsize)
        info = dtype_info(node.get("dtype"), where=where)
        return cls(node, info.name, tuple(shape), info.itemsize)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def file(self) -> str:
        return str(self.node.get("file"))

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def is_tensor(node: Any) -> bool:
    return _tag(node) in TENSOR_TAGS


def stateful_type(node: Any) -> str | None:
    """The recorded type of a live object (``torch.optim.adamw.AdamW``), or None for plain data."""
    if _tag(node) == "stateful" and isinstance(node.get("type"), str):
        return str(node["type"])
    return None


def children(node: Any, where: str = "", path: Path = ()) -> list[tuple[Any, Any]] | None:
    """The ``(key, child)`` pairs of a container node; None for a leaf. Live objects are transparent."""
    return tree.children(node, Decoder(None, where=where).decode, where=where, path=path)


def _has_structure(node: Any) -> bool:
    """Whether a subtree holds a mapping or a tensor anywhere (else a list of it is one value)."""
    node = _unwrap(node)
    if is_tensor(node) or _tag(node) in ("dict", "odict"):
        return True
    return any(_has_structure(child) for _, child in children(node) or [])


def plain(node: Any, path: Path = (), where: str = "") -> Any:
    """Decode a subtree to Python values, with tensors as `TensorRef` (no data is read)."""
    node = _unwrap(node)
    if is_tensor(node):
        return TensorRef.of(node, f"{where}: {format_path(path)}")
    tag = _tag(node)
    if tag in ("dict", "odict") or isinstance(node, list) or tag == "tuple":
        pairs = children(node, where, path) or []
        if tag in ("dict", "odict"):
            return {k: plain(v, (*path, k), where) for k, v in pairs}
        values = [plain(v, (*path, k), where) for k, v in pairs]
        return tuple(values) if tag == "tuple" else values
    if tag == "pickle":  # decoding it would unpickle: inspecting never does
        return PICKLED
    return Decoder(None, where=where).decode(node, path)


def _is_leaf(node: Any, kids: list[tuple[Any, Any]] | None) -> bool:
    if not kids:  # a value, a tensor, or an empty container
        return True
    if _tag(_unwrap(node)) in ("dict", "odict"):
        return False
    return not _has_structure(node)  # a list/tuple of plain values (betas, an RNG state) is one value


def leaves(node: Any, path: Path = (), where: str = "") -> Iterator[tuple[Path, Any]]:
    """Every leaf as ``(path, value)``: tensors as `TensorRef`, other values decoded."""
    kids = children(node, where, path)
    if _is_leaf(node, kids):
        yield path, plain(node, path, where)
        return
    for key, child in kids or []:
        yield from leaves(child, (*path, key), where)


def find(node: Any, dotted: str, where: str = "") -> tuple[Path, Any]:
    """The subtree at a dotted key path (``"optimizer.param_groups.0"``); raises KeyError."""
    return tree.find(node, dotted, Decoder(None, where=where).decode, where=where)


def matches(path: Path, patterns: list[str]) -> bool:
    """Whether a key path is selected by ``--filter`` patterns: globs, or plain prefixes."""
    key = format_path(path)
    for pattern in patterns:
        if fnmatch.fnmatchcase(key, pattern):
            return True
        if not any(c in pattern for c in "*?[") and (key == pattern or key.startswith(pattern + ".")):
            return True
    return False


# --------------------------------------------------------------------------------- what is what
def _keys(node: Any) -> set[str]:
    return {str(k) for k, _ in (children(node) or [])}


def is_optimizer_state(node: Any) -> bool:
    return _tag(_unwrap(node)) in ("dict", "odict") and {"state", "param_groups"} <= _keys(node)


def is_scheduler_state(node: Any) -> bool:
    keys = _keys(node) if _tag(_unwrap(node)) in ("dict", "odict") else set()
    return "last_epoch" in keys and ("_last_lr" in keys or "base_lrs" in keys)


def _is_module_state(node: Any) -> bool:
    """A module's state dict: an ordered dict with per-module ``_metadata``, or flat tensors only."""
    inner = _unwrap(node)
    if _tag(inner) == "odict" and "meta" in inner:
        return True
    kids = children(inner) or []
    return bool(kids) and _tag(inner) in ("dict", "odict") and all(is_tensor(v) for _, v in kids)


def category(key: Any, node: Any) -> str:
    """model / optimizer / scheduler / rng / data position / user value / other, for a top-level entry."""
    kind = stateful_type(node) or ""
    name = str(key).lower()
    if is_tensor(node):
        return "tensor"
    if "lr_scheduler" in kind or is_scheduler_state(node):
        return "scheduler"
    if kind.startswith("torch.optim.") or is_optimizer_state(node):
        return "optimizer"
    if kind.endswith("RNGState") or {"python", "numpy"} <= _keys(node):
        return "rng"
    if any(s in kind for s in ("Sampler", "DataLoader")) or any(s in name for s in ("sampler", "loader")):
        return "data position"
    if kind.startswith("torch.nn.") or _is_module_state(node):
        return "model"
    if not any(isinstance(v, TensorRef) for _, v in leaves(node)):
        return "user value"
    for hint, label in (("model", "model"), ("optim", "optimizer"), ("sched", "scheduler"), ("rng", "rng")):
        if hint in name:
            return label
    return "other"


def parameter_count(node: Any) -> int:
    """Elements of a model's tensors, not counting BatchNorm's running statistics."""
    return sum(
        value.numel
        for path, value in leaves(node)
        if isinstance(value, TensorRef) and not str(path[-1] if path else "").endswith(_BUFFERS)
    )


def _find_all(node: Any, test: Any, path: Path, typ: str | None) -> Iterator[tuple[Path, str | None, Any]]:
    typ = stateful_type(node) or typ
    if test(node):
        yield path, typ, node
        return
    for key, child in children(node) or []:
        if not is_tensor(child):
            yield from _find_all(child, test, (*path, key), None)


def optimizer_states(tree: Any) -> list[tuple[Path, str | None, Any]]:
    """``(path, type, node)`` of every optimizer state dict in the tree."""
    return list(_find_all(tree, is_optimizer_state, (), None))


def scheduler_states(tree: Any) -> list[tuple[Path, str | None, Any]]:
    """``(path, type, node)`` of every LR scheduler state dict in the tree."""
    return list(_find_all(tree, is_scheduler_state, (), None))
