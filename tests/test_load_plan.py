"""Loads as data: the plan of read items, and its execution apart from any tree."""

from __future__ import annotations

import torch

import trainstate
from trainstate.format import CheckpointReader, LoadPlan, ReadItem, TensorLoader, execute_load
from trainstate.format.header import read_header
from trainstate.storage import split_path


def test_load_plan_is_data_and_execution_needs_no_tree(tmp_path):
    """Planning a load into a live model yields read items aimed at its parameters (in place) and at
    fresh tensors for the rest; `execute_load` fills exactly those byte ranges and nothing else."""
    source = torch.nn.Linear(3, 2)
    trainstate.save(tmp_path / "c", {"model": source, "extra": torch.arange(4.0)})
    target = torch.nn.Linear(3, 2)
    with CheckpointReader(*split_path(tmp_path / "c")) as reader:
        live = {("model", "weight"): target.weight, ("model", "bias"): target.bias}
        loader = TensorLoader(reader, destinations=lambda path: live.get(path))
        reader.decode(reader.manifest.tree, loader)
        items = {item.key: item for item in loader.plan}
        assert set(items) == {"model.weight", "model.bias", "extra"}
        assert items["model.weight"].in_place and items["model.weight"].target.data_ptr() == target.weight.data_ptr()
        assert not items["extra"].in_place and loader.plan.nbytes == (6 + 2 + 4) * 4
        entry = reader.file(items["extra"].file, where="test")
        with reader.opened(entry) as f:
            _, header = read_header(f, entry.size, where="test")
        assert (items["extra"].start, items["extra"].end) == (header["extra"].start, header["extra"].end)

        # A hand-made plan of one item: only its file is read, into the given tensor.
        into = torch.empty(4)
        plan = LoadPlan()
        plan.add(ReadItem(entry.name, "extra", header["extra"].start, header["extra"].end, into, in_place=False))
        execute_load(plan, reader)
        assert torch.equal(into, torch.arange(4.0))
        assert not torch.equal(target.weight, source.weight)  # planned, never executed
