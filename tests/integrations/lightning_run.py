"""A small Lightning training run checkpointing through trainstate.integrations.lightning, for the kill test.

Dropout, AdamW with a per-step StepLR, a shuffled torchdata ``StatefulDataLoader`` (or ``--loader sampler``:
a ``DataLoader`` with a ``trainstate.ResumableSampler``), validation at each epoch end from a loader that
draws from the global RNG, ``ModelCheckpoint(every_n_train_steps=4, save_top_k=2, monitor="train_loss",
save_last=True)``; it always calls ``fit(ckpt_path="last")``. It prints ``start <global step>`` once
restored and ``step <n> loss <float.hex()>`` after each step; with ``--stall-save N`` it stops inside the
save of ``last.ckpt`` at step N (files written, not committed) and waits on stdin, for the parent to
SIGKILL it there. At the end it saves the final weights and optimizer state to ``DIR/final``.

    python tests/integrations/lightning_run.py --dir runs/pl --epochs 3
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import warnings
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import trainstate
from trainstate.integrations.lightning import ExactResume, TrainstateCheckpointIO
from trainstate.storage import local

SAMPLES, BATCH = 56, 8  # 7 batches per epoch: saves every 4 steps all land mid-epoch


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = torch.nn.functional.mse_loss(self.net(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(inputs), targets))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        print(f"start {self.global_step}", flush=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After every callback's hook, so ModelCheckpoint's save of this step is done.
        print(f"step {self.global_step} loss {outputs['loss'].item().hex()}", flush=True)


def stall_inside_save_of_last(trainer: pl.Trainer, step: int) -> None:
    """Stop the save of ``last.ckpt`` at ``step`` with its files written but nothing committed."""
    commit = local._LocalPending.commit

    def stalled(self: Any, manifest: bytes) -> None:
        if os.path.basename(self._final) == "last.ckpt" and trainer.global_step == step:
            print(f"saving {self._final}", flush=True)
            sys.stdin.readline()
        commit(self, manifest)

    local._LocalPending.commit = stalled  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--loader", choices=("stateful", "sampler"), default="stateful")
    parser.add_argument("--stall-save", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Lightning's hints (num_workers, litlogger...) are not this test's output
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    data = torch.Generator().manual_seed(7)
    dataset = TensorDataset(torch.randn(SAMPLES, 6, generator=data), torch.randn(SAMPLES, 1, generator=data))
    if args.loader == "stateful":
        train: Any = StatefulDataLoader(dataset, batch_size=BATCH, shuffle=True)
    else:
        sampler = trainstate.ResumableSampler(dataset, seed=3)
        train = DataLoader(dataset, batch_size=BATCH, sampler=sampler, generator=torch.Generator())
    val = DataLoader(dataset, batch_size=28)
    model = Net()
    checkpoints = ModelCheckpoint(
        dirpath=os.path.join(args.dir, "checkpoints"),
        every_n_train_steps=4,
        save_top_k=2,
        monitor="train_loss",
        save_last=True,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[TrainstateCheckpointIO()],
        callbacks=[checkpoints, ExactResume()],
    )
    if args.stall_save is not None:
        stall_inside_save_of_last(trainer, args.stall_save)
    trainer.fit(model, train, val, ckpt_path="last")
    trainstate.save(
        os.path.join(args.dir, "final"),
        {"model": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict()},
    )


if __name__ == "__main__":
    main()
