"""Checkpoints written by the real tools, built inside the test session from tiny models (no downloads).

Each builder returns the checkpoint's path. Hugging Face and Lightning builders need those packages
(the ``dev`` extra); callers skip when they are missing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import trainstate

STEPS = [100, 200, 300, 400, 500]
LOSS = [0.9, 0.5, 0.2, 0.35, 0.3]  # best (min) at step 300
ACC = [0.1, 0.5, 0.7, 0.8, 0.75]  # best (max) at step 400


def make_run(directory: Path) -> Path:
    """A CheckpointManager directory: 5 checkpoints of model + AdamW + StepLR + RNG, with loss/acc metrics."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    with trainstate.CheckpointManager(directory, keep_last=None, monitor="loss") as manager:
        for epoch, (step, loss, acc) in enumerate(zip(STEPS, LOSS, ACC, strict=True), start=1):
            optimizer.zero_grad()
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            scheduler.step()
            state = {
                "model": model,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "rng": trainstate.RNGState(),
                "epoch": epoch,
            }
            manager.save(step, state, metrics={"loss": loss, "acc": acc})
    return directory


def make_hf_trainer(root: Path, *, safetensors: bool = True) -> Path:
    """A real ``transformers.Trainer`` checkpoint of a tiny GPT-2 trained 2 steps: ``checkpoint-2``.

    With ``safetensors=False`` the weights are ``pytorch_model.bin``. transformers 4.x writes that
    itself (``TrainingArguments(save_safetensors=False)``); transformers 5 always writes
    ``model.safetensors``, so there the real checkpoint's weights are re-saved the way 4.x does
    (``torch.save(state_dict, "pytorch_model.bin")``) and everything else is the Trainer's own output.
    """
    import inspect

    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = (torch.arange(8) + i) % 32
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    native_bin = "save_safetensors" in inspect.signature(TrainingArguments.__init__).parameters
    options = {"save_safetensors": safetensors} if native_bin else {}
    args = TrainingArguments(
        output_dir=str(root),
        max_steps=2,
        per_device_train_batch_size=4,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **options,
    )
    Trainer(model=model, args=args, train_dataset=Tokens()).train()
    path = root / "checkpoint-2"
    if not safetensors and not native_bin:
        from safetensors.torch import load_file

        weights = load_file(path / "model.safetensors")
        torch.save(weights, path / "pytorch_model.bin")
        os.remove(path / "model.safetensors")
    return path


def make_lightning(root: Path) -> Path:
    """A real Lightning ``.ckpt``: ``Trainer(max_steps=2)`` with AdamW, StepLR and a monitored ModelCheckpoint."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl  # type: ignore[no-redef]

    class Regressor(pl.LightningModule):
        def __init__(self, lr: float = 0.01) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> dict[str, object]:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 2))
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=root, filename="last", monitor="train_loss", every_n_train_steps=2
    )
    trainer = pl.Trainer(
        max_steps=2,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[checkpoint],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=4))
    return root / "last.ckpt"


def make_dcp(root: Path) -> Path:
    """A ``torch.distributed.checkpoint.save`` directory of model + AdamW + plain values (one process)."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 5, "extra": {"name": "run-1"}}
    path = root / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving as a single process"
        dcp.save(state, checkpoint_id=path)
    return path


def make_torch_save(root: Path) -> Path:
    """A ``torch.save`` file with nested model/optimizer/scheduler state dicts, RNG states and plain values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    np.random.seed(0)
    path = root / "plain.pt"
    torch.save(
        {
            "epoch": 3,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
            "loss": 0.25,
            "history": [1.0, 0.5, 0.25],
        },
        path,
    )
    return path


class Evil:
    """Unpickling this runs code: it creates ``marker``. Safe loading must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def make_evil(root: Path) -> tuple[Path, Path]:
    """A ``.pt`` whose unpickling would create a marker file; returns (file, marker)."""
    marker = root / "pwned"
    path = root / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": Evil(str(marker))}, path)
    return path, marker


def need(sources: dict[str, Path], kind: str) -> Path:
    if kind not in sources:
        pytest.skip(f"{kind} is not installed (pip install -e '.[dev]')")
    return sources[kind]


def edit_manifest(checkpoint: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` to every object node of a checkpoint's manifest tree and rewrite the manifest with a
    valid checksum: a checkpoint whose manifest says something its files do not."""
    from support import tensor_refs
    from trainstate.format import MANIFEST_NAME, Manifest

    path = checkpoint / MANIFEST_NAME
    manifest = Manifest.from_json(path.read_bytes(), where=str(path))

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            edit(node)
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    list(tensor_refs(manifest.tree))  # every field of a tensor ref explicit, so edits can match them
    walk(manifest.tree)
    path.write_bytes(manifest.to_json())
