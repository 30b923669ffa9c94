"""Promise 1: a crash at any instant loses nothing committed and never exposes a partial checkpoint.

The campaign (crash_campaign.py) forks writers that save through CheckpointManager and SIGKILLs them
200 times — at random instants and, every third kill, on entry into a chosen phase of a save (encode,
tensor write, fsync, manifest write, directory fsync, rename, retention delete). After each kill a
restore must return the newest step whose commit finished (or the one in flight, if its rename landed),
bit-identical to what was saved; every listed checkpoint must be complete and exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainstate.storage import TEMP_PREFIX

CAMPAIGN = Path(__file__).with_name("crash_campaign.py")
sys.path.insert(0, str(CAMPAIGN.parent))

from crash_campaign import PHASES  # noqa: E402

KILLS = 200


@pytest.mark.slow
def test_sigkill_at_any_instant_of_a_save(tmp_path):
    out = subprocess.run(
        [sys.executable, str(CAMPAIGN), str(tmp_path / "run"), "--kills", str(KILLS), "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(summary, indent=1))  # the figures quoted in the README's Reliability section
    assert summary["problems"] == []
    assert summary["kills"] == KILLS and summary["restores"] == KILLS
    for phase in (p for p in PHASES if p != "between saves"):
        assert summary["phases"].get(f"{phase} (targeted)", 0) >= 1, phase
    assert summary["kills_with_leftovers"] > 0  # the kills really did land mid-save
    assert summary["leftovers_after_next_save"] == []
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(TEMP_PREFIX)]
