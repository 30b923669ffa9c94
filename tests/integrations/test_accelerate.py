"""trainstate.integrations.accelerate against the real Accelerate: everything ``Accelerator.save_state``
saves, as one atomic pickle-free checkpoint, restored exactly; retention after the commit; a dir-less
load past a damaged checkpoint; a SIGKILLed training subprocess that resumes bit-identically; and a
two-process (gloo) run whose every rank resumes bit-identically from one sharded checkpoint."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration
from torch.utils.data import DataLoader, TensorDataset

import trainstate
from support import assert_same
from trainstate.integrations.accelerate import load_state, save_state

RUN = Path(__file__).with_name("accelerate_run.py")
ROOT = Path(__file__).resolve().parents[2]
BATCHES_PER_EPOCH, BATCH = 12, 4


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate's singletons (and GradientState's loader references) do not leak between tests."""
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class Counter:
    """A registered custom object."""

    def __init__(self) -> None:
        self.seen = 0
        self.history: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.history = state["seen"], list(state["history"])


class Run:
    """A prepared tiny training set-up: dropout, AdamW, LambdaLR, a shuffled loader, a registered Counter."""

    def __init__(
        self,
        seed: int = 0,
        *,
        project: Path | None = None,
        total_limit: int | None = None,
        seedable: bool = True,
        stateful: bool = True,
        generator: bool = False,
    ) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.accelerator = Accelerator(
            cpu=True,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=seedable, use_stateful_dataloader=stateful),
            project_config=ProjectConfiguration(
                project_dir=None if project is None else str(project),
                automatic_checkpoint_naming=project is not None,
                total_limit=total_limit,
            ),
        )
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))
        data = torch.Generator().manual_seed(99)
        samples = BATCHES_PER_EPOCH * BATCH
        dataset = TensorDataset(torch.randn(samples, 6, generator=data), torch.randn(samples, 1, generator=data))
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator() if generator else None)
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(
            model, optimizer, loader, scheduler
        )
        self.counter = Counter()
        self.accelerator.register_for_checkpointing(self.counter)

    def batches(self):
        """The loader's batches forever, epoch after epoch, as a training loop iterates them."""
        while True:
            yield from self.loader

    def train(self, batches, steps: int) -> list[tuple[str, list[float]]]:
        """``steps`` optimizer steps; returns each step's loss (hex) and the first inputs of its batch."""
        seen = []
        for _ in range(steps):
            x, y = next(batches)
            with self.accelerator.accumulate(self.model):
                loss = torch.nn.functional.mse_loss(self.model(x), y)
                self.accelerator.backward(loss)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            self.counter.seen += len(x)
            self.counter.history.append(loss.item())
            seen.append((loss.item().hex(), x[:, 0].tolist()))
        return seen

    def final(self) -> dict[str, Any]:
        """Weights, optimizer moments, LR, custom state and counters, for exact comparison."""
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "moments": {
                i: {k: v.clone() for k, v in s.items()}
                for i, s in self.optimizer.optimizer.state_dict()["state"].items()
            },
            "lr": self.scheduler.get_last_lr(),
            "counter": self.counter.state_dict(),
            "accelerator_step": self.accelerator.step,
        }


def draws() -> tuple[list[float], float, list[float]]:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


@pytest.mark.parametrize(("saved_after", "accelerator_step"), [(5, 3), (12, 10)], ids=["mid-epoch", "epoch-end"])
def test_save_then_load_restores_everything_exactly(tmp_path, saved_after, accelerator_step):
    reference = Run(seed=0)
    batches = reference.batches()
    reference.train(batches, saved_after)  # 12 batches per epoch: mid-epoch, or right after its last batch
    assert save_state(reference.accelerator, tmp_path / "ckpt") == str(tmp_path / "ckpt")
    expected_draws = draws()
    expected = reference.train(batches, 10)  # past the end of the epoch into the next one
    expected_final = reference.final()

    resumed = Run(seed=1)  # other weights, other RNG: everything must come from the checkpoint
    assert load_state(resumed.accelerator, tmp_path / "ckpt") == str(tmp_path / "ckpt")
    assert draws() == expected_draws  # python, numpy and torch global RNGs
    got = resumed.train(resumed.batches(), 10)  # the same loader continues at the next batch
    assert got == expected  # losses bit for bit and the same data, batch by batch
    assert_same(resumed.final(), expected_final)  # weights, AdamW moments, LR, custom object, accelerator.step
    assert expected_final["accelerator_step"] == accelerator_step  # Accelerate resets it at each epoch's end


def test_checkpoint_is_one_pickle_free_trainstate_directory(tmp_path):
    run = Run()
    run.train(run.batches(), 3)
    save_state(run.accelerator, tmp_path / "ckpt", metadata={"epoch": 0})
    assert trainstate.peek(tmp_path / "ckpt").metadata == {"epoch": 0}
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files[0] == "manifest.json" and all(f.endswith(".safetensors") for f in files[1:]), files
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.bin"))
    saved = trainstate.load(tmp_path / "ckpt")  # plain data, allow_pickle=False
    assert sorted(saved) == ["accelerator", "custom", "dataloaders", "models", "optimizers", "rng", "schedulers"]
    assert saved["custom"][0]["seen"] == 12 and saved["accelerator"] == {"step": 3}
    assert torch.equal(saved["models"][0]["0.weight"], run.model.state_dict()["0.weight"])
    assert saved["dataloaders"][0]["iteration"] == 0 and saved["dataloaders"][0]["loader"]["_num_yielded"] == 3


def test_a_grad_scaler_is_saved_and_restored(tmp_path):
    run = Run()  # Accelerate makes a GradScaler for fp16 on accelerators only: set one by hand on the CPU
    run.accelerator.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7)
    scaler.scale(torch.ones(()))  # its scale tensor is made lazily
    scaler.update(new_scale=64.0)
    saved = scaler.state_dict()
    save_state(run.accelerator, tmp_path / "ckpt")
    scaler.update(new_scale=8.0)
    load_state(run.accelerator, tmp_path / "ckpt")
    assert scaler.state_dict() == saved and saved["scale"] == 64.0
    assert trainstate.load(tmp_path / "ckpt")["scaler"] == saved


def test_dirless_load_skips_a_damaged_newest_checkpoint(tmp_path, caplog):
    run = Run(project=tmp_path)
    batches = run.batches()
    states = []
    for _ in range(3):
        run.train(batches, 2)
        save_state(run.accelerator)
        states.append(run.final())
    assert run.accelerator.project_configuration.iteration == 3
    newest = tmp_path / "checkpoints" / "step_00000002"
    for data in newest.glob("*.safetensors"):
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))

    resumed = Run(seed=1, project=tmp_path)
    caplog.set_level(logging.WARNING)
    loaded = load_state(resumed.accelerator)
    assert loaded == str(tmp_path / "checkpoints" / "step_00000001")
    assert "step 2" in caplog.text and "step_00000002" in caplog.text  # skipped, then moved aside, by name
    aside = [p.name for p in (tmp_path / "checkpoints" / "trainstate-quarantine").iterdir()]
    assert len(aside) == 1 and aside[0].startswith("step_00000002")
    assert_same(resumed.final(), states[1])
    assert resumed.accelerator.project_configuration.iteration == 2  # the next save follows the restored one
    assert save_state(resumed.accelerator) == str(tmp_path / "checkpoints" / "step_00000002")
    assert trainstate.CheckpointManager(tmp_path / "checkpoints").steps() == [0, 1, 2]


def test_total_limit_deletes_old_checkpoints_only_after_the_new_one_is_committed(tmp_path):
    run = Run(project=tmp_path, total_limit=2)
    for _ in range(4):
        run.train(run.batches(), 1)
        save_state(run.accelerator)
    checkpoints = tmp_path / "checkpoints"
    assert trainstate.CheckpointManager(checkpoints).steps() == [2, 3]

    class Unsaveable:
        def state_dict(self) -> dict[str, Any]:
            return {"tags": {"a", "b"}}  # a set: not saveable without pickle

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    run.accelerator.register_for_checkpointing(Unsaveable())
    before = sorted(p.name for p in checkpoints.iterdir())
    with pytest.raises(trainstate.UnsupportedValueError, match=r"custom\.1\.tags"):
        save_state(run.accelerator)
    # Accelerate's own save_state rmtree's the oldest folder before writing the new one.
    assert sorted(p.name for p in checkpoints.iterdir()) == before
    assert run.accelerator.project_configuration.iteration == 4


def test_fresh_start_and_iteration_conflicts(tmp_path):
    run = Run(project=tmp_path)
    assert load_state(run.accelerator) is None  # nothing yet: a fresh start
    save_state(run.accelerator)
    save_state(run.accelerator)
    restarted = Run(project=tmp_path)  # iteration 0 again: Accelerate would refuse checkpoint_0 too
    with pytest.raises(ValueError, match=r"load_state\(accelerator\).*iteration = 2"):
        save_state(restarted.accelerator)
    with pytest.raises(ValueError, match="automatic_checkpoint_naming"):
        save_state(restarted.accelerator, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="input_dir"):
        load_state(Run().accelerator)


def test_other_objects_than_saved_are_refused_before_anything_is_restored(tmp_path):
    run = Run()
    run.train(run.batches(), 2)
    save_state(run.accelerator, tmp_path / "ckpt")
    other = Run(seed=1)
    other.accelerator.register_for_checkpointing(Counter())
    weights = other.final()
    with pytest.raises(trainstate.StateMismatchError, match="'custom': the checkpoint holds 1, the accelerator has 2"):
        load_state(other.accelerator, tmp_path / "ckpt")
    assert_same(other.final(), weights)
    with pytest.raises(trainstate.CheckpointNotFoundError):
        load_state(other.accelerator, tmp_path / "missing")
    other.accelerator.save_state(tmp_path / "native")  # Accelerate's own: pickles
    with pytest.raises(trainstate.CheckpointNotFoundError, match="Accelerator.save_state .pickles.; to convert"):
        load_state(other.accelerator, tmp_path / "native")


def test_set_ups_that_cannot_work_are_refused_naming_the_fix(tmp_path, monkeypatch):
    run = Run()
    run.train(run.batches(), 2)
    save_state(run.accelerator, tmp_path / "ckpt")
    plain = Run(seed=1, stateful=False)  # saved with a StatefulDataLoader underneath: its position cannot be restored
    untouched = plain.final()
    with pytest.raises(trainstate.StateMismatchError, match=r"use_stateful_dataloader=True\) as when it was saved"):
        load_state(plain.accelerator, tmp_path / "ckpt")
    assert_same(plain.final(), untouched)  # refused before anything was restored
    load_state(plain.accelerator, tmp_path / "ckpt", strict=False)  # what fits: all but the position
    assert_same(plain.final(), run.final())
    with pytest.raises(ValueError, match="total_limit=0"):
        save_state(Run(project=tmp_path / "project", total_limit=0).accelerator)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    with pytest.raises(ValueError, match="does not support DEEPSPEED: DeepSpeed's engine checkpoints"):
        save_state(run.accelerator, tmp_path / "other")


def test_skip_first_batches_resume_is_exact_with_a_seedable_sampler_and_a_generator(tmp_path):
    """Without a StatefulDataLoader Accelerate saves no position; its own recipe (skip_first_batches and
    set_epoch) is exact once the sampler is seedable and the DataLoader has a generator of its own."""

    def loop(run: Run, start: int, steps: int, save_at: int | None = None) -> list[tuple[str, list[float]]]:
        seen: list[tuple[str, list[float]]] = []
        epoch, done = divmod(start, BATCHES_PER_EPOCH)
        while len(seen) < steps:
            run.loader.set_epoch(epoch)
            active = run.accelerator.skip_first_batches(run.loader, done) if done else run.loader
            for batch in active:
                seen += run.train(iter([batch]), 1)
                if start + len(seen) == save_at:
                    save_state(run.accelerator, tmp_path / "ckpt")
                if len(seen) == steps:
                    break
            epoch, done = epoch + 1, 0
        return seen

    options = {"stateful": False, "generator": True}
    with pytest.warns(UserWarning, match="position in the epoch is not saved.*skip_first_batches"):
        expected = loop(Run(**options), 0, 20, save_at=7)
    resumed = Run(seed=1, **options)
    load_state(resumed.accelerator, tmp_path / "ckpt")
    assert resumed.counter.seen == 7 * BATCH
    assert loop(resumed, 7, 13) == expected[7:]


def test_a_mid_epoch_save_that_cannot_resume_exactly_warns(tmp_path):
    run = Run(seedable=False, stateful=False)  # Accelerate's defaults
    batches = run.batches()
    run.train(batches, 2)
    with pytest.warns(UserWarning, match=r"dataloaders\.0: saved mid-epoch.*use_seedable_sampler=True"):
        save_state(run.accelerator, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per loader
        save_state(run.accelerator, tmp_path / "b")


# ------------------------------------------------------------------------------------- kill test
def _start(directory: Path, kill_at: int | None = None) -> subprocess.Popen[str]:
    """accelerate_run.py; with ``kill_at`` it waits on stdin right after printing that step."""
    cmd = [sys.executable, str(RUN), "--dir", str(directory), "--total-steps", "30", "--save-every", "4"]
    cmd += [] if kill_at is None else ["--pause-at", str(kill_at)]
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )


def _follow(proc: subprocess.Popen[str], losses: dict[int, str], starts: list[int], kill_at: int | None = None) -> int:
    """Record each step's loss (a rerun step overrides the killed run's); SIGKILL at step ``kill_at``."""
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        words = line.split()
        if words[:1] == ["start"]:
            starts.append(int(words[1]))
        if words[:1] == ["step"]:
            losses[int(words[1])] = words[3]
            if int(words[1]) == kill_at:
                proc.send_signal(signal.SIGKILL)
                break
    stderr = proc.stderr.read()
    code = proc.wait(timeout=120)
    assert code in (0, -signal.SIGKILL), stderr
    return code


@pytest.mark.slow
def test_sigkilled_training_subprocess_resumes_bit_identically(tmp_path):
    uninterrupted = _start(tmp_path / "reference")  # runs beside the killed one
    losses: dict[int, str] = {}
    starts: list[int] = []
    run = tmp_path / "killed"
    assert _follow(_start(run, kill_at=14), losses, starts, kill_at=14) == -signal.SIGKILL
    assert _follow(_start(run, kill_at=23), losses, starts, kill_at=23) == -signal.SIGKILL  # resumed at 12: epoch end
    assert _follow(_start(run), losses, starts) == 0  # resumed from step 20: mid-epoch
    assert starts == [0, 12, 20]

    expected: dict[int, str] = {}
    assert _follow(uninterrupted, expected, []) == 0
    assert sorted(expected) == list(range(1, 31))
    assert losses == expected, [s for s in expected if losses.get(s) != expected[s]][:5]
    assert_same(trainstate.load(run / "final"), trainstate.load(tmp_path / "reference" / "final"))
    assert trainstate.CheckpointManager(run / "checkpoints").steps() == [5, 6]  # total_limit=2 of iterations 0..6


# ------------------------------------------------------------------------- two processes (gloo)
def _ranks(directory: Path, total_steps: int, world: int = 2) -> list[subprocess.Popen[str]]:
    """accelerate_run.py as ``world`` processes of one gloo job, the way ``accelerate launch`` starts them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(RUN), "--dir", str(directory), "--total-steps", str(total_steps), "--save-every", "4"]
    launch = {"WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1"}
    return [
        subprocess.Popen(
            cmd,
            env={**os.environ, **launch, "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for rank in range(world)
    ]


def _per_rank(procs: list[subprocess.Popen[str]]) -> list[tuple[int, dict[int, str]]]:
    """Each rank's start step and per-step losses, once every rank exited cleanly."""
    outputs = [proc.communicate(timeout=120) for proc in procs]
    found = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        starts = [int(line.split()[1]) for line in out.splitlines() if line.startswith("start ")]
        losses = {int(w[1]): w[3] for w in (line.split() for line in out.splitlines()) if w[:1] == ["step"]}
        found.append((starts[0], losses))
    return found


@pytest.mark.slow
def test_a_two_process_run_resumes_every_rank_bit_identically(tmp_path):
    run, reference = tmp_path / "run", tmp_path / "reference"
    uninterrupted = _ranks(reference, total_steps=20)  # runs beside the interrupted one
    first = _per_rank(_ranks(run, total_steps=10))  # checkpoints at steps 4 and 8, stops at 10
    resumed = _per_rank(_ranks(run, total_steps=20))
    expected = _per_rank(uninterrupted)
    assert expected[0][1] != expected[1][1]  # each rank trains on its own shard of the data
    for rank in range(2):
        assert (first[rank][0], resumed[rank][0]) == (0, 8), rank
        assert sorted(expected[rank][1]) == list(range(1, 21))
        assert {**first[rank][1], **resumed[rank][1]} == expected[rank][1], rank
    assert sorted(os.listdir(run / "checkpoints" / "step_00000004")) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert_same(trainstate.load(run / "final"), trainstate.load(reference / "final"))
