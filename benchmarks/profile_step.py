"""Where a training step's time goes, per strategy: torch.profiler's top operators
and the step split into its stages (forward+backward, clipping, optimizer step,
the rest: data, telemetry, switching).

    python benchmarks/profile_step.py                         # full, lisa, lora, grass
    python benchmarks/profile_step.py --src /tmp/old --label before   # another checkout

Each strategy trains in its own child process with the settings of
benchmarks/peers.py (SmolLM2-135M fp32, batch 8, max_length 160, constant lr,
grad clip 1.0) and each recipe's defaults otherwise; after `--warmup` steps the
profiler records `--steps` steps (no stacks: their symbolization crashes on this
machine's torch build). Stage times come from wrappers around the loop's
functions, measured over the same steps, so the split and the operator table
describe the same work. `--src` imports grass_cli from another checkout (a git
worktree of an older commit), so a before/after pair runs the same script.
Results: benchmarks/results/profile-<label>.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ("full", "lisa", "lora", "grass")
TOP = 12


def child(a: dict[str, Any]) -> dict[str, Any]:
    if a["src"]:
        sys.path.insert(0, a["src"])
    import torch
    from peers import OURS, settings_overrides

    import grass_cli.engine.loop as loop
    from grass_cli.offload.optimizer import BlockAdamW
    from grass_cli.recipe import load_recipe
    from grass_cli.telemetry import Telemetry

    stages: dict[str, float] = defaultdict(float)
    recording = {"on": False}

    def timed(owner: Any, name: str, stage: str) -> None:
        f = getattr(owner, name)

        def wrapper(*args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                if recording["on"]:
                    stages[stage] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    timed(loop, "forward_backward", "forward+backward")
    timed(torch.nn.utils, "clip_grad_norm_", "clip")
    timed(BlockAdamW, "step", "optimizer step")

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    marks: dict[str, float] = {}

    class ProfilerSink:
        """Starts the profiler after the warm-up steps and stops it `steps` later."""

        def emit(self, event: dict[str, Any]) -> None:
            if event["event"] != "step":
                return
            if event["step"] == a["warmup"] - 1:
                prof.start()
                recording["on"] = True
                marks["t0"] = time.perf_counter()
            elif event["step"] == a["warmup"] + a["profiled"] - 1:
                marks["t1"] = time.perf_counter()
                recording["on"] = False
                prof.stop()

        def close(self) -> None:
            pass

    # (optimizer.fused is left to each checkout's default: an older one has no such key)
    overrides = [o for o in settings_overrides(a) if not o.startswith("optimizer.fused")]
    overrides += OURS[a["method"]]
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", overrides)
    loop.run_training(recipe, Telemetry([ProfilerSink()]), overwrite=True)
    wall = marks["t1"] - marks["t0"]
    stages["rest"] = wall - sum(stages.values())
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:TOP]
    return {
        "step_s": wall / a["profiled"],
        "stages": {k: v / a["profiled"] for k, v in stages.items()},
        "top": [
            {
                "op": e.key,
                "share": e.self_cpu_time_total / total,
                "ms_per_step": e.self_cpu_time_total / 1e3 / a["profiled"],
                "calls_per_step": e.count / a["profiled"],
            }
            for e in top
        ],
    }


def render(results: dict[str, dict], args: argparse.Namespace) -> str:

    out = [f"# Step profile: {args.label}\n"]
    out.append("| strategy | step (s) | forward+backward | clip | optimizer step | rest |")
    out.append("|---|---|---|---|---|---|")
    for name, r in results.items():
        s = r["stages"]
        cells = [
            f"{s.get(k, 0.0):.3f} ({s.get(k, 0.0) / r['step_s']:.0%})"
            for k in ("forward+backward", "clip", "optimizer step", "rest")
        ]
        out.append(f"| {name} | {r['step_s']:.2f} | " + " | ".join(cells) + " |")
    for name, r in results.items():
        out.append(f"\n## {name}: top operators by self CPU time\n")
        out.append("| operator | share | ms / step | calls / step |")
        out.append("|---|---|---|---|")
        for t in r["top"]:
            out.append(
                f"| `{t['op']}` | {t['share']:.1%} | {t['ms_per_step']:.0f} | "
                f"{t['calls_per_step']:.0f} |"
            )
    from compare import machine as describe_machine

    machine = describe_machine(False)
    cmd = "python benchmarks/profile_step.py " + " ".join(sys.argv[1:])
    out.append(
        f"\nsource: {args.src or 'this checkout'}\n\ncommand: `{cmd}`\n\nmachine: {machine}\n"
    )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--src", default="", help="a checkout whose grass_cli to profile")
    ap.add_argument("--label", default="after")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child[0]))))
        return
    from runstats import run_children

    with tempfile.TemporaryDirectory() as tmp:
        payloads = {
            method: {
                "method": method,
                "src": args.src,
                "profiled": args.steps,
                "warmup": args.warmup,
                "steps": args.warmup + args.steps + 1,  # the run's max_steps
                "data": str(ROOT / "data/quickstart/train.jsonl"),
                "rows": 8 * (args.steps + args.warmup + 1),
                "max_length": 160,
                "batch": 8,
                "seed": 0,
                "lr": 1e-4,
                "gamma": 4,
                "switch": 10,
                "out": f"{tmp}/{method}",
            }
            for method in args.strategies
        }
        results = run_children(__file__, payloads, "profiling")
    text = render(results, args)
    print(text)
    path = ROOT / f"benchmarks/results/profile-{args.label}.md"
    path.write_text(text)


if __name__ == "__main__":
    main()
