"""The command line's wall time: ``trainstate --version``, ``--help`` and ``ls`` of a directory of 1,000
checkpoints, against the interpreter's own start and ``import torch`` measured in the same run.

Each round runs every contender once, in rotated order, as a fresh process; reported are medians (and
the best) and ratios to the interpreter's bare start (this machine's speed varies between runs).

    python benchmarks/bench_cli.py                       # 1,000 checkpoints, 9 rounds, ~1 min
    python benchmarks/bench_cli.py --checkpoints 50 --rounds 3   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import trainstate


def make_run(directory: str, count: int) -> None:
    """``count`` checkpoints of a small model + AdamW with a metric, as a manager writes them."""
    model = torch.nn.Linear(16, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    with trainstate.CheckpointManager(directory, keep_last=None) as manager:
        for step in range(1, count + 1):
            manager.save(step, {"model": model, "optimizer": optimizer}, metrics={"loss": 1.0 / step})


# Bytecode caching on, as for an installed package (pip compiles on install): round 0, discarded,
# writes the caches of an editable checkout even where PYTHONDONTWRITEBYTECODE is set.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=ENV)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-cli-")
    try:
        make_run(root, args.checkpoints)
        cli = [sys.executable, "-m", "trainstate"]
        contenders = {
            "python -c pass (interpreter start)": [sys.executable, "-c", "pass"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "trainstate --version": [*cli, "--version"],
            "trainstate --help": [*cli, "--help"],
            f"trainstate ls (of {args.checkpoints} checkpoints)": [*cli, "ls", root],
            f"trainstate ls --json (of {args.checkpoints} checkpoints)": [*cli, "ls", root, "--json"],
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for r in range(args.rounds + 1):  # round 0 warms the page cache and is discarded
            for name in names[r % len(names) :] + names[: r % len(names)]:
                elapsed = wall(contenders[name])
                if r:
                    times[name].append(elapsed)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times[names[0]])
    print(f"{'contender':58} {'median s':>9} {'best s':>7} {'vs start':>9}")
    results = {}
    for name, values in times.items():
        median = statistics.median(values)
        results[name] = {"median_s": median, "best_s": min(values), "vs_start": median / base}
        print(f"{name:58} {median:9.3f} {min(values):7.3f} {median / base:8.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
