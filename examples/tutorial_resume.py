"""The tutorial this project grew from, done right: save after 3 epochs, resume, train 2 more.

Run: python examples/tutorial_resume.py [--live]
Prints the losses of an uninterrupted 5-epoch run and of the 3+2 resumed run, and whether they
are bit-identical.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import trainstate

X = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
Y = 2 * X


def fresh() -> tuple[torch.nn.Linear, torch.optim.SGD]:
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int) -> list[float]:
    losses = []
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def resumed_run(path: str, *, live: bool) -> tuple[list[float], torch.nn.Module]:
    """3 epochs, checkpoint, then 2 epochs in a fresh model/optimizer restored from the checkpoint."""
    model, optimizer = fresh()
    losses = train(model, optimizer, 3)
    if live:
        trainstate.save(path, {"epoch": 3, "model": model, "optimizer": optimizer, "loss": losses[-1]})
    else:
        trainstate.save(
            path,
            {
                "epoch": 3,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "loss": losses[-1],
            },
        )
    del model, optimizer

    model, optimizer = fresh()
    torch.nn.init.zeros_(model.weight)  # prove the weights really come from the checkpoint
    if live:
        checkpoint = trainstate.load(path, {"model": model, "optimizer": optimizer})
    else:
        checkpoint = trainstate.load(path)
        model.load_state_dict(checkpoint["model_state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    assert checkpoint["epoch"] == 3 and checkpoint["loss"] == losses[-1]
    return losses + train(model, optimizer, 2), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--live", action="store_true", help="pass live objects instead of state dicts")
    args = parser.parse_args()
    model, optimizer = fresh()
    uninterrupted = train(model, optimizer, 5)
    with tempfile.TemporaryDirectory() as tmp:
        resumed, resumed_model = resumed_run(f"{tmp}/checkpoint", live=args.live)
    for epoch, (a, b) in enumerate(zip(uninterrupted, resumed, strict=True), 1):
        print(f"epoch {epoch}: uninterrupted {a:.10f}  resumed {b:.10f}")
    identical = uninterrupted == resumed and torch.equal(model.weight, resumed_model.weight)
    print(f"identical: {identical}")
    raise SystemExit(0 if identical else 1)


if __name__ == "__main__":
    main()
