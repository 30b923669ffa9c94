"""The exception hierarchy: every error trainstate raises on bad input derives from CheckpointError."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointLockedError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "StateMismatchError",
    "UnsafeCheckpointError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
]


class CheckpointError(Exception):
    """Base class of every error trainstate raises for a checkpoint or a state it cannot handle."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint, or a file it needs, does not exist (or has no committed manifest)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """The destination exists and cannot be replaced atomically."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint's bytes or structure disagree with its manifest: truncation, bit flips, bad headers."""


class UnsupportedFormatError(CheckpointError, ValueError):
    """The checkpoint was written in a format or version this trainstate cannot read."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A value in the state has a type that trainstate does not save without pickle."""


class UnsafeCheckpointError(CheckpointError, PermissionError):
    """Loading would unpickle data, which needs an explicit ``allow_pickle=True``."""


class StateMismatchError(CheckpointError, ValueError):
    """The saved state does not fit the live object it is restored into (keys, shapes, dtypes)."""


class CheckpointLockedError(CheckpointError, BlockingIOError):
    """Another writer holds the lock on the checkpoint directory."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, I/O error, permissions); nothing was committed."""
