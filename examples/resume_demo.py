"""The main demo: train, get killed with SIGKILL mid-epoch, resume, and show the identical loss trajectory.

    python examples/resume_demo.py [--kill-at 17] [--total-steps 40] [--dir demo-checkpoints]

It runs examples/train.py twice: once uninterrupted, once killed (kill -9) in the middle of an epoch
and restarted from its newest checkpoint. Then it prints both per-step losses side by side and
whether they — and the final weights and optimizer state — are bit-identical. With ``--dir`` the
checkpoints of both runs are kept (``DIR/reference``, ``DIR/resumed``) for ``trainstate ls`` and friends.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import trainstate

TRAIN = Path(__file__).with_name("train.py")


def run(directory: str, total: int, save_every: int, kill_at: int | None = None) -> Outcome:
    """Run train.py; with ``kill_at``, SIGKILL it when it prints that step."""
    cmd = [sys.executable, str(TRAIN), "--dir", directory, "--total-steps", str(total), "--save-every", str(save_every)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    outcome = Outcome()
    assert proc.stdout is not None
    for line in proc.stdout:
        words = line.split()
        if words[:1] == ["start"]:
            outcome.start = int(words[1])
        elif words[:1] == ["step"]:
            step = int(words[1])
            outcome.losses[step], outcome.epochs[step] = words[5], int(words[3])
            if kill_at is not None and step == kill_at:
                proc.send_signal(signal.SIGKILL)
                outcome.killed = True
                break
    proc.wait()
    return outcome


@dataclass
class Outcome:
    losses: dict[int, str] = field(default_factory=dict)  # step -> loss as float.hex()
    epochs: dict[int, int] = field(default_factory=dict)  # step -> epoch its batch came from
    start: int | None = None  # the step the run started from (0, or the restored checkpoint's)
    killed: bool = False


def where_in_epoch(step: int, epochs: dict[int, int]) -> str:
    """ "epoch 2 of 4, mid-epoch": from the epochs the uninterrupted run printed."""
    epoch, total = epochs[step], max(epochs.values()) + 1
    ends_epoch = epochs.get(step + 1, epoch + 1) != epoch
    return f"epoch {epoch + 1} of {total}, {'at its last batch' if ends_epoch else 'mid-epoch'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-steps", type=int, default=40)
    parser.add_argument("--kill-at", type=int, default=17, help="step after which the run is killed (mid-epoch)")
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--dir", help="keep the checkpoints here (DIR/reference, DIR/resumed); default: a temp dir")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir) if args.dir else Path(tmp)
        if args.dir and any(root.glob("*")):
            raise SystemExit(f"{root}: not empty; give a new or empty directory to --dir")
        console.print(f"[bold]1.[/] uninterrupted run of {args.total_steps} steps")
        reference = run(str(root / "reference"), args.total_steps, args.save_every)
        killed = run(str(root / "resumed"), args.total_steps, args.save_every, kill_at=args.kill_at)
        if not killed.killed:
            console.print(f"[bold]2.[/] the run finished before step {args.kill_at}: nothing was killed")
            resumed = Outcome(start=None)
        else:
            last = max(killed.losses)
            where = where_in_epoch(last, reference.epochs)
            console.print(f"[bold]2.[/] interrupted run: [red]kill -9[/] after step {last} ({where})")
            resumed = run(str(root / "resumed"), args.total_steps, args.save_every)
            if not resumed.start:
                console.print(
                    "[bold]3.[/] restarted: no checkpoint had been committed yet, so it started over from step 0"
                )
            else:
                console.print(
                    f"[bold]3.[/] restarted: resumed from the checkpoint of step {resumed.start} "
                    f"({where_in_epoch(resumed.start, reference.epochs)}), re-ran steps "
                    f"{resumed.start + 1}..{last} and finished"
                )
        combined = {**killed.losses, **resumed.losses}

        table = Table(title="loss per step")
        for column in ("step", "uninterrupted", "killed + resumed", "same bits"):
            table.add_column(column, justify="right")
        for step in sorted(reference.losses):
            a, b = reference.losses[step], combined.get(step, "-")
            origin = " (after resume)" if resumed.start is not None and step > resumed.start else ""
            table.add_row(
                str(step),
                f"{float.fromhex(a):.10f}",
                f"{float.fromhex(b):.10f}{origin}" if b != "-" else "-",
                "[green]yes[/]" if a == b else "[red]NO[/]",
            )
        console.print(table)
        final_a = trainstate.load(root / "reference" / "final")
        final_b = trainstate.load(root / "resumed" / "final")
        weights_equal = all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])
        moments_equal = all(
            torch.equal(final_a["optimizer"]["state"][i][k], final_b["optimizer"]["state"][i][k])
            for i in final_a["optimizer"]["state"]
            for k in ("exp_avg", "exp_avg_sq")
        )
    identical = reference.losses == combined and weights_equal and moments_equal
    console.print(f"final weights equal: {weights_equal}, optimizer moments equal: {moments_equal}")
    console.print(f"[bold]identical: {identical}[/]")
    if args.dir:
        console.print(f"checkpoints kept in {root}: try `trainstate ls {root / 'resumed'}`")
    raise SystemExit(0 if identical else 1)


if __name__ == "__main__":
    main()
