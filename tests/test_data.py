"""ResumableSampler: a restored sampler continues exactly where the saved one stopped, across epochs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import trainstate
from support import epoch_loop

DATA = TensorDataset(torch.arange(23.0))


def loader(sampler: trainstate.ResumableSampler, drop_last: bool = False) -> DataLoader:
    return DataLoader(DATA, batch_size=4, sampler=sampler, drop_last=drop_last, generator=torch.Generator())


def batches(sampler: trainstate.ResumableSampler, epochs: int, drop_last: bool = False) -> list[list[float]]:
    out = []
    for _ in range(epochs):
        out += [batch[0].tolist() for batch in loader(sampler, drop_last)]
    return out


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("stop_after", [1, 5, 6, 7, 11])  # 6 batches per epoch (5 with drop_last)
def test_resume_mid_epoch_matches_uninterrupted(tmp_path, drop_last, stop_after):
    reference = batches(trainstate.ResumableSampler(DATA, seed=3), 3, drop_last)

    sampler = trainstate.ResumableSampler(DATA, seed=3)
    seen: list[list[float]] = []
    epoch_iter = iter(loader(sampler, drop_last))
    while len(seen) < stop_after:
        try:
            seen.append(next(epoch_iter)[0].tolist())
        except StopIteration:
            epoch_iter = iter(loader(sampler, drop_last))
    trainstate.save(tmp_path / "c", {"sampler": sampler})

    resumed = trainstate.ResumableSampler(DATA, seed=3)
    trainstate.load(tmp_path / "c", {"sampler": resumed})
    rest = []
    while len(seen) + len(rest) < len(reference):
        rest += [batch[0].tolist() for batch in loader(resumed, drop_last)]
    assert seen + rest == reference


def test_each_epoch_is_a_new_permutation_and_sequential_mode_is_ordered():
    sampler = trainstate.ResumableSampler(DATA, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(23)) and first != second
    assert sampler.epoch == 2
    assert list(trainstate.ResumableSampler(DATA, shuffle=False)) == list(range(23))
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 9}, "sampler.seed"),
        ({"length": 24}, "sampler.length"),
        ({"shuffle": False}, "sampler.shuffle"),
        ({"consumed": 99}, "sampler.consumed"),
    ],
)
def test_a_state_that_does_not_fit_raises(change, message):
    state = {**trainstate.ResumableSampler(DATA, seed=3).state_dict(), **change}
    with pytest.raises(trainstate.StateMismatchError, match=message):
        trainstate.ResumableSampler(DATA, seed=3).load_state_dict(state)


def _loop(make_loader, **kwargs) -> list[tuple[int, list[float], str]]:
    """A user's loop over a plain DataLoader with a ResumableSampler (see support.epoch_loop)."""
    torch.manual_seed(0 if kwargs.get("resume") is None else 999)  # a resumed process starts elsewhere
    sampler = trainstate.ResumableSampler(DATA, seed=3)
    state = {"sampler": sampler, "rng": trainstate.RNGState()}
    return epoch_loop(state, lambda: make_loader(sampler), **kwargs)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_exact_with_prefetching_workers_at_every_position(tmp_path, workers, drop_last):
    def make_loader(sampler):
        return DataLoader(
            DATA, batch_size=4, sampler=sampler, drop_last=drop_last, num_workers=workers, generator=torch.Generator()
        )

    per_epoch = 5 if drop_last else 6
    full = _loop(make_loader, epochs=4)
    for position in [(0, n) for n in range(per_epoch + 1)] + [(1, 2)]:
        ckpt = tmp_path / f"{position[0]}-{position[1]}"
        before = _loop(make_loader, epochs=4, stop=position, save_to=ckpt)
        after = _loop(make_loader, epochs=4, resume=(ckpt, position))
        assert before + after == full, f"diverged after a checkpoint at {position}"


def test_loader_without_generator_warns_that_the_resume_shifted_the_rng(tmp_path):
    def make_loader(sampler):
        return DataLoader(DATA, batch_size=4, sampler=sampler)  # draws from the global RNG per epoch

    _loop(make_loader, epochs=2, stop=(0, 2), save_to=tmp_path / "c")
    with pytest.warns(UserWarning, match="pass generator=torch.Generator"):
        after = _loop(make_loader, epochs=2, resume=(tmp_path / "c", (0, 2)))
    full = _loop(make_loader, epochs=2)
    assert [b for _, b, _ in after] == [b for _, b, _ in full[2:]]  # the data order is still exact


def test_exact_with_persistent_workers_when_set_epoch_is_called(tmp_path):
    """With persistent workers the loader iterator outlives each epoch; set_epoch at the start of an
    epoch tells the sampler which one the loop is in (the README's recipe)."""

    def loop(**kwargs):
        torch.manual_seed(0 if kwargs.get("resume") is None else 999)
        sampler = trainstate.ResumableSampler(DATA, seed=3)
        loader = DataLoader(
            DATA, batch_size=4, sampler=sampler, num_workers=1, persistent_workers=True, generator=torch.Generator()
        )
        epochs = iter(range(kwargs.get("resume", (None, (0, 0)))[1][0], 3))

        def epoch_batches():
            sampler.set_epoch(next(epochs))
            return loader

        return epoch_loop({"sampler": sampler, "rng": trainstate.RNGState()}, epoch_batches, epochs=3, **kwargs)

    full = loop()
    for position in [(0, 3), (0, 6), (1, 0), (1, 5)]:
        ckpt = tmp_path / f"{position[0]}-{position[1]}"
        before = loop(stop=position, save_to=ckpt)
        after = loop(resume=(ckpt, position))
        assert before + after == full, f"diverged after a checkpoint at {position}"
