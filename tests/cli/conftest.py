"""CLI fixtures: a manager directory, real framework checkpoints (built once per session), a CliRunner
helper, and every command run once as a real ``python -m trainstate`` subprocess, all in parallel."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import cli_sources  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cli_sources.make_run(tmp_path_factory.mktemp("cli") / "run")


@pytest.fixture
def run_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A private copy of `run_dir` for tests that change it."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Foreign checkpoints by kind: torch, dcp, evil (+ marker), and, when installed, hf, hf-bin, lightning."""
    root = tmp_path_factory.mktemp("sources")
    found: dict[str, Path] = {}
    for name, build in (("torch", cli_sources.make_torch_save), ("dcp", cli_sources.make_dcp)):
        (root / name).mkdir()
        found[name] = build(root / name)
    (root / "evil").mkdir()
    found["evil"], found["evil-marker"] = cli_sources.make_evil(root / "evil")
    try:
        import transformers  # noqa: F401
    except ImportError:
        pass
    else:
        for name, safetensors in (("hf", True), ("hf-bin", False)):
            (root / name).mkdir()
            found[name] = cli_sources.make_hf_trainer(root / name, safetensors=safetensors)
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        try:
            import lightning  # noqa: F401
        except ImportError:
            return found
    (root / "lightning").mkdir()
    found["lightning"] = cli_sources.make_lightning(root / "lightning")
    return found


@pytest.fixture
def cli() -> Callable[..., object]:
    """Run the app in-process with typer's CliRunner: ``cli("ls", path)``; stdout and stderr kept apart."""
    from typer.testing import CliRunner

    from trainstate.cli.app import app

    runner = CliRunner()

    def invoke(*args: object) -> object:
        return runner.invoke(app, [str(a) for a in args])

    return invoke


@dataclass
class Run:
    """A finished ``python -m trainstate`` subprocess."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("COLUMNS", None)
    return env


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trainstate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _start_in_terminal(args: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """Run with stdout and stderr on a pseudo-terminal, as a person at a terminal would."""
    controller, terminal = pty.openpty()
    env = {**_env(), "TERM": "xterm-256color", "COLUMNS": "100"}
    process = subprocess.Popen(
        [sys.executable, "-m", "trainstate", *args], stdout=terminal, stderr=terminal, env=env, close_fds=True
    )
    os.close(terminal)
    return process, controller


def _read_terminal(process: subprocess.Popen[bytes], controller: int, timeout: float) -> tuple[int, str]:
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    return process.wait(timeout=max(1.0, deadline - time.monotonic())), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="session")
def subprocess_runs(
    run_dir: Path, sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Run]:
    """Every command once as a real subprocess (``python -m trainstate ...``), started together so the
    interpreter start-ups overlap; keyed by command name."""
    out = tmp_path_factory.mktemp("subprocess")
    prune_dir = Path(shutil.copytree(run_dir, out / "prune-run"))
    convert_src = sources.get("lightning", sources["torch"])
    commands = {
        "ls": ["ls", str(run_dir), "--json"],
        "inspect": ["inspect", str(run_dir / "step_00000300"), "--json"],
        "verify": ["verify", str(run_dir)],
        "diff": ["diff", str(run_dir / "step_00000100"), str(run_dir / "step_00000300"), "--json"],
        "convert": ["convert", str(convert_src), str(out / "converted")],
        "export": ["export", str(run_dir / "step_00000500"), str(out / "model.safetensors"), "--json"],
        "prune": ["prune", str(prune_dir), "--keep-last", "2", "--keep-best", "1", "--monitor", "loss", "--json"],
        "plot": ["plot", str(run_dir), "-m", "loss", "-m", "acc:max", "-o", str(out / "curve.png")],
        "missing": ["inspect", str(out / "nope")],
    }
    started = {name: _start(args) for name, args in commands.items()}
    terminal, controller = _start_in_terminal(["verify", str(run_dir)])
    runs = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        runs[name] = Run(commands[name], process.returncode, stdout, stderr)
    code, screen = _read_terminal(terminal, controller, timeout=300)
    runs["verify-tty"] = Run(["verify", str(run_dir)], code, screen, "")
    runs["_out"] = Run([str(out)], 0, str(out), "")
    return runs
