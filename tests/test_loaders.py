"""Exact resume of torchdata's StatefulDataLoader as users write it: every configuration, every
checkpoint position of an epoch, compared with an uninterrupted run over the epochs that follow."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import trainstate
from support import epoch_loop
from trainstate.loaders import GENERATORS_KEY

torchdata = pytest.importorskip("torchdata.stateful_dataloader")
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402
from torchdata.stateful_dataloader.sampler import RandomSampler  # noqa: E402

DATASET = TensorDataset(torch.arange(12))
BATCH = 4
BATCHES = 3  # per epoch
LATER_EPOCHS = 4  # compared after the one a checkpoint is taken in

CONFIGS: dict[str, Callable[[int], StatefulDataLoader]] = {
    "shuffle_generator": lambda workers: StatefulDataLoader(
        DATASET, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1), num_workers=workers
    ),
    "shuffle_no_generator": lambda workers: StatefulDataLoader(
        DATASET, batch_size=BATCH, shuffle=True, num_workers=workers
    ),
    "torchdata_sampler": lambda workers: StatefulDataLoader(
        DATASET,
        batch_size=BATCH,
        sampler=RandomSampler(DATASET, generator=torch.Generator().manual_seed(2)),
        num_workers=workers,
    ),
    "persistent_workers": lambda workers: StatefulDataLoader(
        DATASET,
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
        num_workers=max(workers, 1),
        persistent_workers=True,
    ),
}


def train(make: Callable[[], StatefulDataLoader], **kwargs: Any) -> list[tuple[int, list[int], str]]:
    """The loop a user writes over the loader (see support.epoch_loop)."""
    torch.manual_seed(0 if kwargs.get("resume") is None else 12345)  # a resumed process starts elsewhere
    loader = make()
    return epoch_loop({"loader": loader, "rng": trainstate.RNGState()}, lambda: loader, **kwargs)


POSITIONS = [(epoch, done) for epoch in (0, 1) for done in range(BATCHES + 1)]


@pytest.mark.filterwarnings("ignore:.*cannot resume exactly.*worker processes")  # its dataset draws nothing
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
@pytest.mark.parametrize("workers", [0, 2], ids=["workers0", "workers2"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_resume_at_every_position_is_exact(tmp_path, config, workers):
    if config == "persistent_workers" and workers == 0:
        pytest.skip("persistent_workers needs workers")
    make = lambda: CONFIGS[config](workers)  # noqa: E731
    for epoch, done in POSITIONS:
        epochs = epoch + 1 + LATER_EPOCHS
        full = train(make, epochs=epochs)
        ckpt = tmp_path / f"e{epoch}b{done}"
        before = train(make, epochs=epochs, stop=(epoch, done), save_to=ckpt)
        after = train(make, epochs=epochs, resume=(ckpt, (epoch, done)))
        assert before + after == full, f"diverged after a checkpoint at epoch {epoch}, batch {done}"
        assert len(full) == epochs * BATCHES


def test_native_state_is_kept_and_generators_are_added(tmp_path):
    loader = CONFIGS["shuffle_generator"](0)
    next(iter(loader))
    trainstate.save(tmp_path / "c", {"loader": loader})
    saved = trainstate.load(tmp_path / "c")["loader"]
    assert set(loader.state_dict()) <= set(saved)
    assert torch.equal(saved[GENERATORS_KEY]["loader"], loader.generator.get_state())


def test_unverified_torchdata_falls_back_to_native_behaviour(tmp_path, monkeypatch):
    import trainstate.loaders as loaders

    monkeypatch.setattr(loaders, "_VERIFIED_TORCHDATA", ("99.",))
    loader = CONFIGS["shuffle_generator"](0)
    next(iter(loader))
    trainstate.save(tmp_path / "c", {"loader": loader})
    assert GENERATORS_KEY not in trainstate.load(tmp_path / "c")["loader"]
    fresh = CONFIGS["shuffle_generator"](0)
    trainstate.load(tmp_path / "c", {"loader": fresh})
    assert fresh.next_iter_state is not None  # torchdata's own lazy restore


def _warnings_on_save(tmp_path: Path, loader: Any) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainstate.save(tmp_path / "c", {"train_loader": loader})
        trainstate.save(tmp_path / "c", {"train_loader": loader})  # once per loader, not per save
    return [str(w.message) for w in caught if "cannot resume exactly" in str(w.message)]


@pytest.mark.parametrize(
    "make, needle",
    [
        (
            lambda: StatefulDataLoader(DATASET, batch_size=BATCH, sampler=torch.utils.data.RandomSampler(DATASET)),
            "torch.utils.data.RandomSampler",
        ),
        (
            lambda: StatefulDataLoader(
                DATASET,
                batch_size=BATCH,
                sampler=RandomSampler(DATASET, replacement=True, generator=(g := torch.Generator())),
                generator=g,
            ),
            "with replacement",
        ),
        (lambda: StatefulDataLoader(DATASET, batch_size=BATCH, num_workers=1), "worker processes"),
    ],
    ids=["torch_random_sampler", "replacement_shared_generator", "workers_stateless_dataset"],
)
def test_inexact_configurations_warn_once_naming_the_loader(tmp_path, make, needle):
    messages = _warnings_on_save(tmp_path, make())
    assert len(messages) == 1 and needle in messages[0] and "state['train_loader']" in messages[0]


def test_exact_configuration_does_not_warn(tmp_path):
    assert _warnings_on_save(tmp_path, CONFIGS["shuffle_generator"](0)) == []
