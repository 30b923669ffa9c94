"""The typer application: one command per module, registered here with its help and examples."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from trainstate._version import __version__
from trainstate.cli import convert, diff, export, inspect, ls, plot, prune, verify
from trainstate.cli._scan import set_storage_options

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


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as fsspec storage options: a VALUE that parses as JSON is taken as such
    (``anon=true``, ``config_kwargs={"retries": {...}}``), dotted KEYs nest
    (``client_kwargs.region_name=eu-west-1``)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r}: use KEY=VALUE", param_hint="--storage-option")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        *outer, last = key.split(".")
        target = options
        for part in outer:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise typer.BadParameter(f"{pair!r}: {part} is already a value", param_hint="--storage-option")
        target[last] = value
    return options


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    storage_option: Annotated[
        list[str] | None,
        typer.Option(
            "--storage-option",
            "-S",
            metavar="KEY=VALUE",
            help="An fsspec option for s3:// (or other) URLs, e.g. endpoint_url=http://localhost:9000 (repeatable).",
        ),
    ] = None,
) -> None:
    """See into, verify, compare, convert, export and prune trainstate checkpoints."""
    set_storage_options(parse_storage_options(storage_option or []))
