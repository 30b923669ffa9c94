"""Distributed (sharded) checkpoints through torch.distributed.checkpoint: see `sharded`.

This package imports DCP only when a distributed save or a sharded checkpoint needs it.
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["active_world"]


def active_world() -> tuple[int, int] | None:
    """``(rank, world_size)`` under an initialized process group of more than one rank, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None
