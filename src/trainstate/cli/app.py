"""The typer application: one command per module, registered here with its help and examples."""

from __future__ import annotations

from typing import Annotated

import typer

from trainstate._version import __version__
from trainstate.cli import convert, diff, export, inspect, ls, plot, prune, verify

app = typer.Typer(
    name="trainstate",
    help="See into, verify, compare, convert, export and prune trainstate checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

for module in (ls, inspect, verify, diff, convert, export, prune, plot):
    name = module.__name__.rsplit(".", 1)[1]
    app.command(name=name, help=module.HELP, epilog=module.EPILOG)(getattr(module, name))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"trainstate {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """See into, verify, compare, convert, export and prune trainstate checkpoints."""
