"""The live Rich dashboard of `grass train` on a terminal.

Three parts, kept apart so each is easy to test:

- `DashboardState` folds telemetry events into what the screen shows (the latest
  step, recent losses, per-block active counts, memory peaks, an event log). The
  engine reports facts per event; anything cumulative is derived here.
- `render(state)` and `render_summary(state)` are pure: state in, Rich renderable
  out. Tests render them into a recording console at a fixed width.
- `Dashboard` is the sink: it updates the state on every event and redraws a
  `rich.live.Live` (auto refresh off) only when it is worth it, so a fast GPU
  loop does not pay for terminal drawing it cannot see.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from grass_cli.telemetry import Event
from grass_cli.telemetry.sinks import (
    CUDA_FIELDS,
    MEMORY_FIELDS,
    RunPeaks,
    StepClock,
    format_blocks,
    format_bytes,
    format_duration,
)

SPARK = "▁▂▃▄▅▆▇█"
EIGHTHS = " ▏▎▍▌▋▊▉"
ACTIVE_MARK = "●"
EVENT_LOG_LINES = 3
# Lines the dashboard uses around the block rows: header panel (5), importance
# borders and column header (3), memory panel (5, 6 with CUDA), event panel (5).
CHROME_LINES = 19


@dataclass
class DashboardState:
    """Everything the dashboard shows, updated from events by `update`."""

    run_name: str = ""
    run_dir: str = ""
    model: str = ""
    strategy: str = ""
    device: str = ""
    gamma: int = 0
    num_blocks: int = 0
    total_steps: int = 0
    eval_rows: int = 0
    phase: str = "loading model and data"
    step: int = 0  # optimizer steps completed
    elapsed_s: float = 0.0
    loss: float | None = None
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    lr: float | None = None
    grad_norm: float | None = None
    tokens_total: int = 0
    next_switch: int | None = None
    importance: list[float | None] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    active_counts: list[int] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    peaks: RunPeaks = field(default_factory=RunPeaks)
    clock: StepClock = field(default_factory=StepClock)
    evals: list[tuple[int, float]] = field(default_factory=list)
    events: deque[tuple[str, str]] = field(
        default_factory=lambda: deque(maxlen=EVENT_LOG_LINES)
    )  # (style, text)
    model_dir: str | None = None
    summary: dict[str, Any] | None = None

    def _log(self, text: str, style: str = "") -> None:
        self.events.append((style, text))

    def _blocks(self, n: int) -> None:
        """Size the per-block lists once the number of blocks is known."""
        if n > self.num_blocks:
            self.num_blocks = n
        if len(self.active_counts) < self.num_blocks:
            self.active_counts += [0] * (self.num_blocks - len(self.active_counts))

    def update(self, e: Event) -> None:
        kind = e["event"]
        self.peaks.observe(e)
        self.clock.observe(e)
        if kind == "start":
            self.run_dir = str(e.get("run_dir", ""))
            self.run_name = Path(self.run_dir).name or self.run_dir
            self.model = str(e.get("model", ""))
            self.strategy = str(e.get("strategy", ""))
            self.device = str(e.get("device", ""))
            self.gamma = int(e.get("gamma") or 0)
            self.total_steps = int(e.get("total_steps") or 0)
            self.eval_rows = int(e.get("eval_rows") or 0)
            self._blocks(int(e.get("num_blocks") or 0))
            self.phase = "evaluating the untouched model" if self.eval_rows else "starting"
            self._log(
                f"started: {self.num_blocks} blocks, {self.strategy}, {self.total_steps} steps "
                f"of {e.get('global_batch')} rows on {self.device}"
                + (f" x {e['world_size']} processes" if int(e.get("world_size") or 1) > 1 else "")
            )
        elif kind == "resume":
            # RUN_DIR/checkpoints/step-N: the run's name is two folders up.
            self.run_dir = str(Path(str(e["path"])).parent.parent)
            self.run_name = Path(self.run_dir).name
            self.total_steps = int(e.get("total_steps") or self.total_steps)
            self.step = int(e["step"])
            self.phase = "resuming"
            self._log(f"resumed at step {self.step} from {e['path']}", "cyan")
        elif kind == "probe":
            self.phase = f"probing {e['probe_step'] + 1}/{e['probe_steps']}"
            self.loss = e.get("loss")
        elif kind == "probe_done":
            self.importance = list(e["importance"])
            self.probabilities = list(e["probabilities"])
            self._blocks(len(self.importance))
            self.phase = "training"
            top = format_blocks(list(e.get("ranking") or [])[:5])
            self._log(f"probing done: most important blocks {top}", "cyan")
        elif kind == "switch":
            step = int(e["step"])
            self.active = sorted(int(b) for b in e["active"])
            self.next_switch = e.get("next_switch")
            self.phase = "training"
            frozen = sorted(
                int(name.split(".", 1)[1])
                for name in e.get("frozen") or []
                if name.startswith("block.")
            )
            was = f" (froze {format_blocks(frozen)})" if frozen else ""
            self._log(f"step {step}: training blocks {format_blocks(self.active)}{was}", "green")
        elif kind == "step":
            self.step = int(e["step"]) + 1
            self.total_steps = int(e.get("total_steps") or self.total_steps)
            self.elapsed_s = float(e.get("elapsed_s") or 0.0)
            self.loss = e.get("loss")
            if self.loss is not None:
                self.losses.append(float(self.loss))
            self.lr = e.get("lr")
            self.grad_norm = e.get("grad_norm")
            self.tokens_total = int(e.get("tokens_total") or self.tokens_total)
            self.next_switch = e.get("next_switch")
            self.active = sorted(int(b) for b in e.get("active") or [])
            if e.get("importance") is not None:
                self.importance = list(e["importance"])
            if e.get("probabilities") is not None:
                self.probabilities = list(e["probabilities"])
            self._blocks(max([len(self.importance)] + [b + 1 for b in self.active]))
            for b in self.active:
                self.active_counts[b] += 1
            self.memory = {k: int(e[k]) for k in MEMORY_FIELDS if e.get(k) is not None}
            done = self.step >= self.total_steps
            self.phase = ("final eval" if self.eval_rows else "finishing") if done else "training"
        elif kind == "eval":
            step, loss = int(e["step"]), float(e["eval_loss"])
            self.evals.append((step, loss))
            if self.phase.startswith("evaluating"):
                self.phase = "training"
            self._log(f"eval at step {step}: loss {loss:.4f}, ppl {e.get('eval_ppl', 0):.2f}")
        elif kind == "task_eval":
            scores = ", ".join(
                f"{key.replace('_', ' ')} {e[key]:.4f}"
                for key in ("accuracy", "choice_accuracy", "loss")
                if isinstance(e.get(key), (int, float))
            )
            self._log(f"task eval at step {e.get('step')}: {scores or 'done'}")
        elif kind == "checkpoint":
            self._log(f"checkpoint at step {e['step']}: {e['path']}", "cyan")
        elif kind == "warning":
            self._log(f"warning: {e.get('message')}", "yellow")
        elif kind == "saved":
            self.model_dir = str(e["path"])
            self._log(f"saved the model to {self.model_dir}", "cyan")
        elif kind == "end":
            self.summary = dict(e)
            self.phase = "done"
            self.step = int(e.get("steps") or self.step)
            self.elapsed_s = float(e.get("elapsed_s") or self.elapsed_s)
            self.model_dir = e.get("model_dir") or self.model_dir

    @property
    def eta_s(self) -> float | None:
        return self.clock.eta(max(0, self.total_steps - self.step))

    @property
    def best_eval(self) -> tuple[int, float] | None:
        return min(self.evals, key=lambda p: p[1]) if self.evals else None


def state_from_events(events: list[Event]) -> DashboardState:
    """Replay a run's events (e.g. its metrics.jsonl) into the dashboard's state."""
    state = DashboardState()
    for e in events:
        state.update(e)
    return state


# ------------------------------------------------------------------------ render


def sparkline(values: list[float]) -> str:
    """One character per value, scaled between the window's min and max."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0
    return "".join(
        SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] if math.isfinite(v) else " "
        for v in values
    )


def bar(fraction: float | None, width: int) -> str:
    """A horizontal bar `width` cells wide, in eighths of a cell; '?' when unknown."""
    if fraction is None or not math.isfinite(fraction):
        return "?".ljust(width)
    cells = max(0.0, min(1.0, fraction)) * width
    full = int(cells)
    part = EIGHTHS[int((cells - full) * 8)] if full < width else ""
    return ("█" * full + part).ljust(width)[:width]


def _trend(losses: list[float]) -> Text:
    """Sparkline plus an arrow comparing the newer half of the window to the older."""
    if len(losses) < 4:
        return Text(sparkline(losses), style="blue")
    half = len(losses) // 2
    old, new = sum(losses[:half]) / half, sum(losses[half:]) / (len(losses) - half)
    arrow, style = ("↓", "green") if new < old else ("↑", "red") if new > old else ("→", "")
    return Text.assemble((sparkline(losses), "blue"), " ", (arrow, style))


def render_header(state: DashboardState) -> Panel:
    total = max(state.total_steps, 1)
    progress = Table.grid(padding=(0, 1))
    progress.add_row(
        Text(f"step {state.step}/{state.total_steps}", style="bold"),
        ProgressBar(total=total, completed=min(state.step, total), width=30),
        Text(f"{100 * state.step / total:.0f}%"),
        Text(f"elapsed {format_duration(state.elapsed_s)}"),
        Text(f"ETA {format_duration(state.eta_s)}" if state.step else "ETA -"),
        Text(state.phase, style="italic cyan"),
    )
    losses = Text()
    losses.append("loss ")
    losses.append("-" if state.loss is None else f"{state.loss:.4f}", style="bold")
    losses.append(" ")
    losses.append_text(_trend(list(state.losses)))
    if state.evals:
        step, last = state.evals[-1]
        best_step, best = state.best_eval or (step, last)
        losses.append(f"  eval {last:.4f} (best {best:.4f} @{best_step})")
    tok_s = state.clock.tokens_per_s()
    rates = "  ".join(
        [
            f"lr {state.lr:.2e}" if state.lr is not None else "lr -",
            f"grad norm {state.grad_norm:.2f}" if state.grad_norm is not None else "grad norm -",
            f"tok/s {tok_s:,.0f}" if tok_s is not None else "tok/s -",
            f"tokens {state.tokens_total:,}",
            f"re-sampling @{state.next_switch}"
            if state.next_switch is not None and state.next_switch < state.total_steps
            else "",
        ]
    )
    title = Text.assemble(("GRASS ", "bold magenta"), (state.run_name or "run", "bold"))
    strategy = f"{state.strategy} γ={state.gamma}" if state.strategy else ""
    subtitle = " · ".join(x for x in (strategy, state.model, state.device) if x)
    return Panel(
        Group(progress, losses, Text(rates.rstrip())),
        title=title,
        title_align="left",
        subtitle=subtitle or None,
        subtitle_align="right",
    )


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


def _percent(p: float | None) -> str:
    """Five characters: ' 9.8%', '12.3%', ' 100%'."""
    if p is None or not math.isfinite(p):
        return "    -"
    return (" 100%" if p >= 0.9995 else f"{100 * p:4.1f}%").rjust(5)


def render_importance(state: DashboardState, max_rows: int | None = None) -> Panel:
    title = (
        f"Layer importance · [bold green]{ACTIVE_MARK}[/] {len(state.active)}/{state.num_blocks} "
        "active · p = sampling prob. · n = steps trained"
    )
    return Panel(ImportanceView(state, max_rows), title=title, title_align="left")


# Short labels: three to a row fit in 100 columns, two in 80.
MEMORY_LABELS = {
    "weights_bytes": "weights",
    "grad_bytes": "gradients",
    "master_weight_bytes": "master weights",
    "optimizer_state_bytes": "optim. on device",
    "optimizer_state_offload_cpu_bytes": "optim. on cpu",
    "optimizer_state_offload_disk_bytes": "optim. on disk",
    "rss": "host RSS",
    "cuda_allocated": "CUDA allocated",
    "cuda_reserved": "CUDA reserved",
    "cuda_peak": "CUDA peak",
}
MEMORY_ORDER = (
    ("weights_bytes", "grad_bytes", "master_weight_bytes"),
    (
        "optimizer_state_bytes",
        "optimizer_state_offload_cpu_bytes",
        "optimizer_state_offload_disk_bytes",
    ),
    ("rss", "cuda_allocated", "cuda_reserved"),
    ("cuda_peak",),
)


class MemoryView:
    """The latest memory breakdown, with the peaks of RSS and CUDA memory so far.

    Optimizer states sit on one row, device then cpu then disk, so offloading
    reads as bytes moving to the right.
    """

    def __init__(self, state: DashboardState):
        self.state = state

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        peaks = self.state.peaks.peaks
        cells = _memory_cells(self.state.memory, {k: peaks[k] for k in PEAK_SHOWN if k in peaks})
        per_row = 1
        for k in (3, 2):
            widths = [max(c.cell_len for c in cells[i::k]) for i in range(k)]
            if sum(widths) + 3 * (k - 1) <= options.max_width:
                per_row = k
                break
        yield _memory_grid(cells, per_row)


PEAK_SHOWN = ("rss", "cuda_allocated", "cuda_reserved")


def _memory_cells(values: dict[str, int], peaks: dict[str, int] | None = None) -> list[Text]:
    """'label value (peak p)' for every kind in MEMORY_ORDER; CUDA kinds only on GPU."""
    peaks = peaks or {}
    on_gpu = any(k in values for k in CUDA_FIELDS)
    out: list[Text] = []
    for row in MEMORY_ORDER:
        for key in row:
            if key in CUDA_FIELDS and not on_gpu:
                continue
            value = Text(format_bytes(values[key]) if key in values else "-", style="bold")
            if key in peaks:
                value.append(f" (peak {format_bytes(peaks[key])})", style="dim")
            out.append(Text.assemble((f"{MEMORY_LABELS[key]} ", "dim"), value))
    return out


def _memory_grid(cells: list[Text], per_row: int) -> Table:
    grid = Table.grid(padding=(0, 3))
    for _ in range(per_row):
        grid.add_column(no_wrap=True, overflow="ellipsis")
    for i in range(0, len(cells), per_row):
        grid.add_row(*cells[i : i + per_row])
    return grid


def render_memory(state: DashboardState) -> Panel:
    return Panel(MemoryView(state), title="Memory", title_align="left")


def render_events(state: DashboardState) -> Panel:
    lines = [
        Text(text, style=style, no_wrap=True, overflow="ellipsis") for style, text in state.events
    ]
    lines += [Text("")] * (EVENT_LOG_LINES - len(lines))
    return Panel(Group(*lines), title="Events", title_align="left")


def render(state: DashboardState, max_rows: int | None = None) -> RenderableType:
    """The whole dashboard for one state: pure, so tests render it at a fixed size."""
    return Group(
        render_header(state),
        render_importance(state, max_rows),
        render_memory(state),
        render_events(state),
    )


def render_summary(state: DashboardState) -> Panel:
    """End-of-run summary: time, tokens, losses, peak memory by kind, where files are."""
    s = state.summary or {}
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    steps = int(s.get("steps") or state.step)
    elapsed = float(s.get("elapsed_s") or state.elapsed_s)
    tokens = int(s.get("tokens") or state.tokens_total)
    grid.add_row("time", f"{format_duration(elapsed)} ({elapsed:.1f} s, {steps} steps)")
    rate = f" ({tokens / elapsed:,.0f} tok/s over the whole run)" if elapsed > 0 else ""
    grid.add_row("tokens", f"{tokens:,}{rate}")
    final_loss = s.get("final_loss")
    grid.add_row("train loss", "-" if final_loss is None else f"{final_loss:.4f} (last step)")
    if state.evals:
        first, last = state.evals[0], state.evals[-1]
        best_step, best = state.best_eval or last
        grid.add_row(
            "eval loss",
            f"{first[1]:.4f} at step {first[0]} → {last[1]:.4f} at step {last[0]} "
            f"(best {best:.4f} at step {best_step})",
        )
    if state.peaks.peaks:
        grid.add_row("peak memory", _memory_grid(_memory_cells(state.peaks.peaks), 3))
    run_dir = Path(s.get("run_dir") or state.run_dir or ".")
    grid.add_row("model", str(state.model_dir or s.get("model_dir") or "not saved"))
    grid.add_row(
        "files",
        f"{run_dir}/  (recipe.yaml, metrics.jsonl, summary.json, plots/)",
    )
    return Panel(
        grid,
        title=f"Run finished: {state.run_name or run_dir.name}",
        title_align="left",
        border_style="green",
    )


# -------------------------------------------------------------------------- sink


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
