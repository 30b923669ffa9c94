"""Object-store uploads: trainstate.save to s3:// vs s3fs ``put`` of the same bytes, and the training
stall of a tiered (local disk → S3) async CheckpointManager, all in one run against one loopback S3
API server (moto in server mode).

Each round runs every contender once, in rotated order, on a fresh name; reported are the medians
and the median per-round ratio (a loopback server's speed varies between runs; only ratios within
one run count).

    python benchmarks/bench_s3.py                    # ~256 MB state, 5 rounds, ~2 min
    python benchmarks/bench_s3.py --mb 32 --rounds 2  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import trainstate  # noqa: E402
from s3support import MotoServer, new_bucket, options  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="state size in MB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    server = MotoServer()
    try:
        results = run(server.endpoint, args.mb, args.rounds)
    finally:
        server.stop()
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def run(endpoint: str, mb: int, rounds: int) -> dict[str, object]:
    import s3fs

    opts = options(endpoint)
    bucket = new_bucket(endpoint)
    fs = s3fs.S3FileSystem(**opts)
    torch.manual_seed(0)
    tensors = max(1, mb // 32)
    state = {f"t{i}": torch.randn((mb << 20) // 4 // tensors) for i in range(tensors)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    scratch = tempfile.mkdtemp(prefix="bench-s3-")
    blob = os.path.join(scratch, "blob.bin")
    with open(blob, "wb") as f:  # the same bytes as one local file, for s3fs put
        for t in state.values():
            f.write(t.numpy().tobytes())
    counter = iter(range(10**9))

    def ts_save() -> float:
        start = time.perf_counter()
        trainstate.save(f"s3://{bucket}/ts/{next(counter)}", state, storage_options=opts)
        return time.perf_counter() - start

    def s3fs_put() -> float:
        start = time.perf_counter()
        fs.put(blob, f"{bucket}/put/{next(counter)}.bin")
        return time.perf_counter() - start

    local_times: list[float] = []
    stalls: list[float] = []

    def tiered_async() -> float:
        """The stall a training loop sees: save() returning, the local write and the upload behind it."""
        n = next(counter)
        with trainstate.CheckpointManager(
            os.path.join(scratch, f"tier{n}"),
            remote=f"s3://{bucket}/tier{n}",
            async_save=True,
            keep_last=None,
            storage_options=opts,
        ) as manager:
            start = time.perf_counter()
            manager.save(1, state)
            stalls.append(time.perf_counter() - start)
            manager.wait()
            local_times.append(time.perf_counter() - start)
            manager.wait_for_uploads()
            return time.perf_counter() - start

    contenders: dict[str, Callable[[], float]] = {
        "s3fs put": s3fs_put,
        "trainstate.save s3://": ts_save,
        "tiered async (total to remote commit)": tiered_async,
    }
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(rounds + 1):  # round 0 warms up
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            seconds = contenders[name]()
            if round_:
                times[name].append(seconds)
    stalls, local_times = stalls[1:], local_times[1:]
    ratios = [a / b for a, b in zip(times["trainstate.save s3://"], times["s3fs put"], strict=True)]
    stall_ratio = [s / d for s, d in zip(stalls, times["trainstate.save s3://"], strict=True)]
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "bytes": nbytes,
        "rounds": rounds,
        "median_s": med,
        "throughput_MBps": {n: nbytes / 1e6 / v for n, v in med.items()},
        "trainstate/s3fs_put (median per round)": statistics.median(ratios),
        "tiered async stall s": statistics.median(stalls),
        "tiered async local commit s": statistics.median(local_times),
        "tiered stall / direct S3 save (median per round)": statistics.median(stall_ratio),
    }


if __name__ == "__main__":
    main()
