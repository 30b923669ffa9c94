"""Runs examples/train.py (or the example named by $KILL_DURING_SAVE_SCRIPT), but SIGKILLs itself inside
the commit of step $KILL_DURING_SAVE_STEP: after every data file of that checkpoint is written and fsynced,
before its manifest is written and the rename publishes it."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from trainstate.storage import local

target = f"step_{int(os.environ['KILL_DURING_SAVE_STEP']):08d}"
real_commit = local._LocalPending.commit


def commit_then_die(self: local._LocalPending, manifest: bytes) -> None:
    if os.path.basename(self._final) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    real_commit(self, manifest)


local._LocalPending.commit = commit_then_die  # type: ignore[method-assign]
script = Path(__file__).resolve().parents[2] / "examples" / os.environ.get("KILL_DURING_SAVE_SCRIPT", "train.py")
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
