"""Which sinks show a run on the console: chosen by the CLI, never by the library."""

from __future__ import annotations

import os
from typing import IO

from grass_cli.telemetry import Sink
from grass_cli.telemetry.sinks import PlainPrinter


def is_live_terminal(stream: IO[str]) -> bool:
    """A terminal that can redraw in place: a TTY whose TERM is not 'dumb'.

    Asked of the stream itself, not of Rich's guess, so FORCE_COLOR and the like
    never turn a log file into a stream of cursor movements.
    """
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


def console_sinks(stream: IO[str], *, live: bool, every: int, quiet: bool) -> list[Sink]:
    """The live dashboard on a terminal, plain lines otherwise, the summary only if quiet.

    `live=False` (from `--no-live`) keeps plain lines on a terminal too. The
    dashboard starts drawing as soon as it is built, so build the console sinks
    last, right before handing them to the engine (which closes them).
    """
    if quiet:
        return [PlainPrinter(stream, every=every, quiet=True)]
    if live and is_live_terminal(stream):
        from rich.console import Console

        from grass_cli.telemetry.dashboard import Dashboard

        return [Dashboard(Console(file=stream))]
    return [PlainPrinter(stream, every=every)]
