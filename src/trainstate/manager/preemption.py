"""Preemption signals (SIGTERM from SLURM/Kubernetes, SIGUSR1...) turned into a flag, nothing more."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

__all__ = ["PreemptionHandler"]

logger = logging.getLogger(__name__)


class PreemptionHandler:
    """Installs handlers that only record the signal; the training loop acts at its next safe point.

    No I/O happens inside the handler (it may interrupt a write in progress); the manager's next
    ``save(..., force=False)`` sees `requested` and saves, then ``should_stop`` tells the loop to exit.
    """

    def __init__(self, signals: Iterable[signal.Signals | int] = (signal.SIGTERM,)) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("preemption signal handlers can only be installed from the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
