"""RNGState: every random number generator a training run draws from, as one Stateful object."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from trainstate.errors import StateMismatchError

__all__ = ["RNGState"]


class RNGState:
    """Captures and restores Python ``random``, numpy's global generator, torch CPU, every CUDA device
    and MPS, so the next random draw after a restore is the one the saved run would have made.

    Put it in the saved state like any other live object.

    Example:
        >>> import torch, trainstate
        >>> rng = trainstate.RNGState()
        >>> trainstate.save("/tmp/ts-doc/rng", {"rng": rng})
        >>> first = torch.rand(2)
        >>> _ = trainstate.load("/tmp/ts-doc/rng", {"rng": rng})
        >>> torch.equal(torch.rand(2), first)
        True
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if torch.backends.mps.is_available():
            state["mps"] = torch.mps.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every generator; raises StateMismatchError if a saved device generator has no device here."""
        cuda = state.get("cuda", [])
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if len(cuda) > available:
            raise StateMismatchError(
                f"rng.cuda: the checkpoint holds RNG states for {len(cuda)} CUDA device(s), this process sees "
                f"{available}; run on the same devices or drop 'cuda' from the rng state to accept different randomness"
            )
        if "mps" in state and not torch.backends.mps.is_available():
            raise StateMismatchError("rng.mps: the checkpoint holds an MPS RNG state but MPS is not available here")
        random.setstate(_as_tuple(state["python"]))
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"].cpu())
        if cuda:
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        if "mps" in state:
            torch.mps.set_rng_state(state["mps"].cpu())

    def __repr__(self) -> str:
        return "RNGState()"


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
