"""Overhead of the live dashboard: training steps/s with it and without it.

One SmolLM2 training run (recipes/quickstart.yaml: N steps, no eval, no saved
model) in which the Rich dashboard is switched on and off step by step, in the
order on, off, off, on, on, off, off, on, ... (ABBA blocks of four steps). Steps of
both kinds are interleaved within seconds of each other, so slow drift in machine
load, allocator warm-up and thermal state hit both sides alike; measuring separate
runs instead gave run-to-run differences of up to 9%, far above the 2% to detect.

"On" steps: the step event goes to the dashboard, which updates its state and
draws a frame (its rate limit lets it draw at every step when steps take longer
than about a second, as SmolLM2 steps do on a CPU) into a 120 x 50 terminal console
writing to /dev/null. "Off" steps: the event skips it. Every other event (start,
probing, switches) always reaches the dashboard, so its state stays whole. A timer
sink after the dashboard stamps each step event; a step's time is the gap to the
previous stamp, which holds the engine's step and the dashboard's work for it. The
first `--skip` steps (warm-up) are left out.

    python benchmarks/dashboard_overhead.py               # 100 steps
    python benchmarks/dashboard_overhead.py --steps 200
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grass_cli.engine import setup, train  # noqa: E402
from grass_cli.recipe import load_recipe  # noqa: E402
from grass_cli.telemetry import Event, Telemetry  # noqa: E402
from grass_cli.telemetry.dashboard import Dashboard  # noqa: E402

PATTERN = (True, False, False, True)  # ABBA: on, off, off, on


def dashboard_on(step: int) -> bool:
    return PATTERN[step % len(PATTERN)]


class Gate:
    """Forwards every event to the dashboard except the step events of "off" steps."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    def emit(self, event: Event) -> None:
        if event["event"] != "step" or dashboard_on(int(event["step"])):
            self.dashboard.emit(event)

    def close(self) -> None:
        self.dashboard.close()


class StepTimer:
    """Stamps each step event after the dashboard has handled it."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.stamps: list[tuple[int, float, int, float]] = []  # step, time, tokens, drawn

    def emit(self, event: Event) -> None:
        if event["event"] == "step":
            self.stamps.append(
                (
                    int(event["step"]),
                    time.perf_counter(),
                    int(event["tokens"]),
                    self.dashboard.render_time_s,
                )
            )

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps left out")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as null:
        recipe = load_recipe(
            ROOT / "recipes/quickstart.yaml",
            [
                f"training.max_steps={args.steps}",
                "data.eval=null",
                "output.save_model=false",
                f"output.dir={Path(tmp) / 'run'}",
            ],
        )
        dash = Dashboard(Console(file=null, force_terminal=True, width=120, height=50))
        timer = StepTimer(dash)
        telemetry = Telemetry([Gate(dash), timer])
        try:
            train(setup(recipe, telemetry, overwrite=True))
        finally:
            telemetry.close()

    # one record per step: (on?, seconds, tokens, seconds drawing, step)
    rows = []
    for (_, t0, _, d0), (step, t1, tokens, d1) in zip(timer.stamps, timer.stamps[1:], strict=False):
        if step >= max(1, args.skip):
            rows.append((dashboard_on(step), t1 - t0, tokens, d1 - d0, step))
    on = [r for r in rows if r[0]]
    off = [r for r in rows if not r[0]]
    t_on = statistics.mean(r[1] for r in on)
    t_off = statistics.mean(r[1] for r in off)
    ratio = t_off / t_on  # steps/s with the dashboard / steps/s without

    # ABBA blocks: each block's (mean on - mean off); their spread gives the error.
    # Step times vary with the batch's token count (rows differ in length), so the
    # same estimate on seconds per token is given too: it removes most of that noise.
    def paired(per_step: list[tuple[bool, float, int]]) -> tuple[float, float, int]:
        blocks: dict[int, dict[bool, list[float]]] = {}
        for flag, value, step in per_step:
            blocks.setdefault(step // len(PATTERN), {True: [], False: []})[flag].append(value)
        diffs = [
            statistics.mean(b[True]) - statistics.mean(b[False])
            for b in blocks.values()
            if b[True] and b[False]
        ]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        return statistics.mean(diffs), se, len(diffs)

    mean_diff, se, n_blocks = paired([(r[0], r[1], r[4]) for r in rows])
    tok_diff, tok_se, _ = paired([(r[0], r[1] / r[2], r[4]) for r in rows])
    # per-token time: the same comparison, robust to batches of different lengths
    tok_on = sum(r[1] for r in on) / sum(r[2] for r in on)
    tok_off = sum(r[1] for r in off) / sum(r[2] for r in off)
    drawn = sum(r[3] for r in on)

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"machine                      : {machine}")
    print(f"timed steps                  : {len(on)} with the dashboard, {len(off)} without "
          f"(steps {args.skip}..{args.steps - 1}, ABBA order)")  # fmt: skip
    print(f"steps/s with the dashboard   : {1 / t_on:.4f} ({t_on:.3f} s/step)")
    print(f"steps/s without it           : {1 / t_off:.4f} ({t_off:.3f} s/step)")
    print(f"ratio with / without         : {ratio:.4f} ({100 * (ratio - 1):+.2f}%)")
    print(
        f"paired ABBA blocks, per step : {1000 * mean_diff:+.1f} ms per step with the dashboard "
        f"(standard error {1000 * se:.1f} ms, {n_blocks} blocks) = "
        f"{100 * mean_diff / t_off:+.2f}% +- {100 * 1.96 * se / t_off:.2f}% (95%)"
    )
    print(
        f"seconds per 1k tokens        : {1000 * tok_on:.3f} with, {1000 * tok_off:.3f} without "
        f"(ratio {tok_off / tok_on:.4f})"
    )
    print(
        f"paired ABBA blocks, per token: {100 * tok_diff / tok_off:+.2f}% +- "
        f"{100 * 1.96 * tok_se / tok_off:.2f}% (95%) time per token with the dashboard"
    )
    print(
        f"time spent drawing           : {1000 * drawn / len(on):.1f} ms per dashboard step, "
        f"{100 * drawn / sum(r[1] for r in on):.3f}% of those steps' time "
        f"({dash.refreshes} frames in all)"
    )
    print(f"command: python {shlex.join(['benchmarks/dashboard_overhead.py', *sys.argv[1:]])}")


if __name__ == "__main__":
    main()
