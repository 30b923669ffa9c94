"""One function resolves every path or URL to a storage backend; an unsupported scheme is a clear
error everywhere (never a local directory named ``s3:``)."""

from __future__ import annotations

import os

import pytest
import torch

import trainstate
from trainstate.storage import LocalStorage, local_path, open_storage, scheme_of, split_path


@pytest.mark.parametrize(
    "location, scheme", [("/a/b", "file"), ("rel/dir", "file"), ("file:///a/b", "file"), ("s3://b/p", "s3")]
)
def test_scheme_of(location, scheme):
    assert scheme_of(location) == scheme


def test_local_locations_resolve_to_local_storage(tmp_path):
    assert local_path(f"file://{tmp_path}/x") == str(tmp_path / "x")
    storage = open_storage(tmp_path)
    assert isinstance(storage, LocalStorage) and storage.root == str(tmp_path)
    trainstate.save(f"file://{tmp_path}/c", {"w": torch.ones(1)})
    assert torch.equal(trainstate.load(tmp_path / "c")["w"], torch.ones(1))
    assert split_path(f"file://{tmp_path}/c")[1] == "c"


@pytest.mark.parametrize(
    "use",
    [
        lambda url: trainstate.CheckpointManager(url),
        lambda url: trainstate.save(url, {"w": torch.ones(1)}),
        lambda url: trainstate.load(url),
        lambda url: trainstate.peek(url),
    ],
    ids=["manager", "save", "load", "peek"],
)
def test_unsupported_scheme_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch, use):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"nosuch://bucket(/run)?: storage scheme 'nosuch' is not supported"):
        use("nosuch://bucket/run")
    assert os.listdir(tmp_path) == []  # no ./nosuch:/bucket/run


def test_cli_refuses_unsupported_schemes(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from trainstate.cli.app import app

    monkeypatch.chdir(tmp_path)
    for args in (
        ["ls", "nosuch://bucket/run"],
        ["inspect", "gs://bucket/ckpt"],
        ["prune", "nosuch://b/r", "--keep-last", "1"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and "is not supported" in result.stderr, (args, result.stderr)
    assert os.listdir(tmp_path) == []
