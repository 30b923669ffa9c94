"""The app itself: commands and help, version, the console script, errors (one line, exit codes, --debug),
and the install hint when typer/rich are missing."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest

import trainstate
from trainstate.cli import main

COMMANDS = ["ls", "inspect", "verify", "diff", "convert", "export", "prune", "plot"]


def test_help_lists_every_command(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f"│ {name} " in result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_examples(cli, name):
    result = cli(name, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and f"trainstate {name} " in result.stdout


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout == f"trainstate {trainstate.__version__}\n"


def test_console_script_entry_point():
    [script] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "trainstate"]
    assert script.value == "trainstate.cli:main"
    assert script.load() is main


def test_usage_errors_exit_2(cli):
    assert cli("frobnicate").exit_code == 2
    assert cli("ls").exit_code == 2  # missing argument
    assert cli("ls", ".", "--no-such-option").exit_code == 2


def test_errors_are_one_red_line_and_debug_shows_the_traceback(cli, tmp_path):
    result = cli("inspect", tmp_path / "nope")
    assert result.exit_code == 1
    assert result.stdout == "" and result.stderr == f"error: {tmp_path / 'nope'}: no such checkpoint\n"
    debug = cli("inspect", tmp_path / "nope", "--debug")
    assert debug.exit_code == 1
    assert isinstance(debug.exception, trainstate.CheckpointNotFoundError)


def test_missing_typer_gives_the_install_hint(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "typer", None)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "trainstate: the command line needs typer: pip install 'trainstate[cli]'\n"


# What each command may import: the ones that only read manifests never import torch (about 1.6 s on
# this machine) or numpy; verify hashes files and reads headers, without torch too.
TORCH_FREE = [
    ["--help"],
    ["ls", "{run}"],
    ["ls", "{run}", "--json"],
    ["inspect", "{run}/step_00000500"],
    ["inspect", "{run}/step_00000500", "--json"],
    ["verify", "{run}"],
    ["prune", "{run}", "--keep-last", "1", "--dry-run"],
    ["convert", "--help"],
    ["export", "--help"],
    ["diff", "--help"],
]


@pytest.mark.parametrize("args", TORCH_FREE, ids=" ".join)
def test_reading_commands_never_import_torch(run_dir, args):
    import json
    import subprocess

    argv = ["trainstate", *(a.format(run=run_dir) for a in args)]
    probe = (
        "import sys; from trainstate.cli import main; sys.argv = " + json.dumps(argv) + "\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'imported torch or numpy'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout


def test_tensor_commands_import_torch_when_they_run(run_dir, tmp_path):
    import subprocess

    argv = ["trainstate", "export", str(run_dir / "step_00000500"), str(tmp_path / "w.safetensors")]
    probe = (
        f"import sys; from trainstate.cli import main; sys.argv = {argv!r}\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "assert 'torch' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "w.safetensors").stat().st_size > 0
