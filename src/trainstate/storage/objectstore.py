"""Checkpoints on an object store (``s3://``, ``memory://``, any fsspec URL): there is no rename, so
a checkpoint is committed by creating its manifest last, with a create-only conditional put.

Layout under the root URL::

    step_00000010/manifest.json                                   the commit (written last)
    step_00000010/.trainstate-attempt-<owner>-<id>/model.safetensors   the data of one attempt
    .trainstate-lease                                             the writer lock (a lease)

Every save writes its data under a prefix unique to the attempt, so two writers never touch each
other's objects; the manifest object names the attempt it publishes, in a first JSON member that
the storage adds and strips (``{"trainstate_data": "<attempt>", ...the manifest...}``), so the
object stays plain JSON. A checkpoint exists iff its manifest exists: two writers racing for one
name both upload, exactly one create-only put succeeds, the other gets CheckpointExistsError and
its data is removed. Replacing a checkpoint swaps the manifest by compare-and-swap on its etag,
then deletes the old attempt. Deleting removes the manifest first, then the data.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from trainstate.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
)
from trainstate.storage.base import (
    MANIFEST_NAME,
    QUARANTINE_DIR,
    TEMP_PREFIX,
    Buffer,
    PendingCheckpoint,
    ReadableFile,
    Storage,
    check_checkpoint_name,
    check_name,
)
from trainstate.storage.blobs import Blob, Blobs, Conflict, blobs_for
from trainstate.storage.lease import Lease

__all__ = ["ATTEMPT_PREFIX", "LEASE_NAME", "ObjectStorage"]

logger = logging.getLogger(__name__)

ATTEMPT_PREFIX = ".trainstate-attempt-"
"""The prefix of every attempt's data inside a checkpoint."""
LEASE_NAME = ".trainstate-lease"
WRITER_MARK = ".trainstate-writer"
"""The first object of an attempt: who writes it (so that other ranks can join it and cleanup can
date it before any data file is complete)."""

_ATTEMPT = re.compile(r"\.trainstate-attempt-([0-9a-f]{12}|x)-[0-9a-f]{12}")
_ENVELOPE = re.compile(rb'\{"trainstate_data": "(\.trainstate-attempt-(?:[0-9a-f]{12}|x)-[0-9a-f]{12})"(?:, )?')

# Attempts being written by this process (keyed by their full prefix): never anyone's leftovers.
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - the [s3] extra is in [dev]
        raise ValueError('URLs other than file:// need fsspec: pip install "trainstate[s3]"') from exc
    return fsspec


def _defaults(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``storage_options`` with trainstate's defaults for what the user did not set: botocore's
    standard retry mode (5xx, throttling and timeouts retried with backoff, 8 attempts)."""
    merged = dict(options)
    if protocol in ("s3", "s3a"):
        config = dict(merged.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": 8, "mode": "standard"})
        merged["config_kwargs"] = config
    return merged


def _shown(url: str) -> str:
    """``url`` as messages show it: no user:password@ part, no trailing slash."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url).rstrip("/")


def _reason(exc: BaseException) -> str:
    """One line on what the store said, never the request (which may carry credentials)."""
    if isinstance(exc, PermissionError):
        return "access denied"
    if isinstance(exc, FileNotFoundError):
        return "no such bucket or object"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


class _ManifestFile(io.BytesIO):
    """The manifest as the format layer wrote it (the storage's first member stripped)."""

    @property
    def size(self) -> int:
        return len(self.getbuffer())


class _RemoteFile:
    """A data object opened for ranged reads; a deletion under the reader is CheckpointNotFoundError."""

    def __init__(self, inner: Any, size: int, where: str) -> None:
        self._inner, self.size, self._where = inner, size, where

    def read(self, size: int = -1, /) -> bytes:
        with self._translated():
            return bytes(self._inner.read(size))

    def readinto(self, buffer: memoryview, /) -> int | None:
        with self._translated():
            return int(self._inner.readinto(buffer))

    def seek(self, offset: int, whence: int = 0, /) -> int:
        return int(self._inner.seek(offset, whence))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._inner.close()

    def __enter__(self) -> _RemoteFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _translated(self) -> Any:
        try:
            yield
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{self._where}: removed while it was being read") from exc
        except OSError as exc:
            raise OSError(exc.errno or errno.EIO, f"{self._where}: read failed: {_reason(exc)}") from exc


class _Names:
    """What one listing of the root says about each first-level name."""

    def __init__(self, blobs: builtins.list[Blob], base: str) -> None:
        self.manifests: set[str] = set()
        self.attempts: dict[tuple[str, str], builtins.list[Blob]] = {}
        self.foreign: dict[str, set[str]] = {}  # name -> its other first-level entries
        self.plain: set[str] = set()  # objects directly under the root
        for blob in blobs:
            rest = blob.key[len(base) + 1 :].split("/")
            name = rest[0]
            if len(rest) == 1:
                self.plain.add(name)
            elif rest[1:] == [MANIFEST_NAME]:
                self.manifests.add(name)
            elif _ATTEMPT.fullmatch(rest[1]):
                self.attempts.setdefault((name, rest[1]), []).append(blob)
            else:
                self.foreign.setdefault(name, set()).add(rest[1] + ("/" if len(rest) > 2 else ""))

    def visible(self) -> builtins.list[str]:
        """Committed checkpoints and anything that is not trainstate's own work in progress."""
        names = self.manifests | set(self.foreign) | self.plain
        return sorted(n for n in names if not n.startswith((TEMP_PREFIX, ".trainstate-")))


class ObjectStorage(Storage):
    """Checkpoints under an fsspec URL, committed without rename (see the module docstring).

    Args:
        url: The directory URL (``s3://bucket/run``).
        storage_options: Passed to the fsspec filesystem (credentials, ``endpoint_url``, ...), as in
            pandas or datasets. For S3, botocore's standard retry mode is the default.
        stale_after: Leftovers of a writer that held no lease (a one-shot `save` that was killed) are
            removed by later writers once this many seconds old; a lease holder's are removed as
            soon as its lease is gone.
        lease_ttl: Seconds a writer lease lives without renewal (a killed manager's lease runs out
            this long after its last renewal).
        part_size, concurrency: Multipart upload parts (bytes) and how many go up at once.
    """

    remote = True

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        stale_after: float = 3600.0,
        lease_ttl: float = 30.0,
        part_size: int = 32 << 20,
        concurrency: int = 8,
    ) -> None:
        self.root = _shown(url)
        self._url = url.rstrip("/")
        self._options = dict(storage_options or {})
        self.stale_after = stale_after
        self._lease_ttl = lease_ttl
        self._part = (part_size, concurrency)
        self._pid = -1
        self._blobs_now: Blobs | None = None
        self._base = ""
        self._attempts: dict[str, str] = {}  # checkpoint name -> its committed attempt, as last read
        self._blobs()  # an unknown protocol or a missing package fails here, naming the URL
        self._lease = Lease(self._blobs(), f"{self._base}/{LEASE_NAME}", where=self.root, ttl=lease_ttl)

    # ------------------------------------------------------------------ plumbing
    def _blobs(self) -> Blobs:
        """The store's adapter, made again in a forked child (fsspec clients do not survive fork)."""
        if self._blobs_now is None or self._pid != os.getpid():
            fsspec = _fsspec()
            protocol = self._url.split("://", 1)[0].lower()
            try:
                fs, path = fsspec.core.url_to_fs(self._url, **_defaults(protocol, self._options))
            except ImportError as exc:  # fsspec names the package (s3fs, gcsfs, ...) in its message
                raise ValueError(
                    f"{self.root}: storage scheme {protocol!r} is not supported here: {exc} "
                    '(for s3://: pip install "trainstate[s3]"); nothing was read or written'
                ) from exc
            except ValueError as exc:
                raise ValueError(
                    f"{self.root}: storage scheme {protocol!r} is not supported: {exc}; nothing was read or written"
                ) from exc
            blobs = blobs_for(fs)
            if hasattr(blobs, "part_size"):
                blobs.part_size, blobs.concurrency = max(5 << 20, self._part[0]), max(1, self._part[1])  # type: ignore[attr-defined]
            self._blobs_now, self._pid, self._base = blobs, os.getpid(), path.rstrip("/")
            if hasattr(self, "_lease"):
                self._lease = Lease(blobs, f"{self._base}/{LEASE_NAME}", where=self.root, ttl=self._lease_ttl)
        return self._blobs_now

    def _key(self, *parts: str) -> str:
        return "/".join((self._base, *parts))

    def _names(self, prefix: str = "") -> _Names:
        """What is under ``prefix`` (everything, by default); a missing bucket holds nothing."""
        try:
            found = self._io("listing", self.root, lambda: self._blobs().find(self._key(prefix)))
        except FileNotFoundError:
            found = []
        return _Names(found, self._base)

    def _io(self, what: str, where: str, call: Any, outcome: str = "") -> Any:
        """Run a store call; an OSError becomes one line naming ``where`` (never the credentials)."""
        try:
            return call()
        except (CheckpointError, Conflict):
            raise
        except OSError as exc:
            tail = f"; {outcome}" if outcome else ""
            if isinstance(exc, FileNotFoundError):
                raise FileNotFoundError(errno.ENOENT, f"{where}: {what} failed: {_reason(exc)}{tail}") from exc
            kind = PermissionError if isinstance(exc, PermissionError) else OSError
            raise kind(exc.errno or errno.EIO, f"{where}: {what} failed: {_reason(exc)}{tail}") from exc

    def _check(self, name: str, filename: str | None = None) -> None:
        check_checkpoint_name(name, where=self.root)
        if filename is not None:
            check_name(filename, where=self.where(name))

    def _committed_attempt(self, name: str, *, refresh: bool = False) -> str | None:
        """The attempt that ``name``'s manifest publishes (None if it has no manifest)."""
        if refresh or name not in self._attempts:
            envelope = self._read_manifest(name)
            if envelope is None:
                return None
        return self._attempts.get(name)

    def _read_manifest(self, name: str) -> bytes | None:
        where = f"{self.where(name)}/{MANIFEST_NAME}"
        try:
            raw = self._io("reading", where, lambda: self._blobs().get(self._key(name, MANIFEST_NAME)))
        except FileNotFoundError:
            self._attempts.pop(name, None)
            return None
        match = _ENVELOPE.match(raw)
        if match is None:
            raise CorruptCheckpointError(
                f"{where}: names no data (not committed by trainstate's object-store commit, or damaged)"
            )
        self._attempts[name] = match.group(1).decode()
        return b"{" + raw[match.end() :]

    # ------------------------------------------------------------- the protocol
    def begin(self, name: str, *, overwrite: bool = True) -> PendingCheckpoint:
        self._check(name)
        self._lease.check()
        self._check_replaceable(name)
        if not overwrite and self._blobs().head(self._key(name, MANIFEST_NAME)) is not None:
            raise CheckpointExistsError(f"{self.where(name)}: already exists (pass overwrite=True to replace it)")
        return _ObjectPending(self, name, overwrite)

    def _check_replaceable(self, name: str) -> None:
        """Only a checkpoint is ever replaced: a name holding other objects is refused."""
        names = self._names(f"{name}/")
        if name in names.foreign:
            shown = sorted(names.foreign[name])
            raise CheckpointExistsError(
                f"{self.where(name)}: exists and is not a trainstate checkpoint (it holds {', '.join(shown[:3])}"
                f"{', ...' if len(shown) > 3 else ''}); refusing to replace it: save under another name, "
                "or remove it yourself"
            )
        if self._blobs().head(self._key(name)) is not None:
            raise CheckpointExistsError(
                f"{self.where(name)}: exists and is not a trainstate checkpoint (an object); refusing to replace it"
            )

    def join(self, name: str, transaction_id: str) -> PendingCheckpoint:
        self._check(name)
        if not isinstance(transaction_id, str) or not _ATTEMPT.fullmatch(transaction_id):
            raise ValueError(f"{self.where(name)}: {transaction_id!r} is not a transaction of this storage")
        if self._blobs().head(self._key(name, transaction_id, WRITER_MARK)) is None:
            raise CheckpointWriteError(
                f"{self.where(name)}: the coordinator's save in progress ({transaction_id}) is not visible from "
                "this process; a distributed save needs a directory shared by every rank"
            )
        return _ObjectParticipant(self, name, transaction_id)

    def open(self, name: str, filename: str) -> ReadableFile:
        self._check(name, filename)
        where = f"{self.where(name)}/{filename}"
        if filename == MANIFEST_NAME:
            manifest = self._read_manifest(name)
            if manifest is None:
                raise CheckpointNotFoundError(f"{where}: no such file")
            return _ManifestFile(manifest)  # type: ignore[return-value]
        attempt = self._committed_attempt(name)
        found = None if attempt is None else self._blobs().head(self._key(name, attempt, filename))
        if attempt is None or found is None:
            raise CheckpointNotFoundError(f"{where}: no such file")
        key = self._key(name, attempt, filename)
        inner = self._io("opening", where, lambda: self._blobs().open(key, found.size))
        return _RemoteFile(inner, found.size, where)  # type: ignore[return-value]

    def size(self, name: str, filename: str) -> int:
        self._check(name, filename)
        if filename == MANIFEST_NAME:
            manifest = self._read_manifest(name)
            if manifest is None:
                raise CheckpointNotFoundError(f"{self.where(name)}/{filename}: no such file")
            return len(manifest)
        attempt = self._committed_attempt(name)
        found = None if attempt is None else self._blobs().head(self._key(name, attempt, filename))
        if found is None:
            raise CheckpointNotFoundError(f"{self.where(name)}/{filename}: no such file")
        return found.size

    def exists(self, name: str, filename: str | None = None) -> bool:
        try:
            self._check(name, filename)
        except (CheckpointError, ValueError):
            return False
        if filename is None:
            return name in self._names(f"{name}/").visible()
        if filename == MANIFEST_NAME:
            return self._blobs().head(self._key(name, MANIFEST_NAME)) is not None
        try:
            attempt = self._committed_attempt(name, refresh=True)
        except CorruptCheckpointError:
            return False
        return attempt is not None and self._blobs().head(self._key(name, attempt, filename)) is not None

    def files(self, name: str) -> builtins.list[str]:
        self._check(name)
        names = self._names(f"{name}/")
        if name not in names.visible():
            if self._blobs().head(self._key(name)) is not None:
                raise NotADirectoryError(errno.ENOTDIR, "an object, not a checkpoint directory", self.where(name))
            raise FileNotFoundError(errno.ENOENT, "no such checkpoint", self.where(name))
        found = {entry.rstrip("/") for entry in names.foreign.get(name, set())}
        if name in names.manifests:
            found.add(MANIFEST_NAME)
            attempt = self._committed_attempt(name, refresh=True)
            for blob in names.attempts.get((name, attempt or ""), []):
                filename = blob.key.rsplit("/", 1)[1]
                if filename != WRITER_MARK:
                    found.add(filename)
        return sorted(found)

    def list(self) -> builtins.list[str]:
        return self._names().visible()

    def delete(self, name: str) -> None:
        self._check(name)
        where = self.where(name)
        outcome = "the checkpoint was not removed"
        self._io("deleting", where, lambda: self._blobs().delete([self._key(name, MANIFEST_NAME)]), outcome)
        self._attempts.pop(name, None)
        rest = [b.key for b in self._blobs().find(self._key(name) + "/")]
        try:
            self._blobs().delete(rest)
        except OSError as exc:  # uncommitted now: the data is a leftover that cleanup removes
            logger.warning("%s: removing its data failed (cleanup retries): %s", where, _reason(exc))

    def quarantine(self, name: str) -> str:
        self._check(name)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            manifest = self._read_manifest(name)
            attempt = self._attempts.get(name)
            if manifest is None or attempt is None:
                raise CheckpointNotFoundError(f"{self.where(name)}: no such checkpoint")
            taken = self._names(f"{QUARANTINE_DIR}/").foreign.get(QUARANTINE_DIR, set())
            target = next(
                c for n in range(1, 10_000) if (c := f"{name}@{stamp}" + (f"-{n}" if n > 1 else "")) + "/" not in taken
            )
            blobs = self._blobs()
            for blob in blobs.find(self._key(name, attempt) + "/"):
                blobs.copy(blob.key, self._key(QUARANTINE_DIR, target, attempt, blob.key.rsplit("/", 1)[1]))
            raw = blobs.get(self._key(name, MANIFEST_NAME))
            blobs.put(self._key(QUARANTINE_DIR, target, MANIFEST_NAME), raw, create=True)
        except (OSError, Conflict) as exc:
            raise CheckpointWriteError(
                f"{self.where(name)}: moving aside failed: {_reason(exc)}; it was left where it is"
            ) from exc
        self.delete(name)
        return f"{QUARANTINE_DIR}/{target}"

    def cleanup(self) -> builtins.list[str]:
        """Remove attempts no manifest publishes and whose writer is gone, and abort their multipart
        uploads: a lease holder's once its lease is gone, others' once `stale_after` old."""
        try:
            blobs = self._blobs()
            names = self._names()
            uploads = blobs.uploads(self._key() + "/")
        except (OSError, CheckpointError) as exc:
            logger.warning("%s: cleanup skipped: %s", self.root, exc)
            return []
        ages: dict[tuple[str, str], float] = {key: min(b.age for b in found) for key, found in names.attempts.items()}
        for upload in uploads:
            parts = upload.key[len(self._base) + 1 :].split("/")
            if len(parts) >= 3 and _ATTEMPT.fullmatch(parts[1]):
                key = (parts[0], parts[1])
                ages[key] = min(ages.get(key, upload.age), upload.age)
        published: dict[str, str | None] = {}
        per_name: dict[str, int] = {}
        for name, _ in ages:
            per_name[name] = per_name.get(name, 0) + 1
        holder: str | None = ""  # the live lease's token, read once if an attempt's owner needs it
        removed = []
        for (name, attempt), age in sorted(ages.items()):
            prefix = self._key(name, attempt)
            with _ACTIVE_LOCK:
                if prefix in _ACTIVE:
                    continue
            if name in names.manifests:
                if per_name[name] == 1 and (name, attempt) in names.attempts:
                    continue  # a checkpoint's one attempt is the one its manifest publishes
                if name not in published:
                    try:
                        published[name] = self._committed_attempt(name, refresh=True)
                    except (OSError, CheckpointError):
                        published[name] = attempt  # unreadable: keep everything of it
                if published[name] == attempt:
                    continue
            owner = _ATTEMPT.fullmatch(attempt).group(1)  # type: ignore[union-attr]
            if owner != "x" and holder == "":
                try:
                    holder = self._current_lease_token()
                except OSError:
                    holder = "?"
            holder_gone = owner != "x" and holder != "?" and owner != holder
            if not (holder_gone or age >= self.stale_after):
                continue
            try:
                for upload in uploads:
                    if upload.key.startswith(prefix + "/"):
                        blobs.abort(upload)
                blobs.delete([b.key for b in names.attempts.get((name, attempt), [])])
            except OSError as exc:
                logger.warning("%s: could not remove the leftover %s/%s: %s", self.root, name, attempt, _reason(exc))
                continue
            removed.append(f"{name}/{attempt}")
        if removed:
            logger.info("removed %d leftover attempt(s) in %s: %s", len(removed), self.root, ", ".join(removed))
        return removed

    def _current_lease_token(self) -> str | None:
        key = self._key(LEASE_NAME)
        try:
            return str(json.loads(self._blobs().get(key)).get("token"))
        except FileNotFoundError:
            return None
        except (ValueError, AttributeError):
            return "?"  # unreadable: every lease holder's attempt may be alive

    def lock(self, *, timeout: float = 0.0) -> None:
        self._blobs()
        self._io("taking the writer lease", self.root, lambda: self._lease.acquire(timeout))

    def unlock(self) -> None:
        self._lease.release()

    def where(self, name: str) -> str:
        return f"{self.root}/{name}"

    def owner(self) -> str:
        """The owner part of new attempt ids: the lease's token while this storage holds it."""
        return self._lease.token if self._lease.held else "x"


class _ObjectParticipant(PendingCheckpoint):
    """A non-coordinator rank's share of a distributed save: files into the coordinator's attempt."""

    def __init__(self, storage: ObjectStorage, name: str, transaction_id: str) -> None:
        self._storage, self._name = storage, name
        self.transaction_id = transaction_id
        self._written: list[str] = []

    def _upload(self, filename: str, chunks: Iterable[Buffer]) -> int:
        storage = self._storage
        where = f"{storage.where(self._name)}/{check_name(filename, where=storage.where(self._name))}"
        key = storage._key(self._name, self.transaction_id, filename)
        try:
            size = storage._blobs().upload(key, chunks)
        except CheckpointError:
            raise
        except OSError as exc:
            raise CheckpointWriteError(f"{where}: upload failed: {_reason(exc)}; nothing was committed") from exc
        self._written.append(key)
        return size

    def write(self, filename: str, chunks: Iterable[Buffer]) -> int:
        return self._upload(filename, chunks)

    def link(self, filename: str, source: str) -> int:
        raise NotImplementedError("linking is done by the coordinator")

    def commit(self, manifest: bytes) -> None:
        raise CheckpointWriteError(
            f"{self._storage.where(self._name)}: only the coordinator commits a distributed save"
        )

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._storage._blobs().delete(self._written)
        self._written.clear()


class _ObjectPending(_ObjectParticipant):
    def __init__(self, storage: ObjectStorage, name: str, overwrite: bool) -> None:
        attempt = f"{ATTEMPT_PREFIX}{storage.owner()}-{uuid.uuid4().hex[:12]}"
        super().__init__(storage, name, attempt)
        self._overwrite = overwrite
        self._prefix = storage._key(name, attempt)
        with _ACTIVE_LOCK:
            _ACTIVE.add(self._prefix)
        mark = json.dumps({"holder": f"{socket.gethostname()}:{os.getpid()}", "started": time.time()}).encode()
        try:
            storage._blobs().put(f"{self._prefix}/{WRITER_MARK}", mark)
        except OSError as exc:
            self._release()
            raise CheckpointWriteError(
                f"{storage.where(name)}: starting the upload failed: {_reason(exc)}; nothing was written"
            ) from exc

    def _release(self) -> None:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self._prefix)

    def link(self, filename: str, source: str) -> int:
        storage = self._storage
        where = f"{storage.where(self._name)}/{check_name(filename, where=storage.where(self._name))}"
        attempt = storage._committed_attempt(source, refresh=True)
        origin = None if attempt is None else storage._blobs().head(storage._key(source, attempt, filename))
        if attempt is None or origin is None:
            raise CheckpointNotFoundError(f"{storage.where(source)}/{filename}: no such file to link")
        try:
            storage._blobs().copy(origin.key, f"{self._prefix}/{filename}")  # server-side: no bytes through us
        except OSError as exc:
            raise CheckpointWriteError(
                f"{where}: server-side copy failed: {_reason(exc)}; nothing was committed"
            ) from exc
        self._written.append(f"{self._prefix}/{filename}")
        return origin.size

    def commit(self, manifest: bytes) -> None:
        storage, name = self._storage, self._name
        where = storage.where(name)
        if not manifest.startswith(b"{"):
            raise CheckpointWriteError(f"{where}: the manifest is not a JSON object; nothing was committed")
        rest = manifest[1:]
        body = (
            b'{"trainstate_data": "' + self.transaction_id.encode() + (b'"' if rest.startswith(b"}") else b'", ') + rest
        )
        key = storage._key(name, MANIFEST_NAME)
        blobs = storage._blobs()
        try:
            storage._lease.check()
            current = blobs.head(key)
            previous = None
            if current is None:
                blobs.put(key, body, create=True)
            elif not self._overwrite:
                raise CheckpointExistsError(f"{where}: already exists (pass overwrite=True to replace it)")
            elif not blobs.conditional_replace:
                raise CheckpointExistsError(
                    f"{where}: already exists and this store cannot replace it atomically; delete it first "
                    "or save under a new name"
                )
            else:
                previous = storage._committed_attempt(name, refresh=True)
                blobs.put(key, body, match=current.etag)
        except Conflict:
            self.abort()
            raise CheckpointExistsError(
                f"{where}: another writer committed it first; this save was discarded"
            ) from None
        except CheckpointError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise CheckpointWriteError(
                f"{where}: writing the manifest failed: {_reason(exc)}; nothing was committed"
            ) from exc
        storage._attempts[name] = self.transaction_id
        self._release()
        if previous is not None and previous != self.transaction_id:
            try:
                blobs.delete([b.key for b in blobs.find(storage._key(name, previous) + "/")])
            except OSError as exc:
                logger.warning("%s: removing the replaced data failed (cleanup retries): %s", where, _reason(exc))

    def abort(self) -> None:
        storage = self._storage
        with contextlib.suppress(Exception):
            blobs = storage._blobs()
            for upload in blobs.uploads(self._prefix + "/"):
                blobs.abort(upload)
            blobs.delete([b.key for b in blobs.find(self._prefix + "/")])
        self._written.clear()
        self._release()
