"""trainstate export: model weights to safetensors / torch.save, key remapping, dtype cast, tied weights."""

from __future__ import annotations

import json
from collections import OrderedDict

import torch
from cli_sources import edit_manifest, need
from safetensors.torch import load_file

import trainstate


def test_safetensors(cli, run_dir, tmp_path):
    result = cli("export", run_dir / "step_00000500", tmp_path / "model.safetensors")
    assert result.exit_code == 0, result.stderr
    size = (tmp_path / "model.safetensors").stat().st_size
    assert result.stdout == (
        f"exported 4 tensors (58 elements) from 'model' to {tmp_path / 'model.safetensors'} (safetensors, {size} B)\n"
    )
    weights = load_file(tmp_path / "model.safetensors")
    saved = trainstate.load(run_dir / "step_00000500")["model"]
    assert list(weights) == sorted(saved)  # safetensors files list keys sorted
    for key, tensor in saved.items():
        assert torch.equal(weights[key], tensor)


def test_prefix_dtype_and_pt(cli, run_dir, tmp_path):
    out = tmp_path / "w.pt"
    result = cli("export", run_dir / "step_00000500", out, "--prefix", "net.", "--dtype", "bf16", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "pt" and report["tensors"] == 4 and report["elements"] == 58
    weights = torch.load(out, weights_only=True)
    saved = trainstate.load(run_dir / "step_00000500")["model"]
    assert isinstance(weights, OrderedDict)
    assert list(weights) == [f"net.{k}" for k in saved]
    for key, tensor in saved.items():
        assert weights[f"net.{key}"].dtype == torch.bfloat16
        assert torch.equal(weights[f"net.{key}"], tensor.to(torch.bfloat16))


def test_lightning_strip_prefix_loads_into_a_plain_module(cli, sources, tmp_path):
    src = need(sources, "lightning")
    assert cli("convert", src, tmp_path / "pl").exit_code == 0
    result = cli("export", tmp_path / "pl", tmp_path / "w.safetensors", "--strip-prefix", "net.")
    assert result.exit_code == 0 and result.stderr == ""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    net.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    ckpt = torch.load(src, weights_only=False)
    assert torch.equal(net[0].weight, ckpt["state_dict"]["net.0.weight"])
    partial = cli("export", tmp_path / "pl", tmp_path / "w2.safetensors", "--strip-prefix", "net.0.")
    assert partial.exit_code == 0
    assert partial.stderr == "warning: 2 of 4 keys do not start with 'net.0.' and keep their names\n"
    assert sorted(load_file(tmp_path / "w2.safetensors")) == ["bias", "net.2.bias", "net.2.weight", "weight"]


def test_tied_weights_and_key_choice(cli, tmp_path, tied_model):
    optimizer = torch.optim.SGD(tied_model.parameters(), lr=0.1)
    trainstate.save(tmp_path / "tied", {"net": tied_model, "opt": optimizer, "note": "x"})
    result = cli("export", tmp_path / "tied", tmp_path / "tied.safetensors")  # the only module state: 'net'
    assert result.exit_code == 0, result.stderr
    weights = load_file(tmp_path / "tied.safetensors")
    assert torch.equal(weights["embed.weight"], weights["head.weight"])
    assert torch.equal(weights["embed.weight"], tied_model.embed.weight.detach())
    opt = cli("export", tmp_path / "tied", tmp_path / "opt.pt", "--key", "opt.param_groups")
    assert opt.exit_code == 1 and "holds no tensors" in opt.stderr


def test_ambiguous_and_missing(cli, tmp_path, make_mlp):
    trainstate.save(tmp_path / "two", {"a": make_mlp(0), "b": make_mlp(1)})
    result = cli("export", tmp_path / "two", tmp_path / "x.safetensors")
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {tmp_path / 'two'}: cannot tell which entry holds the model weights (top-level keys: a, b); "
        "choose one with --key\n"
    )
    assert cli("export", tmp_path / "two", tmp_path / "x.safetensors", "--key", "b").exit_code == 0
    assert torch.equal(load_file(tmp_path / "x.safetensors")["0.weight"], make_mlp(1)[0].weight.detach())
    missing = cli("export", tmp_path / "two", tmp_path / "y.safetensors", "--key", "c")
    assert missing.exit_code == 1 and "no key 'c' (top-level keys: a, b)" in missing.stderr
    exists = cli("export", tmp_path / "two", tmp_path / "x.safetensors", "--key", "a")
    assert exists.exit_code == 1 and "already exists (pass --force to replace it)" in exists.stderr
    assert cli("export", tmp_path / "two", tmp_path / "z.safetensors", "--dtype", "int3").exit_code == 2


def test_subprocess(subprocess_runs, run_dir):
    run = subprocess_runs["export"]
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["key"], report["tensors"], report["elements"], report["format"]) == ("model", 4, 58, "safetensors")
    weights = load_file(report["out"])
    saved = trainstate.load(run_dir / "step_00000500")["model"]
    assert all(torch.equal(weights[k], v) for k, v in saved.items())


def test_checkpoint_saved_on_a_gpu_exports_on_a_cpu(cli, run_copy, tmp_path):
    path = run_copy / "step_00000500"

    def on_gpu(node):
        if node.get("device") == "cpu":
            node["device"] = "cuda:0"

    edit_manifest(path, on_gpu)  # as if saved from CUDA tensors; the bytes are the same
    result = cli("export", path, tmp_path / "w.safetensors")
    assert result.exit_code == 0, result.stderr
    weights = load_file(tmp_path / "w.safetensors")
    saved = trainstate.load(run_copy / "step_00000400")  # untouched neighbour, only to get the key set
    assert sorted(weights) == sorted(saved["model"])
    assert all(t.device.type == "cpu" for t in weights.values())
    diff = cli("diff", run_copy / "step_00000400", path, "--json")
    assert diff.exit_code == 0 and len(json.loads(diff.stdout)["tensors"]["changed"]) == 17
