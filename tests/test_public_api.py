"""The public surface is exactly trainstate.__all__; this pins it so it only changes on purpose."""

from __future__ import annotations

import trainstate

EXPECTED = {
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "CheckpointManager",
    "EarlyStopping",
    "Peek",
    "ResumableSampler",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "RNGState",
    "Run",
    "StateMismatchError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
    "__version__",
    "load",
    "peek",
    "save",
}


def test_all_is_pinned():
    assert set(trainstate.__all__) == EXPECTED
    for name in trainstate.__all__:
        assert hasattr(trainstate, name)


def test_every_error_is_a_checkpoint_error_and_documented():
    errors = [getattr(trainstate, n) for n in trainstate.__all__ if n.endswith("Error")]
    for error in errors:
        assert issubclass(error, trainstate.CheckpointError)
        assert error.__doc__ and "\n" not in error.__doc__.strip()


def test_import_trainstate_and_cli_version_do_not_import_torch():
    import subprocess
    import sys

    probe = (
        "import sys, trainstate; assert 'torch' not in sys.modules, 'import trainstate'; "
        "trainstate.CheckpointError; assert 'torch' not in sys.modules; "
        "sys.argv = ['trainstate', '--version']; from trainstate.cli import main; main(); "
        "assert 'torch' not in sys.modules, '--version'; trainstate.save; assert 'torch' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("trainstate ")
