"""A tiny Hugging Face ``Trainer`` run (GPT-2 from a config, dropout on) that checkpoints through TrainstateTrainer.

36 samples in batches of 4 make 9 steps an epoch, so the saves every 5 steps land mid-epoch. Each step
prints ``step <n> loss <float.hex()>`` (``start <step>`` first); with ``--pause-at N`` the run waits
on stdin after printing step N, for the parent to SIGKILL it exactly there. It resumes from the
newest checkpoint that verifies when the directory holds any.

    python tests/integrations/transformers_run.py --dir runs/hf --max-steps 24 --pause-at 17
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from trainstate.integrations.transformers import TrainstateTrainer

SAMPLES, BATCH, LENGTH, VOCAB = 36, 4, 16, 64


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token ids; the labels are the inputs (causal LM)."""

    def __init__(self, samples: int = SAMPLES, seed: int = 1234) -> None:
        self.ids = torch.randint(0, VOCAB, (samples, LENGTH), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class Report(TrainerCallback):
    """Prints (and records) every step's loss exactly; optionally blocks after one step."""

    def __init__(self, *, echo: bool = False, pause_at: int | None = None) -> None:
        self.echo, self.pause_at = echo, pause_at
        self.losses: dict[int, str] = {}
        self.starts: list[int] = []

    def _say(self, line: str) -> None:
        if self.echo:
            print(line, flush=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.starts.append(state.global_step)
        self._say(f"start {state.global_step}")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:  # logging_steps=1: the loss of this very step
            self.losses[state.global_step] = float(logs["loss"]).hex()
            self._say(f"step {state.global_step} loss {self.losses[state.global_step]}")
            if state.global_step == self.pause_at:
                sys.stdin.readline()  # the parent SIGKILLs us here


def build_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(  # dropout 0.1 (embeddings, attention, residuals)
        n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=LENGTH, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def make_args(directory: str, max_steps: int, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = {
        "output_dir": directory,
        "max_steps": max_steps,
        "per_device_train_batch_size": BATCH,
        "learning_rate": 5e-3,
        "warmup_steps": 3,
        "save_steps": 5,
        "logging_steps": 1,
        "save_total_limit": 2,
        "use_cpu": True,
        "report_to": [],
        "seed": 0,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**options, **overrides})


def make_trainer(directory: str, max_steps: int, report: Report, **overrides: Any) -> TrainstateTrainer:
    extra = {k: overrides.pop(k) for k in ("eval_dataset", "compute_metrics") if k in overrides}
    return TrainstateTrainer(
        model=build_model(),
        args=make_args(directory, max_steps, **overrides),
        train_dataset=TokenDataset(),
        callbacks=[report],
        **extra,
    )


def run(directory: str, max_steps: int, report: Report, *, resume: bool | str | None = None) -> TrainstateTrainer:
    """Train (resuming as asked, or when ``directory`` holds checkpoints) and return the trainer."""
    trainer = make_trainer(directory, max_steps, report)
    if resume is None:
        resume = os.path.isdir(directory) and get_last_checkpoint(directory) is not None
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--pause-at", type=int)
    options = parser.parse_args()
    run(options.dir, options.max_steps, Report(echo=True, pause_at=options.pause_at))


if __name__ == "__main__":
    main()
