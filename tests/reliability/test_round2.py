"""Reliability round 2: each defect an adversarial trial found, as a regression test.

Numbers in comments refer to the items of the issue: (1) write-only checkpoints, (2) save over a
non-checkpoint, (3) async aliasing, (5) open files, (6) silent wrong values, (7) untyped save
errors, (8) failed loads change nothing, (9) async failure at exit, (10) fork, (11) one
definition of valid, (12) names, meta, casts, permissions, one Parameter. (4) is
test_restore_errors.py; the campaigns are test_roundtrip.py and test_restore_errors.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import trainstate
from support import assert_same, snapshot
from trainstate import (
    CheckpointExistsError,
    CheckpointManager,
    StateMismatchError,
    UnsupportedValueError,
)
from trainstate.format.manifest import MAX_MANIFEST_BYTES
from trainstate.storage import MANIFEST_NAME, TEMP_PREFIX

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run_python(code: str, *, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


# ------------------------------------------------------------------------- (1) write-only checkpoints
def test_largest_bytes_value_that_saves_also_loads(tmp_path):
    blob = os.urandom(45 * 2**20)  # base64 in the manifest: 60 MiB, under the cap
    trainstate.save(tmp_path / "c", {"blob": blob})
    assert trainstate.load(tmp_path / "c")["blob"] == blob


def test_state_whose_manifest_would_exceed_the_cap_is_refused_before_writing(tmp_path):
    trainstate.save(tmp_path / "c", {"step": 1})
    before = snapshot(tmp_path)
    state = {"small": 1, "meters": {"counts": os.urandom(55 * 2**20)}}  # 73 MiB of base64
    with pytest.raises(UnsupportedValueError) as err:
        trainstate.save(tmp_path / "c", state)
    message = str(err.value)
    assert "'meters.counts'" in message and f"{MAX_MANIFEST_BYTES // 2**20} MiB" in message
    assert "store bulk values as tensors" in message
    assert snapshot(tmp_path) == before  # the old checkpoint is untouched, no leftovers
    assert trainstate.load(tmp_path / "c") == {"step": 1}


@pytest.mark.slow
def test_millions_of_python_ints_are_refused_not_written(tmp_path):
    values = list(range(10**9, 10**9 + 7_000_000))
    with pytest.raises(UnsupportedValueError, match="'history'"):
        trainstate.save(tmp_path / "c", {"history": values})
    assert not (tmp_path / "c").exists()
    assert [p for p in os.listdir(tmp_path) if not p.startswith(TEMP_PREFIX)] == []


def _moe_state(experts: int) -> dict[str, object]:
    model = torch.nn.ParameterList(torch.nn.Parameter(torch.full((2, 2), float(i))) for i in range(experts))
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


def test_manifest_stays_compact_per_tensor(tmp_path):
    state = _moe_state(500)  # 2,000 tensors: the model's and AdamW's step, exp_avg, exp_avg_sq
    trainstate.save(tmp_path / "c", state)
    size = (tmp_path / "c" / MANIFEST_NAME).stat().st_size
    # Format 1 took ~295 bytes a tensor (about 64 MiB for a 47k-expert MoE with AdamW).
    assert size / 2000 < 110, size / 2000
    loaded = trainstate.load(tmp_path / "c")
    assert len(loaded["optimizer"]["state"]) == 500


@pytest.mark.slow
def test_a_hundred_thousand_tensors_save_and_load(tmp_path):
    state = _moe_state(25_000)  # 100,000 tensors; the 47k-expert layout of the trial is 188k
    trainstate.save(tmp_path / "c", state)
    size = (tmp_path / "c" / MANIFEST_NAME).stat().st_size
    assert size < MAX_MANIFEST_BYTES / 6
    fresh = _moe_state(25_000)
    with torch.no_grad():
        for p in fresh["model"].parameters():
            p.zero_()
    trainstate.load(tmp_path / "c", fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh["model"].parameters(), state["model"].parameters(), strict=True))


@pytest.mark.parametrize(
    "value",
    [
        {"__metadata__": torch.arange(3)},
        {"a": {"__metadata__": torch.ones(2)}, "a.__metadata__": torch.zeros(2)},
        10**4100 - 1,
        -(7 * 10**4299),
        10**5000 + 1,
        torch.zeros([1] * 65),
        torch.zeros([1] * 300),
    ],
    ids=["metadata_key", "metadata_key_collision", "int_4100", "int_4300", "int_5000", "dims_65", "dims_300"],
)
def test_once_write_only_values_round_trip(tmp_path, value):
    trainstate.save(tmp_path / "c", {"v": value})
    assert_same(trainstate.load(tmp_path / "c")["v"], value)


def test_more_dimensions_than_load_accepts_are_refused_on_save(tmp_path):
    with pytest.raises(UnsupportedValueError, match=r"'v'|v: 1025 dimensions"):
        trainstate.save(tmp_path / "c", {"v": torch.zeros([1] * 1025)})


# ------------------------------------------------------------------- (2) only a checkpoint is replaced
def test_save_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    run = tmp_path / "runs" / "exp1"
    trainstate.save(run / "final", {"step": 1})
    (run / "config.yaml").write_text("lr: 0.1\n")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointExistsError, match="not a trainstate checkpoint") as err:
        trainstate.save(run, {"step": 2})  # meant: run / "final"
    assert str(run) in str(err.value) and "final/" in str(err.value)
    assert snapshot(tmp_path) == before
    trainstate.save(run / "final", {"step": 3})  # a checkpoint is replaced as before
    assert trainstate.load(run / "final") == {"step": 3}


def test_save_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"torch.save output")
    with pytest.raises(CheckpointExistsError, match="a file"):
        trainstate.save(tmp_path / "model.pt", {"step": 1})
    assert (tmp_path / "model.pt").read_bytes() == b"torch.save output"


def test_save_into_an_existing_empty_directory(tmp_path):
    (tmp_path / "c").mkdir()
    trainstate.save(tmp_path / "c", {"step": 1})
    assert trainstate.load(tmp_path / "c") == {"step": 1}


# ------------------------------------------------------------------------- (3) async aliasing
class Meter:
    """A metric tracker whose state_dict builds a fresh tensor on every call. Its memory comes from
    numpy's small-buffer cache, which hands a freed buffer to the next array of its size at once."""

    def __init__(self, value: float) -> None:
        self.value = value

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"total": torch.from_numpy(np.full(1, self.value))}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.value = float(state["total"])


def test_async_save_never_mixes_up_fresh_tensors(tmp_path):
    torch.manual_seed(0)
    rng_a = trainstate.RNGState()
    state_a = rng_a.state_dict()["torch"].clone()
    torch.rand(10)
    rng_b = trainstate.RNGState()
    with CheckpointManager(tmp_path, async_save=True) as manager:
        state = {"m1": Meter(1.0), "m2": Meter(2.0), "m3": Meter(3.0)}
        manager.save(1, state)
    loaded = trainstate.load(manager.path(1))
    assert [float(loaded[k]["total"]) for k in ("m1", "m2", "m3")] == [1.0, 2.0, 3.0]
    with CheckpointManager(tmp_path / "rng", async_save=True) as manager:
        manager.save(1, {"a": {"torch": state_a}, "b": rng_b})
    loaded = trainstate.load(manager.path(1))
    assert torch.equal(loaded["a"]["torch"], state_a)
    assert not torch.equal(loaded["b"]["torch"], state_a)


# --------------------------------------------------------------------------------- (5) open files
def test_checkpoint_with_more_files_than_the_open_file_limit(tmp_path):
    model = torch.nn.ParameterList(torch.nn.Parameter(torch.full((64,), float(i))) for i in range(300))
    trainstate.save(tmp_path / "c", {"model": model}, shard_bytes=256)  # one file per tensor
    assert len(os.listdir(tmp_path / "c")) == 301
    out = run_python(
        f"""
        import resource, torch, trainstate
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        loaded = trainstate.load({str(tmp_path / "c")!r})["model"]
        assert all(torch.equal(loaded[str(i)], torch.full((64,), float(i))) for i in range(300))
        live = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(64)) for i in range(300))
        trainstate.load({str(tmp_path / "c")!r}, {{"model": live}})  # read in place, 300 files verified first
        assert all(torch.equal(p, torch.full((64,), float(i))) for i, p in enumerate(live))
        print("ok")
        """,
        cwd=tmp_path,
    )
    assert out.stdout == "ok\n", out.stderr


# ------------------------------------------------------------------------ (6) silent wrong values
def test_conj_and_neg_views_are_not_their_base(tmp_path):
    c = torch.tensor([1 + 2j, 3 - 4j])
    r = torch.tensor([1.0, -2.0])
    state = {"c": c, "conj": c.conj(), "r": r, "neg": r._neg_view()}
    trainstate.save(tmp_path / "c", state)
    loaded = trainstate.load(tmp_path / "c")
    assert torch.equal(loaded["conj"], torch.tensor([1 - 2j, 3 + 4j]))
    assert torch.equal(loaded["neg"], torch.tensor([-1.0, 2.0]))
    assert torch.equal(loaded["c"], c) and torch.equal(loaded["r"], r)


def test_numpy_values_keep_their_shape_and_subclasses_are_refused(tmp_path):
    trainstate.save(tmp_path / "c", {"zero_d": np.array(2.5), "big_endian_0d": np.array(7, dtype=">i4")})
    loaded = trainstate.load(tmp_path / "c")
    assert_same(loaded, {"zero_d": np.array(2.5), "big_endian_0d": np.array(7, dtype=">i4")})
    for bad in (np.ma.masked_array([1, 2], mask=[0, 1]), np.matrix([[1, 2]])):
        with pytest.raises(UnsupportedValueError, match="'?x.y'?.*(MaskedArray|matrix)"):
            trainstate.save(tmp_path / "d", {"x": {"y": bad}})


def test_requires_grad_and_nan_payloads_are_kept(tmp_path):
    import struct

    nan = struct.unpack("<d", bytes.fromhex("010000000000f8ff"))[0]  # negative, payload 1
    negative_nan = -float("nan")
    state = {"w": torch.ones(2, requires_grad=True), "nan": nan, "neg": negative_nan, "zero": -0.0}
    trainstate.save(tmp_path / "c", state)
    assert_same(trainstate.load(tmp_path / "c"), state)


# ---------------------------------------------------------------------------- (7) typed save errors
@pytest.mark.parametrize(
    "value, needle",
    [
        (torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
        (torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.strided), "nested"),
        (torch.nn.LazyLinear(3), "uninitialized lazy parameter"),
        (torch.nn.parameter.UninitializedParameter(), "uninitialized lazy parameter"),
    ],
    ids=["nested_jagged", "nested_strided", "lazy_linear", "uninitialized"],
)
def test_unsupported_tensors_are_refused_naming_the_key(tmp_path, value, needle):
    with pytest.raises(UnsupportedValueError, match=needle) as err:
        trainstate.save(tmp_path / "c", {"x": value})
    assert "x" in str(err.value)
    assert not (tmp_path / "c").exists()


def test_strings_with_lone_surrogates_round_trip(tmp_path):
    name = os.fsdecode(b"run-\xff")  # what os.listdir gives for an undecodable file name
    state = {name: torch.ones(1), "names": [name, "ok"], "by_name": {name: 1}}
    trainstate.save(tmp_path / "c", state, metadata={"source": name})
    assert_same(trainstate.load(tmp_path / "c"), state)
    reader = trainstate.format.CheckpointReader(*trainstate.storage.split_path(tmp_path / "c"))
    assert reader.metadata() == {"source": name}
    from safetensors.torch import load_file

    (file,) = [f for f in os.listdir(tmp_path / "c") if f.endswith(".safetensors")]
    assert list(load_file(tmp_path / "c" / file)) == ["run-\\udcff"]  # a valid UTF-8 key for other readers


# -------------------------------------------------------------------- (8) a failed load changes nothing
def test_optimizer_of_other_groups_fails_before_anything_is_written(tmp_path, make_mlp):
    model = make_mlp(0)
    one_group = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    one_group.step()
    trainstate.save(tmp_path / "c", {"model": model, "optimizer": one_group})

    live = make_mlp(1)
    params = list(live.parameters())
    two_groups = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}])
    live(torch.ones(1, 4)).sum().backward()
    two_groups.step()
    weights = {k: v.clone() for k, v in live.state_dict().items()}
    moments = [{k: v.clone() for k, v in s.items()} for s in two_groups.state.values()]
    with pytest.raises(StateMismatchError, match=r"'optimizer'.*groups of sizes \[4\], the live one \[2, 2\]"):
        trainstate.load(tmp_path / "c", {"model": live, "optimizer": two_groups})
    assert_same(dict(live.state_dict()), weights)
    assert_same([dict(s) for s in two_groups.state.values()], moments)


class Picky:
    def state_dict(self) -> dict[str, int]:
        return {"n": 1}

    def load_state_dict(self, state: dict[str, int]) -> None:
        raise KeyError("missing 'm'")


def test_half_way_failure_says_what_was_restored(tmp_path, make_mlp):
    model = make_mlp(0)
    trainstate.save(tmp_path / "c", {"model": model, "picky": Picky(), "rng": trainstate.RNGState()})
    with pytest.raises(StateMismatchError) as err:
        trainstate.load(tmp_path / "c", {"picky": Picky(), "model": make_mlp(1), "rng": trainstate.RNGState()})
    message = str(err.value)
    assert "key 'picky': Picky.load_state_dict rejected" in message
    assert "already restored: model; not restored: rng" in message


# --------------------------------------------------------------------- (9) async failure at exit
def test_failed_async_save_at_exit_is_loud(tmp_path):
    out = run_python(
        f"""
        import errno, torch, trainstate
        from trainstate.storage import local

        def disk_full(self, filename, chunks):
            raise OSError(errno.ENOSPC, "No space left on device")

        local._LocalPending.write = disk_full  # the write runs in the background and fails there
        manager = trainstate.CheckpointManager({str(tmp_path / "run")!r}, async_save=True)
        manager.save(1, {{"w": torch.ones(2)}})
        print("returned")
        """,
        cwd=tmp_path,
    )
    assert out.stdout == "returned\n"
    assert out.returncode == 1, out.stderr
    assert "background save of step 1 failed" in out.stderr and "No space left on device" in out.stderr


def test_successful_async_save_at_exit_exits_zero(tmp_path):
    out = run_python(
        f"""
        import torch, trainstate
        manager = trainstate.CheckpointManager({str(tmp_path / "run")!r}, async_save=True)
        manager.save(1, {{"w": torch.ones(3)}})
        """,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert torch.equal(trainstate.load(tmp_path / "run" / "step_00000001")["w"], torch.ones(3))


# --------------------------------------------------------------------------------------- (10) fork
def test_forked_child_gets_a_clear_error_and_never_touches_the_lock_fd(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"w": torch.ones(1)})
    lock_fd = manager._storage._lock_fd
    assert lock_fd is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report through the pipe, never return into pytest
        code = 0
        try:
            try:
                manager.save(2, {"w": torch.ones(1)})
                code = 10
            except RuntimeError as exc:
                code = 0 if "forked child" in str(exc) else 11
            with open(os.devnull, "rb") as unrelated:
                os.dup2(unrelated.fileno(), lock_fd)  # an unrelated file now has the lock's number
                manager.close()
                os.fstat(lock_fd)  # still open: close() did not touch it
        except BaseException:
            code = 12
        os.write(write, bytes([code]))
        os._exit(0)
    os.close(write)
    result = os.read(read, 1)
    os.waitpid(pid, 0)
    assert result == b"\x00"
    manager.save(2, {"w": torch.ones(1)})  # the parent still holds its lock and saves
    manager.close()
    assert manager.steps() == [1, 2]


# ------------------------------------------------------------------------- (11) one definition of valid
@pytest.mark.parametrize("bad_step", [300.0, None, "300", True], ids=["float", "null", "string", "bool"])
def test_hostile_step_metadata_is_broken_everywhere(tmp_path, bad_step, caplog):
    from typer.testing import CliRunner

    from trainstate.cli.app import app
    from trainstate.format.manifest import Manifest

    with CheckpointManager(tmp_path) as manager:
        manager.save(200, {"w": torch.ones(1)})
        manager.save(300, {"w": torch.full((1,), 3.0)})
    path = tmp_path / "step_00000300" / MANIFEST_NAME
    manifest = Manifest.from_json(path.read_bytes(), where=str(path))
    metadata = dict(manifest.metadata)
    metadata["v"] = {**metadata["v"], "step": bad_step}
    path.write_bytes(type(manifest)(**{**manifest.__dict__, "metadata": metadata}).to_json())

    listing = json.loads(CliRunner().invoke(app, ["ls", str(tmp_path), "--json"]).stdout)
    assert [(e["name"], e["status"]) for e in listing] == [("step_00000200", "ok"), ("step_00000300", "corrupt")]
    state = {"w": torch.zeros(1)}
    with CheckpointManager(tmp_path) as manager:
        assert manager.steps() == [200]
        assert manager.restore(state) == 200
    listing = json.loads(CliRunner().invoke(app, ["ls", str(tmp_path), "--json"]).stdout)
    assert [e["status"] for e in listing] == ["ok", "quarantined"]  # moved aside by the fallback


# ------------------------------------------------------------------------------------- (12) smaller
@pytest.mark.parametrize("name", ["my ckpt", "ünïcode", "a@b", "c:d", ".hidden", "-dash", "x" * 255])
def test_checkpoint_names_filesystems_allow(tmp_path, name):
    trainstate.save(tmp_path / name, {"step": 1})
    assert trainstate.load(tmp_path / name) == {"step": 1}
    with CheckpointManager(tmp_path / name / "..") as manager:
        assert manager.steps() == []  # a name the manager did not give is not its checkpoint


@pytest.mark.parametrize("name", [f"{TEMP_PREFIX}x", "x" * 256])
def test_names_filesystems_refuse_are_argument_errors(tmp_path, name):
    with pytest.raises(ValueError, match="cannot name a checkpoint") as err:
        trainstate.save(tmp_path / name, {"step": 1})
    assert not isinstance(err.value, trainstate.CheckpointError)


def test_map_location_meta_reads_no_data(tmp_path):
    trainstate.save(tmp_path / "c", {"w": torch.ones(2, 3), "p": torch.nn.Parameter(torch.ones(1))})
    loaded = trainstate.load(tmp_path / "c", map_location="meta")
    assert loaded["w"].device.type == "meta" and loaded["w"].shape == (2, 3)
    assert isinstance(loaded["p"], torch.nn.Parameter) and loaded["p"].is_meta


def test_strict_false_casts_dtypes_like_load_state_dict(tmp_path, caplog):
    source = torch.nn.Linear(2, 2)
    trainstate.save(tmp_path / "c", {"model": source})
    target = torch.nn.Linear(2, 2).to(torch.bfloat16)
    trainstate.load(tmp_path / "c", {"model": target}, strict=False)
    assert torch.equal(target.weight, source.weight.detach().to(torch.bfloat16))
    assert "cast to torch.bfloat16" in caplog.text
    with pytest.raises(StateMismatchError, match="float32"):
        trainstate.load(tmp_path / "c", {"model": torch.nn.Linear(2, 2).to(torch.bfloat16)})


def test_unreadable_checkpoint_directory_is_not_never_committed(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from trainstate.cli.app import app

    with CheckpointManager(tmp_path) as manager:
        manager.save(1, {"w": torch.ones(1)})
    real_listdir = os.listdir
    locked = str(tmp_path / "step_00000001")

    def listdir(path: str | os.PathLike[str] = ".") -> list[str]:
        if os.fspath(path) == locked:  # as for a directory without read permission (tests run as root)
            raise PermissionError(13, "Permission denied", locked)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    listing = json.loads(CliRunner().invoke(app, ["ls", str(tmp_path), "--json"]).stdout)
    assert listing[0]["status"] == "unreadable" and "Permission denied" in listing[0]["problem"]


def test_same_parameter_twice_is_one_object(tmp_path):
    p = torch.nn.Parameter(torch.ones(2))
    q = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    trainstate.save(tmp_path / "c", {"a": p, "b": p, "c": [q, q]})
    loaded = trainstate.load(tmp_path / "c")
    assert loaded["a"] is loaded["b"] and isinstance(loaded["a"], torch.nn.Parameter)
    assert loaded["c"][0] is loaded["c"][1] and not loaded["c"][0].requires_grad


# ------------------------------------------------------------- hostile values of the new format-2 tags
@pytest.mark.parametrize(
    "node",
    [
        {"@": "float", "v": "nan", "bits": "zz"},
        {"@": "float", "v": "nan", "bits": "000000000000f03f"},  # 1.0: not a NaN
        {"@": "float", "v": "inf", "bits": "000000000000f8ff"},
        {"@": "float", "v": "nan", "bits": 7},
        {"@": "str", "v": "!!"},
        {"@": "str", "v": 5},
        {"@": "str", "v": "/w=="},  # not UTF-8 even with surrogates allowed
        {"@": "int", "v": "0x"},
        {"@": "int", "v": "0xABC"},  # the encoder writes lowercase only
        {"@": "int", "v": "1" * 4301},
        {"@": "int", "v": " 12"},
    ],
)
def test_malformed_format_2_values_are_corrupt(tmp_path, node):
    from trainstate.format.manifest import Manifest

    trainstate.save(tmp_path / "c", {"x": 1})
    path = tmp_path / "c" / MANIFEST_NAME
    manifest = Manifest.from_json(path.read_bytes(), where=str(path))
    tree = {**manifest.tree, "v": {"x": node}}
    path.write_bytes(Manifest(**{**manifest.__dict__, "tree": tree}).to_json())
    with pytest.raises(trainstate.CorruptCheckpointError, match="'?x'?"):
        trainstate.load(tmp_path / "c")


def test_async_save_refuses_an_unsavable_state_in_the_call(tmp_path):
    """Encoding happens in the caller's thread: the error is raised by this save, not the next call."""
    with CheckpointManager(tmp_path, async_save=True) as manager:
        with pytest.raises(UnsupportedValueError, match="bad: cannot save a value of type builtins.set"):
            manager.save(1, {"bad": {1, 2}})
        assert manager.save(1, {"w": torch.ones(1)})  # nothing was queued: the same step saves fine
    assert manager.steps() == [1] and not [p for p in os.listdir(tmp_path) if p.startswith(TEMP_PREFIX)]


def test_size_one_dims_with_any_stride(tmp_path):
    """``t[::2]`` of two elements is "contiguous" with stride 2: saved and read in place like any other
    (found by the round-trip campaign under another hypothesis version in a fresh CI venv)."""
    odd = {"a": torch.arange(2.0)[::2], "b": torch.arange(8.0).reshape(2, 4)[:1, ::4]}
    assert all(t.is_contiguous() and 1 not in t.stride() for t in odd.values())
    trainstate.save(tmp_path / "c", odd)
    assert_same(trainstate.load(tmp_path / "c"), {k: v.contiguous() for k, v in odd.items()})
    module = torch.nn.Module()
    module.register_buffer("w", torch.full((4,), 7.0)[::4])  # a live destination with the same odd stride
    trainstate.save(tmp_path / "m", {"m": {"w": torch.tensor([3.0])}})
    trainstate.load(tmp_path / "m", {"m": module})
    assert module.w.tolist() == [3.0]
