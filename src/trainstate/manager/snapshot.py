"""Staging a state for a save: what the writer reads while training goes on.

A `Stager` is the only thing that differs between a synchronous save (the writer reads the live
tensors while the caller waits: `Direct`) and an asynchronous one (`Pooled`: state dicts taken
now, tensors copied into reusable host buffers). Either returns a `Staged`: the state to plan and
write, and `copy`, which fills its buffers (run in the caller's thread before `stage` returns, or
later in the writer's thread with ``overlap``, guarded by hooks on the objects that would change
the tensors).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from trainstate.format.codec import StateSnapshot, is_stateful, qualified_type
from trainstate.format.tensorfile import alias_key
from trainstate.format.torch_codecs import unwrap_module
from trainstate.format.tree import Path, rebuild

__all__ = ["Captured", "Direct", "Pooled", "Staged", "Stager", "StagingPool"]


Captured = StateSnapshot
"""A live object's state dict as it was at capture time; saved exactly like the object itself."""


@dataclass
class Staged:
    """A staged state: ``state`` is what gets planned and written; `copy` fills its buffers from the
    live tensors (once; a no-op for a direct save), `wait` blocks until that happened."""

    state: Mapping[str, Any]
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (live, buffer)
    _done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _release: list[Callable[[], None]] = field(default_factory=list)
    _error: BaseException | None = None

    def copy(self) -> None:
        """Copy every live tensor into its buffer (device→host copies on a side stream, one event),
        then drop the guard hooks. Idempotent; safe from any thread."""
        with self._lock:
            if self._done.is_set():
                if self._error is not None:
                    raise self._error
                return
            try:
                _copy_all(self.pairs)
            except BaseException as exc:
                self._error = exc
                raise
            finally:
                self._finish()

    def cancel(self) -> None:
        """Give the staging up (the save failed before writing): nothing is copied, nothing held."""
        with self._lock:
            self._finish()

    def _finish(self) -> None:
        self.pairs = []
        self._done.set()
        for remove in self._release:
            remove()
        self._release.clear()

    def wait(self) -> None:
        self._done.wait()


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    devices = {live.device for live, _ in pairs if live.device.type == "cuda"}
    streams = {d: torch.cuda.Stream(device=d) for d in devices}
    for device, stream in streams.items():  # the copies start after what the training stream queued
        stream.wait_stream(torch.cuda.current_stream(device))
    for live, buffer in pairs:
        if live.device.type == "cuda":
            with torch.cuda.stream(streams[live.device]):
                buffer.copy_(live.detach(), non_blocking=True)
        else:
            buffer.copy_(live.detach())
    for stream in streams.values():  # one event per device to wait on
        event = torch.cuda.Event()
        event.record(stream)
        event.synchronize()


class Stager(Protocol):
    """Turns a state into what a save writes (see `Staged`)."""

    def stage(self, state: Mapping[str, Any], *, overlap: bool = False) -> Staged: ...

    def close(self) -> None: ...


class Direct:
    """No copy: for saves the caller waits for (the writer reads the live tensors)."""

    def stage(self, state: Mapping[str, Any], *, overlap: bool = False) -> Staged:
        staged = Staged(state)
        staged.copy()
        return staged

    def close(self) -> None:
        return None


class StagingPool:
    """Host buffers for async saves, one per tensor of the state (by its path in the state), of
    exactly its size, allocated and touched once and reused by every save while its shape and dtype
    stay the same. Buffers of CUDA tensors are pinned with ``cudaHostRegister`` (not the caching host
    allocator, which rounds up to a power of two). One save uses the pool at a time: the manager
    stages a save only after the previous one finished writing."""

    def __init__(self) -> None:
        self._buffers: dict[Path, torch.Tensor] = {}
        self._pinned: set[int] = set()
        self._used: set[Path] = set()

    @property
    def nbytes(self) -> int:
        """Host memory the pool holds now."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def buffer(self, path: Path, like: torch.Tensor) -> torch.Tensor:
        """The buffer for the tensor at ``path`` (shaped, typed like ``like``), new or reused."""
        self._used.add(path)
        found = self._buffers.get(path)
        if found is not None and found.shape == like.shape and found.dtype == like.dtype:
            return found
        if found is not None:
            self._free(path)
        buffer = torch.empty(like.shape, dtype=like.dtype)
        if buffer.numel():
            buffer.view(-1)[:: max(1, 4096 // buffer.element_size())].zero_()  # touch every page now
            if like.device.type == "cuda" and torch.cuda.is_available():
                nbytes = buffer.numel() * buffer.element_size()
                torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
                self._pinned.add(buffer.data_ptr())
        self._buffers[path] = buffer
        return buffer

    def begin(self) -> None:
        self._used = set()

    def trim(self) -> None:
        """Free the buffers the last staging did not use (tensors that left the state)."""
        for path in [p for p in self._buffers if p not in self._used]:
            self._free(path)

    def _free(self, path: Path) -> None:
        buffer = self._buffers.pop(path)
        if buffer.data_ptr() in self._pinned:
            self._pinned.discard(buffer.data_ptr())
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())

    def close(self) -> None:
        for path in list(self._buffers):
            self._free(path)


class Pooled:
    """Async staging: state dicts taken now, every tensor copied into the `StagingPool`'s buffers
    (aliases stay aliases). With ``overlap`` the copies are left to `Staged.copy` (the writer's
    thread runs it first), and until they are done every optimizer of the state waits in a step
    pre-hook and every module that has buffers in a forward pre-hook: the places a training loop
    changes the saved tensors (forward and backward of buffer-less modules overlap the copy). Not
    guarded: tensors user code edits in place by itself (an EMA, a manual ``param.add_``), which
    must wait for `Staged.wait` first."""

    def __init__(self) -> None:
        self.pool = StagingPool()

    def stage(self, state: Mapping[str, Any], *, overlap: bool = False) -> Staged:
        self.pool.begin()
        staged = Staged({})
        buffers: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        guarded: list[Any] = []

        def copy_tensor(tensor: torch.Tensor, path: Path) -> torch.Tensor:
            # The source stays referenced with its buffer: the alias key is an address, and a
            # state_dict() that builds tensors afresh frees them at once (the address is reused).
            local = _local_shard(tensor)
            key = alias_key(local)
            if key not in buffers:
                buffer = self.pool.buffer(path, local)
                staged.pairs.append((local, buffer))
                view: torch.Tensor = buffer
                if local is not tensor:  # a DTensor: its shard staged, under the same placement
                    view = _dtensor_like(tensor, buffer)
                elif isinstance(tensor, torch.nn.Parameter):
                    view = torch.nn.Parameter(buffer, requires_grad=tensor.requires_grad)
                elif tensor.requires_grad:
                    view = buffer.detach().requires_grad_(True)
                buffers[key] = (tensor, view)
            return buffers[key][1]

        def leaf(value: Any, path: Path) -> Any:
            if isinstance(value, torch.Tensor):
                return copy_tensor(value, path)
            if isinstance(value, np.ndarray):
                return value.copy()
            if is_stateful(value):
                value = unwrap_module(value)
                guarded.append(value)
                return Captured(qualified_type(value), rebuild(value.state_dict(), leaf, path))
            return value  # plain values are immutable or refused by the codec later, as in a sync save

        staged.state = rebuild(dict(state), leaf)
        self.pool.trim()
        if not overlap:
            staged.copy()
            return staged
        for obj in guarded:
            staged._release.extend(_guard(obj, staged))
        return staged

    def close(self) -> None:
        self.pool.close()


def _local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """The shard a DTensor holds on this rank (what staging copies), else the tensor itself."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _dtensor_like(live: Any, buffer: torch.Tensor) -> torch.Tensor:
    """A DTensor over the host ``buffer`` with ``live``'s placement and global shape. Built with the
    spec as DCP's own stager does: ``DTensor.from_local`` would move the buffer to the mesh's device."""
    from torch.distributed.tensor import DTensor

    staged: torch.Tensor = DTensor(buffer, live._spec, requires_grad=False)  # type: ignore[call-arg]
    return staged


def _guard(obj: Any, staged: Staged) -> list[Callable[[], None]]:
    """Hooks that hold ``obj`` (a module: forward; an optimizer: step) until ``staged`` is copied."""

    def hold(*_: Any, **__: Any) -> None:
        staged.wait()

    handles: list[Any] = []
    if isinstance(obj, torch.nn.Module):  # forward changes buffers (BatchNorm statistics), never parameters
        handles = [m.register_forward_pre_hook(hold) for m in obj.modules() if m._buffers]
    elif isinstance(obj, torch.optim.Optimizer):
        handles = [obj.register_step_pre_hook(hold)]
    return [h.remove for h in handles]
