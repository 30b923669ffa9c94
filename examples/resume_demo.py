"""The main demo: train, get killed with SIGKILL mid-epoch, resume, and show the identical loss trajectory.

    python examples/resume_demo.py [--kill-at 17] [--total-steps 40]

It runs examples/train.py twice: once uninterrupted, once killed (kill -9) in the middle of an epoch
and restarted from its newest checkpoint. Then it prints both per-step losses side by side and
whether they — and the final weights and optimizer state — are bit-identical.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import trainstate

TRAIN = Path(__file__).with_name("train.py")


def run(directory: str, total: int, save_every: int, kill_at: int | None = None) -> tuple[dict[int, str], int | None]:
    """Run train.py; with ``kill_at``, SIGKILL it when it prints that step. Returns losses and resume step."""
    cmd = [sys.executable, str(TRAIN), "--dir", directory, "--total-steps", str(total), "--save-every", str(save_every)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    losses: dict[int, str] = {}
    start = None
    assert proc.stdout is not None
    for line in proc.stdout:
        words = line.split()
        if words[:1] == ["start"]:
            start = int(words[1])
        elif words[:1] == ["step"]:
            losses[int(words[1])] = words[5]
            if kill_at is not None and int(words[1]) == kill_at:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    return losses, start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-steps", type=int, default=40)
    parser.add_argument("--kill-at", type=int, default=17, help="step after which the run is killed (mid-epoch)")
    parser.add_argument("--save-every", type=int, default=5)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        console.print(f"[bold]1.[/] uninterrupted run of {args.total_steps} steps")
        reference, _ = run(f"{tmp}/reference", args.total_steps, args.save_every)
        console.print(
            f"[bold]2.[/] interrupted run: [red]kill -9[/] after step {args.kill_at} (epoch 2 of 4, mid-epoch)"
        )
        killed, _ = run(f"{tmp}/resumed", args.total_steps, args.save_every, kill_at=args.kill_at)
        resumed, start = run(f"{tmp}/resumed", args.total_steps, args.save_every)
        console.print(
            f"[bold]3.[/] restarted: resumed from the checkpoint of step {start}, "
            f"re-ran steps {start + 1}..{max(killed)} and finished"
        )
        combined = {**killed, **resumed}

        table = Table(title="loss per step")
        for column in ("step", "uninterrupted", "killed + resumed", "same bits"):
            table.add_column(column, justify="right")
        for step in sorted(reference):
            a, b = reference[step], combined.get(step, "-")
            origin = " (after resume)" if start is not None and step > start else ""
            table.add_row(
                str(step),
                f"{float.fromhex(a):.10f}",
                f"{float.fromhex(b):.10f}{origin}" if b != "-" else "-",
                "[green]yes[/]" if a == b else "[red]NO[/]",
            )
        console.print(table)
        final_a = trainstate.load(f"{tmp}/reference/final")
        final_b = trainstate.load(f"{tmp}/resumed/final")
        weights_equal = all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])
        moments_equal = all(
            torch.equal(final_a["optimizer"]["state"][i][k], final_b["optimizer"]["state"][i][k])
            for i in final_a["optimizer"]["state"]
            for k in ("exp_avg", "exp_avg_sq")
        )
    identical = reference == combined and weights_equal and moments_equal
    console.print(f"final weights equal: {weights_equal}, optimizer moments equal: {moments_equal}")
    console.print(f"[bold]identical: {identical}[/]")
    raise SystemExit(0 if identical else 1)


if __name__ == "__main__":
    main()
