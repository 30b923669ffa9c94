"""Code that runs inside the spawned ranks of the distributed tests (gloo on CPU).

Each worker writes what it observed to files under the test's directory; the test asserts on them.
Full states for comparison are gathered with DCP's own ``full_state_dict`` option and written with
``torch.save`` by rank 0 (test data only).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

import trainstate

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


# ------------------------------------------------------------------------------------------ launch
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(target: Callable[..., None], rank: int, world: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        target(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        os._exit(1)  # no teardown collectives with peers that may be gone
    dist.destroy_process_group()


def launch(target: Callable[..., None], world: int, *args: Any, timeout: float = 120) -> list[int | None]:
    """Run ``target(rank, world, *args)`` in ``world`` spawned processes; their exit codes."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(target, rank, world, port, args)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def record(directory: str, name: str, value: Any) -> None:
    Path(directory, name).write_text(json.dumps(value))


# ------------------------------------------------------------------------------------------ models
def build(world: int, seed: int = 0, *, dropout: float = 0.0) -> tuple[Any, Any, Any]:
    """A small MLP (FSDP2-sharded per layer when world > 1), AdamW and a step scheduler."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 3)
    )
    if world > 1:
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def step(model: Any, optimizer: Any, scheduler: Any) -> float:
    """One step on a batch drawn from the global RNG (so the RNG streams are part of the trajectory)."""
    x = torch.randn(5, 6)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return float(loss.detach())


def full_state(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The gathered full state on rank 0, copied (plain tensors such as AdamW's ``step`` come back
    as the live objects themselves)."""
    from torch.utils._pytree import tree_map

    state = get_model_state_dict(model, options=FULL), get_optimizer_state_dict(model, optimizer, options=FULL)
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, state)


# ------------------------------------------------------------------------------------------ workers
def fsdp_save(rank: int, world: int, directory: str) -> None:
    """Train, save, then restore into fresh objects at the same world size (RNG streams per rank)."""
    model, optimizer, scheduler = build(world)
    torch.manual_seed(100 + rank)
    for _ in range(3):
        step(model, optimizer, scheduler)
    ckpt = f"{directory}/ckpt"
    trainstate.save(
        ckpt,
        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": trainstate.RNGState(), "step": 3},
        metadata={"step": 3},
    )
    expected_rng = torch.get_rng_state()
    full = full_state(model, optimizer)
    if rank == 0:
        torch.save(full, f"{directory}/full.pt")
    next_loss = step(model, optimizer, scheduler)

    model2, optimizer2, scheduler2 = build(world, seed=7)
    torch.manual_seed(999)
    out = trainstate.load(
        ckpt, {"model": model2, "optimizer": optimizer2, "scheduler": scheduler2, "rng": trainstate.RNGState()}
    )
    restored = full_state(model2, optimizer2)
    record(
        directory,
        f"same-world-{rank}.json",
        {
            "rng": torch.equal(torch.get_rng_state(), expected_rng),
            "model": _same_model(full[0], restored[0]),
            "optimizer": _same_optimizer(full[1], restored[1]),
            "lr": scheduler2.get_last_lr() == [1e-2 * 0.5],
            "step": out["step"],
            "next_loss": step(model2, optimizer2, scheduler2) == next_loss,  # the trajectory continues exactly
        },
    )


def fsdp_load(rank: int, world: int, directory: str) -> None:
    """Restore a checkpoint saved by another number of ranks."""
    model, optimizer, scheduler = build(world, seed=7)
    ckpt = f"{directory}/ckpt"
    try:
        trainstate.load(ckpt, {"model": model, "optimizer": optimizer, "rng": trainstate.RNGState()})
        refused = ""
    except trainstate.StateMismatchError as exc:
        refused = str(exc)
    trainstate.load(ckpt, {"model": model, "optimizer": optimizer, "scheduler": scheduler})
    full = torch.load(f"{directory}/full.pt", weights_only=True)  # on every rank: the saving run's full state
    restored = full_state(model, optimizer)
    # FSDP2 -> DDP: the same checkpoint into a replicated model; every rank holds the full state.
    plain, plain_optimizer, _ = build(1, seed=11)
    ddp = torch.nn.parallel.DistributedDataParallel(plain)
    trainstate.load(ckpt, {"model": ddp, "optimizer": plain_optimizer})
    replicated = get_model_state_dict(plain), get_optimizer_state_dict(plain, plain_optimizer)
    record(
        directory,
        f"world-{world}-{rank}.json",
        {
            "refused": refused,
            "model": _same_model(full[0], restored[0]) if rank == 0 else None,
            "optimizer": _same_optimizer(full[1], restored[1]) if rank == 0 else None,
            "lr": scheduler.get_last_lr() == [1e-2 * 0.5],
            "ddp": _same_model(full[0], replicated[0]) and _same_optimizer(full[1], replicated[1]),
        },
    )


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    if not a:
        return None
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_optimizer(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    if not a:  # a full state dict with cpu_offload lives on rank 0 only
        return None
    if a["state"].keys() != b["state"].keys():
        return False
    for key, values in a["state"].items():
        for name, value in values.items():
            other = b["state"][key][name]
            if not (torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other):
                return False
    return [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]


def ddp_save(rank: int, world: int, directory: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(rank)
    for _ in range(2):
        ddp(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    trainstate.save(f"{directory}/ckpt", {"model": ddp, "optimizer": optimizer})
    if rank == 0:
        torch.save((model.state_dict(), optimizer.state_dict()), f"{directory}/full.pt")


def save_then_die(rank: int, world: int, directory: str) -> None:
    """Commit one checkpoint, then rank 1 is SIGKILLed in the middle of the next save."""
    model, optimizer, scheduler = build(world)
    step(model, optimizer, scheduler)
    trainstate.save(f"{directory}/step1", {"model": model, "optimizer": optimizer})
    step(model, optimizer, scheduler)
    if rank == 1:
        from trainstate.distributed.dcp_io import ShardWriter

        def die(*args: Any, **kwargs: Any) -> None:
            os.kill(os.getpid(), signal.SIGKILL)

        ShardWriter.write_data = die  # type: ignore[method-assign]
    start = time.monotonic()
    try:
        trainstate.save(f"{directory}/step2", {"model": model, "optimizer": optimizer})
        outcome = "saved"
    except Exception as exc:  # noqa: BLE001 - what the surviving rank sees is the finding
        outcome = f"{type(exc).__name__}: {exc}"
    record(directory, f"survivor-{rank}.json", {"outcome": outcome, "seconds": time.monotonic() - start})
    os._exit(0)  # the process group is broken: no teardown


def train(rank: int, world: int, directory: str, mode: str) -> None:
    """``killed``: 3 steps, save, one more step, then SIGKILL. ``resume``: an uninterrupted reference
    run of 6 steps, then fresh objects restored from the checkpoint and steps 4-6 again."""
    if mode == "killed":
        model, optimizer, scheduler = build(world, dropout=0.2)
        torch.manual_seed(100 + rank)
        losses = [step(model, optimizer, scheduler) for _ in range(3)]
        trainstate.save(
            f"{directory}/ckpt",
            {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": trainstate.RNGState()},
        )
        record(directory, f"killed-{rank}.json", losses)
        step(model, optimizer, scheduler)
        os.kill(os.getpid(), signal.SIGKILL)
    model, optimizer, scheduler = build(world, dropout=0.2)
    torch.manual_seed(100 + rank)
    reference = [step(model, optimizer, scheduler) for _ in range(6)]
    model, optimizer, scheduler = build(world, seed=5, dropout=0.2)
    trainstate.load(
        f"{directory}/ckpt",
        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": trainstate.RNGState()},
    )
    resumed = [step(model, optimizer, scheduler) for _ in range(3)]
    record(directory, f"resume-{rank}.json", {"reference": reference, "resumed": resumed})


def unencodable_on_one_rank(rank: int, world: int, directory: str) -> None:
    """Rank 1's state holds a set: the save fails on every rank before any file is written."""
    model, optimizer, _ = build(world)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "tags": {"a"} if rank == 1 else ["a"]}
    try:
        trainstate.save(f"{directory}/ckpt", state)
        outcome = "saved"
    except trainstate.UnsupportedValueError as exc:
        outcome = str(exc)
    record(directory, f"refused-{rank}.json", outcome)


def managed(rank: int, world: int, directory: str) -> None:
    """A CheckpointManager under torchrun: one sharded checkpoint per step, retention once, then an
    auto-resume that agrees across ranks to skip (and quarantine) a damaged newest checkpoint."""
    model, optimizer, scheduler = build(world)
    torch.manual_seed(100 + rank)
    states = {}
    with trainstate.CheckpointManager(directory, keep_last=2, every_n_steps=2) as manager:
        for i in range(1, 7):
            loss = step(model, optimizer, scheduler)
            saved = manager.save(
                i, {"model": model, "optimizer": optimizer, "rng": trainstate.RNGState()}, {"loss": loss}
            )
            if saved:
                states[i] = full_state(model, optimizer)
        steps = manager.steps()
    if rank == 0:  # damage the newest checkpoint's rank-1 shard
        shard = Path(directory, "step_00000006", "shard-00001.safetensors")
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))
    dist.barrier()
    model2, optimizer2, _ = build(world, seed=9)
    with trainstate.CheckpointManager(directory, keep_last=2) as manager:
        restored = manager.restore({"model": model2, "optimizer": optimizer2, "rng": trainstate.RNGState()})
        after = manager.steps()
    got = full_state(model2, optimizer2)
    record(
        directory,
        f"managed-{rank}.json",
        {
            "steps": steps,
            "restored": restored,
            "after": after,
            "model": _same_model(states[4][0], got[0]),
            "optimizer": _same_optimizer(states[4][1], got[1]),
        },
    )


def managed_async(rank: int, world: int, directory: str) -> None:
    """Async saves under torchrun. Each write is held back until the training thread, after save()
    returned, took one more step (changing every tensor and the RNG): the checkpoint must still hold
    the state of the moment save() was called, and a run resumed from it must take that very step."""
    import trainstate.distributed.sharded as sharded

    released = threading.Event()
    returned_first: list[bool] = []
    write = sharded.write_sharded

    def held(*args: Any, **kwargs: Any) -> None:
        returned_first.append(released.wait(timeout=20))  # False: save() did not return before the write
        write(*args, **kwargs)

    sharded.write_sharded = held  # type: ignore[assignment]
    model, optimizer, scheduler = build(world, dropout=0.2)
    torch.manual_seed(100 + rank)
    saved, rng, next_loss = {}, {}, {}
    with trainstate.CheckpointManager(directory, keep_last=2, async_save=True) as manager:
        for i in range(1, 5):
            step(model, optimizer, scheduler)
            released.clear()
            manager.save(
                i, {"model": model, "optimizer": optimizer, "scheduler": scheduler, "rng": trainstate.RNGState()}
            )
            saved[i], rng[i] = full_state(model, optimizer), torch.get_rng_state()
            next_loss[i] = step(model, optimizer, scheduler)  # while this save is still unwritten
            released.set()
            manager.wait()
        staging = manager.staging_bytes
        steps = manager.steps()
    sharded.write_sharded = write  # type: ignore[assignment]
    model2, optimizer2, scheduler2 = build(world, seed=9, dropout=0.2)
    with trainstate.CheckpointManager(directory, async_save=True) as manager:
        restored = manager.restore(
            {"model": model2, "optimizer": optimizer2, "scheduler": scheduler2, "rng": trainstate.RNGState()}
        )
    got = full_state(model2, optimizer2)
    same_rng = torch.equal(torch.get_rng_state(), rng[4])
    resumed_loss = step(model2, optimizer2, scheduler2)
    record(
        directory,
        f"async-{rank}.json",
        {
            "returned_first": returned_first,
            "staging_bytes": staging,
            "steps": steps,
            "restored": restored,
            "model": _same_model(saved[4][0], got[0]),
            "optimizer": _same_optimizer(saved[4][1], got[1]),
            "rng": same_rng,
            "resumed_loss": resumed_loss.hex(),
            "expected_loss": next_loss[4].hex(),
        },
    )


def async_write_fails_on_one_rank(rank: int, world: int, directory: str) -> None:
    """Rank 1's disk fills during the second async save: every rank hears of it at its next call,
    nothing of that step is committed, the first checkpoint stays intact and the run can go on."""
    from trainstate.distributed.dcp_io import ShardWriter

    model, optimizer, scheduler = build(world)
    state = {"model": model, "optimizer": optimizer}
    with trainstate.CheckpointManager(directory, async_save=True) as manager:
        step(model, optimizer, scheduler)
        manager.save(1, state)
        manager.wait()
        write_data = ShardWriter.write_data
        if rank == 1:

            def full(*args: Any, **kwargs: Any) -> Any:
                raise OSError(28, "No space left on device")

            ShardWriter.write_data = full  # type: ignore[method-assign]
        step(model, optimizer, scheduler)
        manager.save(2, state)
        try:
            manager.wait()
            outcome = "saved"
        except trainstate.CheckpointError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        ShardWriter.write_data = write_data  # type: ignore[method-assign]
        after_failure = manager.steps()
        step(model, optimizer, scheduler)
        manager.save(3, state)
        manager.wait()
        final = manager.steps()
    record(directory, f"failed-{rank}.json", {"outcome": outcome, "after_failure": after_failure, "final": final})


def s3_sharded(rank: int, world: int, url: str, endpoint: str, directory: str) -> None:
    """An FSDP2 save to an s3:// URL (one transaction joined by every rank), restored into fresh objects."""
    from s3support import options

    model, optimizer, scheduler = build(world)
    for _ in range(2):
        step(model, optimizer, scheduler)
    trainstate.save(url, {"model": model, "optimizer": optimizer, "step": 2}, storage_options=options(endpoint))
    full = full_state(model, optimizer)
    if rank == 0:
        torch.save(full, f"{directory}/full.pt")
    model2, optimizer2, _ = build(world, seed=5)
    out = trainstate.load(url, {"model": model2, "optimizer": optimizer2}, storage_options=options(endpoint))
    again = full_state(model2, optimizer2)
    same = all(torch.equal(a, b) for a, b in zip(full[0].values(), again[0].values(), strict=True))
    Path(f"{directory}/rank{rank}.json").write_text(json.dumps({"same": same, "step": out["step"]}))
