"""``trainstate ls DIR``: one row per checkpoint of a directory, from the manifests alone."""

from __future__ import annotations

import datetime as _dt
from typing import Annotated, Any

import typer
from rich.text import Text

from trainstate.cli._scan import Entry, Scan, reader_at, scan, verify_entry
from trainstate.cli._ui import (
    UI,
    Better,
    Columns,
    Debug,
    Json,
    Mode,
    Quiet,
    command,
    format_age,
    format_bytes,
    format_number,
)

HELP = "List the checkpoints of a directory: step, epoch, metrics, size, age, status, latest and best."
EPILOG = """\
Reads manifests only (fast, flat memory); --verify also checks every file's hash.

Examples:

  trainstate ls runs/exp1

  trainstate ls runs/exp1 --monitor val_loss --mode min

  trainstate ls runs/exp1 --verify --json | jq '.[] | select(.status != "ok")'
"""

_STATUS_STYLE = {
    "ok": "green",
    "corrupt": "bold red",
    "incomplete": "yellow",
    "unreadable": "bold red",
    "quarantined": "magenta",
}


def _best_monitor(found: Scan, monitor: str | None) -> str | None:
    """The metric that defines "best": the given one, or the only metric the checkpoints have."""
    if monitor is not None:
        return monitor
    names = found.metric_names()
    return names[0] if len(names) == 1 else None


def _verify(found: Scan, ui: UI) -> None:
    entries = found.committed
    total = sum(sum(f.size for f in e.manifest.files) for e in entries if e.manifest is not None)
    with ui.progress("verifying", total) as advance:
        for entry in entries:
            with reader_at(entry.path) as reader:
                problems = verify_entry(reader, advance)
            if problems:
                entry.status, entry.problem = "corrupt", problems[0]


def _row(entry: Entry, now: _dt.datetime, latest: Entry | None, best: Entry | None) -> dict[str, Any]:
    return {
        "name": entry.name,
        "path": entry.path,
        "step": entry.step,
        "epoch": entry.epoch,
        "metrics": entry.metrics,
        "size": entry.size,
        "created": entry.created.isoformat(),
        "age_s": round((now - entry.created).total_seconds(), 3),
        "status": entry.status,
        "problem": entry.problem or None,
        "latest": entry is latest,
        "best": entry is best,
    }


@command
def ls(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="A directory of checkpoints (or one checkpoint).")],
    verify: Annotated[bool, typer.Option("--verify", help="Also check every file's size and hash.")] = False,
    monitor: Annotated[
        str | None, typer.Option(help="Metric that defines 'best' (default: the only metric, if just one).")
    ] = None,
    mode: Mode = Better.min,
    json_output: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    ui = UI(json_output=json_output, quiet=quiet)
    found = scan(directory)
    if verify:
        _verify(found, ui)
    now = _dt.datetime.now(_dt.timezone.utc)
    latest = found.latest()
    chosen = _best_monitor(found, monitor)
    best = found.best(chosen, mode.value) if chosen else None
    rows = [_row(e, now, latest, best) for e in found.entries]
    # With --verify, the exit status says whether every committed checkpoint is intact.
    failed = verify and any(e.status in ("corrupt", "unreadable") for e in found.entries)
    if json_output:
        ui.emit_json(rows)
        if failed:
            raise typer.Exit(1)
        return
    if not found.entries:
        ui.print(f"{found.directory}: no checkpoints")
        return
    metric_names = found.metric_names()
    table = Columns(
        "checkpoint", "step", "epoch", *metric_names, "size", "age", "status",
        right=("step", "epoch", *metric_names, "size", "age"),
    )  # fmt: skip
    for entry, row in zip(found.entries, rows, strict=True):
        markers = [m for m, on in (("latest", row["latest"]), ("best", row["best"])) if on]
        status = Text(entry.status, style=_STATUS_STYLE[entry.status])
        if markers:
            status.append("  " + " ".join(markers), style="bold cyan")
        table.add_row(
            entry.name,
            "-" if entry.step is None else str(entry.step),
            "-" if entry.epoch is None else format_number(entry.epoch),
            *[format_number(entry.metrics[n]) if n in entry.metrics else "-" for n in metric_names],
            format_bytes(entry.size),
            format_age(row["age_s"]),
            status,
        )
    ui.print(table.render())
    summary = f"{len(found.committed)} of {len(found.entries)} checkpoints ok"
    if latest is not None:
        summary += f"; latest step {latest.step}"
    if best is not None:
        summary += f"; best step {best.step} by {chosen} ({mode.value})"
    ui.note(summary)
    for entry in found.entries:
        if entry.status != "ok":
            ui.warn(entry.problem)
    if found.leftovers:
        ui.warn(
            f"{len(found.leftovers)} temporary entr{'y' if len(found.leftovers) == 1 else 'ies'} in {found.directory} "
            "(a writer is saving now, or died mid-save; the next writer removes them)"
        )
    if failed:
        raise typer.Exit(1)
