"""Peak memory and throughput of the state policies, side by side, on SmolLM2-135M.

    python benchmarks/memory.py                    # all six methods, 200 steps each
    python benchmarks/memory.py --steps 20 --methods lisa-keep grass-offload-disk
    python benchmarks/memory.py --model 1b         # ~1.2B bf16, checkpointing (~6 min)
    python benchmarks/memory.py --model study      # issue 18's full FT and GRASS (~12 min)

`--model 1b` measures the largest model this machine trains: plan_accuracy.py's
~1.2B Llama-shaped model with random weights in bfloat16 (built once and cached),
gradient checkpointing, micro-batch 1 x 256, a few steps each of full fine-tuning,
LoRA r16, LISA-keep and GRASS-offload (streamed per step; to disk on the CPU, to
pinned host memory on CUDA), and reports each peak as a ratio to full fine-tuning's
and LoRA's. The peak is the one plan_accuracy.py measures (CPU: live tensor bytes,
the analogue of CUDA's max_memory_allocated; CUDA: max_memory_allocated), next to
the process's peak RSS above its resident size before the model loaded.

The default (200 steps, a switch every 2 steps, micro batch 2) is long enough for
every block to have been active at least once under each sampler, so `keep` holds
every block's moments by the end, as in a real run; the table's last column shows
it and the script warns when a run fell short.

Each method trains in its own child process (peak RSS is a per-process high-water
mark) with the same data, steps, batch and seed, one after the other in this one
invocation, and the table reports ratios against lisa-keep. Throughput is trained
tokens per second over the training steps only (model loading, probing and the
first two steps are excluded), from each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

from runstats import run_child  # benchmarks/ is on sys.path when a script here runs

from grass_cli.atomic import write_atomic_text

ROOT = Path(__file__).resolve().parent.parent

METHODS: dict[str, list[str]] = {
    "full": [
        "sampler.strategy=full",
        "optimizer.state_policy=keep",
        "sampler.train_embeddings=true",
        "sampler.train_head=true",
    ],
    "lisa-keep": ["sampler.strategy=lisa", "optimizer.state_policy=keep"],
    "lisa-drop": ["sampler.strategy=lisa", "optimizer.state_policy=drop"],
    "grass-keep": ["sampler.strategy=grass", "optimizer.state_policy=keep"],
    "grass-offload-cpu": [
        "sampler.strategy=grass",
        "optimizer.state_policy=offload",
        "optimizer.offload.target=cpu",
    ],
    "grass-offload-disk": [
        "sampler.strategy=grass",
        "optimizer.state_policy=offload",
        "optimizer.offload.target=disk",
    ],
}


def child(overrides: list[str]) -> None:
    """Train once in this process and print one JSON line of results."""
    from runstats import common_stats, train_child

    events, steps = train_child(ROOT / "recipes/quickstart.yaml", overrides)
    visited = sorted({b for e in steps for b in e["active"]})
    num_blocks = next(e for e in events if e["event"] == "start")["num_blocks"]
    print(
        json.dumps(
            {
                **common_stats(steps),
                "state_bytes_device_peak": max(e["optimizer_state_bytes"] for e in steps),
                "state_bytes_store_end": steps[-1]["optimizer_state_offload_cpu_bytes"]
                + steps[-1]["optimizer_state_offload_disk_bytes"],
                "blocks_visited": len(visited),
                "num_blocks": num_blocks,
                "final_loss": steps[-1]["loss"],
            }
        )
    )


def main_1b(steps: int, device: str, out: Path) -> None:
    """The ~1.2B model: each method in its own plan_accuracy.py child, ratios to full
    fine-tuning and to LoRA, and the issue's goals checked on the measured numbers."""
    import plan_accuracy as pa

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long.jsonl"
        pa.long_rows(data, 64)
        for name in ("full", "lora", "lisa-keep", "grass-offload"):
            overrides = pa.run_overrides("1b", name, data, device, f"{tmp}/{name}")
            overrides.append(f"training.max_steps={steps}")
            print(f"running 1b {name} ...", file=sys.stderr, flush=True)
            row, err = run_child(pa.__file__, overrides)
            if row is None:
                sys.exit(f"{name} failed ({err})")
            rows[name] = row
    full, lora = rows["full"]["measured"], rows["lora"]["measured"]
    lines = [
        "| method | peak (GiB) | x full | x LoRA | peak RSS over pre-load (GiB) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        rss = r.get("rss_peak_over_before_load")
        lines.append(
            f"| {name} | {r['measured'] / 2**30:.2f} | {r['measured'] / full:.2f} | "
            f"{r['measured'] / lora:.2f} | {'-' if rss is None else f'{rss / 2**30:.2f}'} |"
        )
    g = rows["grass-offload"]["measured"]
    verdict = (
        f"GRASS-offload: {g / full:.2f}x full (goal <= 0.30: "
        f"{'met' if g / full <= 0.30 else 'NOT met'}), {g / lora:.2f}x LoRA (goal <= 1.15: "
        f"{'met' if g / lora <= 1.15 else 'NOT met'})"
    )
    cmd = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
    machine = pa.machine_line(device)
    text = "\n".join(lines) + f"\n\n{verdict}\n\ncommand: `{cmd.strip()}`\n\nmachine: {machine}\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"command": cmd.strip(), "machine": machine, "steps": steps, "rows": rows}, indent=2
        )
    )
    out.with_suffix(".md").write_text(text)


STUDY = [  # issue 18's equal-steps configuration (benchmarks/study_compare.py)
    "data.train=data/family/train.jsonl",
    "data.eval=null",
    "data.max_length=96",
    "training.micro_batch_size=8",
    "training.seed=0",
    "checkpoint.at_end=false",
    "output.save_model=false",
]


def main_study(steps: int, out: Path) -> None:
    """Full fine-tuning and GRASS as the accuracy study trains them (recipes/bench, 135M
    fp32, family, micro-batch 8 x 96), activation checkpointing off (as the study ran)
    and on (the same arithmetic: it recomputes the forward instead of keeping it).
    Each peak two ways, in plan_accuracy.py's child: live tensor bytes (the CPU's
    analogue of CUDA's max_memory_allocated, what a GPU must hold) and the process's
    RSS above its size before the model loaded; the planner's prediction beside them.
    GRASS's activations reach down to the lowest block it trains, so its row says
    which that was (the planner assumes block 0). 14 steps by default: full
    fine-tuning's peak is its first optimizer step, and GRASS's 4 probing steps and
    first interval of 10 (the memory profiler makes a step several times slower)."""
    import plan_accuracy as pa

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("full", "grass"):
            recipe = ROOT / f"recipes/bench/{method}.yaml"
            for ckpt in ("false", "true"):
                name = f"{method}, checkpointing {'on' if ckpt == 'true' else 'off'}"
                overrides = [
                    *STUDY,
                    f"training.max_steps={steps}",
                    f"model.gradient_checkpointing={ckpt}",
                    f"output.dir={tmp}/{method}-{ckpt}",
                ]
                print(f"running {name} ...", file=sys.stderr, flush=True)
                row, err = run_child(pa.__file__, overrides, ["--recipe", str(recipe)])
                if row is None:
                    sys.exit(f"{name} failed ({err})")
                plan = pa.predict(overrides, row["visited"], "cpu", recipe)
                rows[name] = {**row, "method": method, "checkpointing": ckpt == "true",
                              "predicted": plan["device_peak_bytes"]}  # fmt: skip
    lines = [
        "| method | checkpointing | tensor peak (GiB) | x full | RSS over pre-load (GiB) | "
        "x full | planner (GiB) | lowest block trained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        full = rows[f"full, checkpointing {'on' if r['checkpointing'] else 'off'}"]
        rss, full_rss = r["rss_peak_over_before_load"], full["rss_peak_over_before_load"]
        lowest = "all" if r["method"] == "full" else r["lowest"]
        lines.append(
            f"| {r['method']} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['measured'] / 2**30:.2f} | {r['measured'] / full['measured']:.2f} | "
            f"{rss / 2**30:.2f} | {rss / full_rss:.2f} | {r['predicted'] / 2**30:.2f} | "
            f"{lowest} |"
        )
    cmd = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
    machine = pa.machine_line("cpu")
    text = "\n".join(lines) + f"\n\ncommand: `{cmd.strip()}`\n\nmachine: {machine}\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": cmd.strip(), "machine": machine, "steps": steps, "rows": rows}
    write_atomic_text(out, json.dumps(record, indent=2))
    write_atomic_text(out.with_suffix(".md"), text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="135m", choices=["135m", "1b", "study"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(--model 1b)")
    ap.add_argument(
        "--steps", type=int, default=None, help="default: 200 (135m), 3 (1b), 14 (study)"
    )
    ap.add_argument("--switch-interval", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.model == "study":
        main_study(args.steps or 14, args.out or ROOT / "benchmarks/results/memory-study.json")
        return
    if args.model == "1b":
        name = "memory-1b" + ("-cuda" if args.device == "cuda" else "")
        out = args.out or ROOT / f"benchmarks/results/{name}.json"
        main_1b(args.steps or 3, args.device, out)
        return
    if args.device != "cpu":
        sys.exit("--device cuda is for --model 1b; the 135M table is the CPU's")
    args.steps = args.steps or 200
    args.out = args.out or ROOT / "benchmarks/results/memory.json"

    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            overrides = METHODS[name] + [
                f"training.max_steps={args.steps}",
                f"training.micro_batch_size={args.micro_batch}",
                f"sampler.switch_interval={args.switch_interval}",
                f"sampler.update_interval={args.switch_interval}",
                "data.eval=null",
                "output.save_model=false",
                f"output.dir={tmp}/{name}",
            ]
            print(f"running {name} ...", file=sys.stderr, flush=True)
            row, err = run_child(__file__, overrides)
            if row is None:
                sys.exit(f"{name} failed ({err})")
            rows[name] = row
            r = rows[name]
            if r["blocks_visited"] < r["num_blocks"]:
                print(
                    f"warning: {name} visited {r['blocks_visited']} of {r['num_blocks']} "
                    "blocks; use more --steps for a steady-state comparison",
                    file=sys.stderr,
                )

    base = rows.get("lisa-keep")
    keep_tps = rows.get("grass-keep", {}).get("tokens_per_s")
    lines = [
        "| method | peak RSS (GiB) | x lisa-keep | opt. state on device, peak (MiB) | "
        "store at end (MiB) | tokens/s | x lisa-keep | x grass-keep | blocks visited |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        rss_ratio = f"{r['peak_rss'] / base['peak_rss']:.2f}" if base else "-"
        tps_ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        keep_ratio = f"{r['tokens_per_s'] / keep_tps:.2f}" if keep_tps else "-"
        lines.append(
            f"| {name} | {r['peak_rss'] / 2**30:.2f} | {rss_ratio} | "
            f"{r['state_bytes_device_peak'] / 2**20:.0f} | {r['state_bytes_store_end'] / 2**20:.0f}"
            f" | {r['tokens_per_s']:.0f} | {tps_ratio} | {keep_ratio} | "
            f"{r['blocks_visited']}/{r['num_blocks']} |"
        )
    cmd = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
    machine = (
        f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}"
    )
    table = "\n".join(lines)
    print(table)
    print(f"\ncommand: {cmd.strip()}\nmachine: {machine}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"command": cmd.strip(), "machine": machine, "steps": args.steps, "rows": rows},
            indent=2,
        )
    )
    args.out.with_suffix(".md").write_text(
        table + f"\n\ncommand: `{cmd.strip()}`\n\nmachine: {machine}\n"
    )


if __name__ == "__main__":
    main()
