"""Storage backends, chosen by URL scheme. Never imports torch."""

from __future__ import annotations

import os

from trainstate.storage.base import (
    MANIFEST_NAME,
    QUARANTINE_DIR,
    TEMP_PREFIX,
    PendingCheckpoint,
    Storage,
    check_checkpoint_name,
    check_name,
)
from trainstate.storage.local import LocalStorage, atomic_write_file

__all__ = [
    "MANIFEST_NAME",
    "QUARANTINE_DIR",
    "TEMP_PREFIX",
    "LocalStorage",
    "PendingCheckpoint",
    "Storage",
    "atomic_write_file",
    "check_checkpoint_name",
    "check_name",
    "split_path",
]


def split_path(path: str | os.PathLike[str]) -> tuple[Storage, str]:
    """Split a checkpoint path into the storage of its parent and its own name.

    >>> storage, name = split_path("/tmp/run/step_10")
    >>> storage.root, name
    ('/tmp/run', 'step_10')
    """
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        scheme = text.split("://", 1)[0]
        raise NotImplementedError(f"{text}: storage scheme {scheme!r} is not supported yet (only local paths)")
    text = text.removeprefix("file://")
    absolute = os.path.abspath(text)
    return LocalStorage(os.path.dirname(absolute)), os.path.basename(absolute)
