"""ResumableSampler: a restored sampler continues exactly where the saved one stopped, across epochs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import trainstate

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
