"""Which sinks show a run on the console: chosen by the CLI, never by the library."""

from __future__ import annotations

from typing import IO

from grass_cli.telemetry import Sink
from grass_cli.telemetry.sinks import PlainPrinter


def console_sinks(stream: IO[str], *, live: bool, every: int, quiet: bool) -> list[Sink]:
    """Plain log lines (the live dashboard, when `live` and a terminal, comes later)."""
    del live  # no dashboard yet: plain lines on a terminal too
    return [PlainPrinter(stream, every=every, quiet=quiet)]
