"""CUDA paths: tensors saved from the GPU, loaded back to it, to the CPU, and into live CUDA modules."""

from __future__ import annotations

import pytest
import torch

import trainstate

pytestmark = pytest.mark.gpu


def test_cuda_tensors_round_trip_to_their_device_and_to_cpu(tmp_path):
    state = {
        "w": torch.randn(64, 64, device="cuda"),
        "bf": torch.randn(8, device="cuda").bfloat16(),
        "cpu": torch.ones(2),
    }
    trainstate.save(tmp_path / "c", state)
    back = trainstate.load(tmp_path / "c")
    assert back["w"].device.type == "cuda" and torch.equal(back["w"], state["w"])
    assert back["bf"].device.type == "cuda" and torch.equal(back["bf"], state["bf"])
    on_cpu = trainstate.load(tmp_path / "c", map_location="cpu")
    assert on_cpu["w"].device.type == "cpu" and torch.equal(on_cpu["w"], state["w"].cpu())
    mapped = trainstate.load(tmp_path / "c", map_location={"cuda:0": "cpu"})
    assert mapped["w"].device.type == "cpu"


def test_live_cuda_model_and_optimizer_resume_identically(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 8).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = torch.randn(16, 32, device="cuda")
    for _ in range(3):
        optimizer.zero_grad()
        model(inputs).pow(2).mean().backward()
        optimizer.step()
    trainstate.save(tmp_path / "c", {"model": model, "optimizer": optimizer, "rng": trainstate.RNGState()})
    expected_next = model(inputs).detach()

    torch.manual_seed(1)
    model2 = torch.nn.Linear(32, 8).cuda()
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    trainstate.load(tmp_path / "c", {"model": model2, "optimizer": optimizer2, "rng": trainstate.RNGState()})
    assert torch.equal(model2(inputs).detach(), expected_next)
    assert optimizer2.state_dict()["state"][0]["exp_avg"].device.type == "cuda"


def test_async_save_copies_cuda_state_before_returning(tmp_path):
    model = torch.nn.Linear(16, 16).cuda()
    expected = model.weight.detach().cpu().clone()
    with trainstate.CheckpointManager(tmp_path, async_save=True) as manager:
        manager.save(1, {"model": model})
        with torch.no_grad():
            model.weight.add_(1)
    assert torch.equal(trainstate.load(tmp_path / "step_00000001", map_location="cpu")["model"]["weight"], expected)


def test_the_manager_s_trigger_agreement_uses_cuda_under_nccl_alone():
    from trainstate.manager.checkpoint_manager import _reduce_device

    assert _reduce_device("nccl") == torch.device("cuda", torch.cuda.current_device())
    assert _reduce_device("cpu:gloo,cuda:nccl") == torch.device("cpu")
