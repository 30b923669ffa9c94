"""Distributed save: trainstate.save vs dcp.save(FileSystemWriter) of the same FSDP2 state, same run.

Spawns 2 and 4 gloo ranks on this machine; each round saves the same sharded model + AdamW state
with both, interleaved; the time of a save is the slowest rank's (the stall every rank sees, since
both are collective). Reports the median per contender and the ratio.

    python benchmarks/bench_distributed.py                 # 2 and 4 ranks, ~75 M params, ~2 min
    python benchmarks/bench_distributed.py --ranks 2 --params-millions 10 --repeat 1   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, params: int, repeat: int, root: str, out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    import trainstate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    width = 2048
    layers = max(1, params // (width * width))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    local = sum(p.to_local().numel() * 4 * 3 for p in model.parameters())  # weights + two moments, this rank

    def timed(fn: Any) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    times: dict[str, list[float]] = {"trainstate.save": [], "dcp.save (FileSystemWriter)": []}
    for round_ in range(repeat + 1):  # round 0 warms up
        for name in times:
            path = os.path.join(root, f"{name.split()[0]}-{round_}")
            if name == "trainstate.save":
                seconds = timed(lambda path=path: trainstate.save(path, {"model": model, "optimizer": optimizer}))
            else:

                def save_dcp(path: str = path) -> None:
                    model_sd, optim_sd = get_state_dict(model, optimizer)
                    writer = dcp.FileSystemWriter(path, sync_files=True)
                    dcp.save({"model": model_sd, "optimizer": optim_sd}, storage_writer=writer)

                seconds = timed(save_dcp)
            if round_:
                times[name].append(seconds)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
                os.sync()
            dist.barrier()
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "bytes": float(total), "times": times}, f)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    p.add_argument("--params-millions", type=float, default=75.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="trainstate-bench-dist-", dir=args.dir)
    print(f"torch {torch.__version__}; {os.cpu_count()} CPUs; gloo ranks on one machine; directory {root}")
    print("| ranks | state GB | contender | median s (slowest rank) | GB/s | time vs dcp.save |")
    print("|---:|---:|---|---:|---:|---:|")
    try:
        for world in args.ranks:
            out = os.path.join(root, f"result-{world}.json")
            mp.spawn(
                _rank,
                args=(world, _free_port(), int(args.params_millions * 1e6), args.repeat, root, out),
                nprocs=world,
            )
            with open(out) as f:
                result = json.load(f)
            medians = {name: statistics.median(ts) for name, ts in result["times"].items()}
            base = medians["dcp.save (FileSystemWriter)"]
            for name, seconds in medians.items():
                gb = result["bytes"] / 1e9
                print(f"| {world} | {gb:.2f} | {name} | {seconds:.3f} | {gb / seconds:.2f} | {seconds / base:.2f}x |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
