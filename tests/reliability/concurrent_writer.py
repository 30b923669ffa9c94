"""A writer process for the concurrency tests: saves checkpoints tagged with its id into a directory.

    python concurrent_writer.py DIR --writer A --first-step 1 --steps 3 [--lock-timeout S] [--hold] [--keep-last N]

With --hold it keeps the directory lock after its saves until a line arrives on stdin. Prints
"locked" once it holds the lock, "saved <step>" after each commit; exits 3 on CheckpointLockedError.
"""

from __future__ import annotations

import argparse
import sys

import torch

import trainstate


def tagged_state(writer: str, step: int) -> dict:
    tag = float(ord(writer[0]))
    generator = torch.Generator().manual_seed(step)
    return {
        "tag": torch.full((50_000,), tag),
        "noise": torch.randn(100_000, generator=generator),
        "step": step,
        "writer": writer,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--writer", required=True)
    parser.add_argument("--first-step", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lock-timeout", type=float, default=0.0)
    parser.add_argument("--keep-last", type=int, default=None)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()
    try:
        with trainstate.CheckpointManager(
            args.directory, keep_last=args.keep_last, lock_timeout=args.lock_timeout
        ) as mgr:
            for step in range(args.first_step, args.first_step + args.steps):
                mgr.save(step, tagged_state(args.writer, step))
                if step == args.first_step:
                    print("locked", flush=True)
                print(f"saved {step}", flush=True)
            if args.hold:
                sys.stdin.readline()
    except trainstate.CheckpointLockedError as exc:
        print(f"locked-out: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    print("released", flush=True)


if __name__ == "__main__":
    main()
