"""trainstate.integrations.lightning against the real PyTorch Lightning: ModelCheckpoint writing trainstate
checkpoint directories (top-k, save_last True and "link"), ``fit(ckpt_path="last")`` past a damaged last
checkpoint, a resume from every batch position that continues bit for bit, and a SIGKILLed training
subprocess (killed inside the save of last.ckpt) that resumes with identical per-step losses."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import trainstate
from support import assert_same
from trainstate.integrations.lightning import ExactResume, TrainstateCheckpointIO

RUN = Path(__file__).with_name("lightning_run.py")
ROOT = Path(__file__).resolve().parents[2]
BATCHES, BATCH = 4, 8
pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning_fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),  # resumed into a directory of its own, on purpose
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),  # torchdata's own
    pytest.mark.filterwarnings(
        "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"
    ),  # Lightning's, on torch 2.13
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),  # resumed into it
]


class Net(pl.LightningModule):
    """Dropout (so the RNG matters), AdamW and a per-step StepLR; records each step's loss as float.hex()."""

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        if hparams:
            self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)
        )
        self.losses: dict[int, str] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.net(inputs), targets)
        self.log("train_loss", loss)
        self.losses[self.global_step + 1] = loss.item().hex()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(inputs), targets))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


_DATA = torch.Generator().manual_seed(11)
DATASET = TensorDataset(
    torch.randn(BATCHES * BATCH, 4, generator=_DATA), torch.randn(BATCHES * BATCH, 1, generator=_DATA)
)


def make_loader(kind: str) -> Any:
    """The training loader: ``stateful`` (torchdata, shuffle=True), ``sampler`` (DataLoader + ResumableSampler
    + own generator), ``sampler-nogen`` (the same without generator=), ``plain`` (DataLoader(shuffle=True));
    ``-workers`` runs two worker processes (persistent ones for ``sampler``)."""
    base = kind.removesuffix("-workers")
    options: dict[str, Any] = {"num_workers": 2, "persistent_workers": base == "sampler"} if base != kind else {}
    if base == "stateful":
        return StatefulDataLoader(DATASET, batch_size=BATCH, shuffle=True, **options)
    if base == "plain":
        return DataLoader(DATASET, batch_size=BATCH, shuffle=True)
    sampler = trainstate.ResumableSampler(DATASET, seed=5)
    generator = None if base == "sampler-nogen" else torch.Generator()
    return DataLoader(DATASET, batch_size=BATCH, sampler=sampler, generator=generator, **options)


def fit(
    checkpoint: ModelCheckpoint,
    *,
    kind: str = "stateful",
    epochs: int = 2,
    ckpt_path: str | os.PathLike[str] | None = None,
    plugins: list[Any] | None = None,
    exact: bool = True,
    val_check_interval: int | None = None,
    model: Net | None = None,
) -> tuple[Net, pl.Trainer]:
    """One ``Trainer.fit`` on a fresh model, seeded as a script would seed it."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = model or Net()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=val_check_interval,
        plugins=[TrainstateCheckpointIO()] if plugins is None else plugins,
        callbacks=[checkpoint, *([ExactResume()] if exact else [])],
    )
    validation = DataLoader(DATASET, batch_size=16)  # no generator: iterating it draws from the global RNG
    trainer.fit(model, make_loader(kind), validation, ckpt_path=ckpt_path)
    return model, trainer


def every_step(directory: Path, hook: str = "batch") -> ModelCheckpoint:
    """A checkpoint after every batch, saved in on_train_batch_end (``batch``) or in on_validation_end
    (``validation``, validating after each batch); or after every epoch, in on_train_epoch_end (``epoch``)."""
    if hook == "batch":
        return ModelCheckpoint(dirpath=directory, every_n_train_steps=1, save_top_k=-1)
    return ModelCheckpoint(dirpath=directory, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=hook == "epoch")


def final_state(model: Net, trainer: pl.Trainer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict()}


def by_step(directory: Path) -> dict[int, Path]:
    return {trainstate.peek(p).step: p for p in directory.iterdir() if p.name.startswith("epoch=")}  # type: ignore[misc]


# ---------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize(
    "kind, hook",
    [
        ("stateful", "batch"),
        ("stateful", "validation"),
        ("stateful", "epoch"),
        ("sampler", "batch"),
        ("sampler", "validation"),
        ("sampler", "epoch"),
        ("sampler-nogen", "batch"),
        pytest.param(  # a dataset drawing random numbers in its workers would not be exact: warned
            "stateful-workers", "batch", marks=pytest.mark.filterwarnings("ignore:.*it has 2 worker processes")
        ),
        ("sampler-workers", "validation"),
    ],
)
def test_a_resume_from_every_batch_position_continues_bit_for_bit(tmp_path, kind, hook):
    """Checkpoints after every batch of two epochs (mid-epoch, after an epoch's last batch, before and after
    validation) or after each epoch; a fresh Trainer resumed from each trains the rest exactly as the
    uninterrupted run: every step's loss, the final weights and optimizer moments."""
    options = {"kind": kind, "val_check_interval": 1 if hook == "validation" else None}
    reference, trainer = fit(every_step(tmp_path / "reference", hook), **options)
    expected = final_state(reference, trainer)
    steps = 2 * BATCHES
    assert sorted(reference.losses) == list(range(1, steps + 1))
    checkpoints = by_step(tmp_path / "reference")
    assert sorted(checkpoints) == ([BATCHES, steps] if hook == "epoch" else list(range(1, steps + 1)))
    for step in sorted(checkpoints)[:-1]:
        resumed, trainer = fit(every_step(tmp_path / f"resumed-{step}", hook), ckpt_path=checkpoints[step], **options)
        assert resumed.losses == {s: reference.losses[s] for s in range(step + 1, steps + 1)}, step
        assert_same(final_state(resumed, trainer), expected)


def test_exact_resume_works_with_lightnings_own_torch_checkpoints_too(tmp_path):
    reference, trainer = fit(every_step(tmp_path / "reference"), plugins=[])
    checkpoint = tmp_path / "reference" / "epoch=0-step=2.ckpt"
    assert checkpoint.is_file()  # torch.save, as Lightning writes it
    resumed, trainer = fit(every_step(tmp_path / "resumed"), plugins=[], ckpt_path=checkpoint)
    assert resumed.losses == {s: reference.losses[s] for s in range(3, 2 * BATCHES + 1)}


def test_without_exact_resume_lightning_alone_does_not_continue_exactly(tmp_path):
    """The control: Lightning restores the StatefulDataLoader's position but not the RNG streams."""
    reference, _ = fit(every_step(tmp_path / "reference"), exact=False)
    resumed, _ = fit(every_step(tmp_path / "resumed"), exact=False, ckpt_path=by_step(tmp_path / "reference")[2])
    assert resumed.losses[3] != reference.losses[3]  # another dropout mask


def test_a_loader_without_a_saved_position_warns_once_naming_it(tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit(every_step(tmp_path), kind="plain", epochs=1)  # four saves
    found = [str(w.message) for w in seen if "has no saved position" in str(w.message)]
    assert len(found) == 1 and found[0].startswith("train_dataloader[0] (DataLoader with RandomSampler)")
    assert "trainstate.ResumableSampler" in found[0]


def test_resuming_with_other_loaders_is_refused_naming_the_loader(tmp_path):
    fit(every_step(tmp_path / "sampler"), kind="sampler", epochs=1)
    with pytest.raises(
        trainstate.StateMismatchError, match=r"\[.loaders.\]\[0\]: saved from a DataLoader with a trainstate"
    ):
        fit(every_step(tmp_path / "other"), ckpt_path=by_step(tmp_path / "sampler")[2])


# ------------------------------------------------------------------------------- the CheckpointIO
def test_model_checkpoint_writes_trainstate_directories_and_top_k_removes_them(tmp_path):
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=1, save_top_k=2, monitor="train_loss", save_last=True
    )
    model, trainer = fit(checkpoint)  # 8 saves, top 2 kept
    kept = {Path(p).name for p in checkpoint.best_k_models}
    assert len(kept) == 2 and {p.name for p in tmp_path.iterdir()} == kept | {"last.ckpt"}
    for name in kept | {"last.ckpt"}:
        files = {p.name for p in (tmp_path / name).iterdir()}
        assert "manifest.json" in files and all(f.endswith(".safetensors") for f in files - {"manifest.json"})
    last = trainstate.load(tmp_path / "last.ckpt")  # verified, and nothing pickled (allow_pickle=False)
    assert_same(last["state_dict"], model.state_dict())
    assert_same(last["optimizer_states"][0], trainer.optimizers[0].state_dict())
    assert last["global_step"] == 2 * BATCHES and last["callbacks"]["ExactResume"]["loaders"][0]["loader"]
    best = trainer.validate(model, DataLoader(DATASET, batch_size=16), ckpt_path="best", verbose=False)
    assert trainer.ckpt_path == checkpoint.best_model_path and set(best[0]) == {"val_loss"}  # read by the plugin
    peeked = trainstate.peek(tmp_path / "last.ckpt")
    assert (peeked.step, peeked.metadata) == (2 * BATCHES, {"step": 2 * BATCHES, "epoch": 1})
    from typer.testing import CliRunner

    from trainstate.cli.app import app

    listing = CliRunner().invoke(app, ["ls", str(tmp_path), "--json"])
    assert listing.exit_code == 0, listing.output
    rows = {row["name"]: (row["step"], row["epoch"], row["status"]) for row in json.loads(listing.stdout)}
    found = {name: trainstate.peek(tmp_path / name).metadata for name in kept | {"last.ckpt"}}
    assert rows == {name: (meta["step"], meta["epoch"], "ok") for name, meta in found.items()}


def test_save_last_link_and_a_full_save_onto_the_link(tmp_path):
    def linking(directory: Path) -> ModelCheckpoint:
        return ModelCheckpoint(
            dirpath=directory, every_n_train_steps=1, save_top_k=2, monitor="train_loss", save_last="link"
        )

    reference, _ = fit(linking(tmp_path / "reference"), epochs=2)
    checkpoint = linking(tmp_path / "run")
    fit(checkpoint, epochs=1)
    link = tmp_path / "run" / "last.ckpt"
    assert link.is_symlink() and os.readlink(link) in {Path(p).name for p in checkpoint.best_k_models}
    assert trainstate.peek(link).step == BATCHES
    resumed, _ = fit(linking(tmp_path / "run"), ckpt_path="last", epochs=2)  # through the link
    assert resumed.losses == {s: reference.losses[s] for s in range(BATCHES + 1, 2 * BATCHES + 1)}
    # ModelCheckpoint(save_last="link") saves a full checkpoint at the link when its process has not
    # saved a top-k one yet: the link is replaced, its target left as it was.
    target = link.parent / os.readlink(link)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    TrainstateCheckpointIO().save_checkpoint({"global_step": 99, "w": torch.ones(3)}, link)
    assert not link.is_symlink() and trainstate.load(link)["global_step"] == 99
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in link.parent.iterdir() if p.name.startswith(".")] == []  # nothing left aside


def test_remove_checkpoint_removes_only_checkpoints_and_links(tmp_path, caplog):
    plugin = TrainstateCheckpointIO()
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.ckpt")
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "b.ckpt")
    (tmp_path / "last.ckpt").symlink_to("b.ckpt")
    torch.save({"w": torch.ones(2)}, tmp_path / "torch.ckpt")
    (tmp_path / "other.ckpt").mkdir()
    (tmp_path / "other.ckpt" / "notes.txt").write_text("mine")
    plugin.remove_checkpoint(tmp_path / "a.ckpt")
    plugin.remove_checkpoint(tmp_path / "last.ckpt")
    plugin.remove_checkpoint(tmp_path / "missing.ckpt")
    with caplog.at_level(logging.WARNING, logger="trainstate.integrations.lightning"):
        plugin.remove_checkpoint(tmp_path / "torch.ckpt")
        plugin.remove_checkpoint(tmp_path / "other.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.ckpt", "other.ckpt", "torch.ckpt"]
    assert torch.equal(trainstate.load(tmp_path / "b.ckpt")["w"], torch.ones(2))  # the link's target is intact
    assert [r.getMessage().split(": ")[1].split(";")[0] for r in caplog.records] == [
        "not a trainstate checkpoint, so it was not removed"
    ] * 2


def flip_a_bit(checkpoint: Path) -> None:
    data = next(checkpoint.glob("*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x01
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["bit flip", "manifest missing"])
def test_fit_from_a_damaged_last_checkpoint_falls_back_to_the_newest_that_verifies(tmp_path, caplog, damage):
    reference, trainer = fit(ModelCheckpoint(dirpath=tmp_path / "reference"), epochs=2)
    expected = final_state(reference, trainer)
    directory = tmp_path / "run"
    options = {"every_n_train_steps": 2, "save_top_k": -1, "save_last": True}
    fit(ModelCheckpoint(dirpath=directory, **options), epochs=1)
    assert sorted(by_step(directory)) == [2, 4] and trainstate.peek(directory / "last.ckpt").step == 4
    flip_a_bit(directory / "epoch=0-step=4.ckpt")
    if damage == "bit flip":
        flip_a_bit(directory / "last.ckpt")
    else:  # e.g. ModelCheckpoint(save_last="link") killed in the middle of its shutil.rmtree of a last.ckpt
        (directory / "last.ckpt" / "manifest.json").unlink()
    with pytest.raises(trainstate.CheckpointError, match="last.ckpt"):
        fit(
            ModelCheckpoint(dirpath=directory, **options),
            ckpt_path="last",
            plugins=[TrainstateCheckpointIO(fallback=False)],
        )
    with pytest.raises(trainstate.CorruptCheckpointError, match="epoch=0-step=4.ckpt"):  # not a last one: no fallback
        TrainstateCheckpointIO().load_checkpoint(directory / "epoch=0-step=4.ckpt")
    with caplog.at_level(logging.WARNING, logger="trainstate.integrations.lightning"):
        resumed, trainer = fit(ModelCheckpoint(dirpath=directory, **options), ckpt_path="last", epochs=2)
    assert f"{directory / 'last.ckpt'} is damaged; resuming from {directory / 'epoch=0-step=2.ckpt'}" in caplog.text
    assert f"skipped: {directory / 'last.ckpt'} (" in caplog.text and "epoch=0-step=4.ckpt (" in caplog.text
    assert resumed.losses == {s: reference.losses[s] for s in range(3, 2 * BATCHES + 1)}
    assert_same(final_state(resumed, trainer), expected)
    # The run saved on: its newest last checkpoint (what the next fit(ckpt_path="last") picks) verifies. A
    # bit-flipped last.ckpt stays (ModelCheckpoint, restored from step 2, writes last-v1.ckpt beside it: so a
    # crash before that save falls back again); one without a manifest, which no save could replace, was moved aside.
    newest = max(directory.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert newest.name == ("last-v1.ckpt" if damage == "bit flip" else "last.ckpt")
    assert trainstate.load(newest)["global_step"] == 2 * BATCHES
    assert len(list((directory / "trainstate-quarantine").glob("last.ckpt@*"))) == (damage == "manifest missing")


class Opaque:
    """A hyper-parameter trainstate has no safe encoding for."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque)


def test_a_value_trainstate_cannot_encode_is_refused_naming_the_key_and_the_fixes(tmp_path):
    model = Net(width=16, loss=Opaque())
    _, trainer = fit(ModelCheckpoint(dirpath=tmp_path / "none", save_top_k=0), epochs=1, model=model)
    with pytest.raises(trainstate.UnsupportedValueError, match=r"hyper_parameters.*loss.*Opaque") as refused:
        trainer.save_checkpoint(tmp_path / "refused.ckpt")
    assert "save_hyperparameters(ignore=[...])" in str(refused.value) and "allow_pickle=True" in str(refused.value)
    assert not (tmp_path / "refused.ckpt").exists()
    pickling = TrainstateCheckpointIO(allow_pickle=True)
    trainer.strategy.checkpoint_io = pickling
    trainer.save_checkpoint(tmp_path / "pickled.ckpt")
    with pytest.raises(trainstate.UnsafeCheckpointError):
        TrainstateCheckpointIO().load_checkpoint(tmp_path / "pickled.ckpt")
    assert pickling.load_checkpoint(tmp_path / "pickled.ckpt")["hyper_parameters"] == {"width": 16, "loss": Opaque()}


def test_a_torch_checkpoint_file_is_refused_with_how_to_convert_it(tmp_path):
    torch.save({"state_dict": {}, "global_step": 3}, tmp_path / "last.ckpt")
    with pytest.raises(
        trainstate.CheckpointNotFoundError, match=r"a file, not a trainstate checkpoint.*trainstate convert"
    ):
        TrainstateCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(TypeError, match=r"fallback='yes'\): pass True or False"):
        TrainstateCheckpointIO(fallback="yes")  # type: ignore[arg-type]


def test_under_a_process_group_rank_zero_saves_alone(tmp_path, monkeypatch):
    """Lightning calls the plugin on global rank 0 only: its save must not be trainstate's collective one."""
    monkeypatch.setattr(trainstate.api, "active_world", lambda: (0, 2))
    TrainstateCheckpointIO().save_checkpoint(
        {"state_dict": {"w": torch.ones(2)}, "global_step": 1}, tmp_path / "x.ckpt"
    )
    assert torch.equal(trainstate.load(tmp_path / "x.ckpt")["state_dict"]["w"], torch.ones(2))


def test_loaded_tensors_are_on_the_cpu_unless_map_location_says_otherwise(tmp_path):
    plugin = TrainstateCheckpointIO()
    plugin.save_checkpoint({"w": torch.ones(2)}, tmp_path / "c.ckpt")
    assert plugin.load_checkpoint(tmp_path / "c.ckpt")["w"].device == torch.device("cpu")
    assert plugin.load_checkpoint(tmp_path / "c.ckpt", map_location="meta")["w"].is_meta


# ------------------------------------------------------------------------------------- kill test
def _start(directory: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(RUN), "--dir", str(directory), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _read(
    process: subprocess.Popen[str], losses: dict[int, str], until: Callable[[str], bool] = lambda line: False
) -> list[str]:
    """Collect ``step N loss X`` lines (a rerun step overrides the killed run's) until ``until(line)``."""
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        words = line.split()
        if words[:1] == ["step"]:
            losses[int(words[1])] = words[3]
        if until(line):
            break
    return lines


@pytest.mark.slow
def test_a_training_process_killed_inside_a_save_resumes_with_identical_losses(tmp_path):
    """SIGKILL while last.ckpt of step 8 is being written (its files written, not committed), mid-epoch:
    the previous last.ckpt (step 4) is intact, ``fit(ckpt_path="last")`` resumes from it, and every step's
    loss and the final weights and optimizer moments equal an uninterrupted run's."""
    reference = _start(tmp_path / "reference")  # runs beside the killed one
    killed = _start(tmp_path / "run", "--stall-save", "8")
    losses: dict[int, str] = {}
    lines = _read(killed, losses, until=lambda line: line.startswith("saving ") and line.rstrip().endswith("last.ckpt"))
    assert lines[-1].startswith("saving "), "".join(lines) + (killed.stderr.read() if killed.stderr else "")
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert max(losses) == 7  # step 8 trained (its loss is printed after the save), last.ckpt not committed
    checkpoints = tmp_path / "run" / "checkpoints"
    assert trainstate.peek(checkpoints / "last.ckpt").step == 4
    assert any(p.name.startswith(".trainstate-tmp") for p in checkpoints.iterdir())  # the killed writer's
    resumed = _start(tmp_path / "run")
    lines = _read(resumed, losses)
    assert resumed.wait(timeout=120) == 0, "".join(lines) + (resumed.stderr.read() if resumed.stderr else "")
    assert "start 4\n" in lines
    expected: dict[int, str] = {}
    _read(reference, expected)
    assert reference.wait(timeout=120) == 0
    assert sorted(expected) == list(range(1, 22)) and losses == expected
    assert_same(trainstate.load(tmp_path / "run" / "final"), trainstate.load(tmp_path / "reference" / "final"))
    assert not any(p.name.startswith(".trainstate-tmp") for p in checkpoints.iterdir())  # cleaned by the next save
    assert trainstate.peek(checkpoints / "last.ckpt").step == 20  # the last save (none at the end: saved this run)
