"""The format contract: golden checkpoints of every released format version still load exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import trainstate
from support import assert_same
from trainstate.format import FORMAT_VERSION, CheckpointReader, Manifest
from trainstate.storage import split_path

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

from make_golden import golden_state  # noqa: E402


@pytest.mark.parametrize("version", range(1, FORMAT_VERSION + 1))
def test_golden_checkpoint_loads_exactly(version):
    path = FIXTURES / f"v{version}"
    loaded = trainstate.load(path)
    assert_same(loaded, golden_state(version))
    reader = CheckpointReader(*split_path(path))
    reader.verify()
    assert reader.manifest.format_version == version
    assert reader.metadata() == {"step": 7, "metrics": {"loss": 0.25}}


def test_manifest_json_round_trip_is_stable():
    data = (FIXTURES / f"v{FORMAT_VERSION}" / "manifest.json").read_bytes()
    manifest = Manifest.from_json(data, where="golden")
    again = Manifest.from_json(manifest.to_json(), where="again")
    assert again == manifest
