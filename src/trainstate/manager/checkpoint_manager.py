"""CheckpointManager: a self-managing directory of step checkpoints with retention and auto-resume."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import math
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from trainstate.api import Peek, Rename, peek_reader, plan_state
from trainstate.api import restore as restore_checkpoint
from trainstate.distributed import active_world
from trainstate.errors import (
    CheckpointError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsupportedFormatError,
)
from trainstate.format.loader import MapLocation
from trainstate.format.reader import CheckpointReader
from trainstate.format.writer import Reuse, SavePlan, environment, execute_save, frozen_paths
from trainstate.loaders import adapt_for_save
from trainstate.manager.catalog import parse_step_name, read_catalog, step_name
from trainstate.manager.early_stopping import EarlyStopping
from trainstate.manager.policies import (
    CheckpointInfo,
    KeepBest,
    KeepEvery,
    KeepLast,
    Mode,
    Retention,
    RetentionPolicy,
    SaveTrigger,
    metric_value,
)
from trainstate.manager.preemption import PreemptionHandler
from trainstate.manager.snapshot import Direct, Pooled, Staged, Stager
from trainstate.manager.tiered import RemoteTier
from trainstate.storage import LocalStorage, Storage, StorageOptions, open_storage

__all__ = ["CheckpointManager", "SaveHandle"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveHandle:
    """A save in flight: `done` polls, `wait`/`result` block until it is committed and re-raise its
    error (it is also raised by the manager's next call)."""

    step: int
    _future: Future[None]

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> int:
        """Block until committed (or ``timeout`` seconds); returns the step, or raises the save's error."""
        self._future.result(timeout)
        return self.step

    def wait(self, timeout: float | None = None) -> None:
        self.result(timeout)


_RESERVED_METADATA = ("step", "metrics", "early_stopping")  # beside them, save(metadata=...) entries

_SKIPPABLE = (CorruptCheckpointError, UnsupportedFormatError)
_MAX_RESCANS = 20

# Managers with a background save in flight: at interpreter exit a failed one must not pass silently.
_IN_FLIGHT: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


@atexit.register
def _report_lost_saves() -> None:
    """Runs after concurrent.futures joined the save threads. A save that failed with nobody left to
    re-raise its error is logged, and the process exits with status 1 (the only way an atexit hook
    can change it; atexit hooks registered before trainstate was imported do not run then)."""
    failed = False
    for manager in list(_IN_FLIGHT):
        future = manager._inflight
        if future is None or manager._pid != os.getpid():
            continue
        try:
            future.result()
        except BaseException as exc:  # noqa: BLE001 - reported, then the exit status says it
            failed = True
            logger.error(
                "%s: the background save of step %s failed and nothing was committed: %s "
                "(close() the manager, or use it as a context manager, to handle this in your code)",
                manager.directory,
                manager._requested_step,
                exc,
            )
    if failed:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(1)


class CheckpointManager:
    """Periodic, retained, resumable checkpoints of a training run in one directory.

    Each checkpoint is a normal trainstate checkpoint named ``step_XXXXXXXX`` (load it with
    `trainstate.load`). Everything the manager knows — steps, metrics, best — is read back from the
    committed manifests; there is no side file that could disagree with them.

    Args:
        directory: Where the checkpoints live (created on first save): a path, a URL, or a `Storage`.
        keep_last: Keep this many newest checkpoints; None keeps all.
        keep_best: Keep this many best checkpoints by ``monitor``.
        monitor: Metric name that defines "best" (and drives ``early_stopping``).
        mode: ``"min"`` or ``"max"``: whether a smaller or larger ``monitor`` is better.
        keep_every: Also keep every checkpoint whose step is a multiple of this.
        every_n_steps: `save` saves when ``step % every_n_steps == 0`` (or ``force=True``).
        every_n_seconds: `save` saves when this long has passed since the last save (or ``force=True``).
            Without either trigger every `save` call saves.
        async_save: Return from `save` after copying the state into reusable host buffers (allocated
            once, reused while shapes stay the same, freed by `close`; `staging_bytes` says how much);
            write in the background. Under torchrun every rank stages its own share (DTensor shards
            under FSDP2) and the ranks write and commit together over a gloo group of the manager's.
        overlap: With ``async_save``: return from `save` before even the copy is done; the copy runs
            in the background, and until it is done the state's optimizers wait in ``step`` and its
            modules with buffers in ``forward`` (hooks trainstate adds and removes). Tensors your own code changes
            in place (an EMA, a manual ``param.add_``) are not guarded: call `wait_staged` first.
            Single process only (ignored with a warning under torchrun).
        incremental: A file whose bytes equal the same file of the previous checkpoint this manager
            committed is hard-linked (a server-side copy on object stores) instead of rewritten;
            frozen parameters (``requires_grad=False``) get files of their own so a fine-tune's
            frozen weights are linked every time. Every checkpoint stays self-contained (deleting any
            other never breaks it) and verifies byte for byte. Deciding costs one hash of each file's
            bytes in memory, which is the hash the manifest needs anyway.
        early_stopping: Stop (``should_stop``) when ``monitor`` stops improving; its state is checkpointed.
        preemption_signals: Signals (e.g. ``[signal.SIGTERM]``) after which the next
            `save` saves whatever the triggers say and ``should_stop`` becomes True.
        lock_timeout: Seconds to wait for another writer of the directory (e.g. a ``trainstate prune``)
            before raising CheckpointLockedError; 0 fails at once.
        retain: Your own retention policies (anything with ``keep(infos) -> set of steps``, see
            `RetentionPolicy`), kept in the union with the others (ignored with ``keep_last=None``,
            which keeps everything).
        remote: Tiered mode: ``directory`` is fast local disk and every committed checkpoint is then
            uploaded here (a URL such as ``s3://bucket/run``, or a `Storage`) in the background. The
            retention options above apply to the remote copies; ``keep_local`` newest checkpoints
            (and any not uploaded yet) stay local. `restore` takes the newest checkpoint that
            verifies, local or remote; uploads a crash interrupted are redone by the next writer.
        keep_local: How many newest checkpoints tiered mode keeps on local disk.
        storage_options: Options of the fsspec filesystem of a URL ``directory`` or ``remote``
            (credentials, ``endpoint_url``, ...).

    Example:
        >>> import torch, trainstate
        >>> model = torch.nn.Linear(2, 1)
        >>> with trainstate.CheckpointManager("/tmp/ts-doc/run", keep_last=2) as mgr:
        ...     start = mgr.restore({"model": model}) or 0
        ...     for step in range(start + 1, start + 4):
        ...         _ = mgr.save(step, {"model": model})
        ...     len(mgr.steps())
        2
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Storage,
        *,
        keep_last: int | None = 5,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: Mode = "min",
        keep_every: int | None = None,
        every_n_steps: int | None = None,
        every_n_seconds: float | None = None,
        async_save: bool = False,
        overlap: bool = False,
        incremental: bool = False,
        early_stopping: EarlyStopping | None = None,
        preemption_signals: Iterable[signal.Signals | int] | None = None,
        lock_timeout: float = 30.0,
        retain: Iterable[RetentionPolicy] = (),
        remote: str | os.PathLike[str] | Storage | None = None,
        keep_local: int = 2,
        storage_options: StorageOptions | None = None,
    ) -> None:
        _check_options(keep_last, keep_best, monitor, mode, keep_every, every_n_steps, every_n_seconds, early_stopping)
        # A ValueError for a scheme this trainstate cannot write; a Storage object is used as it is.
        # Under torchrun every rank makes the same calls: saves are collective (one sharded checkpoint
        # per step), rank 0 alone locks, cleans up, applies retention and quarantines.
        self._world = active_world()
        self._coordinator = self._world is None or self._world[0] == 0
        if self._world is not None and overlap:
            logger.warning("overlap is not available under torchrun yet: async saves copy the state before returning")
            overlap = False
        # An async save's collectives run in the writer thread, on a gloo group of their own: never
        # interleaved with the training thread's collectives on the default group.
        self._save_group = dist.new_group(backend="gloo") if self._world is not None and async_save else None
        self._storage = _storage(directory, storage_options)
        self.directory = self._storage.root
        if (
            isinstance(self._storage, LocalStorage)
            and os.path.lexists(self.directory)
            and not os.path.isdir(self.directory)
        ):
            raise CheckpointWriteError(f"{self.directory}: exists and is not a directory")
        if remote is not None and (type(keep_local) is not int or keep_local < 1):
            raise ValueError(f"keep_local={keep_local!r}: tiered mode keeps at least the newest checkpoint locally")
        if remote is not None and self._world is not None:
            raise ValueError(f"{self.directory}: tiered mode (remote=) is not supported under torchrun yet")
        self.monitor, self.mode = monitor, mode
        self.async_save = async_save
        self.early_stopping = early_stopping
        extra = list(retain)
        for policy in extra:
            if not isinstance(policy, RetentionPolicy):
                raise TypeError(f"retain: {policy!r} has no keep(infos) -> set of steps (see RetentionPolicy)")
        policies: list[RetentionPolicy] = []
        if keep_last is not None:
            policies += [KeepLast(keep_last)]
            policies += [KeepBest(keep_best, monitor, mode)] if keep_best and monitor else []
            policies += [KeepEvery(keep_every)] if keep_every else []
            policies += extra
        self._retention = Retention(tuple(policies))
        self._keep_local = keep_local
        self._tier = (
            None
            if remote is None
            else RemoteTier(self._storage, _storage(remote, storage_options), self._retention, self._prune_local)
        )
        self._trigger = SaveTrigger(every_n_steps, every_n_seconds)
        self._lock_timeout = lock_timeout
        self._locked = False
        self._index_lock = threading.Lock()
        self._index: dict[int, CheckpointInfo] = {}
        self._broken: list[str] = []
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future[None] | None = None
        self._staged: Staged | None = None
        self.incremental = incremental
        self._previous: Reuse | None = None  # the last commit of this manager, for incremental saves
        self._stager: Stager = Pooled()
        self.overlap = overlap and async_save
        self._requested_step: int | None = None
        self._last_save_time = time.monotonic()
        self._preemption = PreemptionHandler(preemption_signals) if preemption_signals else None
        self._preempted_save_done = False
        self._closed = False
        self._pid = os.getpid()
        self._scan()
        if self._tier is not None:
            self._tier.scan()
        if self._preemption is not None:
            self._preemption.install()

    # ----------------------------------------------------------------- queries
    def steps(self) -> list[int]:
        """Steps of all committed checkpoints, ascending (in tiered mode: local or remote)."""
        return sorted(info.step for info in self._infos())

    def _infos(self) -> list[CheckpointInfo]:
        """What the index knows of every committed step (local first, then the remote tier's)."""
        with self._index_lock:
            infos = dict(self._index)
        tier = self._tier
        if tier is not None:
            for step in tier.steps():
                info = tier.info(step)
                if info is not None:
                    infos.setdefault(step, info)
        return list(infos.values())

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The committed step with the best ``monitor`` value (older wins ties), or None."""
        if self.monitor is None:
            return None
        best = KeepBest(1, self.monitor, self.mode).keep(self._infos())
        return next(iter(best), None)

    def path(self, step: int) -> str:
        """Directory of the checkpoint for ``step`` (whether or not it exists)."""
        return os.path.join(self.directory, step_name(step))

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with ``step``; raises CheckpointNotFoundError if it is not committed."""
        info = next((i for i in self._infos() if i.step == step), None)
        if info is None:
            raise CheckpointNotFoundError(f"{self.path(step)}: no committed checkpoint for step {step}")
        return dict(info.metrics)

    def metadata(self, step: int) -> dict[str, Any]:
        """The metadata saved with ``step`` (``save(metadata=...)`` plus step and metrics), read from
        its manifest; raises CheckpointNotFoundError if it is not committed."""
        sources = self._sources(step)
        if not sources:
            raise CheckpointNotFoundError(f"{self.path(step)}: no committed checkpoint for step {step}")
        metadata = CheckpointReader(sources[0], step_name(step)).metadata()
        return dict(metadata) if isinstance(metadata, dict) else {}

    def peek(self) -> Peek | None:
        """The newest committed checkpoint's plain values and metadata, read from its manifest alone
        (no tensor data is read: `restore` still verifies, and may fall back to an older one).
        For building the live objects before restoring into them; None when there is none."""
        self._check_open()
        for _ in range(_MAX_RESCANS):
            self._scan()
            for candidate in reversed(self.steps()):
                try:
                    where = (self._sources(candidate) or [self._storage])[0]
                    with CheckpointReader(where, step_name(candidate)) as reader:
                        return peek_reader(reader)
                except CheckpointNotFoundError:
                    break  # removed meanwhile (a concurrent writer's retention): scan again
                except _SKIPPABLE as exc:
                    logger.warning("%s: skipping step %d: %s", self.directory, candidate, exc)
            else:
                return None
        return None

    @property
    def should_stop(self) -> bool:
        """True after a preemption checkpoint was saved, or when early stopping ran out of patience."""
        return self._preempted_save_done or bool(self.early_stopping and self.early_stopping.should_stop)

    @property
    def stop_reason(self) -> str | None:
        if self._preempted_save_done and self._preemption is not None and self._preemption.received is not None:
            return f"preempted by {self._preemption.received.name}"
        if self.early_stopping is not None and self.early_stopping.should_stop:
            return f"early stopping: {self.monitor} did not improve for {self.early_stopping.patience} evaluations"
        return None

    # ------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Checkpoint ``state`` as ``step`` if a trigger says so; returns whether a checkpoint was taken.

        With ``every_n_steps``/``every_n_seconds`` configured it saves only when one fires, when a
        preemption signal arrived, or with ``force=True``; without a trigger every call saves.
        ``metadata`` (JSON-like values, e.g. a model config) is stored beside the manager's own and
        read back by `peek` without loading any tensor. Retention runs after the commit. An error
        from an earlier background save is raised here.
        """
        self._check_open()
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        preempted = self._preemption is not None and self._preemption.requested and not self._preempted_save_done
        wanted = force or preempted or self._trigger.should_save(step, time.monotonic(), self._last_save_time)
        if self._world is not None:  # all ranks save the same step: any rank's trigger or signal counts
            preempted, wanted = _agree_any(preempted, wanted)  # one small all-reduce per call
            if wanted:
                _agree_same(step, "step", self.directory)
        if not wanted:
            return False
        self.wait()
        newest = max(s for s in (self.latest_step(), self._requested_step, -1) if s is not None)
        if step < newest:
            raise ValueError(
                f"{self.directory}: step {step} is older than the latest checkpoint (step {newest}); "
                "steps must increase (restore() first, or use a new directory)"
            )
        if step == newest:
            logger.warning("%s: step %d is already checkpointed; not saving it again", self.directory, step)
            return False
        clean_metrics = self._check_metrics(metrics)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping of JSON-like values, got {type(metadata).__name__}")
        taken = sorted(set(metadata or {}) & set(_RESERVED_METADATA))
        if taken:
            raise ValueError(f"metadata keys {taken} are the manager's own ({', '.join(_RESERVED_METADATA)})")
        record: dict[str, Any] = {**(metadata or {}), "step": step, "metrics": clean_metrics}
        stopper = None
        if self.early_stopping is not None and self.monitor is not None:
            # Counted on a copy, adopted once the save went through: a failed save counts nothing.
            stopper = dataclasses.replace(self.early_stopping)
            value = metric_value(CheckpointInfo(step, clean_metrics), self.monitor)
            if value is not None:
                stopper.update(value, self.mode)
            record["early_stopping"] = stopper.state_dict()
        self._acquire()
        background = self.async_save and not preempted  # preemption saves are sync
        stager = self._stager if background else Direct()
        adapted = adapt_for_save(state)
        staged: Staged | None = None
        if self._world is not None:
            write, staged = self._plan_sharded(step, adapted, record, clean_metrics, stager if background else None)
        else:
            frozen = frozen_paths(adapted)  # from the live modules: the staged copy holds state dicts
            staged = stager.stage(adapted, overlap=self.overlap)
            try:
                # Encoded here, in the caller's thread: a state that cannot be saved fails this call, not the next.
                plan = plan_state(
                    staged.state, metadata=record, where=self._storage.where(step_name(step)), frozen=frozen
                )
            except BaseException:
                staged.cancel()
                raise
            env = {"dataloader_workers": _loader_workers(state)}
            write = functools.partial(self._write, step, plan, clean_metrics, env, staged)
        self._requested_step = step
        self._last_save_time = time.monotonic()
        if self._world is not None and not background:
            try:
                write()  # in the caller's thread: its collectives go over the default group, as training's do
            except BaseException:
                self._requested_step = None
                raise
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainstate-save")
            self._inflight = self._executor.submit(write)
            self._staged = staged
            _IN_FLIGHT.add(self)
            if not background:
                self.wait()
        if stopper is not None and self.early_stopping is not None:  # async: errors surface on the next call
            self.early_stopping.load_state_dict(stopper.state_dict())
        if preempted:
            self._preempted_save_done = True
            logger.warning(
                "%s: saved step %d after %s; should_stop is now True",
                self.directory,
                step,
                self._preemption.received.name if self._preemption and self._preemption.received else "signal",
            )
        return True

    def _write(self, step: int, plan: SavePlan, metrics: dict[str, float], env: dict[str, Any], staged: Staged) -> None:
        staged.copy()  # first (overlap: training waits in the guard hooks until this is done)
        self._storage.cleanup()  # leftovers of failed saves never accumulate
        previous = self._previous if self.incremental else None
        manifest = execute_save(plan, self._storage.begin(step_name(step)), environment_extra=env, reuse=previous)
        self._previous = Reuse(step_name(step), {f.name: f for f in manifest.files})
        self._committed(step, metrics)

    def _plan_sharded(
        self,
        step: int,
        state: Mapping[str, Any],
        record: dict[str, Any],
        metrics: dict[str, float],
        stager: Stager | None,
    ) -> tuple[Callable[[], None], Staged | None]:
        """Plan a collective save of every rank's share (with ``stager``: of a copy staged now, written
        in the background over the manager's own gloo group); returns what writes it, and the staging."""
        from trainstate.distributed.sharded import plan_sharded, write_sharded

        staging: list[Staged] = []
        group = self._save_group if stager is not None else None

        def stage(captured: dict[str, Any]) -> Mapping[str, Any]:
            assert stager is not None
            staging.append(stager.stage(captured))
            return staging[0].state

        name = step_name(step)
        try:
            plan = plan_sharded(
                state,
                self._storage.where(name),
                metadata=record,
                stage=stage if stager is not None else None,
                group=group,
            )
        except BaseException:
            for staged in staging:
                staged.cancel()
            raise

        def write() -> None:
            """Retention on rank 0, and no rank goes on before it is done."""
            if self._coordinator:
                self._storage.cleanup()
            write_sharded(self._storage, name, plan, group=group)
            self._committed(step, metrics)
            dist.barrier(group=group)

        return write, staging[0] if staging else None

    def _committed(self, step: int, metrics: dict[str, float]) -> None:
        """Index a committed step, then delete what retention no longer keeps (rank 0 deletes; every
        rank's index follows). In tiered mode: queue its upload, and keep locally the newest
        ``keep_local`` and whatever is not uploaded yet."""
        with self._index_lock:
            self._index[step] = CheckpointInfo(step, metrics)
            doomed = self._retention.to_delete(list(self._index.values())) if self._tier is None else []
        if self._tier is not None:
            self._tier.submit(CheckpointInfo(step, metrics))
            self._prune_local()
        if not self._coordinator:
            with self._index_lock:
                for old in doomed:
                    self._index.pop(old, None)
            return
        for old in doomed:
            try:
                self._storage.delete(step_name(old))
            except CheckpointError as exc:  # the save itself succeeded; retention retries next time
                logger.warning("%s: retention could not remove step %d: %s", self.directory, old, exc)
                continue
            with self._index_lock:
                self._index.pop(old, None)
            logger.info("%s: removed step %d (retention)", self.directory, old)

    def _prune_local(self) -> None:
        """Tiered mode: delete local checkpoints beyond the newest ``keep_local`` once uploaded."""
        assert self._tier is not None
        with self._index_lock:
            newest = sorted(self._index)[-self._keep_local :]
            doomed = [s for s in sorted(self._index) if s not in newest and self._tier.uploaded(s)]
        for old in doomed:
            try:
                self._storage.delete(step_name(old))
            except CheckpointError as exc:
                logger.warning("%s: could not remove the uploaded step %d: %s", self.directory, old, exc)
                continue
            with self._index_lock:
                self._index.pop(old, None)

    @property
    def staging_bytes(self) -> int:
        """Host memory held for async staging (the pool's buffers)."""
        return self._stager.pool.nbytes if isinstance(self._stager, Pooled) else 0

    def wait_staged(self) -> None:
        """Block until the save in flight copied the state (with ``overlap``): after this the live
        tensors may change."""
        staged = self._staged
        if staged is not None:
            staged.wait()

    @property
    def in_flight(self) -> SaveHandle | None:
        """The save still being written in the background (``async_save=True``), or None."""
        future = self._inflight
        return None if future is None or self._requested_step is None else SaveHandle(self._requested_step, future)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raises its error."""
        future, self._inflight = self._inflight, None
        if future is not None:
            try:
                future.result()
            except BaseException:
                self._requested_step = None
                raise

    # ---------------------------------------------------------------- restore
    def restore(
        self,
        state: Mapping[str, Any],
        step: int | None = None,
        *,
        map_location: MapLocation = None,
        strict: bool = True,
        rename: Rename | None = None,
    ) -> int | None:
        """Restore ``state`` in place from the newest checkpoint that verifies (or from ``step``).

        Live objects are restored in place; plain entries of ``state`` (an epoch counter, a tensor)
        are replaced by their saved values in the mapping itself. Checkpoints that fail verification
        are skipped with a warning naming each; an error about the state itself (a key, shape or
        device that does not fit) is raised, never skipped. Damaged checkpoints newer than the one
        restored are moved aside into ``trainstate-quarantine/`` so the run continues from the
        restored step. Saved live objects and tensors that ``state`` does not name are not restored
        (a warning names them). ``rename`` maps saved module keys as for `trainstate.load`. Returns
        the restored step, or None when there is nothing to restore; `metadata` gives what it was
        saved with.
        """
        self._check_open()
        self.wait()
        if step is not None:
            return self._restore_step(step, state, map_location=map_location, strict=strict, rename=rename)
        if self._world is not None:
            return self._restore_agreed(state, map_location=map_location, strict=strict, rename=rename)
        damaged: dict[tuple[Storage, str], str] = {}  # (where, name) -> why it was skipped
        restored = None
        for _ in range(_MAX_RESCANS):
            vanished = self._scan()
            if self._tier is not None:
                self._tier.scan()
            for storage, name in self._broken_names():
                logger.warning("%s: skipping %s: no valid committed manifest", storage.root, name)
                damaged.setdefault((storage, name), "no valid committed manifest")
            for candidate in reversed(self.steps()):
                try:
                    restored = self._restore_step(
                        candidate, state, map_location=map_location, strict=strict, rename=rename, damaged=damaged
                    )
                    break
                except CheckpointNotFoundError as exc:
                    vanished = True  # e.g. removed by a concurrent writer's retention: look again
                    logger.warning("%s: skipping step %d: %s", self.directory, candidate, exc)
                except _SKIPPABLE as exc:
                    logger.warning("%s: skipping step %d: %s", self.directory, candidate, exc)
            if restored is not None or not vanished:
                break
        floor = -1 if restored is None else restored
        newer = [(storage, n) for storage, n in damaged if (parse_step_name(n) or -1) > floor]
        for storage in {storage for storage, _ in newer}:
            self._quarantine([n for where, n in newer if where is storage], storage)
        return restored

    def _broken_names(self) -> list[tuple[Storage, str]]:
        found = [(self._storage, name) for name in self._broken]
        if self._tier is not None:
            found += [(self._tier.remote, name) for name in self._tier.broken]
        return found

    def _sources(self, step: int) -> list[Storage]:
        """Where ``step`` is committed, fastest first (local disk, then the remote tier)."""
        with self._index_lock:
            here = [self._storage] if step in self._index else []
        if self._tier is not None and self._tier.info(step) is not None:
            here.append(self._tier.remote)
        return here

    def _restore_agreed(
        self, state: Mapping[str, Any], *, map_location: MapLocation, strict: bool, rename: Rename | None
    ) -> int | None:
        """`restore` under torchrun: the newest checkpoint that restores on every rank. Candidates are
        rank 0's; after each attempt the ranks compare outcomes, so all skip a damaged one together
        and an error about the state on any rank is raised on all."""
        self._scan()
        candidates: list[Any] = [list(reversed(self.steps()))]
        dist.broadcast_object_list(candidates, src=0)
        damaged: dict[str, str] = {}
        restored = None
        for candidate in candidates[0]:
            outcome: tuple[str, str] = ("ok", "")
            error: BaseException | None = None
            try:
                self._restore_step(candidate, state, map_location=map_location, strict=strict, rename=rename)
            except _SKIPPABLE + (CheckpointNotFoundError,) as exc:
                outcome, error = ("damaged", str(exc)), exc
            except Exception as exc:  # noqa: BLE001 - shared with every rank below
                outcome, error = ("error", f"{type(exc).__name__}: {exc}"), exc
            outcomes: list[Any] = [None] * self._world[1]  # type: ignore[index]
            dist.all_gather_object(outcomes, outcome)
            failed = {r: text for r, (kind, text) in enumerate(outcomes) if kind == "error"}
            if failed:
                if error is not None and outcome[0] == "error":
                    raise error
                raise StateMismatchError(f"{self.directory}: step {candidate}: restoring failed on rank(s) {failed}")
            skipped = [text for kind, text in outcomes if kind == "damaged"]
            if skipped:
                logger.warning("%s: skipping step %d: %s", self.directory, candidate, skipped[0])
                damaged[step_name(candidate)] = skipped[0]
                continue
            restored = candidate
            break
        newer = [n for n in damaged if (parse_step_name(n) or -1) > (-1 if restored is None else restored)]
        if newer and self._coordinator:
            self._quarantine(newer, self._storage)
        dist.barrier()
        if newer:
            self._scan()
        return restored

    def _quarantine(self, names: list[str], storage: Storage) -> None:
        """Move damaged checkpoints newer than the restored one aside, so that the run continues from
        the restored step: saves, retention and `latest_step` then no longer see them."""
        took_lock = not self._locked
        if took_lock:
            try:
                storage.lock(timeout=0)
            except CheckpointLockedError:
                logger.warning(
                    "%s: cannot move the damaged checkpoints %s aside: another writer holds the lock",
                    self.directory,
                    ", ".join(names),
                )
                return
        try:
            for name in sorted(names):
                try:
                    moved = storage.quarantine(name)
                except CheckpointError as exc:
                    logger.warning("%s: %s", self.directory, exc)
                    continue
                logger.warning(
                    "%s: moved the damaged checkpoint %s aside to %s (kept for a post mortem; "
                    "`trainstate prune --quarantined` removes it)",
                    self.directory,
                    name,
                    moved,
                )
        finally:
            if took_lock:
                storage.unlock()
        self._scan()
        if self._tier is not None:
            self._tier.scan()

    def _restore_step(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        map_location: MapLocation,
        strict: bool,
        rename: Rename | None,
        damaged: dict[tuple[Storage, str], str] | None = None,
    ) -> int:
        """Restore ``step`` from the first of its copies that verifies; a damaged copy is recorded in
        ``damaged`` and the next copy tried."""
        sources = self._sources(step) or [self._storage]
        for index, storage in enumerate(sources):
            try:
                return self._restore_from(storage, step, state, map_location=map_location, strict=strict, rename=rename)
            except _SKIPPABLE as exc:
                if damaged is not None:
                    damaged[(storage, step_name(step))] = str(exc)
                if index == len(sources) - 1:
                    raise
                logger.warning(
                    "%s: step %d is damaged there (%s); restoring its copy in %s",
                    storage.root,
                    step,
                    exc,
                    sources[index + 1].root,
                )
        raise AssertionError("unreachable")

    def _restore_from(
        self,
        storage: Storage,
        step: int,
        state: Mapping[str, Any],
        *,
        map_location: MapLocation,
        strict: bool,
        rename: Rename | None,
    ) -> int:
        with CheckpointReader(storage, step_name(step)) as reader:
            self._compare_environment(reader, state)
            # Verified while read (each byte once), every file before any byte lands in a live object.
            loaded = restore_checkpoint(
                reader,
                state,
                map_location=map_location,
                strict=strict,
                rename=rename,
                on_unnamed=self._warn_unnamed(step),
            )
            metadata = reader.metadata() or {}
        if isinstance(state, MutableMapping):
            for key, value in loaded.items():
                if key in state and state[key] is not value:
                    state[key] = value  # plain values (epoch, tensors...) come back through the mapping
        if self.early_stopping is not None and isinstance(metadata.get("early_stopping"), dict):
            self.early_stopping.load_state_dict(metadata["early_stopping"])
        self._last_save_time = time.monotonic()
        return step

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Finish the save in flight, release the directory lock and signal handlers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():  # a forked child: the executor thread and the lock are the parent's
            self._inflight = None
            self._storage.unlock()  # forgets the inherited lock fd without touching its number
            return
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self._stager.close()
            group, self._save_group = self._save_group, None
            if group is not None and dist.is_initialized():  # a destroyed default group took it along
                dist.destroy_process_group(group)
            if self._tier is not None:
                self._tier.close()
            if self._preemption is not None:
                self._preemption.uninstall()
            self._storage.unlock()
            if self._tier is not None:
                self._tier.remote.unlock()
        self._raise_upload_failures()

    def wait_for_uploads(self) -> None:
        """Tiered mode: block until every checkpoint committed so far is uploaded (or failed to be);
        raises CheckpointWriteError naming the steps that are not uploaded (they stay local)."""
        self.wait()
        if self._tier is not None:
            self._tier.wait()
            self._raise_upload_failures()

    def _raise_upload_failures(self) -> None:
        failed = self._tier.failures() if self._tier is not None else {}
        if failed:
            step, exc = max(failed.items())
            raise CheckpointWriteError(
                f"{self._tier.remote.root if self._tier else ''}: step(s) {sorted(failed)} are not uploaded (they are "
                f"kept in {self.directory}); the last error: {exc}"
            )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, steps={self.steps()})"

    # ---------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.directory}: this CheckpointManager is closed")
        if self._pid != os.getpid():
            raise RuntimeError(
                f"{self.directory}: this CheckpointManager belongs to process {self._pid}, not to this forked "
                f"child ({os.getpid()}); create a new CheckpointManager in the child (another directory, or after "
                "the parent closed its manager: the parent holds the writer lock)"
            )

    def _acquire(self) -> None:
        if not self._locked:
            if self._coordinator:  # under torchrun rank 0 writes for all: it alone holds the lock
                self._storage.lock(timeout=self._lock_timeout)
                self._storage.cleanup()
                if self._tier is not None:
                    try:
                        self._tier.remote.lock(timeout=self._lock_timeout)
                    except BaseException:
                        self._storage.unlock()
                        raise
                    self._tier.remote.cleanup()
            self._locked = True
            self._scan()  # another writer may have committed while we were not holding the lock
            if self._tier is not None:  # redo the uploads a crash interrupted
                self._tier.scan()
                with self._index_lock:
                    local = list(self._index.values())
                for info in self._tier.missing(sorted(local, key=lambda i: i.step)):
                    self._tier.submit(info)

    def _scan(self) -> bool:
        """Rebuild the index from the catalog of committed manifests; True if a checkpoint vanished
        while it was being read (a concurrent writer's retention), so the picture may be stale.
        A checkpoint that cannot be read at all (permissions) is raised: that is not damage."""
        index: dict[int, CheckpointInfo] = {}
        broken = []
        vanished = False
        for entry in read_catalog(self._storage):
            if entry.error is not None and parse_step_name(entry.name) is not None:
                raise entry.error
            if entry.status == "vanished":
                vanished = True
            elif entry.info is not None and entry.status == "ok":
                index[entry.info.step] = entry.info
            elif parse_step_name(entry.name) is not None:
                broken.append(entry.name)
                logger.debug("%s: %s is not a valid checkpoint: %s", self.directory, entry.name, entry.problem)
        with self._index_lock:
            self._index = index
        self._broken = broken
        return vanished

    def _check_metrics(self, metrics: Mapping[str, Any] | None) -> dict[str, float]:
        if metrics is None:
            return {}
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            detach = getattr(value, "detach", None)  # a loss tensor that requires grad: no torch warning
            try:
                clean[str(key)] = float(detach() if callable(detach) else value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r}: {value!r} is not a number") from None
        if self.monitor is not None and self.monitor not in clean:
            raise ValueError(
                f"metrics {sorted(clean)} do not include the monitored metric {self.monitor!r}; "
                "pass it, or save with metrics=None for a checkpoint that is never 'best'"
            )
        if self.monitor is not None and not math.isfinite(clean[self.monitor]):
            logger.warning(
                "%s: %s=%s is not finite; this checkpoint can never be best",
                self.directory,
                self.monitor,
                clean[self.monitor],
            )
        return clean

    def _warn_unnamed(self, step: int) -> Callable[[list[str]], None]:
        def warn(names: list[str]) -> None:
            logger.warning(
                "%s: step %d holds %s, which the state given to restore() does not name: not restored "
                "(a forgotten optimizer or scheduler?); use trainstate.load(path, {...}) for a partial load",
                self.directory,
                step,
                ", ".join(repr(n) for n in names),
            )

        return warn

    def _compare_environment(self, reader: CheckpointReader, state: Mapping[str, Any]) -> None:
        saved = reader.manifest.environment
        current = {**environment(), "dataloader_workers": _loader_workers(state)}
        for key in ("world_size", "cuda_device_count", "dataloader_workers"):
            if key in saved and saved[key] != current[key]:
                logger.warning("%s: %s was %s when saved, is %s now", reader.where, key, saved[key], current[key])


def _storage(location: str | os.PathLike[str] | Storage, options: StorageOptions | None) -> Storage:
    if isinstance(location, Storage):
        return location
    from trainstate.storage import scheme_of

    return open_storage(location, options if scheme_of(location) != "file" else None)


def _agree_any(*flags: bool) -> tuple[bool, ...]:
    """Each flag True on every rank if it is True on any rank."""
    values = torch.tensor([int(f) for f in flags], device=_reduce_device(dist.get_backend()))
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def _reduce_device(backend: str) -> torch.device:
    """Where a tensor for the default group's all-reduce must live: the CPU when its backend takes
    CPU tensors (gloo, mpi, ``"cpu:gloo,cuda:nccl"``), else this process's current CUDA device (NCCL alone)."""
    if "nccl" in backend and "gloo" not in backend and "mpi" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_same(value: int, what: str, where: str) -> None:
    """Raise ValueError on every rank unless every rank passed the same ``value``."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) != 1:
        raise ValueError(f"{where}: every rank must save the same {what}; got {values} by rank")


def _loader_workers(state: Mapping[str, Any]) -> dict[str, int]:
    """``num_workers`` of every data loader in the state, by key."""
    return {str(k): int(v.num_workers) for k, v in state.items() if isinstance(getattr(v, "num_workers", None), int)}


def _check_options(
    keep_last: int | None,
    keep_best: int | None,
    monitor: str | None,
    mode: str,
    keep_every: int | None,
    every_n_steps: int | None,
    every_n_seconds: float | None,
    early_stopping: EarlyStopping | None,
) -> None:
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r}: use 'min' (smaller {monitor or 'metric'} is better) or 'max'")
    for name, value in [("keep_last", keep_last), ("keep_best", keep_best), ("keep_every", keep_every)]:
        if value is not None and (type(value) is not int or value < 0):
            raise ValueError(f"{name}={value!r}: must be a non-negative int or None")
    if keep_every == 0:
        raise ValueError("keep_every=0: use None to disable, or a positive step interval")
    if keep_best and monitor is None:
        raise ValueError(f"keep_best={keep_best} needs monitor='<metric name>' to know what 'best' means")
    if early_stopping is not None and monitor is None:
        raise ValueError("early_stopping needs monitor='<metric name>'")
    if keep_last == 0 and not keep_best and not keep_every:
        raise ValueError(
            "keep_last=0 with no keep_best/keep_every would keep only the newest checkpoint; "
            "use keep_last=1 for that, or keep_last=None to keep all"
        )
    if every_n_steps is not None and (type(every_n_steps) is not int or every_n_steps <= 0):
        raise ValueError(f"every_n_steps={every_n_steps!r}: must be a positive int or None")
    if every_n_seconds is not None and not every_n_seconds > 0:
        raise ValueError(f"every_n_seconds={every_n_seconds!r}: must be positive or None")
