"""Round trips through trainstate.save/load: every supported value type, torch objects, sharing, map_location."""

from __future__ import annotations

import math
import random
from collections import OrderedDict

import numpy as np
import pytest
import safetensors.torch
import torch

import trainstate
from support import TiedNet, assert_same, train_step

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.bool,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.randint(0, 256, (int(np.prod(shape)) * dtype.itemsize,), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_round_trips_bitwise(tmp_path, dtype):
    torch.manual_seed(0)
    state = {
        "t": _sample(dtype, (3, 5)),
        "scalar": _sample(dtype, ()),
        "empty": _sample(dtype, (0, 4)),
        "strided": _sample(dtype, (6, 4))[:, ::2],
    }
    trainstate.save(tmp_path / "c", state)
    loaded = trainstate.load(tmp_path / "c")
    expected = {k: v.contiguous() for k, v in state.items()}
    assert_same(loaded, expected)
    assert not loaded["strided"].is_contiguous() or state["strided"].is_contiguous() is False


def test_plain_values_round_trip_with_types(tmp_path):
    state = {
        "int": 3,
        "huge": 2**200 + 1,
        "neg_huge": -(2**80),
        "float": 0.1,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "negzero": -0.0,
        "bool": True,
        "none": None,
        "str": "héllo",
        "bytes": b"\x00\xff",
        "tuple": (1, (2.5, "x"), []),
        "list": [1, [2, {"k": 3}]],
        "int_keys": {0: "a", 7: {1: 2}},
        "mixed_keys": {1: "x", "y": 2, (1, 2): 3, None: 4},
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1),
        "odict": OrderedDict([("b", 1), ("a", 2)]),
        "np_array": np.arange(6, dtype=">i4").reshape(2, 3),
        "np_f16": np.ones(3, dtype=np.float16),
        "np_scalar": np.float32(1.5),
        "np_int": np.int64(-3),
        "np_bool": np.bool_(True),
        "py_random": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }
    trainstate.save(tmp_path / "c", state)
    loaded = trainstate.load(tmp_path / "c")
    for key in [
        "int",
        "huge",
        "neg_huge",
        "float",
        "inf",
        "ninf",
        "bool",
        "none",
        "str",
        "bytes",
        "tuple",
        "list",
        "int_keys",
        "mixed_keys",
        "size",
        "dtype",
        "device",
        "odict",
        "py_random",
    ]:
        assert loaded[key] == state[key] and type(loaded[key]) is type(state[key]), key
    assert math.isnan(loaded["nan"]) and math.copysign(1, loaded["negzero"]) == -1
    assert loaded["np_array"].dtype == np.dtype(">i4") and np.array_equal(loaded["np_array"], state["np_array"])
    assert loaded["np_f16"].dtype == np.float16 and np.array_equal(loaded["np_f16"], state["np_f16"])
    for key in ["np_scalar", "np_int", "np_bool"]:
        assert type(loaded[key]) is type(state[key]) and loaded[key] == state[key]
    saved_rng, loaded_rng = state["numpy_rng"], loaded["numpy_rng"]
    assert (
        loaded_rng[0] == saved_rng[0]
        and np.array_equal(loaded_rng[1], saved_rng[1])
        and loaded_rng[2:] == saved_rng[2:]
    )
    assert list(loaded) == list(state)


def test_tensor_files_load_with_safetensors(tmp_path, tied_model):
    trainstate.save(tmp_path / "c", {"model": tied_model, "raw": torch.ones(2, dtype=torch.complex128)})
    files = sorted((tmp_path / "c").glob("*.safetensors"))
    assert files
    tensors = {}
    for f in files:
        tensors.update(safetensors.torch.load_file(f))
    assert torch.equal(tensors["model.embed.weight"], tied_model.embed.weight)
    assert "model.head.weight" not in tensors  # tied: stored once
    assert tensors["raw"].dtype == torch.uint8 and tensors["raw"].numel() == 32  # no safetensors complex128: raw bytes


def test_tied_weights_stay_tied_and_views_are_saved_once(tmp_path, tied_model):
    base = torch.arange(10.0)
    trainstate.save(tmp_path / "c", {"model": tied_model.state_dict(), "a": base, "b": base, "view": base[2:5]})
    loaded = trainstate.load(tmp_path / "c")
    sd = loaded["model"]
    assert sd["embed.weight"] is sd["head.weight"]
    assert loaded["a"] is loaded["b"]
    assert torch.equal(loaded["view"], base[2:5]) and loaded["view"].data_ptr() != loaded["a"].data_ptr()
    fresh = TiedNet()
    fresh.load_state_dict(sd)
    assert fresh.head.weight is fresh.embed.weight and torch.equal(fresh.embed.weight, tied_model.embed.weight)


def test_live_objects_restore_in_place_and_plain_values_return(tmp_path, tied_model):
    optimizer = torch.optim.AdamW(tied_model.parameters(), lr=0.01, amsgrad=True)
    tokens = torch.randint(0, 11, (8,))
    train_step(tied_model, optimizer, tokens)
    trainstate.save(tmp_path / "c", {"model": tied_model, "optim": optimizer, "epoch": 4, "config": {"lr": 0.01}})

    torch.manual_seed(123)
    model2 = TiedNet()
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=0.5, amsgrad=True)
    weight_storage = model2.embed.weight.data_ptr()
    out = trainstate.load(tmp_path / "c", {"model": model2, "optim": optimizer2})
    assert out["model"] is model2 and out["optim"] is optimizer2
    assert out["epoch"] == 4 and out["config"] == {"lr": 0.01}
    assert model2.embed.weight.data_ptr() == weight_storage  # read straight into the live parameter
    assert model2.head.weight is model2.embed.weight
    assert_same(model2.state_dict(), tied_model.state_dict())
    assert_same(optimizer2.state_dict(), optimizer.state_dict())
    assert train_step(model2, optimizer2, tokens) == train_step(tied_model, optimizer, tokens)


_OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw_amsgrad": lambda params: torch.optim.AdamW(params, lr=1e-3, amsgrad=True, betas=(0.8, 0.95)),
}


@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "adamw_amsgrad"])
def test_optimizer_state_dicts_round_trip(tmp_path, make_mlp, name):
    model = make_mlp()
    optimizer = _OPTIMIZERS[name](model.parameters())
    for _ in range(3):
        train_step(model, optimizer, torch.randn(5, 4))
    trainstate.save(tmp_path / "c", {"optimizer_state_dict": optimizer.state_dict()})
    loaded = trainstate.load(tmp_path / "c")["optimizer_state_dict"]
    assert_same(loaded, optimizer.state_dict())
    if name != "sgd_momentum":
        assert type(loaded["param_groups"][0]["betas"]) is tuple


def _schedulers(optimizer):
    return {
        "step": lambda: torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5),
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20),
        "cosine_restarts": lambda: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=3, T_mult=2),
        "plateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=1),
        "sequential": lambda: torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=2),
                torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9),
            ],
            milestones=[2],
        ),
    }


@pytest.mark.parametrize("name", ["step", "onecycle", "cosine_restarts", "plateau", "sequential"])
def test_scheduler_round_trip_continues_identically(tmp_path, make_mlp, name):
    def run(steps_before, resume_from=None):
        model = make_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = _schedulers(optimizer)[name]()
        if resume_from is not None:
            trainstate.load(resume_from, {"optimizer": optimizer, "scheduler": scheduler})
        lrs = []
        for _i in range(steps_before):
            optimizer.step()
            scheduler.step(1.0) if name == "plateau" else scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
        return optimizer, scheduler, lrs

    _, _, full = run(8)
    optimizer, scheduler, first = run(4)
    trainstate.save(tmp_path / "c", {"optimizer": optimizer, "scheduler": scheduler})
    assert_same(trainstate.load(tmp_path / "c")["scheduler"], scheduler.state_dict())
    _, _, rest = run(4, resume_from=tmp_path / "c")
    assert first + rest == full


def test_grad_scaler_round_trip(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    trainstate.save(tmp_path / "c", {"scaler": scaler})
    fresh = torch.amp.GradScaler("cpu")
    trainstate.load(tmp_path / "c", {"scaler": fresh})
    assert fresh.state_dict() == scaler.state_dict()
    assert_same(trainstate.load(tmp_path / "c")["scaler"], scaler.state_dict())


def test_module_buffers_and_metadata_survive(tmp_path, tied_model):
    tied_model.train()
    tied_model(torch.randint(0, 11, (16,)))  # updates running stats and num_batches_tracked
    trainstate.save(tmp_path / "c", {"model": tied_model})
    loaded = trainstate.load(tmp_path / "c")["model"]
    assert loaded["norm.num_batches_tracked"].dtype == torch.int64 and int(loaded["norm.num_batches_tracked"]) == 1
    assert loaded._metadata == tied_model.state_dict()._metadata


def test_parameters_in_plain_dicts_stay_parameters(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    trainstate.save(tmp_path / "c", {"p": p, "frozen": frozen})
    loaded = trainstate.load(tmp_path / "c")
    assert isinstance(loaded["p"], torch.nn.Parameter) and loaded["p"].requires_grad
    assert isinstance(loaded["frozen"], torch.nn.Parameter) and not loaded["frozen"].requires_grad


def test_map_location_forms(tmp_path):
    trainstate.save(tmp_path / "c", {"w": torch.arange(4.0)})
    for loc in ["cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, location: storage]:
        out = trainstate.load(tmp_path / "c", map_location=loc)
        assert out["w"].device.type == "cpu" and torch.equal(out["w"], torch.arange(4.0))
    with pytest.raises(ValueError, match="not available"):
        trainstate.load(tmp_path / "c", map_location="cuda:7" if not torch.cuda.is_available() else "cuda:999")


def test_cuda_saved_checkpoint_loads_on_cpu_only_machine(tmp_path, caplog):
    trainstate.save(tmp_path / "c", {"w": torch.arange(3.0)})
    manifest = (tmp_path / "c" / "manifest.json").read_bytes()
    from trainstate.format.manifest import Manifest

    parsed = Manifest.from_json(manifest, where="test")
    tree = parsed.tree
    tree["v"]["w"]["device"] = "cuda:0"
    (tmp_path / "c" / "manifest.json").write_bytes(Manifest(**{**parsed.__dict__, "tree": tree}).to_json())
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = trainstate.load(tmp_path / "c")
    assert out["w"].device.type == "cpu" and torch.equal(out["w"], torch.arange(3.0))
    assert "cuda:0" in caplog.text


def test_save_replaces_existing_checkpoint_atomically(tmp_path):
    trainstate.save(tmp_path / "c", {"v": 1, "t": torch.ones(1000)})
    trainstate.save(tmp_path / "c", {"v": 2})
    assert trainstate.load(tmp_path / "c") == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    with pytest.raises(trainstate.CheckpointExistsError, match="already exists"):
        trainstate.save(tmp_path / "c", {"v": 3}, overwrite=False)
    assert trainstate.load(tmp_path / "c") == {"v": 2}


def test_metadata_is_stored_in_the_manifest(tmp_path):
    trainstate.save(tmp_path / "c", {"x": 1}, metadata={"step": 10, "metrics": {"loss": 0.5}})
    from trainstate.format import CheckpointReader
    from trainstate.storage import split_path

    reader = CheckpointReader(*split_path(tmp_path / "c"))
    assert reader.metadata() == {"step": 10, "metrics": {"loss": 0.5}}
    with pytest.raises(trainstate.UnsupportedValueError, match="metadata"):
        trainstate.save(tmp_path / "d", {"x": 1}, metadata={"t": torch.ones(1)})


def test_many_shards_are_written_and_read(tmp_path, make_mlp):
    state = {f"t{i}": torch.randn(1000) for i in range(10)}
    trainstate.save(tmp_path / "c", state, shard_bytes=8000)
    assert len(list((tmp_path / "c").glob("tensors-*.safetensors"))) >= 5
    assert_same(trainstate.load(tmp_path / "c"), state)


def test_empty_first_tensor_and_files_split_per_top_level_entry(tmp_path, make_mlp):
    trainstate.save(tmp_path / "e", {"e": torch.empty(0), "x": torch.ones(3)}, shard_bytes=4)
    assert_same(trainstate.load(tmp_path / "e"), {"e": torch.empty(0), "x": torch.ones(3)})
    model = torch.nn.Linear(512, 512)
    optimizer = torch.optim.AdamW(model.parameters())
    train_step(model, optimizer, torch.randn(2, 512))
    trainstate.save(tmp_path / "c", {"model": model, "optimizer": optimizer})
    tensors = {}
    for path in sorted((tmp_path / "c").glob("*.safetensors")):
        tensors[path.name] = set(safetensors.torch.load_file(path))
    assert list(tensors.values())[0] == {"model.weight", "model.bias"}  # the model's file holds only the model


def test_wrapped_modules_save_their_own_keys_and_load_either_way(tmp_path, make_mlp):
    model = make_mlp(0)
    compiled = torch.compile(model)  # an OptimizedModule; nothing is compiled until it is called
    parallel = torch.nn.DataParallel(make_mlp(0))  # on CPU it only wraps
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    trainstate.save(tmp_path / "c", {"model": compiled, "parallel": parallel})
    saved = trainstate.load(tmp_path / "c")
    assert list(saved["model"]) == list(model.state_dict()) == list(saved["parallel"])
    for target in (make_mlp(1), torch.compile(make_mlp(1)), torch.nn.DataParallel(make_mlp(1))):
        trainstate.load(tmp_path / "c", {"model": target})
        assert torch.equal(trainstate.format.torch_codecs.unwrap_module(target)[0].weight, model[0].weight)


def test_prefixed_state_dicts_from_other_tools_load_into_a_plain_module(tmp_path, make_mlp):
    model = make_mlp(0)
    trainstate.save(tmp_path / "c", {"model": torch.compile(model).state_dict()})  # a plain dict, prefixed
    target = make_mlp(1)
    trainstate.load(tmp_path / "c", {"model": target})
    assert torch.equal(target[0].weight, model[0].weight)


def test_rename_maps_saved_module_keys(tmp_path, make_mlp):
    model = make_mlp(0)
    saved = {f"backbone.{k}": v for k, v in model.state_dict().items()} | {"head.extra": torch.ones(1)}
    trainstate.save(tmp_path / "c", {"model": saved})
    target = make_mlp(1)
    rename = lambda key: None if key.startswith("head.") else key.removeprefix("backbone.")  # noqa: E731
    trainstate.load(tmp_path / "c", {"model": target}, rename=rename)
    assert torch.equal(target[2].bias, model[2].bias)
    with pytest.raises(trainstate.StateMismatchError, match="unexpected keys"):
        trainstate.load(tmp_path / "c", {"model": make_mlp(1)})
