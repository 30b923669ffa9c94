"""Staging a state for a save: what the writer reads while training goes on.

A `Stager` is the only thing that differs between a synchronous save (the writer reads the live
tensors while the caller waits: `Direct`) and an asynchronous one (state dicts taken now, tensors
copied to host memory: `HostCopy`). Reusable pinned buffers will be another stager.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from trainstate.format.codec import StateSnapshot, is_stateful, qualified_type, unwrap_module
from trainstate.format.tensorfile import alias_key
from trainstate.format.tree import rebuild

__all__ = ["Captured", "Direct", "HostCopy", "Stager", "capture"]


Captured = StateSnapshot
"""A live object's state dict as it was at capture time; saved exactly like the object itself."""


def capture(state: Mapping[str, Any]) -> dict[str, Any]:
    """Copy ``state`` so training may continue while it is written: live objects are replaced by
    their state dicts and every tensor is copied to the CPU (aliases stay aliases)."""
    # Each source tensor is kept alive with its copy: the alias key is an address, and a state_dict()
    # that builds tensors afresh frees them at once, so the next one would reuse the address.
    copies: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def copy_tensor(tensor: torch.Tensor) -> torch.Tensor:
        key = alias_key(tensor)
        if key not in copies:
            clone = tensor.detach().to("cpu", copy=True)
            if isinstance(tensor, torch.nn.Parameter):
                clone = torch.nn.Parameter(clone, requires_grad=tensor.requires_grad)
            elif tensor.requires_grad:
                clone.requires_grad_(True)
            copies[key] = (tensor, clone)
        return copies[key][1]

    def leaf(value: Any, path: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return copy_tensor(value)
        if isinstance(value, np.ndarray):
            return value.copy()
        if is_stateful(value):
            value = unwrap_module(value)
            return Captured(qualified_type(value), rebuild(value.state_dict(), leaf, path))
        return value  # plain values are immutable or refused by the codec later, as in a sync save

    return rebuild(dict(state), leaf)


class Stager(Protocol):
    """Turns a state into what a save writes: after `stage` returns, training may change the live
    objects only if the stager copied them."""

    def stage(self, state: Mapping[str, Any]) -> Mapping[str, Any]: ...


class Direct:
    """No copy: for saves the caller waits for (the writer reads the live tensors)."""

    def stage(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        return state


class HostCopy:
    """State dicts taken now and every tensor copied to fresh host memory (`capture`)."""

    def stage(self, state: Mapping[str, Any]) -> Mapping[str, Any]:
        return capture(state)
