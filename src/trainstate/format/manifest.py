"""The manifest: typed description of a checkpoint whose JSON form is the compatibility contract.

``manifest.json`` is written last; its presence is what makes a checkpoint exist. The file ends
with a fixed trailer holding an xxh3-128 checksum of every byte before it, so a single flipped
bit anywhere in the manifest is detected, while the file stays plain JSON for any reader.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from trainstate.errors import CorruptCheckpointError, UnsupportedFormatError
from trainstate.format.hashing import HASH_ALGORITHM, new_hasher
from trainstate.storage.base import MANIFEST_NAME, check_name

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SINGLE_PROCESS_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "FileEntry",
    "Manifest",
]

FORMAT_NAME = "trainstate"
FORMAT_VERSION = 3
"""The newest version this trainstate reads and writes. Version 3: a distributed (sharded) checkpoint,
whose ``sharded`` section lists each tensor's chunks. Version 2 (what a single process writes):
compact JSON; tensor references omit their key when it is their path, and a CPU device. Version 1
checkpoints load unchanged."""
SINGLE_PROCESS_VERSION = 2
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_TRAILER = re.compile(rb',\n "checksum": "([0-9a-f]{32})"\n}\n\Z')
_TRAILER_LEN = len(b',\n "checksum": ""\n}\n') + 32


def _checksum(body: bytes) -> str:
    hasher = new_hasher()
    hasher.update(body)
    return hasher.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """A data file of the checkpoint: its name, exact size and content hash."""

    name: str
    size: int
    hash: str


@dataclass(frozen=True)
class Manifest:
    """Everything known about a checkpoint without reading its tensor data."""

    tree: Any
    files: tuple[FileEntry, ...]
    metadata: Any = None
    environment: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    trainstate_version: str = ""
    torch_version: str = ""
    format_version: int = SINGLE_PROCESS_VERSION
    sharded: Any = None  # format 3: {"world_size", "tensors": {key: {dtype, shape, chunks}}, "per_rank"}

    def to_json(self) -> bytes:
        """Serialize, ending with the checksum trailer."""
        body = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "trainstate_version": self.trainstate_version,
            "torch_version": self.torch_version,
            "created": self.created,
            "hash_algorithm": HASH_ALGORITHM,
            "environment": self.environment,
            "metadata": self.metadata,
            "files": [{"name": f.name, "size": f.size, "hash": f.hash} for f in self.files],
            "tree": self.tree,
        }
        if self.sharded is not None:
            body["sharded"] = self.sharded
        # Compact: indentation alone made a large model's manifest several times bigger.
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        assert text.endswith(b"}")
        prefix = text[:-1]
        return prefix + b',\n "checksum": "' + _checksum(prefix).encode() + b'"\n}\n'

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Manifest:
        """Parse and validate; raises CorruptCheckpointError or UnsupportedFormatError naming ``where``."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} cap")
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f'{where}: not a trainstate manifest (no "format": "{FORMAT_NAME}")')
        version = body.get("format_version")
        if type(version) is not int:
            raise CorruptCheckpointError(f"{where}: format_version {version!r} is not an integer")
        if version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"{where}: written in format version {version} by trainstate {body.get('trainstate_version')!r}; "
                f"this trainstate reads up to version {FORMAT_VERSION}, upgrade it to load this checkpoint"
            )
        match = _TRAILER.search(data[-_TRAILER_LEN:])
        if match is None or _checksum(data[: len(data) - _TRAILER_LEN]) != match.group(1).decode():
            raise CorruptCheckpointError(f"{where}: manifest checksum mismatch (the manifest was modified or damaged)")
        if body.get("hash_algorithm") != HASH_ALGORITHM:
            raise UnsupportedFormatError(f"{where}: unknown hash algorithm {body.get('hash_algorithm')!r}")
        files = body.get("files")
        if not isinstance(files, list):
            raise CorruptCheckpointError(f'{where}: "files" must be a list')
        entries = []
        for item in files:
            if not isinstance(item, dict):
                raise CorruptCheckpointError(f"{where}: file entry {item!r} is not an object")
            name = check_name(item.get("name"), where=where)  # type: ignore[arg-type]
            size, digest = item.get("size"), item.get("hash")
            if type(size) is not int or size < 0 or not isinstance(digest, str):
                raise CorruptCheckpointError(f"{where}: file entry {name!r} has an invalid size or hash")
            entries.append(FileEntry(name, size, digest))
        if len({e.name for e in entries}) != len(entries) or MANIFEST_NAME in {e.name for e in entries}:
            raise CorruptCheckpointError(f"{where}: file names in the manifest are not unique")
        environment = body.get("environment")
        sharded = body.get("sharded")
        if sharded is not None and (version < 3 or not isinstance(sharded, dict)):
            raise CorruptCheckpointError(f'{where}: "sharded" must be an object, and only in format version 3')
        return cls(
            tree=body.get("tree"),
            files=tuple(entries),
            metadata=body.get("metadata"),
            environment=environment if isinstance(environment, dict) else {},
            created=str(body.get("created", "")),
            trainstate_version=str(body.get("trainstate_version", "")),
            torch_version=str(body.get("torch_version", "")),
            format_version=version,
            sharded=sharded,
        )
