"""``trainstate diff A B``: which tensors changed and by how much, what was added, removed or reshaped,
which hyper-parameters and metrics differ."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from trainstate.cli._scan import open_checkpoint
from trainstate.cli._tree import TensorRef, leaves, matches
from trainstate.cli._ui import UI, Debug, Filters, Json, Quiet, command, format_number, format_value
from trainstate.format import CheckpointReader
from trainstate.format.codec import Path, format_path

if TYPE_CHECKING:
    import torch

HELP = "Compare two checkpoints: changed tensors (max |Δ|, relative L2), added/removed/reshaped keys, values, metrics."
EPILOG = """\
Tensors are read in batches of about --batch-mib per side, so memory stays bounded.
Run `trainstate verify` first if the files' integrity is in question (diff does not check hashes).

Examples:

  trainstate diff runs/exp1/step_00000100 runs/exp1/step_00000200

  trainstate diff a b --filter 'model.*' --limit 0

  trainstate diff a b --json | jq '.tensors.changed[] | select(.rel_l2 > 0.1)'
"""


def _stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float] | None:
    """(max |a-b|, ||a-b|| / ||a||) or None when equal (NaNs in the same places count as equal)."""
    import torch

    if torch.equal(a, b):
        return None
    if a.dtype == torch.bool:
        a, b = a.to(torch.int8), b.to(torch.int8)
    if not (a.is_floating_point() or a.is_complex()):
        a, b = a.to(torch.float64), b.to(torch.float64)
    elif a.element_size() < 4:
        a, b = a.float(), b.float()
    if a.is_floating_point() and torch.equal(a.isnan(), b.isnan()):
        if torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)):
            return None
    delta = (a - b).abs()
    max_abs = float(delta.max()) if delta.numel() else 0.0
    norm = float(torch.linalg.vector_norm(a.abs().to(delta.dtype)))
    diff_norm = float(torch.linalg.vector_norm(delta))
    rel = diff_norm / norm if norm > 0 else (0.0 if diff_norm == 0 else math.inf)
    return max_abs, rel


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # numpy arrays and other values whose == is elementwise
        return repr(a) == repr(b)


def _batches(
    pairs: list[tuple[Path, TensorRef, TensorRef]], limit: int
) -> list[list[tuple[Path, TensorRef, TensorRef]]]:
    batches: list[list[tuple[Path, TensorRef, TensorRef]]] = [[]]
    size = 0
    for pair in pairs:
        nbytes = max(pair[1].nbytes, pair[2].nbytes)
        if batches[-1] and size + nbytes > limit:
            batches.append([])
            size = 0
        batches[-1].append(pair)
        size += nbytes
    return batches


def _read(reader: CheckpointReader, refs: dict[Path, TensorRef]) -> dict[Path, Any]:
    import torch

    from trainstate.api import tensor_source

    _, loader, _ = tensor_source(reader, map_location="cpu", verify=False)
    values = {path: reader.decode(ref.node, loader, path=path) for path, ref in refs.items()}
    loader.fill()
    return {p: torch.from_numpy(v) if not isinstance(v, torch.Tensor) else v for p, v in values.items()}


def _compare_tensors(
    ra: CheckpointReader, rb: CheckpointReader, pairs: list[tuple[Path, TensorRef, TensorRef]], ui: UI, batch: int
) -> tuple[list[dict[str, Any]], int]:
    changed: list[dict[str, Any]] = []
    unchanged = 0
    with ui.progress("comparing", sum(a.nbytes + b.nbytes for _, a, b in pairs)) as advance:
        for group in _batches(pairs, batch):
            va = _read(ra, {p: a for p, a, _ in group})
            vb = _read(rb, {p: b for p, _, b in group})
            for path, a, b in group:
                stats = _stats(va[path], vb[path])
                if stats is None:
                    unchanged += 1
                else:
                    changed.append(
                        {
                            "key": format_path(path),
                            "dtype": a.dtype,
                            "shape": list(a.shape),
                            "max_abs": stats[0],
                            "rel_l2": stats[1],
                        }
                    )
                advance(a.nbytes + b.nbytes)
            del va, vb
    changed.sort(key=lambda row: (-row["rel_l2"] if not math.isnan(row["rel_l2"]) else 0.0, row["key"]))
    return changed, unchanged


def _metrics(ma: dict[str, Any], mb: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key in ("step", "epoch"):
        if key in ma or key in mb:
            if not _same(ma.get(key), mb.get(key)):
                rows.append({"key": key, "a": ma.get(key), "b": mb.get(key)})
    xa: dict[str, Any] = ma["metrics"] if isinstance(ma.get("metrics"), dict) else {}
    xb: dict[str, Any] = mb["metrics"] if isinstance(mb.get("metrics"), dict) else {}
    for key in list(dict.fromkeys([*xa, *xb])):
        if not _same(xa.get(key), xb.get(key)):
            rows.append({"key": f"metrics.{key}", "a": xa.get(key), "b": xb.get(key)})
    return rows


@command
def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="The first (older) checkpoint.")],
    b: Annotated[str, typer.Argument(metavar="B", help="The second (newer) checkpoint.")],
    filters: Filters = None,
    limit: Annotated[
        int, typer.Option(min=0, help="Rows of changed tensors to show, largest change first (0: all).")
    ] = 20,
    batch_mib: Annotated[int, typer.Option(min=1, help="Tensor data read per batch and side, in MiB.")] = 256,
    json_output: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    ui = UI(json_output=json_output, quiet=quiet)
    patterns = list(filters or [])
    with open_checkpoint(a) as ra, open_checkpoint(b) as rb:
        la = {p: v for p, v in leaves(ra.manifest.tree, where=ra.where) if not patterns or matches(p, patterns)}
        lb = {p: v for p, v in leaves(rb.manifest.tree, where=rb.where) if not patterns or matches(p, patterns)}
        added = [p for p in lb if p not in la]
        removed = [p for p in la if p not in lb]
        pairs, reshaped, values = [], [], []
        for path, va in la.items():
            if path not in lb:
                continue
            vb = lb[path]
            if isinstance(va, TensorRef) and isinstance(vb, TensorRef):
                if (va.dtype, va.shape) == (vb.dtype, vb.shape):
                    pairs.append((path, va, vb))
                else:
                    reshaped.append({"key": format_path(path), "a": str(va), "b": str(vb)})
            elif isinstance(va, TensorRef) or isinstance(vb, TensorRef) or not _same(va, vb):
                values.append({"key": format_path(path), "a": va, "b": vb})
        changed, unchanged = _compare_tensors(ra, rb, pairs, ui, batch_mib << 20)
        ma, mb = ra.metadata(), rb.metadata()
        metrics = _metrics(ma if isinstance(ma, dict) else {}, mb if isinstance(mb, dict) else {})

    def describe(path: Path, tree: dict[Path, Any]) -> dict[str, Any]:
        value = tree[path]
        return {"key": format_path(path), "value": str(value) if isinstance(value, TensorRef) else value}

    report: dict[str, Any] = {
        "a": ra.where,
        "b": rb.where,
        "tensors": {
            "changed": changed,
            "unchanged": unchanged,
            "added": [describe(p, lb) for p in added],
            "removed": [describe(p, la) for p in removed],
            "reshaped": reshaped,
        },
        "values": [
            {
                **v,
                "a": str(v["a"]) if isinstance(v["a"], TensorRef) else v["a"],
                "b": str(v["b"]) if isinstance(v["b"], TensorRef) else v["b"],
            }
            for v in values
        ],
        "metadata": metrics,
    }
    if json_output:
        ui.emit_json(report)
        return
    ui.print(Text.assemble(("A  ", "bold"), ra.where))
    ui.print(Text.assemble(("B  ", "bold"), rb.where))
    ui.print(
        f"tensors: {len(changed)} changed, {unchanged} unchanged, {len(added)} added, "
        f"{len(removed)} removed, {len(reshaped)} reshaped"
    )
    if changed:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for name, justify in (("changed", "left"), ("dtype/shape", "left"), ("max |Δ|", "right"), ("rel L2", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for row in changed[: limit or None]:
            table.add_row(row["key"], f"{row['dtype']}{row['shape']}", f"{row['max_abs']:.4g}", f"{row['rel_l2']:.4g}")
        ui.print()
        ui.print(table)
        if limit and len(changed) > limit:
            ui.note(f"... {len(changed) - limit} more changed tensors (--limit 0 shows all)")
    sections: list[tuple[str, list[tuple[str, str, str]]]] = [
        ("added", [(r["key"], "", str(r["value"])) for r in report["tensors"]["added"]]),
        ("removed", [(r["key"], str(r["value"]), "") for r in report["tensors"]["removed"]]),
        ("reshaped", [(r["key"], r["a"], r["b"]) for r in reshaped]),
        ("values", [(r["key"], format_value(r["a"]), format_value(r["b"])) for r in report["values"]]),
        ("metadata", [(r["key"], format_number(r["a"]), format_number(r["b"])) for r in metrics]),
    ]
    for title, rows in sections:
        if not rows:
            continue
        table = Table(box=None, header_style="bold", pad_edge=False)
        table.add_column(title)
        table.add_column("A")
        table.add_column("B")
        for key, va, vb in rows:
            table.add_row(key, Text(va, style="red"), Text(vb, style="green"))
        ui.print()
        ui.print(table)
    if not (changed or added or removed or reshaped or values or metrics):
        ui.print("identical")
