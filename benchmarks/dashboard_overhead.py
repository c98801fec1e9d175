"""Overhead of the live dashboard: training steps/s with it and without it.

The same short SmolLM2 run (recipes/quickstart.yaml: N steps, no eval, no saved
model) is trained alternately with the Rich dashboard sink and with only the
metrics.jsonl sink the engine always adds, several times in this one process
(order A B B A A B ..., so drift in machine load hits both sides alike). The
dashboard draws into a terminal Console (force_terminal) of 120 x 50 writing to
/dev/null, so it renders and emits every frame it would show on screen.

Steps/s is timed between the first and the last step event, seen by a sink placed
after the dashboard: it includes the dashboard's own work on every step and
excludes model loading and probing. On a machine shared with other work, steps/s
moves by more than the 2% being measured, so two direct measures come with it:
the time the dashboard spent drawing, and the wall time per step spent outside
the engine's own timed step (`step_time`), with and without the dashboard.

    python benchmarks/dashboard_overhead.py                 # 15 steps, 3 rounds, 1 warm-up
    python benchmarks/dashboard_overhead.py --steps 30 --rounds 4
"""

from __future__ import annotations

import argparse
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


class StepTimer:
    """Wall-clock time of each step event, the engine's own step time, and the
    dashboard's drawing time so far, as a sink placed after the dashboard sees them."""

    def __init__(self, dashboard: Dashboard | None) -> None:
        self.dashboard = dashboard
        self.times: list[float] = []
        self.step_times: list[float] = []
        self.drawn: list[float] = []

    def emit(self, event: Event) -> None:
        if event["event"] == "step":
            self.times.append(time.perf_counter())
            self.step_times.append(float(event["step_time"]))
            self.drawn.append(self.dashboard.render_time_s if self.dashboard else 0.0)

    def outside_s(self) -> float:
        """Mean wall time per step spent outside the engine's timed step: sinks,
        sampler, switching. The dashboard's cost lands here, and unlike steps/s it
        barely moves with how busy the machine is with other work."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return statistics.mean(g - t for g, t in zip(gaps, self.step_times[1:], strict=True))

    def close(self) -> None:
        pass

    def window_s(self) -> float:
        return self.times[-1] - self.times[0]

    def steps_per_s(self) -> float:
        return (len(self.times) - 1) / self.window_s()

    def drawn_s(self) -> float:
        return self.drawn[-1] - self.drawn[0]


def one_run(steps: int, out: Path, with_dashboard: bool) -> tuple[StepTimer, int]:
    """Train once; the step timer and the number of frames drawn."""
    recipe = load_recipe(
        ROOT / "recipes/quickstart.yaml",
        [
            f"training.max_steps={steps}",
            "data.eval=null",
            "output.save_model=false",
            f"output.dir={out}",
        ],
    )
    with open(os.devnull, "w") as null:
        dash = None
        if with_dashboard:
            dash = Dashboard(Console(file=null, force_terminal=True, width=120, height=50))
        timer = StepTimer(dash)
        telemetry = Telemetry([dash, timer] if dash else [timer])
        try:
            train(setup(recipe, telemetry, overwrite=True))
        finally:
            telemetry.close()
    return timer, dash.refreshes if dash else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    # The process's first run is slower (cold allocator and caches): run it untimed.
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    args = parser.parse_args()

    import torch

    order: list[bool] = []
    for r in range(args.rounds):
        order += [True, False] if r % 2 == 0 else [False, True]
    rates: dict[bool, list[float]] = {True: [], False: []}
    outside: dict[bool, list[float]] = {True: [], False: []}
    drawn_frac: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in range(args.warmup):
            one_run(args.steps, Path(tmp) / f"warmup{w}", False)
            print(f"warm-up {w + 1}/{args.warmup} done (not timed)", flush=True)
        for i, with_dash in enumerate(order):
            timer, frames = one_run(args.steps, Path(tmp) / f"r{i}", with_dash)
            rate, window = timer.steps_per_s(), timer.window_s()
            rates[with_dash].append(rate)
            outside[with_dash].append(timer.outside_s())
            label = "dashboard" if with_dash else "jsonl only"
            extra = ""
            if with_dash:
                drawn_frac.append(timer.drawn_s() / window)
                extra = (
                    f"  ({frames} frames in all; {1000 * timer.drawn_s():.0f} ms drawing "
                    f"in the {window:.1f} s timed window)"
                )
            print(
                f"run {i + 1}/{len(order)} {label:<10}: {rate:.4f} steps/s, "
                f"{1000 * timer.outside_s():.1f} ms/step outside the step{extra}",
                flush=True,
            )

    dash, plain = statistics.mean(rates[True]), statistics.mean(rates[False])

    def runs(side: bool) -> str:
        return ", ".join(f"{r:.4f}" for r in rates[side])

    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    print()
    print(f"machine                    : {machine}")
    print(f"steps/s with the dashboard : {dash:.4f} (runs: {runs(True)})")
    print(f"steps/s with jsonl only    : {plain:.4f} (runs: {runs(False)})")
    print(f"ratio dashboard / jsonl    : {dash / plain:.4f} ({100 * (dash / plain - 1):+.2f}%)")
    drawing = 100 * statistics.mean(drawn_frac)
    print(f"time spent drawing         : {drawing:.3f}% of the timed window")
    extra = statistics.mean(outside[True]) - statistics.mean(outside[False])
    per_step = 1 / plain
    print(
        f"outside-step time per step : {1000 * statistics.mean(outside[True]):.1f} ms with the "
        f"dashboard, {1000 * statistics.mean(outside[False]):.1f} ms without: "
        f"{1000 * extra:+.1f} ms, {100 * extra / per_step:+.3f}% of a {per_step:.2f} s step"
    )
    print(f"command: python {shlex.join(['benchmarks/dashboard_overhead.py', *sys.argv[1:]])}")


if __name__ == "__main__":
    main()
