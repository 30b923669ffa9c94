"""`trainstate.Run`: what it adds to the state, when it saves, how it stops, and an in-process resume
that continues an interrupted loop bit for bit (the SIGKILL runs are in tests/e2e/test_kill_resume.py)."""

from __future__ import annotations

import itertools
import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import trainstate

DATA = TensorDataset(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), torch.randn(20, 1))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(
        DATA, batch_size=3, sampler=trainstate.ResumableSampler(DATA, seed=1), generator=torch.Generator()
    )
    return model, optimizer, loader


def _train(run: trainstate.Run, model, optimizer, max_steps: int, stop_after: int | None = None) -> dict[int, str]:
    losses = {}
    for x, y in run.batches(max_steps=max_steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses[run.step] = loss.item().hex()
        run.report(loss=loss.item())
        if run.step == stop_after:  # a crash: the loop is left without another save
            break
    return losses


def test_an_interrupted_loop_continues_bit_for_bit(tmp_path):
    model, optimizer, loader = _setup()
    with trainstate.Run(
        tmp_path / "ref", {"model": model, "optimizer": optimizer}, loader=loader, every_n_steps=4
    ) as run:
        expected = _train(run, model, optimizer, max_steps=17)  # 7 batches an epoch: crosses two epoch ends
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, loader = _setup()
    with trainstate.Run(
        tmp_path / "run", {"model": model, "optimizer": optimizer}, loader=loader, every_n_steps=4
    ) as run:
        first = _train(run, model, optimizer, max_steps=17, stop_after=10)
    torch.manual_seed(123)  # the crashed process's RNG is gone; the restore must not depend on it
    model, optimizer, loader = _setup(seed=99)
    with trainstate.Run(
        tmp_path / "run", {"model": model, "optimizer": optimizer}, loader=loader, every_n_steps=4
    ) as run:
        assert run.resumed_from == run.step == 8
        rest = _train(run, model, optimizer, max_steps=17)
    assert {**first, **rest} == expected and min(rest) == 9
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_saves_on_its_triggers_and_at_max_steps_with_the_reported_metrics(tmp_path):
    model, optimizer, loader = _setup()
    with trainstate.Run(
        tmp_path, {"model": model, "optimizer": optimizer}, loader=loader, every_n_steps=4, keep_last=None,
        keep_best=1, monitor="loss",
    ) as run:  # fmt: skip
        losses = _train(run, model, optimizer, max_steps=10)
        assert run.manager.steps() == [4, 8, 10] and not run.stopped
        assert run.manager.metrics(8) == {"loss": float.fromhex(losses[8])}
    saved = trainstate.load(tmp_path / "step_00000010")
    assert set(saved) == {"model", "optimizer", "rng", "loader"}  # the RNG streams and the data position joined


def test_a_resume_past_max_steps_yields_nothing(tmp_path):
    model, optimizer, loader = _setup()
    with trainstate.Run(tmp_path, {"model": model}, loader=loader, every_n_steps=5) as run:
        _train(run, model, optimizer, max_steps=5)
    with trainstate.Run(tmp_path, {"model": model}, loader=loader, every_n_steps=5) as run:
        assert run.step == 5 and list(run.batches(max_steps=5)) == []


def test_a_preemption_signal_saves_that_step_and_ends_the_loop(tmp_path):
    model, optimizer, loader = _setup()
    with trainstate.Run(tmp_path, {"model": model, "optimizer": optimizer}, loader=loader, every_n_steps=100) as run:
        steps = []
        for _ in run.batches(max_steps=50):
            steps.append(run.step)
            if run.step == 6:
                os.kill(os.getpid(), signal.SIGUSR1)  # a default preemption signal (SLURM --signal=USR1)
        assert steps == [1, 2, 3, 4, 5, 6] and run.stopped and run.stop_reason == "preempted by SIGUSR1"
        assert run.manager.steps() == [6]


def test_plain_values_and_named_entries_are_restored_into_run_state(tmp_path):
    model, optimizer, loader = _setup()
    rng = trainstate.RNGState()
    state = {"model": model, "best": 1.5, "generator_rng": rng, "data": loader.sampler}
    with trainstate.Run(tmp_path, state, loader=loader, every_n_steps=2) as run:
        run.state["best"] = 0.25
        list(run.batches(max_steps=2))
        assert set(run.state) == {"model", "best", "generator_rng", "data"}  # nothing added twice
    with trainstate.Run(tmp_path, {**state, "best": 9.0}, loader=loader, every_n_steps=2) as run:
        assert run.state["best"] == 0.25 and state["best"] == 1.5


def test_a_stateful_dataloader_is_its_own_position(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    model, optimizer, _ = _setup()
    loader = StatefulDataLoader(DATA, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    with trainstate.Run(tmp_path / "a", {"model": model}, loader=loader, every_n_steps=3) as run:
        batches = [x for x, _ in run.batches(max_steps=8)]
        assert run.state["loader"] is loader
    loader = StatefulDataLoader(DATA, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    with trainstate.Run(tmp_path / "b", {"model": model}, loader=loader, every_n_steps=3) as run:
        list(itertools.islice(run.batches(max_steps=8), 4))  # leaves after 4 batches: saved at 3
    loader = StatefulDataLoader(DATA, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    with trainstate.Run(tmp_path / "b", {"model": model}, loader=loader, every_n_steps=3) as run:
        assert run.step == 3
        rest = [x for x, _ in run.batches(max_steps=8)]
    assert all(torch.equal(a, b) for a, b in zip(batches[3:], rest, strict=True))


def test_refusals_name_the_fix(tmp_path):
    model, _, loader = _setup()
    plain = DataLoader(DATA, batch_size=3, shuffle=True)
    with pytest.raises(TypeError, match=r"RandomSampler cannot resume mid-epoch; use .*ResumableSampler"):
        trainstate.Run(tmp_path, {"model": model}, loader=plain)
    with pytest.raises(ValueError, match=r"state\['rng'\] is taken"):
        trainstate.Run(tmp_path, {"model": model, "rng": 3}, loader=loader)
    empty = DataLoader(TensorDataset(torch.zeros(0, 1)), sampler=trainstate.ResumableSampler(0))
    with trainstate.Run(tmp_path, {"model": model}, loader=empty, every_n_steps=1) as run:
        with pytest.raises(ValueError, match="the loader yielded no batches"):
            list(run.batches(max_steps=3))
        with pytest.raises(ValueError, match="max_steps must be"):
            list(run.batches(max_steps=-1))


def test_without_a_trigger_it_saves_by_time(tmp_path):
    model, _, loader = _setup()
    with trainstate.Run(tmp_path, {"model": model}, loader=loader) as run:
        list(run.batches(max_steps=3))
        assert run.manager.steps() == [3]  # only the final one: ten minutes have not passed
        assert run.manager._trigger.every_n_seconds == trainstate.run.DEFAULT_EVERY_N_SECONDS
