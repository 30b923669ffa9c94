"""One traversal for each kind of tree: the encoded tree of a manifest, and live nested containers.

The encoded tree is untrusted JSON: `dict_entries` is the one place that checks a container's
shape, and every reader of the tree (the decoder, the restorer, the CLI) walks it through
`children`. Live values (a state dict, a converted source) are walked by `rebuild` and
`tensor_leaves`, which treat exactly the containers the codec stores structurally.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from trainstate.errors import CorruptCheckpointError

__all__ = [
    "TAG",
    "TENSOR_TAGS",
    "any_node",
    "Path",
    "children",
    "dict_entries",
    "find",
    "format_path",
    "holds_tensors",
    "rebuild",
    "tag",
    "matching_leaves",
    "unwrap",
]

TAG = "@"
TENSOR_TAGS = ("tensor", "ndarray")
Path = tuple[Any, ...]
DecodeKey = Callable[[Any, Path], Any]


def format_path(path: Path) -> str:
    """``("optimizer", "state", 0, "exp_avg")`` -> ``"optimizer.state.0.exp_avg"``."""
    return ".".join(str(p) for p in path) if path else "<root>"


# ------------------------------------------------------------------------------ the encoded tree
def tag(node: Any) -> Any:
    """The ``"@"`` tag of an encoded node; None for plain JSON values and lists."""
    return node.get(TAG) if isinstance(node, dict) else None


def unwrap(node: Any) -> Any:
    """A live object's saved state (the ``"v"`` of a ``stateful`` node); other nodes as they are."""
    while tag(node) == "stateful" and "v" in node:
        node = node["v"]
    return node


def dict_entries(node: dict[str, Any], *, where: str, path: Path) -> list[tuple[Any, Any]]:
    """The ``(key node, value node)`` pairs of an encoded dict: string keys as they are (the
    ``"v"`` form), other keys still encoded (the ``"items"`` form). Raises CorruptCheckpointError."""
    values = node.get("v")
    if isinstance(values, dict):
        return list(values.items())
    items = node.get("items")
    if values is None and isinstance(items, list) and all(isinstance(p, list) and len(p) == 2 for p in items):
        return [(pair[0], pair[1]) for pair in items]
    raise CorruptCheckpointError(f"{where}: {format_path(path)}: malformed dict")


def children(node: Any, decode_key: DecodeKey, *, where: str = "", path: Path = ()) -> list[tuple[Any, Any]] | None:
    """The ``(key, child)`` pairs of a container node (dict, list, tuple; a live object is its state);
    None for a leaf. Keys of the ``"items"`` form are decoded with ``decode_key(node, path)``."""
    node = unwrap(node)
    if isinstance(node, list):
        return list(enumerate(node))
    kind = tag(node)
    if kind in ("dict", "odict"):
        entries = dict_entries(node, where=where, path=path)
        return entries if "v" in node else [(_key(decode_key(k, path), where, path), v) for k, v in entries]
    if kind == "tuple":
        if not isinstance(node.get("v"), list):
            raise CorruptCheckpointError(f"{where}: {format_path(path)}: malformed tuple")
        return list(enumerate(node["v"]))
    return None


def _key(key: Any, where: str, path: Path) -> Any:
    try:
        hash(key)
    except TypeError:
        raise CorruptCheckpointError(f"{where}: {format_path(path)}: unhashable dict key {key!r:.60}") from None
    return key


def holds_tensors(node: Any) -> bool:
    """Whether an encoded subtree references tensor data (tensors or numpy arrays)."""
    return any_node(node, lambda item: item.get(TAG) in TENSOR_TAGS)


def any_node(node: Any, test: Callable[[dict[str, Any]], bool]) -> bool:
    """Whether ``test`` holds for any object node of an encoded subtree (iterative: no depth limit)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if test(item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def find(node: Any, dotted: str, decode_key: DecodeKey, *, where: str = "") -> tuple[Path, Any]:
    """The subtree at a dotted key path (``"optimizer.param_groups.0"``); raises KeyError."""
    path: Path = ()
    if dotted in ("", "<root>"):
        return path, node
    for part in dotted.split("."):
        kids = children(node, decode_key, where=where, path=path) or []
        match = next(((k, v) for k, v in kids if str(k) == part), None)
        if match is None:
            raise KeyError(format_path((*path, part)))
        path, node = (*path, match[0]), match[1]
    return path, node


# ---------------------------------------------------------------------------------- live values
_CONTAINERS = (dict, OrderedDict, list, tuple)


def rebuild(value: Any, leaf: Callable[[Any, Path], Any], path: Path = ()) -> Any:
    """A copy of the dict / OrderedDict / list / tuple structure of ``value`` with ``leaf(value, path)``
    in place of everything else. A module state dict's ``_metadata`` (per-module versions) is kept."""
    kind = type(value)
    if kind in (dict, OrderedDict):
        out = kind((k, rebuild(v, leaf, (*path, k))) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if kind in (list, tuple):
        return kind(rebuild(v, leaf, (*path, i)) for i, v in enumerate(value))
    return leaf(value, path)


def matching_leaves(value: Any, is_leaf: Callable[[Any], bool], path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """``(path, leaf)`` for every value inside the containers of ``value`` that ``is_leaf`` accepts."""
    if is_leaf(value):
        yield path, value
    elif type(value) in (dict, OrderedDict):
        for k, v in value.items():
            yield from matching_leaves(v, is_leaf, (*path, k))
    elif type(value) in _CONTAINERS:
        for i, v in enumerate(value):
            yield from matching_leaves(v, is_leaf, (*path, i))
