"""The kinds of foreign checkpoints `trainstate.convert` reads, and the files ``torch.load`` reads (no torch)."""

from __future__ import annotations

__all__ = ["SOURCE_KINDS", "TORCH_SUFFIXES"]

SOURCE_KINDS = ("torch", "lightning", "hf-trainer", "dcp")
"""What `read_source` understands; ``"trainstate"`` is what `detect_source` says for our own checkpoints."""


TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""File suffixes read with ``torch.load`` (and written by `to_torch_file`)."""
