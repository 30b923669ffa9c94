"""Error classification campaign for ``CheckpointManager.restore``: only damage to a checkpoint's
files may be skipped (falling back to an older one); every error about the state, the arguments or
the machine (memory, open files, permissions, devices) is raised as it is, with nothing skipped.

Each case breaks one thing about the newest of three checkpoints (or about the live state, or the
process) and states the outcome: ``SKIP`` (restore returns step 2 and warns about step 3) or the
exception type that must come out of both ``restore`` and ``trainstate.load``.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import trainstate
from support import snapshot
from trainstate import CheckpointManager, StateMismatchError
from trainstate.storage import MANIFEST_NAME

SKIP = "skip"
NEWEST = 3


def make_model(width: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, width)


def make_state(model: torch.nn.Module | None = None) -> dict[str, Any]:
    model = model or make_model()
    optimizer = torch.optim.Adam(model.parameters())
    return {"model": model, "optimizer": optimizer, "extra": Counter()}


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


class Refuses(Counter):
    def load_state_dict(self, state: dict[str, int]) -> None:
        raise ValueError("unsupported version")


@dataclass
class Case:
    name: str
    outcome: str | type[BaseException]
    damage: Callable[[Path], None] = lambda ckpt: None  # applied to the newest checkpoint's directory
    state: Callable[[], dict[str, Any]] = make_state
    restore_kwargs: dict[str, Any] = field(default_factory=dict)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # breaks the process, not the files


def _data_file(ckpt: Path) -> Path:
    return next(p for p in sorted(ckpt.iterdir()) if p.suffix == ".safetensors")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _rewrite_metadata(ckpt: Path, **changes: Any) -> None:
    from trainstate.format.manifest import Manifest

    path = ckpt / MANIFEST_NAME
    manifest = Manifest.from_json(path.read_bytes(), where=str(path))
    metadata = {**manifest.metadata, "v": {**manifest.metadata["v"], **changes}}
    path.write_bytes(Manifest(**{**manifest.__dict__, "metadata": metadata}).to_json())


def _fail_torch_empty(exc: BaseException) -> Callable[[pytest.MonkeyPatch], None]:
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        import trainstate.format.loader as loader

        real = torch.empty

        class Torch:
            def __getattr__(self, name: str) -> Any:
                return getattr(torch, name)

            @staticmethod
            def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
                if kwargs.get("device") is None and args and tuple(args[0]) == (4, 3):
                    raise exc
                return real(*args, **kwargs)

        monkeypatch.setattr(loader, "torch", Torch())

    return patch


def _fail_open(code: int) -> Callable[[pytest.MonkeyPatch], None]:
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        import trainstate.storage.local as local

        real = os.open

        def fake_open(path: Any, flags: int, *args: Any) -> int:
            if str(path).endswith(".safetensors"):
                raise OSError(code, os.strerror(code), str(path))
            return real(path, flags, *args)

        monkeypatch.setattr(local.os, "open", fake_open)

    return patch


def _raising_map_location(storage: Any, location: str) -> Any:
    raise RuntimeError("map_location callback failed")


CASES = [
    # Damage to the newest checkpoint's files: skipped, the one before it is restored.
    Case("data_bit_flip", SKIP, damage=lambda c: _flip(_data_file(c), -3)),
    Case("data_header_flip", SKIP, damage=lambda c: _flip(_data_file(c), 12)),
    Case("data_truncated", SKIP, damage=lambda c: os.truncate(_data_file(c), 40)),
    Case("data_missing", SKIP, damage=lambda c: _data_file(c).unlink()),
    Case("data_replaced_by_dir", SKIP, damage=lambda c: (_data_file(c).unlink(), _data_file_dir(c))),
    Case("manifest_bit_flip", SKIP, damage=lambda c: _flip(c / MANIFEST_NAME, 30)),
    Case("manifest_truncated", SKIP, damage=lambda c: os.truncate(c / MANIFEST_NAME, 100)),
    Case("manifest_missing", SKIP, damage=lambda c: (c / MANIFEST_NAME).unlink()),
    Case("future_format", SKIP, damage=lambda c: _future_format(c)),
    Case("step_float", SKIP, damage=lambda c: _rewrite_metadata(c, step=3.0)),
    Case("step_missing", SKIP, damage=lambda c: _rewrite_metadata(c, step=None)),
    Case("metrics_not_a_mapping", SKIP, damage=lambda c: _rewrite_metadata(c, metrics=[1, 2])),
    # The live state does not fit: raised, never skipped (an older checkpoint would not fit either).
    Case("module_shape", StateMismatchError, state=lambda: make_state(make_model(5))),
    Case("optimizer_groups", StateMismatchError, state=lambda: _two_group_state()),
    Case("object_refuses", StateMismatchError, state=lambda: {**make_state(), "extra": Refuses()}),
    Case("missing_entry", StateMismatchError, state=lambda: {**make_state(), "new_model": make_model()}),
    # Arguments: raised as they are.
    Case("map_location_absent_device", ValueError, restore_kwargs={"map_location": "cuda:7"}),
    Case("map_location_callable_raises", RuntimeError, restore_kwargs={"map_location": _raising_map_location}),
    # The machine: raised as they are.
    Case("out_of_memory", torch.OutOfMemoryError, patch=_fail_torch_empty(torch.OutOfMemoryError("CUDA OOM"))),
    Case("memory_error", MemoryError, patch=_fail_torch_empty(MemoryError())),
    Case("interrupted", KeyboardInterrupt, patch=_fail_torch_empty(KeyboardInterrupt())),
    Case("too_many_open_files", OSError, patch=_fail_open(errno.EMFILE)),
    Case("permission_denied", PermissionError, patch=_fail_open(errno.EACCES)),
    Case("io_error", OSError, patch=_fail_open(errno.EIO)),
]


def _data_file_dir(ckpt: Path) -> None:
    (ckpt / "tensors-00000.safetensors").mkdir()


def _future_format(ckpt: Path) -> None:
    from trainstate.format.manifest import Manifest

    path = ckpt / MANIFEST_NAME
    manifest = Manifest.from_json(path.read_bytes(), where=str(path))
    path.write_bytes(Manifest(**{**manifest.__dict__, "format_version": 99}).to_json())


def _two_group_state() -> dict[str, Any]:
    model = make_model()
    weight, bias = model.parameters()
    return {
        "model": model,
        "optimizer": torch.optim.Adam([{"params": [weight]}, {"params": [bias]}]),
        "extra": Counter(),
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pristine")
    state = make_state()
    state["model"](torch.ones(1, 3)).sum().backward()
    state["optimizer"].step()  # moments exist: a restore into a fresh optimizer allocates them
    with CheckpointManager(directory, keep_last=None) as manager:
        for step in (1, 2, NEWEST):
            state["extra"].n = step
            manager.save(step, state)
    return directory


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_only_damage_is_skipped(case: Case, pristine: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    import shutil

    directory = tmp_path / "run"
    shutil.copytree(pristine, directory)
    newest = directory / f"step_{NEWEST:08d}"
    case.damage(newest)
    before = snapshot(directory)
    state = case.state()
    if case.patch is not None:
        case.patch(monkeypatch)
    caplog.set_level(logging.WARNING)
    with CheckpointManager(directory) as manager:
        if case.outcome == SKIP:
            assert manager.restore(state, **case.restore_kwargs) == 2
            assert state["extra"].n == 2
            assert f"step {NEWEST}" in caplog.text or newest.name in caplog.text
            return
        assert isinstance(case.outcome, type)
        with pytest.raises(case.outcome) as err:
            manager.restore(state, **case.restore_kwargs)
    assert type(err.value) is case.outcome or not issubclass(case.outcome, trainstate.CheckpointError)
    assert "skipping" not in caplog.text, caplog.text  # nothing was passed over as damaged
    assert snapshot(directory) == before  # and nothing on disk was touched
    monkeypatch.undo()
    if case.patch is not None:
        case.patch(monkeypatch)
    with pytest.raises(case.outcome):  # the one-shot load classifies the same way
        trainstate.load(newest, case.state(), **case.restore_kwargs)


def test_campaign_covers_every_class() -> None:
    outcomes = {c.outcome for c in CASES}
    assert SKIP in outcomes and {StateMismatchError, ValueError, RuntimeError, MemoryError, OSError} <= outcomes
