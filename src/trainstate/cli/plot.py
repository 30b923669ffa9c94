"""``trainstate plot DIR``: metrics over steps across the checkpoints of a directory, as a PNG."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from trainstate.cli._scan import scan
from trainstate.cli._ui import UI, Better, Debug, Json, Mode, Quiet, command, fail, usage_error
from trainstate.storage import atomic_write_file, local_path

HELP = "Plot metrics over steps across the checkpoints of a directory, as a PNG (needs matplotlib)."
EPILOG = """\
The metrics are those saved with each checkpoint (CheckpointManager.save(..., metrics=...)); one panel per
metric, its best point circled: the lowest, or the highest for NAME:max (--mode sets the default).
Needs matplotlib: pip install 'trainstate[plot]'.

Examples:

  trainstate plot runs/exp1 --metric val_loss -o val_loss.png

  trainstate plot runs/exp1 -m loss -m accuracy:max -o curves.png
"""

INSTALL_HINT = "pip install 'trainstate[plot]'"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        fail(f"plot needs matplotlib: {INSTALL_HINT}")
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


@command
def plot(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="A directory of checkpoints.")],
    metrics: Annotated[
        list[str] | None,
        typer.Option("--metric", "-m", help="Metric to plot, NAME or NAME:max (repeatable; default: all)."),
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="The PNG file to write.")] = "metrics.png",
    mode: Mode = Better.min,
    log_y: Annotated[bool, typer.Option("--log-y", help="Logarithmic y axis.")] = False,
    title: Annotated[str | None, typer.Option(help="Figure title (default: the directory).")] = None,
    json_output: Json = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    if not output.lower().endswith(".png"):
        usage_error(f"{output}: the output is a PNG file; name it *.png", param="--output")
    modes: dict[str, str] = {}
    for spec in metrics or []:
        name, _, wanted = spec.rpartition(":") if spec.endswith((":min", ":max")) else (spec, "", mode.value)
        modes[name] = wanted
    ui = UI(json_output=json_output, quiet=quiet)
    found = scan(directory)
    available = found.metric_names()
    names = list(modes or available)
    if not names:
        fail(f"{found.directory}: no checkpoint here has metrics to plot")
    missing = [n for n in names if n not in available]
    if missing:
        found_names = ", ".join(available) or "none"
        fail(f"{found.directory}: no checkpoint has metric {missing[0]!r} (metrics found: {found_names})")
    series: dict[str, list[tuple[int, float]]] = {}
    for name in names:
        series[name] = [
            (e.step, v) for e in found.committed if e.step is not None and (v := e.metric(name)) is not None
        ]
    plt = _pyplot()
    fig, axes = plt.subplots(len(names), 1, sharex=True, figsize=(8, 2.2 + 2.0 * len(names)), squeeze=False)
    best: dict[str, dict[str, Any]] = {}
    for ax, name in zip(axes[:, 0], names, strict=True):
        points = series[name]
        steps, values = [p[0] for p in points], [p[1] for p in points]
        ax.plot(steps, values, marker="o", markersize=4, linewidth=1.5, label=name)
        if points:
            better = modes.get(name, mode.value)
            pick = (min if better == "min" else max)(points, key=lambda p: p[1])
            best[name] = {"step": pick[0], "value": pick[1], "mode": better}
            ax.scatter(
                [pick[0]],
                [pick[1]],
                s=120,
                facecolors="none",
                edgecolors="red",
                linewidths=2,
                zorder=3,
                label=f"best ({better}): {pick[1]:.4g} at step {pick[0]}",
            )
        ax.set_ylabel(name)
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title or found.directory, fontsize="medium")
    fig.tight_layout()
    target = local_path(output)
    with atomic_write_file(target) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    if json_output:
        ui.emit_json(
            {
                "directory": found.directory,
                "output": target,
                "series": {n: [{"step": s, "value": v} for s, v in series[n]] for n in names},
                "best": best,
            }
        )
        return
    count = sum(len(s) for s in series.values())
    ui.print(f"wrote {target}: {', '.join(names)} over {count} points from {len(found.committed)} checkpoints")
