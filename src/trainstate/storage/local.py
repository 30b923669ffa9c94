"""Local filesystem storage: temp sibling directory, fsync everything, rename, fsync the parent."""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, cast

from trainstate.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointLockedError,
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

__all__ = ["LocalStorage", "atomic_write_file"]

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2  # linux/fs.h
_LOCK_POLL_S = 0.05

# Lock fds held by this process. flock belongs to the open file description, which fork shares:
# a DataLoader worker forked after the first save would keep a dead trainer's lock alive (seconds,
# until it notices its parent is gone) and the restarted job would be locked out. Children close
# their copies at once; closing (never LOCK_UN, which would release the parent's lock) is enough.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(what: str, path: str, exc: OSError, outcome: str = "nothing was committed") -> CheckpointWriteError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    err = CheckpointWriteError(f"{path}: {what} failed: {reason}; {outcome}")
    err.errno = exc.errno
    return err


def _exchange(src: str, dst: str) -> None:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). Raises OSError if unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@contextmanager
def atomic_write_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write one plain file atomically (exports, conversions): a temporary sibling that is fsynced and
    renamed over ``path``, then the directory fsynced; on any error ``path`` is left as it was."""
    target = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(target)
    # Not TEMP_PREFIX: a checkpoint writer's cleanup in the same directory must not take this file.
    tmp = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise _write_error("writing", target, exc, outcome="nothing was replaced") from exc
        raise


def _check_replaceable(path: str) -> None:
    """Only a checkpoint may be replaced: a flat directory of regular files holding a manifest (or
    an empty directory). A run directory, a ``model.pt`` or anything else is never swapped out."""
    try:
        info = os.lstat(path)
        entries = _entries(path) if stat.S_ISDIR(info.st_mode) else []
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _write_error("inspecting what exists there", path, exc, outcome="nothing was written") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise CheckpointExistsError(
            f"{path}: exists and is not a trainstate checkpoint (a {_kind(info.st_mode)}); refusing to replace "
            "it: save under another name, or remove it yourself"
        )
    if not entries:
        return
    others = sorted(
        e.name + ("/" if e.is_dir(follow_symlinks=False) else "")
        for e in entries
        if not e.is_file(follow_symlinks=False)
    )
    if others or MANIFEST_NAME not in {e.name for e in entries}:
        shown = others or sorted(e.name for e in entries)
        raise CheckpointExistsError(
            f"{path}: exists and is not a trainstate checkpoint (it holds {', '.join(shown[:3])}"
            f"{', ...' if len(shown) > 3 else ''}); refusing to replace it: save under another name "
            "(e.g. a sub-directory), or remove it yourself"
        )


def _entries(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return list(it)


def _temp_name(kind: str, name: str) -> str:
    """A unique temporary sibling name carrying the writer's pid; the checkpoint's name is shortened
    so it stays under 255 bytes."""
    short = name.encode("utf-8", "surrogateescape")[:64].decode("utf-8", "ignore")
    return f"{TEMP_PREFIX}{kind}{short}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


_TEMP_PID = re.compile(r"-(\d+)-[0-9a-f]{12}\Z")

# Temporary directories of writes in progress in this process. Every writer also holds an flock on
# its temporary directory until it commits or aborts, so `cleanup` can tell a live writer's work
# (in any process) from a dead one's without a directory-wide lock: a one-shot `save` beside a
# running CheckpointManager needs no lock of the manager's.
_ACTIVE_TEMPS: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _try_lock_dir(path: str) -> int | None:
    """An fd holding an exclusive flock on directory ``path``; None if another writer holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return -1  # gone, or not a directory: nothing to protect
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _abandoned(root: str, entry: str) -> bool:
    """Whether temporary entry ``entry`` belongs to a writer that is gone (and may be removed)."""
    path = os.path.join(root, entry)
    if path in _ACTIVE_TEMPS:
        return False
    fd = _try_lock_dir(path)
    if fd is None:
        return False  # a live writer in another process holds it
    if fd >= 0:
        os.close(fd)
    match = _TEMP_PID.search(entry)
    pid = int(match.group(1)) if match else None
    # A live other process may be between creating its directory and locking it.
    return pid is None or pid == os.getpid() or not _pid_alive(pid)


def _kind(mode: int) -> str:
    return "symlink" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "special file"


def _write_file(tmp: str, final: str, filename: str, chunks: Iterable[Buffer]) -> int:
    """Write one new file of a transaction and fsync it; errors name the file's final path."""
    path = os.path.join(tmp, check_name(filename, where=final))
    step = "opening"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            size = 0
            step = "writing"
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view:
                    written = os.write(fd, view)
                    size += written
                    view = view[written:]
            step = "fsync"
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _write_error(step, os.path.join(final, filename), exc) from exc
    return size


class _LocalParticipant(PendingCheckpoint):
    """A non-coordinator rank's share of a transaction: files into the coordinator's temporary
    directory (which the coordinator flocks, commits and, on failure, removes)."""

    def __init__(self, storage: LocalStorage, name: str, transaction_id: str) -> None:
        self._final = os.path.join(storage.root, name)
        if not transaction_id.startswith(TEMP_PREFIX) or "/" in transaction_id:
            raise ValueError(f"{self._final}: {transaction_id!r} is not a transaction of this storage")
        self.transaction_id = transaction_id
        self._tmp = os.path.join(storage.root, transaction_id)
        self._written: list[str] = []
        if not os.path.isdir(self._tmp):
            raise CheckpointWriteError(
                f"{self._final}: the coordinator's save in progress ({self._tmp}) is not visible from this "
                "process; a distributed save needs a directory shared by every rank"
            )

    def write(self, filename: str, chunks: Iterable[Buffer]) -> int:
        size = _write_file(self._tmp, self._final, filename, chunks)
        self._written.append(filename)
        return size

    def link(self, filename: str, source: str) -> int:
        raise NotImplementedError("linking is done by the coordinator")

    def commit(self, manifest: bytes) -> None:
        raise CheckpointWriteError(f"{self._final}: only the coordinator commits a distributed save")

    def abort(self) -> None:
        for filename in self._written:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._tmp, filename))
        self._written.clear()


class _LocalPending(PendingCheckpoint):
    def __init__(self, storage: LocalStorage, name: str, overwrite: bool) -> None:
        self._storage = storage
        self._final = os.path.join(storage.root, name)
        self._overwrite = overwrite
        self._tmp = os.path.join(storage.root, _temp_name("", name))
        self.transaction_id = os.path.basename(self._tmp)
        _ACTIVE_TEMPS.add(self._tmp)
        try:
            os.mkdir(self._tmp)
            fd = _try_lock_dir(self._tmp)
            assert fd is not None and fd >= 0, "a fresh temporary directory is nobody else's"
        except OSError as exc:
            _ACTIVE_TEMPS.discard(self._tmp)
            raise _write_error("creating the temporary directory", self._tmp, exc) from exc
        self._lock_fd = fd
        _HELD_LOCKS.add(fd)  # forked children close it: they must not keep a dead writer's work alive

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            _HELD_LOCKS.discard(fd)
            os.close(fd)
        _ACTIVE_TEMPS.discard(self._tmp)

    def write(self, filename: str, chunks: Iterable[Buffer]) -> int:
        return _write_file(self._tmp, self._final, filename, chunks)

    def link(self, filename: str, source: str) -> int:
        origin = self._storage._path(source, filename)
        target = os.path.join(self._tmp, check_name(filename, where=self._final))
        try:
            os.link(origin, target, follow_symlinks=False)
            return os.lstat(target).st_size
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(f"{origin}: no such file to link") from exc
        except OSError as exc:
            raise _write_error("linking", os.path.join(self._final, filename), exc) from exc

    def commit(self, manifest: bytes) -> None:
        self.write(MANIFEST_NAME, [manifest])  # last: its presence is what makes the checkpoint exist
        step = "fsync of the temporary directory"
        try:
            _fsync_dir(self._tmp)
            step = "rename into place"
            if os.path.lexists(self._final):
                _check_replaceable(self._final)
                if not self._overwrite:
                    raise CheckpointExistsError(f"{self._final}: already exists (pass overwrite=True to replace it)")
                try:
                    _exchange(self._tmp, self._final)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
                        raise
                    raise CheckpointExistsError(
                        f"{self._final}: already exists and this filesystem cannot swap it atomically; "
                        "delete it first or save under a new name"
                    ) from exc
                # The old checkpoint now sits at the temporary name; it is garbage from here on.
                _remove(self._tmp)
            else:
                os.rename(self._tmp, self._final)
            step = "fsync of the parent directory"
            try:
                _fsync_dir(self._storage.root)
            except OSError:
                self._unpublish()
                raise
        except OSError as exc:
            if isinstance(exc, CheckpointExistsError):
                raise
            raise _write_error(step, self._final, exc) from exc
        self._release()

    def _unpublish(self) -> None:
        """After a failed parent fsync the rename may not be durable: take the checkpoint back down,
        so that a failed save never leaves a checkpoint that could vanish at the next power loss."""
        try:
            os.rename(self._final, self._tmp)
        except OSError:
            logger.error("%s: could not withdraw the checkpoint after a failed fsync", self._final)

    def abort(self) -> None:
        _remove(self._tmp)
        self._release()


class LocalStorage(Storage):
    """Checkpoints as directories under ``root`` on a POSIX filesystem.

    Commit: every file is fsynced, then the temporary directory, then it is renamed to its final
    name (an existing checkpoint is swapped out with ``renameat2(RENAME_EXCHANGE)``), then the
    parent directory is fsynced. The writer lock is ``flock`` on the root directory itself, so it
    leaves no lock file behind and dies with its process.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self._lock_fd: int | None = None
        self._lock_pid = 0  # the process that took the lock: a forked child does not hold it

    def _ensure_root(self) -> None:
        if os.path.isdir(self.root):
            return
        if os.path.lexists(self.root):
            raise CheckpointWriteError(f"{self.root}: exists and is not a directory")
        try:
            os.makedirs(self.root, exist_ok=True)
            _fsync_dir(os.path.dirname(self.root))
        except OSError as exc:
            raise _write_error("creating the directory", self.root, exc) from exc

    def _path(self, name: str, filename: str | None = None) -> str:
        check_checkpoint_name(name, where=self.root)
        if filename is None:
            return os.path.join(self.root, name)
        return os.path.join(self.root, name, check_name(filename, where=os.path.join(self.root, name)))

    def begin(self, name: str, *, overwrite: bool = True) -> PendingCheckpoint:
        final = self._path(name)
        self._ensure_root()
        _check_replaceable(final)  # fail before writing any data; commit checks again
        if not overwrite and os.path.lexists(final):
            raise CheckpointExistsError(f"{final}: already exists (pass overwrite=True to replace it)")
        return _LocalPending(self, name, overwrite)

    def join(self, name: str, transaction_id: str) -> PendingCheckpoint:
        self._path(name)
        return _LocalParticipant(self, name, transaction_id)

    def open(self, name: str, filename: str) -> ReadableFile:
        path = self._path(name, filename)
        try:
            # O_NOFOLLOW: a symlink planted in a checkpoint must not make us read outside it.
            # O_NONBLOCK: opening a FIFO planted in a checkpoint must not hang; cleared below.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise CheckpointNotFoundError(f"{path}: no such file") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptCheckpointError(f"{path}: is a symlink; checkpoint files must be regular files") from exc
            raise  # permissions, too many open files...: not about the checkpoint; names the path
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptCheckpointError(f"{path}: is not a regular file")
        os.set_blocking(fd, True)
        return cast(ReadableFile, os.fdopen(fd, "rb", buffering=0))

    def size(self, name: str, filename: str) -> int:
        path = self._path(name, filename)
        try:
            return os.lstat(path).st_size
        except OSError as exc:
            raise CheckpointNotFoundError(f"{path}: no such file") from exc

    def exists(self, name: str, filename: str | None = None) -> bool:
        try:
            path = self._path(name, filename)
        except (CheckpointError, ValueError):
            return False
        try:
            os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True  # other errors (permission denied) are raised: we cannot tell

    def files(self, name: str) -> builtins.list[str]:
        path = self._path(name)
        if os.path.islink(path):
            raise NotADirectoryError(errno.ENOTDIR, "a symlink, not a checkpoint directory", path)
        return sorted(os.listdir(path))

    def list(self) -> builtins.list[str]:
        try:
            entries = os.listdir(self.root)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e for e in entries if not e.startswith(TEMP_PREFIX))

    def delete(self, name: str) -> None:
        path = self._path(name)
        if not os.path.lexists(path):
            return
        # Rename first: readers listing the directory never see a half-deleted checkpoint.
        trash = os.path.join(self.root, _temp_name("deleted-", name))
        try:
            os.rename(path, trash)
        except OSError as exc:
            raise _write_error("deleting", path, exc, outcome="the checkpoint was not removed") from exc
        try:
            _fsync_dir(self.root)
        except OSError as exc:  # at worst a complete, valid checkpoint reappears after a power loss
            logger.warning("%s: fsync after removing %s failed: %s", self.root, name, exc)
        _remove(trash)

    def quarantine(self, name: str) -> str:
        path = self._path(name)
        aside = os.path.join(self.root, QUARANTINE_DIR)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            os.makedirs(aside, exist_ok=True)
            target = next(
                candidate
                for n in range(1, 10_000)
                if not os.path.lexists(os.path.join(aside, candidate := f"{name}@{stamp}" + (f"-{n}" if n > 1 else "")))
            )
            os.rename(path, os.path.join(aside, target))
            _fsync_dir(aside)
            _fsync_dir(self.root)
        except OSError as exc:
            raise _write_error("moving aside", path, exc, outcome="it was left where it is") from exc
        return os.path.join(QUARANTINE_DIR, target)

    def cleanup(self) -> builtins.list[str]:
        try:
            entries = os.listdir(self.root)
        except OSError:
            return []
        removed = []
        for entry in entries:
            if entry.startswith(TEMP_PREFIX) and _abandoned(self.root, entry):
                _remove(os.path.join(self.root, entry))
                removed.append(entry)
        if removed:
            logger.info(
                "removed %d leftover temporary entr%s in %s: %s",
                len(removed),
                "y" if len(removed) == 1 else "ies",
                self.root,
                ", ".join(sorted(removed)),
            )
        return removed

    def lock(self, *, timeout: float = 0.0) -> None:
        self._forget_inherited_lock()
        if self._lock_fd is not None:
            return
        self._ensure_root()
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd, self._lock_pid = fd, os.getpid()
                _HELD_LOCKS.add(fd)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise CheckpointLockedError(
                        f"{self.root}: another writer holds the lock (a second process or CheckpointManager "
                        "saving into the same directory); stop it or use a different directory"
                    ) from None
                time.sleep(_LOCK_POLL_S)

    def _forget_inherited_lock(self) -> None:
        """In a forked child the lock fd was closed at fork (see `_close_inherited_locks`) and its
        number may be reused by an unrelated file: forget it, never close or unlock it."""
        if self._lock_fd is not None and self._lock_pid != os.getpid():
            self._lock_fd = None

    def unlock(self) -> None:
        self._forget_inherited_lock()
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            _HELD_LOCKS.discard(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
