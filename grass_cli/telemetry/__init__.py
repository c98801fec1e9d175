"""Telemetry: the training engine emits flat event dicts; sinks consume them.

The library never prints. The CLI chooses the sinks: metrics.jsonl always, a
plain line printer (non-TTY, `--no-live`), and later the Rich dashboard.
"""

from __future__ import annotations

from typing import Any, Protocol

Event = dict[str, Any]


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...

    def close(self) -> None: ...


class Telemetry:
    """Fans one event out to every sink."""

    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks: list[Sink] = list(sinks or [])

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def emit(self, kind: str, **fields: Any) -> None:
        event: Event = {"event": kind, **fields}
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
