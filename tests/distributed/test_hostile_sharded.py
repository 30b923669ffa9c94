"""The hostile-input campaign for format 3: a distributed checkpoint's ``sharded`` section and its
per-rank entries, damaged every way (with a valid manifest checksum), read by a single process
through load (plain and into a live model), peek, verify and the CLI: only CheckpointError escapes,
and no tensor is allocated beyond what the files on disk hold."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import trainstate
from trainstate import CheckpointError
from trainstate.cli.app import app
from trainstate.format import MANIFEST_NAME, CheckpointReader, Manifest
from trainstate.storage import split_path

GOLDEN = Path(__file__).parent.parent / "fixtures" / "v3"
HUGE = [2**31, 2**40, 2**62, 2**63, 2**64, -1, -(2**63)]
JUNK = st.one_of(
    st.none(), st.booleans(), st.sampled_from(HUGE), st.integers(-3, 40), st.text(max_size=6),
    st.lists(st.integers(-2, 20), max_size=3), st.sampled_from(["float32", "int64", "shard-00001.safetensors", "../x"]),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)  # fmt: skip


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*path, i))
    return out


def _set(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node[path[0]] = _set(node[path[0]], path[1:], value)
    return node


@st.composite
def hostile(draw: st.DrawFn, manifest: Manifest) -> Manifest:
    """The golden manifest with 1-3 values of its sharded section (or of its tree) replaced."""
    sharded, tree = copy.deepcopy(manifest.sharded), copy.deepcopy(manifest.tree)
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 4)):
            sharded = _set(sharded, draw(st.sampled_from(_paths(sharded))), draw(JUNK))
        else:
            tree = _set(tree, ("v", *draw(st.sampled_from(_paths(tree["v"])[1:]))), draw(JUNK))
    return dataclasses.replace(manifest, sharded=sharded, tree=tree)


@pytest.fixture(scope="module")
def pristine() -> Manifest:
    return CheckpointReader(*split_path(GOLDEN)).manifest


@pytest.mark.slow
@settings(derandomize=True, database=None, deadline=None, max_examples=200)
@given(data=st.data())
def test_hostile_sharded_sections(pristine, tmp_path_factory, data):
    ckpt = tmp_path_factory.mktemp("hostile") / "ckpt"
    shutil.copytree(GOLDEN, ckpt)
    manifest = data.draw(hostile(pristine))
    try:
        (ckpt / MANIFEST_NAME).write_bytes(manifest.to_json())
    except (ValueError, TypeError):
        return  # not expressible as JSON (the writer refuses it)
    disk = sum(p.stat().st_size for p in ckpt.iterdir())
    allocated: list[int] = []
    real_empty = torch.empty

    def counting_empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = real_empty(*args, **kwargs)
        if tensor.device.type != "meta":
            allocated.append(tensor.numel() * tensor.element_size())
        return tensor

    model = torch.nn.Linear(4, 2)
    operations = [
        lambda: trainstate.load(ckpt),
        lambda: trainstate.load(ckpt, {"v3": {"model": model}}, strict=False),
        lambda: trainstate.peek(ckpt),
        lambda: CheckpointReader(*split_path(ckpt)).verify(),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", counting_empty)
        for operation in operations:
            try:
                operation()
            except CheckpointError:
                pass
    assert sum(allocated) <= 4 * disk, "allocations must be bounded by the files on disk"
    for args in (["verify", str(ckpt)], ["inspect", str(ckpt), "--values"], ["ls", str(ckpt.parent), "--verify"]):
        result = CliRunner().invoke(app, [*args, "--debug"])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            assert isinstance(result.exception, CheckpointError), (args, repr(result.exception))
