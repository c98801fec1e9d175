"""GPU: peak device memory and step time of keep vs offload, overlap on and off (bf16).

    python benchmarks/gpu_offload.py                       # SmolLM2-135M, 30 steps each
    python benchmarks/gpu_offload.py --model /models/Llama-3.2-1B --steps 50 --micro-batch 16

CUDA only: on a machine without CUDA it says so and exits 0. Each configuration
trains in its own child process on the same data, steps and seed, with bf16
weights (so fp32 master weights exist for active blocks only and move with their
optimizer state) and bf16 autocast. Reported per configuration: peak CUDA memory
allocated, median step time (steps after the first switch), and ratios against
keep. Results go to benchmarks/results/gpu_offload.{json,md} with the GPU's name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from runstats import run_child  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parent.parent

CONFIGS: dict[str, list[str]] = {
    "keep": ["optimizer.state_policy=keep"],
    "offload-interval-overlap": [
        "optimizer.state_policy=offload",
        "optimizer.offload.residency=interval",
        "optimizer.offload.overlap=true",
    ],
    "offload-interval-sync": [
        "optimizer.state_policy=offload",
        "optimizer.offload.residency=interval",
        "optimizer.offload.overlap=false",
    ],
    "offload-step-overlap": [
        "optimizer.state_policy=offload",
        "optimizer.offload.residency=step",
        "optimizer.offload.overlap=true",
    ],
    "offload-step-sync": [
        "optimizer.state_policy=offload",
        "optimizer.offload.residency=step",
        "optimizer.offload.overlap=false",
    ],
}


def child(overrides: list[str]) -> None:
    import torch

    from grass_cli.engine import run_training
    from grass_cli.recipe import load_recipe
    from grass_cli.telemetry import Telemetry

    recipe = load_recipe(ROOT / "recipes/gpu-grass.yaml", overrides)
    result = run_training(recipe, Telemetry([]), overwrite=True)
    events = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    timed = [e["step_time"] for e in steps[recipe.sampler.switch_interval :]] or [
        e["step_time"] for e in steps
    ]
    print(
        json.dumps(
            {
                "gpu": torch.cuda.get_device_name(0),
                "cuda_peak": max(e.get("cuda_peak", 0) for e in steps),
                "step_time_median": statistics.median(timed),
                "state_bytes_device_peak": max(e["optimizer_state_bytes"] for e in steps),
                "master_bytes_device_peak": max(e["master_weight_bytes"] for e in steps),
                "final_loss": steps[-1]["loss"],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--switch-interval", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_offload.json")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    import torch

    if not torch.cuda.is_available():
        print("gpu_offload: no CUDA device here; nothing to measure (run it on a GPU box).")
        return
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in CONFIGS.items():
            overrides = extra + [
                f"model.path={args.model}",
                "model.dtype=bfloat16",
                "training.autocast=bf16",
                "training.device=cuda",
                f"training.max_steps={args.steps}",
                f"training.micro_batch_size={args.micro_batch}",
                "training.grad_accum_steps=1",
                f"data.max_length={args.max_length}",
                "data.eval=null",
                f"sampler.switch_interval={args.switch_interval}",
                "output.save_model=false",
                f"output.dir={tmp}/{name}",
            ]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            row, err = run_child(__file__, overrides)
            if row is None:
                sys.exit(f"{name} failed ({err})")
            rows[name] = row
    base = rows["keep"]
    lines = [
        "| config | CUDA peak (GiB) | x keep | opt. state on device (MiB) | "
        "fp32 masters on device (MiB) | step time (ms) | x keep |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['cuda_peak'] / 2**30:.2f} | {r['cuda_peak'] / base['cuda_peak']:.2f} | "
            f"{r['state_bytes_device_peak'] / 2**20:.0f} | "
            f"{r['master_bytes_device_peak'] / 2**20:.0f} | "
            f"{r['step_time_median'] * 1000:.0f} | "
            f"{r['step_time_median'] / base['step_time_median']:.2f} |"
        )
    cmd = "python benchmarks/gpu_offload.py " + " ".join(sys.argv[1:])
    table = "\n".join(lines)
    print(table)
    print(f"\ncommand: {cmd.strip()}\ngpu: {base['gpu']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"command": cmd.strip(), "gpu": base["gpu"], "rows": rows}, indent=2)
    )
    args.out.with_suffix(".md").write_text(
        table + f"\n\ncommand: `{cmd.strip()}`\n\nGPU: {base['gpu']}\n"
    )


if __name__ == "__main__":
    main()
