"""Test helpers shared by every test area: a tied-weights model, a training step, exact comparisons."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch


class TiedNet(torch.nn.Module):
    """Embedding tied to the output head, plus a BatchNorm (buffers) and dropout."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.BatchNorm1d(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens)))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor) -> float:
    optimizer.zero_grad()
    loss = model(inputs).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def snapshot(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes, for "nothing changed on disk" assertions."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def assert_same(a, b) -> None:
    """Exact equality of nested state: torch.equal on tensors (and dtype), == and type on the rest."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        assert a.requires_grad == b.requires_grad, "requires_grad differs"
        assert torch.equal(tensor_bytes(a), tensor_bytes(b)), "tensor bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
        assert a.tobytes() == b.tobytes(), "array bytes differ"
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=False):
            assert_same(x, y)
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), (a, b)  # -0.0 and a NaN's sign/payload too
    else:
        assert a == b


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's logical values as bytes (NaN-safe), conj/neg views resolved. Copied into fresh
    memory: a "contiguous" tensor may still have a size-1 dimension of any stride."""
    flat = t.detach().cpu().resolve_conj().resolve_neg().reshape(-1)
    return torch.empty(flat.numel(), dtype=flat.dtype).copy_(flat).view(torch.uint8)


def tensor_refs(node: Any, path: tuple[Any, ...] = ()) -> Iterator[dict[str, Any]]:
    """Every tensor ref (a mutable dict) in a manifest tree, with its "key" and "device" made explicit
    (format 2 omits them where they are the tensor's path and the CPU), ready to be tampered with."""
    if isinstance(node, list):
        for i, child in enumerate(node):
            yield from tensor_refs(child, (*path, i))
    if not isinstance(node, dict):
        return
    tag, inner = node.get("@"), node.get("v")
    if tag == "tensor":
        node.setdefault("key", ".".join(map(str, path)) or "<root>")
        node.setdefault("device", "cpu")
        yield node
    elif tag == "stateful":
        yield from tensor_refs(inner, path)
    elif isinstance(inner, dict):
        for key, child in inner.items():
            yield from tensor_refs(child, (*path, key))
    elif isinstance(inner, list):
        yield from tensor_refs(inner, path)
    elif isinstance(node.get("items"), list):
        for key, child in node["items"]:
            yield from tensor_refs(child, (*path, key))


Position = tuple[int, int]  # (epoch, batches the loop has had in it; 0 = before the epoch's iter())


def epoch_loop(
    state: dict[str, Any],
    epoch_batches: Callable[[], Iterable[Any]],
    *,
    epochs: int,
    stop: Position | None = None,
    resume: tuple[os.PathLike[str] | str, Position] | None = None,
    save_to: os.PathLike[str] | str | None = None,
) -> list[tuple[int, list[Any], str]]:
    """The loop a user writes, traced: per step (epoch, the batch, a global-RNG draw standing in for
    dropout). Saves ``state`` and stops at ``stop``; or first loads the checkpoint saved at ``resume``."""
    import trainstate

    first = 0
    if resume is not None:
        trainstate.load(resume[0], state)
        first = resume[1][0]
    trace: list[tuple[int, list[Any], str]] = []
    for epoch in range(first, epochs):
        if stop == (epoch, 0):
            trainstate.save(save_to, state)  # type: ignore[arg-type]
            return trace
        for (batch,) in epoch_batches():
            trace.append((epoch, batch.tolist(), torch.rand(1).item().hex()))
            if stop == (epoch, sum(1 for e, _, _ in trace if e == epoch)):
                trainstate.save(save_to, state)  # type: ignore[arg-type]
                return trace
    return trace
