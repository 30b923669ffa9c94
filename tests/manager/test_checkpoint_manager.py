"""CheckpointManager: retention on disk, index from manifests, auto-resume past corruption, locking,
preemption, early stopping, async saves and bad input."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest
import torch

import trainstate
from support import assert_same, snapshot
from trainstate import CheckpointManager, EarlyStopping
from trainstate.storage import TEMP_PREFIX


def model_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(3, 2)}


def committed(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory) if not p.startswith("."))


def test_checkpoints_are_plain_trainstate_checkpoints(tmp_path):
    state = model_state()
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        assert mgr.save(10, state, {"loss": 0.5}) is True
        assert mgr.steps() == [10] and mgr.latest_step() == 10 and mgr.metrics(10) == {"loss": 0.5}
        assert mgr.path(10) == str(tmp_path / "step_00000010")
    loaded = trainstate.load(tmp_path / "step_00000010")
    assert_same(loaded["model"], state["model"].state_dict())


def test_tutorial_scenario_best_survives_on_disk(tmp_path):
    losses = [0.5, 0.1, 0.4, 0.3, 0.35, 0.45, 0.41]
    with CheckpointManager(tmp_path, keep_last=4, keep_best=1, monitor="val_loss") as mgr:
        for step, loss in enumerate(losses, start=1):
            mgr.save(step, model_state(step), {"val_loss": loss})
        assert mgr.best_step() == 2
        assert mgr.steps() == [2, 4, 5, 6, 7]
    assert committed(tmp_path) == [f"step_{s:08d}" for s in (2, 4, 5, 6, 7)]
    best = trainstate.load(tmp_path / "step_00000002")
    assert_same(best["model"], model_state(2)["model"].state_dict())


def test_index_is_rebuilt_from_manifests(tmp_path):
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step, loss in [(1, 0.3), (2, 0.1), (3, 0.2)]:
            mgr.save(step, model_state(), {"val_loss": loss})
    (tmp_path / "step_00000099").mkdir()  # no manifest: not a checkpoint
    mgr = CheckpointManager(tmp_path, keep_last=None, monitor="val_loss")
    assert mgr.steps() == [1, 2, 3] and mgr.best_step() == 2 and mgr.metrics(3) == {"val_loss": 0.2}
    with pytest.raises(trainstate.CheckpointNotFoundError, match="step 99"):
        mgr.metrics(99)
    mgr.close()


def _flip(path, offset=-1):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "missing_manifest", "manifest_edit"])
def test_restore_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, caplog, damage):
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, model_state(step))
    newest = tmp_path / "step_00000003"
    tensors = newest / "tensors-00000.safetensors"
    if damage == "flipped_byte":
        _flip(tensors)
    elif damage == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:-7])
    elif damage == "missing_manifest":
        (newest / "manifest.json").unlink()
    else:
        _flip(newest / "manifest.json", 40)
    (tmp_path / f"{TEMP_PREFIX}step_00000004-dead").mkdir()  # leftover of a killed writer
    target = model_state(99)
    caplog.set_level(logging.WARNING)
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        assert mgr.restore(target) == 2
    assert_same(target["model"].state_dict(), model_state(2)["model"].state_dict())
    assert "step_00000003" in caplog.text or "step 3" in caplog.text


def test_restore_raises_on_state_mismatch_instead_of_skipping(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model_state())
        mgr.save(2, model_state())
        with pytest.raises(trainstate.StateMismatchError, match="model.weight"):
            mgr.restore({"model": torch.nn.Linear(4, 2)})


def test_restore_specific_step_and_empty_directory(tmp_path):
    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        assert mgr.restore(model_state()) is None
        mgr.save(1, model_state(1))
        mgr.save(2, model_state(2))
        target = model_state(5)
        assert mgr.restore(target, step=1) == 1
        assert_same(target["model"].state_dict(), model_state(1)["model"].state_dict())
        _flip(tmp_path / "step_00000001" / "tensors-00000.safetensors")
        with pytest.raises(trainstate.CorruptCheckpointError, match="step_00000001"):
            mgr.restore(target, step=1)


def test_second_writer_gets_a_clear_error_and_readers_need_no_lock(tmp_path):
    with CheckpointManager(tmp_path) as first:
        first.save(1, model_state())
        second = CheckpointManager(tmp_path, lock_timeout=0)
        assert second.restore(model_state()) == 1  # readers take no lock
        before = snapshot(tmp_path)
        with pytest.raises(trainstate.CheckpointLockedError, match=str(tmp_path)):
            second.save(2, model_state())
        assert snapshot(tmp_path) == before
        second.close()
        first.save(2, model_state())
    with CheckpointManager(tmp_path) as third:  # released on close
        third.save(3, model_state())


def test_next_writer_removes_stale_temporaries(tmp_path):
    (tmp_path / f"{TEMP_PREFIX}step_00000007-abc").mkdir(parents=True)
    (tmp_path / f"{TEMP_PREFIX}step_00000007-abc" / "tensors-00000.safetensors").write_bytes(b"partial")
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(8, model_state())
    assert os.listdir(tmp_path) == ["step_00000008"]


def test_triggers_decide_when_a_plain_save_saves(tmp_path):
    with CheckpointManager(tmp_path / "a", keep_last=None, every_n_steps=3) as mgr:
        saved = [step for step in range(1, 10) if mgr.save(step, model_state())]
        assert mgr.save(10, model_state(), force=True)  # force overrides the trigger
    assert saved == [3, 6, 9]
    with CheckpointManager(tmp_path / "b", keep_last=None) as mgr:  # no trigger: every call saves
        assert [step for step in range(1, 4) if mgr.save(step, model_state())] == [1, 2, 3]


def test_preemption_signal_forces_a_save_and_asks_to_stop(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    with CheckpointManager(tmp_path, keep_last=None, every_n_steps=100, preemption_signals=[signal.SIGUSR1]) as mgr:
        assert not mgr.save(1, model_state(), force=False)
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler only sets a flag
        assert not mgr.should_stop and mgr.steps() == []
        assert mgr.save(2, model_state(), force=False)
        assert mgr.should_stop and mgr.steps() == [2] and mgr.stop_reason == "preempted by SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_early_stopping_state_survives_a_restart(tmp_path):
    def run(losses, start):
        state = model_state()
        with CheckpointManager(
            tmp_path,
            keep_last=2,
            keep_best=1,
            monitor="val_loss",
            early_stopping=EarlyStopping(patience=3, min_delta=0.01),
        ) as mgr:
            step = mgr.restore(state) or start
            for loss in losses:
                step += 1
                mgr.save(step, state, {"val_loss": loss})
            return mgr.should_stop, mgr.early_stopping.bad_evaluations, mgr.stop_reason

    assert run([1.0, 0.5, 0.495, 0.6], 0) == (False, 2, None)  # 0.495 is within min_delta: no improvement
    stop, bad, reason = run([0.7], 0)
    assert (stop, bad) == (True, 3) and "val_loss did not improve for 3 evaluations" in reason


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "maximum"}, "mode='maximum'"),
        ({"keep_last": 0}, "keep_last=0"),
        ({"keep_best": 1}, "needs monitor"),
        ({"keep_last": -1}, "keep_last=-1"),
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"early_stopping": EarlyStopping(patience=2)}, "early_stopping needs monitor"),
    ],
)
def test_bad_options_are_refused_eagerly(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        CheckpointManager(tmp_path / "ckpts", **kwargs)
    assert not (tmp_path / "ckpts").exists()


def test_bad_save_calls_lose_nothing(tmp_path):
    with CheckpointManager(tmp_path, keep_last=None, monitor="val_loss", keep_best=1) as mgr:
        mgr.save(5, model_state(), {"val_loss": 1.0})
        before = snapshot(tmp_path)
        with pytest.raises(ValueError, match="do not include the monitored metric 'val_loss'"):
            mgr.save(6, model_state(), {"val_los": 1.0})
        with pytest.raises(ValueError, match="step 4 is older than the latest checkpoint"):
            mgr.save(4, model_state())
        assert mgr.save(5, model_state()) is False  # same step: not saved twice
        with pytest.raises(ValueError, match="not a number"):
            mgr.save(6, model_state(), {"val_loss": "low"})
        with pytest.raises(trainstate.UnsupportedValueError, match="extra"):
            mgr.save(6, {**model_state(), "extra": object()})
        assert snapshot(tmp_path) == before and mgr.steps() == [5]
        mgr.save(6, model_state(), metrics=None)  # no metrics: allowed, never best
        assert mgr.best_step() == 5


def test_directory_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(trainstate.CheckpointWriteError, match="not a directory"):
        CheckpointManager(tmp_path / "file")


def test_unwritable_directory_is_a_clear_error(tmp_path, monkeypatch):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model_state())
        before = snapshot(tmp_path)

        def refuse(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", path)

        monkeypatch.setattr(os, "mkdir", refuse)
        with pytest.raises(trainstate.CheckpointWriteError, match="Permission denied"):
            mgr.save(2, model_state())
        monkeypatch.undo()
        assert snapshot(tmp_path) == before
        mgr.save(3, model_state())
        assert mgr.steps() == [1, 3]


def test_async_save_captures_state_at_call_time(tmp_path):
    state = model_state()
    expected = {k: v.clone() for k, v in state["model"].state_dict().items()}
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        assert mgr.save(1, state)
        with torch.no_grad():
            state["model"].weight.add_(1.0)  # training continues while the save is written
        mgr.wait()
        assert mgr.steps() == [1]
    assert_same(dict(trainstate.load(tmp_path / "step_00000001")["model"]), expected)


def test_async_save_error_surfaces_on_wait_and_next_save(tmp_path, monkeypatch):
    from trainstate.storage import local

    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(1, model_state())
        mgr.wait()
        real_write = local._LocalPending.write

        def failing(self, filename, chunks):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(local._LocalPending, "write", failing)
        assert mgr.save(2, model_state())  # returns at once; the failure happens in the background
        with pytest.raises(trainstate.CheckpointWriteError, match="No space left"):
            mgr.wait()
        monkeypatch.setattr(local._LocalPending, "write", real_write)
        mgr.save(2, model_state())
        mgr.wait()
        assert mgr.steps() == [1, 2]


def test_environment_differences_are_reported(tmp_path, caplog):
    class Loader:
        def __init__(self, workers):
            self.num_workers = workers

        def state_dict(self):
            return {"position": 3}

        def load_state_dict(self, state):
            self.position = state["position"]

    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"loader": Loader(2)})
    caplog.set_level(logging.WARNING)
    with CheckpointManager(tmp_path) as mgr:
        loader = Loader(4)
        assert mgr.restore({"loader": loader}) == 1 and loader.position == 3
    assert "dataloader_workers was {'loader': 2} when saved, is {'loader': 4} now" in caplog.text


def test_restore_rescans_when_listed_checkpoints_vanish_during_the_scan(tmp_path, monkeypatch):
    """Regression: a reader listed steps 1 and 2, a concurrent writer pruned both (after committing 3)
    before their manifests were read; restore must look again, not report 'nothing to restore'."""
    with CheckpointManager(tmp_path, keep_last=None) as writer:
        for step in (1, 2, 3):
            writer.save(step, model_state(step))
    reader = CheckpointManager(tmp_path, lock_timeout=0)
    real_list = type(reader._storage).list
    calls = []

    def stale_listing(self):
        calls.append(1)
        if len(calls) == 1:
            names = ["step_00000001", "step_00000002"]
            for name in names:
                self.delete(name)  # pruned right after the listing
            return names
        return real_list(self)

    monkeypatch.setattr(type(reader._storage), "list", stale_listing)
    target = model_state(99)
    assert reader.restore(target) == 3 and len(calls) >= 2
    assert_same(target["model"].state_dict(), model_state(3)["model"].state_dict())
    reader.close()


def test_a_failed_save_does_not_count_as_an_early_stopping_evaluation(tmp_path, monkeypatch):
    from trainstate.storage import local

    with CheckpointManager(tmp_path, monitor="val_loss", early_stopping=EarlyStopping(patience=2)) as mgr:
        mgr.save(1, model_state(), {"val_loss": 1.0})
        monkeypatch.setattr(
            local._LocalPending, "write", lambda self, name, chunks: (_ for _ in ()).throw(OSError(5, "EIO"))
        )
        with pytest.raises(trainstate.CheckpointWriteError):
            mgr.save(2, model_state(), {"val_loss": 2.0})
        assert mgr.early_stopping.bad_evaluations == 0 and mgr.early_stopping.best == 1.0
        monkeypatch.undo()
        mgr.save(2, model_state(), {"val_loss": 2.0})
        assert mgr.early_stopping.bad_evaluations == 1


def _damage_data(checkpoint: str) -> None:
    for name in os.listdir(checkpoint):
        if name.endswith(".safetensors"):
            with open(os.path.join(checkpoint, name), "r+b") as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([last[0] ^ 0xFF]))


def test_fallback_moves_damaged_newer_checkpoints_aside_and_the_run_goes_on(tmp_path, caplog):
    from typer.testing import CliRunner

    from trainstate.cli.app import app
    from trainstate.storage import QUARANTINE_DIR

    with CheckpointManager(tmp_path, keep_last=None) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(step, model_state(step))
    for step in (3, 4):
        _damage_data(str(tmp_path / f"step_{step:08d}"))  # manifests intact: only the data is bad
    state = model_state(9)
    with CheckpointManager(tmp_path, keep_last=3) as mgr:
        assert mgr.restore(state) == 2
        assert mgr.steps() == [1, 2] and mgr.latest_step() == 2
        assert mgr.save(3, model_state(3)) and mgr.save(4, model_state(4)) and mgr.save(5, model_state(5))
        assert mgr.steps() == [3, 4, 5]  # retention works on the new ones
    assert_same(state["model"].state_dict(), model_state(2)["model"].state_dict())
    aside = sorted(os.listdir(tmp_path / QUARANTINE_DIR))
    assert [name.partition("@")[0] for name in aside] == ["step_00000003", "step_00000004"]
    assert "moved the damaged checkpoint step_00000004 aside" in caplog.text

    runner = CliRunner()
    listing = json.loads(runner.invoke(app, ["ls", str(tmp_path), "--json"]).stdout)
    assert [(e["step"], e["status"]) for e in listing] == [
        (3, "ok"),
        (4, "ok"),
        (5, "ok"),
        (3, "quarantined"),
        (4, "quarantined"),
    ]
    assert runner.invoke(app, ["prune", str(tmp_path), "--quarantined"]).exit_code == 0
    assert os.listdir(tmp_path / QUARANTINE_DIR) == []
    assert trainstate.CheckpointManager(tmp_path).steps() == [3, 4, 5]


def test_fallback_to_nothing_moves_every_damaged_checkpoint_aside(tmp_path):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model_state(1))
    _damage_data(str(tmp_path / "step_00000001"))
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(model_state()) is None
        assert mgr.save(1, model_state(1))  # a fresh start saves normally


def test_a_reader_does_not_move_anything_while_another_writer_holds_the_lock(tmp_path, caplog):
    with CheckpointManager(tmp_path) as writer:
        writer.save(1, model_state(1))
        writer.save(2, model_state(2))
        _damage_data(str(tmp_path / "step_00000002"))
        with CheckpointManager(tmp_path) as reader:
            assert reader.restore(model_state()) == 1
        assert "another writer holds the lock" in caplog.text
        assert writer.steps() == [1, 2]


def test_restore_warns_about_saved_entries_the_state_lacks(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"model": model, "optimizer": optimizer, "epoch": 3})
        assert mgr.restore({"model": torch.nn.Linear(3, 2)}) == 1
    assert "holds 'optimizer', which the state given to restore() does not name" in caplog.text


def test_partial_load_reads_only_the_files_it_needs(tmp_path):
    model = torch.nn.Linear(600, 600)  # 1.4 MB: the optimizer's moments go to a file of their own
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 600)).sum().backward()
    optimizer.step()
    trainstate.save(tmp_path / "c", {"model": model, "optimizer": optimizer, "epoch": 3})
    files = sorted(f for f in os.listdir(tmp_path / "c") if f.endswith(".safetensors"))
    assert len(files) == 2
    _damage_file = tmp_path / "c" / files[1]
    data = bytearray(_damage_file.read_bytes())
    data[-1] ^= 0xFF
    _damage_file.write_bytes(bytes(data))  # only the optimizer's file is bad
    fresh = torch.nn.Linear(600, 600)
    loaded = trainstate.load(tmp_path / "c", {"model": fresh})  # never opens the optimizer's file
    assert loaded["epoch"] == 3 and "optimizer" not in loaded
    assert torch.equal(fresh.weight, model.weight)
    with pytest.raises(trainstate.CorruptCheckpointError, match=files[1]):
        trainstate.load(tmp_path / "c", {"model": fresh, "optimizer": torch.optim.Adam(fresh.parameters())})


def test_metadata_and_peek_read_no_tensor_data(tmp_path):
    config = {"n_layer": 2, "n_embd": 8, "dropout": 0.1}
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model_state(1), {"loss": 2.0}, metadata={"model_args": config})
        mgr.save(2, {**model_state(2), "iter_num": 2}, metadata={"model_args": config, "best_val_loss": 1.5})
        with pytest.raises(ValueError, match="the manager's own"):
            mgr.save(3, model_state(), metadata={"step": 7})
        assert mgr.metadata(2)["best_val_loss"] == 1.5 and mgr.metadata(1)["metrics"] == {"loss": 2.0}
    _damage_data(str(tmp_path / "step_00000002"))  # peek reads manifests only: it does not notice
    with CheckpointManager(tmp_path) as mgr:
        found = mgr.peek()
    assert found is not None and found.step == 2 and found.metadata["model_args"] == config
    assert found.state["iter_num"] == 2 and found.state["model"]["weight"].is_meta
    assert found.state["model"]["weight"].shape == (2, 3)
    assert trainstate.peek(tmp_path / "step_00000001").metadata["model_args"] == config
    with CheckpointManager(tmp_path / "empty") as mgr:
        assert mgr.peek() is None


def test_a_metric_tensor_that_requires_grad_needs_no_torch_warning(tmp_path, recwarn):
    loss = (torch.ones(2, requires_grad=True) * 2).sum()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model_state(), {"loss": loss})
        assert mgr.metrics(1) == {"loss": 4.0}
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]


def test_custom_retention_policies_join_the_union(tmp_path):
    class KeepEpochEnds:
        """A user's policy: keep the checkpoint of every third step (an epoch's end)."""

        def keep(self, infos):
            return {i.step for i in infos if i.step % 3 == 0}

    with CheckpointManager(tmp_path, keep_last=1, retain=[KeepEpochEnds()]) as mgr:
        for step in range(1, 8):
            mgr.save(step, model_state())
        assert mgr.steps() == [3, 6, 7]
    with pytest.raises(TypeError, match="has no keep"):
        CheckpointManager(tmp_path, retain=[object()])


def test_an_async_save_in_flight_has_a_handle(tmp_path):
    from faulty_storage import Faults, FaultyStorage
    from trainstate.storage import LocalStorage

    with CheckpointManager(tmp_path / "ok", async_save=True) as mgr:
        assert mgr.in_flight is None
        mgr.save(1, model_state())
        handle = mgr.in_flight
        assert handle is not None and handle.step == 1
        assert handle.result() == 1 and handle.done() and mgr.steps() == [1]
    faults = Faults(fail_at=2)  # the tensor file's write
    with CheckpointManager(FaultyStorage(LocalStorage(tmp_path / "bad"), faults), async_save=True) as mgr:
        mgr.save(1, model_state())
        handle = mgr.in_flight
        with pytest.raises(trainstate.CheckpointWriteError, match="injected"):
            handle.result()
        with pytest.raises(trainstate.CheckpointWriteError, match="injected"):
            mgr.wait()  # the manager re-raises it too
        assert mgr.steps() == []


def test_an_unreadable_checkpoint_is_raised_not_skipped(tmp_path, monkeypatch):
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, model_state())
        mgr.save(2, model_state())
    real_listdir = os.listdir
    locked = str(tmp_path / "step_00000002")

    def listdir(path="."):
        if os.fspath(path) == locked:  # as without read permission (tests run as root)
            raise PermissionError(13, "Permission denied", locked)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(PermissionError, match="step_00000002"):
        CheckpointManager(tmp_path)  # not damage: falling back to step 1 would hide it
