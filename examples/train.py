"""A small but complete training run that checkpoints with trainstate and resumes bit-exactly.

MLP with dropout, AdamW, OneCycleLR, a shuffled DataLoader, RNG capture, metrics; it saves every
``--save-every`` steps, on SIGTERM, and resumes from the newest good checkpoint when restarted.
Each step prints ``step <n> epoch <e> loss <float.hex()>`` so runs can be compared bit for bit.
``--loop run`` runs the same training through `trainstate.Run` (three added lines instead of the
hand-wired manager loop); both produce the same losses.

    python examples/train.py --dir runs/demo --total-steps 60
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from torch.utils.data import DataLoader, TensorDataset

import trainstate

BATCH = 8


def make_dataset(n: int = 100) -> TensorDataset:
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 16, generator=generator)
    y = (x[:, :4].sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=generator)).tanh()
    return TensorDataset(x, y)


def make_loader(dataset: TensorDataset, kind: str, workers: int) -> DataLoader:
    # The loader gets its own generator: a DataLoader otherwise draws a seed from the *global* torch
    # RNG every time an iterator is created, and a resumed run creates one mid-epoch, which would
    # shift every later dropout mask. (trainstate found this in its kill tests; see the README.)
    generator = torch.Generator().manual_seed(7)
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        sampler = trainstate.ResumableSampler(dataset, shuffle=True, seed=7)
        return StatefulDataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, generator=generator)
    sampler = trainstate.ResumableSampler(dataset, shuffle=True, seed=7)
    return DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers, generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="checkpoint directory")
    parser.add_argument("--total-steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--loader", choices=["plain", "stateful"], default="plain")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--async-save", action="store_true")
    parser.add_argument("--loop", choices=["manager", "run"], default="manager")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bitwise reproducibility across processes: no thread-count-dependent reductions

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-2, total_steps=args.total_steps)
    loader = make_loader(make_dataset(), args.loader, args.workers)
    sampler = loader.sampler
    if args.loop == "run":
        train_with_run(args, model, optimizer, scheduler, loader)
        return
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "rng": trainstate.RNGState(),
        "loader": loader if args.loader == "stateful" else loader.sampler,
    }

    with trainstate.CheckpointManager(
        args.dir,
        keep_last=3,
        every_n_steps=args.save_every,
        async_save=args.async_save,
        preemption_signals=[signal.SIGTERM],
    ) as manager:
        step = manager.restore(state) or 0
        print(f"start {step} pid {os.getpid()}", flush=True)
        while step < args.total_steps and not manager.should_stop:
            for inputs, targets in loader:
                step += 1
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(inputs), targets)
                loss.backward()
                optimizer.step()
                scheduler.step()
                epoch = sampler.state_dict()["epoch"]  # the epoch of the batch the loop got
                print(f"step {step} epoch {epoch} loss {loss.item().hex()}", flush=True)
                manager.save(step, state, metrics={"loss": loss}, force=step == args.total_steps)
                if manager.should_stop:
                    print(f"stopping: {manager.stop_reason}", flush=True)
                    break
                if step >= args.total_steps:
                    break
    if step >= args.total_steps:
        trainstate.save(os.path.join(args.dir, "final"), {"model": model, "optimizer": optimizer}, overwrite=True)
        print("done", flush=True)


def train_with_run(args: argparse.Namespace, model, optimizer, scheduler, loader) -> None:
    """The same loop through `trainstate.Run`: restore, RNG, data position, triggers and preemption."""
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    with trainstate.Run(
        args.dir, state, loader=loader, every_n_steps=args.save_every, keep_last=3, async_save=args.async_save,
        preemption_signals=[signal.SIGTERM],
    ) as run:  # fmt: skip
        print(f"start {run.step} pid {os.getpid()}", flush=True)
        for inputs, targets in run.batches(max_steps=args.total_steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
            scheduler.step()
            epoch = loader.sampler.state_dict()["epoch"]
            print(f"step {run.step} epoch {epoch} loss {loss.item().hex()}", flush=True)
            run.report(loss=loss)
        if run.stopped:
            print(f"stopping: {run.stop_reason}", flush=True)
    if run.step >= args.total_steps:
        trainstate.save(os.path.join(args.dir, "final"), {"model": model, "optimizer": optimizer}, overwrite=True)
        print("done", flush=True)


if __name__ == "__main__":
    main()
