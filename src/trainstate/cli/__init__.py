"""The ``trainstate`` command line: ls, inspect, verify, diff, convert, export, prune, plot.

The top layer (DESIGN §7): it may import anything below it, nothing imports it. typer and rich are
an optional extra, imported only when the command runs: ``pip install 'trainstate[cli]'``.
"""

from __future__ import annotations

import sys

__all__ = ["INSTALL_HINT", "main"]

INSTALL_HINT = "pip install 'trainstate[cli]'"


def main() -> None:
    """Entry point of the ``trainstate`` console script and of ``python -m trainstate``."""
    if sys.argv[1:] == ["--version"]:  # answered before typer and the commands (and torch) load
        from trainstate._version import __version__

        print(f"trainstate {__version__}")
        return
    try:
        import rich  # noqa: F401
        import typer  # noqa: F401
    except ImportError as exc:
        sys.stderr.write(f"trainstate: the command line needs {exc.name or 'typer and rich'}: {INSTALL_HINT}\n")
        raise SystemExit(1) from None
    from trainstate.cli.app import app

    app(prog_name="trainstate")
