"""Detecting a checkpoint's kind, reading foreign checkpoints, and converting in both directions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from trainstate.api import load, save
from trainstate.convert.common import (
    _DCP_METADATA,
    Progress,
    ReadOptions,
    Source,
    SourceFormat,
    _drop,
)
from trainstate.convert.dcp import DCP
from trainstate.convert.hf_trainer import _HF_STATE, HF_TRAINER
from trainstate.convert.kinds import SOURCE_KINDS
from trainstate.convert.torch_file import LIGHTNING, TORCH_FILE
from trainstate.errors import CheckpointExistsError, CheckpointNotFoundError, UnsupportedFormatError
from trainstate.format.manifest import MANIFEST_NAME
from trainstate.format.reader import CheckpointReader
from trainstate.storage import StorageOptions, atomic_write_file, local_path, scheme_of, split_path

__all__ = [
    "FORMATS",
    "detect_source",
    "read_source",
    "to_torch_file",
    "to_trainstate",
]


FORMATS: dict[str, SourceFormat] = {f.kind: f for f in (DCP, HF_TRAINER, LIGHTNING, TORCH_FILE)}
"""Every foreign format by kind, in detection order (a new format is one more entry)."""


def detect_source(path: str | os.PathLike[str]) -> str:
    """``"trainstate"`` or the kind of the first of `FORMATS` whose ``detect`` accepts the path
    (a ``.ckpt`` is told apart from a plain ``torch.save`` file only once loaded); raises if none does."""
    text = os.fspath(path)
    if os.path.isfile(os.path.join(text, MANIFEST_NAME)):
        return "trainstate"
    for source_format in FORMATS.values():
        if source_format.detect is not None and source_format.detect(text):
            return source_format.kind
    if os.path.isdir(text):
        raise UnsupportedFormatError(
            f"{text}: not a recognised checkpoint directory (no {MANIFEST_NAME}, DCP {_DCP_METADATA}, "
            f"or Hugging Face {_HF_STATE}/model weights)"
        )
    raise CheckpointNotFoundError(f"{text}: no such file or directory")


def read_source(
    path: str | os.PathLike[str],
    *,
    kind: str | None = None,
    trust_pickle: bool = False,
    native: bool = False,
    progress: Progress | None = None,
) -> Source:
    """Read a foreign checkpoint into a `Source`.

    Args:
        path: A ``torch.save``/Lightning file, a Hugging Face Trainer checkpoint directory or a DCP directory.
        kind: One of `SOURCE_KINDS`; detected when None.
        trust_pickle: Fully unpickle files that hold arbitrary Python objects (runs code from them).
        native: Keep the source's own top-level layout. By default framework checkpoints are mapped
            to ``model``/``optimizer``/``scheduler``/``rng`` so that `trainstate.load` restores them
            into live objects, and everything else is kept under the framework's name.
        progress: Called with a short description of each step.
    """
    text = local_path(path)
    detected = detect_source(text)
    if detected == "trainstate":
        raise UnsupportedFormatError(f"{text}: is already a trainstate checkpoint")
    if kind is not None and kind not in FORMATS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(SOURCE_KINDS)}")
    options = ReadOptions(trust_pickle, native, progress or (lambda _: None), detected=kind is None)
    return FORMATS[kind or detected].read(text, options)


def to_trainstate(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    kind: str | None = None,
    trust_pickle: bool = False,
    native: bool = False,
    exclude: Sequence[str] = (),
    overwrite: bool = False,
    progress: Progress | None = None,
    storage_options: StorageOptions | None = None,
) -> Source:
    """Convert a foreign checkpoint at ``src`` into a trainstate checkpoint directory at ``dst``
    (a path, or a URL with ``storage_options``).

    ``exclude`` drops entries by dotted key-path glob (e.g. ``"lightning.callbacks"``). Returns
    the `Source` that was written (its ``state`` after exclusion). See `read_source` for the rest.

    Example:
        >>> import torch, trainstate
        >>> torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, "/tmp/ts-doc-src.pt")
        >>> _ = to_trainstate("/tmp/ts-doc-src.pt", "/tmp/ts-doc-converted", overwrite=True)
        >>> trainstate.load("/tmp/ts-doc-converted")["epoch"]
        3
    """
    target = local_path(dst) if scheme_of(dst) == "file" else os.fspath(dst)
    storage, name = split_path(target, storage_options)
    if storage.exists(name) and not overwrite:
        raise CheckpointExistsError(f"{target}: already exists (pass overwrite=True, CLI: --force, to replace it)")
    source = read_source(src, kind=kind, trust_pickle=trust_pickle, native=native, progress=progress)
    source.state = _drop(source.state, exclude)
    metadata = {**source.metadata, "source": {"kind": source.kind, "path": source.path, "native": native}}
    if "wrapped" in metadata:
        metadata["source"]["wrapped"] = metadata.pop("wrapped")
    if progress:
        progress(f"writing {target}")
    save(target, source.state, metadata=metadata, overwrite=overwrite, storage_options=storage_options)
    return source


def to_torch_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    storage_options: StorageOptions | None = None,
) -> Any:
    """Write the trainstate checkpoint ``src`` (a path, or a URL with ``storage_options``) as one
    ``torch.save`` file at the local path ``dst`` (atomically).

    The file holds what `trainstate.load` returns (plain nested data); a checkpoint converted from a
    bare tensor or list gets that object back. Returns the saved object.

    Example:
        >>> import torch, trainstate
        >>> trainstate.save("/tmp/ts-doc-ckpt", {"w": torch.ones(2), "epoch": 3})
        >>> to_torch_file("/tmp/ts-doc-ckpt", "/tmp/ts-doc-out.pt", overwrite=True)["epoch"]
        3
    """
    target = local_path(dst)
    if os.path.lexists(target) and not overwrite:
        raise CheckpointExistsError(f"{target}: already exists (pass overwrite=True, CLI: --force, to replace it)")
    with CheckpointReader(*split_path(src, storage_options)) as reader:
        metadata = reader.metadata()
    state = load(src, verify=verify, storage_options=storage_options)
    source = metadata.get("source") if isinstance(metadata, dict) else None
    wrapped = source.get("wrapped") if isinstance(source, dict) else None
    obj = state[wrapped] if isinstance(wrapped, str) and wrapped in state else state
    with atomic_write_file(target) as f:
        torch.save(obj, f)
    return obj
