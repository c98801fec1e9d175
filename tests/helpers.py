"""Small helpers shared by the tests (pytest puts this folder on sys.path)."""

from __future__ import annotations


class ListSink:
    """A telemetry sink that keeps every event, for assertions."""

    def __init__(self):
        self.events: list[dict] = []

    def emit(self, event):
        self.events.append(event)

    def close(self):
        pass

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]
