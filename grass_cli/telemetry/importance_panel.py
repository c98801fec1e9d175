"""The dashboard's layer-importance panel: one cell per block, laid out to fit the terminal.

Kept apart from the other panels because it is the one whose shape depends on
the terminal's size: 8 to 80 blocks must fit in as few lines as the rest of the
screen leaves, at 80 to 120+ columns. Pure: a `DashboardState` in, a Rich
renderable out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.panel import Panel
from rich.text import Text

from grass_cli.telemetry.dashboard_state import DashboardState

EIGHTHS = " ▏▎▍▌▋▊▉"
ACTIVE_MARK = "●"
# Lines the dashboard uses around the block rows: header panel (5), importance
# borders and column header (3), memory panel (5, 6 with CUDA), event panel (5).
CHROME_LINES = 19


def bar(fraction: float | None, width: int) -> str:
    """A horizontal bar `width` cells wide, in eighths of a cell; '?' when unknown."""
    if fraction is None or not math.isfinite(fraction):
        return "?".ljust(width)
    cells = max(0.0, min(1.0, fraction)) * width
    full = int(cells)
    part = EIGHTHS[int((cells - full) * 8)] if full < width else ""
    return ("█" * full + part).ljust(width)[:width]


def _percent(p: float | None) -> str:
    """Five characters: ' 9.8%', '12.3%', ' 100%'."""
    if p is None or not math.isfinite(p):
        return "    -"
    return (" 100%" if p >= 0.9995 else f"{100 * p:4.1f}%").rjust(5)


@dataclass(frozen=True)
class _Layout:
    columns: int
    rows: int
    bar_width: int
    show_mgn: bool


class ImportanceView:
    """One row per block: active mark, index, MGN bar, MGN, probability, steps trained.

    The block rows are laid out in as few side-by-side columns as fit the height
    the terminal leaves (column-major, so blocks read top to bottom). When even
    the widest layout is too tall (80 blocks), the MGN number is dropped and the
    bar alone shows importance, which keeps four columns in 120 characters.
    """

    MIN_BAR = 6
    MAX_BAR = 24
    SEP = " │ "

    def __init__(self, state: DashboardState, max_rows: int | None = None):
        self.state = state
        self.max_rows = max_rows
        self._idx_w = len(str(max(0, state.num_blocks - 1)))
        most = max([state.total_steps, *state.active_counts])
        self._n_w = len(str(most))

    def _cell_width(self, show_mgn: bool) -> int:
        # everything but the bar: mark, " index ", [" " + MGN (7)], " " + p (5), " " + n
        return 1 + (self._idx_w + 2) + (8 if show_mgn else 0) + 6 + (1 + self._n_w)

    def layout(self, width: int, height: int) -> _Layout:
        n = max(1, self.state.num_blocks)
        max_rows = self.max_rows or max(8, height - CHROME_LINES)
        for show_mgn in (True, False):
            fixed = self._cell_width(show_mgn)
            fit = max(1, (width + len(self.SEP)) // (fixed + self.MIN_BAR + len(self.SEP)))
            for cols in range(1, fit + 1):
                rows = math.ceil(n / cols)
                if rows <= max_rows or (not show_mgn and cols == fit):
                    bar_w = (width - (cols - 1) * len(self.SEP)) // cols - fixed
                    return _Layout(
                        cols, rows, max(self.MIN_BAR, min(self.MAX_BAR, bar_w)), show_mgn
                    )
        raise AssertionError("unreachable: the compact layout always returns")

    def _cell(self, b: int, lay: _Layout, top: float) -> Text:
        st = self.state
        active = b in st.active
        mgn = st.importance[b] if b < len(st.importance) else None
        p = st.probabilities[b] if b < len(st.probabilities) else None
        count = st.active_counts[b] if b < len(st.active_counts) else 0
        text = Text()
        text.append(ACTIVE_MARK if active else " ", style="bold green")
        text.append(f" {b:>{self._idx_w}} ", style="bold green" if active else "dim")
        fraction = None if mgn is None or top <= 0 else mgn / top
        text.append(bar(fraction, lay.bar_width), style="green" if active else "blue")
        if lay.show_mgn:
            text.append(" " + ("   -   " if mgn is None else f"{mgn:7.1e}"))
        text.append(" " + _percent(p))
        text.append(f" {count:>{self._n_w}}", style="bold" if active else "")
        return text

    def _header(self, lay: _Layout) -> Text:
        head = Text(" " * (2 + self._idx_w + 1), style="dim")
        head.append("MGN".ljust(lay.bar_width), style="dim")
        if lay.show_mgn:
            head.append(" " * 8, style="dim")
        head.append("     p", style="dim")
        head.append(" " + "n".rjust(self._n_w), style="dim")
        return head

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        st = self.state
        if not st.num_blocks:
            yield Text("waiting for the model's blocks…", style="dim italic")
            return
        lay = self.layout(options.max_width, options.height or console.height)
        known = [v for v in st.importance if v is not None and math.isfinite(v)]
        top = max(known) if known else 0.0
        header = Text()
        for c in range(lay.columns):
            if c:
                header.append(self.SEP, style="dim")
            header.append_text(self._header(lay))
        yield header
        for r in range(lay.rows):
            line = Text(no_wrap=True, overflow="crop")
            for c in range(lay.columns):
                b = c * lay.rows + r
                if b >= st.num_blocks:
                    break
                if c:
                    line.append(self.SEP, style="dim")
                line.append_text(self._cell(b, lay, top))
            yield line


def render_importance(state: DashboardState, max_rows: int | None = None) -> Panel:
    title = (
        f"Layer importance · [bold green]{ACTIVE_MARK}[/] {len(state.active)}/{state.num_blocks} "
        "active · p = sampling prob. · n = steps trained"
    )
    return Panel(ImportanceView(state, max_rows), title=title, title_align="left")
