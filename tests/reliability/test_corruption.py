"""Promise 3 of the reliability campaign: corruption is always detected.

One pristine checkpoint (tensors of several dtypes spread over four safetensors files by
``shard_bytes=``, plus plain values in the manifest) is damaged one case at a time: the damaged
bytes are written over that file in a tmp directory, checked, and the pristine bytes written back.

* single-bit flips, stratified over every byte-position class: the 8-byte safetensors length
  prefix, the safetensors header JSON, the tensor data, the manifest body and the manifest's
  checksum trailer (positions drawn with a seeded RNG, identical on every run);
* truncation of every file at random lengths (plus the edges 0, 1, 7, 8, 9, size - 1);
* zero-filled blocks of 4 KiB and smaller at random offsets (only blocks that change a byte);
* tensor files swapped between two checkpoints of the same layout (same sizes and headers, so only
  the content hash can tell them apart) and between the shards of one checkpoint;
* a manifest copied from another checkpoint (same layout; one differing tensor; another layout).

Every case must make both ``trainstate.load(path)`` and a full verify
(``CheckpointReader(...).verify()``) raise a ``CheckpointError`` subclass. A load that returns is a
silent wrong load and fails the test, as does any other exception escaping. A stratified sample of
the cases is replayed against ``CheckpointManager.restore``, which must fall back to the previous
good checkpoint and restore exactly its weights.

The per-class counts are printed (``pytest -s tests/reliability``) and, when the environment variable
``TRAINSTATE_RELIABILITY_REPORT`` names a file, appended to it as JSON lines for the README figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import trainstate
from trainstate import CheckpointError, CheckpointManager
from trainstate.format import MANIFEST_NAME, CheckpointReader, Manifest
from trainstate.storage import QUARANTINE_DIR, split_path

SEED = 20_240_605
FLIPS_PER_CLASS = 400  # per class (the 8-byte length prefixes have fewer bits: all of them are flipped)
FLIP_CLASSES = ("safetensors length prefix", "safetensors header", "tensor data", "manifest body", "manifest trailer")
TRUNCATIONS_PER_FILE = 20  # random lengths, plus the edge lengths below
ZERO_BLOCK_SIZES = (4096, 1024, 256, 64, 8, 1)
ZERO_BLOCKS_PER_SIZE = 4  # per file
MANAGER_SAMPLE = {"bit flip": 8, "truncation": 6, "zero block": 6}  # per flip class / per category
SHARD_BYTES = 8 * 1024
TRAILER = b',\n "checksum": "'
TRAILER_LEN = len(b',\n "checksum": ""\n}\n') + 32  # the fixed trailer described in the README


# --------------------------------------------------------------------------------------------- fixtures


def make_state(seed: int, *, wide: int = 48) -> dict[str, Any]:
    """Tensors of several dtypes (> 4 KiB each in total per shard) and plain values of every JSON kind."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w1": torch.randn(wide, 32, generator=g),
            "b1": torch.randn(wide, generator=g),
            "w2": torch.randn(16, wide, generator=g).to(torch.float16),
            "emb": torch.randn(40, 24, generator=g).to(torch.bfloat16),
        },
        "optim": {
            "exp_avg": torch.randn(wide, 32, generator=g).to(torch.float64),
            "step": torch.tensor(1000 + seed),
        },
        "ids": torch.randint(-(2**31), 2**31 - 1, (700,), generator=g, dtype=torch.int32),
        "mask": torch.rand(300, generator=g) > 0.5,
        "step": 1234 + seed,
        "lr": 3e-4,
        "betas": (0.9, 0.999),
        "name": "run-α",
        "big": 2**70 + seed,
        "nan": math.nan,
        "blob": bytes(range(16)),
        "dtype": torch.bfloat16,
    }


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested state (tensor bytes, dtypes, shapes; nan equals nan)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
        )
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def normalize(path: Path) -> None:
    """Pin the manifest's creation time and saving host (re-serialized by trainstate's own Manifest,
    so it stays a valid checkpoint): the seeded byte positions then hit the same bytes on every run
    and machine."""
    file = path / MANIFEST_NAME
    manifest = Manifest.from_json(file.read_bytes(), where=str(file))
    environment = {**manifest.environment, "hostname": "reliability-host", "python": "3"}
    file.write_bytes(
        dataclasses.replace(manifest, created="2024-01-01T00:00:00.000+00:00", environment=environment).to_json()
    )


def read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@dataclass
class Pristine:
    """Checkpoints saved once per module; every case damages a copy in place and restores it."""

    a: Path  # the checkpoint under attack
    b: Path  # same layout (same keys, shapes, dtypes, sizes, headers), other values
    c: Path  # another layout
    d: Path  # same as ``a`` except one tensor in the last shard
    state_a: dict[str, Any]
    files: dict[str, bytes]  # pristine bytes of ``a``


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    root = tmp_path_factory.mktemp("corruption")
    state_a = make_state(0)
    state_d = make_state(0)
    state_d["mask"] = ~state_d["mask"]  # lands in the last shard
    for name, state, kwargs in [
        ("a", state_a, {}),
        ("b", make_state(1), {}),
        ("c", make_state(2, wide=40), {"shard_bytes": SHARD_BYTES // 2}),
        ("d", state_d, {}),
    ]:
        trainstate.save(root / name, state, shard_bytes=kwargs.get("shard_bytes", SHARD_BYTES))
        normalize(root / name)
    p = Pristine(root / "a", root / "b", root / "c", root / "d", state_a, read_dir(root / "a"))
    tensor_files = [n for n in p.files if n != MANIFEST_NAME]
    assert len(tensor_files) >= 2, "the attack needs several tensor files"
    assert same(trainstate.load(p.a), state_a), "control: the pristine checkpoint must load exactly"
    CheckpointReader(*split_path(p.a)).verify()
    files_b = read_dir(p.b)
    assert sorted(files_b) == sorted(p.files)
    for name in tensor_files:  # the swap cases are the hard kind: only the content hash differs
        assert len(files_b[name]) == len(p.files[name]) and files_b[name] != p.files[name]
        assert _header(files_b[name]) == _header(p.files[name])
    return p


def _header(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    return data[: 8 + n]


# -------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    category: str  # "bit flip", "truncation", "zero block", "swap", "foreign manifest"
    kind: str  # flip class, file kind or swap/manifest variant: the row of the report
    label: str  # what exactly was done, for failure messages
    damage: Callable[[dict[str, bytes]], dict[str, bytes]]  # pristine files -> files to overwrite


def spans(files: dict[str, bytes]) -> dict[str, list[tuple[str, int, int]]]:
    """Byte ranges of each position class: class -> [(file, start, end)]."""
    out: dict[str, list[tuple[str, int, int]]] = {c: [] for c in FLIP_CLASSES}
    for name, data in files.items():
        if name == MANIFEST_NAME:
            at = data.rindex(TRAILER)
            assert len(data) - at == TRAILER_LEN, "manifest trailer layout changed"
            out["manifest body"].append((name, 0, at))
            out["manifest trailer"].append((name, at, len(data)))
        else:
            n = int.from_bytes(data[:8], "little")
            assert 8 + n < len(data), f"{name}: expected tensor data after the header"
            out["safetensors length prefix"].append((name, 0, 8))
            out["safetensors header"].append((name, 8, 8 + n))
            out["tensor data"].append((name, 8 + n, len(data)))
    assert all(out.values()), out
    return out


def file_kind(name: str) -> str:
    return "manifest.json" if name == MANIFEST_NAME else "tensor file"


def _replace(name: str, new: bytes) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    return lambda files: {name: new}


def locate(ranges: list[tuple[str, int, int]], index: int) -> tuple[str, int]:
    """The file and offset of the ``index``-th byte of a position class."""
    for name, start, end in ranges:
        if index < end - start:
            return name, start + index
        index -= end - start
    raise IndexError(index)


def _replace_all(edits: dict[str, bytes]) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    return lambda files: edits


def flip_cases(files: dict[str, bytes], rng: random.Random, per_class: int) -> list[Case]:
    cases = []
    for cls, ranges in spans(files).items():
        total_bits = sum(end - start for _, start, end in ranges) * 8
        for bit in sorted(rng.sample(range(total_bits), min(per_class, total_bits))):
            byte, mask = divmod(bit, 8)
            name, offset = locate(ranges, byte)

            def damage(pristine: dict[str, bytes], name: str = name, offset: int = offset, mask: int = mask) -> dict:
                data = bytearray(pristine[name])
                data[offset] ^= 1 << mask
                return {name: bytes(data)}

            cases.append(Case("bit flip", cls, f"{name}: bit {mask} of byte {offset}", damage))
    return cases


def truncation_cases(files: dict[str, bytes], rng: random.Random, per_file: int) -> list[Case]:
    cases = []
    for name, data in files.items():
        size = len(data)
        lengths = {0, 1, 7, 8, 9, size - 1} | set(rng.sample(range(size), per_file))
        for length in sorted(n for n in lengths if 0 <= n < size):
            cases.append(
                Case(
                    "truncation",
                    file_kind(name),
                    f"{name}: truncated to {length} of {size} bytes",
                    _replace(name, data[:length]),
                )
            )
    return cases


def zero_block_cases(files: dict[str, bytes], rng: random.Random, per_size: int) -> list[Case]:
    cases = []
    for name, data in files.items():
        for size in ZERO_BLOCK_SIZES:
            for _ in range(per_size):
                for _attempt in range(1000):  # a block that is already all zeros would change nothing
                    offset = rng.randrange(0, max(1, len(data) - size + 1))
                    block = data[offset : offset + size]
                    if any(block):
                        break
                else:
                    pytest.fail(f"{name}: no non-zero block of {size} bytes found")
                new = data[:offset] + bytes(len(block)) + data[offset + len(block) :]
                assert len(new) == len(data) and new != data
                cases.append(
                    Case(
                        "zero block",
                        f"{file_kind(name)}, {size} B",
                        f"{name}: {len(block)} zero bytes at offset {offset}",
                        _replace(name, new),
                    )
                )
    return cases


# ----------------------------------------------------------------------------------------- the checking


def _verify(path: Path) -> None:
    CheckpointReader(*split_path(path)).verify()


OPERATIONS: tuple[tuple[str, Callable[[Path], Any]], ...] = (("load", trainstate.load), ("verify", _verify))


@dataclass
class Tally:
    """Outcomes per (category, kind): exception class names per operation, and every failure."""

    counts: Counter[tuple[str, str, str, str]]
    cases: Counter[tuple[str, str]]
    failures: list[str]

    @classmethod
    def new(cls) -> Tally:
        return cls(Counter(), Counter(), [])

    def check(self, case: Case, path: Path) -> None:
        """Both operations on the damaged checkpoint must raise a CheckpointError subclass."""
        self.cases[case.category, case.kind] += 1
        for op, fn in OPERATIONS:
            try:
                fn(path)
            except CheckpointError as exc:
                outcome = type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - anything but CheckpointError breaks the promise
                outcome = f"ESCAPED {type(exc).__name__}"
                self.failures.append(f"{case.label}: {op} raised {type(exc).__name__}: {exc}")
            else:
                outcome = "SILENT LOAD"
                self.failures.append(f"{case.label}: {op} did not raise (silent wrong {op})")
            self.counts[case.category, case.kind, op, outcome] += 1

    def report(self, title: str) -> str:
        lines = [f"{title}: {sum(self.cases.values())} cases"]
        for category, kind in sorted(self.cases):
            per_op = []
            for op, _ in OPERATIONS:
                outcomes = {o: n for (c, k, p, o), n in self.counts.items() if (c, k, p) == (category, kind, op)}
                per_op.append(f"{op}: " + ", ".join(f"{o} {n}" for o, n in sorted(outcomes.items())))
            lines.append(f"  {category:<17} {kind:<28} {self.cases[category, kind]:>5} cases | " + " | ".join(per_op))
        lines.append(f"  failures (silent loads or foreign exceptions): {len(self.failures)}")
        return "\n".join(lines)

    def finish(self, title: str, *, minimum: int) -> None:
        text = self.report(title)
        print("\n" + text)
        _record(title, self)
        assert sum(self.cases.values()) >= minimum, text
        assert not self.failures, text + "\n" + "\n".join(self.failures[:20])


def _record(title: str, tally: Tally) -> None:
    target = os.environ.get("TRAINSTATE_RELIABILITY_REPORT")
    if not target:
        return
    rows = [
        {"category": c, "kind": k, "op": op, "outcome": o, "count": n}
        for (c, k, op, o), n in sorted(tally.counts.items())
    ]
    with open(target, "a", encoding="utf-8") as f:
        f.write(
            json.dumps(
                {"test": title, "cases": sum(tally.cases.values()), "failures": len(tally.failures), "rows": rows}
            )
            + "\n"
        )


@dataclass
class Damaged:
    """Writes a case's bytes over the checkpoint's files and puts the pristine bytes back afterwards."""

    path: Path
    pristine: dict[str, bytes]

    @contextmanager
    def apply(self, edits: dict[str, bytes]) -> Iterator[None]:
        assert edits and all(edits[n] != self.pristine[n] for n in edits), "a case must change bytes"
        try:
            for name, data in edits.items():
                (self.path / name).write_bytes(data)
            yield
        finally:
            for name in edits:
                (self.path / name).write_bytes(self.pristine[name])

    def run(self, case: Case, tally: Tally) -> None:
        with self.apply(case.damage(self.pristine)):
            tally.check(case, self.path)

    def assert_pristine(self) -> None:
        assert read_dir(self.path) == self.pristine, "the harness must leave the checkpoint as it found it"


def attack(pristine: Pristine, cases: list[Case], title: str, *, minimum: int) -> None:
    target = Damaged(pristine.a, pristine.files)
    tally = Tally.new()
    for case in cases:
        target.run(case, tally)
    target.assert_pristine()
    assert same(trainstate.load(pristine.a), pristine.state_a)
    tally.finish(title, minimum=minimum)


# ----------------------------------------------------------------------------------------------- tests


def test_flip_cases_cover_every_class(pristine: Pristine) -> None:
    """The flip positions are stratified: every class gets its quota (or all its bits), each file is hit."""
    cases = flip_cases(pristine.files, random.Random(SEED), FLIPS_PER_CLASS)
    per_class = Counter(c.kind for c in cases)
    assert set(per_class) == set(FLIP_CLASSES)
    bits = {cls: sum(end - start for _, start, end in r) * 8 for cls, r in spans(pristine.files).items()}
    assert per_class == {cls: min(FLIPS_PER_CLASS, n) for cls, n in bits.items()}, per_class
    assert sum(per_class.values()) >= 1000
    assert len({c.label for c in cases}) == len(cases), "flip positions are distinct"
    hit_files = {c.label.split(":")[0] for c in cases}
    assert hit_files == set(pristine.files)


def test_single_bit_flips_are_detected(pristine: Pristine) -> None:
    cases = flip_cases(pristine.files, random.Random(SEED), FLIPS_PER_CLASS)
    attack(pristine, cases, "bit flips", minimum=1000)


def test_truncation_is_detected(pristine: Pristine) -> None:
    cases = truncation_cases(pristine.files, random.Random(SEED + 1), TRUNCATIONS_PER_FILE)
    attack(pristine, cases, "truncation", minimum=len(pristine.files) * TRUNCATIONS_PER_FILE)


def test_zero_filled_blocks_are_detected(pristine: Pristine) -> None:
    cases = zero_block_cases(pristine.files, random.Random(SEED + 2), ZERO_BLOCKS_PER_SIZE)
    attack(
        pristine,
        cases,
        "zero-filled blocks",
        minimum=len(pristine.files) * len(ZERO_BLOCK_SIZES) * ZERO_BLOCKS_PER_SIZE,
    )


def test_swapped_tensor_files_are_detected(pristine: Pristine) -> None:
    """Same-layout files of two checkpoints (equal sizes and headers) swapped both ways, all at once,
    and the shards of one checkpoint swapped among themselves."""
    files_b = read_dir(pristine.b)
    names = [n for n in pristine.files if n != MANIFEST_NAME]
    side_a, side_b = Damaged(pristine.a, pristine.files), Damaged(pristine.b, files_b)
    tally = Tally.new()
    for name in names:
        label = f"a/{name} <-> b/{name}"
        with side_a.apply({name: files_b[name]}), side_b.apply({name: pristine.files[name]}):
            in_a = Case("swap", "A<->B, same name", f"{label} (checked in a)", _replace(name, files_b[name]))
            in_b = Case("swap", "A<->B, same name", f"{label} (checked in b)", _replace(name, pristine.files[name]))
            tally.check(in_a, side_a.path)
            tally.check(in_b, side_b.path)
    every = {n: files_b[n] for n in names}
    side_a.run(
        Case("swap", "all tensor files of B", "every tensor file of a replaced by b's", _replace_all(every)), tally
    )
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            edits = {first: pristine.files[second], second: pristine.files[first]}
            side_a.run(Case("swap", "shards within A", f"a/{first} <-> a/{second}", _replace_all(edits)), tally)
    side_a.assert_pristine()
    side_b.assert_pristine()
    tally.finish("swapped tensor files", minimum=len(names) * 2 + 1 + len(names) * (len(names) - 1) // 2)


def test_manifest_from_another_checkpoint_is_detected(pristine: Pristine) -> None:
    manifest = MANIFEST_NAME
    foreign = {
        "same layout (b)": (pristine.b / manifest).read_bytes(),
        "one tensor differs (d)": (pristine.d / manifest).read_bytes(),
        "other layout (c)": (pristine.c / manifest).read_bytes(),
    }
    cases = [
        Case("foreign manifest", kind, f"manifest of {kind} in a", _replace(manifest, data))
        for kind, data in foreign.items()
    ]
    attack(pristine, cases, "foreign manifest", minimum=3)


# ---------------------------------------------------------------------------------- manager fall-back


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def trained(seed: int) -> dict[str, Any]:
    model = mlp(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 16)).pow(2).mean().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer, "epoch": seed}


def expected_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in state["model"].state_dict().items()}
    for index, per_param in state["optimizer"].state_dict()["state"].items():
        for k, v in per_param.items():
            out[f"optimizer.{index}.{k}"] = v.detach().clone()
    return out


@pytest.mark.slow
def test_manager_falls_back_past_a_corrupted_newest_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stratified sample of every category, applied to the newest of two managed checkpoints:
    ``restore`` must skip it (and say so) and restore exactly the previous step."""
    run, other = tmp_path / "run", tmp_path / "other"
    states = {step: trained(step) for step in (1, 2)}
    with CheckpointManager(run, keep_last=None) as mgr:
        for step, state in states.items():
            mgr.save(step, state)
    with CheckpointManager(other, keep_last=None) as mgr:  # same layout, other values, same step name
        mgr.save(2, trained(3))
    for path in (run / "step_00000001", run / "step_00000002", other / "step_00000002"):
        normalize(path)
    newest = run / "step_00000002"
    files = read_dir(newest)
    foreign = read_dir(other / "step_00000002")

    rng = random.Random(SEED + 3)
    flips = flip_cases(files, rng, MANAGER_SAMPLE["bit flip"])
    truncations = rng.sample(truncation_cases(files, rng, TRUNCATIONS_PER_FILE), MANAGER_SAMPLE["truncation"])
    zeros = rng.sample(zero_block_cases(files, rng, 2), MANAGER_SAMPLE["zero block"])
    tensor_file = next(n for n in files if n != MANIFEST_NAME)
    assert len(foreign[tensor_file]) == len(files[tensor_file]) and foreign[tensor_file] != files[tensor_file]
    cases = [
        *flips,
        *truncations,
        *zeros,
        Case("swap", "tensor file of another run", tensor_file, _replace(tensor_file, foreign[tensor_file])),
        Case(
            "foreign manifest", "another run's step 2", MANIFEST_NAME, _replace(MANIFEST_NAME, foreign[MANIFEST_NAME])
        ),
    ]
    assert len(cases) >= 50

    target = Damaged(newest, files)
    manager = CheckpointManager(run, keep_last=None)
    outcomes: Counter[str] = Counter()
    failures: list[str] = []

    def restore_into_fresh() -> tuple[int | None, dict[str, Any]]:
        model = mlp(99)
        live: dict[str, Any] = {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=1e-3)}
        live["epoch"] = -1
        return manager.restore(live), live

    try:
        restored, live = restore_into_fresh()  # control: the undamaged newest checkpoint wins
        assert restored == 2 and _same_tensors(expected_tensors(live), expected_tensors(states[2]))
        for case in cases:
            with target.apply(case.damage(files)):
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="trainstate"):
                    try:
                        restored, live = restore_into_fresh()
                    except Exception as exc:  # noqa: BLE001
                        failures.append(f"{case.label}: restore raised {type(exc).__name__}: {exc}")
                        continue
                    aside = list((run / QUARANTINE_DIR).iterdir()) if (run / QUARANTINE_DIR).exists() else []
                    if len(aside) != 1 or newest.exists():  # the skipped newer checkpoint is moved aside...
                        failures.append(f"{case.label}: step 2 was not moved aside ({aside})")
                        continue
                    aside[0].rename(newest)  # ...and put back here, for the next case
                skipped = any(
                    "skipping step 2" in r.getMessage() or "skipping step_00000002" in r.getMessage()
                    for r in caplog.records
                )
                if restored != 1 or not skipped:
                    failures.append(f"{case.label}: restore returned step {restored} (skip logged: {skipped})")
                elif not _same_tensors(expected_tensors(live), expected_tensors(states[1])):
                    failures.append(f"{case.label}: restored step 1 but its tensors differ")
                else:
                    outcomes[f"{case.category} / {case.kind}"] += 1
        target.assert_pristine()
        restored, live = restore_into_fresh()
        assert restored == 2 and _same_tensors(expected_tensors(live), expected_tensors(states[2]))
    finally:
        manager.close()
    summary = (
        f"manager fall-back: {len(cases)} cases, {sum(outcomes.values())} fell back to step 1 exactly "
        "(and moved step 2 aside)\n" + "\n".join(f"  {k}: {n}" for k, n in sorted(outcomes.items()))
    )
    print("\n" + summary)
    assert not failures, summary + "\n" + "\n".join(failures[:20])
    assert sum(outcomes.values()) == len(cases)


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(same(a[k], b[k]) for k in a)


def test_damaged_copy_helper_restores_bytes(tmp_path: Path) -> None:
    """The harness itself: a damaged file really differs while checked, and is pristine afterwards."""
    path = tmp_path / "ckpt"
    trainstate.save(path, {"w": torch.arange(10.0)})
    files = read_dir(path)
    target = Damaged(path, files)
    name = next(n for n in files if n != MANIFEST_NAME)
    seen = []
    with target.apply({name: files[name][:-1]}):
        seen.append((path / name).read_bytes())
        with pytest.raises(CheckpointError):
            trainstate.load(path)
    assert seen == [files[name][:-1]]
    target.assert_pristine()
