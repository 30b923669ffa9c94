"""Distributed checkpoints with real process groups (gloo on CPU): FSDP2 and DDP saved by every rank
through DCP into one atomic commit, restored at the same and other world sizes and in a single
process, bit for bit; a rank killed mid-save; a killed and restarted run resuming exactly."""

from __future__ import annotations

import json
import os

import pytest
import torch
import workers
from typer.testing import CliRunner

import trainstate
from trainstate.cli.app import app
from trainstate.format import CheckpointReader
from trainstate.storage import split_path

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def results(directory, prefix):
    return [
        json.loads((directory / name).read_text()) for name in sorted(os.listdir(directory)) if name.startswith(prefix)
    ]


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory):
    """Saved by 4 FSDP2 ranks (and restored by the same 4 ranks) once for the module."""
    directory = tmp_path_factory.mktemp("fsdp")
    assert workers.launch(workers.fsdp_save, 4, str(directory)) == [0, 0, 0, 0]
    return directory


def test_fsdp2_restores_at_the_same_world_size(fsdp_checkpoint):
    seen = results(fsdp_checkpoint, "same-world-")
    assert len(seen) == 4
    for rank, found in enumerate(seen):
        full = True if rank == 0 else None  # the gathered full state lives on rank 0
        assert found == {"rng": True, "model": full, "optimizer": full, "lr": True, "step": 3, "next_loss": True}


def test_one_commit_of_every_rank_s_files(fsdp_checkpoint):
    ckpt = fsdp_checkpoint / "ckpt"
    assert sorted(os.listdir(ckpt)) == ["manifest.json"] + [f"shard-0000{r}.safetensors" for r in range(4)]
    reader = CheckpointReader(*split_path(ckpt))
    reader.verify()
    manifest = reader.manifest
    assert manifest.format_version == 3 and manifest.sharded["world_size"] == 4
    weight = manifest.sharded["tensors"]["model.0.weight"]
    assert weight["shape"] == [16, 6] and [c["offsets"] for c in weight["chunks"]] == [[0, 0], [4, 0], [8, 0], [12, 0]]
    assert set(manifest.sharded["per_rank"]) == {"rng"}  # each rank's RNG streams, nothing else
    assert manifest.tree["v"]["model"]["type"] == "torch.nn.modules.container.Sequential"  # not FSDPSequential


def test_single_process_restores_a_sharded_checkpoint(fsdp_checkpoint):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full_model, full_optimizer = torch.load(fsdp_checkpoint / "full.pt", weights_only=True)
    model, optimizer, scheduler = workers.build(1, seed=7)
    trainstate.load(fsdp_checkpoint / "ckpt", {"model": model, "optimizer": optimizer, "scheduler": scheduler})
    assert all(torch.equal(full_model[k], v) for k, v in model.state_dict().items())
    assert workers._same_optimizer(full_optimizer, get_optimizer_state_dict(model, optimizer))
    assert scheduler.get_last_lr() == [1e-2 * 0.5]
    plain = trainstate.load(fsdp_checkpoint / "ckpt")  # consolidated: full tensors, keyed by parameter name
    assert torch.equal(plain["model"]["0.weight"], full_model["0.weight"]) and plain["step"] == 3
    assert trainstate.peek(fsdp_checkpoint / "ckpt").state["model"]["0.weight"].shape == (16, 6)


def test_single_process_refuses_per_rank_state_it_cannot_have(fsdp_checkpoint, caplog):
    model, optimizer, _ = workers.build(1)
    with pytest.raises(trainstate.StateMismatchError, match=r"per-rank state \['rng'\] was saved by 4 ranks"):
        trainstate.load(fsdp_checkpoint / "ckpt", {"model": model, "rng": trainstate.RNGState()})
    before = torch.get_rng_state()
    trainstate.load(fsdp_checkpoint / "ckpt", {"model": model, "rng": trainstate.RNGState()}, strict=False)
    assert torch.equal(torch.get_rng_state(), before) and "not restored (strict=False)" in caplog.text


def test_cli_reads_sharded_checkpoints(fsdp_checkpoint):
    runner = CliRunner()
    ckpt = str(fsdp_checkpoint / "ckpt")
    assert runner.invoke(app, ["verify", ckpt]).exit_code == 0
    report = json.loads(runner.invoke(app, ["inspect", ckpt, "--json", "--values", "--max-elements", "3"]).stdout)
    assert report["format_version"] == 3
    assert {"key": "model.0.weight", "dtype": "float32", "shape": [16, 6]}.items() <= report["tensors"][0].items()
    listing = json.loads(runner.invoke(app, ["ls", str(fsdp_checkpoint), "--json", "--verify"]).stdout)
    assert [(e["name"], e["status"]) for e in listing] == [("ckpt", "ok")]
    same = runner.invoke(app, ["diff", ckpt, ckpt])
    assert same.exit_code == 0, same.output


def test_damaged_shard_is_refused_before_any_live_tensor_changes(fsdp_checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(fsdp_checkpoint / "ckpt", ckpt)
    data = bytearray((ckpt / "shard-00001.safetensors").read_bytes())
    data[-1] ^= 0x01
    (ckpt / "shard-00001.safetensors").write_bytes(bytes(data))
    model, optimizer, _ = workers.build(1, seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(trainstate.CorruptCheckpointError, match="shard-00001.safetensors: content hash mismatch"):
        trainstate.load(ckpt, {"model": model, "optimizer": optimizer})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fsdp2_reshards_4_to_2_and_loads_into_ddp(fsdp_checkpoint, tmp_path):
    assert workers.launch(workers.fsdp_load, 2, str(fsdp_checkpoint)) == [0, 0]
    seen = results(fsdp_checkpoint, "world-2-")
    assert len(seen) == 2 and seen[0]["model"] and seen[0]["optimizer"]
    for found in seen:
        assert found["lr"] and found["ddp"]  # and into a DDP replica on every rank
        assert "per-rank state ['rng'] was saved by 4 ranks and cannot be resharded to 2" in found["refused"]


def test_ddp_to_single_process(tmp_path):
    assert workers.launch(workers.ddp_save, 2, str(tmp_path)) == [0, 0]
    saved_model, saved_optimizer = torch.load(tmp_path / "full.pt", weights_only=True)
    reader = CheckpointReader(*split_path(tmp_path / "ckpt"))
    tensors = reader.manifest.sharded["tensors"]
    assert set(tensors) == {
        "model.weight",
        "model.bias",
        "optimizer.state.weight.momentum_buffer",
        "optimizer.state.bias.momentum_buffer",
    }
    assert all(len(t["chunks"]) == 1 for t in tensors.values())  # replicated: each written once, by one rank
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainstate.load(tmp_path / "ckpt", {"model": model, "optimizer": optimizer})
    assert all(torch.equal(saved_model[k], v) for k, v in model.state_dict().items())
    momentum = optimizer.state_dict()["state"]
    assert all(
        torch.equal(saved_optimizer["state"][i]["momentum_buffer"], momentum[i]["momentum_buffer"]) for i in (0, 1)
    )


def test_a_rank_killed_mid_save_fails_the_others_and_commits_nothing(tmp_path):
    codes = workers.launch(workers.save_then_die, 2, str(tmp_path), timeout=90)
    assert codes == [0, -9]
    survivor = results(tmp_path, "survivor-")
    assert len(survivor) == 1 and survivor[0]["outcome"].startswith("CheckpointWriteError")
    assert "nothing was committed: another rank failed or stopped responding" in survivor[0]["outcome"]
    assert survivor[0]["seconds"] < 60  # bounded: the dead peer is noticed, not waited for
    assert not (tmp_path / "step2").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".trainstate")] == []  # the coordinator aborted
    trainstate.load(tmp_path / "step1")  # the previous checkpoint is intact
    CheckpointReader(*split_path(tmp_path / "step1")).verify()


@pytest.mark.slow
def test_killed_and_restarted_run_resumes_bit_identically(tmp_path):
    assert workers.launch(workers.train, 2, str(tmp_path), "killed") == [-9, -9]
    assert workers.launch(workers.train, 2, str(tmp_path), "resume") == [0, 0]
    for rank, (killed, run) in enumerate(zip(results(tmp_path, "killed-"), results(tmp_path, "resume-"), strict=True)):
        assert killed == run["reference"][:3], rank
        assert run["resumed"] == run["reference"][3:], rank  # exact floats, per step, per rank


def test_a_state_one_rank_cannot_encode_fails_every_rank_before_writing(tmp_path):
    assert workers.launch(workers.unencodable_on_one_rank, 2, str(tmp_path)) == [0, 0]
    rank0, rank1 = results(tmp_path, "refused-")
    assert "tags: cannot save a value of type builtins.set" in rank1
    assert rank0.startswith(f"{tmp_path / 'ckpt'}: rank(s) [1] could not save their state")
    assert sorted(os.listdir(tmp_path)) == ["refused-0.json", "refused-1.json"]  # nothing written, no temporaries


def test_dcp_load_reads_a_trainstate_checkpoint_through_our_reader(fsdp_checkpoint):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from trainstate.distributed.dcp_io import ShardReader

    full_model, _ = torch.load(fsdp_checkpoint / "full.pt", weights_only=True)
    model, _, _ = workers.build(1, seed=7)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, storage_reader=ShardReader.open(fsdp_checkpoint / "ckpt"), no_dist=True)
    assert all(torch.equal(full_model[k], v) for k, v in state["model"].items())
    with pytest.raises(trainstate.UnsupportedFormatError, match="not a distributed"):
        ShardReader.open(os.path.join(os.path.dirname(__file__), "..", "fixtures", "v2"))


def test_checkpoint_manager_under_torchrun(tmp_path):
    assert workers.launch(workers.managed, 2, str(tmp_path)) == [0, 0]
    for rank, seen in enumerate(results(tmp_path, "managed-")):
        full = True if rank == 0 else None
        assert seen == {"steps": [4, 6], "restored": 4, "after": [4], "model": full, "optimizer": full}, rank
    assert sorted(os.listdir(tmp_path / "step_00000004")) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    assert os.listdir(tmp_path / "trainstate-quarantine")  # the damaged step 6, moved aside once


def test_async_saves_under_torchrun_stage_the_state_and_write_it_in_the_background(tmp_path):
    assert workers.launch(workers.managed_async, 2, str(tmp_path)) == [0, 0]
    for rank, seen in enumerate(results(tmp_path, "async-")):
        full = True if rank == 0 else None
        assert seen["returned_first"] == [True] * 4, rank  # each write began only after save() returned
        assert seen["staging_bytes"] > 0, rank
        assert (seen["steps"], seen["restored"]) == ([3, 4], 4), rank
        assert (seen["model"], seen["optimizer"], seen["rng"]) == (full, full, True), rank
        assert seen["resumed_loss"] == seen["expected_loss"], rank  # the step after the save, bit for bit
    assert sorted(os.listdir(tmp_path / "step_00000004")) == [
        "manifest.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]


def test_an_async_write_failing_on_one_rank_fails_every_rank_and_commits_nothing(tmp_path):
    assert workers.launch(workers.async_write_fails_on_one_rank, 2, str(tmp_path)) == [0, 0]
    for rank, seen in enumerate(results(tmp_path, "failed-")):
        assert seen["outcome"].startswith("CheckpointWriteError"), (rank, seen["outcome"])
        assert "No space left on device" in seen["outcome"] or "rank(s) [1]" in seen["outcome"], seen["outcome"]
        assert seen["after_failure"] == [1], rank
        assert seen["final"] == [1, 3], rank
    assert not (tmp_path / "step_00000002").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".trainstate-tmp")] == []
    CheckpointReader(*split_path(tmp_path / "step_00000001")).verify()


def test_the_manager_s_trigger_agreement_uses_a_device_the_default_backend_takes():
    from trainstate.manager.checkpoint_manager import _reduce_device

    for backend in ("gloo", "mpi", "cpu:gloo,cuda:nccl"):  # NCCL alone: CUDA (tests/test_gpu.py)
        assert _reduce_device(backend) == torch.device("cpu"), backend


def test_export_consolidates_a_sharded_model_one_tensor_at_a_time(fsdp_checkpoint, tmp_path, monkeypatch):
    import gc
    import weakref

    from safetensors.torch import load_file

    import trainstate.cli.export as export

    alive: list[weakref.ref] = []
    real = export._load_one

    def load_one(*args):
        gc.collect()
        assert all(ref() is None for ref in alive), "an earlier tensor is still held"
        tensor = real(*args)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(export, "_load_one", load_one)
    out = tmp_path / "model.safetensors"
    result = CliRunner().invoke(app, ["export", str(fsdp_checkpoint / "ckpt"), str(out), "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    full_model, _ = torch.load(fsdp_checkpoint / "full.pt", weights_only=True)
    weights = load_file(out)
    assert weights.keys() == full_model.keys() and len(alive) == 4
    assert all(torch.equal(weights[k], full_model[k].to(torch.bfloat16)) for k in full_model)
