"""Distributed save: trainstate vs DCP, sync and async, of the same FSDP2 state in the same run.

Spawns 2 and 4 gloo ranks on this machine; each round saves the same sharded model + AdamW state with
`trainstate.save`, `dcp.save(FileSystemWriter(sync_files=True))`, an async `CheckpointManager` and
`dcp.async_save` (its own gloo group, as DCP advises), interleaved. Every time is the slowest rank's
(the saves are collective): until durable, and for the async ones also the stall (until `save()`
returned). Reports medians and ratios to DCP's counterpart.

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

    def slowest(*seconds: float) -> list[float]:
        found = torch.tensor(seconds)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return found.tolist()

    def timed(fn: Any) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        return slowest(time.perf_counter() - start)[0]

    def save_dcp(path: str) -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, storage_writer=dcp.FileSystemWriter(path, sync_files=True))

    manager = trainstate.CheckpointManager(os.path.join(root, f"manager-{world}"), keep_last=1, async_save=True)
    dcp_group = dist.new_group(backend="gloo")  # DCP's advice for async_save: a CPU group of its own
    steps = iter(range(1, 10**9))

    def ts_async(path: str) -> list[float]:
        dist.barrier()
        start = time.perf_counter()
        manager.save(next(steps), {"model": model, "optimizer": optimizer})
        stall = time.perf_counter() - start
        manager.wait()
        return slowest(stall, time.perf_counter() - start)

    def dcp_async(path: str) -> list[float]:
        dist.barrier()
        start = time.perf_counter()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        writer = dcp.FileSystemWriter(path, sync_files=True)
        future = dcp.async_save(
            {"model": model_sd, "optimizer": optim_sd}, storage_writer=writer, process_group=dcp_group
        )
        stall = time.perf_counter() - start
        future.result()
        return slowest(stall, time.perf_counter() - start)

    contenders: dict[str, Any] = {
        "trainstate.save": lambda path: [
            timed(lambda: trainstate.save(path, {"model": model, "optimizer": optimizer}))
        ],
        "dcp.save (FileSystemWriter)": lambda path: [timed(lambda: save_dcp(path))],
        "trainstate async (CheckpointManager)": ts_async,
        "dcp.async_save (FileSystemWriter)": dcp_async,
    }
    times: dict[str, list[list[float]]] = {name: [] for name in contenders}
    for round_ in range(repeat + 1):  # round 0 warms up (and fills trainstate's staging pool)
        for index, (name, run) in enumerate(contenders.items()):
            path = os.path.join(root, f"{index}-{round_}")
            seconds = run(path)
            if round_:
                times[name].append(seconds)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
                os.sync()
            dist.barrier()
    manager.close()
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
    print("| ranks | state GB | contender | median s, until durable (slowest rank) | stall s | GB/s | ratio |")
    print("|---:|---:|---|---:|---:|---:|---|")
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
            gb = result["bytes"] / 1e9
            medians = {
                name: [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]
                for name, runs in result["times"].items()
            }
            sync_base = medians["dcp.save (FileSystemWriter)"][0]
            stall_base, total_base = medians["dcp.async_save (FileSystemWriter)"]
            for name, values in medians.items():
                if len(values) == 1:
                    seconds = values[0]
                    ratio = f"{seconds / sync_base:.2f}x vs dcp.save"
                    print(f"| {world} | {gb:.2f} | {name} | {seconds:.3f} | | {gb / seconds:.2f} | {ratio} |")
                else:
                    stall, total = values
                    print(
                        f"| {world} | {gb:.2f} | {name} | {total:.3f} | {stall:.3f} | {gb / total:.2f} | "
                        f"stall {stall / stall_base:.2f}x, total {total / total_base:.2f}x vs dcp.async_save |"
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
