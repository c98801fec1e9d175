"""The two-tier state store against all state in RAM: peak RSS, step time, and the
planner's host prediction, side by side in one run.

    python benchmarks/tiered.py                       # the ~1.2B random-weight model, CPU
    python benchmarks/tiered.py --model 135m --steps 24
    python benchmarks/tiered.py --device cuda         # on a GPU box (scripts/gpu_check.sh)
    python benchmarks/tiered.py --state-dtype 8bit --configs all-in-ram two-tier

Each configuration trains in its own child process on the same data, steps and seed
(LISA, gamma 2, a switch every 3 steps, so many blocks leave and come back):

- `all-in-ram`: offload target cpu, `host_budget: null` (every block's state pinned);
- `two-tier`: `host_budget` GB (default 2) pinned, the rest in files, overlap on;
- `two-tier-sync`: the same with the overlap off (disk I/O on the training thread);
- `disk`: target disk (every chunk in files), for reference.

Reported per configuration: peak RSS (the process's high-water mark during
training), the planner's host prediction for it (`grass plan`'s host need, on the
CPU: the training peak with the pinned part, the data and the runtime), median step
time over the steps after the first switch, the most state that was on disk, and
ratios against all-in-ram. `--state-dtype bf16|8bit` runs them with compact moments
(optimizer.state_dtype), for the store's and the planner's figures at those bytes.
Results: benchmarks/results/tiered[-DTYPE][-DEVICE].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from plan_accuracy import MODELS, bench_model_1b  # benchmarks/ is on sys.path here
from runstats import read_events, run_child, training_peak_rss

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/quickstart.yaml"


def configs(budget_gb: float) -> dict[str, list[str]]:
    cpu = ["optimizer.state_policy=offload", "optimizer.offload.target=cpu"]
    return {
        "all-in-ram": [*cpu, "optimizer.offload.host_budget=null"],
        "two-tier": [*cpu, f"optimizer.offload.host_budget={budget_gb}"],
        "two-tier-sync": [
            *cpu,
            f"optimizer.offload.host_budget={budget_gb}",
            "optimizer.offload.overlap=false",
        ],
        "disk": ["optimizer.state_policy=offload", "optimizer.offload.target=disk"],
    }


def child(overrides: list[str]) -> None:
    """Train once here; print the measurements and the planner's prediction."""
    from grass_cli.engine import run_training
    from grass_cli.planner.machine import host_memory, runtime_bytes
    from grass_cli.planner.memory import plan, recipe_scenario
    from grass_cli.planner.shape import build_layout, load_config
    from grass_cli.planner.tiers import resolve_budget
    from grass_cli.planner.verdict import dataset_bytes, host_need
    from grass_cli.recipe import load_recipe
    from grass_cli.telemetry import Telemetry

    recipe = load_recipe(RECIPE, overrides)
    lay = build_layout(recipe, *load_config(recipe))
    device = recipe.training.device if recipe.training.device != "auto" else "cpu"
    runtime, data = runtime_bytes(), dataset_bytes(recipe)
    result = run_training(recipe, Telemetry([]), overwrite=True)
    events, steps = read_events(result.run_dir)
    # the plan of the state this run had: the blocks it visited (a short run does
    # not visit all of them), the pinned part as the budget resolves here
    visited = len({b for e in events if e["event"] == "switch" for b in e["active"]})
    planned = resolve_budget(recipe, lay, device, host_memory(), data, runtime)
    p = plan(planned, lay, recipe_scenario(planned), device, visited=visited)
    predicted = sum(host_need(p, lay, data, runtime).values())
    switch = recipe.sampler.switch_interval
    timed = [e["step_time"] for e in steps[switch:]] or [e["step_time"] for e in steps]
    row = {
        "peak_rss": training_peak_rss(steps),
        "predicted_host": predicted,
        "step_time_median": statistics.median(timed),
        "disk_state_peak": max(e.get("optimizer_state_offload_disk_bytes", 0) for e in steps),
        "ram_state_peak": max(e.get("optimizer_state_offload_cpu_bytes", 0) for e in steps),
        "losses": [e["loss"] for e in steps],
        "blocks_visited": visited,
    }
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="1b")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--host-budget", type=float, default=2.0, help="GB pinned (two-tier)")
    ap.add_argument("--state-dtype", choices=["fp32", "bf16", "8bit"], default="fp32")
    ap.add_argument("--configs", nargs="+", choices=list(configs(0)), default=list(configs(0)))
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    spec = MODELS[args.model]
    model = spec["path"] or str(bench_model_1b())
    common = [
        *spec["overrides"],
        f"model.path={model}",
        f"training.device={args.device}",
        f"training.max_steps={args.steps}",
        "sampler.strategy=lisa",
        "sampler.gamma=2",
        "sampler.switch_interval=3",
        "optimizer.offload.residency=interval",
        "data.eval=null",
        "training.eval_interval=null",
        "checkpoint.at_end=false",
        "output.save_model=false",
        f"optimizer.state_dtype={args.state_dtype}",
    ]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in configs(args.host_budget).items():
            if name not in args.configs:
                continue
            print(f"running {name} ...", file=sys.stderr, flush=True)
            row, err = run_child(__file__, [*common, *extra, f"output.dir={tmp}/{name}"])
            if row is None:
                sys.exit(f"{name} failed ({err})")
            rows[name] = row
    report(args, rows)


def report(args: argparse.Namespace, rows: dict[str, dict]) -> None:
    base = rows.get("all-in-ram") or next(iter(rows.values()))
    same = all(r["losses"] == base["losses"] for r in rows.values())
    gb = 1e9
    lines = [
        "| config | peak RSS (GB) | x all-in-ram | predicted host (GB) | measured / predicted "
        "| state on disk (GB) | step time (s) | x all-in-ram |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['peak_rss'] / gb:.2f} | {r['peak_rss'] / base['peak_rss']:.2f} | "
            f"{r['predicted_host'] / gb:.2f} | {r['peak_rss'] / r['predicted_host']:.2f} | "
            f"{r['disk_state_peak'] / gb:.2f} | {r['step_time_median']:.2f} | "
            f"{r['step_time_median'] / base['step_time_median']:.2f} |"
        )
    cmd = "python benchmarks/tiered.py " + " ".join(sys.argv[1:])
    table = "\n".join(lines)
    note = f"losses identical across configurations: {'yes' if same else 'NO'}"
    print(f"{table}\n\n{note}\ncommand: {cmd.strip()}")
    suffix = "" if args.state_dtype == "fp32" else f"-{args.state_dtype}"
    suffix += "" if args.device == "cpu" else f"-{args.device}"
    out = ROOT / f"benchmarks/results/tiered{suffix}"
    out.with_suffix(".json").write_text(
        json.dumps({"command": cmd.strip(), "same_losses": same, "rows": rows}, indent=2) + "\n"
    )
    out.with_suffix(".md").write_text(f"{table}\n\n{note}\n\ncommand: `{cmd.strip()}`\n")


if __name__ == "__main__":
    main()
