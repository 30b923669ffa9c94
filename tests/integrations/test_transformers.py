"""trainstate.integrations.transformers: Trainer runs checkpoint through trainstate, and a killed run resumes
bit for bit (per-step losses as float.hex, final weights and optimizer moments) as an uninterrupted one."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import transformers_run as hf

import trainstate
from support import assert_same

RUN = Path(__file__).with_name("transformers_run.py")
ROOT = Path(__file__).resolve().parents[2]
TOTAL = 24  # 9 steps an epoch: the saves at 5, 10, 15, 20 are mid-epoch; save_total_limit=2


def _checkpoints(directory: Path) -> list[str]:
    found = [p.name for p in directory.iterdir() if p.name.startswith("checkpoint-")]
    return sorted(found, key=lambda name: int(name.split("-")[1]))


def _resumable(path: Path) -> dict:
    """What a resume depends on, as saved: everything but the trainer state's timings."""
    saved = trainstate.load(path)
    return {key: saved[key] for key in ("model", "optimizer", "scheduler", "rng", "config")}


class Reference(NamedTuple):
    losses: dict[int, str]
    directory: Path
    final: dict[str, torch.Tensor]  # the model's weights at the end


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """One uninterrupted run, in this process."""
    directory = tmp_path_factory.mktemp("reference")
    report = hf.Report()
    trainer = hf.run(str(directory), TOTAL, report, resume=False)
    assert sorted(report.losses) == list(range(1, TOTAL + 1))
    return Reference(report.losses, directory, {k: v.clone() for k, v in trainer.model.state_dict().items()})


def _copy(reference_dir: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    shutil.copytree(reference_dir, directory)
    return directory


def test_checkpoints_are_trainstate_checkpoints_rotated_by_save_total_limit(reference):
    directory = reference.directory
    assert _checkpoints(directory) == ["checkpoint-20", "checkpoint-24"]  # 5, 10 and 15 rotated out
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no leftovers
    for name in _checkpoints(directory):
        path = directory / name
        files = sorted(p.name for p in path.iterdir())
        assert files == ["manifest.json", "tensors-00000.safetensors", "trainer_state.json"], files
        for file in path.iterdir():
            assert file.read_bytes()[:1] != b"\x80", f"{file} is a pickle"
        saved = trainstate.load(path)  # allow_pickle=False: a pickled value would raise here
        assert sorted(saved) == ["config", "model", "optimizer", "rng", "scheduler", "trainer_state"]
        step = int(name.split("-")[1])
        assert saved["trainer_state"]["global_step"] == step == trainstate.peek(path).step
        mirrored = json.loads((path / "trainer_state.json").read_text())
        assert mirrored["global_step"] == step and mirrored["log_history"] == saved["trainer_state"]["log_history"]
        assert float(saved["trainer_state"]["log_history"][step - 1]["loss"]).hex() == reference.losses[step]
        assert hf.GPT2Config.from_dict(saved["config"]).n_embd == 16  # the model can be rebuilt before loading
    fresh = hf.build_model()
    trainstate.load(directory / "checkpoint-24", {"model": fresh})
    assert_same(dict(fresh.state_dict()), reference.final)  # the trained weights, into a model built from scratch


@pytest.mark.slow
def test_sigkilled_mid_epoch_resumes_bit_identically(tmp_path, reference):
    """A real training subprocess SIGKILLed after step 17 (mid-epoch, two steps after its last save),
    then resumed with resume_from_checkpoint=True."""
    reference_dir = reference.directory
    directory = tmp_path / "run"
    cmd = [sys.executable, str(RUN), "--dir", str(directory), "--max-steps", str(TOTAL), "--pause-at", "17"]
    child = subprocess.Popen(
        cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert child.stdout is not None
    killed, losses, output = {}, {}, []
    for line in child.stdout:
        output.append(line)
        words = line.split()
        if words[:1] == ["step"]:
            losses[int(words[1])] = words[3]
            if int(words[1]) == 17:  # the child now waits on its stdin: it cannot get any further
                child.send_signal(signal.SIGKILL)
                killed = dict(losses)
    assert child.wait(timeout=120) == -signal.SIGKILL, "".join(output)
    assert killed == {s: reference.losses[s] for s in range(1, 18)}
    assert _checkpoints(directory) == ["checkpoint-10", "checkpoint-15"]

    report = hf.Report()
    trainer = hf.run(str(directory), TOTAL, report, resume=True)
    assert report.starts == [15]
    assert report.losses == {s: reference.losses[s] for s in range(16, TOTAL + 1)}
    assert trainer.state.global_step == TOTAL
    assert_same(_resumable(directory / "checkpoint-24"), _resumable(reference_dir / "checkpoint-24"))
    resumed = trainstate.load(directory / "checkpoint-24")["trainer_state"]["log_history"]
    assert resumed == trainstate.load(reference_dir / "checkpoint-24")["trainer_state"]["log_history"]


def test_resume_from_a_path_is_exact_with_loader_workers_and_gradient_accumulation(tmp_path):
    """Two loader worker processes and 2 micro-batches a step (5 steps an epoch): resumed one step into
    the second epoch, from a path given explicitly."""
    options = {"dataloader_num_workers": 2, "gradient_accumulation_steps": 2, "save_steps": 3, "save_total_limit": None}
    expected = hf.Report()
    reference = hf.make_trainer(str(tmp_path / "reference"), 12, expected, **options)
    reference.train()
    report = hf.Report()
    resumed = hf.make_trainer(str(tmp_path / "resumed"), 12, report, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "reference" / "checkpoint-6"))
    assert report.starts == [6]
    assert report.losses == {s: expected.losses[s] for s in range(7, 13)}
    assert_same(dict(resumed.model.state_dict()), dict(reference.model.state_dict()))
    assert_same(resumed.optimizer.state_dict(), reference.optimizer.state_dict())


def test_a_damaged_newest_checkpoint_is_skipped_and_moved_aside(tmp_path, reference, caplog):
    reference_dir = reference.directory
    directory = _copy(reference_dir, tmp_path)
    shard = directory / "checkpoint-24" / "tensors-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))

    untouched = hf.build_model().state_dict()
    explicit = hf.make_trainer(str(directory), TOTAL, hf.Report())
    with pytest.raises(trainstate.CorruptCheckpointError, match="checkpoint-24"):
        explicit.train(resume_from_checkpoint=str(directory / "checkpoint-24"))  # asked for it: no fallback
    assert_same(explicit.model.state_dict(), untouched)  # nothing landed before the hashes were checked

    report = hf.Report()
    with caplog.at_level(logging.WARNING, logger="trainstate.integrations.transformers"):
        hf.run(str(directory), TOTAL, report, resume=True)
    skipped = [r.getMessage() for r in caplog.records if "on resume" in r.getMessage()]
    assert len(skipped) == 1 and "checkpoint-24" in skipped[0] and "hash" in skipped[0].lower()
    assert report.starts == [20]
    assert report.losses == {s: reference.losses[s] for s in range(21, TOTAL + 1)}
    aside = [p.name.partition("@")[0] for p in (directory / "trainstate-quarantine").iterdir()]
    assert aside == ["checkpoint-24"]
    assert _checkpoints(directory) == ["checkpoint-20", "checkpoint-24"]  # saved again, whole
    assert_same(_resumable(directory / "checkpoint-24"), _resumable(reference_dir / "checkpoint-24"))


def test_half_written_and_foreign_checkpoints_are_never_picked(tmp_path, reference, caplog):
    """A killed save's temporary directory, a newer ``checkpoint-N`` without a manifest (a native Trainer
    checkpoint, or a damaged one) and a lost ``trainer_state.json``: the resume takes checkpoint-24."""
    reference_dir = reference.directory
    directory = _copy(reference_dir, tmp_path)
    leftover = directory / ".trainstate-tmp-checkpoint-25-999999999-0123456789ab"  # a dead pid's save
    leftover.mkdir()
    shutil.copy(directory / "checkpoint-20" / "tensors-00000.safetensors", leftover)
    foreign = directory / "checkpoint-28"
    foreign.mkdir()
    shutil.copy(directory / "checkpoint-24" / "trainer_state.json", foreign)
    (directory / "checkpoint-24" / "trainer_state.json").unlink()

    report = hf.Report()
    with caplog.at_level(logging.WARNING, logger="trainstate.integrations.transformers"):
        trainer = hf.run(str(directory), TOTAL + 2, report, resume=True)
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpoint-28" in m and "no manifest.json" in m for m in messages), messages
    assert any("trainer_state.json: missing" in m for m in messages), messages
    assert report.starts == [24] and sorted(report.losses) == [25, 26] and trainer.state.global_step == 26
    assert not leftover.exists()
    assert [p.name.partition("@")[0] for p in (directory / "trainstate-quarantine").iterdir()] == ["checkpoint-28"]
    assert _checkpoints(directory) == ["checkpoint-25", "checkpoint-26"]


def test_best_checkpoint_is_kept_by_rotation_and_loaded_at_end(tmp_path):
    holder: dict[str, hf.TrainstateTrainer] = {}

    def closeness(_: object) -> dict[str, float]:  # best at step 10, whatever the losses
        return {"closeness": -abs(holder["trainer"].state.global_step - 10)}

    trainer = hf.make_trainer(
        str(tmp_path),
        TOTAL,
        hf.Report(),
        eval_dataset=hf.TokenDataset(8, seed=99),
        compute_metrics=closeness,
        eval_strategy="steps",
        eval_steps=5,
        load_best_model_at_end=True,
        metric_for_best_model="closeness",
        greater_is_better=True,
    )
    holder["trainer"] = trainer
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-10")
    assert _checkpoints(tmp_path) == ["checkpoint-10", "checkpoint-24"]  # newest + best, save_total_limit=2
    best = trainstate.load(tmp_path / "checkpoint-10")["model"]
    assert_same(dict(trainer.model.state_dict()), dict(best))
    state = json.loads((tmp_path / "checkpoint-24" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(tmp_path / "checkpoint-10") and state["best_global_step"] == 10
