"""Incremental checkpoints: unchanged files are linked, not rewritten; every checkpoint stays
self-contained and verifies byte for byte."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import trainstate
from support import assert_same
from trainstate import CheckpointManager
from trainstate.format import CheckpointReader
from trainstate.storage import open_storage


def _finetune() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A 90%-frozen model: a frozen backbone and a small trainable head."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    head = torch.nn.Linear(256, 64)
    for p in backbone.parameters():
        p.requires_grad_(False)
    model = torch.nn.Sequential(backbone, torch.nn.ReLU(), head)
    return model, torch.optim.AdamW(head.parameters(), lr=1e-2)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(step))
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _files(directory: str) -> dict[str, os.stat_result]:
    return {f: os.stat(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors")}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_frozen_weights_are_linked_and_every_checkpoint_stands_alone(tmp_path, async_save):
    model, optimizer = _finetune()
    with CheckpointManager(tmp_path, incremental=True, async_save=async_save, keep_last=None) as mgr:
        for step in range(1, 4):
            _train(model, optimizer, step)
            mgr.save(step, {"model": model, "optimizer": optimizer})
        mgr.wait()
        expected = {"model": dict(model.state_dict()), "optimizer": optimizer.state_dict()["state"]}
    first, last = _files(mgr.path(1)), _files(mgr.path(3))
    assert first.keys() == last.keys()
    linked = {f for f in last if last[f].st_ino == first[f].st_ino}
    total = sum(s.st_size for s in last.values())
    written = sum(s.st_size for f, s in last.items() if f not in linked)
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    assert frozen >= 0.8 * total
    # Only the trainable head and its AdamW moments were written (plus the files' headers).
    assert linked and written <= total - frozen + 4096, (written, total, frozen)
    shutil.rmtree(mgr.path(1))  # the link is a second name for the bytes: step 3 stands alone
    shutil.rmtree(mgr.path(2))
    with CheckpointReader(open_storage(str(tmp_path)), "step_00000003") as reader:
        reader.verify()
    loaded = trainstate.load(mgr.path(3))
    assert_same({"model": dict(loaded["model"]), "optimizer": loaded["optimizer"]["state"]}, expected)


def test_a_frozen_weight_changed_behind_autograd_s_back_is_written_again(tmp_path):
    model, optimizer = _finetune()
    with CheckpointManager(tmp_path, incremental=True, keep_last=None) as mgr:
        mgr.save(1, {"model": model, "optimizer": optimizer})
        with torch.no_grad():
            model[0][0].weight.data[0, 0] += 1.0  # .data: the version counter does not move
        mgr.save(2, {"model": model, "optimizer": optimizer})
    first, second = _files(mgr.path(1)), _files(mgr.path(2))
    assert any(second[f].st_ino != first[f].st_ino for f in second)
    assert torch.equal(trainstate.load(mgr.path(2))["model"]["0.0.weight"], model[0][0].weight)


def test_without_incremental_nothing_is_linked(tmp_path):
    model, optimizer = _finetune()
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        mgr.save(1, {"model": model})
        mgr.save(2, {"model": model})
    assert all(s.st_nlink == 1 for s in _files(mgr.path(2)).values())


def test_frozen_parameters_get_files_of_their_own(tmp_path):
    model, optimizer = _finetune()
    trainstate.save(tmp_path / "c", {"model": model, "optimizer": optimizer})
    with CheckpointReader(open_storage(str(tmp_path)), "c") as reader:
        refs = reader.manifest.tree["v"]["model"]["v"]["v"]
    files_of = {}
    for key, ref in refs.items():
        files_of.setdefault(ref["file"], set()).add(key.startswith("0."))
    assert all(len(kinds) == 1 for kinds in files_of.values())  # no file mixes frozen and trainable


def test_incremental_on_an_object_store_is_a_server_side_copy():
    model, optimizer = _finetune()
    url = f"memory://incremental-{os.getpid()}/run"
    with CheckpointManager(url, incremental=True, keep_last=1) as mgr:
        mgr.save(1, {"model": model, "optimizer": optimizer})
        _train(model, optimizer, 1)
        mgr.save(2, {"model": model, "optimizer": optimizer})
        assert mgr.steps() == [2]  # step 1 deleted: step 2 holds its own copy
    loaded = trainstate.load(f"{url}/step_00000002")
    assert_same(dict(loaded["model"]), dict(model.state_dict()))
