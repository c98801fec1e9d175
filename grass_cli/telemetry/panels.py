"""The dashboard's screens as pure functions: a `DashboardState` in, a Rich renderable out.

Pure so tests render them into a recording console at a fixed size, and so the
sink (dashboard.py) only decides when to draw, never what. `render` is the live
screen (header, layer importance, memory, events); `render_summary` is the panel
printed once the run ends.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from grass_cli.telemetry.dashboard_state import EVENT_LOG_LINES, DashboardState
from grass_cli.telemetry.importance_panel import render_importance
from grass_cli.telemetry.sinks import (
    CUDA_FIELDS,
    format_bytes,
    format_duration,
    preemption_advice,
)

SPARK = "▁▂▃▄▅▆▇█"


def render(state: DashboardState, max_rows: int | None = None) -> RenderableType:
    """The whole dashboard for one state: pure, so tests render it at a fixed size."""
    return Group(
        render_header(state),
        render_importance(state, max_rows),
        render_memory(state),
        render_events(state),
    )


# ------------------------------------------------------------------------ header


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


def _trend(losses: list[float]) -> Text:
    """Sparkline plus an arrow comparing the newer half of the window to the older."""
    if len(losses) < 4:
        return Text(sparkline(losses), style="blue")
    half = len(losses) // 2
    old, new = sum(losses[:half]) / half, sum(losses[half:]) / (len(losses) - half)
    arrow, style = ("↓", "green") if new < old else ("↑", "red") if new > old else ("→", "")
    return Text.assemble((sparkline(losses), "blue"), " ", (arrow, style))


def _progress_row(state: DashboardState) -> Table:
    """Step count, bar, percent, elapsed, ETA and phase on one line."""
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
    return progress


def _loss_line(state: DashboardState) -> Text:
    """The latest train loss with its trend, then the latest and best eval loss."""
    losses = Text()
    losses.append("loss ")
    losses.append("-" if state.loss is None else f"{state.loss:.4f}", style="bold")
    losses.append(" ")
    losses.append_text(_trend(list(state.losses)))
    if state.evals:
        step, last = state.evals[-1]
        best_step, best = state.best_eval or (step, last)
        losses.append(f"  eval {last:.4f} (best {best:.4f} @{best_step})")
    return losses


def _rates_line(state: DashboardState) -> Text:
    """lr, grad norm, throughput, tokens, and the next re-sampling if one is still due."""
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
    return Text(rates.rstrip())


def render_header(state: DashboardState) -> Panel:
    title = Text.assemble(("GRASS ", "bold magenta"), (state.run_name or "run", "bold"))
    strategy = f"{state.strategy} γ={state.gamma}" if state.strategy else ""
    device = f"{state.device} ({state.attention})" if state.attention else state.device
    subtitle = " · ".join(x for x in (strategy, state.model, device) if x)
    return Panel(
        Group(_progress_row(state), _loss_line(state), _rates_line(state)),
        title=title,
        title_align="left",
        subtitle=subtitle or None,
        subtitle_align="right",
    )


# ------------------------------------------------------------------------ memory

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
PEAK_SHOWN = ("rss", "cuda_allocated", "cuda_reserved")


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


# ------------------------------------------------------------------------ events


def render_events(state: DashboardState) -> Panel:
    lines = [
        Text(text, style=style, no_wrap=True, overflow="ellipsis") for style, text in state.events
    ]
    lines += [Text("")] * (EVENT_LOG_LINES - len(lines))
    return Panel(Group(*lines), title="Events", title_align="left")


# ----------------------------------------------------------------------- summary


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
    if s.get("sigterm_needs_s"):
        grid.add_row("preemption", preemption_advice(s))
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
