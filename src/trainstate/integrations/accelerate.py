"""Hugging Face Accelerate: ``save_state``/``load_state`` that write one atomic, pickle-free trainstate checkpoint."""

from __future__ import annotations

import glob
import logging
import os
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

try:
    from accelerate import Accelerator
    from accelerate.data_loader import SeedableRandomSampler, get_sampler
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler
    from accelerate.utils import DistributedType
except ImportError as exc:
    raise ImportError(
        "trainstate.integrations.accelerate needs Hugging Face Accelerate: pip install 'trainstate[accelerate]'"
    ) from exc

from torch.utils.data import RandomSampler

from trainstate.api import load, peek, save
from trainstate.data import ResumableSampler
from trainstate.errors import CheckpointNotFoundError, StateMismatchError
from trainstate.loaders import GENERATORS_KEY, loader_state, restore_loader
from trainstate.manager import CheckpointManager
from trainstate.rng import RNGState

__all__ = ["accelerator_state", "load_state", "save_state"]

logger = logging.getLogger(__name__)

_CHECKPOINTS_DIR = "checkpoints"
"""Where automatic checkpoint naming keeps checkpoints, under ``project_dir`` (as Accelerate does)."""

_GROUPS = ("models", "optimizers", "schedulers", "dataloaders", "custom")
_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed's engine checkpoints its model and optimizer itself",
    DistributedType.MEGATRON_LM: "Megatron-LM checkpoints its model, optimizer and scheduler itself",
    DistributedType.XLA: "XLA device state and RNG are not captured by trainstate",
}
_warned: weakref.WeakSet[Any] = weakref.WeakSet()


def accelerator_state(accelerator: Accelerator) -> dict[str, Any]:
    """Everything ``Accelerator.save_state`` saves, as a trainstate state of live objects.

    ``models``, ``optimizers``, ``schedulers``, ``dataloaders`` (epoch counter, seedable sampler,
    and with ``use_stateful_dataloader`` the position in the epoch) and ``custom`` (the objects of
    ``register_for_checkpointing``) map each object's index in the accelerator to it; beside them
    ``scaler`` (a GradScaler, if any), ``rng`` (`trainstate.RNGState`) and ``accelerator`` (its
    gradient-accumulation ``step``). Pass it to `trainstate.save`/`trainstate.load` or to a
    `CheckpointManager`, with entries of your own beside it.

    Example:
        >>> import torch, trainstate
        >>> from accelerate import Accelerator
        >>> from trainstate.integrations.accelerate import accelerator_state
        >>> accelerator = Accelerator(cpu=True)
        >>> model = accelerator.prepare(torch.nn.Linear(2, 2))
        >>> sorted(accelerator_state(accelerator))
        ['accelerator', 'custom', 'dataloaders', 'models', 'optimizers', 'rng', 'schedulers']
        >>> trainstate.save("/tmp/ts-doc/acc-state", {**accelerator_state(accelerator), "epoch": 3})
        >>> trainstate.load("/tmp/ts-doc/acc-state", accelerator_state(accelerator))["epoch"]
        3
    """
    _check_supported(accelerator)
    state: dict[str, Any] = {
        "models": dict(enumerate(accelerator._models)),
        "optimizers": {
            i: opt.optimizer if isinstance(opt, AcceleratedOptimizer) else opt
            for i, opt in enumerate(accelerator._optimizers)
        },
        "schedulers": {
            i: sched.scheduler if isinstance(sched, AcceleratedScheduler) else sched
            for i, sched in enumerate(accelerator._schedulers)
        },
        "dataloaders": {i: _LoaderPosition(accelerator, dl, i) for i, dl in enumerate(accelerator._dataloaders)},
        "custom": dict(enumerate(accelerator._custom_objects)),
        "rng": RNGState(),
        "accelerator": _Counters(accelerator),
    }
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    return state


def save_state(
    accelerator: Accelerator,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Save what ``accelerator.save_state`` saves as one atomic trainstate checkpoint; returns its path.

    With ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)`` the checkpoint
    goes to ``project_dir/checkpoints/step_<iteration>`` (a `CheckpointManager` directory), and only
    once it is committed are the oldest beyond the ``N`` newest deleted. Otherwise it goes to
    ``output_dir``, replacing a checkpoint there atomically. Either way
    ``accelerator.project_configuration.iteration`` then goes up by one, as with Accelerate. Under
    multi-process Accelerate every process calls it (the save is collective).

    Args:
        accelerator: The Accelerator whose prepared and registered objects are saved.
        output_dir: The checkpoint directory; leave it out with automatic checkpoint naming.
        metadata: JSON-like values stored in the manifest (read back by `trainstate.peek`).

    Example:
        >>> import torch
        >>> from accelerate import Accelerator
        >>> from trainstate.integrations.accelerate import load_state, save_state
        >>> accelerator = Accelerator(cpu=True)
        >>> model = accelerator.prepare(torch.nn.Linear(2, 2))
        >>> save_state(accelerator, "/tmp/ts-doc/acc-ckpt")
        '/tmp/ts-doc/acc-ckpt'
        >>> load_state(accelerator, "/tmp/ts-doc/acc-ckpt")
        '/tmp/ts-doc/acc-ckpt'
    """
    config = accelerator.project_configuration
    state = accelerator_state(accelerator)
    _warn_about_hooks(accelerator._save_model_state_pre_hook, "register_save_state_pre_hook")
    for position in state["dataloaders"].values():
        position.check(stacklevel=3)  # here, so that the warning names the caller's line
    if not config.automatic_checkpoint_naming:
        if output_dir is None:
            raise ValueError(
                "save_state: pass output_dir=..., or create the Accelerator with "
                "ProjectConfiguration(project_dir=..., automatic_checkpoint_naming=True)"
            )
        save(output_dir, state, metadata=metadata)
        config.iteration += 1
        return os.fspath(output_dir)
    if output_dir is not None:
        raise ValueError(
            f"save_state: output_dir={os.fspath(output_dir)!r} with automatic_checkpoint_naming=True, which saves "
            f"under {_checkpoints_dir(accelerator)!r}; leave output_dir out, or turn automatic naming off"
        )
    with _manager(accelerator) as manager:
        latest = manager.latest_step()
        if latest is not None and config.iteration <= latest:
            raise ValueError(
                f"{manager.directory}: iteration {config.iteration} is not after the newest checkpoint (iteration "
                f"{latest}); resume with load_state(accelerator), which sets project_configuration.iteration, or set "
                f"accelerator.project_configuration.iteration = {latest + 1}"
            )
        manager.save(config.iteration, state, metadata=metadata, force=True)
        path = manager.path(config.iteration)
    config.iteration += 1
    return path


def load_state(
    accelerator: Accelerator, input_dir: str | os.PathLike[str] | None = None, *, strict: bool = True
) -> str | None:
    """Restore what `save_state` saved into the accelerator's objects, in place; returns the path loaded.

    Without ``input_dir`` (automatic checkpoint naming) the newest checkpoint under
    ``project_dir/checkpoints`` that verifies is restored: damaged ones are skipped with a warning
    naming each (and moved aside), ``project_configuration.iteration`` is set to follow the one
    restored, and None is returned when there is none yet (a fresh start). Each byte is verified
    before anything lands in a live object.

    Args:
        accelerator: The Accelerator whose prepared and registered objects are restored: the same
            kinds and numbers of objects, in the same order, as when saved.
        input_dir: A checkpoint written by `save_state`; leave it out with automatic checkpoint naming.
        strict: Raise StateMismatchError when the saved objects do not match the live ones (counts,
            keys, shapes); with False, restore what fits and log a warning for the rest.

    Example:
        >>> import torch
        >>> from accelerate import Accelerator
        >>> from accelerate.utils import ProjectConfiguration
        >>> from trainstate.integrations.accelerate import load_state, save_state
        >>> config = ProjectConfiguration(project_dir="/tmp/ts-doc/acc-project", automatic_checkpoint_naming=True)
        >>> accelerator = Accelerator(cpu=True, project_config=config)
        >>> model = accelerator.prepare(torch.nn.Linear(2, 2))
        >>> start = load_state(accelerator)  # None on a fresh start
    """
    state = accelerator_state(accelerator)
    _warn_about_hooks(accelerator._load_model_state_pre_hook, "register_load_state_pre_hook")
    for position in state["dataloaders"].values():
        position.strict = strict
    if input_dir is not None:
        try:
            saved = peek(input_dir).state
        except CheckpointNotFoundError as exc:
            if glob.glob(os.path.join(glob.escape(os.fspath(input_dir)), "random_states_*.pkl")):
                raise CheckpointNotFoundError(
                    f"{exc}: it is a checkpoint of Accelerator.save_state (pickles); to convert it, restore it "
                    "once with accelerator.load_state (trusted files only) and save with save_state(accelerator, ...)"
                ) from exc
            raise
        _check_matches(saved, state, os.fspath(input_dir), strict=strict)
        load(input_dir, state, strict=strict)
        return os.fspath(input_dir)
    if not accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError(
            "load_state: pass input_dir=..., or create the Accelerator with "
            "ProjectConfiguration(project_dir=..., automatic_checkpoint_naming=True)"
        )
    with _manager(accelerator) as manager:
        newest = manager.peek()
        if newest is None:
            return None
        _check_matches(newest.state, state, newest.path, strict=strict)
        step = manager.restore(state, strict=strict)
        if step is None:
            return None
        accelerator.project_configuration.iteration = step + 1
        return manager.path(step)


class _Counters:
    """The Accelerator's own counter: ``step``, which gradient accumulation counts with."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        return {"step": int(self.accelerator.step)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accelerator.step = int(state["step"])


class _LoaderPosition:
    """What trainstate saves for a prepared data loader: the epoch its next iteration is (Accelerate's
    ``iteration``, from which it sets the sampler's epoch), a `SeedableRandomSampler`'s seed and
    epoch, and, backed by a ``StatefulDataLoader``, the position in the epoch."""

    def __init__(self, accelerator: Accelerator, loader: Any, index: int) -> None:
        self.accelerator = accelerator
        self.loader = loader
        self.key = f"dataloaders.{index}"
        self.strict = True  # load_state(strict=False) restores what fits of a loader set up otherwise

    def state_dict(self) -> dict[str, Any]:
        loader = self.loader
        state: dict[str, Any] = {}
        if hasattr(loader, "iteration"):
            # Saved on the epoch's last batch, the loop's next iteration is the next epoch; the loader
            # counts it only when the loop asks for the batch after the last one.
            state["iteration"] = int(loader.iteration) + int(self._iterating() and self._finished())
        sampler = get_sampler(loader)
        if isinstance(sampler, SeedableRandomSampler):
            state["sampler"] = {"epoch": int(sampler.epoch), "initial_seed": int(sampler.initial_seed)}
        if getattr(loader, "use_stateful_dataloader", False):
            state["loader"] = loader_state(loader, self.key)  # the batches handed to the loop, not prefetched
        self.check()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        loader = self.loader
        if "iteration" in state:
            loader.iteration = int(state["iteration"])
        problem = self.mismatch(state)
        if problem is not None and self.strict:
            raise StateMismatchError(problem)
        sampler = get_sampler(loader)
        if "sampler" in state and isinstance(sampler, SeedableRandomSampler):
            sampler.epoch = int(state["sampler"]["epoch"])
            sampler.initial_seed = int(state["sampler"]["initial_seed"])
        if "loader" in state and getattr(loader, "use_stateful_dataloader", False):
            restore_loader(loader.base_dataloader, state["loader"])  # rebuilt now, RNG-neutrally
            # What a save before the next batch must save (Accelerate refreshes it only at the next batch).
            loader.dl_state_dict = {k: v for k, v in state["loader"].items() if k != GENERATORS_KEY}

    def mismatch(self, state: Mapping[str, Any]) -> str | None:
        """Why ``state`` cannot be restored into this loader, or None."""
        if "sampler" in state and not isinstance(get_sampler(self.loader), SeedableRandomSampler):
            what, option = "a SeedableRandomSampler", "use_seedable_sampler=True"
        elif "loader" in state and not getattr(self.loader, "use_stateful_dataloader", False):
            what, option = "a StatefulDataLoader underneath", "use_stateful_dataloader=True"
        else:
            return None
        return (
            f"key {self.key!r}: saved from a loader with {what}, this one has none; create the Accelerator with "
            f"DataLoaderConfiguration({option}) as when it was saved"
        )

    def _iterating(self) -> bool:
        return self.loader in self.accelerator.gradient_state.dataloader_references

    def _finished(self) -> bool:
        return bool(getattr(self.loader, "end_of_dataloader", False))

    def check(self, stacklevel: int = 2) -> None:
        """Warn (once per loader) when saved mid-epoch in a set-up that cannot resume exactly by itself."""
        loader = self.loader
        if loader in _warned or not self._iterating() or self._finished():
            return
        sampler = get_sampler(loader)
        problem = None
        if type(sampler) is RandomSampler:
            problem = (
                "its sampler draws a new permutation when each epoch begins, so a resume mid-epoch reshuffles it; "
                "create the Accelerator with DataLoaderConfiguration(use_seedable_sampler=True)"
            )
        elif isinstance(sampler, ResumableSampler):
            problem = (
                "a trainstate.ResumableSampler counts the batch the prepared loader fetches ahead, so it resumes "
                "one batch late; use DataLoaderConfiguration(use_seedable_sampler=True, use_stateful_dataloader=True)"
            )
        elif not getattr(loader, "use_stateful_dataloader", False):
            problem = (
                "the position in the epoch is not saved; create the Accelerator with "
                "DataLoaderConfiguration(use_stateful_dataloader=True), or resume with accelerator.skip_first_batches "
                "from a DataLoader with generator=torch.Generator(), calling set_epoch(epoch) every epoch"
            )
        if problem is not None:
            _warned.add(loader)
            warnings.warn(
                f"{self.key}: saved mid-epoch, cannot resume exactly by itself: {problem}", stacklevel=stacklevel
            )


def _check_supported(accelerator: Accelerator) -> None:
    kind = accelerator.distributed_type
    reason = _UNSUPPORTED.get(kind)
    if reason is None and kind == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        reason = "FSDP1 wrappers are not supported (FSDP2, fsdp_version=2, is)"
    if reason is not None:
        raise ValueError(f"trainstate's Accelerate integration does not support {kind.value}: {reason}")
    if accelerator.num_processes > 1 and accelerator.project_configuration.save_on_each_node:
        raise ValueError(
            "save_on_each_node=True: trainstate writes one checkpoint that every process shares (a shared "
            "filesystem, or an object store); use ProjectConfiguration(save_on_each_node=False)"
        )


def _checkpoints_dir(accelerator: Accelerator) -> str:
    project_dir = accelerator.project_configuration.project_dir
    if project_dir is None:
        raise ValueError("automatic_checkpoint_naming=True needs ProjectConfiguration(project_dir=...)")
    return os.path.join(project_dir, _CHECKPOINTS_DIR)


def _manager(accelerator: Accelerator) -> CheckpointManager:
    limit = accelerator.project_configuration.total_limit
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ValueError(f"total_limit={limit!r}: keep at least the newest checkpoint (1), or None to keep all")
    return CheckpointManager(_checkpoints_dir(accelerator), keep_last=limit)


def _check_matches(saved: Mapping[str, Any], live: Mapping[str, Any], where: str, *, strict: bool) -> None:
    """Refuse, before anything is restored, a checkpoint of other numbers of models, optimizers... or
    of data loaders set up otherwise."""
    problems = []
    for group in _GROUPS:
        found = saved.get(group, {})
        found = found if isinstance(found, Mapping) else {}
        if len(found) != len(live[group]):
            problems.append(
                f"key {group!r}: the checkpoint holds {len(found)}, the accelerator has {len(live[group])}; "
                "prepare and register the same objects, in the same order, as when it was saved"
            )
    loaders = saved.get("dataloaders", {})
    for index, position in live["dataloaders"].items():
        found = loaders.get(index) if isinstance(loaders, Mapping) else None
        problem = position.mismatch(found) if isinstance(found, Mapping) else None
        problems += [problem] if problem else []
    if problems and strict:
        raise StateMismatchError(f"{where}: {problems[0]}")
    for problem in problems:
        logger.warning("%s: %s (strict=False: restoring what fits)", where, problem)


def _warn_about_hooks(hooks: Mapping[Any, Any], name: str) -> None:
    if hooks:
        logger.warning(
            "the accelerator has %d hook(s) from %s, which trainstate's save_state/load_state do not run: "
            "every model is saved and restored whole by trainstate",
            len(hooks),
            name,
        )
