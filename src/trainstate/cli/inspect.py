"""``trainstate inspect PATH``: what a checkpoint holds, from its manifest (tensor data is not read)."""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from trainstate.cli._scan import open_checkpoint
from trainstate.cli._tree import (
    TensorRef,
    category,
    children,
    leaves,
    matches,
    optimizer_states,
    parameter_count,
    plain,
    scheduler_states,
    stateful_type,
)
from trainstate.cli._ui import (
    UI,
    Debug,
    Filters,
    Json,
    Quiet,
    command,
    format_bytes,
    format_number,
    format_value,
    parse_time,
)
from trainstate.format import CheckpointReader
from trainstate.format.codec import Path, format_path

HELP = "Show what a checkpoint holds: tree, dtypes, shapes, sizes, optimizer settings, step and metrics."
EPILOG = """\
Reads the manifest only; tensor data is read only for --values (small tensors).

Examples:

  trainstate inspect runs/exp1/step_00000300

  trainstate inspect ckpt --filter 'model.*' --values

  trainstate inspect ckpt --json | jq '.optimizers[0].param_groups[0].lr'
"""

_FLAGS = (
    "foreach",
    "fused",
    "capturable",
    "differentiable",
    "maximize",
    "amsgrad",
    "nesterov",
    "decoupled_weight_decay",
)


def _short_type(name: str | None) -> str:
    return name.rsplit(".", 1)[-1] if name else ""


def _summary(tree: Any, where: str) -> list[dict[str, Any]]:
    rows = []
    for key, node in children(tree, where) or []:
        refs = [v for _, v in leaves(node, (key,), where) if isinstance(v, TensorRef)]
        row = {
            "key": str(key),
            "category": category(key, node),
            "type": stateful_type(node),
            "tensors": len(refs),
            "elements": sum(r.numel for r in refs),
            "bytes": sum(r.nbytes for r in refs),
        }
        if row["category"] == "model":
            row["parameters"] = parameter_count(node)
        rows.append(row)
    return rows


def _optimizers(tree: Any, where: str) -> list[dict[str, Any]]:
    result = []
    for path, kind, node in optimizer_states(tree):
        state = plain(node, path, where)
        groups = []
        for index, group in enumerate(state.get("param_groups") or []):
            if not isinstance(group, dict):
                continue
            params = group.get("params")
            settings = {
                k: v
                for k, v in group.items()
                if k != "params" and not (k in _FLAGS and v in (None, False)) and not isinstance(v, TensorRef)
            }
            groups.append({"index": index, "params": len(params) if isinstance(params, list) else None, **settings})
        result.append({"key": format_path(path), "type": kind, "param_groups": groups})
    return result


def _schedulers(tree: Any, where: str) -> list[dict[str, Any]]:
    result = []
    for path, kind, node in scheduler_states(tree):
        state = plain(node, path, where)
        result.append(
            {
                "key": format_path(path),
                "type": kind,
                "last_epoch": state.get("last_epoch"),
                "last_lr": state.get("_last_lr"),
            }
        )
    return result


def _small_values(reader: CheckpointReader, refs: dict[Path, TensorRef], limit: int) -> dict[Path, Any]:
    """The values of tensors with at most ``limit`` elements: the only data ``inspect`` reads."""
    wanted = {path: ref for path, ref in refs.items() if ref.numel <= limit}
    if not wanted:
        return {}
    from trainstate.api import tensor_source  # reading tensor data is the one part that needs torch

    _, loader, _ = tensor_source(reader, map_location="cpu", verify=False)  # just these byte ranges
    decoded = {path: reader.decode(ref.node, loader, path=path) for path, ref in wanted.items()}
    loader.fill()
    return decoded


def _tree_view(
    title: str,
    items: list[tuple[Path, Any]],
    types: dict[Path, str],
    values: dict[Path, Any],
    depth: int | None,
) -> Tree:
    totals: dict[Path, list[int]] = defaultdict(lambda: [0, 0])
    for path, value in items:
        if isinstance(value, TensorRef):
            for i in range(len(path)):
                totals[path[:i]][0] += 1
                totals[path[:i]][1] += value.nbytes
    root = Tree(Text(title, style="bold"))
    nodes: dict[Path, Tree] = {(): root}

    def branch(path: Path) -> Tree | None:
        if path in nodes:
            return nodes[path]
        parent = branch(path[:-1])
        if parent is None:
            return None
        if depth is not None and len(path) > depth:
            return None
        count, size = totals.get(path, [0, 0])
        label = Text(str(path[-1]), style="bold")
        if path in types:
            label.append(f"  {types[path]}", style="magenta")
        if count:
            label.append(f"  {count} tensor{'s' * (count != 1)}, {format_bytes(size)}", style="dim")
        nodes[path] = parent.add(label)
        return nodes[path]

    for path, value in items:
        if depth is not None and len(path) > depth:
            branch(path[:depth])  # the collapsed container still shows, with its totals
            continue
        parent = branch(path[:-1])
        if parent is None:
            continue
        label = Text(str(path[-1]) if path else "<root>")
        if isinstance(value, TensorRef):
            label.append(f"  {value}", style="cyan")
            label.append(f"  {format_bytes(value.nbytes)}", style="dim")
            if path in values:
                label.append(f"  = {format_value(values[path].tolist(), 80)}")
        else:
            label.append(f"  {format_value(value)}", style="green")
        parent.add(label)
    return root


def _types(node: Any, path: Path = ()) -> dict[Path, str]:
    found = {path: _short_type(t)} if (t := stateful_type(node)) else {}
    for key, child in children(node) or []:
        found.update(_types(child, (*path, key)))
    return found


@command
def inspect(
    path: Annotated[str, typer.Argument(metavar="PATH", help="A trainstate checkpoint directory.")],
    filters: Filters = None,
    depth: Annotated[
        int | None, typer.Option(min=0, help="Levels of the tree to show (default 3, all with --filter).")
    ] = None,
    values: Annotated[bool, typer.Option("--values", help="Show the values of small tensors (reads them).")] = False,
    max_elements: Annotated[int, typer.Option(min=1, help="What 'small' means for --values.")] = 16,
    json_output: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    ui = UI(json_output=json_output, quiet=quiet)
    patterns = list(filters or [])
    with open_checkpoint(path) as reader:
        manifest = reader.manifest
        tree = manifest.tree
        metadata = reader.metadata()
        metadata = metadata if isinstance(metadata, dict) else {}
        items = [(p, v) for p, v in leaves(tree, where=reader.where) if not patterns or matches(p, patterns)]
        refs = {p: v for p, v in items if isinstance(v, TensorRef)}
        small = _small_values(reader, refs, max_elements) if values else {}
        summary = _summary(tree, reader.where)
        optimizers = _optimizers(tree, reader.where)
        schedulers = _schedulers(tree, reader.where)
    if json_output:
        ui.emit_json(
            {
                "path": reader.where,
                "format_version": manifest.format_version,
                "trainstate_version": manifest.trainstate_version,
                "torch_version": manifest.torch_version,
                "created": manifest.created,
                "environment": manifest.environment,
                "metadata": metadata,
                "files": [{"name": f.name, "size": f.size, "hash": f.hash} for f in manifest.files],
                "summary": summary,
                "parameters": sum(r.get("parameters", 0) for r in summary),
                "optimizers": optimizers,
                "schedulers": schedulers,
                "tensors": [
                    {"key": format_path(p), "dtype": r.dtype, "shape": list(r.shape), "bytes": r.nbytes, "file": r.file}
                    for p, r in refs.items()
                ],
                "values": {
                    format_path(p): (small[p] if p in small else v)
                    for p, v in items
                    if not isinstance(v, TensorRef) or p in small
                },
            }
        )
        return
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    header.add_row("checkpoint", reader.where)
    created = parse_time(manifest.created)
    header.add_row(
        "written",
        f"{created.strftime('%Y-%m-%d %H:%M:%S UTC') if created else manifest.created} by trainstate "
        f"{manifest.trainstate_version}, torch {manifest.torch_version} (format v{manifest.format_version})",
    )
    env = manifest.environment
    if env:
        header.add_row(
            "environment",
            ", ".join(
                f"{k.replace('_', ' ')} {v}"
                for k, v in env.items()
                if k in ("world_size", "cuda_device_count", "hostname")
            ),
        )
    top = {str(p[0]): v for p, v in items if len(p) == 1 and not isinstance(v, TensorRef)}
    for key in ("step", "epoch"):
        if key in metadata or isinstance(top.get(key), (int, float)):
            header.add_row(key, format_number(metadata.get(key, top.get(key))))
    metrics = metadata.get("metrics")
    if isinstance(metrics, dict) and metrics:
        header.add_row("metrics", "  ".join(f"{k}={format_number(v)}" for k, v in metrics.items()))
    other = {k: v for k, v in metadata.items() if k not in ("step", "epoch", "metrics")}
    for key, value in other.items():
        header.add_row(str(key), format_value(value, 100))  # a hostile metadata key may be any value
    total = sum(f.size for f in manifest.files)
    count = sum(r["tensors"] for r in summary)
    files = len(manifest.files)
    header.add_row(
        "data", f"{count} tensor{'s' * (count != 1)}, {format_bytes(total)} in {files} file{'s' * (files != 1)}"
    )
    ui.print(header)
    ui.print()
    table = Table(title="contents", title_justify="left", box=None, header_style="bold", pad_edge=False)
    for name, justify in (
        ("key", "left"),
        ("what", "left"),
        ("type", "left"),
        ("tensors", "right"),
        ("parameters", "right"),
        ("size", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in summary:
        table.add_row(
            row["key"],
            row["category"],
            _short_type(row["type"]),
            str(row["tensors"]) if row["tensors"] else "",
            f"{row['parameters']:,}" if "parameters" in row else "",
            format_bytes(row["bytes"]) if row["tensors"] else "",
        )
    ui.print(table)
    for opt in optimizers:
        ui.print()
        settings = Table(
            title=f"optimizer {opt['key']}  {_short_type(opt['type']) or '(plain state dict)'}",
            title_justify="left",
            box=None,
            header_style="bold",
            pad_edge=False,
        )
        keys = [k for g in opt["param_groups"] for k in g if k != "index"]
        columns = list(dict.fromkeys(["params", "lr", *keys]))
        settings.add_column("group", justify="right")
        for column in columns:
            settings.add_column(column, justify="right")
        for group in opt["param_groups"]:
            settings.add_row(
                str(group["index"]), *[format_value(group.get(c, "")) if c in group else "" for c in columns]
            )
        ui.print(settings)
    for sched in schedulers:
        ui.print()
        ui.print(
            Text.assemble(
                (f"scheduler {sched['key']}  {_short_type(sched['type']) or '(plain state dict)'}", "italic"),
                f"  last_epoch={sched['last_epoch']}  last lr={format_value(sched['last_lr'])}",
            )
        )
    ui.print()
    shown_depth = depth if depth is not None else (None if patterns else 3)
    ui.print(_tree_view(reader.where, items, _types(tree), small, None if shown_depth == 0 else shown_depth))
