"""trainstate convert: real torch.save / Lightning / Hugging Face Trainer / DCP checkpoints into trainstate
(restored into live objects, bit for bit), trainstate back to torch.save, and refusing unsafe pickles."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from cli_sources import Evil, need

import trainstate
from trainstate.convert import load_torch_file


def assert_same(a, b, path="") -> None:
    """Exact equality of nested data: torch.equal for tensors, np.array_equal for arrays, == otherwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    else:
        assert a == b and type(a) is type(b), (path, a, b)


def test_torch_save_file_round_trip(cli, sources, tmp_path):
    src = sources["torch"]
    original = torch.load(src, weights_only=False)  # our own file: trusted
    result = cli("convert", src, tmp_path / "ckpt")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [
        f"converted torch checkpoint {src} -> {tmp_path / 'ckpt'}",
        "  keys: epoch, model, optimizer, scheduler, rng, loss, history",
    ]
    loaded = trainstate.load(tmp_path / "ckpt")
    assert_same(loaded, original)
    assert list(loaded["optimizer"]["state"]) == [0, 1, 2, 3]  # int param ids survive
    meta = json.loads(cli("inspect", tmp_path / "ckpt", "--json").stdout)["metadata"]
    assert meta == {
        "epoch": 3,
        "metrics": {"loss": 0.25},
        "source": {"kind": "torch", "path": str(src), "native": False},
    }

    back = cli("convert", tmp_path / "ckpt", tmp_path / "back.pt")
    assert back.exit_code == 0, back.stderr
    assert_same(load_torch_file(tmp_path / "back.pt"), original)

    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainstate.load(tmp_path / "ckpt", {"model": model, "optimizer": optimizer})
    assert_same(dict(model.state_dict()), dict(original["model"]))
    assert_same(optimizer.state_dict(), original["optimizer"])


def test_bare_tensor_file_round_trip(cli, tmp_path):
    torch.save([torch.arange(3), torch.ones(2)], tmp_path / "list.pth")
    assert cli("convert", tmp_path / "list.pth", tmp_path / "ckpt").exit_code == 0
    assert list(trainstate.load(tmp_path / "ckpt")) == ["data"]
    assert cli("convert", tmp_path / "ckpt", tmp_path / "back.pth").exit_code == 0
    assert_same(torch.load(tmp_path / "back.pth", weights_only=True), [torch.arange(3), torch.ones(2)])


def test_lightning(cli, sources, tmp_path):
    src = need(sources, "lightning")
    ckpt = torch.load(src, weights_only=False)
    result = cli("convert", src, tmp_path / "pl", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["source"] == "lightning" and summary["keys"] == ["model", "optimizer", "scheduler", "lightning"]
    [monitor] = [cb for cb in ckpt["callbacks"].values() if cb.get("monitor")]
    assert summary["metadata"]["step"] == ckpt["global_step"] == 2
    assert summary["metadata"]["epoch"] == ckpt["epoch"]
    assert summary["metadata"]["metrics"] == {"train_loss": float(monitor["current_score"])}
    loaded = trainstate.load(tmp_path / "pl")
    assert_same(dict(loaded["model"]), dict(ckpt["state_dict"]))
    assert loaded["lightning"]["hyper_parameters"] == {"lr": 0.01}
    assert loaded["lightning"]["global_step"] == 2

    # restore into live objects of a plain PyTorch loop: weights, AdamW moments, StepLR position
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
    trainstate.load(tmp_path / "pl", {"optimizer": optimizer, "scheduler": scheduler})
    assert_same(optimizer.state_dict(), ckpt["optimizer_states"][0])
    assert_same(scheduler.state_dict(), ckpt["lr_schedulers"][0])

    plain = json.loads(cli("convert", src, tmp_path / "plain", "--from", "torch", "--json").stdout)
    assert plain["source"] == "torch" and plain["keys"] == list(ckpt)  # as saved, no Lightning mapping
    not_lightning = cli("convert", sources["torch"], tmp_path / "x", "--from", "lightning")
    assert not_lightning.exit_code == 1 and "not a Lightning checkpoint" in not_lightning.stderr

    native = cli("convert", src, tmp_path / "native", "--native")
    assert native.exit_code == 0
    assert cli("convert", tmp_path / "native", tmp_path / "back.ckpt").exit_code == 0
    back = load_torch_file(tmp_path / "back.ckpt")
    assert_same(back["state_dict"], dict(ckpt["state_dict"]))
    assert_same(back["optimizer_states"], ckpt["optimizer_states"])
    assert sorted(back) == sorted(ckpt)


def test_hugging_face_trainer(cli, sources, tmp_path):
    src = need(sources, "hf")
    from safetensors.torch import load_file

    result = cli("convert", src, tmp_path / "hf")
    assert result.exit_code == 0, result.stderr
    assert (
        result.stdout.splitlines()[1]
        == "  keys: model, optimizer, scheduler, rng, trainer_state, config, generation_config"
    )
    assert "skipped training_args.bin: a pickled TrainingArguments object, not training state" in result.stderr
    loaded = trainstate.load(tmp_path / "hf")
    assert_same(loaded["model"], load_file(src / "model.safetensors"))
    assert_same(loaded["optimizer"], torch.load(src / "optimizer.pt", weights_only=True))
    assert_same(loaded["scheduler"], torch.load(src / "scheduler.pt", weights_only=True))
    with open(src / "trainer_state.json") as f:
        trainer_state = json.load(f)
    assert loaded["trainer_state"] == trainer_state
    meta = json.loads(cli("inspect", tmp_path / "hf", "--json").stdout)["metadata"]
    last = trainer_state["log_history"][-1]
    assert meta["step"] == trainer_state["global_step"] == 2 and meta["epoch"] == trainer_state["epoch"]
    assert meta["metrics"] == {k: float(v) for k, v in last.items() if k not in ("step", "epoch")}

    # HF's rng_state.pth (numpy arrays inside) restores through trainstate.RNGState
    saved_rng = load_torch_file(src / "rng_state.pth")
    torch.manual_seed(123)
    random.seed(123)
    trainstate.load(tmp_path / "hf", {"rng": trainstate.RNGState()})
    assert torch.equal(torch.get_rng_state(), saved_rng["cpu"])
    assert random.getstate() == saved_rng["python"]
    assert np.array_equal(np.random.get_state()[1], saved_rng["numpy"][1])


def test_hugging_face_trainer_bin_weights(cli, sources, tmp_path):
    src = need(sources, "hf-bin")
    assert (src / "pytorch_model.bin").exists() and not (src / "model.safetensors").exists()
    assert cli("convert", src, tmp_path / "hf").exit_code == 0
    weights = torch.load(src / "pytorch_model.bin", weights_only=True)
    assert_same(dict(trainstate.load(tmp_path / "hf")["model"]), dict(weights))


def test_dcp(cli, sources, tmp_path):
    src = sources["dcp"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(src, tmp_path / "reference.pt")  # DCP's own reader, as the reference
    reference = torch.load(tmp_path / "reference.pt", weights_only=False)
    result = cli("convert", src, tmp_path / "ckpt", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["keys"] == ["model", "optimizer", "step", "extra"]
    loaded = trainstate.load(tmp_path / "ckpt")
    assert_same(loaded["model"], reference["model"])
    assert loaded["step"] == 5 and loaded["extra"] == {"name": "run-1"}
    assert list(loaded["optimizer"]["state"]) == [0, 1, 2, 3]  # DCP flattens them to "0".."3"
    for pid, state in loaded["optimizer"]["state"].items():
        assert_same(state, reference["optimizer"]["state"][str(pid)])
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    trainstate.load(tmp_path / "ckpt", {"model": model, "optimizer": optimizer})
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], reference["optimizer"]["state"]["0"]["exp_avg"])


def test_refuses_code_in_pickles(cli, sources, tmp_path):
    src, marker = sources["evil"], sources["evil-marker"]
    result = cli("convert", src, tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"error: {src}: cannot be loaded safely: it pickles Python objects of type builtins.exec"
    )
    assert "--trust-pickle" in result.stderr and result.stderr.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()

    dcp_dir = tmp_path / "dcp"
    dcp_dir.mkdir()
    with open(dcp_dir / ".metadata", "wb") as f:
        pickle.dump(Evil(str(marker)), f)
    result = cli("convert", dcp_dir, tmp_path / "out2")
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {dcp_dir / '.metadata'}: refers to builtins.exec, which is not part of DCP metadata; "
        "refusing to unpickle it (it could run code)\n"
    )
    assert not marker.exists()


def test_trust_pickle_and_exclude(cli, tmp_path):
    torch.save({"w": torch.ones(2), "meta": {"when": datetime.date(2024, 1, 2), "n": 1}}, tmp_path / "dated.pt")
    refused = cli("convert", tmp_path / "dated.pt", tmp_path / "a")
    assert refused.exit_code == 1 and "datetime.date" in refused.stderr
    unsupported = cli("convert", tmp_path / "dated.pt", tmp_path / "a", "--trust-pickle")
    assert unsupported.exit_code == 1
    assert unsupported.stderr.startswith("warning: --trust-pickle: unpickling")
    assert "meta.when: cannot save a value of type datetime.date without pickle; leave it out with --exclude KEY" in (
        unsupported.stderr
    )
    ok = cli("convert", tmp_path / "dated.pt", tmp_path / "a", "--trust-pickle", "--exclude", "meta.when")
    assert ok.exit_code == 0, ok.stderr
    assert_same(trainstate.load(tmp_path / "a"), {"w": torch.ones(2), "meta": {"n": 1}})


def test_usage_and_existing_destination(cli, run_dir, sources, tmp_path):
    ckpt = run_dir / "step_00000100"
    assert cli("convert", ckpt, tmp_path / "x.txt").exit_code == 2
    assert cli("convert", sources["torch"], tmp_path / "x", "--from", "keras").exit_code == 2
    (tmp_path / "taken").mkdir()
    taken = cli("convert", sources["torch"], tmp_path / "taken")
    assert (
        taken.exit_code == 1
        and taken.stderr == f"error: {tmp_path / 'taken'}: already exists (pass --force to replace it)\n"
    )
    assert cli("convert", sources["torch"], tmp_path / "taken", "--force").exit_code == 0
    assert os.path.exists(tmp_path / "taken" / "manifest.json")
    missing = cli("convert", tmp_path / "nope.pt", tmp_path / "y")
    assert missing.exit_code == 1 and missing.stderr == f"error: {tmp_path / 'nope.pt'}: no such file or directory\n"


def test_subprocess(subprocess_runs, sources):
    run = subprocess_runs["convert"]
    assert run.returncode == 0, run.stderr
    kind = "lightning" if "lightning" in sources else "torch"
    out = subprocess_runs["_out"].stdout
    assert (
        run.stdout.splitlines()[0]
        == f"converted {kind} checkpoint {sources.get('lightning', sources['torch'])} -> {out}/converted"
    )
    assert os.path.exists(f"{out}/converted/manifest.json")


@pytest.mark.parametrize("kind", ["torch", "dcp", "lightning", "hf"])
def test_every_command_works_on_converted_checkpoints(cli, sources, tmp_path, kind):
    src = need(sources, kind)
    assert cli("convert", src, tmp_path / "c").exit_code == 0
    assert cli("verify", tmp_path / "c").exit_code == 0
    assert cli("inspect", tmp_path / "c").exit_code == 0
    assert json.loads(cli("diff", tmp_path / "c", tmp_path / "c", "--json").stdout)["tensors"]["changed"] == []
    exported = cli("export", tmp_path / "c", tmp_path / "w.safetensors", "--json")
    assert exported.exit_code == 0, exported.stderr
    assert json.loads(exported.stdout)["key"] == "model"


def test_docstring_examples_run():
    import doctest

    import trainstate.convert.conversions
    import trainstate.convert.unpickle

    modules = (trainstate.convert.conversions, trainstate.convert.unpickle)
    results = [doctest.testmod(m, optionflags=doctest.ELLIPSIS) for m in modules]
    assert sum(r.attempted for r in results) == 10 and sum(r.failed for r in results) == 0


def test_source_formats_are_an_open_registry(tmp_path, monkeypatch):
    """Every kind the CLI offers has a format; a new one is one more entry, detected before the
    catch-all ``torch`` file and read through the same `read_source`/`to_trainstate` path."""
    from trainstate.convert import FORMATS, SOURCE_KINDS, ReadOptions, Source, SourceFormat, conversions

    assert set(FORMATS) == set(SOURCE_KINDS)
    assert list(FORMATS)[-1] == "torch"  # tried last: any file is a candidate torch.save file
    seen: list[ReadOptions] = []

    def read(path: str, options: ReadOptions) -> Source:
        seen.append(options)
        with open(path) as f:
            return Source("npy-text", path, {"values": [float(x) for x in f.read().split()]})

    custom = SourceFormat("npy-text", lambda path: path.endswith(".txt"), read)
    monkeypatch.setattr(conversions, "FORMATS", {"npy-text": custom, **FORMATS})
    src = tmp_path / "values.txt"
    src.write_text("1.5 2.5")
    assert conversions.detect_source(src) == "npy-text"
    conversions.to_trainstate(src, tmp_path / "out", trust_pickle=False)
    assert trainstate.load(tmp_path / "out") == {"values": [1.5, 2.5]}
    assert seen[0].detected and not seen[0].trust_pickle
