"""Objects in a bucket, through fsspec: the few operations an object-store commit needs, with the
conditional writes (create-only, compare-and-swap) that fsspec's file API does not expose.

`S3Blobs` talks to S3 through s3fs's client (``call_s3``: its retries, credentials and endpoint
options) and uploads large objects as parallel multipart uploads; `MemoryBlobs` serves
``memory://`` (tests, within one process); `Blobs` itself is any other fsspec filesystem, with
create-only writes where its ``pipe_file(mode="create")`` supports them. Listings and metadata
are always asked of the store itself, never of fsspec's directory cache, so that what other
processes committed is seen at once. Keys are fsspec paths without the protocol
(``bucket/run/step_00000010/manifest.json``).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import errno
import io
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

__all__ = ["Blob", "Blobs", "Conflict", "MemoryBlobs", "S3Blobs", "Upload", "blobs_for"]

Buffer = bytes | bytearray | memoryview

MIN_PART = 5 << 20
"""S3's smallest multipart part (all but the last)."""
MAX_PARTS = 10_000
READ_AHEAD = 256 << 10


class Conflict(Exception):
    """A conditional write lost: the object exists (create-only) or changed (compare-and-swap)."""


@dataclass(frozen=True)
class Blob:
    key: str
    size: int
    age: float  # seconds since it was last written, by the store's own clock
    etag: str = ""


@dataclass(frozen=True)
class Upload:
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    age: float


class Blobs:
    """Any fsspec filesystem (the generic fallback; subclasses do better where the store allows)."""

    conditional_replace = False  # whether `put(match=...)` is supported

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def get(self, key: str) -> bytes:
        """The whole object; FileNotFoundError if it is missing."""
        return bytes(self.fs.cat_file(key))

    def head(self, key: str) -> Blob | None:
        try:
            info = self.fs.info(key)
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return Blob(key, int(info.get("size") or 0), _age(info), str(info.get("ETag") or info.get("etag") or ""))

    def put(self, key: str, data: bytes, *, create: bool = False, match: str | None = None) -> str:
        """Write a small object and return its new etag. ``create``: only if it does not exist;
        ``match``: only if its etag is still ``match``. Raises Conflict when the condition fails."""
        if match is not None:
            raise NotImplementedError(f"{type(self.fs).__name__} has no conditional replace")
        try:
            self.fs.pipe_file(key, data, mode="create" if create else "overwrite")
        except FileExistsError as exc:
            raise Conflict(key) from exc
        found = self.head(key)
        return found.etag if found is not None else ""

    def upload(self, key: str, chunks: Iterable[Buffer]) -> int:
        """Write one object from ``chunks``; returns its size. It is visible only once complete."""
        size = 0
        with self.fs.open(key, "wb") as f:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                f.write(view)
                size += len(view)
        return size

    def open(self, key: str, size: int) -> Any:
        """A seekable reader of the object: each read is one ranged GET of what was asked for and
        `READ_AHEAD` bytes more (so a file's small header reads cost one request, not three)."""
        return self.fs.open(key, "rb", cache_type="readahead", block_size=READ_AHEAD, size=size)

    def find(self, prefix: str) -> list[Blob]:
        """Every object whose key starts with ``prefix`` (a "directory/"), recursively."""
        try:
            found = self.fs.find(prefix.rstrip("/"), detail=True, withdirs=False)
        except FileNotFoundError:
            return []
        return [Blob(key, int(info.get("size") or 0), _age(info)) for key, info in found.items()]

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.fs.rm_file(key)
            except FileNotFoundError:
                pass

    def copy(self, source: str, target: str) -> None:
        self.fs.copy(source, target)

    def uploads(self, prefix: str) -> list[Upload]:
        return []

    def abort(self, upload: Upload) -> None:
        return None


def _age(info: dict[str, Any]) -> float:
    for field in ("LastModified", "mtime", "modified", "created", "updated"):
        value = info.get(field)
        if isinstance(value, (int, float)):
            return max(0.0, time.time() - float(value))
        if isinstance(value, _dt.datetime):
            stamp = value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)
            return max(0.0, (_dt.datetime.now(_dt.timezone.utc) - stamp).total_seconds())
    return 0.0


_MEMORY_LOCK = threading.RLock()
_MEMORY_ETAGS: dict[str, str] = {}  # key -> etag of what memory:// holds there (one process)


class MemoryBlobs(Blobs):
    """``memory://``: one process's store, where a lock makes conditional writes atomic."""

    conditional_replace = True

    def get(self, key: str) -> bytes:
        with _MEMORY_LOCK:
            return bytes(self.fs.cat_file(key))

    def head(self, key: str) -> Blob | None:
        with _MEMORY_LOCK:
            found = super().head(key)
            return None if found is None else Blob(key, found.size, found.age, _MEMORY_ETAGS.get(key, ""))

    def put(self, key: str, data: bytes, *, create: bool = False, match: str | None = None) -> str:
        with _MEMORY_LOCK:
            exists = self.fs.isfile(key)
            if (create and exists) or (match is not None and (not exists or _MEMORY_ETAGS.get(key) != match)):
                raise Conflict(key)
            self.fs.pipe_file(key, bytes(data))
            etag = _MEMORY_ETAGS[key] = uuid.uuid4().hex
            return etag

    def upload(self, key: str, chunks: Iterable[Buffer]) -> int:
        data = b"".join(bytes(memoryview(c).cast("B")) for c in chunks)  # visible only once complete
        with _MEMORY_LOCK:
            self.fs.pipe_file(key, data)
            _MEMORY_ETAGS[key] = uuid.uuid4().hex
        return len(data)

    def open(self, key: str, size: int) -> Any:
        # memory:// hands every opener the same BytesIO; readers in threads need their own.
        return io.BytesIO(self.get(key))

    def find(self, prefix: str) -> list[Blob]:
        with _MEMORY_LOCK:
            return super().find(prefix)

    def delete(self, keys: list[str]) -> None:
        with _MEMORY_LOCK:
            super().delete(keys)
            for key in keys:
                _MEMORY_ETAGS.pop(key, None)

    def copy(self, source: str, target: str) -> None:
        with _MEMORY_LOCK:
            self.fs.pipe_file(target, self.fs.cat_file(source))
            _MEMORY_ETAGS[target] = uuid.uuid4().hex


class S3Blobs(Blobs):
    """S3 (and S3 API servers) through s3fs's client, with S3's conditional writes: ``If-None-Match: *``
    for create-only, ``If-Match: <etag>`` for compare-and-swap, on PutObject and
    CompleteMultipartUpload alike.

    Uploads are written here rather than through ``S3File``: s3fs uploads a streamed file's parts
    one after the other, and ``put_file``/``pipe_file`` need the whole object in a file or in memory.
    `upload` cuts the stream into parts and keeps ``concurrency`` of them in flight (memory bounded
    by ``concurrency`` parts), on s3fs's own event loop.
    """

    conditional_replace = True

    def __init__(self, fs: Any, *, part_size: int = 32 << 20, concurrency: int = 8) -> None:
        super().__init__(fs)
        self.part_size = max(MIN_PART, part_size)
        self.concurrency = max(1, concurrency)

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, **kwargs)

    def _split(self, key: str) -> tuple[str, str]:
        bucket, _, rest = key.partition("/")
        return bucket, rest

    def head(self, key: str) -> Blob | None:
        bucket, name = self._split(key)
        try:
            response = self._call("head_object", Bucket=bucket, Key=name)
        except FileNotFoundError:
            return None
        return Blob(
            key, int(response["ContentLength"]), _server_age(response, response["LastModified"]), response["ETag"]
        )

    def put(self, key: str, data: bytes, *, create: bool = False, match: str | None = None) -> str:
        bucket, name = self._split(key)
        condition = {"IfNoneMatch": "*"} if create else {"IfMatch": match} if match is not None else {}
        try:
            return str(self._call("put_object", Bucket=bucket, Key=name, Body=bytes(data), **condition)["ETag"])
        except OSError as exc:
            if condition and _lost_condition(exc):
                raise Conflict(key) from exc
            raise

    def upload(self, key: str, chunks: Iterable[Buffer]) -> int:
        bucket, name = self._split(key)
        part = bytearray()
        size = 0
        parts = _Parts(self, bucket, name)
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                size += len(view)
                while view:
                    take = min(len(view), self.part_size - len(part))
                    part += view[:take]
                    view = view[take:]
                    if len(part) == self.part_size:
                        parts.send(part)
                        part = bytearray()  # the sent one is the upload's now
            if not parts.started:  # small: one PUT
                self._call("put_object", Bucket=bucket, Key=name, Body=part)
                return size
            if part:
                parts.send(part)
            parts.complete()
            return size
        except BaseException:
            parts.abort()
            raise

    def _submit(self, method: str, **kwargs: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(self.fs._call_s3(method, **kwargs), self.fs.loop)

    def open(self, key: str, size: int) -> Any:
        self.fs.invalidate_cache(key)
        return super().open(key, size)

    def _pages(self, method: str, prefix: str, items: str, cursor: dict[str, str]) -> Iterator[tuple[Any, Any]]:
        """``(response, item)`` for every item of a paginated listing; ``cursor`` maps the next
        request's parameters to the response fields that carry them."""
        bucket, name = self._split(prefix)
        position: dict[str, str] = {}
        while True:
            response = self._call(method, Bucket=bucket, Prefix=name, **position)
            for item in response.get(items, []):
                yield response, item
            if not response.get("IsTruncated"):
                return
            position = {param: response[field] for param, field in cursor.items()}

    def find(self, prefix: str) -> list[Blob]:
        bucket = self._split(prefix)[0]
        pages = self._pages("list_objects_v2", prefix, "Contents", {"ContinuationToken": "NextContinuationToken"})
        return [
            Blob(f"{bucket}/{item['Key']}", int(item["Size"]), _server_age(page, item["LastModified"]), item["ETag"])
            for page, item in pages
        ]

    def delete(self, keys: list[str]) -> None:
        by_bucket: dict[str, list[str]] = {}
        for key in keys:
            bucket, name = self._split(key)
            by_bucket.setdefault(bucket, []).append(name)
        for bucket, names in by_bucket.items():
            for start in range(0, len(names), 1000):
                batch = [{"Key": n} for n in names[start : start + 1000]]
                response = self._call("delete_objects", Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                errors = response.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise OSError(errno.EIO, f"deleting {bucket}/{first.get('Key')}: {first.get('Code')}")

    def copy(self, source: str, target: str) -> None:
        self.fs.copy(source, target)

    def uploads(self, prefix: str) -> list[Upload]:
        bucket = self._split(prefix)[0]
        cursor = {"KeyMarker": "NextKeyMarker", "UploadIdMarker": "NextUploadIdMarker"}
        return [
            Upload(f"{bucket}/{item['Key']}", item["UploadId"], _server_age(page, item["Initiated"]))
            for page, item in self._pages("list_multipart_uploads", prefix, "Uploads", cursor)
        ]

    def abort(self, upload: Upload) -> None:
        bucket, name = self._split(upload.key)
        try:
            self._call("abort_multipart_upload", Bucket=bucket, Key=name, UploadId=upload.upload_id)
        except FileNotFoundError:
            pass  # completed or aborted meanwhile


class _Parts:
    """One multipart upload: parts go up on s3fs's event loop, at most ``concurrency`` at a time."""

    def __init__(self, blobs: S3Blobs, bucket: str, name: str) -> None:
        self._blobs, self._bucket, self._name = blobs, bucket, name
        self._id: str | None = None
        self._in_flight: list[tuple[int, Future[Any]]] = []
        self._done: list[dict[str, Any]] = []

    @property
    def started(self) -> bool:
        return self._id is not None

    def send(self, part: bytearray) -> None:
        if self._id is None:
            self._id = self._blobs._call("create_multipart_upload", Bucket=self._bucket, Key=self._name)["UploadId"]
        number = len(self._done) + len(self._in_flight) + 1
        if number > MAX_PARTS:
            raise OSError(errno.EFBIG, f"over {MAX_PARTS} parts of {self._blobs.part_size} bytes")
        future = self._blobs._submit(
            "upload_part", Bucket=self._bucket, Key=self._name, UploadId=self._id, PartNumber=number, Body=part
        )
        self._in_flight.append((number, future))
        while len(self._in_flight) >= self._blobs.concurrency:
            self._settle()

    def _settle(self) -> None:
        number, future = self._in_flight.pop(0)
        self._done.append({"PartNumber": number, "ETag": future.result()["ETag"]})

    def complete(self) -> None:
        while self._in_flight:
            self._settle()
        self._blobs._call(
            "complete_multipart_upload",
            Bucket=self._bucket,
            Key=self._name,
            UploadId=self._id,
            MultipartUpload={"Parts": self._done},
        )

    def abort(self) -> None:
        for _, future in self._in_flight:
            future.cancel()
        if self._id is not None:
            try:
                self._blobs._call("abort_multipart_upload", Bucket=self._bucket, Key=self._name, UploadId=self._id)
            except OSError:
                pass  # the next writer's cleanup aborts it


def _server_age(response: dict[str, Any], stamp: _dt.datetime) -> float:
    """How long ago ``stamp`` was, by the server's clock (its ``Date`` header): immune to clock skew
    between the hosts that write and the host that asks."""
    header = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = _dt.datetime.now(_dt.timezone.utc)
    if header:
        from email.utils import parsedate_to_datetime

        try:
            now = parsedate_to_datetime(header)
        except (TypeError, ValueError):
            pass
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=_dt.timezone.utc)
    return max(0.0, (now - stamp).total_seconds())


def _lost_condition(exc: BaseException) -> bool:
    """Whether an S3 error is a failed precondition (412) or a concurrent conditional write (409)."""
    cause = exc.__cause__ or exc.__context__
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (
        isinstance(exc, FileExistsError)
        or status in (409, 412)
        or code
        in (
            "PreconditionFailed",
            "ConditionalRequestConflict",
        )
    )


def blobs_for(fs: Any) -> Blobs:
    """The adapter for fsspec filesystem ``fs``."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols or "s3a" in protocols:
        return S3Blobs(fs)
    if "memory" in protocols:
        return MemoryBlobs(fs)
    return Blobs(fs)
