"""Sample packing's throughput: trained tokens/s with data.packing off and on, side by side.

    python benchmarks/packing.py                  # SmolLM2-135M, 3 settings, 2 rounds
    python benchmarks/packing.py --steps 6 --rounds 1 --scenarios quickstart-mb4
    python benchmarks/packing.py --device cuda --dtype bfloat16 --steps 20 \
        --out benchmarks/results/packing-cuda.json     # scripts/gpu_check.sh's setting

Every setting trains the embedded SmolLM2-135M-Instruct (gamma 4 of 30 blocks) with
packing off and on, with the same seed, steps, micro batch and `data.max_length`,
each run in its own child process (benchmarks/runstats.py), all in this one
invocation. The settings:

* quickstart-mb4, quickstart-mb8: recipes/quickstart.yaml, its chain-sum rows (49
  to 58 tokens: rows of nearly one length, so little padding to remove), micro
  batch 4 and 8 (the recipe's own);
* mixture-mb4: recipes/mix-packed.yaml's three tasks (49 to 101 tokens), micro 4.

The sampler is LISA: its step is GRASS's step (benchmarks/results/memory.md)
without the probing phase, which is not timed anyway. Only `data.packing`
differs: off, a micro batch is that many rows padded to the longest; on, it is that
many sequences of up to `--max-length` tokens, each holding as many whole rows as
fit. `--max-length` is above every row's length, so both runs train the same rows,
untruncated.

Throughput is non-pad tokens per second of the median training step after the
first two (model loading and warm-up excluded), from each run's metrics.jsonl:
the median, because on a shared machine another process's burst slows a few steps.
Runs alternate off, on, off, on (`--rounds`), and each keeps its best round, so
that a burst during one run does not decide the ratio. The table also shows rows
and padding per micro batch, from the same batch stream rebuilt without the model.
Results: benchmarks/results/packing.{json,md} (`--out`), with the machine and, on
CUDA, the GPU's name. `--device` and `--dtype` set `training.device` and
`model.dtype` for every run (default: the recipe's, `auto` and float32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import plan_accuracy as pa  # benchmarks/ is on sys.path when a script here runs
from runstats import run_child

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.5
# name: (recipe, micro batch)
SCENARIOS: dict[str, tuple[str, int]] = {
    "quickstart-mb4": ("recipes/quickstart.yaml", 4),
    "quickstart-mb8": ("recipes/quickstart.yaml", 8),
    "mixture-mb4": ("recipes/mix-packed.yaml", 4),
}


def batch_shape(recipe_path: Path, overrides: list[str], steps: int) -> dict[str, float]:
    """Rows, non-pad and padded tokens per micro batch of the run's training steps,
    from its batch stream rebuilt the way the engine builds it (no model needed)."""
    from grass_cli.data import BatchIterator, build_dataset
    from grass_cli.models import load_tokenizer, resolve_model_path
    from grass_cli.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    tokenizer = load_tokenizer(str(resolve_model_path(recipe.model.path)))
    data = build_dataset(recipe.data, tokenizer, "train")
    it = BatchIterator(
        data,
        recipe.training.micro_batch_size,
        tokenizer.pad_token_id,
        seed=recipe.training.seed,
        packing=recipe.data.packing,
        max_length=recipe.data.max_length,
    )
    rows = real = padded = 0
    for _ in range(steps):
        if recipe.data.packing:
            seqs = it.next_sequences()
            rows += sum(len(s) for s in seqs)
            batch = it.packed_batch(seqs)
        else:
            idx = it.next_indices()
            rows += len(idx)
            batch = it.batch(idx)
        real += int(batch["attention_mask"].sum())
        padded += batch["input_ids"].numel()
    return {"rows_per_step": rows / steps, "pad_share": 1 - real / padded}


def child(args: list[str]) -> None:
    """Train once in this process (args: recipe, overrides...) and print one JSON line."""
    from runstats import train_child

    recipe, overrides = ROOT / args[0], args[1:]
    _, steps = train_child(recipe, overrides)
    timed = steps[2:]
    print(
        json.dumps(
            {
                "tokens_per_s": statistics.median(e["tokens"] / e["step_time"] for e in timed),
                "step_time": statistics.median(e["step_time"] for e in timed),
                "tokens_per_step": sum(e["tokens"] for e in steps) / len(steps),
                **batch_shape(recipe, overrides, len(steps)),
                "final_loss": steps[-1]["loss"],
            }
        )
    )


def run_one(scenario: str, packing: bool, args: argparse.Namespace, out: str) -> dict:
    recipe, micro = SCENARIOS[scenario]
    overrides = [
        f"data.packing={'true' if packing else 'false'}",
        f"data.max_length={args.max_length}",
        f"training.max_steps={args.steps}",
        f"training.micro_batch_size={micro}",
        "sampler.strategy=lisa",
        "data.eval=null",
        "training.eval_interval=null",
        "checkpoint.at_end=false",
        "output.save_model=false",
        f"output.dir={out}",
        f"training.device={args.device}",
    ]
    if args.dtype is not None:
        overrides.append(f"model.dtype={args.dtype}")
    row, err = run_child(__file__, [recipe, *overrides])
    if row is None:
        sys.exit(f"{scenario}, packing {'on' if packing else 'off'} failed ({err})")
    return row


def run_setting(scenario: str, args: argparse.Namespace, tmp: str) -> dict[str, dict]:
    """Off and on, alternating for `args.rounds` rounds; each keeps its best round."""
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for name in ("off", "on"):
            print(f"{scenario}: packing {name}, round {r + 1}", file=sys.stderr, flush=True)
            row = run_one(scenario, name == "on", args, f"{tmp}/{scenario}-{name}-{r}")
            rounds = best.get(name, {}).get("rounds_tokens_per_s", []) + [row["tokens_per_s"]]
            if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = row
            best[name]["rounds_tokens_per_s"] = rounds
    return best


def table(rows: dict[str, dict[str, dict]]) -> str:
    lines = [
        "| setting | data.packing | rows / step | padding | tokens / step | s / step | "
        "tokens/s | x off | tokens/s of each round |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, pair in rows.items():
        base = pair["off"]["tokens_per_s"]
        for name, r in pair.items():
            each = ", ".join(f"{x:.0f}" for x in r["rounds_tokens_per_s"])
            lines.append(
                f"| {scenario} | {name} | {r['rows_per_step']:.1f} | "
                f"{100 * r['pad_share']:.0f}% | {r['tokens_per_step']:.0f} | "
                f"{r['step_time']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['tokens_per_s'] / base:.2f} | {each} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="model.dtype of every run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/packing.json")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.steps < 3:
        sys.exit("--steps must be at least 3 (the first two are not timed)")
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device on this machine")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {s: run_setting(s, args, tmp) for s in args.scenarios}
    ratios = {s: p["on"]["tokens_per_s"] / p["off"]["tokens_per_s"] for s, p in rows.items()}
    verdict = "\n".join(
        f"- {s}: packing gives {r:.2f}x the trained tokens/s (goal >= {GOAL}: "
        + ("met)" if r >= GOAL else "NOT met)")
        for s, r in ratios.items()
    )
    cmd = ("python benchmarks/packing.py " + " ".join(sys.argv[1:])).strip()
    machine = pa.machine_line(device)
    text = f"{table(rows)}\n\n{verdict}\n\ncommand: `{cmd}`\n\nmachine: {machine}\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"command": cmd, "machine": machine, "steps": args.steps, "rounds": args.rounds}
    summary |= {"device": device, "dtype": args.dtype or "float32"}
    summary |= {"max_length": args.max_length, "ratios": ratios, "rows": rows}
    args.out.write_text(json.dumps(summary, indent=2))
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
