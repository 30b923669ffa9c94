"""``trainstate convert SRC DST``: foreign checkpoints into trainstate, and trainstate into ``torch.save``."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from trainstate.cli._scan import reader_at, storage_at, storage_options
from trainstate.cli._tree import TensorRef, children, leaves
from trainstate.cli._ui import UI, Debug, Json, Quiet, command, fail, format_bytes, usage_error
from trainstate.convert.kinds import SOURCE_KINDS, TORCH_SUFFIXES
from trainstate.errors import UnsupportedValueError
from trainstate.storage import local_path, scheme_of

HELP = "Convert torch.save / Lightning / Hugging Face Trainer / DCP checkpoints to trainstate, or back to torch.save."
EPILOG = f"""\
SRC is a torch.save file ({", ".join(TORCH_SUFFIXES)}), a Lightning .ckpt, a Hugging Face Trainer checkpoint
directory, a torch.distributed.checkpoint directory, or a trainstate checkpoint (then DST is a torch.save file).
Pickles are read with torch.load(weights_only=True) and an allowlist of harmless types; a file that needs
more is refused unless --trust-pickle is given (that runs code from the file: only for files you trust).
Framework layouts become model / optimizer / scheduler / rng so `trainstate.load(dst, {{"model": model, ...}})`
restores them; --native keeps the source's own layout.

Examples:

  trainstate convert lightning_logs/version_0/checkpoints/last.ckpt ckpt/converted

  trainstate convert out/checkpoint-500 ckpt/step_00000500

  trainstate convert ckpt/step_00000500 step500.pt
"""


@command
def convert(
    src: Annotated[str, typer.Argument(metavar="SRC", help="The checkpoint to convert.")],
    dst: Annotated[str, typer.Argument(metavar="DST", help="Where to write the result (must not exist).")],
    source: Annotated[
        str | None, typer.Option("--from", help=f"Source kind: {', '.join(SOURCE_KINDS)} (default: detected).")
    ] = None,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Fully unpickle SRC: runs code from it; only for trusted files.")
    ] = False,
    native: Annotated[bool, typer.Option("--native", help="Keep the source's own top-level layout.")] = False,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            "-x",
            metavar="GLOB",
            help="Leave out keys matching this glob, e.g. 'lightning.callbacks' (repeatable).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
    json_output: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    if source is not None and source not in SOURCE_KINDS:
        usage_error(f"{source!r} is not one of {', '.join(SOURCE_KINDS)}", param="--from")
    from trainstate.convert import detect_source, to_torch_file, to_trainstate

    ui = UI(json_output=json_output, quiet=quiet)
    if trust_pickle:
        ui.warn(f"--trust-pickle: unpickling {src} fully; this runs any code the file contains")
    remote_src = scheme_of(src) != "file"
    kind = "trainstate" if remote_src else detect_source(src)
    target = local_path(dst) if kind == "trainstate" or scheme_of(dst) == "file" else dst.rstrip("/")
    if kind == "trainstate" and os.path.lexists(target) and not force:
        fail(f"{target}: already exists (pass --force to replace it)")
    if kind != "trainstate" and not force:
        parent, _, name = target.rpartition("/")
        if storage_at(parent or ".").exists(name):
            fail(f"{target}: already exists (pass --force to replace it)")
    shown_src = src if remote_src else os.path.abspath(src)
    if kind == "trainstate":
        if source is not None:
            usage_error(f"{src} is a trainstate checkpoint; --from applies to foreign sources", param="--from")
        if not target.endswith(TORCH_SUFFIXES):
            usage_error(
                f"{dst}: a trainstate checkpoint converts to a torch.save file; name it *.pt, *.pth, *.bin or *.ckpt"
            )
        with ui.progress(f"writing {dst}", None):
            to_torch_file(src, target, overwrite=force, storage_options=storage_options())
        size = os.path.getsize(target)
        if json_output:
            ui.emit_json({"source": "trainstate", "src": shown_src, "dst": target, "bytes": size})
        else:
            ui.print(f"converted trainstate checkpoint {shown_src} -> {target} ({format_bytes(size)})")
        return
    if target.endswith(TORCH_SUFFIXES) and os.path.splitext(target)[1]:
        ui.warn(f"{dst}: writing a trainstate checkpoint directory (despite the file suffix)")
    with ui.progress("reading", None) as advance:
        try:
            result = to_trainstate(
                src,
                target,
                kind=source,
                trust_pickle=trust_pickle,
                native=native,
                exclude=list(exclude or []),
                overwrite=force,
                progress=lambda text: advance(0, description=text),
                storage_options=storage_options() if scheme_of(target) != "file" else None,
            )
        except UnsupportedValueError as exc:
            fail(f"{exc.args[0].split('; ')[0]}; leave it out with --exclude KEY")
    with reader_at(target) as reader:
        refs = [v for _, v in leaves(reader.manifest.tree, where=reader.where) if isinstance(v, TensorRef)]
        keys = [str(k) for k, _ in children(reader.manifest.tree) or []]
        nbytes = sum(f.size for f in reader.manifest.files)
    summary = {
        "source": result.kind,
        "src": result.path,
        "dst": target,
        "keys": keys,
        "tensors": len(refs),
        "bytes": nbytes,
        "metadata": {k: v for k, v in result.metadata.items() if k != "wrapped"},
        "skipped": result.skipped,
    }
    if json_output:
        ui.emit_json(summary)
        return
    ui.print(f"converted {result.kind} checkpoint {result.path} -> {target}")
    ui.print(f"  keys: {', '.join(keys)}")
    ui.print(f"  {len(refs)} tensors, {format_bytes(nbytes)}")
    for key in ("step", "epoch"):
        if key in result.metadata:
            ui.print(f"  {key}: {result.metadata[key]}")
    for item in result.skipped:
        ui.note(f"  skipped {item}")
