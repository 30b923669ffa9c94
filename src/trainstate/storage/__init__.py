"""Storage backends, chosen by URL scheme. Never imports torch."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from trainstate._lazy import lazy_attributes
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

if TYPE_CHECKING:
    from trainstate.storage.objectstore import ObjectStorage

__all__ = [
    "MANIFEST_NAME",
    "QUARANTINE_DIR",
    "TEMP_PREFIX",
    "LocalStorage",
    "ObjectStorage",
    "PendingCheckpoint",
    "Storage",
    "StorageOptions",
    "atomic_write_file",
    "check_checkpoint_name",
    "check_name",
    "local_path",
    "open_storage",
    "scheme_of",
    "split_path",
]


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
StorageOptions = Mapping[str, Any]


def scheme_of(location: str | os.PathLike[str]) -> str:
    """``"file"`` for a plain path, else the URL's scheme (``"s3"`` for ``s3://bucket/run``)."""
    match = _SCHEME.match(os.fspath(location))
    return match.group(1).lower() if match else "file"


def local_path(location: str | os.PathLike[str]) -> str:
    """The absolute path of a local ``location`` (a path or a ``file://`` URL).

    Raises ValueError for any other URL, naming what is supported, so that ``s3://bucket/run`` is
    never taken for a relative directory called ``s3:``.
    """
    text = os.fspath(location)
    scheme = scheme_of(text)
    if scheme != "file":
        raise _unsupported(text, scheme)
    return os.path.abspath(text[len("file://") :] if _SCHEME.match(text) else text)


def open_storage(location: str | os.PathLike[str], storage_options: StorageOptions | None = None) -> Storage:
    """The storage backend for the directory at ``location``: `LocalStorage` for a path or
    ``file://`` URL (the native fast path), `ObjectStorage` over fsspec for any other URL
    (``s3://bucket/run``, ``memory://run``), given ``storage_options``."""
    text = os.fspath(location)
    if scheme_of(text) == "file":
        if storage_options:
            raise ValueError(f"{text}: storage_options apply to URLs (s3://...), not to local paths")
        return LocalStorage(local_path(text))
    from trainstate.storage.objectstore import ObjectStorage  # fsspec and its event loop, only for URLs

    return ObjectStorage(text, storage_options)


def _unsupported(text: str, scheme: str) -> ValueError:
    return ValueError(f"{text}: a local path is needed here, not a {scheme}:// URL; nothing was read or written")


def split_path(path: str | os.PathLike[str], storage_options: StorageOptions | None = None) -> tuple[Storage, str]:
    """Split a checkpoint path (or URL) into the storage of its parent and its own name.

    >>> storage, name = split_path("/tmp/run/step_10")
    >>> storage.root, name
    ('/tmp/run', 'step_10')
    """
    text = os.fspath(path)
    if scheme_of(text) == "file":
        absolute = local_path(text)
        return open_storage(os.path.dirname(absolute), storage_options), os.path.basename(absolute)
    parent, _, name = text.rstrip("/").rpartition("/")
    if not name or parent.endswith(":/"):
        raise ValueError(f"{text}: name a checkpoint inside a bucket or directory (e.g. s3://bucket/run/ckpt)")
    return open_storage(parent, storage_options), name


# imported on first use: `trainstate ls` of a local directory never needs fsspec or its event loop
__getattr__, __dir__ = lazy_attributes(globals(), {"ObjectStorage": "trainstate.storage.objectstore"})
