"""Hugging Face ``Trainer`` checkpoints as trainstate checkpoints: atomic, verified, pickle-free, resumed exactly."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

try:
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import DataCollatorForPermutationLanguageModeling, Trainer
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, TrainOutput
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "trainstate.integrations.transformers needs Hugging Face transformers and accelerate: "
        "pip install 'trainstate[transformers]'"
    ) from exc

import torch

from trainstate.api import load, peek, save
from trainstate.convert.hf_trainer import trainer_metadata
from trainstate.errors import (
    CheckpointLockedError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsupportedFormatError,
)
from trainstate.rng import RNGState
from trainstate.storage import MANIFEST_NAME, atomic_write_file, open_storage

__all__ = ["TrainstateMixin", "TrainstateTrainer"]

logger = logging.getLogger(__name__)

_CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")  # what transformers' get_last_checkpoint matches
_RESUMABLE = ("optimizer", "scheduler", "scaler", "rng")  # restored later than the model, when HF's hooks run
_DAMAGE = (CorruptCheckpointError, UnsupportedFormatError, CheckpointNotFoundError)  # skipped on resume

if TYPE_CHECKING:
    _TrainerBase = Trainer
else:
    _TrainerBase = object


@dataclasses.dataclass
class _Resume:
    """A verified checkpoint being resumed: the model is restored already; the rest waits for its hook."""

    path: str
    model: torch.nn.Module
    pending: dict[str, Any]


class TrainstateMixin(_TrainerBase):
    """Makes a ``Trainer`` (or a subclass: ``Seq2SeqTrainer``, TRL's ``SFTTrainer``...) checkpoint through trainstate.

    Every save writes ``output_dir/checkpoint-N`` as one trainstate checkpoint, committed atomically
    (a kill mid-save leaves the previous checkpoints as they were): model, optimizer, LR scheduler,
    gradient scaler, RNG streams (`RNGState`), the ``TrainerState`` and the model config, in safetensors
    files and a JSON manifest; no pickle. ``trainer_state.json`` is written beside it for the tools
    that read it (and rewritten from the manifest on resume if it is missing or differs).
    ``save_total_limit`` keeps HF's meaning (newest and best kept); old checkpoints are removed
    atomically. ``train(resume_from_checkpoint=True)`` resumes from the newest checkpoint that verifies:
    damaged or foreign newer ones are skipped with a warning naming each and moved aside into
    ``output_dir/trainstate-quarantine/``. A path resumes from that checkpoint (a native Trainer
    checkpoint directory still resumes the native way). ``load_best_model_at_end`` loads from them too.

    Single process only (CPU or one accelerator): DDP, FSDP and DeepSpeed runs are refused.

    Example:
        Put the mixin first, so that its methods take precedence::

            from transformers import Seq2SeqTrainer
            from trainstate.integrations.transformers import TrainstateMixin

            class MyTrainer(TrainstateMixin, Seq2SeqTrainer):
                pass

            trainer = MyTrainer(model=model, args=args, train_dataset=data)
            trainer.train(resume_from_checkpoint=get_last_checkpoint(args.output_dir) is not None)
    """

    _trainstate_resume: _Resume | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"{type(self).__name__}: trainstate checkpoints of a Trainer run are single-process for now "
                f"(world_size={self.args.world_size}, deepspeed={self.is_deepspeed_enabled}, "
                f"fsdp={self.is_fsdp_enabled}); use the plain Trainer and its checkpoints for DDP, FSDP and DeepSpeed"
            )

    # ----------------------------------------------------------------- resume
    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """``Trainer.train``; ``resume_from_checkpoint=True`` takes the newest checkpoint that verifies."""
        self._trainstate_resume = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self._newest_verified(self._get_output_dir(trial=trial))
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)) and _is_trainstate(resume_from_checkpoint):
            resume_from_checkpoint = self._open(os.fspath(resume_from_checkpoint))
        try:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        finally:
            self._trainstate_resume = None  # the saved states are applied by now; free what is left

    def _newest_verified(self, run_dir: str) -> str:
        """Open the newest ``checkpoint-N`` of ``run_dir`` that verifies; the newer ones that do not
        are moved aside, so that saves and rotation go on as if they had never been written."""
        storage = open_storage(run_dir)
        storage.cleanup()  # leftovers of a save that was killed
        skipped: list[str] = []
        for name in reversed(_checkpoints(run_dir)):
            path = os.path.join(run_dir, name)
            try:
                if not _is_trainstate(path):
                    raise UnsupportedFormatError(
                        f"{path}: no {MANIFEST_NAME}, so not a trainstate checkpoint (a native Trainer checkpoint, or "
                        "damaged); pass its path as resume_from_checkpoint to resume from a native one"
                    )
                chosen = self._open(path)
            except _DAMAGE as exc:
                logger.warning("%s: skipping %s on resume: %s", run_dir, name, exc)
                skipped.append(name)
                continue
            _move_aside(run_dir, skipped)
            return chosen
        raise CheckpointNotFoundError(
            f"{run_dir}: no {PREFIX_CHECKPOINT_DIR}-N here verifies (skipped: {', '.join(skipped) or 'none'}); "
            "pass resume_from_checkpoint=None to start afresh"
        )

    def _open(self, path: str) -> str:
        """Restore the model from the checkpoint at ``path`` (every file verified before a byte lands in
        it) and keep the other saved states, read and verified in the same pass, for their hooks.

        Restoring the model before ``Trainer.train`` runs is what it would do itself a little later: in
        between it only rebuilds the model (``model_init``: `_load_from_checkpoint` restores that one
        too), patches forwards (Liger, NEFTune) and aligns the config's special token ids."""
        model = self.model
        if model is None:
            raise ValueError(f"{type(self).__name__}: no model to resume {path} into; pass model= or model_init=")
        found = peek(path)
        if not isinstance(found.state.get("trainer_state"), dict) or "model" not in found.state:
            raise UnsupportedFormatError(
                f"{path}: not a checkpoint of a TrainstateTrainer (it has no 'model' and 'trainer_state' entries)"
            )
        loaded = load(path, {"model": model, "trainer_state": None, **dict.fromkeys(_RESUMABLE)})
        _mirror_trainer_state(path, loaded["trainer_state"], repair=True)
        pending = {key: loaded[key] for key in _RESUMABLE if loaded.get(key) is not None}
        self._trainstate_resume = _Resume(path, model, pending)
        logger.info("%s: resuming from it (step %s)", path, found.step)
        collator = self.data_collator
        if isinstance(collator, DataCollatorForPermutationLanguageModeling) or getattr(collator, "mlm", False):
            logger.warning(
                "%s: %s draws from the global RNG as batches are prefetched, before Trainer restores the RNG: the "
                "resumed run masks (and drops out) differently from an uninterrupted one; it is not bit-exact",
                path,
                type(collator).__name__,
            )
        return path

    def _resumed(self, checkpoint: str | None) -> _Resume | None:
        resume = self._trainstate_resume
        return resume if resume is not None and checkpoint == resume.path else None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        resume = self._resumed(resume_from_checkpoint)
        if resume is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        model = self.model if model is None else model
        if model is not resume.model:  # ``model_init`` built a new model after the checkpoint was opened
            load(resume.path, {"model": model})

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        resume = self._resumed(checkpoint)
        if resume is None:
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        _apply(resume, "optimizer", self.optimizer)
        _apply(resume, "scheduler", self.lr_scheduler)

    def _load_scaler(self, checkpoint: str | None) -> None:
        resume = self._resumed(checkpoint)
        if resume is None:
            super()._load_scaler(checkpoint)
            return
        _apply(resume, "scaler", getattr(self.accelerator, "scaler", None))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # Called by Trainer where the interrupted run drew its next random number: at the start of an
        # epoch, or after the resumed epoch's first batch was fetched (the skipped ones draw nothing).
        resume = self._resumed(checkpoint)
        if resume is None:
            super()._load_rng_state(checkpoint)
            return
        _apply(resume, "rng", RNGState())

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not _is_trainstate(best):
            super()._load_best_model()
            return
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        load(best, {"model": self.model})

    # ------------------------------------------------------------------- save
    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # The bookkeeping of transformers 5.24 Trainer._save_checkpoint, around one atomic trainstate save.
        run_dir = self._get_output_dir(trial=trial)
        path = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        best_step = self.state.best_global_step
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if best == path or os.path.exists(best):  # this save is committed with the state naming it
                self.state.best_model_checkpoint = best
        exports: dict[str, Any] = self.state.stateful_callbacks  # type: ignore[assignment]  # a dict by now
        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):
                name, exported = type(callback).__name__, callback.state()
                if isinstance(exports[name], list):
                    exports[name].append(exported)
                else:
                    exports[name] = exported
        trainer_state = dataclasses.asdict(self.state)
        state: dict[str, Any] = {"model": self.model, "trainer_state": trainer_state}
        config = getattr(self.model, "config", None)
        if callable(getattr(config, "to_json_string", None)):
            state["config"] = json.loads(config.to_json_string(use_diff=False))  # type: ignore[union-attr]
        if not self.args.save_only_model:
            optimizer = self.optimizer  # saved as itself (AdamW...), restored through accelerate's wrapper
            if isinstance(optimizer, AcceleratedOptimizer):
                optimizer = optimizer.optimizer
            state.update(optimizer=optimizer, scheduler=self.lr_scheduler, rng=RNGState())
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
        save(path, state, metadata=trainer_metadata(trainer_state))
        _mirror_trainer_state(path, trainer_state)
        if self.args.push_to_hub:
            self._push_from_checkpoint(path)
        self._rotate(run_dir, os.path.basename(path))

    def _rotate(self, run_dir: str, newest: str) -> None:
        """``save_total_limit`` as transformers applies it (the checkpoint just saved and the best are
        always kept, the others go oldest step first), each removal atomic: a checkpoint is there whole
        or not at all."""
        limit = self.args.save_total_limit
        names = _checkpoints(run_dir)
        if not limit or limit <= 0 or len(names) <= limit:
            return
        protected = {newest}
        if self.state.best_model_checkpoint is not None:
            protected.add(os.path.basename(os.path.normpath(self.state.best_model_checkpoint)))
        excess = len(names) - max(limit, len(protected))
        storage = open_storage(run_dir)
        for name in names:
            if excess <= 0:
                break
            if name not in protected:
                logger.info("%s: removing %s (save_total_limit=%d)", run_dir, name, limit)
                storage.delete(name)
                excess -= 1


class TrainstateTrainer(TrainstateMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints are trainstate checkpoints (see `TrainstateMixin`).

    Example:
        A drop-in for ``Trainer``; a requeued job resumes where the killed one stopped::

            from transformers import TrainingArguments
            from transformers.trainer_utils import get_last_checkpoint
            from trainstate.integrations.transformers import TrainstateTrainer

            args = TrainingArguments(output_dir="runs/gpt", save_steps=500, save_total_limit=3)
            trainer = TrainstateTrainer(model=model, args=args, train_dataset=data)
            trainer.train(resume_from_checkpoint=get_last_checkpoint(args.output_dir) is not None)
    """


def _checkpoints(run_dir: str) -> list[str]:
    """Names of the ``checkpoint-N`` directories of ``run_dir``, oldest step first."""
    try:
        entries = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), name) for name in entries if (m := _CHECKPOINT_NAME.fullmatch(name))]
    return [name for _, name in sorted(found) if os.path.isdir(os.path.join(run_dir, name))]


def _is_trainstate(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST_NAME))


def _trainer_state_text(trainer_state: Mapping[str, Any]) -> str:
    return json.dumps(trainer_state, indent=2, sort_keys=True) + "\n"  # as TrainerState.save_to_json writes it


def _mirror_trainer_state(path: str, trainer_state: Mapping[str, Any], *, repair: bool = False) -> None:
    """Write ``trainer_state.json`` beside the checkpoint's files (Trainer reads it on resume); the
    manifest's copy is the one that counts, so on resume a missing or different file is rewritten."""
    target = os.path.join(path, TRAINER_STATE_NAME)
    text = _trainer_state_text(trainer_state)
    if repair:
        try:
            with open(target, encoding="utf-8") as f:
                if f.read() == text:
                    return
        except (FileNotFoundError, UnicodeDecodeError):
            pass
        logger.warning("%s: missing or not the checkpoint's own; rewritten from %s", target, MANIFEST_NAME)
    with atomic_write_file(target) as f:
        f.write(text.encode("utf-8"))


def _move_aside(run_dir: str, names: list[str]) -> None:
    """Quarantine ``names`` (kept for a post mortem; ``trainstate prune --quarantined`` removes them)."""
    if not names:
        return
    storage = open_storage(run_dir)
    try:
        storage.lock(timeout=0)
    except CheckpointLockedError:
        logger.warning("%s: cannot move %s aside: another writer holds the lock", run_dir, ", ".join(names))
        return
    try:
        for name in names:
            moved = storage.quarantine(name)
            logger.warning("%s: moved %s aside to %s", run_dir, name, moved)
    finally:
        storage.unlock()


def _apply(resume: _Resume, key: str, target: Any) -> None:
    """Hand the saved ``key`` state to the live ``target`` (once)."""
    saved = resume.pending.pop(key, None)
    if saved is None:
        if target is not None and key != "scaler":
            logger.warning(
                "%s: holds no %r state (saved with save_only_model=True?): it starts afresh", resume.path, key
            )
        return
    if target is None:
        logger.warning("%s: holds a %r state but this run has none: not restored", resume.path, key)
        return
    try:
        target.load_state_dict(saved)
    except Exception as exc:
        detail = f"{exc}".replace("\n", " ")
        raise StateMismatchError(
            f"{resume.path}: key {key!r}: {type(target).__name__}.load_state_dict rejected the saved state ({detail}); "
            "build the run as it was when saved (same model, optimizer groups, scheduler)"
        ) from exc
