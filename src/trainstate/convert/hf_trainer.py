"""Reading Hugging Face ``Trainer`` checkpoint directories."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from trainstate.convert.common import (
    Progress,
    ReadOptions,
    Source,
    SourceFormat,
    _first_line,
    _number,
    _plain,
    _read_json,
)
from trainstate.convert.unpickle import load_torch_file
from trainstate.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedFormatError,
)
from trainstate.storage import check_name

__all__ = ["HF_TRAINER", "trainer_metadata"]

logger = logging.getLogger(__name__)


_HF_STATE = "trainer_state.json"


_HF_FILES = {  # torch.save file -> key in the converted state
    "optimizer.pt": "optimizer",
    "scheduler.pt": "scheduler",
    "scaler.pt": "scaler",
}


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


_HF_SKIPPED = {"training_args.bin": "a pickled TrainingArguments object, not training state"}


def _read_hf(path: str, options: ReadOptions) -> Source:
    trust_pickle, native, progress = options.trust_pickle, options.native, options.progress
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
    return Source("hf-trainer", path, state, trainer_metadata(state.get("trainer_state")), skipped)


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


def trainer_metadata(trainer_state: Any) -> dict[str, Any]:
    """The step, epoch and last logged metrics of a ``TrainerState`` dict, as checkpoint metadata."""
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


def _is_hf(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in (_HF_STATE, *_HF_WEIGHTS))


HF_TRAINER = SourceFormat("hf-trainer", _is_hf, _read_hf)
