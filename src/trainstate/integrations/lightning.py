"""PyTorch Lightning: trainstate checkpoints (atomic, verified, pickle-free) and a bit-exact mid-epoch resume."""

from __future__ import annotations

import logging
import os
import re
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

try:
    import pytorch_lightning as pl
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "trainstate.integrations.lightning needs PyTorch Lightning: pip install 'trainstate[lightning]'"
    ) from exc

import torch

from trainstate.api import load, plan_state
from trainstate.data import ResumableSampler
from trainstate.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsupportedValueError,
)
from trainstate.format.loader import MapLocation
from trainstate.format.writer import execute_save
from trainstate.loaders import is_stateful_loader, loader_state, restore_loader
from trainstate.rng import RNGState
from trainstate.storage import MANIFEST_NAME, StorageOptions, split_path

__all__ = ["ExactResume", "TrainstateCheckpointIO"]

logger = logging.getLogger(__name__)

_STAGED = ".trainstate-staged"
"""Suffix of the hidden sibling where a checkpoint that replaces a symlink is written first."""
_METADATA = {"global_step": "step", "epoch": "epoch"}
"""Checkpoint entries copied into the manifest's metadata (what `trainstate ls` shows), and their names there."""
_warned: weakref.WeakSet[Any] = weakref.WeakSet()  # loaders already warned about


class TrainstateCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that writes each checkpoint as a trainstate checkpoint directory.

    Lightning builds the checkpoint dict (weights, optimizer and scheduler states, loops, callbacks,
    hyper-parameters) and applies the loaded one itself; this plugin only stores it: at the ``.ckpt``
    path Lightning names there is a directory of safetensors files and a manifest, committed
    atomically (a killed save leaves the previous checkpoint as it was), hashed and verified on load,
    with nothing pickled. ``ModelCheckpoint`` (top-k, ``save_last=True`` or ``"link"``) and
    ``Trainer.fit(ckpt_path="last")`` work unchanged; ``trainstate ls/verify`` read the directory.

    Args:
        allow_pickle: Pickle values trainstate has no safe encoding for (an arbitrary object among
            the hyper-parameters) instead of raising; loading them then needs this plugin with
            ``allow_pickle=True`` too.
        verify: Check every file's hash on load (on by default).
        fallback: When a *last* checkpoint (``last.ckpt``, ``last-v1.ckpt``: what
            ``fit(ckpt_path="last")`` resumes from) is damaged, load the newest other checkpoint of its
            directory that verifies, with a warning naming each one skipped. Other paths never fall back.

    Example:
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.callbacks import ModelCheckpoint
        >>> from trainstate.integrations.lightning import ExactResume, TrainstateCheckpointIO
        >>> trainer = pl.Trainer(
        ...     plugins=[TrainstateCheckpointIO()],
        ...     callbacks=[ModelCheckpoint(dirpath="/tmp/ts-doc/pl", save_last=True), ExactResume()],
        ...     accelerator="cpu", logger=False, enable_progress_bar=False,
        ... )
        >>> type(trainer.strategy.checkpoint_io).__name__
        'TrainstateCheckpointIO'
    """

    def __init__(self, *, allow_pickle: bool = False, verify: bool = True, fallback: bool = True) -> None:
        for name, value in (("allow_pickle", allow_pickle), ("verify", verify), ("fallback", fallback)):
            if not isinstance(value, bool):
                raise TypeError(f"TrainstateCheckpointIO({name}={value!r}): pass True or False")
        self.allow_pickle = allow_pickle
        self.verify = verify
        self.fallback = fallback

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` as a trainstate checkpoint at ``path``, replacing one there atomically.

        A symlink at ``path`` (``save_last="link"``) is replaced by the checkpoint; its target is
        left alone. ``storage_options`` are the fsspec options of a URL ``path``.
        """
        text = os.fspath(path)
        metadata = {name: checkpoint[key] for key, name in _METADATA.items() if type(checkpoint.get(key)) is int}
        try:
            if os.path.islink(text):
                self._replace_link(checkpoint, text, metadata)
            else:
                _save_alone(
                    text, checkpoint, metadata=metadata, allow_pickle=self.allow_pickle, options=storage_options
                )
        except UnsupportedValueError as exc:
            raise UnsupportedValueError(
                f"{exc}; in a Lightning checkpoint this is usually a hyper-parameter: leave it out with "
                "self.save_hyperparameters(ignore=[...]), or pickle it with TrainstateCheckpointIO(allow_pickle=True)"
            ) from exc

    def _replace_link(self, checkpoint: dict[str, Any], path: str, metadata: dict[str, Any]) -> None:
        # ModelCheckpoint(save_last="link") saves a full checkpoint at the link when this process has
        # not saved a top-k one yet (a resumed run): written beside it first, then swapped in by two
        # renames, so the link's target is never touched and "last" is missing for microseconds at most.
        staged = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{_STAGED}")
        _save_alone(staged, checkpoint, metadata=metadata, allow_pickle=self.allow_pickle, options=None)
        aside = f"{staged}.link"
        try:
            os.replace(path, aside)
            os.rename(staged, path)
            os.unlink(aside)
            _fsync_directory(os.path.dirname(path))
        except OSError as exc:
            raise CheckpointWriteError(
                f"{path}: replacing the symlink by the checkpoint written at {staged} failed: {exc}"
            ) from exc

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: MapLocation = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict saved at ``path``, every file verified; tensors on the CPU unless
        ``map_location`` says otherwise (as Lightning's own ``TorchCheckpointIO``).

        ``weights_only`` is accepted and has nothing to do: nothing is ever unpickled, unless the
        checkpoint was saved with ``allow_pickle=True`` and this plugin allows it too.
        Raises `trainstate.CheckpointError` subclasses naming the file (a damaged last checkpoint
        falls back, see ``fallback``).
        """
        text = os.fspath(path)
        try:
            return self._load(text, map_location)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            if os.path.isfile(text):
                raise CheckpointNotFoundError(
                    f"{text}: a file, not a trainstate checkpoint directory (a torch.save checkpoint of Lightning's "
                    "own TorchCheckpointIO?); convert it once with `trainstate convert --native "
                    f"{text} NEW.ckpt`, or load it without TrainstateCheckpointIO"
                ) from exc
            if not (self.fallback and os.path.lexists(text) and _is_last(text)):
                raise
            return self._fall_back(text, map_location, exc)

    def _load(self, path: str, map_location: MapLocation) -> dict[str, Any]:
        where = "cpu" if map_location is None else map_location
        return load(path, map_location=where, verify=self.verify, allow_pickle=self.allow_pickle)

    def _fall_back(self, path: str, map_location: MapLocation, error: CheckpointError) -> dict[str, Any]:
        """The newest checkpoint beside the damaged ``path`` that loads and verifies."""
        directory = os.path.dirname(os.path.abspath(path))
        damaged = os.path.realpath(path)
        candidates = []
        with os.scandir(directory) as entries:
            for entry in entries:  # hidden ones are leftovers of killed writers (and their temporaries)
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                if os.path.realpath(entry.path) != damaged and os.path.isfile(os.path.join(entry.path, MANIFEST_NAME)):
                    candidates.append((entry.stat(follow_symlinks=False).st_mtime, entry.path))
        skipped = [f"{path} ({error})"]
        for _, candidate in sorted(candidates, reverse=True):  # newest first, as Lightning orders "last"
            try:
                checkpoint = self._load(candidate, map_location)
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                skipped.append(f"{candidate} ({exc})")
                continue
            logger.warning(
                "%s is damaged; resuming from %s, the newest checkpoint beside it that verifies (skipped: %s)%s",
                path,
                candidate,
                "; ".join(skipped),
                _set_aside(path),
            )
            return checkpoint
        raise CorruptCheckpointError(
            f"{path}: damaged, and no other checkpoint in {directory} verifies either (tried: {'; '.join(skipped)})"
        ) from error

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove the trainstate checkpoint at ``path`` (renamed away first, so it disappears at once).

        A symlink is removed, never its target. Anything else (a ``torch.save`` file, a directory that
        is not a trainstate checkpoint) is left in place with a warning; a missing path is a no-op.
        """
        text = os.fspath(path)
        storage, name = split_path(text)
        if not storage.exists(name):
            return
        if os.path.islink(text) or storage.exists(name, MANIFEST_NAME):
            storage.delete(name)
            logger.debug("removed checkpoint %s", text)
            return
        logger.warning("%s: not a trainstate checkpoint, so it was not removed; delete it yourself if unneeded", text)


class ExactResume(Callback):
    """Makes ``Trainer.fit(ckpt_path=...)`` continue bit for bit where the checkpoint was taken, mid-epoch too.

    Lightning saves weights, optimizers, schedulers, loop counters and a ``StatefulDataLoader``'s
    position, but not the global RNG streams (dropout, random batches, augmentations in the main
    process) nor the position of a plain ``DataLoader``. This callback adds to every checkpoint the
    python/numpy/torch (and CUDA) RNG states (`trainstate.RNGState`), each torchdata
    ``StatefulDataLoader``'s generators, and the position of each training ``DataLoader`` whose
    sampler is a `trainstate.ResumableSampler` (with the loader's generator). It puts them back
    when training starts, after Lightning has created the loaders' iterators (which draws from the
    RNGs), so that the first resumed batch and every random draw after it are the uninterrupted
    run's. A training loader that cannot resume mid-epoch gets one warning, at the first save,
    naming it. Works with any ``CheckpointIO``: the values are tensors and plain data.

    Example:
        >>> import pytorch_lightning as pl
        >>> from pytorch_lightning.callbacks import ModelCheckpoint
        >>> from trainstate.integrations.lightning import ExactResume, TrainstateCheckpointIO
        >>> checkpoints = ModelCheckpoint(dirpath="/tmp/ts-doc/pl", every_n_train_steps=50, save_last=True)
        >>> trainer = pl.Trainer(plugins=[TrainstateCheckpointIO()], callbacks=[checkpoints, ExactResume()],
        ...                      accelerator="cpu", logger=False, enable_progress_bar=False)
        >>> # trainer.fit(model, loader, ckpt_path="last")  # a fresh start the first time, a resume after
    """

    def __init__(self) -> None:
        self._trainer: weakref.ReferenceType[pl.Trainer] | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = weakref.ref(trainer)  # Callback.state_dict() is not handed the trainer
        if trainer.world_size > 1 and trainer.is_global_zero:
            warnings.warn(
                f"ExactResume: {trainer.world_size} processes; Lightning saves rank 0's checkpoint only, so every "
                "rank resumes with rank 0's RNG streams: the resume is exact for a single process only",
                stacklevel=2,
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None  # restored by a fit that never began training: not for a later fit

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:  # saved outside a fit (Trainer.save_checkpoint before one): no loader known
            return {"rng": _rng_state(), "loaders": None, "epoch": 0, "epoch_over": False}
        loaders = _train_loaders(trainer)
        return {
            "rng": _rng_state(),
            "loaders": [_loader_position(loader, f"train_dataloader[{i}]") for i, loader in enumerate(loaders)],
            "epoch": trainer.current_epoch,
            "epoch_over": bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or not {"rng", "loaders", "epoch", "epoch_over"} <= set(state_dict):
            raise StateMismatchError(
                f"checkpoint['callbacks']['{self.state_key}']: not an ExactResume state (keys "
                f"{sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__})"
            )
        self._pending = dict(state_dict)  # applied at on_train_start, once the loaders exist

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        loaders, positions = _train_loaders(trainer), state["loaders"]
        if positions is None:
            positions = [{} for _ in loaders]
        where = f"checkpoint['callbacks']['{self.state_key}']['loaders']"
        if len(positions) != len(loaders):
            raise StateMismatchError(
                f"{where}: saved with {len(positions)} training loader(s), this run has {len(loaders)}; "
                "train on the same loaders to resume exactly"
            )
        # Saved after an epoch's last batch, each loader is set where it is when the next epoch begins.
        # Lightning resumes such a checkpoint either still in the saved epoch (one of on_validation_end),
        # which it finishes before creating the next epoch's iterators itself, or already in the next
        # epoch (on_train_batch_end, on_train_epoch_end), whose iterators it then never creates
        # (FitLoop.reset, TrainingEpochLoop.on_run_start): they are created here, once the RNGs are back.
        epoch_over = bool(state["epoch_over"])
        for i, (loader, position) in enumerate(zip(loaders, positions, strict=True)):
            _restore_position(loader, position, epoch_over=epoch_over, where=f"{where}[{i}]")
        fetcher = trainer.fit_loop._data_fetcher if any(positions) else None
        if fetcher is not None and not epoch_over:
            # Lightning created the iterators before this hook (FitLoop.setup_data), a multi-process
            # loader already pulling indices from its sampler as it was: start them again from the
            # restored positions (a StatefulDataLoader hands over the iterator restore_loader built).
            iter(fetcher)
        for loader, position in zip(loaders, positions, strict=True):
            if "generator" in position and isinstance(getattr(loader, "generator", None), torch.Generator):
                loader.generator.set_state(position["generator"])  # where it was, after its epoch's draws
        RNGState().load_state_dict(_with_numpy_keys(state["rng"]))
        if fetcher is not None and epoch_over and trainer.current_epoch > state["epoch"]:
            iter(fetcher)  # drawing from the generators and RNGs as the start of that epoch did


def _save_alone(
    path: str, state: Mapping[str, Any], *, metadata: dict[str, Any], allow_pickle: bool, options: StorageOptions | None
) -> None:
    """`trainstate.save` by this process alone. Lightning calls the plugin on global rank 0 only and
    hands it the whole state, so under DDP this must not be the collective save `trainstate.save`
    makes in an initialized process group (the other ranks would never join it)."""
    storage, name = split_path(path, options)
    storage.cleanup()  # temporaries of a writer killed mid-save
    plan = plan_state(state, metadata=metadata, allow_pickle=allow_pickle, where=storage.where(name))
    execute_save(plan, storage.begin(name, overwrite=True))


def _set_aside(path: str) -> str:
    """Move a damaged last checkpoint that the next save could not replace (a directory without a
    manifest is not known to be a checkpoint) into ``trainstate-quarantine/``; say what happened."""
    storage, name = split_path(path)
    if os.path.islink(path) or storage.exists(name, MANIFEST_NAME):
        return "; it is left in place"
    return f"; it was moved to {os.path.join(os.path.dirname(path), storage.quarantine(name))} (nothing is deleted)"


def _rng_state() -> dict[str, Any]:
    """`RNGState`'s state with numpy's key array as a tensor: plain tensors and Python values only, which
    Lightning's own ``TorchCheckpointIO`` loads with ``torch.load(weights_only=True)`` too."""
    state = RNGState().state_dict()
    kind, keys, *rest = state["numpy"]
    state["numpy"] = (kind, torch.from_numpy(keys.copy()), *rest)
    return state


def _with_numpy_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    kind, keys, *rest = state["numpy"]
    return {**state, "numpy": (kind, keys.numpy() if isinstance(keys, torch.Tensor) else keys, *rest)}


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_last(path: str) -> bool:
    """Whether ``path`` is named as ModelCheckpoint names last checkpoints (the test of
    ``ModelCheckpoint._find_last_checkpoints``, which ``fit(ckpt_path="last")`` chooses among)."""
    stem, suffix = os.path.splitext(os.path.basename(os.path.abspath(path)))
    pattern = rf"^{ModelCheckpoint.CHECKPOINT_NAME_LAST}(-(\d+))?"
    return suffix == ModelCheckpoint.FILE_EXTENSION and re.match(pattern, stem) is not None


def _train_loaders(trainer: pl.Trainer) -> list[Any]:
    """The training loaders, flattened as Lightning's CombinedLoader orders them (its state order)."""
    combined = trainer.fit_loop._combined_loader
    return [] if combined is None else list(combined.flattened)


def _resumable_sampler(loader: Any) -> ResumableSampler | None:
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, ResumableSampler):
            return sampler
    return None


def _loader_position(loader: Any, key: str) -> dict[str, Any]:
    """What resumes ``loader`` mid-epoch: a StatefulDataLoader's state with its generators, or a
    ResumableSampler's position and the loader's generator; else nothing (warned once)."""
    if is_stateful_loader(loader):
        return {"loader": loader_state(loader, key)}  # warns itself about set-ups that cannot be exact
    sampler = _resumable_sampler(loader)
    if sampler is not None:
        position: dict[str, Any] = {"sampler": sampler.state_dict()}
        if isinstance(getattr(loader, "generator", None), torch.Generator):
            position["generator"] = loader.generator.get_state()
        return position
    if loader not in _warned:
        _warned.add(loader)
        sampler_name = type(getattr(loader, "sampler", None)).__name__
        warnings.warn(
            f"{key} ({type(loader).__name__} with {sampler_name}) has no saved position: a resume from a checkpoint "
            "taken mid-epoch does not continue that epoch's order; use a torchdata StatefulDataLoader, or "
            "DataLoader(sampler=trainstate.ResumableSampler(dataset), generator=torch.Generator())",
            stacklevel=3,
        )
    return {}


def _restore_position(loader: Any, position: Mapping[str, Any], *, epoch_over: bool, where: str) -> None:
    """Put ``loader`` back where `_loader_position` found it, or at the next epoch's start if ``epoch_over``."""
    if "loader" in position:
        _expect(is_stateful_loader(loader), "a torchdata StatefulDataLoader", where)
        restore_loader(loader, position["loader"])  # its iterator rebuilt now, RNG-neutrally
        if epoch_over:  # spent: the next iter() starts the next epoch, as it would have (torchdata's __iter__)
            loader._iterator._finished, loader._initial_iter_for_state_dict = True, False
    elif "sampler" in position:
        sampler = _resumable_sampler(loader)
        _expect(sampler is not None, "a DataLoader with a trainstate.ResumableSampler", where)
        assert sampler is not None
        saved = dict(position["sampler"])
        if epoch_over and saved["consumed"]:  # as a new iteration of the sampler would go on
            saved.update(epoch=saved["epoch"] + 1, consumed=0)
        sampler.load_state_dict(saved)


def _expect(found: bool, what: str, where: str) -> None:
    if not found:
        raise StateMismatchError(
            f"{where}: saved from {what}, but that training loader of this run is not one; "
            "set the loaders up as in the run that saved the checkpoint"
        )
