"""Storage backends, chosen by URL scheme. Never imports torch."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

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
    "local_path",
    "open_storage",
    "scheme_of",
    "split_path",
]


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_BACKENDS: dict[str, Callable[[str], Storage]] = {"file": LocalStorage}
"""URL scheme -> the Storage for a directory at that location (object stores register here)."""


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


def open_storage(location: str | os.PathLike[str]) -> Storage:
    """The storage backend for the directory at ``location`` (a path or URL), chosen by its scheme."""
    text = os.fspath(location)
    scheme = scheme_of(text)
    factory = _BACKENDS.get(scheme)
    if factory is None:
        raise _unsupported(text, scheme)
    return factory(local_path(text) if scheme == "file" else text)


def _unsupported(text: str, scheme: str) -> ValueError:
    supported = ", ".join(f"{s}://" for s in sorted(_BACKENDS))
    return ValueError(
        f"{text}: storage scheme {scheme!r} is not supported by this trainstate "
        f"(supported: local paths, {supported}); nothing was read or written"
    )


def split_path(path: str | os.PathLike[str]) -> tuple[Storage, str]:
    """Split a checkpoint path (or URL) into the storage of its parent and its own name.

    >>> storage, name = split_path("/tmp/run/step_10")
    >>> storage.root, name
    ('/tmp/run', 'step_10')
    """
    absolute = local_path(path)
    return open_storage(os.path.dirname(absolute)), os.path.basename(absolute)
