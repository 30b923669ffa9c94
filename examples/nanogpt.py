"""nanoGPT's train.py loop (karpathy/nanoGPT), on synthetic tokens, checkpointed the trainstate way.

The loop is upstream's: random batches from the global RNG (``torch.randint``), dropout, AdamW, a
cosine learning rate with warm-up computed from ``iter_num``, an evaluation every
``eval_interval`` iterations that saves a checkpoint, and the next batch prefetched while the
current one trains. Ported naively, a resumed run diverges at its first iteration even though
every object is restored exactly, because of two things a script does around its checkpoint:

1. **Work redone after the RNG was captured.** The checkpoint is taken right after the
   evaluation at ``iter_num``; a resumed run that starts the loop at ``iter_num`` evaluates
   again, drawing evaluation batches from the global RNG a second time. Here the loop knows it
   has just been restored (``resumed_at``) and does not redo that evaluation.
2. **State held in local variables.** ``X, Y`` is the batch already prefetched for the next
   step; it is part of the training state, so it goes in the checkpoint.

The model is built from ``model_args``, which ``manager.peek()`` reads from the newest checkpoint
before any tensor is loaded, exactly as upstream reads them from ``ckpt.pt``.

    python examples/nanogpt.py --dir runs/gpt --total-steps 40
"""

from __future__ import annotations

import argparse
import math
import os
import signal

import torch
from torch import nn
from torch.nn import functional as F

import trainstate

CONFIG = {
    "batch_size": 4,
    "block_size": 16,
    "eval_interval": 5,
    "eval_iters": 2,
    "learning_rate": 3e-3,
    "min_lr": 3e-4,
    "warmup_iters": 5,
    "gradient_accumulation_steps": 2,
}
MODEL_ARGS = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 64, "dropout": 0.1}


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = nn.MultiheadAttention(n_embd, n_head, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(1)
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int, dropout: float):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as upstream

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.size(1))))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="checkpoint directory (out_dir)")
    parser.add_argument("--total-steps", type=int, default=40, help="max_iters")
    args = parser.parse_args()
    torch.manual_seed(1337)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    tokens = torch.randint(MODEL_ARGS["vocab_size"], (4096,), generator=torch.Generator().manual_seed(0))
    data = {"train": tokens[:3600], "val": tokens[3600:]}
    block, batch = CONFIG["block_size"], CONFIG["batch_size"]

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data[split]) - block, (batch,))  # the global RNG, as upstream
        x = torch.stack([data[split][i : i + block] for i in ix])
        y = torch.stack([data[split][i + 1 : i + 1 + block] for i in ix])
        return x, y

    def get_lr(it: int) -> float:
        lr, min_lr, warmup = CONFIG["learning_rate"], CONFIG["min_lr"], CONFIG["warmup_iters"]
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = min(1.0, (it - warmup) / max(1, args.total_steps - warmup))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    with trainstate.CheckpointManager(args.dir, keep_last=2, preemption_signals=[signal.SIGTERM]) as manager:
        found = manager.peek()  # plain values and metadata only: build the model before loading weights
        model_args = found.metadata["model_args"] if found is not None else MODEL_ARGS
        model = GPT(**model_args)
        optimizer = torch.optim.AdamW(model.parameters(), lr=CONFIG["learning_rate"], betas=(0.9, 0.95))

        @torch.no_grad()
        def estimate_loss() -> dict[str, float]:
            model.eval()
            out = {}
            for split in ("train", "val"):
                out[split] = sum(model(*get_batch(split)).item() for _ in range(CONFIG["eval_iters"]))
            model.train()
            return {k: v / CONFIG["eval_iters"] for k, v in out.items()}

        X, Y = get_batch("train")  # fetch the very first batch
        state = {"model": model, "optimizer": optimizer, "rng": trainstate.RNGState(), "batch": (X, Y)}
        state |= {"iter_num": 0, "best_val_loss": 1e9}
        resumed_at = manager.restore(state)  # None on a fresh start
        iter_num, best_val_loss = state["iter_num"], state["best_val_loss"]
        X, Y = state["batch"]
        print(f"start {resumed_at or 0} pid {os.getpid()}", flush=True)
        while iter_num < args.total_steps and not manager.should_stop:
            for group in optimizer.param_groups:
                group["lr"] = get_lr(iter_num)
            if iter_num % CONFIG["eval_interval"] == 0 and iter_num != resumed_at:  # never redo a saved eval
                losses = estimate_loss()
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0:
                    state |= {"iter_num": iter_num, "best_val_loss": best_val_loss, "batch": (X, Y)}
                    manager.save(iter_num, state, {"val_loss": losses["val"]}, metadata={"model_args": model_args})
            for _ in range(CONFIG["gradient_accumulation_steps"]):
                loss = model(X, Y) / CONFIG["gradient_accumulation_steps"]
                X, Y = get_batch("train")  # prefetch the next batch while this one trains
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            print(f"step {iter_num} lr {get_lr(iter_num - 1):.6f} loss {loss.item().hex()}", flush=True)
    if iter_num >= args.total_steps:
        trainstate.save(os.path.join(args.dir, "final"), {"model": model, "optimizer": optimizer})
        print("done", flush=True)


if __name__ == "__main__":
    main()
