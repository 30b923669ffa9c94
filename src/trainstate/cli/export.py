"""``trainstate export PATH OUT``: the model weights alone, as ``.safetensors`` or a ``torch.save`` file."""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from trainstate.cli._scan import open_checkpoint
from trainstate.cli._tree import TensorRef, category, children, find, is_tensor, leaves
from trainstate.cli._ui import UI, Debug, Json, Quiet, command, fail, format_bytes, usage_error
from trainstate.convert.kinds import TORCH_SUFFIXES
from trainstate.format import CheckpointReader
from trainstate.format.codec import Path, format_path
from trainstate.storage import atomic_write_file, local_path

if TYPE_CHECKING:
    import torch

HELP = "Export the model weights of a checkpoint to .safetensors (default) or .pt, with key remapping and dtype cast."
EPILOG = """\
The model is the top-level 'model' entry (or 'state_dict', 'module', or the only module state);
choose another subtree with --key. Keys are the dotted paths inside it.

Examples:

  trainstate export runs/exp1/step_00000300 model.safetensors

  trainstate export ckpt/from-lightning weights.pt --strip-prefix net. --dtype bf16

  trainstate export ckpt hf.safetensors --key model --prefix transformer.
"""

_MODEL_KEYS = ("model", "state_dict", "module", "model_state_dict")
_DTYPES = {  # --dtype spelling -> torch dtype name (torch is imported only once the export runs)
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "fp64": "float64",
    "float64": "float64",
    "double": "float64",
}


def _choose(tree: Any, key: str | None, where: str) -> tuple[Path, Any]:
    top = children(tree, where) or []
    names = ", ".join(str(k) for k, _ in top) or "none"
    if key is not None:
        try:
            return find(tree, key, where)
        except KeyError as exc:
            fail(f"{where}: no key {exc.args[0]!r} (top-level keys: {names})")
    for candidate in _MODEL_KEYS:
        for k, node in top:
            if k == candidate:
                return (k,), node
    models = [(k, node) for k, node in top if category(k, node) == "model"]
    if len(models) == 1:
        return (models[0][0],), models[0][1]
    if top and all(is_tensor(node) for _, node in top):
        return (), tree  # the checkpoint is itself a flat state dict
    fail(f"{where}: cannot tell which entry holds the model weights (top-level keys: {names}); choose one with --key")


def _remap(keys: list[str], strip: str | None, prefix: str | None, ui: UI) -> list[str]:
    out = []
    unmatched = 0
    for key in keys:
        if strip:
            if key.startswith(strip):
                key = key[len(strip) :]
            else:
                unmatched += 1
        out.append(f"{prefix or ''}{key}")
    if strip and unmatched:
        ui.warn(f"{unmatched} of {len(keys)} keys do not start with {strip!r} and keep their names")
    dupes = sorted({k for k in out if out.count(k) > 1})
    if dupes:
        fail(f"key remapping makes {len(dupes)} keys collide, e.g. {dupes[0]!r}")
    return out


def _load_one(reader: CheckpointReader, path: Path, ref: TensorRef) -> torch.Tensor:
    """One tensor, read on its own (its files were verified up front)."""
    import torch

    from trainstate.api import tensor_source

    _, loader, _ = tensor_source(reader, map_location="cpu", verify=False)
    value = reader.decode(ref.node, loader, path=path)
    loader.fill()
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(value)


def _safetensors_dtype(dtype: torch.dtype, target: str) -> str:
    from trainstate.format.tensorfile import SAFETENSORS_DTYPES

    name = SAFETENSORS_DTYPES.get(dtype)
    if name is None:  # trainstate's own files keep such tensors as raw bytes; an export must be portable
        fail(f"{target}: safetensors cannot store {dtype} tensors; use --format pt or --dtype")
    return name


def _stream_safetensors(
    target: str, items: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]]
) -> None:
    """Write a safetensors file one tensor at a time: the header from the manifest's dtypes and
    shapes, then each tensor read, written and freed, so memory stays at the largest tensor (a
    sharded model never needs to fit in memory at once)."""
    from trainstate.format.tensorfile import byte_view

    ordered = sorted(items, key=lambda item: (-item[1].itemsize, item[0]))  # aligned, no gaps, as safetensors orders
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _ in ordered:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _safetensors_dtype(dtype, target),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    with atomic_write_file(target) as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dtype, shape, produce in ordered:
            tensor = produce().detach().to(dtype).contiguous()
            if tuple(tensor.shape) != shape:  # the manifest and the data disagree: refuse, never write junk
                fail(f"{target}: {name!r} read as {list(tensor.shape)}, the manifest says {list(shape)}")
            f.write(byte_view(tensor))
            del tensor


@command
def export(
    path: Annotated[str, typer.Argument(metavar="PATH", help="A trainstate checkpoint.")],
    out: Annotated[str, typer.Argument(metavar="OUT", help="The weights file to write (.safetensors or .pt).")],
    key: Annotated[str | None, typer.Option(help="Dotted key of the subtree to export (default: the model).")] = None,
    prefix: Annotated[str | None, typer.Option(help="Prepend this to every key (after --strip-prefix).")] = None,
    strip_prefix: Annotated[str | None, typer.Option(help="Remove this from the start of every key.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Cast floating-point tensors: bf16, fp16, fp32 or fp64.")] = None,
    file_format: Annotated[
        str | None, typer.Option("--format", help="safetensors or pt (default: from OUT's suffix, else safetensors).")
    ] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the content-hash check of the data files.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    json_output: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    if dtype is not None and dtype.lower() not in _DTYPES:
        usage_error(f"{dtype!r} is not one of bf16, fp16, fp32, fp64", param="--dtype")
    if file_format is None:
        file_format = "pt" if out.endswith(TORCH_SUFFIXES) else "safetensors"
    if file_format not in ("safetensors", "pt"):
        usage_error(f"{file_format!r} is not 'safetensors' or 'pt'", param="--format")
    ui = UI(json_output=json_output, quiet=quiet)
    target = local_path(out)
    if os.path.lexists(target) and not force:
        fail(f"{target}: already exists (pass --force to replace it)")
    with open_checkpoint(path) as reader:
        base, subtree = _choose(reader.manifest.tree, key, reader.where)
        items = list(leaves(subtree, base, reader.where))
        refs = {p: v for p, v in items if isinstance(v, TensorRef)}
        if not refs:
            fail(f"{reader.where}: {format_path(base)!r} holds no tensors")
        skipped = [format_path(p) for p, v in items if not isinstance(v, TensorRef)]
        names = [format_path(p[len(base) :]) if len(p) > len(base) else str(p[-1]) for p in refs]
        names = _remap(names, strip_prefix, prefix, ui)
        import torch

        from trainstate.format.tensorfile import dtype_from_name

        cast = dtype_from_name(_DTYPES[dtype.lower()], where="--dtype") if dtype else None
        if not no_verify:
            with ui.progress(f"verifying {reader.where}", None):
                reader.verify()  # once, up front: the tensors are then read one at a time

        def exported_dtype(ref: TensorRef) -> torch.dtype:
            saved = dtype_from_name(ref.node.get("dtype"), where=reader.where)
            return cast if cast is not None and saved.is_floating_point else saved

        with ui.progress(f"writing {out}", None):
            if file_format == "safetensors":
                _stream_safetensors(
                    target,
                    [
                        (name, exported_dtype(ref), ref.shape, functools.partial(_load_one, reader, p, ref))
                        for name, (p, ref) in zip(names, refs.items(), strict=True)
                    ],
                )
            else:  # torch.save needs the whole dict in memory
                output = OrderedDict(
                    (name, _load_one(reader, p, ref).to(exported_dtype(ref)))
                    for name, (p, ref) in zip(names, refs.items(), strict=True)
                )
                with atomic_write_file(target) as f:
                    torch.save(output, f)
    elements = sum(math.prod(ref.shape) for ref in refs.values())
    size = os.path.getsize(target)
    summary = {
        "path": reader.where,
        "key": format_path(base),
        "out": target,
        "format": file_format,
        "tensors": len(refs),
        "elements": elements,
        "bytes": size,
        "skipped": skipped,
    }
    if json_output:
        ui.emit_json(summary)
        return
    ui.print(
        f"exported {summary['tensors']} tensors ({summary['elements']:,} elements) from {summary['key']!r} "
        f"to {target} ({file_format}, {format_bytes(size)})"
    )
    if skipped:
        ui.note(
            f"skipped {len(skipped)} non-tensor value(s): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}"
        )
