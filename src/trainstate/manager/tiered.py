"""The remote tier of a CheckpointManager: committed local checkpoints uploaded in the background."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from trainstate.errors import CheckpointError, CorruptCheckpointError
from trainstate.format.hashing import new_hasher
from trainstate.format.reader import CheckpointReader
from trainstate.manager.catalog import parse_step_name, read_catalog, step_name
from trainstate.manager.policies import CheckpointInfo, Retention
from trainstate.storage import MANIFEST_NAME, Storage

__all__ = ["RemoteTier"]

logger = logging.getLogger(__name__)

_CHUNK = 8 << 20


class RemoteTier:
    """Uploads of committed local checkpoints to ``remote``, one at a time in step order, each the
    very files and manifest of the local one (hashes checked while they stream, so a local copy that
    rotted is never published), then ``retention`` applied to the remote index.

    An upload that fails is logged and tried again on the next `sync`; nothing local is removed
    before its upload committed.
    """

    def __init__(
        self, local: Storage, remote: Storage, retention: Retention, on_uploaded: Callable[[], None] = lambda: None
    ) -> None:
        self.local, self.remote, self._retention = local, remote, retention
        self._on_uploaded = on_uploaded
        self._uploaded: set[int] = set()  # uploaded by this process (retention may have removed them since)
        self._lock = threading.Lock()
        self._index: dict[int, CheckpointInfo] = {}
        self._broken: list[str] = []
        self._queued: dict[int, Future[None]] = {}
        self._failed: dict[int, BaseException] = {}
        self._executor: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ index
    def scan(self) -> None:
        """Rebuild the remote index from its committed manifests."""
        index, broken = {}, []
        for entry in read_catalog(self.remote):
            if entry.info is not None and entry.status == "ok":
                index[entry.info.step] = entry.info
            elif entry.status in ("corrupt", "incomplete") and parse_step_name(entry.name) is not None:
                broken.append(entry.name)
        with self._lock:
            self._index = index
            self._broken = broken

    def steps(self) -> list[int]:
        with self._lock:
            return sorted(self._index)

    def info(self, step: int) -> CheckpointInfo | None:
        with self._lock:
            return self._index.get(step)

    @property
    def broken(self) -> list[str]:
        return list(self._broken)

    def forget(self, step: int) -> None:
        with self._lock:
            self._index.pop(step, None)

    def missing(self, local: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """Local checkpoints newer than the remote's newest (a crash before their upload finished)."""
        newest = max(self.steps(), default=-1)
        with self._lock:
            queued = set(self._queued)
        return [info for info in local if info.step > newest and info.step not in queued]

    def uploaded(self, step: int) -> bool:
        """Whether the remote has (or had, before its retention removed it) ``step``."""
        with self._lock:
            return step in self._index or step in self._uploaded

    # ---------------------------------------------------------------- uploads
    def submit(self, info: CheckpointInfo) -> None:
        """Upload local checkpoint ``info.step`` in the background (once)."""
        with self._lock:
            if info.step in self._queued or info.step in self._index:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainstate-upload")
            self._queued[info.step] = self._executor.submit(self._upload, info)

    def _upload(self, info: CheckpointInfo) -> None:
        name = step_name(info.step)
        try:
            self._copy(name)
        except BaseException as exc:
            with self._lock:
                self._failed[info.step] = exc
                self._queued.pop(info.step, None)
            logger.error(
                "%s: uploading step %d failed (retried at the next save): %s", self.remote.root, info.step, exc
            )
            raise
        with self._lock:
            self._index[info.step] = info
            self._uploaded.add(info.step)
            self._failed.pop(info.step, None)
            self._queued.pop(info.step, None)
            doomed = self._retention.to_delete(list(self._index.values()))
        logger.info("%s: uploaded step %d", self.remote.root, info.step)
        for old in doomed:
            try:
                self.remote.delete(step_name(old))
            except (CheckpointError, OSError) as exc:
                logger.warning("%s: retention could not remove step %d: %s", self.remote.root, old, exc)
                continue
            self.forget(old)
        self._on_uploaded()

    def _copy(self, name: str) -> None:
        with CheckpointReader(self.local, name) as reader:
            with self.local.open(name, MANIFEST_NAME) as f:
                manifest = f.read()
            pending = self.remote.begin(name, overwrite=True)  # a redo replaces a half-published earlier try
            try:
                for entry in reader.manifest.files:
                    with reader.opened(entry) as source:
                        pending.write(
                            entry.name, _verified(source, entry.size, entry.hash, f"{reader.where}/{entry.name}")
                        )
                pending.commit(manifest)
            except BaseException:
                pending.abort()
                raise

    def wait(self) -> None:
        """Block until every queued upload finished (successfully or not)."""
        with self._lock:
            futures = list(self._queued.values())
        for future in futures:
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - recorded in _failed, reported by `failures`
                pass

    def failures(self) -> dict[int, BaseException]:
        with self._lock:
            return {step: exc for step, exc in self._failed.items() if step not in self._index}

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _verified(source: object, size: int, expected: str, where: str) -> Iterator[memoryview]:
    """The bytes of ``source``, hashed as they go; raises CorruptCheckpointError at the end if they
    are not what the manifest says (the commit then never happens)."""
    hasher = new_hasher()
    buffer = bytearray(min(_CHUNK, max(size, 1)))
    view = memoryview(buffer)
    remaining = size
    while remaining:
        n = source.readinto(view[: min(len(view), remaining)])  # type: ignore[attr-defined]
        if not n:
            raise CorruptCheckpointError(f"{where}: file ended early (truncated)")
        hasher.update(view[:n])
        remaining -= n
        yield view[:n]
    if hasher.hexdigest() != expected:
        raise CorruptCheckpointError(f"{where}: content hash mismatch (the local copy is damaged); not uploaded")
