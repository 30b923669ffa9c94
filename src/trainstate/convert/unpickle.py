"""Reading pickles without running code from them: ``torch.load(weights_only=True)`` with a short allowlist of
harmless types, and an unpickler for DCP's ``.metadata`` that only builds DCP's own metadata classes."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import pickle
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
import torch

from trainstate.convert.common import _DCP_METADATA, _first_line
from trainstate.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)

__all__ = ["load_torch_file"]

logger = logging.getLogger(__name__)


def _numpy_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved np.core to np._core
    allowed: list[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    # Pickles name the module they were written under, which differs between numpy 1 and 2.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [
            (core.multiarray._reconstruct, f"{module}._reconstruct"),
            (core.multiarray.scalar, f"{module}.scalar"),
        ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def _harmless_globals() -> list[Any]:
    """Types that carry data only and appear in real framework checkpoints; none runs code when built."""
    allowed: list[Any] = _numpy_globals()
    allowed.append(argparse.Namespace)  # Lightning hparams from argparse
    # Lightning's AttributeDict is a dict subclass: built as a plain dict, Lightning need not be installed.
    for module in (
        "pytorch_lightning.utilities.parsing",
        "lightning.pytorch.utilities.parsing",
        "lightning_fabric.utilities.data",
        "lightning.fabric.utilities.data",
    ):
        allowed.append((dict, f"{module}.AttributeDict"))
    for module in ("pathlib", "pathlib._local"):  # paths become pure paths: no filesystem access
        allowed += [(pathlib.PurePosixPath, f"{module}.PosixPath"), (pathlib.PureWindowsPath, f"{module}.WindowsPath")]
    return allowed


def _allowed_names(allowed: Sequence[Any]) -> set[str]:
    names = set()
    for item in allowed:
        if isinstance(item, tuple):
            names.add(item[1])
        else:
            names.add(f"{item.__module__}.{item.__qualname__}")
    return names


def load_torch_file(
    path: str | os.PathLike[str] | IO[bytes], *, trust_pickle: bool = False, where: str | None = None
) -> Any:
    """``torch.load`` a file onto the CPU without running code from it.

    Only tensors, containers, plain values and the harmless types listed in this module's docstring
    are built. A file that pickles anything else raises UnsafeCheckpointError naming those types;
    ``trust_pickle=True`` unpickles it fully (only for files you trust: that runs code from them).

    Example:
        >>> import torch
        >>> torch.save({"w": torch.ones(2), "epoch": 3}, "/tmp/ts-doc-plain.pt")
        >>> load_torch_file("/tmp/ts-doc-plain.pt")["epoch"]
        3
    """
    where = where or (os.fspath(path) if isinstance(path, (str, os.PathLike)) else "<stream>")
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{where}: no such file")
    if trust_pickle:
        logger.warning("%s: unpickling fully (trust_pickle=True): this runs any code the file contains", where)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CorruptCheckpointError(f"{where}: torch.load failed: {_first_line(exc)}") from exc
    allowed = _harmless_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path, allowed)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{where}: cannot be loaded safely: it pickles Python objects of type {', '.join(unsafe)}, "
                "and unpickling them could run code from the file; convert with trust_pickle=True "
                "(CLI: --trust-pickle) only if you trust where the file came from"
            ) from None
        raise UnsafeCheckpointError(f"{where}: cannot be loaded with weights_only=True: {_wo_reason(exc)}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: not a readable torch.save file ({_first_line(exc)})") from exc


def _unsafe_globals(path: str | os.PathLike[str] | IO[bytes], allowed: Sequence[Any]) -> list[str]:
    try:
        if not isinstance(path, (str, os.PathLike)):
            path.seek(0)
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files cannot be scanned; the caller reports torch's reason
        return []
    known = _allowed_names(allowed)
    return sorted(name for name in found if name not in known)


def _wo_reason(exc: Exception) -> str:
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    return " ".join(text.strip().split("\n\n")[0].split())


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata dataclasses, torch sizes/dtypes/layouts and paths: DCP writes its
    ``.metadata`` with plain pickle, which would otherwise run any code the file names."""

    _CLASSES = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
        "torch.serialization": {"_get_layout"},
        "collections": {"OrderedDict"},
    }
    _PATHS = {"PosixPath": pathlib.PurePosixPath, "WindowsPath": pathlib.PureWindowsPath}

    def __init__(self, file: IO[bytes], where: str) -> None:
        super().__init__(file)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if module in ("pathlib", "pathlib._local") and name in self._PATHS:
            return self._PATHS[name]
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in self._CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self._where}: refers to {module}.{name}, which is not part of DCP metadata; "
            "refusing to unpickle it (it could run code)"
        )


def _read_dcp_metadata(path: str, *, trust_pickle: bool) -> Any:
    import torch.distributed.checkpoint  # noqa: F401 - registers the metadata classes

    where = os.path.join(path, _DCP_METADATA)
    with open(where, "rb") as f:
        if trust_pickle:
            return pickle.load(f)  # noqa: S301 - explicit opt-in
        try:
            return _DCPMetadataUnpickler(f, where).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(f"{where}: not readable DCP metadata ({_first_line(exc)})") from exc
