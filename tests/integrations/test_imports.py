"""Every integration is an optional extra: ``import trainstate`` (and using it) never imports a framework,
and an integration whose framework is missing says which extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

INTEGRATIONS = [
    ("lightning", "pytorch_lightning", "lightning"),
    ("transformers", "transformers", "transformers"),
    ("accelerate", "accelerate", "accelerate"),
]


@pytest.mark.parametrize(("integration", "framework", "extra"), INTEGRATIONS)
def test_frameworks_are_imported_only_by_their_integration(integration, framework, extra):
    code = (
        "import sys, trainstate, trainstate.integrations\n"
        "trainstate.save, trainstate.CheckpointManager, trainstate.Run\n"
        f"assert {framework!r} not in sys.modules, 'import trainstate imported {framework}'\n"
        f"sys.modules[{framework!r}] = None\n"
        "try:\n"
        f"    import trainstate.integrations.{integration}\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"pip install 'trainstate[{extra}]'" in out.stdout
