"""Promise 4 of the reliability campaign: hostile input is inert.

A checkpoint is untrusted input (DESIGN.md §3). Malformed manifests and safetensors files — built
with valid checksum trailers (through ``Manifest(...).to_json()``, or the byte-identical `seal`) and
with correct file sizes and content hashes, so that neither the checksum nor the hash is what
rejects them — are fed to ``trainstate.load`` (plain, ``verify=False``, and into a live module) and
to a full verify. Every call runs under `guarded`, which asserts:

* **only CheckpointError escapes**: any other exception fails the test with its traceback;
* **no file outside the checkpoint is opened** (an audit hook records every ``open`` event; a path
  inside the checkpoint that resolves outside must have been opened with ``O_NOFOLLOW``);
* **no code execution**: no ``exec``/``compile``/``import``/``os.system``/``subprocess.Popen``/
  ``os.exec*``/``os.posix_spawn``/``os.spawn*``/``os.fork``/``pickle.find_class``/``marshal`` event;
* **bounded allocation**: every tensor allocation requested through ``torch.empty`` & co. (which
  tracemalloc cannot see) and their sum stay within the bytes of the files on disk; the explicit
  huge-size tests also bound Python-heap growth with tracemalloc.

The fuzzers are hypothesis tests with explicit ``max_examples`` and ``derandomize=True`` (no example
database), so CI runs the same >= 10,000 cases every time. Real bugs the campaign found are pinned
by ``xfail(strict=True)`` tests below; while one is open, the fuzzers count inputs that hit its
exact signature (`KNOWN_BUGS`) instead of failing, and fail on anything else. Fixing a bug turns its
xfail into an XPASS (a failure under strict): then remove the mark and its `KNOWN_BUGS` entry.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import pickle
import reprlib
import shutil
import struct
import subprocess
import sys
import threading
import traceback
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import trainstate
from trainstate import CheckpointError
from trainstate.format import MANIFEST_NAME, CheckpointReader, FileEntry, Manifest
from trainstate.storage import split_path

TENSOR_FILE = "tensors-00000.safetensors"
TRAILER = b',\n "checksum": "'
TRAINSTATE_DIR = os.path.dirname(trainstate.__file__) + os.sep
# Reproducible in CI: the same examples every run, no example database, no timing-based failures.
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True)

# ------------------------------------------------------------------------------------------- the guard

FORBIDDEN_EVENTS = frozenset(
    {
        "exec",
        "compile",
        "import",  # only raised for modules not yet imported: running their code
        "marshal.load",
        "marshal.loads",
        "os.system",
        "subprocess.Popen",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "pickle.find_class",
        "ctypes.dlopen",
    }
)
FORBIDDEN_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")


class _Audit:
    """The process-wide audit hook. ``sys.addaudithook`` hooks cannot be removed, so it is installed
    once and only records while ``active`` is set (by `guarded`, around one call)."""

    installed = False
    active = False
    bystanders: frozenset[int] = frozenset()  # threads that existed before the guarded call began
    opened: list[tuple[Any, int]] = []
    events: list[tuple[str, str, tuple[str, ...]]] = []


def _frames() -> tuple[str, ...]:
    """``file:function`` of the Python frames that raised the event, innermost first (no I/O)."""
    out: list[str] = []
    frame: FrameType | None = sys._getframe(2)
    while frame is not None and len(out) < 40:
        out.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}")
        frame = frame.f_back
    return tuple(out)


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if not _Audit.active or threading.get_ident() in _Audit.bystanders:
        return
    if event == "open":
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        _Audit.opened.append((args[0], flags))
    elif event in FORBIDDEN_EVENTS or event.startswith(FORBIDDEN_PREFIXES):
        _Audit.events.append((event, reprlib.repr(args), _frames()))


def _install_audit_hook() -> None:
    if not _Audit.installed:
        sys.addaudithook(_audit_hook)
        _Audit.installed = True


_ALLOCATORS = ("empty", "zeros", "ones", "full", "empty_strided", "rand", "randn")


def _requested_bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    size: Any = kwargs.get("size", args[0] if len(args) == 1 or not all(isinstance(a, int) for a in args) else args)
    if isinstance(size, int):
        size = (size,)
    numel = 1
    for dim in size:
        numel *= int(dim)
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    return numel * dtype.itemsize


@dataclasses.dataclass
class Guard:
    """What one guarded call did: files it opened, forbidden events, tensor bytes it asked for."""

    root: Path
    opened: list[tuple[Any, int]]
    events: list[tuple[str, str, tuple[str, ...]]]
    allocations: list[int]

    def problems(self, budget: int, *, known: Counter[str] | None = None) -> list[str]:
        """Violations of the promise; ``budget`` is the number of bytes on disk in the checkpoint.
        With ``known``, audit events of an open bug (`KNOWN_EVENTS`) are counted there instead."""
        out = []
        root = os.path.abspath(self.root)
        real_root = os.path.realpath(self.root)
        for path, flags in self.opened:
            if isinstance(path, int):  # os.fdopen of a descriptor whose open was recorded already
                continue
            text = os.fsdecode(path)
            if not os.path.abspath(text).startswith(root + os.sep):
                out.append(f"opened a file outside the checkpoint: {text!r}")
            elif not os.path.realpath(text).startswith(real_root + os.sep) and not flags & os.O_NOFOLLOW:
                out.append(f"followed a symlink out of the checkpoint: {text!r} -> {os.path.realpath(text)!r}")
        for event, args, frames in self.events:
            bug = known_event(event, frames) if known is not None else None
            if bug is not None and known is not None:
                known[bug] += 1
            else:
                out.append(f"audit event {event} {args} at {' <- '.join(frames[:8])}")
        if any(n > budget for n in self.allocations) or sum(self.allocations) > budget:
            out.append(f"tensor allocations {self.allocations} exceed the {budget} bytes on disk")
        return out


@contextmanager
def guarded(root: Path) -> Iterator[Guard]:
    """Record opens, forbidden audit events and tensor allocations of the code run inside."""
    _install_audit_hook()
    guard = Guard(root, [], [], [])
    originals = {name: getattr(torch, name) for name in _ALLOCATORS}

    def recording(name: str) -> Callable[..., Any]:
        real = originals[name]

        def allocate(*args: Any, **kwargs: Any) -> Any:
            try:
                guard.allocations.append(_requested_bytes(args, kwargs))
            except Exception:  # noqa: BLE001 - an unparsable size is torch's to reject
                guard.allocations.append(-1)
            return real(*args, **kwargs)

        return allocate

    for name in _ALLOCATORS:
        setattr(torch, name, recording(name))
    _Audit.opened, _Audit.events = guard.opened, guard.events
    current = threading.get_ident()
    _Audit.bystanders = frozenset(t.ident for t in threading.enumerate() if t.ident not in (None, current))
    _Audit.active = True
    try:
        yield guard
    finally:
        _Audit.active = False
        for name, real in originals.items():
            setattr(torch, name, real)


def disk_bytes(root: Path) -> int:
    """Bytes of the regular files directly in ``root`` (symlink targets do not count)."""
    total = 0
    for entry in os.scandir(root):
        if entry.is_file(follow_symlinks=False):
            total += entry.stat(follow_symlinks=False).st_size
    return total


# Open bugs (see the xfail tests): exception type, file and function of the innermost trainstate frame.
KNOWN_BUGS: dict[str, tuple[type[BaseException], str, str | None]] = {}
# Open bugs that show as audit events: event name and a frame (``file:function``) that raised it.
KNOWN_EVENTS: dict[str, tuple[str, str]] = {}


def known_event(event: str, frames: tuple[str, ...]) -> str | None:
    for name, (kind, frame) in KNOWN_EVENTS.items():
        if event == kind and frame in frames:
            return name
    return None


def known_bug(exc: BaseException) -> str | None:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(TRAINSTATE_DIR)]
    if not frames:
        return None
    inner = frames[-1]
    for name, (kind, file, function) in KNOWN_BUGS.items():
        if type(exc) is kind and inner.filename.endswith(file) and function in (None, inner.name):
            return name
    return None


def _verify(path: Path) -> None:
    CheckpointReader(*split_path(path)).verify()


def live_target() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"m": torch.nn.Linear(3, 2)}


def operations(live: bool) -> list[tuple[str, Callable[[Path], Any]]]:
    ops: list[tuple[str, Callable[[Path], Any]]] = [
        ("load", trainstate.load),
        ("load verify=False", lambda p: trainstate.load(p, verify=False)),
        ("verify", _verify),
    ]
    if live:
        target = live_target()  # built outside the guard: its own allocations are not the checkpoint's
        ops.append(("load into module", lambda p: trainstate.load(p, target)))
    return ops


def attack(
    root: Path,
    *,
    live: bool = False,
    tally: Counter[str] | None = None,
    allow_known: bool = True,
    ops: list[tuple[str, Callable[[Path], Any]]] | None = None,
) -> dict[str, str]:
    """Run every operation on the checkpoint at ``root`` under the guard; returns op -> outcome
    (``"loaded"`` or the CheckpointError subclass). Anything else fails the test with details."""
    budget = disk_bytes(root)
    outcomes = {}
    for op, fn in operations(live) if ops is None else ops:
        error: BaseException | None = None
        with guarded(root) as guard:
            try:
                fn(root)
                outcome = "loaded"
            except CheckpointError as exc:
                outcome = type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - what escapes is the finding
                error = exc
        if error is not None:  # classified outside the guard: formatting a traceback reads source files
            outcome = f"KNOWN BUG {known_bug(error)}"
        if error is not None and (not allow_known or known_bug(error) is None):
            pytest.fail(
                f"{op}: {type(error).__name__} escaped (only CheckpointError may):\n"
                + "".join(traceback.format_exception(error))
                + describe(root),
                pytrace=False,
            )
        known: Counter[str] = Counter()
        problems = guard.problems(budget, known=known if allow_known else None)
        if problems:
            pytest.fail(f"{op} ({outcome}):\n  " + "\n  ".join(problems) + "\n" + describe(root), pytrace=False)
        outcomes[op] = outcome
        if tally is not None:
            tally[f"{op}: {outcome}"] += 1
            for bug in known:
                tally[f"{op}: audit events of KNOWN BUG {bug}"] += 1
    return outcomes


def assert_rejected(outcomes: dict[str, str], *, by_verify: bool = True) -> None:
    """Every load raised a CheckpointError; so did verify unless the fault is in the manifest's tree
    (verify checks the files' integrity, not what the tree decodes to)."""
    ops = [op for op in outcomes if op.startswith("load") or by_verify]
    assert all(outcomes[op] != "loaded" for op in ops), outcomes


def describe(root: Path) -> str:
    lines = [f"checkpoint {root}:"]
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_symlink():
            lines.append(f"  {entry.name!r} -> {os.readlink(entry.path)!r}")
        elif entry.is_file():
            with open(entry.path, "rb") as f:
                data = f.read(600)
            lines.append(f"  {entry.name!r} ({entry.stat().st_size} bytes): {data!r}")
        else:
            lines.append(f"  {entry.name!r} (not a regular file)")
    return "\n".join(lines)


def summarize(title: str, tally: Counter[str], cases: int) -> None:
    text = f"{title}: {cases} cases\n" + "\n".join(f"  {k}: {n}" for k, n in sorted(tally.items()))
    print("\n" + text)
    target = os.environ.get("TRAINSTATE_RELIABILITY_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": title, "cases": cases, "outcomes": dict(tally)}) + "\n")


# ------------------------------------------------------------------------------------ building inputs


def seal(text: bytes) -> bytes:
    """End ``text`` (JSON ending in ``\\n}``, or any bytes) with the manifest's checksum trailer,
    exactly as `Manifest.to_json` does (pinned by `test_seal_is_manifest_to_json`)."""
    prefix = text[:-2] if text.endswith(b"\n}") else text
    return prefix + TRAILER + xxhash.xxh3_128(prefix).hexdigest().encode() + b'"\n}\n'


def unseal(data: bytes) -> bytes:
    """The JSON text of a sealed manifest without its trailer (ending in ``\\n}``)."""
    return data[: data.rindex(TRAILER)] + b"\n}"


def entry_for(name: str, blob: bytes) -> FileEntry:
    return FileEntry(name, len(blob), xxhash.xxh3_128(blob).hexdigest())


def safetensors(header: Any, data: bytes = b"", *, prefix: int | None = None, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text) if prefix is None else prefix) + text + data


@dataclasses.dataclass
class Arena:
    """A checkpoint directory rewritten for each case, and files outside it for symlinks to target."""

    root: Path
    ckpt: Path
    outside: Path
    pristine: dict[str, bytes]  # a real checkpoint's files (saved by trainstate.save)
    state: dict[str, Any]

    def reset(self) -> None:
        for entry in os.scandir(self.ckpt):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    def write(self, files: Mapping[str, bytes | Link | None]) -> Path:
        """Replace the checkpoint's content: bytes, a symlink to an outside file, or nothing (None)."""
        self.reset()
        for name, content in files.items():
            path = self.ckpt / name
            if isinstance(content, Link):
                os.symlink(content.target(self), path)
            elif content is not None:
                path.write_bytes(content)
        return self.ckpt


@dataclasses.dataclass(frozen=True)
class Link:
    """A symlink whose target is an outside file holding ``content`` (valid bytes, so following the
    link would load), or ``special`` ("dangling", "directory", "/etc/passwd")."""

    content: bytes = b""
    special: str = ""

    def target(self, arena: Arena) -> str:
        if self.special == "dangling":
            return str(arena.outside / "missing")
        if self.special == "directory":
            return str(arena.outside)
        if self.special:
            return self.special
        path = arena.outside / f"target-{xxhash.xxh3_64(self.content).hexdigest()}"
        path.write_bytes(self.content)
        return str(path)


def pristine_state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "m": torch.nn.Linear(3, 2),
        "w": torch.arange(6.0).reshape(2, 3),
        "h": torch.arange(4, dtype=torch.int16),
        "n": np.arange(4, dtype=np.int16),
        "s": np.float32(1.5),
        "step": 3,
        "big": 2**70,
        "t": (1, 2.5, None),
        "d": {1: "x", "k": [True, "y"]},
        "b": b"xy",
        "size": torch.Size([2, 3]),
        "dtype": torch.float16,
        "dev": torch.device("cpu"),
        "inf": math.inf,
    }


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Arena:
    root = tmp_path_factory.mktemp("hostile")
    (root / "ckpt").mkdir()
    (root / "outside").mkdir()
    state = pristine_state()
    trainstate.save(root / "saved", state, shard_bytes=24)
    pristine = {p.name: p.read_bytes() for p in sorted((root / "saved").iterdir())}
    # Pin the creation time and saving host so that byte-level edits are the same on every run.
    manifest = Manifest.from_json(pristine[MANIFEST_NAME], where="saved")
    environment = {**manifest.environment, "hostname": "reliability-host", "python": "3"}
    pristine[MANIFEST_NAME] = dataclasses.replace(
        manifest, created="2024-01-01T00:00:00.000+00:00", environment=environment
    ).to_json()
    assert len(pristine) >= 3, "want several tensor files (parallel reads)"
    stored = {}
    for name in files_of(pristine):
        data = pristine[name]
        stored.update(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]))
    for key, dtype, shape in PRISTINE_REFS:  # the refs the fuzzers start from are real
        assert stored[key]["shape"] == shape and ST_TO_TORCH[stored[key]["dtype"]] == dtype, key
    arena = Arena(root, root / "ckpt", root / "outside", pristine, state)
    # Warm every code path once (lazy imports inside torch/numpy happen here, not under the guard).
    for name, blob in pristine.items():
        (arena.outside / name).write_bytes(blob)
    arena.write(dict(pristine))
    for _, fn in [*operations(live=True), *cli_operations()]:
        fn(arena.ckpt)
    for bad in (b"", b"{}", seal(b'{"format": "trainstate", "format_version": 1}')):
        arena.write({**pristine, MANIFEST_NAME: bad})
        for _, fn in operations(live=True):
            with pytest.raises(CheckpointError):
                fn(arena.ckpt)
    return arena


# ------------------------------------------------------------------------------------- hostile values

HUGE = [2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100]
NEGATIVE = [-1, -(2**31), -(2**63), -(2**64)]
BAD_NAMES = [
    "",
    ".",
    "..",
    "../x.safetensors",
    "../../ckpt/tensors-00000.safetensors",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    "\x00",
    ".hidden",
    "x" * 256,
    MANIFEST_NAME,
    f"{TENSOR_FILE}/..",
    "~",
    " ",
    "@OUTSIDE@",
    "tensors-00099.safetensors",
    "ünïcode",
    "con",
    "-rf",
]
DEVICES = [
    "cpu",
    "cuda",
    "cuda:0",
    "cuda:7",
    "meta",
    "mps",
    "xla",
    "cpu:0",
    "foo",
    "",
    "cuda:-1",
    "cuda:99999999999999999999",
    "\x00",
    "cpu" * 30,
    "privateuseone",
    "hpu:0",
]
# Every torch dtype name, plus attributes of the torch module that are not dtypes. The lazily
# imported submodules ("_dynamo", "_inductor", "_export", "onnx") are left to the subprocess test of
# bug B5: importing them here would change the process for every later test.
TORCH_DTYPES = sorted({str(v).removeprefix("torch.") for v in vars(torch).values() if isinstance(v, torch.dtype)})
DTYPE_NAMES = [
    *TORCH_DTYPES,
    "Tensor",
    "nn",
    "float",
    "long",
    "_C",
    "zeros",
    "has_cuda",
    "__class__",
    "F32",
    "f32",
    "torch.float32",
    "float32 ",
    "",
    "float128",
    "x" * 300,
]
# safetensors dtype -> (torch dtype name, item size)
ST_DTYPE_INFO = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1),
}
ST_DTYPES = list(ST_DTYPE_INFO)
ST_TO_TORCH = {k: name for k, (name, _) in ST_DTYPE_INFO.items()}
ST_ITEMSIZE = {k: size for k, (_, size) in ST_DTYPE_INFO.items()}
NP_DTYPES = [
    "(2,i4",
    "(1e400,)i4",
    "([1],)f4",
    "<f4",
    "<i2",
    "|u1",
    "|b1",
    ">f8",
    "<c16",
    "O",
    "V8",
    "<M8[ns]",
    "<U10",
    "|S5",
    "(2,)i4",
    "i4,f8",
    "float64",
    "int",
    "bogus",
    "V9999999999",
    "(4294967296,)f8",
]
TAGS = [
    "dict",
    "odict",
    "tuple",
    "list",
    "int",
    "float",
    "bytes",
    "size",
    "dtype",
    "device",
    "tensor",
    "ndarray",
    "npscalar",
    "stateful",
    "pickle",
    "",
    "x",
    "__class__",
]


class _RunsCommand:
    """Unpickling this calls ``os.system(command)``: the classic malicious-checkpoint payload."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


HARMLESS_PAYLOAD = pickle.dumps(_RunsCommand("true"))  # fuzz input: caught by the audit guard if run

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(HUGE + NEGATIVE),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(BAD_NAMES),
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
shape_values = st.one_of(
    st.lists(st.integers(0, 4), max_size=4),
    st.lists(st.sampled_from([0, 1, *HUGE, *NEGATIVE, 1.0, True, "2", None, [2]]), max_size=4),
    st.just(list(range(1, 70))),
    json_values,
)
offset_values = st.one_of(
    st.lists(st.sampled_from([0, 1, 4, 8, *HUGE, *NEGATIVE, 1.5, "0", None]), min_size=0, max_size=3),
    json_values,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@st.composite
def tagged_nodes(draw: st.DrawFn, kids: st.SearchStrategy[Any]) -> Any:
    """A ``{"@": tag, ...}`` node whose fields are mostly plausible, sometimes hostile."""
    tag = (
        draw(st.one_of(st.sampled_from(TAGS), json_scalars))
        if draw(st.integers(0, 9)) == 0
        else draw(st.sampled_from(TAGS))
    )
    node: dict[str, Any] = {"@": tag}
    plausible = draw(st.integers(0, 3)) > 0

    def pick(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
        return draw(valid if plausible and draw(st.integers(0, 3)) > 0 else st.one_of(hostile, json_values))

    if tag in ("dict", "odict"):
        if draw(st.booleans()):
            node["v"] = pick(st.dictionaries(st.text(max_size=4), kids, max_size=3), kids)
        else:
            pair = st.lists(kids, min_size=2, max_size=2)
            node["items"] = pick(st.lists(pair, max_size=3), st.lists(st.lists(kids, max_size=3), max_size=3))
        if draw(st.integers(0, 4)) == 0:
            node["meta"] = draw(kids)
    elif tag in ("tuple", "list"):
        node["v"] = pick(st.lists(kids, max_size=3), kids)
    elif tag == "int":
        node["v"] = pick(
            st.integers(-(2**200), 2**200).map(str),
            st.sampled_from(["1e5", " 7 ", "0x10", "1_000", "९", "9" * 4001, "", "-"]),
        )
    elif tag == "float":
        node["v"] = pick(st.sampled_from(["nan", "inf", "-inf"]), st.sampled_from(["NaN", "1.5", "Infinity", 1.5]))
    elif tag == "bytes":
        node["v"] = pick(st.binary(max_size=8).map(b64), st.sampled_from(["%%%", "YQ", "ä", "YWJj\n"]))
    elif tag == "size":
        node["v"] = pick(st.lists(st.integers(0, 5), max_size=3), shape_values)
    elif tag == "dtype":
        node["v"] = pick(st.sampled_from(DTYPE_NAMES), json_scalars)
    elif tag == "device":
        node["v"] = pick(st.sampled_from(DEVICES), json_scalars)
    elif tag in ("tensor", "ndarray"):
        node.update(draw(tensor_refs()))
        if tag == "ndarray" or draw(st.integers(0, 5)) == 0:
            node["np_dtype"] = pick(st.sampled_from(["<f4", "<i2", "|u1"]), st.sampled_from(NP_DTYPES))
            if draw(st.booleans()):
                node["np_shape"] = pick(st.lists(st.integers(0, 6), max_size=2), shape_values)
    elif tag == "npscalar":
        node["dtype"] = pick(st.sampled_from(["<f4", "<i8", "<c8", "|b1"]), st.sampled_from(NP_DTYPES))
        node["v"] = pick(st.binary(max_size=16).map(b64), json_scalars)
    elif tag == "stateful":
        node["type"] = draw(json_scalars)
        node["v"] = draw(kids)
    elif tag == "pickle":
        node["v"] = pick(st.just(b64(HARMLESS_PAYLOAD)), st.binary(max_size=16).map(b64))
    else:
        node.update(draw(st.dictionaries(st.sampled_from(["v", "items", "file", "key"]), kids, max_size=2)))
    return node


# Tensors of the pristine checkpoint (saved by `pristine_state`) that refs can point at.
PRISTINE_REFS = [
    ("m.weight", "float32", [2, 3]),
    ("m.bias", "float32", [2]),
    ("w", "float32", [2, 3]),
    ("h", "int16", [4]),
    ("n", "int16", [4]),
]


@st.composite
def tensor_refs(draw: st.DrawFn) -> dict[str, Any]:
    """Fields of a tensor ref: a real tensor of the pristine checkpoint, with some fields made hostile."""
    key, dtype, shape = draw(st.sampled_from(PRISTINE_REFS))
    ref: dict[str, Any] = {"file": "@FILE@", "key": key, "dtype": dtype, "shape": shape, "device": "cpu"}
    # sorted: set iteration order follows PYTHONHASHSEED, and the draws below must not
    for field in sorted(draw(st.sets(st.sampled_from(["file", "key", "dtype", "shape", "device", "param", "drop"])))):
        if field == "file":
            ref["file"] = draw(st.one_of(st.sampled_from(BAD_NAMES), json_scalars))
        elif field == "key":
            ref["key"] = draw(
                st.one_of(st.sampled_from([k for k, _, _ in PRISTINE_REFS] + ["missing", ""]), json_values)
            )
        elif field == "dtype":
            ref["dtype"] = draw(st.one_of(st.sampled_from(DTYPE_NAMES), json_scalars))
        elif field == "shape":
            ref["shape"] = draw(shape_values)
        elif field == "device":
            ref["device"] = draw(st.one_of(st.sampled_from(DEVICES), json_scalars))
        elif field == "param":
            ref["param"] = draw(json_scalars)
            ref["requires_grad"] = draw(json_scalars)
        else:
            del ref[draw(st.sampled_from(["file", "key", "dtype", "shape", "device"]))]
    return ref


tree_nodes = st.recursive(json_scalars, lambda kids: tagged_nodes(kids) | st.lists(kids, max_size=3), max_leaves=10)


def files_of(files: dict[str, bytes]) -> list[str]:
    return [n for n in files if n != MANIFEST_NAME]


def resolve(value: Any, arena: Arena, file_names: list[str], index: list[int]) -> Any:
    """Fill the placeholders: ``@FILE@`` -> the next real tensor file, ``@OUTSIDE@`` -> an absolute
    path of a valid tensor file outside the checkpoint."""
    if isinstance(value, str):
        if value == "@FILE@":
            index[0] += 1
            return file_names[index[0] % len(file_names)]
        if value == "@OUTSIDE@":
            return str(arena.outside / TENSOR_FILE)
        return value
    if isinstance(value, list):
        return [resolve(v, arena, file_names, index) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, arena, file_names, index) for k, v in value.items()}
    return value


def fix_refs(tree: Any, arena: Arena) -> Any:
    """Point each ref at the file that really holds its key (so the hostile field is the only fault)."""
    holder = {}
    for name in files_of(arena.pristine):
        data = arena.pristine[name]
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        holder.update({k: name for k in header if k != "__metadata__"})

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            if out.get("file") == "@FILE@" and isinstance(out.get("key"), str) and out["key"] in holder:
                out["file"] = holder[out["key"]]
            return out
        return node

    return walk(tree)


# --------------------------------------------------------------------------------- the guard's honesty


def test_guard_reports_every_kind_of_violation(tmp_path: Path) -> None:
    """Each check of the guard can fail: exec, subprocess, unpickling, opening outside, following a
    symlink out, oversized allocations — and a foreign exception escaping fails `attack`."""
    inside = tmp_path / "ckpt"
    inside.mkdir()
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", inside / "link")
    cases: dict[str, Callable[[], Any]] = {
        "exec": lambda: exec("1"),
        "compile": lambda: compile("1", "<hostile>", "eval"),
        "subprocess.Popen": lambda: subprocess.run(["true"], check=True),
        "os.system": lambda: os.system("true"),
        "pickle.find_class": lambda: pickle.loads(pickle.dumps(Counter)),
        "outside": lambda: open(tmp_path / "secret", "rb").close(),
        "symlink": lambda: open(inside / "link", "rb").close(),
        "allocation": lambda: torch.empty(1 << 20, dtype=torch.uint8),
    }
    for name, action in cases.items():
        with guarded(inside) as guard:
            action()
        problems = guard.problems(budget=1024)
        assert problems, f"the guard missed {name}"
        assert name in " ".join(problems) or name in ("outside", "symlink", "allocation"), problems
    with guarded(inside) as guard:  # O_NOFOLLOW opens of a planted symlink are refusals, not reads
        with pytest.raises(OSError):
            os.open(inside / "link", os.O_RDONLY | os.O_NOFOLLOW)
    assert guard.problems(budget=0) == []
    (inside / "manifest.json").write_bytes(b"{}")
    with pytest.raises(pytest.fail.Exception, match="ZeroDivisionError escaped"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trainstate, "load", lambda *a, **k: 1 / 0)
            attack(inside)


def test_seal_is_manifest_to_json(arena: Arena) -> None:
    """`seal` produces exactly the trailer `Manifest.to_json` writes, so sealed inputs are valid manifests."""
    data = arena.pristine[MANIFEST_NAME]
    assert seal(unseal(data)) == data
    manifest = Manifest(tree={"a": 1}, files=(FileEntry("x", 1, "h"),), metadata=[1, "b"])
    assert seal(unseal(manifest.to_json())) == manifest.to_json()


def test_pristine_checkpoint_passes_the_guard(arena: Arena) -> None:
    """Control: a real checkpoint loads under the guard with no violation, and exactly."""
    arena.write(dict(arena.pristine))
    assert set(attack(arena.ckpt, live=True, allow_known=False).values()) == {"loaded"}
    loaded = trainstate.load(arena.ckpt)
    assert torch.equal(loaded["w"], arena.state["w"]) and loaded["big"] == 2**70 and loaded["t"] == (1, 2.5, None)
    target = live_target()
    torch.nn.init.zeros_(target["m"].weight)
    trainstate.load(arena.ckpt, target)
    assert torch.equal(target["m"].weight, arena.state["m"].weight)


# ------------------------------------------------------------------------------- fuzz: safetensors files


@st.composite
def hostile_tensor_files(draw: st.DrawFn) -> tuple[bytes, Any, str]:
    """A safetensors file with 1-3 tensors, mutated 1-3 times, and the manifest tree referring to it.

    Offsets are laid out after the mutations (contiguous unless a mutation set them), so a mutated
    shape or dtype is the only fault, not a side effect. Returns (file bytes, tree, placement); the
    manifest written with it lists the file with its true size and hash, so only header and ref
    validation can reject it.
    """
    entries: list[list[Any]] = []  # [key, spec, bytes of data it occupies]
    for i in range(draw(st.integers(1, 3))):
        st_dtype = draw(st.sampled_from(ST_DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        entries.append([f"t{i}", {"dtype": st_dtype, "shape": shape}, math.prod(shape) * ST_ITEMSIZE[st_dtype]])
    refs = [
        {
            "@": "tensor",
            "file": TENSOR_FILE,
            "key": key,
            "dtype": ST_TO_TORCH[spec["dtype"]],
            "shape": spec["shape"],
            "device": "cpu",
        }
        for key, spec, _ in entries
    ]
    metadata: Any = {"format": "pt"}
    prefix: Any = None
    raw: bytes | None = None
    data_edit: str | None = None
    dropped: set[int] = set()
    later: list[tuple[str, int, Any]] = []  # offset edits applied once the layout is known
    for mutation in draw(st.lists(st.sampled_from(HEADER_MUTATIONS), min_size=1, max_size=3)):
        i = draw(st.integers(0, len(entries) - 1))
        spec = entries[i][1] if isinstance(entries[i][1], dict) else {}  # not an object: nothing to edit
        if mutation == "dtype":
            spec["dtype"] = draw(
                st.one_of(st.sampled_from([*ST_DTYPES, "F8_E8M0", "I4", "C128", "f32", "", "BOOL "]), json_values)
            )
        elif mutation == "shape":
            spec["shape"] = draw(shape_values)
        elif mutation == "offsets":
            spec["data_offsets"] = draw(offset_values)
        elif mutation in ("overlap", "shift"):
            later.append((mutation, i, draw(st.sampled_from([-8, -1, 1, 8, 2**64]))))
        elif mutation == "drop field":
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            spec.pop(field, None)
            if field == "data_offsets":
                dropped.add(i)
        elif mutation == "not an object":
            entries[i][1] = draw(json_values)
        elif mutation == "zero-size huge shape":  # header and manifest agree: validation lets it through
            dims = draw(st.lists(st.sampled_from(HUGE), min_size=1, max_size=3))
            shape = [0, *dims] if draw(st.booleans()) else [*dims, 0]
            spec["shape"] = shape
            entries[i][2] = 0
            refs[i]["shape"] = shape
        elif mutation == "huge declared size":
            size = draw(st.sampled_from(HUGE))
            spec.update(dtype="U8", shape=[size])
            entries[i][2] = size  # the layout claims it; the file holds a few bytes
            refs[i].update(dtype="uint8", shape=[size])
        elif mutation == "key":
            entries[i][0] = draw(
                st.one_of(st.sampled_from(["", "__metadata__", "t0", "k" * 1000]), st.text(max_size=8))
            )
        elif mutation == "metadata":
            metadata = draw(json_values)
        elif mutation == "length prefix":
            prefix = draw(st.sampled_from([0, 1, 7, 2**40, 2**63, 2**64 - 1, 100 * 2**20 + 1, "len-1", "len+1"]))
        elif mutation == "data length":
            data_edit = draw(st.sampled_from(["half", "extend", "empty", "one short"]))
        elif mutation == "header text":
            raw = draw(st.sampled_from(RAW_HEADERS))
        elif mutation == "ref":
            refs[i].update(
                draw(
                    st.dictionaries(
                        st.sampled_from(["dtype", "shape", "key", "file", "device"]),
                        st.one_of(json_scalars, st.sampled_from(DTYPE_NAMES + DEVICES)),
                        min_size=1,
                        max_size=2,
                    )
                )
            )
    offset, layout = 0, []
    for i, (_, spec, nbytes) in enumerate(entries):
        layout.append([offset, offset + nbytes])
        offset += nbytes
        if isinstance(spec, dict) and "data_offsets" not in spec and i not in dropped:
            spec["data_offsets"] = layout[-1]
    for mutation, i, delta in later:
        specs = [e[1] for e in entries]
        if mutation == "overlap" and isinstance(specs[i], dict):
            specs[i]["data_offsets"] = list(layout[(i + 1) % len(layout)])
        elif mutation == "shift":
            for spec in specs[i:]:
                if isinstance(spec, dict) and isinstance(spec.get("data_offsets"), list):
                    spec["data_offsets"] = [o + delta if type(o) is int else o for o in spec["data_offsets"]]
    size = min(offset, 4096)  # "huge declared size" layouts claim more than any file holds
    data = draw(st.binary(min_size=size, max_size=size))
    data = {
        None: data,
        "half": data[: len(data) // 2],
        "extend": data + bytes(8),
        "empty": b"",
        "one short": data[:-1],
    }[data_edit]
    header: dict[str, Any] = {}
    if draw(st.integers(0, 4)) > 0:
        header["__metadata__"] = metadata
    header.update({key if isinstance(key, str) else str(key): spec for key, spec, _ in entries})
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * draw(st.sampled_from([0, 0, 1, 7]))
    if prefix == "len-1":
        prefix = len(text) - 1
    elif prefix == "len+1":
        prefix = len(text) + 1
    blob = safetensors(None, data, prefix=prefix, raw=text)
    placement = draw(st.sampled_from(["file"] * 18 + ["symlink", "missing"]))
    return blob, {"@": "dict", "v": {f"r{i}": ref for i, ref in enumerate(refs)}}, placement


HEADER_MUTATIONS = [
    "dtype",
    "shape",
    "offsets",
    "overlap",
    "shift",
    "drop field",
    "not an object",
    "zero-size huge shape",
    "huge declared size",
    "key",
    "metadata",
    "length prefix",
    "data length",
    "header text",
    "ref",
]
RAW_HEADERS = [
    b"",
    b"[]",
    b"null",
    b"1",
    b'"x"',
    b"{",
    b"\xff\xfe{}",
    b"{}" + b"\x00" * 7,
    b'{"a":1,"a":2}',
    b'{"t0":{"dtype":"F32","shape":[NaN],"data_offsets":[0,Infinity]}}',
    b"[" * 10_000 + b"]" * 10_000,
    b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    b'{"' + b"k" * 200_000 + b'":{}}',
    '{"é":{}}'.encode("utf-16"),
]


@pytest.mark.slow
@settings(FUZZ, max_examples=4500)
@given(case=hostile_tensor_files())
def test_fuzz_safetensors_files(arena: Arena, case: tuple[bytes, Any, str]) -> None:
    """Malformed safetensors headers, offsets, sizes and data behind a manifest with a true hash."""
    blob, tree, placement = case
    manifest = Manifest(tree=tree, files=(entry_for(TENSOR_FILE, blob),)).to_json()
    placed: dict[str, bytes | Link | None] = {"file": blob, "symlink": Link(blob), "missing": None}
    content = placed[placement]
    attack(arena.write({MANIFEST_NAME: manifest, TENSOR_FILE: content}), tally=FUZZ_TALLY["safetensors files"])
    FUZZ_CASES["safetensors files"] += 1


FUZZ_TALLY: dict[str, Counter[str]] = {
    k: Counter() for k in ("safetensors files", "manifests", "manifest bytes", "manifests through the CLI")
}
FUZZ_CASES: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def fuzz_report() -> Iterator[None]:
    yield
    for title, tally in FUZZ_TALLY.items():
        if FUZZ_CASES[title]:
            summarize(f"fuzz: {title}", tally, FUZZ_CASES[title])


# ------------------------------------------------------------------------------------ fuzz: manifests


@st.composite
def hostile_manifests(draw: st.DrawFn, arena_files: list[str]) -> tuple[dict[str, Any], bool]:
    """Manifest fields (tree, files, metadata, environment, versions) with hostile parts; returns
    the keyword arguments for `Manifest` (or a raw body when ``raw``)."""
    tree_v: dict[str, Any] = {
        "m": {
            "@": "stateful",
            "type": "torch.nn.modules.linear.Linear",
            "v": {
                "@": "odict",
                "v": {
                    "weight": {
                        "@": "tensor",
                        "file": "@FILE@",
                        "key": "m.weight",
                        "dtype": "float32",
                        "shape": [2, 3],
                        "device": "cpu",
                        "param": True,
                        "requires_grad": True,
                    },
                    "bias": {
                        "@": "tensor",
                        "file": "@FILE@",
                        "key": "m.bias",
                        "dtype": "float32",
                        "shape": [2],
                        "device": "cpu",
                        "param": True,
                        "requires_grad": True,
                    },
                },
            },
        }
    }
    for key in draw(st.lists(st.text(max_size=4), min_size=1, max_size=3)):
        tree_v[f"x{key}"] = draw(tree_nodes)
    if draw(st.integers(0, 4)) == 0:  # damage the live module's own entry too
        tree_v["m"]["v"] = draw(tree_nodes)
    tree: Any = {"@": "dict", "v": tree_v} if draw(st.integers(0, 9)) else draw(tree_nodes)
    fields: dict[str, Any] = {"tree": tree, "metadata": draw(st.one_of(st.none(), json_values, tree_nodes))}
    if draw(st.integers(0, 3)) == 0:
        fields["environment"] = draw(json_values)
    if draw(st.integers(0, 5)) == 0:
        fields["format_version"] = draw(st.sampled_from([0, -1, 2, 2**64, 1.0, "1", True, None, [1]]))
    files = [FileEntry("@REAL@", "@REAL@", "@REAL@")]  # type: ignore[arg-type]
    if draw(st.integers(0, 2)) == 0:
        extra = st.builds(
            FileEntry,
            st.one_of(st.sampled_from(BAD_NAMES + arena_files), json_scalars),
            st.one_of(st.sampled_from([0, 1, 10, *HUGE, *NEGATIVE]), json_scalars),
            st.one_of(st.sampled_from(["", "0" * 32]), json_scalars),
        )
        files += draw(st.lists(extra, min_size=1, max_size=2))
    fields["files"] = files
    raw = draw(st.integers(0, 7)) == 0
    if raw:  # top-level shapes Manifest cannot express
        fields["@top"] = draw(
            st.sampled_from(
                [
                    "files not a list",
                    "file entry not an object",
                    "no format",
                    "hash algorithm",
                    "extra keys",
                    "missing tree",
                ]
            )
        )
        fields["@value"] = draw(json_values)
    return fields, raw


def build_manifest(fields: dict[str, Any], raw: bool, arena: Arena) -> bytes:
    names = files_of(arena.pristine)
    real = {n: entry_for(n, arena.pristine[n]) for n in names}
    files: list[FileEntry] = []
    for entry in fields["files"]:
        if entry.name == "@REAL@":
            files.extend(real.values())
        else:
            files.append(FileEntry(resolve(entry.name, arena, names, [0]), entry.size, entry.hash))
    tree = resolve(fix_refs(fields["tree"], arena), arena, names, [0])
    kwargs = {k: v for k, v in fields.items() if not k.startswith("@") and k not in ("tree", "files")}
    manifest = Manifest(tree=tree, files=tuple(files), **kwargs)
    if not raw:
        return manifest.to_json()
    body = json.loads(unseal(manifest.to_json()))
    value, top = fields["@value"], fields["@top"]
    if top == "files not a list":
        body["files"] = value if not isinstance(value, list) else {"0": value}
    elif top == "file entry not an object":
        body["files"] = [*body["files"], value if not isinstance(value, dict) else [value]]
    elif top == "no format":
        body.pop("format")
    elif top == "hash algorithm":
        body["hash_algorithm"] = value
    elif top == "extra keys":
        body[json.dumps(value)] = value
    elif top == "missing tree":
        body.pop("tree")
    return seal(json.dumps(body, indent=1, ensure_ascii=False).encode())


def cli_operations() -> list[tuple[str, Callable[[Path], Any]]]:
    """Every read-only CLI command on one checkpoint, with ``--debug`` so that an error reaches the
    guard as the exception it is (not only as a red line)."""
    import typer
    from click.testing import CliRunner
    from rich.cells import cell_len

    from trainstate.cli.app import app

    cli = typer.main.get_command(app)  # built here: typer evaluates annotations (compile/exec) to build it
    cell_len("ü中😀\u0301")  # rich imports its Unicode width tables on the first wide character

    def command(*args: str) -> Callable[[Path], Any]:
        def run(path: Path) -> None:
            result = CliRunner().invoke(cli, [*(a.replace("@", str(path)) for a in args), "--debug"])
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            assert "internal error" not in result.output

        return run

    return [
        ("cli ls --verify", command("ls", "@", "--verify", "--json")),
        ("cli inspect", command("inspect", "@", "--depth", "9")),
        ("cli inspect --values --json", command("inspect", "@", "--values", "--json")),
        ("cli verify", command("verify", "@")),
        ("cli diff", command("diff", "@", "@")),
    ]


@pytest.mark.slow
@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_fuzz_manifests_through_the_cli(arena: Arena, data: st.DataObject) -> None:
    """The hostile manifests of `test_fuzz_manifests`, fed to every read-only CLI command: each one
    prints a result or one CheckpointError line, under the same guard as `trainstate.load`."""
    fields, raw = data.draw(hostile_manifests(files_of(arena.pristine)))
    checkpoint = arena.write({**arena.pristine, MANIFEST_NAME: build_manifest(fields, raw, arena)})
    attack(checkpoint, ops=cli_operations(), tally=FUZZ_TALLY["manifests through the CLI"])
    FUZZ_CASES["manifests through the CLI"] += 1


@pytest.mark.slow
@settings(FUZZ, max_examples=4000)
@given(data=st.data())
def test_fuzz_manifests(arena: Arena, data: st.DataObject) -> None:
    """Wrong types and values everywhere in the manifest tree, file list and top level, loaded plainly
    and into a live module; the real tensor files sit beside it."""
    fields, raw = data.draw(hostile_manifests(files_of(arena.pristine)))
    manifest = build_manifest(fields, raw, arena)
    attack(arena.write({**arena.pristine, MANIFEST_NAME: manifest}), live=True, tally=FUZZ_TALLY["manifests"])
    FUZZ_CASES["manifests"] += 1


# ------------------------------------------------------------------------------- fuzz: manifest bytes

RAW_MANIFESTS = [
    b"",
    b"\x00",
    b"{}",
    b"[]",
    b"null",
    b'"trainstate"',
    b"\xef\xbb\xbf{}",
    b"[" * 10_000 + b"]" * 10_000,
    b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    b'{"format":"trainstate","x":"' + b"g" * 1_000_000 + b'"}',
    '{"format": "trainstate"}'.encode("utf-16"),
    TRAILER,
    b"\x80\x04\x95",
]


@st.composite
def hostile_manifest_bytes(draw: st.DrawFn, pristine: bytes) -> bytes:
    kind = draw(st.sampled_from(["edit", "edit", "edit", "json", "constant", "binary", "pickle"]))
    if kind == "edit":  # byte-level edits of the real manifest, usually re-sealed so the checksum passes
        data = bytearray(unseal(pristine))
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data)))
            op = draw(st.sampled_from(["replace", "delete", "insert", "duplicate"]))
            chunk = draw(
                st.binary(min_size=1, max_size=8)
                | st.sampled_from([b'"', b"{", b"[", b"]", b"}", b",", b"\\u0000", b"1e999", b"-"])
            )
            if op == "replace":
                data[at : at + len(chunk)] = chunk
            elif op == "delete":
                del data[at : at + draw(st.integers(1, 64))]
            elif op == "insert":
                data[at:at] = chunk
            else:
                data[at:at] = data[at : at + draw(st.integers(1, 256))]
        return seal(bytes(data)) if draw(st.integers(0, 4)) else bytes(data)
    if kind == "json":
        value = draw(json_values)
        text = json.dumps(value, indent=1).encode()
        return seal(text) if draw(st.booleans()) else text
    if kind == "constant":
        blob = draw(st.sampled_from(RAW_MANIFESTS))
        return seal(blob) if draw(st.booleans()) else blob
    if kind == "pickle":
        return draw(st.sampled_from([HARMLESS_PAYLOAD, pickle.dumps(_RunsCommand("true"), protocol=0)]))
    return draw(st.binary(max_size=64))


@pytest.mark.slow
@settings(FUZZ, max_examples=1500)
@given(data=st.data())
def test_fuzz_manifest_bytes(arena: Arena, data: st.DataObject) -> None:
    """Raw bytes where manifest.json should be: edits of a real one (re-sealed), JSON of any shape,
    binary, pickles, deep nesting, giant strings, other encodings; sometimes behind a symlink."""
    blob = data.draw(hostile_manifest_bytes(arena.pristine[MANIFEST_NAME]))
    content: bytes | Link = Link(blob) if data.draw(st.integers(0, 19)) == 0 else blob
    attack(arena.write({**arena.pristine, MANIFEST_NAME: content}), tally=FUZZ_TALLY["manifest bytes"])
    FUZZ_CASES["manifest bytes"] += 1


# ------------------------------------------------------------------------ wrong types, systematically

WRONG_VALUES = [None, True, 0, -1, 2**64, 1.5, "", "x", [], {}, [None], {"@": None}, "@OUTSIDE@"]


def json_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from json_paths(v, (*path, i))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    node = copy
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = new
    return copy


def test_wrong_types_everywhere_in_the_manifest(arena: Arena) -> None:
    """Every node of a real manifest (top level, files, every tree and metadata node) replaced by each
    of a set of wrong-typed values, re-sealed: load, verify and load-into-module stay inert."""
    body = json.loads(unseal(arena.pristine[MANIFEST_NAME]))
    paths = [p for p in json_paths(body) if p]
    tally: Counter[str] = Counter()
    cases = 0
    for path in paths:
        for new in WRONG_VALUES:
            new = resolve(new, arena, files_of(arena.pristine), [0])
            text = json.dumps(replaced(body, path, new), indent=1, ensure_ascii=False).encode()
            attack(arena.write({**arena.pristine, MANIFEST_NAME: seal(text)}), live=True, tally=tally)
            cases += 1
    summarize("wrong types everywhere in the manifest", tally, cases)
    assert cases >= 600
    assert tally["load: loaded"] < cases, "most replacements must be rejected"


# ----------------------------------------------------------------------------------- explicit attacks


def tiny_checkpoint(arena: Arena, header: Any, data: bytes, tree_refs: dict[str, Any], **kw: Any) -> Path:
    blob = safetensors(header, data, **kw)
    tree = {"@": "dict", "v": tree_refs}
    return arena.write(
        {MANIFEST_NAME: Manifest(tree=tree, files=(entry_for(TENSOR_FILE, blob),)).to_json(), TENSOR_FILE: blob}
    )


def ref(key: str = "x", dtype: str = "uint8", shape: list[Any] | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "@": "tensor",
        "file": TENSOR_FILE,
        "key": key,
        "dtype": dtype,
        "shape": shape or [16],
        "device": "cpu",
        **kw,
    }


HUGE_DECLARATIONS = {
    "2**40-byte tensor in a tiny file": (
        {"x": {"dtype": "U8", "shape": [2**40], "data_offsets": [0, 2**40]}},
        {"x": ref(shape=[2**40])},
        {},
    ),
    "2**20 x 2**20 float32": (
        {"x": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}},
        {"x": ref(dtype="float32", shape=[2**20, 2**20])},
        {},
    ),
    "manifest shape 2**62 x 4 over a 16-byte tensor": (
        {"x": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}},
        {"x": ref(shape=[2**62, 4])},
        {},
    ),
    "offsets near 2**64": (
        {"x": {"dtype": "U8", "shape": [16], "data_offsets": [2**64 - 17, 2**64 - 1]}},
        {"x": ref()},
        {},
    ),
    "offsets 2**63": ({"x": {"dtype": "U8", "shape": [16], "data_offsets": [2**63, 2**63 + 16]}}, {"x": ref()}, {}),
    "negative offsets": ({"x": {"dtype": "U8", "shape": [16], "data_offsets": [-16, 0]}}, {"x": ref()}, {}),
    "overflowing numel": (
        {"x": {"dtype": "F64", "shape": [2**32, 2**32, 2**32], "data_offsets": [0, 16]}},
        {"x": ref(dtype="float64", shape=[2**32, 2**32, 2**32])},
        {},
    ),
    "overlapping tensors": (
        {
            "x": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
            "y": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
        },
        {"x": ref(), "y": ref("y")},
        {},
    ),
    "length prefix 2**63": (
        {"x": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}},
        {"x": ref()},
        {"prefix": 2**63},
    ),
    "length prefix 2**64-1": (
        {"x": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}},
        {"x": ref()},
        {"prefix": 2**64 - 1},
    ),
    "length prefix 2**40": (
        {"x": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}},
        {"x": ref()},
        {"prefix": 2**40},
    ),
}


def traced_peak(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            fn()
        except CheckpointError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", list(HUGE_DECLARATIONS))
def test_huge_declared_sizes_are_never_allocated(arena: Arena, name: str) -> None:
    """Declared sizes up to 2**64 in a file of a few dozen bytes: rejected before any allocation. The
    tensor allocator sees nothing over the file size; the Python heap grows no more than for loading a
    valid checkpoint of the same size (tracemalloc; that baseline includes bug B6's 64 MiB)."""
    header, refs, kw = HUGE_DECLARATIONS[name]
    path = tiny_checkpoint(arena, header, bytes(16), refs, **kw)
    assert_rejected(attack(path, allow_known=False), by_verify=not name.startswith("manifest shape"))
    hostile = max(traced_peak(lambda: trainstate.load(path)), traced_peak(lambda: _verify(path)))
    tiny_checkpoint(arena, {"x": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}}, bytes(16), {"x": ref()})
    baseline = traced_peak(lambda: trainstate.load(arena.ckpt))
    assert hostile <= baseline + (1 << 20), f"{name}: peak {hostile} bytes vs {baseline} for a valid load"


def test_manifest_read_allocates_no_more_than_the_file(arena: Arena) -> None:
    """Loading a checkpoint whose files total a few KB keeps the Python heap under 4 MiB."""
    tiny_checkpoint(
        arena,
        {"x": {"dtype": "U8", "shape": [2**40], "data_offsets": [0, 2**40]}},
        bytes(16),
        {"x": ref(shape=[2**40])},
    )
    peak = traced_peak(lambda: trainstate.load(arena.ckpt))
    assert peak < 4 << 20, f"peak {peak} bytes for a {disk_bytes(arena.ckpt)}-byte checkpoint"


def deep(n: int, open_: str = "[", close: str = "]", leaf: str = "0") -> bytes:
    return (open_ * n + leaf + close * n).encode()


DEEP_PLACES = {
    "tree: lists": ("tree", deep(10_000)),
    "tree: tagged dicts": ("tree", deep(10_000, '{"@": "dict", "v": {"k": ', "}}")),
    "tree: tuples": ("tree", deep(10_000, '{"@": "tuple", "v": [', "]}")),
    "tree: stateful": ("tree", deep(10_000, '{"@": "stateful", "type": "t", "v": ', "}")),
    "tree: dict keys": ("tree", deep(10_000, '{"@": "dict", "items": [[', ", 0]]}")),
    "metadata": ("metadata", deep(10_000)),
    "environment": ("environment", deep(10_000, '{"a": ', "}")),
    "format_version": ("format_version", deep(10_000)),
    "files": ("files", deep(10_000)),
    "a file name": ("name", deep(10_000)),
}


@pytest.mark.parametrize("place", list(DEEP_PLACES))
def test_json_nested_10000_levels(arena: Arena, place: str) -> None:
    field, raw = DEEP_PLACES[place]
    body = json.loads(unseal(arena.pristine[MANIFEST_NAME]))
    if field == "name":
        body["files"][0]["name"] = "@DEEP@"
    else:
        body[field] = "@DEEP@"
    text = json.dumps(body, indent=1).encode().replace(b'"@DEEP@"', raw)
    outcomes = attack(arena.write({**arena.pristine, MANIFEST_NAME: seal(text)}), live=True, allow_known=False)
    assert "loaded" not in outcomes.values(), outcomes


@pytest.mark.parametrize(
    "raw",
    [
        deep(10_000),
        deep(10_000, '{"a": ', "}"),
        b'{"x": ' + deep(10_000) + b"}",
        b'{"__metadata__": ' + deep(10_000, '{"a": ', "}") + b"}",
    ],
    ids=["list", "object", "in an entry", "in __metadata__"],
)
def test_safetensors_header_nested_10000_levels(arena: Arena, raw: bytes) -> None:
    path = tiny_checkpoint(arena, None, b"", {"x": ref()}, raw=raw)
    assert "loaded" not in attack(path, allow_known=False).values()


def stateful_chain(depth: int) -> bytes:
    return deep(depth, '{"@": "stateful", "type": "t", "v": ', "}")


def stack_depth() -> int:
    frames = 0
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        frames, frame = frames + 1, frame.f_back
    return frames


def called_from_depth(frames: int, fn: Callable[[], Any]) -> Any:
    """Call ``fn`` with about ``frames`` frames on the stack (as from deep inside a training framework)."""
    return fn() if stack_depth() >= frames else called_from_depth(frames, fn)


@pytest.mark.parametrize("case", ["stateful chain", "saved deepest accepted tuple, loaded 250 frames down"])
def test_bug_decoder_recursion(arena: Arena, tmp_path: Path, case: str) -> None:
    if case == "stateful chain":
        # Shallow enough for json (one level of recursion each), too deep for decoding (two frames each).
        depth = int((sys.getrecursionlimit() - stack_depth()) * 0.75)
        body = json.loads(unseal(arena.pristine[MANIFEST_NAME]))
        body["tree"]["v"]["deep"] = "@DEEP@"
        text = json.dumps(body, indent=1).encode().replace(b'"@DEEP@"', stateful_chain(depth))
        attack(arena.write({**arena.pristine, MANIFEST_NAME: seal(text)}), allow_known=False)
        return
    from trainstate.format.codec import MAX_DEPTH

    nested: Any = 1
    for _ in range(MAX_DEPTH - 3):  # the deepest tree save accepts: root dict + tuples + leaf
        nested = (nested,)
    trainstate.save(tmp_path / "deep", {"x": nested})
    loaded = called_from_depth(250, lambda: trainstate.load(tmp_path / "deep"))
    assert loaded == {"x": nested}
    with pytest.raises(trainstate.UnsupportedValueError, match="nested deeper"):
        trainstate.save(tmp_path / "deeper", {"x": ((nested,),)})


GIANT = "g" * (20 << 20)


@pytest.mark.parametrize("place", ["tensor key", "dtype", "file name", "tag", "device", "metadata", "created"])
def test_giant_strings_in_the_manifest(arena: Arena, place: str) -> None:
    """20 MiB strings (under the 64 MiB manifest cap) in fields that end up in error messages."""
    names = files_of(arena.pristine)
    weight = {"@": "tensor", "file": "@FILE@", "key": "w", "dtype": "float32", "shape": [2, 3], "device": "cpu"}
    node: dict[str, Any] = dict(weight)
    fields: dict[str, Any] = {}
    if place == "tensor key":
        node["key"] = GIANT
    elif place == "dtype":
        node["dtype"] = GIANT
    elif place == "file name":
        node["file"] = GIANT
    elif place == "tag":
        node = {"@": GIANT}
    elif place == "device":
        node["device"] = GIANT
    elif place == "metadata":
        fields["metadata"] = {"@": "dict", "v": {"note": GIANT}}
    else:
        fields["created"] = GIANT
    tree = resolve(fix_refs({"@": "dict", "v": {"w": node}}, arena), arena, names, [0])
    files = tuple(entry_for(n, arena.pristine[n]) for n in names)
    manifest = Manifest(tree=tree, files=files, **fields).to_json()
    outcomes = attack(arena.write({**arena.pristine, MANIFEST_NAME: manifest}), allow_known=False)
    if place in ("metadata", "created"):
        assert set(outcomes.values()) == {"loaded"}  # a big but valid value is not an attack
    else:
        assert_rejected(outcomes, by_verify=False)


def test_giant_safetensors_header_strings(arena: Arena) -> None:
    key, dtype = "k" * (8 << 20), "D" * (8 << 20)
    path = tiny_checkpoint(
        arena, {key: {"dtype": dtype, "shape": [16], "data_offsets": [0, 16]}}, bytes(16), {"x": ref(key=key)}
    )
    assert "loaded" not in attack(path, allow_known=False).values()


def test_manifest_over_the_size_cap(arena: Arena) -> None:
    from trainstate.format.manifest import MAX_MANIFEST_BYTES

    body = json.loads(unseal(arena.pristine[MANIFEST_NAME]))
    body["metadata"] = {"@": "dict", "v": {"pad": "p" * MAX_MANIFEST_BYTES}}
    path = arena.write({**arena.pristine, MANIFEST_NAME: seal(json.dumps(body, indent=1).encode())})
    assert "loaded" not in attack(path, allow_known=False).values()


@pytest.mark.parametrize("where", ["files list", "tensor ref", "both"])
@pytest.mark.parametrize("name", [*BAD_NAMES, 1, None, ["a"], {"a": 1}])
def test_unsafe_file_names(arena: Arena, where: str, name: Any) -> None:
    """``..``, absolute (including a valid tensor file outside), NUL, separators, hidden, overlong,
    wrong types: in the file list, in a tensor ref, or both (so the ref would resolve)."""
    if name in ("tensors-00099.safetensors",):
        pytest.skip("a plain name; covered by test_refs_to_missing_files_and_keys")
    names = files_of(arena.pristine)
    name = resolve(name, arena, names, [0])
    target = arena.pristine[names[0]]
    (arena.outside / TENSOR_FILE).write_bytes(target)
    files = [entry_for(n, arena.pristine[n]) for n in names]
    if where in ("files list", "both"):
        files.append(FileEntry(name, len(target), xxhash.xxh3_128(target).hexdigest()))
    header = json.loads(target[8 : 8 + int.from_bytes(target[:8], "little")])
    key = next(k for k in header if k != "__metadata__")
    tree = {
        "@": "dict",
        "v": {
            "x": {
                "@": "tensor",
                "file": name if where != "files list" else names[0],
                "key": key,
                "dtype": ST_TO_TORCH[header[key]["dtype"]],
                "shape": header[key]["shape"],
                "device": "cpu",
            }
        },
    }
    manifest = Manifest(tree=tree, files=tuple(files)).to_json()
    outcomes = attack(arena.write({**arena.pristine, MANIFEST_NAME: manifest}), live=True, allow_known=False)
    assert_rejected(outcomes, by_verify=where != "tensor ref")


@pytest.mark.parametrize("fault", ["file not listed", "listed but absent", "key missing", "key of another file"])
def test_refs_to_missing_files_and_keys(arena: Arena, fault: str) -> None:
    names = files_of(arena.pristine)
    body = json.loads(unseal(arena.pristine[MANIFEST_NAME]))
    files = dict(arena.pristine)
    weight = body["tree"]["v"]["w"]
    if fault == "file not listed":
        weight["file"] = "tensors-00099.safetensors"
    elif fault == "listed but absent":
        del files[weight["file"]]
    elif fault == "key missing":
        weight["key"] = "no-such-key"
    else:
        weight["file"] = next(n for n in names if n != weight["file"])
    files[MANIFEST_NAME] = seal(json.dumps(body, indent=1, ensure_ascii=False).encode())
    outcomes = attack(arena.write(files), live=True, allow_known=False)
    if fault != "listed but absent":  # a load of the module alone does not read the tensor "w" (nor its ref)
        assert outcomes.pop("load into module") == "loaded", outcomes
    assert_rejected(outcomes, by_verify=fault == "listed but absent")


@pytest.mark.parametrize("victim", [MANIFEST_NAME, "tensor file", "every file"])
@pytest.mark.parametrize("target", ["valid copy", "dangling", "directory", "/etc/passwd", "/dev/zero"])
def test_symlinks_pointing_outside(arena: Arena, victim: str, target: str) -> None:
    """A symlink in place of a checkpoint file is refused, even when its target holds the exact bytes
    that belong there (following it would load fine); nothing outside is opened."""
    names = files_of(arena.pristine)
    files: dict[str, bytes | Link | None] = dict(arena.pristine)
    victims = {MANIFEST_NAME: [MANIFEST_NAME], "tensor file": [names[0]], "every file": list(files)}[victim]
    for name in victims:
        link = Link(arena.pristine[name]) if target == "valid copy" else Link(special=target)
        files[name] = link
    outcomes = attack(arena.write(files), live=True, allow_known=False)
    assert "loaded" not in outcomes.values(), outcomes


@pytest.mark.parametrize("victim", [MANIFEST_NAME, "tensor file"])
def test_directory_in_place_of_a_file(arena: Arena, victim: str) -> None:
    names = files_of(arena.pristine)
    name = MANIFEST_NAME if victim == MANIFEST_NAME else names[0]
    files: dict[str, bytes | Link | None] = {**arena.pristine, name: None}
    arena.write(files)
    (arena.ckpt / name).mkdir()
    (arena.ckpt / name / "inner").write_bytes(arena.pristine[name])
    assert_rejected(attack(arena.ckpt, live=True, allow_known=False))


def _load_in_thread(path: Path, timeout: float, unblock: Path) -> tuple[bool, list[str]]:
    """Run load in a thread; if it is still blocked after ``timeout``, unblock it (open the FIFO's
    write end) and report the hang."""
    result: list[str] = []

    def run() -> None:
        try:
            trainstate.load(path)
            result.append("loaded")
        except CheckpointError as exc:
            result.append(type(exc).__name__)
        except Exception as exc:  # noqa: BLE001
            result.append(f"escaped {type(exc).__name__}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    hung = thread.is_alive()
    if hung:
        fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(10)
    return hung, result


@pytest.mark.parametrize("victim", [MANIFEST_NAME, "tensor file"])
def test_fifo_in_place_of_a_file_does_not_hang(arena: Arena, victim: str) -> None:
    names = files_of(arena.pristine)
    name = MANIFEST_NAME if victim == MANIFEST_NAME else names[0]
    files: dict[str, bytes | Link | None] = dict(arena.pristine)
    files[name] = None
    arena.write(files)  # the manifest still lists the replaced file with its size and hash
    os.mkfifo(arena.ckpt / name)
    hung, result = _load_in_thread(arena.ckpt, 2.0, arena.ckpt / name)
    assert not hung, f"load blocked on a FIFO in place of {name} (then: {result})"
    assert result and result[0] != "loaded" and not result[0].startswith("escaped"), result


# ------------------------------------------------------------------------------------- pickle payloads


def payloads(marker: Path) -> dict[str, bytes]:
    """Files whose unpickling runs ``touch marker``: torch.save archives (new zip and legacy format)
    and raw pickles of several protocols."""
    command = f"touch {marker}"
    out = {}
    for name, kwargs in [("torch.save", {}), ("torch.save legacy", {"_use_new_zipfile_serialization": False})]:
        buffer = io.BytesIO()
        torch.save({"w": torch.zeros(4), "evil": _RunsCommand(command)}, buffer, **kwargs)
        out[name] = buffer.getvalue()
    for protocol in (0, 2, 5):
        out[f"pickle protocol {protocol}"] = pickle.dumps(_RunsCommand(command), protocol=protocol)
    return out


@pytest.mark.parametrize(
    "placement", ["tensor file", "manifest.json", "pickle value in the tree", "pickle value in metadata"]
)
def test_pickle_payloads_are_never_unpickled(arena: Arena, tmp_path: Path, placement: str) -> None:
    """A real payload (``os.system('touch MARKER')`` via ``__reduce__``) where a tensor file or the
    manifest should be, or as a ``pickle`` value (without ``allow_pickle``): a CheckpointError, no
    marker, no audit event. For the tensor file the manifest lists its true size and hash."""
    marker = tmp_path / "MARKER"
    names = files_of(arena.pristine)
    body = json.loads(unseal(arena.pristine[MANIFEST_NAME]))
    for label, payload in payloads(marker).items():
        files: dict[str, bytes | Link | None] = dict(arena.pristine)
        if placement == "tensor file":
            files[names[0]] = payload
            for entry in body["files"]:
                if entry["name"] == names[0]:
                    entry.update(size=len(payload), hash=xxhash.xxh3_128(payload).hexdigest())
            files[MANIFEST_NAME] = seal(json.dumps(body, indent=1).encode())
        elif placement == "manifest.json":
            files[MANIFEST_NAME] = payload
        else:
            edited = json.loads(json.dumps(body))
            node = {"@": "pickle", "v": b64(payload)}
            if placement == "pickle value in the tree":
                edited["tree"]["v"]["evil"] = node
            else:
                edited["metadata"] = {"@": "dict", "v": {"evil": node}}
            files[MANIFEST_NAME] = seal(json.dumps(edited, indent=1).encode())
        outcomes = attack(arena.write(files), live=True, allow_known=False)
        assert not marker.exists(), f"{label} in {placement}: the payload ran"
        if placement in ("tensor file", "manifest.json"):
            assert "loaded" not in outcomes.values(), (label, outcomes)
        elif placement == "pickle value in the tree":  # verify checks bytes, not values: it may pass
            loads = {op: o for op, o in outcomes.items() if op.startswith("load")}
            assert set(loads.values()) == {"UnsafeCheckpointError"}, outcomes
        else:  # metadata is not decoded by load; reading it is checked below
            assert outcomes["load"] == "loaded", outcomes
    if placement == "pickle value in metadata":
        reader = CheckpointReader(*split_path(arena.ckpt))
        with guarded(arena.ckpt) as guard:
            with pytest.raises(trainstate.UnsafeCheckpointError):
                reader.metadata()
        assert guard.problems(budget=disk_bytes(arena.ckpt)) == [] and not marker.exists()


@pytest.mark.slow
def test_the_payloads_are_live(tmp_path: Path) -> None:
    """Control for the test above: unpickled by torch.load(weights_only=False) or pickle.load, each
    payload really creates its marker (in a child process)."""
    script = """
import pickle, sys, torch
for path, kind in zip(sys.argv[1::2], sys.argv[2::2], strict=True):
    if kind.startswith("torch.save"):
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
"""
    args, markers = [], []
    for label in payloads(tmp_path / "unused"):
        slug = label.replace(" ", "_")
        marker = tmp_path / f"MARKER-{slug}"
        path = tmp_path / f"payload-{slug}"
        path.write_bytes(payloads(marker)[label])
        args += [str(path), label]
        markers.append(marker)
    subprocess.run([sys.executable, "-c", script, *args], check=True, timeout=300, cwd=tmp_path)
    assert [m.name for m in markers if not m.exists()] == [], "control payloads that did not run"


# --------------------------------------------------------------------------------- pinned known bugs


def _regression(arena: Arena, header: Any, data: bytes, refs: dict[str, Any], **kw: Any) -> dict[str, str]:
    return attack(tiny_checkpoint(arena, header, data, refs, **kw), allow_known=False)


@pytest.mark.parametrize("dtype", [[], {}, ["F32"]], ids=["list", "object", "list of a name"])
def test_bug_unhashable_dtype_in_safetensors_header(arena: Arena, dtype: Any) -> None:
    _regression(arena, {"x": {"dtype": dtype, "shape": [16], "data_offsets": [0, 16]}}, bytes(16), {"x": ref()})


def test_bug_unhashable_dtype_breaks_manager_restore(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with trainstate.CheckpointManager(tmp_path, keep_last=None) as manager:
        manager.save(1, {"m": torch.nn.Linear(3, 2)})
        manager.save(2, {"m": torch.nn.Linear(3, 2)})
    newest = tmp_path / "step_00000002"
    body = json.loads(unseal((newest / MANIFEST_NAME).read_bytes()))
    for entry in body["files"]:
        data = (newest / entry["name"]).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        key = next(k for k in header if k != "__metadata__")
        header[key]["dtype"] = [header[key]["dtype"]]
        blob = safetensors(header, data[8 + n :])
        (newest / entry["name"]).write_bytes(blob)
        entry.update(size=len(blob), hash=xxhash.xxh3_128(blob).hexdigest())
    (newest / MANIFEST_NAME).write_bytes(seal(json.dumps(body, indent=1).encode()))
    with trainstate.CheckpointManager(tmp_path, keep_last=None) as manager:
        assert manager.restore({"m": torch.nn.Linear(3, 2)}) == 1


@pytest.mark.parametrize("shape", [[0, 2**62, 2**62], [2**40, 2**40, 0]], ids=["leading zero", "trailing zero"])
def test_bug_zero_size_tensor_with_huge_dims(arena: Arena, shape: list[int]) -> None:
    _regression(
        arena,
        {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}},
        b"",
        {"x": ref(dtype="float32", shape=shape)},
    )


@pytest.mark.parametrize("device", ["foo", "cuda:-1", "cpu:x"])
def test_bug_invalid_device_value(arena: Arena, device: str) -> None:
    body = json.loads(unseal(arena.pristine[MANIFEST_NAME]))
    body["tree"]["v"]["dev"] = {"@": "device", "v": device}
    attack(arena.write({**arena.pristine, MANIFEST_NAME: seal(json.dumps(body, indent=1).encode())}), allow_known=False)


def test_bug_invalid_device_in_metadata_breaks_the_manager(tmp_path: Path) -> None:
    with trainstate.CheckpointManager(tmp_path, keep_last=None) as manager:
        manager.save(1, {"m": torch.nn.Linear(3, 2)})
        manager.save(2, {"m": torch.nn.Linear(3, 2)})
    path = tmp_path / "step_00000002" / MANIFEST_NAME
    body = json.loads(unseal(path.read_bytes()))
    body["metadata"]["v"]["device"] = {"@": "device", "v": "foo"}
    path.write_bytes(seal(json.dumps(body, indent=1).encode()))
    with trainstate.CheckpointManager(tmp_path, keep_last=None) as manager:
        assert manager.restore({"m": torch.nn.Linear(3, 2)}) == 1


@pytest.mark.parametrize("field", ["ndarray np_dtype", "npscalar dtype"])
@pytest.mark.parametrize("dtype", ["(2,i4", "(1e400,)i4", "(2,)i4"])
def test_bug_numpy_dtype_strings(arena: Arena, field: str, dtype: str) -> None:
    body = json.loads(unseal(arena.pristine[MANIFEST_NAME]))
    if field == "ndarray np_dtype":
        body["tree"]["v"]["n"]["np_dtype"] = dtype
    else:
        body["tree"]["v"]["s"]["dtype"] = dtype
    path = arena.write({**arena.pristine, MANIFEST_NAME: seal(json.dumps(body, indent=1).encode())})
    assert_rejected(attack(path, allow_known=False), by_verify=False)


B5_SCRIPT = r"""
import json, os, sys, xxhash
import trainstate
from trainstate.api import load  # before the audit: `import trainstate` itself loads the API lazily
from trainstate.format import FileEntry, Manifest
path = sys.argv[1]
os.makedirs(path)
header = json.dumps({"x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode()
blob = len(header).to_bytes(8, "little") + header + b"abcd"
with open(os.path.join(path, "tensors-00000.safetensors"), "wb") as f:
    f.write(blob)
tree = {"@": "dict", "v": {"t": {"@": "tensor", "file": "tensors-00000.safetensors", "key": "x",
        "dtype": sys.argv[2], "shape": [4], "device": "cpu"}, "d": {"@": "dtype", "v": sys.argv[2]}}}
entry = FileEntry("tensors-00000.safetensors", len(blob), xxhash.xxh3_128(blob).hexdigest())
with open(os.path.join(path, "manifest.json"), "wb") as f:
    f.write(Manifest(tree=tree, files=(entry,)).to_json())
events = []
sys.addaudithook(lambda e, a: events.append(e) if e in ("import", "exec", "compile") else None)
before = len(sys.modules)
try:
    load(path)
    outcome = "loaded"
except trainstate.CheckpointError as exc:
    outcome = type(exc).__name__
print(json.dumps({"outcome": outcome, "events": len(events), "new_modules": len(sys.modules) - before}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["_inductor", "onnx"])
def test_bug_dtype_name_imports_torch_submodules(tmp_path: Path, name: str) -> None:
    """In a child process, so that the imports it triggers do not leak into this one."""
    done = subprocess.run(
        [sys.executable, "-c", B5_SCRIPT, str(tmp_path / "ckpt"), name],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"] != "loaded"
    assert result["events"] == 0 and result["new_modules"] == 0, result
