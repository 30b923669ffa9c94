"""RNGState: after a restore, every generator draws exactly what it drew after the save."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import trainstate


def _draw() -> tuple:
    return (
        random.random(),
        random.getrandbits(64),
        np.random.rand(3).tolist(),
        np.random.normal(),
        torch.rand(4).tolist(),
        torch.randint(0, 1000, (3,)).tolist(),
        torch.randn(2).tolist(),
    )


def test_restore_replays_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draw()
    trainstate.save(tmp_path / "rng", {"rng": trainstate.RNGState()})
    after_save = [_draw() for _ in range(3)]
    trainstate.load(tmp_path / "rng", {"rng": trainstate.RNGState()})
    assert [_draw() for _ in range(3)] == after_save


def test_dropout_mask_is_replayed(tmp_path):
    torch.manual_seed(0)
    dropout = torch.nn.Dropout(0.5)
    trainstate.save(tmp_path / "rng", {"rng": trainstate.RNGState()})
    first = dropout(torch.ones(64))
    trainstate.load(tmp_path / "rng", {"rng": trainstate.RNGState()})
    assert torch.equal(dropout(torch.ones(64)), first)


def test_missing_cuda_device_raises(tmp_path):
    state = trainstate.RNGState().state_dict()
    state["cuda"] = [torch.get_rng_state()] * (torch.cuda.device_count() + 1)
    with pytest.raises(trainstate.StateMismatchError, match="CUDA device"):
        trainstate.RNGState().load_state_dict(state)


@pytest.mark.gpu
def test_cuda_generators_are_captured(tmp_path):
    torch.cuda.manual_seed_all(5)
    trainstate.save(tmp_path / "rng", {"rng": trainstate.RNGState()})
    expected = torch.rand(4, device="cuda").cpu()
    trainstate.load(tmp_path / "rng", {"rng": trainstate.RNGState()})
    assert torch.equal(torch.rand(4, device="cuda").cpu(), expected)
