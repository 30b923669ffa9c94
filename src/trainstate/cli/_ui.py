"""What every command shares: output consoles, common options, error reporting, progress, formatting."""

from __future__ import annotations

import base64
import datetime as _dt
import enum
import functools
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Span, Text

from trainstate.errors import CheckpointError

__all__ = [
    "Better",
    "Columns",
    "Debug",
    "Filters",
    "Json",
    "Mode",
    "Quiet",
    "UI",
    "command",
    "fail",
    "format_age",
    "format_bytes",
    "format_value",
    "jsonable",
    "usage_error",
]

F = TypeVar("F", bound=Callable[..., Any])

Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes; results and errors only.")]
Debug = Annotated[bool, typer.Option("--debug", help="On an error, show the full traceback.")]
Filters = Annotated[
    list[str] | None,
    typer.Option(
        "--filter", "-f", metavar="GLOB", help="Only keys matching this glob or prefix, e.g. 'model.*' (repeatable)."
    ),
]


class Columns:
    """A listing: columns aligned by padding, two spaces apart, one line per row, never folded.

    rich's ``Table`` lays out every cell through its measuring engine, about a millisecond a row:
    a second for ``trainstate ls`` of 1,000 checkpoints. A listing only needs column widths.
    """

    def __init__(self, *columns: str, right: tuple[str, ...] = ()) -> None:
        self.names = columns
        self.right = frozenset(right)
        self.rows: list[tuple[Text, ...]] = []

    def add_row(self, *cells: str | Text) -> None:
        self.rows.append(tuple(cell if isinstance(cell, Text) else Text(cell) for cell in cells))

    def render(self) -> Text:
        header = tuple(Text(name, style="bold") for name in self.names)
        lines = [header, *self.rows]
        widths = [max(cell_len(line[i].plain) for line in lines) for i in range(len(self.names))]
        right = [name in self.right for name in self.names]
        parts: list[str] = []
        spans: list[Span] = []
        offset = 0
        for line in lines:
            for i, cell in enumerate(line):
                pad = " " * (widths[i] - cell_len(cell.plain))
                text = cell.plain
                start = offset + (len(pad) if right[i] else 0)
                spans += [Span(start, start + len(text), cell.style)] if cell.style else []
                spans += [Span(start + span.start, start + span.end, span.style) for span in cell.spans]
                last = i == len(widths) - 1
                piece = pad + text if right[i] else text + ("" if last else pad)
                piece += "\n" if last else "  "
                parts.append(piece)
                offset += len(piece)
        return Text("".join(parts).removesuffix("\n"), spans=spans)


class Better(str, enum.Enum):
    """Which end of a metric is best (the manager's ``mode``)."""

    min = "min"
    max = "max"


Mode = Annotated[Better, typer.Option(help="Whether a smaller (min) or larger (max) metric is better.")]

_PIPE_WIDTH = 160  # rich would fold tables to 80 columns when not writing to a terminal

# typer >= 0.24 vendors its own click; take click's exception classes from typer, whichever it uses.
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_UsageError: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Failure(Exception):
    """An expected failure whose message has already been worded for the user."""


def fail(message: str) -> NoReturn:
    """Stop the command with exit code 1, printing ``message`` as one red line."""
    raise _Failure(message)


def usage_error(message: str, *, param: str | None = None) -> NoReturn:
    """Stop with exit code 2: the command line itself is wrong."""
    raise typer.BadParameter(message, param_hint=param) if param else _UsageError(message)


def _message(exc: BaseException) -> str:
    if isinstance(exc, (_Failure, CheckpointError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, (ValueError, OSError, NotImplementedError)):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"


def _error_console() -> Console:
    return Console(file=sys.stderr, highlight=False, markup=False, emoji=False, soft_wrap=True)


def _tolerant_output() -> None:
    """Checkpoint keys may hold lone surrogates (names from ``os.listdir``); print them escaped
    instead of failing with UnicodeEncodeError on a strict UTF-8 terminal or pipe."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError, io.UnsupportedOperation):
                pass


def command(fn: F) -> F:
    """Wrap a command: expected errors become one red line on stderr and exit code 1 (``--debug``
    re-raises them with the traceback); usage errors keep click's exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _tolerant_output()
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, _ClickException):
            raise
        except KeyboardInterrupt:
            _error_console().print(Text("interrupted", style="red"))
            raise typer.Exit(130) from None
        except Exception as exc:
            if kwargs.get("debug"):
                raise
            text = " ".join(_message(exc).split("\n"))
            if kwargs.get("json_output"):  # a script reading --json output gets the error as JSON too
                sys.stdout.write(json.dumps({"error": text, "type": type(exc).__name__}, ensure_ascii=False) + "\n")
            _error_console().print(Text(f"error: {text}", style="bold red"))
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class UI:
    """Output of one command run: stdout for results, stderr for progress, notes and warnings."""

    def __init__(self, *, json_output: bool = False, quiet: bool = False) -> None:
        self.json_output = json_output
        self.quiet = quiet
        terminal = sys.stdout.isatty()
        width = None if terminal or os.environ.get("COLUMNS") else _PIPE_WIDTH
        # markup and emoji off: paths and values like "[0.005]" or ":memo:" are printed as they are
        self.out = Console(file=sys.stdout, highlight=False, markup=False, emoji=False, width=width)
        self.err = Console(file=sys.stderr, highlight=False, markup=False, emoji=False, soft_wrap=True)
        self.show_progress = terminal and not quiet and not json_output

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Human output on stdout (nothing in ``--json`` mode). Lines of text are never folded (a
        long path stays on one line for scripts and greps); tables fit the width."""
        if not self.json_output:
            kwargs.setdefault("soft_wrap", all(isinstance(o, (str, Text)) for o in objects))
            self.out.print(*objects, **kwargs)

    def note(self, message: str) -> None:
        """A remark on stderr, hidden by ``--quiet``."""
        if not self.quiet:
            self.err.print(Text(message, style="dim"))

    def warn(self, message: str) -> None:
        """A warning on stderr (shown even with ``--quiet``)."""
        self.err.print(Text(f"warning: {message}", style="yellow"))

    def emit_json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(jsonable(data), indent=2, ensure_ascii=False) + "\n")

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        """A progress bar over ``total`` bytes (a spinner when None) on stderr, only on a terminal.

        Yields ``advance(n=0, description=None)``.
        """
        if not self.show_progress:
            yield lambda n=0, description=None: None
            return
        if total is None:
            columns: tuple[Any, ...] = (SpinnerColumn(), TextColumn("{task.description}"))
        else:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
        with Progress(*columns, console=Console(file=sys.stderr), transient=True) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: int = 0, description: str | None = None) -> None:
                bar.update(task, advance=n, description=description)

            yield advance


# ----------------------------------------------------------------------------------- formatting
def format_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    """``4000`` -> ``"1h ago"``."""
    if seconds < 0:
        return "in the future"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def parse_time(text: str) -> _dt.datetime | None:
    """The manifest's ISO creation time, or None."""
    try:
        parsed = _dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)


def format_number(value: Any) -> str:
    """Metrics and hyper-parameters: 4 significant digits for floats, ints as they are."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def format_value(value: Any, width: int = 60) -> str:
    """A plain value, shortened for one line of a table or tree."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif type(value) in (list, tuple) and len(value) <= 64:
        inner = ", ".join(format_value(v, width) for v in value)
        text = f"[{inner}]" if isinstance(value, list) else f"({inner}{',' * (len(value) == 1)})"
    elif isinstance(value, bytes):
        text = f"<{len(value)} bytes>"
    elif isinstance(value, int) and _huge(value):
        text = hex(value)
    else:
        text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _huge(value: int) -> bool:
    """Whether Python refuses to print ``value`` in decimal (over 4,300 digits)."""
    return abs(value).bit_length() > 14_000


def jsonable(value: Any) -> Any:
    """Anything a checkpoint holds -> JSON: non-finite floats as strings, tuples as lists, tensors
    and numpy values as lists, bytes as base64, ints over 4,300 digits in hex, other objects by their ``str``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return hex(value) if _huge(value) else value  # json.dumps cannot write it in decimal either
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    np, torch = sys.modules.get("numpy"), sys.modules.get("torch")  # no array exists before its library is imported
    if (np is not None and isinstance(value, (np.ndarray, np.generic))) or (
        torch is not None and isinstance(value, torch.Tensor)
    ):
        return jsonable(value.tolist())
    return str(value)
