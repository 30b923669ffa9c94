"""The writer lock of a directory on an object store, where there is no flock: a lease object."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from trainstate.errors import CheckpointLockedError
from trainstate.storage.blobs import Blobs, Conflict

__all__ = ["Lease"]

logger = logging.getLogger(__name__)

_POLL_S = 0.25


class Lease:
    """A lease on ``key``: created with a create-only put; renewed by compare-and-swap every third of
    ``ttl``; taken over by another writer only once the store's own clock says it went ``ttl``
    seconds without renewal (a killed holder's lease runs out; a live one never does).

    A holder whose renewal fails (the lease was taken over after a long stall, or the store was
    unreachable for ``ttl``) has lost it: `check` raises from then on, so a job that was requeued
    while it still ran can no longer commit beside its successor.
    """

    def __init__(self, blobs: Blobs, key: str, *, where: str, ttl: float = 30.0) -> None:
        self._blobs, self._key, self._where, self.ttl = blobs, key, where, float(ttl)
        self.token = ""
        self._etag = ""
        self._pid = 0
        self._lost = ""
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return bool(self.token) and self._pid == os.getpid()

    def _record(self) -> bytes:
        holder = f"{socket.gethostname()}:{os.getpid()}"
        return json.dumps({"token": self.token, "holder": holder, "ttl": self.ttl}).encode()

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lease, waiting up to ``timeout`` seconds; CheckpointLockedError if another holds it."""
        if self.held:
            return
        deadline = time.monotonic() + timeout
        self.token, self._lost = uuid.uuid4().hex[:12], ""
        while True:
            try:
                self._etag = self._blobs.put(self._key, self._record(), create=True)
                break
            except Conflict:
                pass
            current = self._current()
            if current is not None and current[2] >= current[1]:  # ran out: take it over, one taker wins
                try:
                    self._etag = self._blobs.put(self._key, self._record(), match=current[0])
                    logger.warning("%s: took over an expired writer lease (%s)", self._where, current[3])
                    break
                except Conflict:
                    pass
            if time.monotonic() >= deadline:
                holder = current[3] if current is not None else "another writer"
                self.token = ""
                raise CheckpointLockedError(
                    f"{self._where}: another writer holds the lease ({holder}); stop it, wait for its lease to "
                    "run out, or use a different directory"
                )
            time.sleep(_POLL_S)
        self._pid = os.getpid()
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="trainstate-lease", daemon=True)
        self._renewer.start()

    def _current(self) -> tuple[str, float, float, str] | None:
        """``(etag, ttl, age, holder)`` of the lease object now, or None when there is none."""
        found = self._blobs.head(self._key)
        if found is None:
            return None
        try:
            record = json.loads(self._blobs.get(self._key))
            ttl, holder = float(record.get("ttl", self.ttl)), str(record.get("holder", "?"))
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            ttl, holder = self.ttl, "unreadable lease"
        return found.etag, ttl, found.age, holder

    def _renew(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.ttl / 3):
            try:
                self._etag = self._blobs.put(self._key, self._record(), match=self._etag)
                last = time.monotonic()
            except Conflict:
                self._lose("another writer took it over")
                return
            except Exception as exc:  # noqa: BLE001 - the store is unreachable: keep trying until ttl passed
                if time.monotonic() - last >= self.ttl:
                    self._lose(f"it could not be renewed for {self.ttl:g} s ({type(exc).__name__})")
                    return

    def _lose(self, why: str) -> None:
        self._lost = why
        logger.error("%s: lost the writer lease: %s; no further checkpoint will be committed", self._where, why)

    def check(self) -> None:
        """Raise CheckpointLockedError if the lease was held and lost."""
        if self._lost and self._pid == os.getpid():
            raise CheckpointLockedError(
                f"{self._where}: this writer lost its lease ({self._lost}); nothing was committed"
            )

    def release(self) -> None:
        """Give the lease up (if this process holds it and it is still ours)."""
        if not self.held:
            self.token = "" if self._pid != os.getpid() else self.token
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            found = self._blobs.head(self._key)
            if found is not None and found.etag == self._etag and not self._lost:
                self._blobs.delete([self._key])
        except Exception as exc:  # noqa: BLE001 - it runs out by itself
            logger.warning(
                "%s: could not release the writer lease (it expires in %g s): %s", self._where, self.ttl, exc
            )
        self.token, self._etag, self._pid = "", "", 0
