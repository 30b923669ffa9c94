"""Convert foreign checkpoints to trainstate checkpoints, and trainstate checkpoints to ``torch.save`` files.

Sources: a ``torch.save`` file (``.pt``/``.pth``/``.bin``), a PyTorch Lightning ``.ckpt``, a Hugging
Face ``Trainer`` checkpoint directory, and a ``torch.distributed.checkpoint`` (DCP) directory.
A checkpoint is untrusted input: every pickle is read with ``torch.load(weights_only=True)`` plus a
short allowlist of harmless types (numpy arrays and scalars, ``argparse.Namespace``, Lightning's
``AttributeDict``, paths), and DCP's pickled ``.metadata`` with an unpickler that only builds DCP's
own metadata classes. Full unpickling, which runs code from the file, needs ``trust_pickle=True``.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import logging
import os
import pathlib
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch

from trainstate.api import load, save
from trainstate.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from trainstate.format.codec import format_path
from trainstate.format.manifest import MANIFEST_NAME
from trainstate.format.reader import CheckpointReader
from trainstate.storage import atomic_write_file, check_name, local_path, split_path

__all__ = [
    "SOURCE_KINDS",
    "TORCH_SUFFIXES",
    "Source",
    "detect_source",
    "load_torch_file",
    "read_source",
    "to_torch_file",
    "to_trainstate",
]

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("torch", "lightning", "hf-trainer", "dcp")
"""What `read_source` understands; ``"trainstate"`` is what `detect_source` says for our own checkpoints."""

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""File suffixes read with ``torch.load`` (and written by `to_torch_file`)."""

Progress = Callable[[str], None]

_DCP_METADATA = ".metadata"
_HF_STATE = "trainer_state.json"
_HF_FILES = {  # torch.save file -> key in the converted state
    "optimizer.pt": "optimizer",
    "scheduler.pt": "scheduler",
    "scaler.pt": "scaler",
}
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HF_SKIPPED = {"training_args.bin": "a pickled TrainingArguments object, not training state"}
_LIGHTNING_MOVED = ("state_dict", "optimizer_states", "lr_schedulers")


@dataclass
class Source:
    """A foreign checkpoint read into memory: the state to save, its metadata, and what was left out."""

    kind: str
    path: str
    state: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- torch.load, safely
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------- normalizing
def _plain(value: Any) -> Any:
    """Framework containers -> the plain types trainstate stores: dict subclasses and Namespaces become
    dicts, paths become strings. Tensors are never copied, so tied tensors stay one object."""
    if isinstance(value, torch.Tensor):
        return value
    if type(value) is OrderedDict:
        out: OrderedDict[Any, Any] = OrderedDict((k, _plain(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):  # module state dicts: per-module versions for load_state_dict
            out._metadata = value._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, argparse.Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    return value


def _drop(value: Any, patterns: Sequence[str], path: tuple[Any, ...] = ()) -> Any:
    """``value`` without the entries whose dotted key path matches one of ``patterns``."""
    if not patterns or not isinstance(value, dict):
        return value
    out = type(value)() if type(value) is OrderedDict else {}
    if hasattr(value, "_metadata"):
        out._metadata = value._metadata  # type: ignore[attr-defined]
    for key, child in value.items():
        sub = (*path, key)
        if not any(fnmatch.fnmatchcase(format_path(sub), p) for p in patterns):
            out[key] = _drop(child, patterns, sub)
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        return float(value.item())
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return float(value)
    return None


def _top_level_metadata(state: Mapping[Any, Any]) -> dict[str, Any]:
    """Step, epoch and float metrics that a plain ``torch.save`` dict holds at its top level."""
    meta: dict[str, Any] = {}
    for key in ("step", "global_step", "iteration"):
        if type(state.get(key)) is int:
            meta["step"] = state[key]
            break
    if type(state.get("epoch")) is int:
        meta["epoch"] = state["epoch"]
    metrics = {str(k): v for k, v in state.items() if type(v) is float}
    if metrics:
        meta["metrics"] = metrics
    return meta


# ------------------------------------------------------------------------------------ detection
def detect_source(path: str | os.PathLike[str]) -> str:
    """``"trainstate"``, ``"dcp"``, ``"hf-trainer"`` or ``"torch"`` (a ``.ckpt`` is told apart from a
    plain ``torch.save`` file only once loaded); raises if the path is none of them."""
    text = os.fspath(path)
    if os.path.isdir(text):
        if os.path.isfile(os.path.join(text, MANIFEST_NAME)):
            return "trainstate"
        if os.path.isfile(os.path.join(text, _DCP_METADATA)):
            return "dcp"
        if os.path.isfile(os.path.join(text, _HF_STATE)) or any(
            os.path.isfile(os.path.join(text, f)) for f in _HF_WEIGHTS
        ):
            return "hf-trainer"
        raise UnsupportedFormatError(
            f"{text}: not a recognised checkpoint directory (no {MANIFEST_NAME}, DCP {_DCP_METADATA}, "
            f"or Hugging Face {_HF_STATE}/model weights)"
        )
    if os.path.isfile(text):
        return "torch"
    raise CheckpointNotFoundError(f"{text}: no such file or directory")


def _is_lightning(obj: Any) -> bool:
    return isinstance(obj, Mapping) and (
        "pytorch-lightning_version" in obj
        or "lightning_version" in obj
        or {"state_dict", "global_step", "epoch"} <= set(obj)
    )


# -------------------------------------------------------------------------------------- reading
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
    if kind is not None and kind not in _READERS:
        raise ValueError(f"kind={kind!r}: use one of {', '.join(SOURCE_KINDS)}")
    reader = _READERS[kind or detected]
    return reader(text, trust_pickle, native, progress or (lambda _: None), kind is None)


def _read_file(path: str, trust_pickle: bool, native: bool, progress: Progress, detected: bool) -> Source:
    """A ``torch.save`` file; a Lightning checkpoint when it looks like one (unless ``--from torch``)."""
    if os.path.isdir(path):
        raise UnsupportedFormatError(f"{path}: is a directory; torch.save and Lightning checkpoints are files")
    progress(f"loading {os.path.basename(path)}")
    obj = load_torch_file(path, trust_pickle=trust_pickle)
    if _is_lightning(obj) and detected:
        return _from_lightning(path, _plain(obj), native=native)
    obj = _plain(obj)
    if isinstance(obj, dict):
        return Source("torch", path, obj, _top_level_metadata(obj))
    # trainstate stores a mapping; a bare tensor or list goes under one key, undone by to_torch_file.
    return Source("torch", path, {"data": obj}, {"wrapped": "data"})


def _read_lightning(path: str, trust_pickle: bool, native: bool, progress: Progress, detected: bool) -> Source:
    source = _read_file(path, trust_pickle, native, progress, True)
    if source.kind != "lightning":
        raise UnsupportedFormatError(f"{path}: not a Lightning checkpoint (no 'state_dict'/'global_step')")
    return source


def _from_lightning(path: str, ckpt: dict[str, Any], *, native: bool) -> Source:
    metadata: dict[str, Any] = {}
    if type(ckpt.get("global_step")) is int:
        metadata["step"] = ckpt["global_step"]
    if type(ckpt.get("epoch")) is int:
        metadata["epoch"] = ckpt["epoch"]
    metrics = {}
    for callback in (ckpt.get("callbacks") or {}).values():  # ModelCheckpoint records its monitored score
        if isinstance(callback, Mapping) and isinstance(callback.get("monitor"), str):
            value = _number(callback.get("current_score"))
            if value is not None:
                metrics[callback["monitor"]] = value
    if metrics:
        metadata["metrics"] = metrics
    if native:
        return Source("lightning", path, ckpt, metadata)
    state: dict[str, Any] = {"model": ckpt["state_dict"]}
    for key, single, several in (
        ("optimizer_states", "optimizer", "optimizers"),
        ("lr_schedulers", "scheduler", "schedulers"),
    ):
        items = ckpt.get(key) or []
        if len(items) == 1:
            state[single] = items[0]
        elif items:
            state[several] = list(items)
    state["lightning"] = {k: v for k, v in ckpt.items() if k not in _LIGHTNING_MOVED}
    return Source("lightning", path, state, metadata)


def _read_hf(path: str, trust_pickle: bool, native: bool, progress: Progress, detected: bool) -> Source:
    present = set(os.listdir(path))
    state: dict[str, Any] = {}
    skipped: list[str] = []
    model = _read_hf_weights(path, present, trust_pickle=trust_pickle, progress=progress)
    if model is not None:
        state["model"] = model
    for filename, key in _HF_FILES.items():
        if filename in present:
            progress(f"loading {filename}")
            state[key] = _plain(load_torch_file(os.path.join(path, filename), trust_pickle=trust_pickle))
    rng_files = sorted(f for f in present if f.startswith("rng_state") and f.endswith(".pth"))
    rngs = []
    for filename in rng_files:
        progress(f"loading {filename}")
        raw = _plain(load_torch_file(os.path.join(path, filename), trust_pickle=trust_pickle))
        rngs.append(raw if native else _hf_rng(raw))
    if len(rngs) == 1:
        state["rng_state" if native else "rng"] = rngs[0]
    elif rngs:
        state["rng_state_per_rank" if native else "rng_per_rank"] = rngs
    for filename, key in (
        (_HF_STATE, "trainer_state"),
        ("config.json", "config"),
        ("generation_config.json", "generation_config"),
    ):
        if filename in present:
            state[key] = _read_json(os.path.join(path, filename))
    used = {*_HF_FILES, *_HF_WEIGHTS, *rng_files, _HF_STATE, "config.json", "generation_config.json"}
    used |= set(_weight_shards(path, present))
    for filename in sorted(present - used):
        skipped.append(f"{filename}: {_HF_SKIPPED.get(filename, 'not part of the training state')}")
    if not state:
        raise UnsupportedFormatError(f"{path}: no Hugging Face Trainer files found")
    return Source("hf-trainer", path, state, _hf_metadata(state.get("trainer_state")), skipped)


def _weight_shards(path: str, present: set[str]) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in present:
            weight_map = _read_json(os.path.join(path, index)).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CorruptCheckpointError(f"{os.path.join(path, index)}: no 'weight_map' object")
            return sorted({check_name(f, where=os.path.join(path, index)) for f in weight_map.values()})
    return []


def _read_hf_weights(path: str, present: set[str], *, trust_pickle: bool, progress: Progress) -> dict[str, Any] | None:
    import safetensors.torch

    shards = _weight_shards(path, present)
    if not shards:
        shards = [str(f) for f in ("model.safetensors", "pytorch_model.bin") if f in present][:1]
    if not shards:
        return None
    weights: dict[str, Any] = {}
    for shard in shards:
        full = os.path.join(path, shard)
        progress(f"loading {shard}")
        if not os.path.isfile(full):
            raise CheckpointNotFoundError(f"{full}: listed in the weight index but missing")
        if shard.endswith(".safetensors"):
            try:
                weights.update(safetensors.torch.load_file(full, device="cpu"))
            except Exception as exc:
                raise CorruptCheckpointError(f"{full}: not a readable safetensors file ({_first_line(exc)})") from exc
        else:
            loaded = load_torch_file(full, trust_pickle=trust_pickle)
            if not isinstance(loaded, Mapping):
                raise CorruptCheckpointError(f"{full}: expected a state dict, found {type(loaded).__name__}")
            weights.update(loaded)
    return weights


def _hf_rng(raw: Any) -> Any:
    """HF's ``rng_state.pth`` keys (python/numpy/cpu/cuda) -> the layout `trainstate.RNGState` restores."""
    if not isinstance(raw, dict) or not {"python", "numpy", "cpu"} <= set(raw):
        return raw
    out = {"python": raw["python"], "numpy": raw["numpy"], "torch": raw["cpu"]}
    if "cuda" in raw:
        out["cuda"] = [raw["cuda"]] if isinstance(raw["cuda"], torch.Tensor) else list(raw["cuda"])
    out.update({k: v for k, v in raw.items() if k not in ("python", "numpy", "cpu", "cuda")})
    return out


def _hf_metadata(trainer_state: Any) -> dict[str, Any]:
    if not isinstance(trainer_state, dict):
        return {}
    meta: dict[str, Any] = {}
    if type(trainer_state.get("global_step")) is int:
        meta["step"] = trainer_state["global_step"]
    if isinstance(trainer_state.get("epoch"), (int, float)):
        meta["epoch"] = trainer_state["epoch"]
    metrics: dict[str, float] = {}
    for entry in trainer_state.get("log_history") or []:
        if isinstance(entry, dict) and entry.get("step") == meta.get("step"):
            metrics.update(
                {k: float(v) for k, v in entry.items() if k not in ("step", "epoch") and _number(v) is not None}
            )
    if metrics:
        meta["metrics"] = metrics
    return meta


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({_first_line(exc)})") from exc


# ------------------------------------------------------------------------------------------ DCP
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


def _read_dcp(path: str, trust_pickle: bool, native: bool, progress: Progress, detected: bool) -> Source:
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


_READERS: dict[str, Callable[[str, bool, bool, Progress, bool], Source]] = {
    "torch": _read_file,
    "lightning": _read_lightning,
    "hf-trainer": _read_hf,
    "dcp": _read_dcp,
}


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


# ---------------------------------------------------------------------------------- conversions
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
) -> Source:
    """Convert a foreign checkpoint at ``src`` into a trainstate checkpoint directory at ``dst``.

    ``exclude`` drops entries by dotted key-path glob (e.g. ``"lightning.callbacks"``). Returns
    the `Source` that was written (its ``state`` after exclusion). See `read_source` for the rest.

    Example:
        >>> import torch, trainstate
        >>> torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, "/tmp/ts-doc-src.pt")
        >>> _ = to_trainstate("/tmp/ts-doc-src.pt", "/tmp/ts-doc-converted", overwrite=True)
        >>> trainstate.load("/tmp/ts-doc-converted")["epoch"]
        3
    """
    target = local_path(dst)
    if os.path.lexists(target) and not overwrite:
        raise CheckpointExistsError(f"{target}: already exists (pass overwrite=True, CLI: --force, to replace it)")
    source = read_source(src, kind=kind, trust_pickle=trust_pickle, native=native, progress=progress)
    source.state = _drop(source.state, exclude)
    metadata = {**source.metadata, "source": {"kind": source.kind, "path": source.path, "native": native}}
    if "wrapped" in metadata:
        metadata["source"]["wrapped"] = metadata.pop("wrapped")
    if progress:
        progress(f"writing {target}")
    save(target, source.state, metadata=metadata, overwrite=overwrite)
    return source


def to_torch_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False, verify: bool = True
) -> Any:
    """Write the trainstate checkpoint ``src`` as one ``torch.save`` file at ``dst`` (atomically).

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
    with CheckpointReader(*split_path(src)) as reader:
        metadata = reader.metadata()
    state = load(src, verify=verify)
    source = metadata.get("source") if isinstance(metadata, dict) else None
    wrapped = source.get("wrapped") if isinstance(source, dict) else None
    obj = state[wrapped] if isinstance(wrapped, str) and wrapped in state else state
    with atomic_write_file(target) as f:
        torch.save(obj, f)
    return obj
