"""trainstate prune: the manager's retention policies, dry run, the writer lock, newest never deleted."""

from __future__ import annotations

import json
import os

import pytest
import torch
from cli_sources import STEPS

import trainstate


def _left(directory) -> list[str]:
    return sorted(os.listdir(directory))


def _names(*steps: int) -> list[str]:
    return [f"step_{s:08d}" for s in steps]


def test_dry_run_changes_nothing(cli, run_copy):
    before = {p: os.stat(run_copy / p).st_ino for p in _left(run_copy)}
    result = cli("prune", run_copy, "--keep-last", "2", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert report["deleted"] == _names(100, 200, 300) and report["kept"] == _names(400, 500)
    assert {p: os.stat(run_copy / p).st_ino for p in _left(run_copy)} == before
    human = cli("prune", run_copy, "--keep-last", "2", "-n")
    assert "would delete" in human.stdout and human.stdout.splitlines()[-1].startswith(
        "would delete 3 of 5 checkpoints"
    )


@pytest.mark.parametrize(
    ("options", "kept", "reasons"),
    [
        (["--keep-last", "2", "--keep-best", "1", "--monitor", "loss"], [300, 400, 500], {300: ["best 1"]}),
        (["--keep-best", "1", "--monitor", "acc", "--mode", "max"], [400, 500], {500: ["newest"]}),
        (["--keep-every", "200"], [200, 400, 500], {200: ["every 200"], 500: ["newest"]}),
        (["--keep-last", "1"], [500], {500: ["newest", "last 1"]}),
    ],
)
def test_policies(cli, run_copy, options, kept, reasons):
    result = cli("prune", run_copy, *options, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kept"] == _names(*kept)
    assert report["deleted"] == _names(*[s for s in STEPS if s not in kept])
    assert _left(run_copy) == _names(*kept)
    rows = {r["step"]: r for r in report["checkpoints"]}
    for step, why in reasons.items():
        assert rows[step]["reasons"] == why
    with trainstate.CheckpointManager(run_copy, keep_last=None) as manager:  # the manager agrees
        assert manager.steps() == kept


def test_takes_the_writer_lock(cli, run_copy):
    manager = trainstate.CheckpointManager(run_copy, keep_last=None)
    manager.save(600, {"w": torch.ones(1)}, metrics={"loss": 0.1, "acc": 0.9})  # holds the lock until close()
    try:
        result = cli("prune", run_copy, "--keep-last", "1")
        assert result.exit_code == 1
        assert result.stderr == (
            f"error: {run_copy}: another writer holds the lock (a second process or CheckpointManager saving into "
            "the same directory); stop it or use a different directory\n"
        )
        assert _left(run_copy) == _names(*STEPS, 600)
    finally:
        manager.close()
    assert cli("prune", run_copy, "--keep-last", "1").exit_code == 0
    assert _left(run_copy) == _names(600)


def test_leaves_damaged_ones_and_removes_leftovers(cli, run_copy):
    os.remove(run_copy / "step_00000200" / "manifest.json")
    (run_copy / ".trainstate-tmp-step_00000700-0123456789ab").mkdir()
    result = cli("prune", run_copy, "--keep-last", "1", "--json")
    report = json.loads(result.stdout)
    assert report["deleted"] == _names(100, 300, 400)
    assert report["untouched"] == _names(200)
    assert report["temporaries_removed"] == [".trainstate-tmp-step_00000700-0123456789ab"]
    assert _left(run_copy) == _names(200, 500)


def test_usage_errors(cli, run_copy, run_dir):
    assert cli("prune", run_copy).exit_code == 2
    assert cli("prune", run_copy, "--keep-best", "1").exit_code == 2
    assert cli("prune", run_copy, "--keep-last", "0").exit_code == 2
    one = cli("prune", run_dir / "step_00000100", "--keep-last", "1")
    assert one.exit_code == 1 and "is one checkpoint" in one.stderr
    assert _left(run_copy) == _names(*STEPS)


def test_subprocess(subprocess_runs):
    run = subprocess_runs["prune"]
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["kept"] == _names(300, 400, 500) and report["deleted"] == _names(100, 200)
    assert _left(report["directory"]) == _names(300, 400, 500)
