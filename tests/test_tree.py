"""format/tree.py: the one traversal of encoded trees (hardened) and of live containers."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from trainstate import CorruptCheckpointError
from trainstate.format.codec import Decoder, Encoder
from trainstate.format.tree import children, dict_entries, find, holds_tensors, matching_leaves, rebuild, unwrap


def decode_key(node, path):
    return Decoder(None, where="ckpt").decode(node, path)


def test_children_of_every_container_form():
    tree = Encoder(None).encode({"a": [1, (2, 3)], 5: "five", "s": {"x": 1}})
    kids = dict(children(tree, decode_key))
    assert set(kids) == {"a", 5, "s"}  # the "items" form: keys decoded
    assert children(kids["a"], decode_key) == [(0, 1), (1, {"@": "tuple", "v": [2, 3]})]
    assert children(1, decode_key) is None
    assert children({"@": "stateful", "type": "M", "v": [7]}, decode_key) == [(0, 7)]  # live objects are their state
    assert unwrap({"@": "stateful", "v": {"@": "stateful", "v": 3}}) == 3


@pytest.mark.parametrize(
    "node",
    [
        {"@": "dict", "v": [1]},
        {"@": "dict"},
        {"@": "dict", "items": [[1]]},
        {"@": "dict", "items": "x"},
        {"@": "dict", "items": [[[1, 2], 3]]},  # a list key: unhashable
        {"@": "tuple", "v": {"a": 1}},
    ],
    ids=["v-not-object", "no-entries", "short-pair", "items-not-list", "unhashable-key", "tuple-not-list"],
)
def test_malformed_containers_are_corrupt_with_path(node):
    with pytest.raises(CorruptCheckpointError, match=r"ckpt: opt\.state: malformed|unhashable"):
        children(node, decode_key, where="ckpt", path=("opt", "state"))


def test_dict_entries_keeps_encoded_keys_undecoded():
    node = Encoder(None).encode({1: "a"})
    assert dict_entries(node, where="w", path=()) == [(1, "a")]


def test_find_and_holds_tensors():
    tree = Encoder(None).encode({"opt": {"groups": [{"lr": 0.1}]}})
    assert find(tree, "opt.groups.0", decode_key)[0] == ("opt", "groups", 0)
    with pytest.raises(KeyError, match="opt.nope"):
        find(tree, "opt.nope", decode_key)
    assert not holds_tensors(tree)
    assert holds_tensors({"@": "dict", "v": {"a": [{"@": "ndarray"}]}})


def test_rebuild_copies_structure_and_keeps_module_metadata():
    state = torch.nn.Linear(2, 2).state_dict()
    value = {"m": state, "l": [1, (torch.ones(1),)], "d": OrderedDict(a=1)}
    seen = []
    out = rebuild(value, lambda v, p: seen.append(p) or v)
    assert out is not value and out["m"] is not state and out["m"]._metadata == state._metadata
    assert type(out["d"]) is OrderedDict and type(out["l"][1]) is tuple
    assert ("m", "weight") in seen and ("l", 1, 0) in seen
    assert dict(matching_leaves(value, lambda v: isinstance(v, torch.Tensor))).keys() == {
        ("m", "weight"),
        ("m", "bias"),
        ("l", 1, 0),
    }
