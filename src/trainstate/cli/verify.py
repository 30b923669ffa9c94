"""``trainstate verify PATH...``: full integrity check of checkpoints; exit code 1 if any is bad."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from trainstate.cli._scan import Entry, reader_at, scan, verify_entry
from trainstate.cli._ui import UI, Debug, Json, Quiet, command, fail, format_bytes
from trainstate.errors import CheckpointError

HELP = "Check every file of checkpoints: sizes, safetensors headers, content hashes, tensor keys."
EPILOG = """\
PATH is a checkpoint or a directory of checkpoints (all of them are checked).
Exit code 0 if everything is intact, 1 if anything is not; every bad file and key is named.

Examples:

  trainstate verify runs/exp1/step_00000300

  trainstate verify runs/exp1 runs/exp2 --quiet && echo intact
"""


def _targets(paths: list[str]) -> list[Entry]:
    entries: list[Entry] = []
    for path in paths:
        found = scan(path)
        if not found.entries:
            fail(f"{found.directory}: no checkpoints here")
        entries += found.entries
    return entries


@command
def verify(
    paths: Annotated[list[str], typer.Argument(metavar="PATH...", help="Checkpoints or directories of them.")],
    json_output: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    ui = UI(json_output=json_output, quiet=quiet)
    entries = _targets(paths)
    total = sum(sum(f.size for f in e.manifest.files) for e in entries if e.manifest is not None)
    results: list[dict[str, Any]] = []
    with ui.progress("verifying", total) as advance:
        for entry in entries:
            problems = [entry.problem] if entry.status != "ok" else []
            size = sum(f.size for f in entry.manifest.files) if entry.manifest is not None else 0
            if not problems:
                advance(0, description=f"verifying {entry.name}")
                try:
                    with reader_at(entry.path) as reader:
                        problems = verify_entry(reader, advance)
                except CheckpointError as exc:  # the manifest changed or vanished since the scan
                    problems = [str(exc)]
            results.append(
                {
                    "path": entry.path,
                    "ok": not problems,
                    "files": len(entry.manifest.files) if entry.manifest is not None else 0,
                    "bytes": size,
                    "problems": problems,
                }
            )
    bad = [r for r in results if not r["ok"]]
    if json_output:
        ui.emit_json(results)
    else:
        for result in results:
            if result["ok"]:
                if not quiet:
                    files = result["files"]
                    detail = f"{result['path']}  ({files} file{'s' * (files != 1)}, {format_bytes(result['bytes'])})"
                    ui.print(Text.assemble(("ok    ", "green"), detail))
            else:
                ui.print(Text.assemble(("FAIL  ", "bold red"), result["path"]))
                for problem in result["problems"]:
                    ui.print(Text(f"      {problem}", style="red"), soft_wrap=True)
        if not quiet:
            ui.note(f"{len(results) - len(bad)} of {len(results)} checkpoints intact")
    if bad:
        raise typer.Exit(1)
