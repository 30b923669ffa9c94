"""The training stall of a checkpoint, every contender in one interleaved run.

For each state size (an MLP + AdamW moments, float32) each round runs every contender once, in
rotated order, into a fresh directory, and the page cache is flushed (``os.sync``) between them.
Reported: medians, and the median per-round ratio against the memcpy floor (copying the same bytes
into buffers that already exist) and against trainstate's sync save.

    python benchmarks/bench_async.py                         # 0.1 and 1 GB, 3 rounds, ~4 min
    python benchmarks/bench_async.py --sizes 0.05 --rounds 1  # smoke test
    python benchmarks/bench_async.py --json out.json --png stall.png
    python benchmarks/bench_async.py --replot a.json b.json --png stall.png  # saved runs, one plot

Contenders (stall = time the training thread is blocked; total = until durable):
raw write+fsync of the same bytes; memcpy floor; torch.save+fsync; dcp.save; dcp.async_save (stall,
total); torch_checkpointing sync and async if installed (``pip install torch-checkpointing``; its
async stall lasts until its staging is done; it does not fsync); trainstate sync; trainstate async
(stall, total); trainstate async+overlap (stall: save() returning plus the hold before the next
optimizer step; seen: all the next training step took beyond its own time). Then, at the largest
size: a fine-tune with 90% of its parameters frozen, full against incremental saves; and the peak
extra RSS of trainstate's sync and async saves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from memory import peak_rss
from peers import torch_checkpointing_manager

import trainstate


def build(gigabytes: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    width = 2048
    params = int(gigabytes * 1e9 / 12)  # weights + two moments, 4 bytes each
    layers = max(1, params // (width * width))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return model, optimizer


def tensors_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    found = [p.detach() for p in model.parameters()]
    for state in optimizer.state.values():
        found += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return found


def contenders(model: Any, optimizer: Any, root: str) -> tuple[dict[str, Callable[[], dict[str, float]]], Callable]:
    """The timed runs by name, and what closes the managers they keep."""
    tensors = tensors_of(model, optimizer)
    floor_buffers = [torch.empty_like(t) for t in tensors]
    for b in floor_buffers:
        b.fill_(0)  # pre-faulted
    counter = iter(range(10**9))

    def fresh(name: str) -> str:
        return os.path.join(root, f"{name}-{next(counter)}")

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def raw() -> dict[str, float]:
        def write() -> None:
            with open(fresh("raw"), "wb") as f:
                for t in tensors:
                    f.write(t.numpy().data)
                f.flush()
                os.fsync(f.fileno())

        return {"total": timed(write)}

    def memcpy() -> dict[str, float]:
        return {"stall": timed(lambda: [b.copy_(t) for b, t in zip(floor_buffers, tensors, strict=True)])}

    def torch_save() -> dict[str, float]:
        def write() -> None:
            with open(fresh("torch"), "wb") as f:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())

        return {"total": timed(write)}

    def dcp_sync() -> dict[str, float]:
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        return {"total": timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(fresh("dcp"))))}

    def dcp_async() -> dict[str, float]:
        import torch.distributed.checkpoint as dcp

        start = time.perf_counter()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        future = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(fresh("dcpa")))
        stall = time.perf_counter() - start
        future.result()
        return {"stall": stall, "total": time.perf_counter() - start}

    managers: dict[str, trainstate.CheckpointManager] = {}

    def manager(kind: str) -> trainstate.CheckpointManager:
        if kind not in managers:  # one per mode for the whole run: the staging pool is reused, as in training
            managers[kind] = trainstate.CheckpointManager(
                os.path.join(root, f"mgr-{kind}"),
                keep_last=1,
                async_save=kind != "sync",
                overlap=kind == "overlap",
            )
        return managers[kind]

    steps = iter(range(1, 10**9))

    def ts_sync() -> dict[str, float]:
        mgr = manager("sync")
        return {"total": timed(lambda: mgr.save(next(steps), {"model": model, "optimizer": optimizer}))}

    def ts_async() -> dict[str, float]:
        mgr = manager("async")
        start = time.perf_counter()
        mgr.save(next(steps), {"model": model, "optimizer": optimizer})
        stall = time.perf_counter() - start
        mgr.wait()
        return {"stall": stall, "total": time.perf_counter() - start}

    batch = torch.randn(64, 2048)

    def train_step() -> None:
        model(batch).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    def ts_overlap() -> dict[str, float]:
        """save(), then the next training step: forward and backward overlap the copy, and the loop is
        held (``wait_staged``, what the optimizer's step hook does) until it is done. ``stall``: save()
        returning plus that hold; ``seen``: everything the step took beyond its own time, which adds the
        slowdown of sharing the cores with the background writer."""
        mgr = manager("overlap")
        plain = timed(train_step)
        start = time.perf_counter()
        mgr.save(next(steps), {"model": model, "optimizer": optimizer})
        returned = time.perf_counter() - start
        model(batch).square().mean().backward()
        held = timed(mgr.wait_staged)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        seen = time.perf_counter() - start - plain
        mgr.wait()
        return {"stall": returned + held, "seen": max(0.0, seen), "total": time.perf_counter() - start}

    found = {
        "raw write+fsync": raw,
        "memcpy floor": memcpy,
        "torch.save+fsync": torch_save,
        "dcp.save": dcp_sync,
        "dcp.async_save": dcp_async,
        "trainstate sync": ts_sync,
        "trainstate async": ts_async,
        "trainstate async+overlap": ts_overlap,
    }
    peers: list[Any] = []
    found |= torch_checkpointing(model, optimizer, fresh, peers)

    def close() -> None:
        for mgr in [*managers.values(), *peers]:
            mgr.close()

    return found, close


def torch_checkpointing(
    model: Any, optimizer: Any, fresh: Callable[[str], str], opened: list[Any]
) -> dict[str, Callable[[], dict]]:
    """torch_checkpointing's sync save and async save (its stall: until its staging is done, since the
    state may not change before that; its total: until the writer process is done; it never fsyncs).
    One manager per mode for the whole run, so its staging buffers are reused like trainstate's pool.
    Empty if the package is missing or cannot run here."""
    try:
        managers = {sync: torch_checkpointing_manager(sync=sync) for sync in (True, False)}
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
        print(f"torch_checkpointing: not measured ({type(exc).__name__}: {exc})")
        return {}
    opened += managers.values()  # closed by the caller

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def sync_save() -> dict[str, float]:
        start = time.perf_counter()
        managers[True].save(fresh("tcs"), state())
        return {"total": time.perf_counter() - start}

    def async_save() -> dict[str, float]:
        start = time.perf_counter()
        durable = managers[False].save(fresh("tca"), state())
        managers[False]._staging_future.result()  # no public handle for "staged"; the state is free after it
        stall = time.perf_counter() - start
        durable.result()
        return {"stall": stall, "total": time.perf_counter() - start}

    return {"torch_checkpointing sync": sync_save, "torch_checkpointing async": async_save}


def measure(gigabytes: float, rounds: int) -> dict[str, Any]:
    model, optimizer = build(gigabytes)
    nbytes = sum(t.numel() * t.element_size() for t in tensors_of(model, optimizer))
    root = tempfile.mkdtemp(prefix="bench-async-", dir=os.environ.get("BENCH_DIR"))
    runs, close = contenders(model, optimizer, root)
    names = list(runs)
    results: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    try:
        for round_ in range(rounds + 1):  # round 0 warms up (and fills trainstate's pool)
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                os.sync()
                measured = runs[name]()
                if round_:
                    for key, value in measured.items():
                        results[name].setdefault(key, []).append(value)
            for entry in os.listdir(root):  # each round's output goes; the managers prune their own
                path = os.path.join(root, entry)
                if entry.startswith("mgr-"):
                    continue
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
    finally:
        close()
        shutil.rmtree(root, ignore_errors=True)

    def per_round(a: list[float], b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(a, b, strict=True))

    floor = results["memcpy floor"]["stall"]
    sync = results["trainstate sync"]["total"]
    rows = {}
    for name, measured in results.items():
        row: dict[str, float] = {}
        for key, values in measured.items():
            row[f"{key}_s"] = statistics.median(values)
        if "stall" in measured:
            row["stall_vs_memcpy"] = per_round(measured["stall"], floor)
        if "seen" in measured:
            row["seen_vs_memcpy"] = per_round(measured["seen"], floor)
        if "total" in measured:
            row["total_vs_trainstate_sync"] = per_round(measured["total"], sync)
        rows[name] = row
    return {"gigabytes": nbytes / 1e9, "rounds": rounds, "contenders": rows}


def measure_incremental(gigabytes: float, rounds: int) -> dict[str, Any]:
    """A fine-tune with 90% of its parameters frozen (SGD on the rest): a full save vs an incremental
    one after a training step, bytes written (files not hard-linked) and time, in rotated rounds."""
    width = 2048
    layers = max(10, int(gigabytes * 1e9 / 4 / (width * width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in list(model)[: layers * 9 // 10]:
        layer.weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    root = tempfile.mkdtemp(prefix="bench-incr-", dir=os.environ.get("BENCH_DIR"))

    def train() -> None:
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()

    def written(directory: str) -> int:
        paths = [os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors")]
        return sum(os.stat(p).st_size for p in paths if os.stat(p).st_nlink == 1)

    times: dict[str, list[float]] = {"full": [], "incremental": []}
    nbytes: dict[str, list[int]] = {"full": [], "incremental": []}
    managers = {
        kind: trainstate.CheckpointManager(os.path.join(root, kind), keep_last=2, incremental=kind == "incremental")
        for kind in times
    }
    try:
        for round_ in range(rounds + 1):
            train()
            for kind in ("full", "incremental") if round_ % 2 else ("incremental", "full"):
                os.sync()
                start = time.perf_counter()
                managers[kind].save(round_ + 1, {"model": model, "optimizer": optimizer})
                elapsed = time.perf_counter() - start
                if round_:  # round 0 has no previous checkpoint to link to
                    times[kind].append(elapsed)
                    nbytes[kind].append(written(managers[kind].path(round_ + 1)))
    finally:
        for mgr in managers.values():
            mgr.close()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "gigabytes": sum(p.numel() * 4 for p in model.parameters()) / 1e9,
        "full_s": statistics.median(times["full"]),
        "incremental_s": statistics.median(times["incremental"]),
        "time_ratio": statistics.median(a / b for a, b in zip(times["incremental"], times["full"], strict=True)),
        "bytes_ratio": statistics.median(a / b for a, b in zip(nbytes["incremental"], nbytes["full"], strict=True)),
    }


def measure_memory(gigabytes: float) -> dict[str, Any]:
    """Peak extra RSS (VmHWM reset before each save) of a sync save and of two async saves (the first
    allocates the staging pool, the second reuses it), with the pool's size and the largest file."""
    model, optimizer = build(gigabytes)
    state = {"model": model, "optimizer": optimizer}
    root = tempfile.mkdtemp(prefix="bench-mem-", dir=os.environ.get("BENCH_DIR"))
    mib = 2**20
    found: dict[str, Any] = {"gigabytes": sum(t.numel() * t.element_size() for t in tensors_of(model, optimizer)) / 1e9}
    try:
        with trainstate.CheckpointManager(os.path.join(root, "sync"), keep_last=1) as mgr:
            with peak_rss() as rss:
                mgr.save(1, state)
            found["sync_extra_mib"] = (rss.peak_kb - rss.baseline_kb) / 1024
        with trainstate.CheckpointManager(os.path.join(root, "async"), keep_last=1, async_save=True) as mgr:
            for step in (1, 2):
                with peak_rss() as rss:
                    mgr.save(step, state)
                    mgr.wait()
                found[f"async_save{step}_extra_mib"] = (rss.peak_kb - rss.baseline_kb) / 1024
            found["staging_pool_mib"] = mgr.staging_bytes / mib
            directory = mgr.path(2)
            found["largest_file_mib"] = (
                max(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) / mib
            )
        found["method"] = rss.method
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return found


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a new interpreter: memory this process freed stays resident in its heap and
    would hide new allocations from the RSS counters."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    contenders = results[0]["contenders"]
    series = [(n, "stall_s", n) for n in contenders if "stall_s" in contenders[n]]
    series += [(n, "seen_s", f"{n}: next step's extra time") for n in contenders if "seen_s" in contenders[n]]
    sizes = [r["gigabytes"] for r in results]
    for name, key, label in series:
        values = [max(r["contenders"][name][key], 1e-4) for r in results]  # log axis: 0 shows as 0.1 ms
        ax.plot(sizes, values, marker="o", label=label, linestyle="--" if key == "seen_s" else "-")
    ax.set_xlabel("state size (GB)")
    ax.set_ylabel("training stall (s, median)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Checkpoint stall (interleaved rounds per size)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1,1", help="state sizes in GB, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--png")
    parser.add_argument("--replot", nargs="+", metavar="JSON", help="plot saved runs' --json files to --png; no run")
    args = parser.parse_args()
    if args.replot:
        saved = [json.load(open(path)) for path in args.replot]
        plot(sorted((r for run in saved for r in run["stall"]), key=lambda r: r["gigabytes"]), args.png)
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    results = [measure(float(size), args.rounds) for size in args.sizes.split(",")]
    largest = max(float(s) for s in args.sizes.split(","))
    found = {
        "stall": results,
        "incremental": measure_incremental(largest, args.rounds),
        "memory": in_fresh_process(measure_memory, largest),
    }
    print(json.dumps(found, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(found, f, indent=2)
    if args.png:
        plot(results, args.png)


if __name__ == "__main__":
    main()
