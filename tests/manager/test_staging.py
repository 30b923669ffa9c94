"""Async staging: reusable host buffers (the pool), overlap guarded by hooks, and exact resume with
either, compared bit for bit against an uninterrupted run."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile

import pytest
import torch

import trainstate
from support import assert_same
from trainstate import CheckpointManager


def _setup(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 32, generator=gen)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()},
    }


def _saved(path: str) -> dict:
    found = trainstate.load(path)
    return {"model": dict(found["model"]), "optimizer": found["optimizer"]["state"]}


def test_the_pool_allocates_once_and_reuses_its_buffers(tmp_path):
    model, optimizer = _setup()
    _step(model, optimizer, 0)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with CheckpointManager(tmp_path, async_save=True, keep_last=2) as mgr:
        mgr.save(1, {"model": model, "optimizer": optimizer})
        mgr.wait()
        first = {p: b.data_ptr() for p, b in mgr._stager.pool._buffers.items()}
        held = mgr.staging_bytes
        assert held >= size and len(first) > 0
        for step in range(2, 6):
            _step(model, optimizer, step)
            mgr.save(step, {"model": model, "optimizer": optimizer})
            mgr.wait()
            assert {p: b.data_ptr() for p, b in mgr._stager.pool._buffers.items()} == first
            assert mgr.staging_bytes == held
        assert_same(_saved(mgr.path(5)), _snapshot(model, optimizer))
        # A tensor that changes shape gets a new buffer; one that leaves the state frees its own.
        mgr.save(6, {"model": model})
        mgr.wait()
        assert mgr.staging_bytes < held
    assert mgr.staging_bytes == 0  # close() freed the pool


@pytest.mark.parametrize("overlap", [False, True], ids=["copy-then-return", "overlap"])
def test_an_async_save_holds_the_state_of_its_call_even_when_training_goes_on_at_once(tmp_path, overlap):
    model, optimizer = _setup()
    big = torch.nn.Linear(1024, 1024)  # slows the copy so the next step comes before it in overlap mode
    _step(model, optimizer, 0)
    with CheckpointManager(tmp_path, async_save=True, overlap=overlap, keep_last=None) as mgr:
        for step in range(1, 4):
            expected = _snapshot(model, optimizer)
            mgr.save(step, {"model": model, "optimizer": optimizer, "big": big})
            _step(model, optimizer, step)  # forward waits for the copy in overlap mode (BatchNorm stats too)
            assert not torch.equal(model.state_dict()["0.weight"], expected["model"]["0.weight"])
            mgr.wait()
            assert_same(_saved(mgr.path(step)), expected)


def test_overlap_guard_hooks_are_removed_once_copied(tmp_path):
    model, optimizer = _setup()
    _step(model, optimizer, 0)
    with CheckpointManager(tmp_path, async_save=True, overlap=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": optimizer})
        mgr.wait_staged()
        mgr.wait()
        assert all(not m._forward_pre_hooks for m in model.modules())
        assert not optimizer._optimizer_step_pre_hooks


def test_overlap_holds_only_what_changes_state(tmp_path):
    model, optimizer = _setup()
    _step(model, optimizer, 0)
    with CheckpointManager(tmp_path, async_save=True, overlap=True) as mgr:
        staged = mgr._stager.stage({"model": model, "optimizer": optimizer}, overlap=True)
        hooked = [type(m).__name__ for m in model.modules() if m._forward_pre_hooks]
        assert hooked == ["BatchNorm1d"] and optimizer._optimizer_step_pre_hooks
        staged.cancel()


def test_a_state_that_cannot_be_saved_releases_the_guards(tmp_path):
    model, optimizer = _setup()
    with CheckpointManager(tmp_path, async_save=True, overlap=True) as mgr:
        with pytest.raises(trainstate.UnsupportedValueError):
            mgr.save(1, {"model": model, "bad": object()})
        _step(model, optimizer, 1)  # would hang if a guard were left behind
        assert all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("overlap", [False, True], ids=["async", "async-overlap"])
def test_resume_from_an_async_checkpoint_is_bit_exact(tmp_path, overlap):
    model, optimizer = _setup()
    reference = [_step(model, optimizer, s) for s in range(12)]

    model, optimizer = _setup()
    with CheckpointManager(tmp_path, async_save=True, overlap=overlap, keep_last=None) as mgr:
        for s in range(7):
            _step(model, optimizer, s)
            mgr.save(s, {"model": model, "optimizer": optimizer})
    model, optimizer = _setup(seed=5)
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore({"model": model, "optimizer": optimizer}, step=4) == 4
    assert [_step(model, optimizer, s) for s in range(5, 12)] == reference[5:]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture
def fast_dir(tmp_path):
    """A directory on tmpfs where there is one (fsync is free there: the test is about memory)."""
    if not os.path.isdir("/dev/shm"):
        return tmp_path
    path = tempfile.mkdtemp(dir="/dev/shm", prefix="trainstate-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_rss_stays_flat_across_a_thousand_async_saves(fast_dir):
    tmp_path = fast_dir
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)  # 1 MiB of weights
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    with CheckpointManager(tmp_path, async_save=True, keep_last=1) as mgr:
        for step in range(1, 1001):
            mgr.save(step, {"model": model, "optimizer": optimizer})
            if step == 100:
                mgr.wait()
                gc.collect()
                baseline = _rss()
        mgr.wait()
        gc.collect()
        grown = _rss() - baseline
        assert mgr.staging_bytes == 2 * 512 * 513 * 4
    assert grown < 16 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 900 async saves"
