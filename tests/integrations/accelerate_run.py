"""A small Accelerate training run that checkpoints through trainstate.integrations.accelerate, for the kill test.

Dropout, AdamW, a LambdaLR, a prepared ``DataLoader(shuffle=True)`` (seedable sampler, StatefulDataLoader
underneath), a registered progress counter, automatic checkpoint naming with ``total_limit``; it resumes
from the newest checkpoint that verifies. Each step prints ``step <n> loss <float.hex()>``; with
``--pause-at N`` it then waits on stdin after step N, for the parent to SIGKILL it there.

    python tests/integrations/accelerate_run.py --dir runs/acc --total-steps 30 --save-every 4
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader, TensorDataset

import trainstate
from trainstate.integrations.accelerate import load_state, save_state

SAMPLES, BATCH = 96, 8  # 12 batches per epoch: saves every 4 steps land mid-epoch and on epoch ends


class Progress:
    """The loop's own counter, registered for checkpointing as Accelerate users do."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True, help="the project directory (checkpoints/ and final/ go there)")
    parser.add_argument("--total-steps", type=int, default=30)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--pause-at", type=int, help="after printing this step, block on stdin (to be killed there)")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    accelerator = Accelerator(
        cpu=True,
        project_config=ProjectConfiguration(project_dir=args.dir, automatic_checkpoint_naming=True, total_limit=2),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, use_stateful_dataloader=True),
    )
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + 0.05 * step))
    data = torch.Generator().manual_seed(1234)
    inputs = torch.randn(SAMPLES, 16, generator=data)
    dataset = TensorDataset(inputs, inputs[:, :4].sum(dim=1, keepdim=True).tanh())
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    load_state(accelerator)
    print(f"start {progress.step} pid {os.getpid()}", flush=True)
    while progress.step < args.total_steps:
        for x, y in loader:
            progress.step += 1
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            print(f"step {progress.step} loss {loss.item().hex()}", flush=True)
            if progress.step == args.pause_at:
                sys.stdin.readline()  # the parent SIGKILLs us here: a real process, at an exact step
            if progress.step % args.save_every == 0:
                save_state(accelerator)
            if progress.step >= args.total_steps:
                break
    trainstate.save(os.path.join(args.dir, "final"), {"model": model, "optimizer": optimizer})
    print("done", flush=True)


if __name__ == "__main__":
    main()
