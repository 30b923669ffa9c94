"""Reading ``torch.distributed.checkpoint`` (DCP) directories, consolidated into one state."""

from __future__ import annotations

import io
import logging
import os
from typing import IO, Any

import torch

from trainstate.convert.common import (
    _DCP_METADATA,
    ReadOptions,
    Source,
    SourceFormat,
    _plain,
    _top_level_metadata,
)
from trainstate.convert.unpickle import _read_dcp_metadata, load_torch_file
from trainstate.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedFormatError,
)
from trainstate.storage import check_name

__all__ = ["DCP"]

logger = logging.getLogger(__name__)


def _read_dcp(path: str, options: ReadOptions) -> Source:
    trust_pickle, progress = options.trust_pickle, options.progress
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

    progress(f"reading {_DCP_METADATA}")
    metadata = _read_dcp_metadata(path, trust_pickle=trust_pickle)
    storage_data = getattr(metadata, "storage_data", None)
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(storage_data, dict) or not isinstance(entries, dict):
        raise CorruptCheckpointError(f"{os.path.join(path, _DCP_METADATA)}: not DCP metadata")
    planner_data = metadata.planner_data if isinstance(getattr(metadata, "planner_data", None), dict) else {}
    files: dict[str, IO[bytes]] = {}

    def blob(index: Any) -> io.BytesIO:
        info = storage_data.get(index)
        if info is None:
            raise CorruptCheckpointError(f"{path}: key {index.fqn!r}: no data recorded for chunk {index.offset}")
        if getattr(info, "transform_descriptors", None):
            raise UnsupportedFormatError(
                f"{path}: key {index.fqn!r} is stored with DCP transforms {list(info.transform_descriptors)} "
                "(e.g. compression), which trainstate cannot read"
            )
        name = check_name(str(info.relative_path), where=path)
        if name not in files:
            progress(f"reading {name}")
            try:
                files[name] = open(os.path.join(path, name), "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{os.path.join(path, name)}: data file missing") from None
        f = files[name]
        f.seek(int(info.offset))
        data = f.read(int(info.length))
        if len(data) != int(info.length):
            raise CorruptCheckpointError(f"{os.path.join(path, name)}: key {index.fqn!r}: file ended early (truncated)")
        return io.BytesIO(data)

    state: dict[str, Any] = {}
    try:
        for fqn, entry in entries.items():
            where = f"{path}: key {fqn!r}"
            if isinstance(entry, TensorStorageMetadata):
                value = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
                for chunk in entry.chunks:
                    part = load_torch_file(
                        blob(MetadataIndex(fqn, chunk.offsets)), trust_pickle=trust_pickle, where=where
                    )
                    if not isinstance(part, torch.Tensor) or tuple(part.shape) != tuple(chunk.sizes):
                        raise CorruptCheckpointError(
                            f"{where}: chunk at {list(chunk.offsets)} is not a tensor of shape {list(chunk.sizes)}"
                        )
                    target = value
                    for dim, (start, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                        target = target.narrow(dim, int(start), int(size))
                    target.copy_(part)
            elif isinstance(entry, BytesStorageMetadata):
                value = _plain(load_torch_file(blob(MetadataIndex(fqn)), trust_pickle=trust_pickle, where=where))
            else:
                raise UnsupportedFormatError(f"{where}: unknown DCP entry type {type(entry).__name__}")
            _set_path(state, tuple(planner_data.get(fqn, (fqn,))), value, where=where)
    finally:
        for f in files.values():
            f.close()
    _fix_optimizer_keys(state)
    meta = _top_level_metadata(state)
    return Source("dcp", path, state, meta)


def _set_path(root: dict[str, Any], path: tuple[Any, ...], value: Any, *, where: str) -> None:
    """DCP's ``set_element``: str parts are dict keys, int parts list indices (lists grow as needed)."""
    if not path:
        raise CorruptCheckpointError(f"{where}: empty key path")
    node: Any = root
    for part, following in zip(path[:-1], path[1:], strict=True):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            while len(node) <= part:
                node.append(None)
            if node[part] is None:
                node[part] = empty
            node = node[part]
        else:
            node = node.setdefault(part, empty)
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def _fix_optimizer_keys(value: Any) -> None:
    """DCP flattening turns optimizer ``state`` keys (param ids) into strings; ``Optimizer.load_state_dict``
    matches them against integer ids, so turn them back when the ``param_groups`` say ids are ints."""
    if isinstance(value, dict):
        groups, opt_state = value.get("param_groups"), value.get("state")
        if isinstance(groups, list) and isinstance(opt_state, dict) and len(value) == 2:
            ids = {p for g in groups if isinstance(g, dict) for p in g.get("params", [])}
            if ids and all(type(i) is int for i in ids) and all(isinstance(k, str) and k.isdigit() for k in opt_state):
                value["state"] = {int(k): v for k, v in opt_state.items()}
        for child in value.values():
            _fix_optimizer_keys(child)
    elif isinstance(value, list):
        for child in value:
            _fix_optimizer_keys(child)


DCP = SourceFormat("dcp", lambda path: os.path.isfile(os.path.join(path, _DCP_METADATA)), _read_dcp)
