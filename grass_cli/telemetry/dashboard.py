"""The live Rich dashboard of `grass train` on a terminal: the sink that draws it.

Three parts, kept apart so each is easy to test:

- `DashboardState` (dashboard_state.py) folds telemetry events into what the
  screen shows (the latest step, recent losses, per-block active counts, memory
  peaks, an event log). The engine reports facts per event; anything cumulative
  is derived there.
- `render(state)` and `render_summary(state)` (panels.py, with the block grid in
  importance_panel.py) are pure: state in, Rich renderable out. Tests render them
  into a recording console at a fixed width.
- `Dashboard` (here) is the sink: it updates the state on every event and redraws
  a `rich.live.Live` (auto refresh off) only when it is worth it, so a fast GPU
  loop does not pay for terminal drawing it cannot see.

The names of the other two modules are re-exported, so
`from grass_cli.telemetry.dashboard import render, DashboardState, ...` keeps working.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from rich.console import Console
from rich.live import Live

from grass_cli.telemetry import Event
from grass_cli.telemetry.dashboard_state import (
    EVENT_LOG_LINES,
    DashboardState,
    state_from_events,
)
from grass_cli.telemetry.importance_panel import (
    ACTIVE_MARK,
    CHROME_LINES,
    EIGHTHS,
    ImportanceView,
    bar,
    render_importance,
)
from grass_cli.telemetry.panels import (
    MEMORY_LABELS,
    MEMORY_ORDER,
    PEAK_SHOWN,
    SPARK,
    MemoryView,
    render,
    render_events,
    render_header,
    render_memory,
    render_summary,
    sparkline,
)

__all__ = [
    "ACTIVE_MARK",
    "CHROME_LINES",
    "EIGHTHS",
    "EVENT_LOG_LINES",
    "MEMORY_LABELS",
    "MEMORY_ORDER",
    "PEAK_SHOWN",
    "SPARK",
    "Dashboard",
    "DashboardState",
    "ImportanceView",
    "MemoryView",
    "bar",
    "render",
    "render_events",
    "render_header",
    "render_importance",
    "render_memory",
    "render_summary",
    "sparkline",
    "state_from_events",
]


class Dashboard:
    """Sink that keeps a `DashboardState` and redraws it with `rich.live.Live`.

    Redraws are throttled by time, not by steps: at most `max_fps` per second,
    and never more often than keeps drawing under `budget` of the wall time (a
    slow terminal or 80 blocks make each draw dearer, so they get rarer). Starts,
    resumes, probing done, evals, checkpoints, saves, warnings and the end always
    redraw: they are rare and are what a user waits for. The display starts when
    the sink is built, so the model-loading phase is visible too, and stops in
    `close()` or at `end`, where the summary panel is printed below the last frame.
    """

    ALWAYS = frozenset(
        {
            "start",
            "resume",
            "probe_done",
            "eval",
            "task_eval",
            "checkpoint",
            "saved",
            "warning",
            "end",
        }
    )

    def __init__(
        self,
        console: Console,
        *,
        max_fps: float = 4.0,
        budget: float = 0.01,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.console = console
        self.clock = clock
        self.state = DashboardState()
        self.min_interval = 1.0 / max_fps
        self.budget = budget
        self.interval = self.min_interval
        self.render_time_s = 0.0  # total time spent drawing (for the overhead benchmark)
        self.refreshes = 0
        self._last = -math.inf
        self.live = Live(
            render(self.state),
            console=console,
            auto_refresh=False,
            transient=False,
            vertical_overflow="crop",
        )
        self.live.start(refresh=True)
        self._running = True

    def emit(self, event: Event) -> None:
        self.state.update(event)
        if not self._running:
            return
        kind = event["event"]
        now = self.clock()
        if kind in self.ALWAYS or now - self._last >= self.interval:
            self._refresh(now)
        if kind == "end":
            self._stop()
            self.console.print(render_summary(self.state))

    def _refresh(self, now: float) -> None:
        self.live.update(render(self.state), refresh=True)
        self._last = self.clock()
        cost = self._last - now
        self.render_time_s += cost
        self.refreshes += 1
        self.interval = max(self.min_interval, cost / self.budget)

    def _stop(self) -> None:
        if self._running:
            self._running = False
            self.live.stop()

    def close(self) -> None:
        self._stop()
