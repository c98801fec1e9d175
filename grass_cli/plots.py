"""PNG plots of a run, drawn from its metrics.jsonl events.

The plots read only the event dicts the engine writes (the same ones every sink
sees), so a finished run, a crashed one and a resumed one are all plotted the same
way, and `grass plot RUN_DIR` can redraw them at any time. matplotlib is imported
inside the functions, with the Agg backend, so importing this module stays cheap
and never needs a display.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grass_cli.errors import GrassError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Event = dict[str, Any]

PLOT_FILES = ("importance_heatmap.png", "active_counts.png", "loss.png", "memory.png")

# Step-event memory fields, in the order the memory plot stacks / draws them.
_MODEL_STATE = (
    ("weights_bytes", "weights"),
    ("grad_bytes", "gradients"),
    ("optimizer_state_bytes", "optimizer states (device)"),
    ("master_weight_bytes", "master weights"),
)
_MEASURED = (
    ("optimizer_state_offload_cpu_bytes", "optimizer states offloaded to cpu", "--"),
    ("optimizer_state_offload_disk_bytes", "optimizer states offloaded to disk", ":"),
    ("rss", "host RSS (measured)", "-"),
    ("cuda_allocated", "CUDA allocated", "-"),
    ("cuda_reserved", "CUDA reserved", "-."),
    ("cuda_peak", "CUDA peak", ":"),
)


# ----------------------------------------------------------------------------- data


def load_metrics(run_dir: Path) -> list[dict]:
    """Every event of a run, in file order.

    A last line cut short (the process was killed mid-write) is skipped: the run
    is still worth plotting. A bad line elsewhere means the file was edited or
    mixed up, and is reported with its line number.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise GrassError(
            "no metrics.jsonl in the run dir",
            where=str(run_dir),
            hint="pass the output.dir of a `grass train` run (it holds recipe.yaml and "
            "metrics.jsonl)",
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    events: list[dict] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break  # a crash cut the last write short
            raise GrassError(
                "not a JSON line",
                where=f"{path}:{i}",
                hint="metrics.jsonl is written by `grass train`; restore it or plot another run",
            ) from None
        if not isinstance(event, dict) or "event" not in event:
            raise GrassError(
                "not a telemetry event (no 'event' key)",
                where=f"{path}:{i}",
                hint="metrics.jsonl is written by `grass train`; restore it or plot another run",
            )
        events.append(event)
    return events


def step_events(events: list[dict]) -> list[dict]:
    """Step events ordered by step, one per step.

    A resumed run appends to metrics.jsonl and may repeat the steps logged after
    its last checkpoint; the later (resumed) record of a step wins, so the curves
    show the training that the final model actually went through.
    """
    by_step: dict[int, dict] = {}
    for e in events:
        if e.get("event") == "step":
            by_step[int(e["step"])] = e
    return [by_step[s] for s in sorted(by_step)]


def num_blocks(events: list[dict]) -> int:
    """Blocks in the model: from the start event, else the widest importance list."""
    for e in events:
        if e.get("event") == "start" and e.get("num_blocks"):
            return int(e["num_blocks"])
    widths = [len(e.get("importance") or []) for e in events]
    actives = [max(e.get("active") or [-1]) + 1 for e in events if e.get("event") == "step"]
    return max(widths + actives + [0])


def active_counts(events: list[dict]) -> list[int]:
    """How many optimizer steps each block was trained in (index = block)."""
    counts = [0] * num_blocks(events)
    for e in step_events(events):
        for b in e.get("active") or []:
            counts[int(b)] += 1
    return counts


def importance_history(events: list[dict]) -> tuple[list[int], list[list[float | None]]]:
    """(steps, per-step MGN of every block); None where a block's MGN is unknown."""
    steps, rows = [], []
    for e in step_events(events):
        if e.get("importance") is not None:
            steps.append(int(e["step"]))
            rows.append([None if _missing(v) else float(v) for v in e["importance"]])
    return steps, rows


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Figure:
    """A figure not registered with pyplot, so nothing leaks between plots."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    """Written beside and renamed into place: a plot is the old one or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _nothing(what: str) -> GrassError:
    return GrassError(
        f"nothing to plot: the run has no {what} yet",
        hint="plot a run that has taken at least one training step",
    )


def plot_importance_heatmap(events: list[dict], path: Path) -> Path:
    """Blocks x steps heatmap of MGN, active cells outlined: where training went."""
    import numpy as np

    steps, rows = importance_history(events)
    if not steps:
        raise _nothing("step events with importance")
    n = max(len(r) for r in rows)
    grid = np.full((n, len(steps)), np.nan)
    for j, row in enumerate(rows):
        grid[: len(row), j] = [np.nan if v is None else v for v in row]
    width, height = min(16.0, 6.0 + len(steps) / 25), min(14.0, 3.0 + n * 0.18)
    fig = _figure(width, height)
    ax = fig.add_subplot()
    cmap = _cmap("viridis", bad="#d9d9d9")  # grey: MGN unknown (never measured yet)
    x0, x1 = steps[0] - 0.5, steps[-1] + 0.5
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap=cmap,
        extent=(x0, x1, -0.5, n - 0.5),
    )
    fig.colorbar(image, ax=ax, label="mean gradient norm (MGN)")
    # Mark active (block, step) cells: at most a few thousand markers stay legible.
    xs, ys = [], []
    for e in step_events(events):
        xs += [e["step"]] * len(e.get("active") or [])
        ys += list(e.get("active") or [])
    if 0 < len(xs) <= 20000:
        # Marker side about half a cell (in points), so markers never merge into a blob.
        cell = min((width - 2.2) * 72 / len(steps), (height - 1.0) * 72 / n)
        size = max(1.0, (0.5 * cell) ** 2)
        ax.scatter(xs, ys, s=size, c="#ff3b30", marker="s", linewidths=0, label="active")
        ax.legend(loc="upper right", fontsize=8, markerscale=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("block")
    ax.set_title("Layer importance (MGN) over training")
    return _save(fig, path)


def plot_active_counts(events: list[dict], path: Path) -> Path:
    """Steps each block was trained, against an even share: where the budget went."""
    counts = active_counts(events)
    if not step_events(events):
        raise _nothing("step events")
    fig = _figure(min(16.0, 4.0 + len(counts) * 0.2), 4.0)
    ax = fig.add_subplot()
    ax.bar(range(len(counts)), counts, color="#3b7dd8")
    even = sum(counts) / len(counts) if counts else 0.0
    ax.axhline(even, color="#444444", linestyle="--", linewidth=1, label=f"even share {even:.1f}")
    ax.set_xlabel("block")
    ax.set_ylabel("steps trained")
    ax.set_xlim(-0.6, len(counts) - 0.4)
    ax.set_title(f"Active count per block ({len(step_events(events))} steps)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss(events: list[dict], path: Path) -> Path:
    """Train loss per step (raw and smoothed) with the eval losses on the same axis."""
    steps = step_events(events)
    evals = sorted(
        ((int(e["step"]), e["eval_loss"]) for e in events if e.get("event") == "eval"),
        key=lambda p: p[0],
    )
    if not steps and not evals:
        raise _nothing("train or eval losses")
    fig = _figure(9.0, 4.5)
    ax = fig.add_subplot()
    if steps:
        xs = [e["step"] for e in steps]
        ys = [math.nan if _missing(e.get("loss")) else e["loss"] for e in steps]
        ax.plot(xs, ys, color="#9ab8e6", linewidth=1, label="train loss")
        window = max(1, len(ys) // 20)
        if window > 1:
            ax.plot(
                xs,
                _moving_mean(ys, window),
                color="#1f5bb5",
                linewidth=2,
                label=f"train loss (mean of {window})",
            )
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", color="#d9480f", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_memory(events: list[dict], path: Path) -> Path:
    """Model state by kind (stacked) against measured RSS / CUDA memory, in GiB.

    Stacking the accounted bytes under the measured lines shows how much of the
    process is weights, gradients and optimizer states, and how much is the rest
    (activations, allocator slack, the Python process itself).
    """
    steps = step_events(events)
    if not steps:
        raise _nothing("step events")
    gib = float(2**30)
    xs = [e["step"] for e in steps]
    fig = _figure(9.0, 4.5)
    ax = fig.add_subplot()
    stacked = [
        (label, [(e.get(k) or 0) / gib for e in steps])
        for k, label in _MODEL_STATE
        if any(e.get(k) for e in steps)
    ]
    if stacked:
        ax.stackplot(xs, *[v for _, v in stacked], labels=[lab for lab, _ in stacked], alpha=0.6)
    for key, label, style in _MEASURED:
        if any(e.get(key) for e in steps):
            ax.plot(xs, [(e.get(key) or 0) / gib for e in steps], style, linewidth=1.5, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    ax.set_title("Memory over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_importance_bars(
    importance: list[float],
    path: Path,
    title: str,
    compare: list[float] | None = None,
    labels: tuple[str, str] = ("A", "B"),
) -> Path:
    """MGN per block as bars; with `compare`, two bars per block side by side."""
    series = [list(importance)] + ([list(compare)] if compare is not None else [])
    n = max(len(s) for s in series)
    if n == 0:
        raise GrassError("nothing to plot: the importance list is empty")
    fig = _figure(min(16.0, 4.0 + n * 0.25), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    colors = ("#3b7dd8", "#d9480f")
    for k, values in enumerate(series):
        ys = [math.nan if _missing(v) else float(v) for v in values]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(ys))]
        label = labels[k] if compare is not None else None
        ax.bar(xs, ys, width=width, color=colors[k], label=label)
    ax.set_xlabel("block")
    ax.set_ylabel("mean gradient norm (MGN)")
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_title(title)
    if compare is not None:
        ax.legend(fontsize=8)
    return _save(fig, path)


def write_run_plots(run_dir: Path) -> list[Path]:
    """All four plots of a run into RUN_DIR/plots/, returned in PLOT_FILES order."""
    run_dir = Path(run_dir)
    events = load_metrics(run_dir)
    if not step_events(events):
        raise GrassError(
            "nothing to plot: metrics.jsonl has no training step",
            where=str(run_dir / "metrics.jsonl"),
            hint="the run stopped before its first optimizer step",
        )
    out = run_dir / "plots"
    writers = (plot_importance_heatmap, plot_active_counts, plot_loss, plot_memory)
    return [write(events, out / name) for write, name in zip(writers, PLOT_FILES, strict=True)]


# ----------------------------------------------------------------------------- helpers


def _cmap(name: str, bad: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def _moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean that skips NaN, so one diverged step does not blank the curve."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out
