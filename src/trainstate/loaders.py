"""Exact resume of torchdata's ``StatefulDataLoader``, with no change to the user's code.

Saved through its own ``state_dict`` alone, a ``StatefulDataLoader`` resumes the interrupted epoch
right but not what follows (measured with torchdata 0.11, torch 2.13; see
``stateful_dataloader/stateful_dataloader.py`` and ``sampler.py`` there):

* its sampler and the worker base seed share the loader's generator. In an uninterrupted epoch the
  base-seed draw comes after the sampler snapshots the generator; on resume the snapshot is put
  back after that draw, so the generator stays one int64 draw behind and every later epoch is
  shuffled differently;
* ``load_state_dict`` is lazy: the iterator is rebuilt at the next ``iter(loader)``, after
  trainstate restored the global RNG, and without ``generator=`` that rebuild draws from it.

So trainstate also saves where the loader's generators *are* at save time, rebuilds the iterator
at once when restoring (with the global RNG put back afterwards), and then sets the generators to
the saved states. That relies on torchdata internals, so it is used only on versions checked here;
elsewhere the loader is saved and restored natively. Configurations that cannot resume exactly get
one warning at save time that names the loader and the fix.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["GENERATORS_KEY", "adapt_for_save", "is_stateful_loader", "loader_state", "restore_loader", "verified"]

logger = logging.getLogger(__name__)

GENERATORS_KEY = "_trainstate_generators"
"""Extra entry of a saved loader state: its generators' states at save time (ignored by torchdata)."""

_VERIFIED_TORCHDATA = ("0.10.", "0.11.")  # versions whose StatefulDataLoader internals were checked
_warned: weakref.WeakSet[Any] = weakref.WeakSet()


def _torchdata_loader_type() -> type | None:
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        return None
    return StatefulDataLoader


def is_stateful_loader(value: object) -> bool:
    """Whether ``value`` is a torchdata ``StatefulDataLoader`` (without importing torchdata needlessly)."""
    if "torchdata" not in type(value).__module__ and not any("torchdata" in c.__module__ for c in type(value).__mro__):
        return False
    loader_type = _torchdata_loader_type()
    return loader_type is not None and isinstance(value, loader_type)


def verified() -> bool:
    """Whether the installed torchdata is a version whose internals the exact resume was checked on."""
    try:
        import torchdata
    except ImportError:
        return False
    return str(getattr(torchdata, "__version__", "")).startswith(_VERIFIED_TORCHDATA)


def _generators(loader: Any) -> dict[str, torch.Generator]:
    found: dict[str, torch.Generator] = {}
    if isinstance(loader.generator, torch.Generator):
        found["loader"] = loader.generator
    sampler_generator = getattr(loader.sampler, "generator", None)
    if isinstance(sampler_generator, torch.Generator) and sampler_generator is not loader.generator:
        found["sampler"] = sampler_generator
    return found


class _LoaderState:
    """What trainstate saves for a StatefulDataLoader: its state dict plus its generators' states."""

    def __init__(self, loader: Any, key: str) -> None:
        self.loader = loader
        self.key = key
        kind = type(loader)
        self.stateful_type = f"{kind.__module__}.{kind.__qualname__}"

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.loader.state_dict())
        _warn_if_inexact(self.loader, self.key)
        if verified():
            state[GENERATORS_KEY] = {name: g.get_state() for name, g in _generators(self.loader).items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # pragma: no cover - never restored into
        raise TypeError("a loader snapshot cannot be restored into")


def adapt_for_save(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every StatefulDataLoader in it (nested in dicts, lists, tuples) replaced by what
    trainstate saves for it; everything else is the same object."""

    def walk(value: Any, path: tuple[Any, ...]) -> Any:
        if is_stateful_loader(value):
            return _LoaderState(value, ".".join(map(str, path)))
        if type(value) is dict:
            items = {k: walk(v, (*path, k)) for k, v in value.items()}
            return value if all(items[k] is value[k] for k in value) else items
        if type(value) in (list, tuple):
            items_ = [walk(v, (*path, i)) for i, v in enumerate(value)]
            return value if all(a is b for a, b in zip(items_, value, strict=True)) else type(value)(items_)
        return value

    adapted = walk(dict(state), ())
    assert isinstance(adapted, dict)
    return adapted


def loader_state(loader: Any, key: str) -> dict[str, Any]:
    """What trainstate saves for a StatefulDataLoader: its ``state_dict()`` plus its generators' states
    (``loader`` may be a wrapper that delegates ``generator``/``sampler`` to one, as Accelerate's does)."""
    return _LoaderState(loader, key).state_dict()


def restore_loader(loader: Any, state: Mapping[str, Any]) -> None:
    """Restore a StatefulDataLoader so that it continues exactly as the saved run would have."""
    state = dict(state)
    generators = state.pop(GENERATORS_KEY, None)
    loader.load_state_dict(state)
    if generators is None or not state or not verified():
        return  # saved without trainstate's extra, or a torchdata version we did not check: native behaviour
    saved_rng = torch.get_rng_state()
    try:
        # What the next iter(loader) would build lazily, built now; torchdata itself hands an iterator
        # made by state_dict() to the next iter() through this flag.
        loader._iterator = loader._get_iterator()
        loader._initial_iter_for_state_dict = True
    finally:
        torch.set_rng_state(saved_rng)
    live = _generators(loader)
    for name, generator_state in generators.items():
        if name in live:
            live[name].set_state(generator_state)


def _warn_if_inexact(loader: Any, key: str) -> None:
    if loader in _warned:
        return
    _warned.add(loader)
    from torch.utils.data import RandomSampler as TorchRandomSampler

    sampler = loader.sampler
    problem = None
    if type(sampler) is TorchRandomSampler:
        problem = (
            "its sampler is torch.utils.data.RandomSampler, which has no state: a resume mid-epoch reshuffles; "
            "use shuffle=True, or torchdata.stateful_dataloader.sampler.RandomSampler"
        )
    elif getattr(sampler, "replacement", False) and getattr(sampler, "generator", None) is loader.generator:
        problem = (
            "its sampler draws with replacement from the loader's generator, which the worker seed shares: "
            "give the sampler a generator of its own"
        )
    elif loader.num_workers > 0 and not callable(getattr(loader.dataset, "state_dict", None)):
        problem = (
            f"it has {loader.num_workers} worker processes and its dataset has no state_dict: if the dataset "
            "draws random numbers (augmentations), a resumed epoch re-seeds the workers and draws differently; "
            "derive per-sample randomness from the index, or give the dataset state_dict/load_state_dict"
        )
    if problem is not None:
        warnings.warn(f"state[{key!r}] ({type(loader).__name__}) cannot resume exactly: {problem}", stacklevel=2)
