"""Bad input: every way a checkpoint (or a state to save) can be wrong must raise one precise
CheckpointError subclass, name the file (and the key where there is one), and change nothing on disk.

Manifests are rewritten through ``Manifest.from_json``/``Manifest.to_json`` so the checksum trailer is
recomputed by trainstate's own code: the checksum is then *not* what catches the tampering.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch

import trainstate
from support import tensor_refs
from trainstate import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UnsupportedValueError,
)
from trainstate.format.manifest import MANIFEST_NAME, FileEntry, Manifest
from trainstate.storage import TEMP_PREFIX

TENSOR_FILE = "tensors-00000.safetensors"


# --------------------------------------------------------------------------------------------- helpers


def disk_state(root: str | os.PathLike[str]) -> dict[str, tuple[str, Any]]:
    """Every entry under ``root``: files with their bytes, directories, symlinks with their targets."""
    out: dict[str, tuple[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir", None)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read())
    return out


def no_temp_entries(root: str | os.PathLike[str]) -> bool:
    return not any(e.startswith(TEMP_PREFIX) for e in os.listdir(root))


def expect_error(exc_type: type[CheckpointError], fn: Callable[[], Any], *needles: object) -> CheckpointError:
    """Run ``fn``; it must raise exactly ``exc_type`` (a CheckpointError) whose message contains each needle."""
    try:
        fn()
    except CheckpointError as err:
        assert type(err) is exc_type, f"expected {exc_type.__name__}, got {type(err).__name__}: {err}"
        message = str(err)
        for needle in needles:
            assert str(needle) in message, f"{str(needle)!r} not in message {message!r}"
        return err
    except Exception as err:  # noqa: BLE001 - anything else escaping breaks the error contract
        pytest.fail(f"{type(err).__name__} escaped instead of {exc_type.__name__}: {err}")
    pytest.fail(f"no error raised; expected {exc_type.__name__}")


def assert_load_rejected(path: os.PathLike[str], exc_type: type[CheckpointError], *needles: object) -> None:
    """A plain load and a load into a live model both raise ``exc_type`` naming ``needles``; the live
    model keeps its weights and nothing on disk changes."""
    parent = os.path.dirname(os.fspath(path))
    before = disk_state(parent)
    live = make_linear(1, 4, 2)
    live_before = weights(live)
    expect_error(exc_type, lambda: trainstate.load(path), *needles)
    expect_error(exc_type, lambda: trainstate.load(path, {"model": live}), *needles)
    assert_weights(live, live_before)
    assert disk_state(parent) == before


def make_linear(seed: int, *args: Any, **kwargs: Any) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(*args, **kwargs)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_weights(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    current = module.state_dict()
    assert list(current) == list(expected)
    for key, value in expected.items():
        assert current[key].dtype == value.dtype and torch.equal(current[key], value), key


def rewrite_manifest(ckpt: os.PathLike[str] | str, change: Callable[[Manifest], Manifest]) -> None:
    """Parse the manifest with trainstate's reader, change it, write it back with a valid checksum."""
    path = os.path.join(ckpt, MANIFEST_NAME)
    with open(path, "rb") as f:
        manifest = Manifest.from_json(f.read(), where=path)
    with open(path, "wb") as f:
        f.write(change(manifest).to_json())


def retarget(manifest: Manifest, new_name: str, *, in_files: bool, only_key: str | None = None) -> Manifest:
    """Point tensor refs (all, or the one whose safetensors key is ``only_key``) and optionally the
    file list entry of TENSOR_FILE at ``new_name``."""
    tree = json.loads(json.dumps(manifest.tree))
    for ref in tensor_refs(tree):
        if ref.get("file") == TENSOR_FILE and only_key in (None, ref.get("key")):
            ref["file"] = new_name
    files = manifest.files
    if in_files:
        files = tuple(FileEntry(new_name, e.size, e.hash) if e.name == TENSOR_FILE else e for e in files)
    return dataclasses.replace(manifest, tree=tree, files=files)


def edit_ref(manifest: Manifest, st_key: str, /, **fields: Any) -> Manifest:
    """Change fields of the tensor ref stored under safetensors key ``st_key``."""
    tree = json.loads(json.dumps(manifest.tree))
    found = [ref for ref in tensor_refs(tree) if ref.get("key") == st_key]
    assert found, st_key
    for ref in found:
        ref.update(fields)
    return dataclasses.replace(manifest, tree=tree)


def header_length(path: os.PathLike[str] | str) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def flip_bit(path: os.PathLike[str] | str, offset: int, mask: int = 0x01) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[offset] ^= mask
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def ckpt(tmp_path):
    """A committed checkpoint of a small model plus plain values; returns (path, saved weights)."""
    path = tmp_path / "ckpt"
    model = make_linear(0, 4, 2)
    trainstate.save(path, {"model": model, "step": 3, "w": torch.arange(6, dtype=torch.float32)})
    return path, weights(model)


# --------------------------------------------------------------------------------------------- sanity


def test_control_rewritten_manifest_still_loads(ckpt):
    """The rewrite helper itself produces a valid manifest: an unchanged rewrite loads exactly."""
    path, saved = ckpt
    rewrite_manifest(path, lambda m: m)
    live = make_linear(1, 4, 2)
    out = trainstate.load(path, {"model": live})
    assert out["step"] == 3
    assert_weights(live, saved)


# --------------------------------------------------------------------------------------------- missing


@pytest.mark.parametrize("rel", ["nope", "deeper/still/nope"])
def test_missing_path(tmp_path, rel):
    before = disk_state(tmp_path)
    target = tmp_path / rel
    expect_error(CheckpointNotFoundError, lambda: trainstate.load(target), target)
    assert disk_state(tmp_path) == before
    assert not os.path.lexists(target)


@pytest.mark.parametrize("leftover", ["empty", "tensors_only"])
def test_directory_without_manifest(ckpt, leftover):
    path, _ = ckpt
    if leftover == "empty":
        shutil.rmtree(path)
        path.mkdir()
    else:  # a save that died before the manifest was written
        os.unlink(path / MANIFEST_NAME)
    before = disk_state(path.parent)
    expect_error(CheckpointNotFoundError, lambda: trainstate.load(path), path, MANIFEST_NAME)
    expect_error(CheckpointNotFoundError, lambda: trainstate.load(path, {"model": make_linear(1, 4, 2)}), path)
    assert disk_state(path.parent) == before


def test_manifest_is_not_a_regular_file(ckpt):
    """A directory named manifest.json: a CheckpointError, not a raw IsADirectoryError."""
    path, _ = ckpt
    os.unlink(path / MANIFEST_NAME)
    (path / MANIFEST_NAME).mkdir()
    before = disk_state(path.parent)
    expect_error(CorruptCheckpointError, lambda: trainstate.load(path), path, "not a regular file")
    assert disk_state(path.parent) == before


# --------------------------------------------------------------------------------------------- manifest


def test_future_format_version(ckpt):
    path, _ = ckpt
    rewrite_manifest(path, lambda m: dataclasses.replace(m, format_version=99))
    before = disk_state(path.parent)
    err = expect_error(UnsupportedFormatError, lambda: trainstate.load(path), path / MANIFEST_NAME, "99")
    assert isinstance(err, CheckpointError)
    assert disk_state(path.parent) == before


def _garbage(data: bytes) -> bytes:
    return b"this is not json {"


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _empty(data: bytes) -> bytes:
    return b""


def _not_utf8(data: bytes) -> bytes:
    return b"\xff\xfe" + data


def _json_array(data: bytes) -> bytes:
    return b"[1, 2, 3]\n"


def _edited_without_checksum(data: bytes) -> bytes:
    edited = data.replace(b'"step":3', b'"step":4')
    assert edited != data
    return edited


@pytest.mark.parametrize(
    "damage",
    [_garbage, _truncated, _empty, _not_utf8, _json_array, _edited_without_checksum],
    ids=lambda f: f.__name__.strip("_"),
)
def test_malformed_manifest(ckpt, damage):
    path, _ = ckpt
    manifest = path / MANIFEST_NAME
    manifest.write_bytes(damage(manifest.read_bytes()))
    assert_load_rejected(path, CorruptCheckpointError, manifest)


def _bad_names(tmp_path) -> dict[str, str]:
    outside = str(tmp_path / TENSOR_FILE)
    return {
        "dotdot": f"../{TENSOR_FILE}",
        "bare_dotdot": "..",
        "embedded_dotdot": "a..b",
        "absolute": outside,
        "slash": f"sub/{TENSOR_FILE}",
        "trailing_slash": f"{TENSOR_FILE}/",
        "backslash": f"sub\\{TENSOR_FILE}",
        "nul": f"{TENSOR_FILE}\x00x",
        "dot": ".",
        "hidden": ".hidden",
    }


BAD_NAME_IDS = [
    "dotdot",
    "bare_dotdot",
    "embedded_dotdot",
    "absolute",
    "slash",
    "trailing_slash",
    "backslash",
    "nul",
    "dot",
    "hidden",
]


@pytest.mark.parametrize("which", BAD_NAME_IDS)
def test_unsafe_name_in_files_list(ckpt, tmp_path, which):
    """A name in "files" (and every ref to it) that is not one plain component is refused by name,
    even though a valid copy of the file sits exactly where the hostile name would lead."""
    path, _ = ckpt
    shutil.copy(path / TENSOR_FILE, tmp_path / TENSOR_FILE)  # ../tensors-00000 and the absolute path both exist
    (path / "sub").mkdir()
    shutil.copy(path / TENSOR_FILE, path / "sub" / TENSOR_FILE)
    bad = _bad_names(tmp_path)[which]
    rewrite_manifest(path, lambda m: retarget(m, bad, in_files=True))
    before = disk_state(tmp_path)
    live = make_linear(1, 4, 2)
    live_before = weights(live)
    expect_error(CorruptCheckpointError, lambda: trainstate.load(path), path / MANIFEST_NAME, repr(bad))
    expect_error(CorruptCheckpointError, lambda: trainstate.load(path, {"model": live}), path / MANIFEST_NAME)
    assert_weights(live, live_before)
    assert disk_state(tmp_path) == before


@pytest.mark.parametrize("which", BAD_NAME_IDS)
def test_unsafe_file_in_tensor_ref(ckpt, tmp_path, which):
    """A tensor ref naming a file the manifest does not list (the list itself is clean) is refused."""
    path, _ = ckpt
    shutil.copy(path / TENSOR_FILE, tmp_path / TENSOR_FILE)
    bad = _bad_names(tmp_path)[which]
    rewrite_manifest(path, lambda m: retarget(m, bad, in_files=False, only_key="model.weight"))
    before = disk_state(tmp_path)
    live = make_linear(1, 4, 2)
    live_before = weights(live)
    expect_error(CorruptCheckpointError, lambda: trainstate.load(path), path, "'model.weight'", repr(bad))
    expect_error(CorruptCheckpointError, lambda: trainstate.load(path, {"model": live}), path, "'model.weight'")
    assert_weights(live, live_before)
    assert disk_state(tmp_path) == before


@pytest.mark.parametrize(
    "fields",
    [
        {"dtype": "float64"},
        {"dtype": "not_a_dtype"},
        {"dtype": "Tensor"},
        {"shape": [3, 2]},
        {"shape": [-2, -4]},
        {"shape": "2x4"},
        {"key": "model.nothing"},
        {"key": 7},
    ],
    ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()),
)
def test_tampered_tensor_ref_fields(ckpt, fields):
    """A ref whose dtype/shape/key disagree with the safetensors header (checksum valid) is corrupt."""
    path, _ = ckpt
    rewrite_manifest(path, lambda m: edit_ref(m, "model.weight", **fields))
    assert_load_rejected(path, CorruptCheckpointError, path, "'model.weight'")


def test_tampered_tensor_ref_device(ckpt):
    path, _ = ckpt
    rewrite_manifest(path, lambda m: edit_ref(m, "model.weight", device="bogus"))
    before = disk_state(path.parent)
    expect_error(CorruptCheckpointError, lambda: trainstate.load(path), path, "'model.weight'")
    assert disk_state(path.parent) == before


def test_tampered_tensor_ref_param_on_int_tensor(tmp_path):
    path = tmp_path / "ckpt"
    trainstate.save(path, {"idx": torch.arange(5)})
    rewrite_manifest(path, lambda m: edit_ref(m, "idx", param=True, requires_grad=True))
    before = disk_state(tmp_path)
    expect_error(CorruptCheckpointError, lambda: trainstate.load(path), path, "'idx'")
    assert disk_state(tmp_path) == before


# --------------------------------------------------------------------------------------------- tensor files


@pytest.mark.parametrize("keep", ["zero", "prefix_only", "half_header", "header_only", "minus_one"])
def test_truncated_tensor_file(ckpt, keep):
    path, _ = ckpt
    tensor_file = path / TENSOR_FILE
    data = tensor_file.read_bytes()
    hlen = header_length(tensor_file)
    n = {
        "zero": 0,
        "prefix_only": 8,
        "half_header": 8 + hlen // 2,
        "header_only": 8 + hlen,
        "minus_one": len(data) - 1,
    }[keep]
    tensor_file.write_bytes(data[:n])
    assert_load_rejected(path, CorruptCheckpointError, tensor_file)


@pytest.mark.parametrize("where", ["first_data_byte", "last_byte"])
def test_flipped_byte_in_data(ckpt, where):
    path, _ = ckpt
    tensor_file = path / TENSOR_FILE
    offset = 8 + header_length(tensor_file) if where == "first_data_byte" else tensor_file.stat().st_size - 1
    flip_bit(tensor_file, offset)
    assert_load_rejected(path, CorruptCheckpointError, tensor_file, "hash")


def _header_offset(tensor_file, what: str) -> tuple[int, int]:
    """(offset, bit mask) of one single-bit flip inside the safetensors header."""
    data = tensor_file.read_bytes()
    if what == "length_prefix":
        return 0, 0x01
    if what == "open_brace":
        assert data[8:9] == b"{"
        return 8, 0x01  # '{' -> 'z': not JSON
    if what == "metadata_value":  # "pt" -> "pu": still a valid header, only the hash can tell
        return data.index(b'"pt"') + 2, 0x01
    if what == "dtype":  # F32 -> F33
        return data.index(b'"F32"') + 3, 0x01
    if what == "shape":  # [2,4] -> [2,5]: byte count no longer matches the offsets
        return data.index(b'"shape":[2,4]') + len(b'"shape":[2,'), 0x01
    if what == "offset":  # first data_offsets end changes: gap/overlap
        return data.index(b'"data_offsets":[0,') + len(b'"data_offsets":[0,'), 0x01
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["length_prefix", "open_brace", "metadata_value", "dtype", "shape", "offset"])
def test_flipped_byte_in_header(ckpt, what):
    path, _ = ckpt
    tensor_file = path / TENSOR_FILE
    offset, mask = _header_offset(tensor_file, what)
    assert offset < 8 + header_length(tensor_file)
    flip_bit(tensor_file, offset, mask)
    assert_load_rejected(path, CorruptCheckpointError, tensor_file)


@pytest.mark.parametrize("extra", [b"\0" * 8, b"x"])
def test_tensor_file_of_wrong_size(ckpt, extra):
    path, _ = ckpt
    tensor_file = path / TENSOR_FILE
    with open(tensor_file, "ab") as f:
        f.write(extra)
    assert_load_rejected(path, CorruptCheckpointError, tensor_file, "size")


def test_tensor_file_missing(ckpt):
    path, _ = ckpt
    os.unlink(path / TENSOR_FILE)
    before = disk_state(path.parent)
    expect_error(CheckpointNotFoundError, lambda: trainstate.load(path), path / TENSOR_FILE)
    assert disk_state(path.parent) == before


@pytest.mark.parametrize("link", ["absolute", "relative"])
@pytest.mark.parametrize("victim", [TENSOR_FILE, MANIFEST_NAME])
def test_symlink_pointing_outside(ckpt, tmp_path, link, victim):
    """A symlink in place of a checkpoint file is refused even though its target has the right bytes."""
    path, _ = ckpt
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(path / victim, outside / victim)
    target = str(outside / victim) if link == "absolute" else os.path.join("..", "outside", victim)
    os.symlink(target, path / victim)
    assert (path / victim).read_bytes() == (outside / victim).read_bytes()  # the link resolves fine
    before = disk_state(tmp_path)
    live = make_linear(1, 4, 2)
    live_before = weights(live)
    expect_error(CorruptCheckpointError, lambda: trainstate.load(path), path / victim, "symlink")
    expect_error(CorruptCheckpointError, lambda: trainstate.load(path, {"model": live}), path / victim)
    assert_weights(live, live_before)
    assert disk_state(tmp_path) == before


# --------------------------------------------------------------------------------------------- live objects


def test_shape_mismatch_strict(ckpt):
    path, _ = ckpt
    before = disk_state(path.parent)
    live = make_linear(1, 4, 3)
    live_before = weights(live)
    expect_error(
        StateMismatchError, lambda: trainstate.load(path, {"model": live}), path, "'model.weight'", "[2, 4]", "[3, 4]"
    )
    assert_weights(live, live_before)
    assert disk_state(path.parent) == before


def test_shape_mismatch_non_strict_loads_what_fits(ckpt):
    path, saved = ckpt
    live = make_linear(1, 5, 2)  # weight [2, 5] does not fit, bias [2] does
    live_before = weights(live)
    before = disk_state(path.parent)
    out = trainstate.load(path, {"model": live}, strict=False)
    assert out["model"] is live and out["step"] == 3
    assert torch.equal(live.weight, live_before["weight"])
    assert torch.equal(live.bias, saved["bias"])
    assert disk_state(path.parent) == before


def test_dtype_mismatch_strict(tmp_path):
    path = tmp_path / "ckpt"
    trainstate.save(path, {"model": make_linear(0, 4, 2).double()})
    before = disk_state(tmp_path)
    live = make_linear(1, 4, 2)  # float32
    live_before = weights(live)
    expect_error(StateMismatchError, lambda: trainstate.load(path, {"model": live}), path, "'model.weight'")
    assert_weights(live, live_before)
    assert disk_state(tmp_path) == before


@pytest.mark.parametrize("saved_bias, live_bias, word", [(False, True, "missing"), (True, False, "unexpected")])
def test_missing_and_unexpected_keys(tmp_path, saved_bias, live_bias, word):
    path = tmp_path / "ckpt"
    saved_model = make_linear(0, 4, 2, bias=saved_bias)
    trainstate.save(path, {"model": saved_model})
    saved = weights(saved_model)
    before = disk_state(tmp_path)

    live = make_linear(1, 4, 2, bias=live_bias)
    live_before = weights(live)
    err = expect_error(StateMismatchError, lambda: trainstate.load(path, {"model": live}), path, "'model'", "bias")
    assert f"{word} keys ['bias']" in str(err)
    assert_weights(live, live_before)

    out = trainstate.load(path, {"model": live}, strict=False)
    assert out["model"] is live
    assert torch.equal(live.weight, saved["weight"])
    if live_bias:  # not in the checkpoint: left as it was
        assert torch.equal(live.bias, live_before["bias"])
    assert disk_state(tmp_path) == before


def test_live_object_missing_from_checkpoint(ckpt):
    path, saved = ckpt
    before = disk_state(path.parent)
    live, ema = make_linear(1, 4, 2), make_linear(2, 4, 2)
    live_before, ema_before = weights(live), weights(ema)
    expect_error(StateMismatchError, lambda: trainstate.load(path, {"model": live, "ema": ema}), path, "'ema'")
    assert_weights(live, live_before)
    assert_weights(ema, ema_before)

    out = trainstate.load(path, {"model": live, "ema": ema}, strict=False)
    assert out["model"] is live and "ema" not in out
    assert_weights(live, saved)
    assert_weights(ema, ema_before)
    assert disk_state(path.parent) == before


# --------------------------------------------------------------------------------------------- save


class Opaque:
    pass


@pytest.mark.parametrize(
    "value, type_name",
    [({1, 2}, "set"), (lambda x: x, "function"), (Opaque(), "Opaque")],
    ids=["set", "lambda", "plain_object"],
)
def test_unsupported_value_on_save_keeps_previous_checkpoint(ckpt, value, type_name):
    path, saved = ckpt
    before = disk_state(path.parent)
    state = {"model": make_linear(5, 4, 2), "a": {"b": [value]}}
    expect_error(UnsupportedValueError, lambda: trainstate.save(path, state), path, "a.b.0", type_name)
    assert disk_state(path.parent) == before
    assert no_temp_entries(path.parent)
    live = make_linear(1, 4, 2)
    assert trainstate.load(path, {"model": live})["step"] == 3
    assert_weights(live, saved)


def test_unsupported_value_on_save_fresh_path(tmp_path):
    path = tmp_path / "run" / "ckpt"
    expect_error(UnsupportedValueError, lambda: trainstate.save(path, {"a": {"b": [{3}]}}), path, "a.b.0", "set")
    assert not os.path.lexists(path.parent)  # refused while planning: not even the directory was created


def test_pickled_value_needs_allow_pickle(tmp_path):
    path = tmp_path / "ckpt"
    saved_model = make_linear(0, 4, 2)
    trainstate.save(path, {"model": saved_model, "extra": {"obj": {1, 2, 3}}}, allow_pickle=True)
    before = disk_state(tmp_path)

    live = make_linear(1, 4, 2)
    live_before = weights(live)
    expect_error(UnsafeCheckpointError, lambda: trainstate.load(path), path, "extra.obj", "pickle")
    expect_error(UnsafeCheckpointError, lambda: trainstate.load(path, {"model": live}), path, "extra.obj")
    assert_weights(live, live_before)

    out = trainstate.load(path, {"model": live}, allow_pickle=True)
    assert out["extra"]["obj"] == {1, 2, 3}
    assert_weights(live, weights(saved_model))
    assert trainstate.load(path, allow_pickle=True)["extra"]["obj"] == {1, 2, 3}
    assert disk_state(tmp_path) == before


# --------------------------------------------------------------------------------------------- no partial restore


@pytest.mark.parametrize(
    "shard_bytes",
    [
        None,
        1,
    ],
    ids=["one_file", "file_per_tensor"],
)
def test_corrupt_checkpoint_leaves_live_model_untouched(tmp_path, shard_bytes):
    path = tmp_path / "ckpt"
    kwargs = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
    trainstate.save(path, {"model": make_linear(0, 4, 2)}, **kwargs)
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    assert len(files) == (1 if shard_bytes is None else 2)
    bad = path / files[-1]  # the last file: with one file per tensor, the bias
    flip_bit(bad, bad.stat().st_size - 1)
    before = disk_state(tmp_path)

    live = make_linear(1, 4, 2)
    live_before = weights(live)
    expect_error(CorruptCheckpointError, lambda: trainstate.load(path, {"model": live}), bad, "hash")
    assert_weights(live, live_before)
    assert disk_state(tmp_path) == before
