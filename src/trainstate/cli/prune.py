"""``trainstate prune DIR``: the CheckpointManager's retention, from the command line."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from trainstate.cli._scan import scan, storage_at
from trainstate.cli._ui import (
    UI,
    Better,
    Columns,
    Debug,
    Json,
    Mode,
    Quiet,
    command,
    fail,
    format_bytes,
    format_number,
    usage_error,
)
from trainstate.manager import parse_step_name
from trainstate.manager.policies import CheckpointInfo, KeepBest, KeepEvery, KeepLast, Retention
from trainstate.storage import QUARANTINE_DIR

HELP = "Delete the checkpoints of a manager directory that a retention policy does not keep."
EPILOG = """\
The same policies as CheckpointManager(keep_last=, keep_best=, monitor=, mode=, keep_every=): a checkpoint is kept
if any policy keeps it, and the newest one always is. Only committed step_XXXXXXXX checkpoints are considered;
damaged or incomplete ones are left for you to look at, and so is what restore() moved aside into
trainstate-quarantine/ unless --quarantined is given. Takes the directory's writer lock, so it fails at once
(or after --wait seconds) while a CheckpointManager is saving there; leftover temporary entries are removed too.

Examples:

  trainstate prune runs/exp1 --keep-last 3 --dry-run

  trainstate prune runs/exp1 --keep-last 2 --keep-best 1 --monitor val_loss

  trainstate prune runs/exp1 --keep-every 1000 --keep-last 1

  trainstate prune runs/exp1 --quarantined
"""


def _policies(
    keep_last: int | None, keep_best: int | None, monitor: str | None, mode: Better, keep_every: int | None
) -> list[KeepLast | KeepBest | KeepEvery]:
    if keep_best and not monitor:
        usage_error("--keep-best needs --monitor METRIC to know what 'best' means", param="--keep-best")
    policies: list[KeepLast | KeepBest | KeepEvery] = []
    if keep_last is not None:
        policies.append(KeepLast(keep_last))
    if keep_best:
        policies.append(KeepBest(keep_best, monitor or "", mode.value))
    if keep_every:
        policies.append(KeepEvery(keep_every))
    return policies


def _reasons(policies: list[KeepLast | KeepBest | KeepEvery], infos: list[CheckpointInfo]) -> dict[int, list[str]]:
    reasons: dict[int, list[str]] = {i.step: [] for i in infos}
    if infos:
        reasons[max(i.step for i in infos)].append("newest")
    for policy in policies:
        label = {KeepLast: "last", KeepBest: "best", KeepEvery: "every"}[type(policy)]
        for step in policy.keep(infos):
            reasons[step].append(f"{label} {getattr(policy, 'n', getattr(policy, 'k', ''))}")
    return reasons


@command
def prune(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="A CheckpointManager directory.")],
    keep_last: Annotated[int | None, typer.Option(min=1, help="Keep this many newest checkpoints.")] = None,
    keep_best: Annotated[int | None, typer.Option(min=1, help="Keep this many best checkpoints by --monitor.")] = None,
    monitor: Annotated[str | None, typer.Option(help="Metric that defines 'best'.")] = None,
    mode: Mode = Better.min,
    keep_every: Annotated[
        int | None, typer.Option(min=1, help="Keep every checkpoint whose step is a multiple.")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Only show what would be deleted.")] = False,
    quarantined: Annotated[
        bool, typer.Option("--quarantined", help=f"Also delete what restore() moved aside into {QUARANTINE_DIR}/.")
    ] = False,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait for a running writer's lock.")] = 0.0,
    json_output: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    policies = _policies(keep_last, keep_best, monitor, mode, keep_every)
    if not policies and not quarantined:
        usage_error(
            "say what to keep: --keep-last N, --keep-best K --monitor METRIC, or --keep-every N "
            "(or --quarantined to delete only what restore() moved aside)"
        )
    ui = UI(json_output=json_output, quiet=quiet)
    found = scan(directory)
    if found.single:
        fail(f"{found.directory}: is one checkpoint; prune takes the directory that holds the checkpoints")
    storage = storage_at(found.directory)
    if not dry_run:
        storage.lock(timeout=wait)  # CheckpointLockedError while a manager is saving here
    try:
        found = scan(found.directory)  # again, now that no writer can commit or delete under us
        managed = [e for e in found.committed if e.step is not None and parse_step_name(e.name) is not None]
        infos = [CheckpointInfo(e.step, e.metrics) for e in managed if e.step is not None]
        doomed = set(Retention(tuple(policies)).to_delete(infos)) if policies else set()
        aside = [e for e in found.entries if e.status == "quarantined"] if quarantined else []
        if infos and max(i.step for i in infos) in doomed:  # Retention guarantees it; never trust, verify
            raise AssertionError("retention selected the newest checkpoint for deletion")
        if monitor and not any(e.metric(monitor) is not None for e in managed):
            ui.warn(
                f"no checkpoint has a finite {monitor!r} metric (found: {', '.join(found.metric_names()) or 'none'})"
            )
        reasons = _reasons(policies, infos)
        rows: list[dict[str, Any]] = []
        for entry in managed:
            assert entry.step is not None
            rows.append(
                {
                    "name": entry.name,
                    "step": entry.step,
                    "metric": entry.metrics.get(monitor) if monitor else None,
                    "size": entry.size,
                    "action": "delete" if entry.step in doomed else "keep",
                    "reasons": reasons[entry.step],
                }
            )
        for entry in aside:
            rows.append(
                {
                    "name": entry.name,
                    "step": entry.step,
                    "metric": entry.metrics.get(monitor) if monitor else None,
                    "size": entry.size,
                    "action": "delete",
                    "reasons": [],
                }
            )
        if not dry_run:
            quarantine = storage_at(f"{found.directory}/{QUARANTINE_DIR}")
            for row in rows:
                if row["action"] == "delete" and row["name"].startswith(f"{QUARANTINE_DIR}/"):
                    quarantine.delete(row["name"].partition("/")[2])
                elif row["action"] == "delete":
                    storage.delete(row["name"])
            removed = storage.cleanup()
        else:
            removed = found.leftovers
    finally:
        storage.unlock()
    untouched = [e.name for e in found.entries if e not in managed and e not in aside]
    deleted = [r for r in rows if r["action"] == "delete"]
    if json_output:
        ui.emit_json(
            {
                "directory": found.directory,
                "dry_run": dry_run,
                "checkpoints": rows,
                "deleted": [r["name"] for r in deleted],
                "kept": [r["name"] for r in rows if r["action"] == "keep"],
                "untouched": untouched,
                "temporaries_removed": removed,
            }
        )
        return
    metric = [monitor] if monitor else []
    table = Columns("checkpoint", "step", *metric, "size", "action", "kept by", right=("step", *metric, "size"))
    verb = "would delete" if dry_run else "deleted"
    for row in rows:
        action = Text("keep", style="green") if row["action"] == "keep" else Text(verb, style="bold red")
        table.add_row(
            row["name"],
            "-" if row["step"] is None else str(row["step"]),
            *([format_number(row["metric"]) if row["metric"] is not None else "-"] if monitor else []),
            format_bytes(row["size"]),
            action,
            ", ".join(row["reasons"]),
        )
    if rows:
        ui.print(table.render())
    freed = sum(r["size"] for r in deleted)
    ui.print(
        f"{verb} {len(deleted)} of {len(rows)} checkpoints ({format_bytes(freed)})" + (" (dry run)" if dry_run else "")
    )
    if removed:
        verb_tmp = "would remove" if dry_run else "removed"
        ui.note(f"{verb_tmp} {len(removed)} leftover temporary entries: {', '.join(removed)}")
    for name in untouched:
        ui.note(f"left alone: {name} (not a committed step_XXXXXXXX checkpoint)")
