"""`grass plan` against measurement: predicted vs measured peak memory, side by side.

    python benchmarks/plan_accuracy.py                  # SmolLM2-135M (fp32) and ~1B (bf16)
    python benchmarks/plan_accuracy.py --models 135m    # the small one only (~3 min)
    python benchmarks/plan_accuracy.py --device cuda    # on a GPU: torch.cuda.max_memory_allocated

Models: the embedded SmolLM2-135M-Instruct in float32 without checkpointing, and a
~1.2B Llama-shaped model (TinyLlama-1.1B's shape with SmolLM2's 49,152-token
vocabulary, so the same tokenizer and data work) with random weights in bfloat16 and
gradient checkpointing, built from the config once and cached under
GRASS_CACHE/bench-models/ (no download). Random weights measure memory honestly:
memory depends on shapes, not values.

Methods: full fine-tuning (embeddings and head too), LoRA r16, LISA with `keep`, and
GRASS with `offload` streamed per step. On the CPU the "device" is host memory, so
GRASS offloads to `disk` (a cpu store would move bytes from RAM to RAM); on CUDA to
`cpu` (pinned host memory).

Every row of the data is longer than max_length, so every micro-batch is exactly
micro_batch x max_length tokens, as the planner assumes (it plans for the worst
case). Each method trains in its own child process, one after the other. Measured:

- CPU: the process's peak resident memory during training (VmHWM, reset after
  the model is loaded, so loading does not count) minus its resident memory just
  before the model was loaded (Python, torch, the tokenizer, the data);
- CUDA: torch.cuda.max_memory_allocated over training.

`keep` holds the state of the blocks visited so far, so its prediction is made for
the number of blocks the run actually visited (read from the run's telemetry).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from runstats import run_child  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parent.parent

QUICKSTART = ROOT / "recipes/quickstart.yaml"
MODELS = {
    "135m": {
        "path": "embedded:smollm2-135m-instruct",
        "overrides": [
            "model.dtype=float32",
            "model.gradient_checkpointing=false",
            "training.micro_batch_size=4",
            "data.max_length=128",
            "training.max_steps=6",
            "sampler.gamma=4",
            "sampler.switch_interval=2",
            "sampler.update_interval=2",
            "sampler.probe_steps=2",
        ],
    },
    "1b": {
        "path": None,  # built and cached by bench_model_1b()
        "overrides": [
            "model.dtype=bfloat16",
            "model.gradient_checkpointing=true",
            "training.micro_batch_size=1",
            "data.max_length=256",
            "training.max_steps=3",
            "sampler.gamma=2",
            "sampler.switch_interval=1",
            "sampler.update_interval=1",
            "sampler.probe_steps=1",
        ],
    },
}


def methods(device: str) -> dict[str, list[str]]:
    target = "disk" if device == "cpu" else "cpu"
    return {
        "full": [
            "sampler.strategy=full",
            "optimizer.state_policy=keep",
            "sampler.train_embeddings=true",
            "sampler.train_head=true",
        ],
        "lora": ["sampler.strategy=lora", "optimizer.state_policy=keep"],
        "lisa-keep": ["sampler.strategy=lisa", "optimizer.state_policy=keep"],
        "grass-offload": [
            "sampler.strategy=grass",
            "optimizer.state_policy=offload",
            f"optimizer.offload.target={target}",
            "optimizer.offload.residency=step",
        ],
    }


def bench_model_1b() -> Path:
    """The ~1.2B random-weight bf16 Llama, built once from a config and cached."""
    from grass_cli.models import cache_dir, resolve_model_path

    folder = cache_dir() / "bench-models" / "llama-1.2b-random-bf16"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from grass_cli.presets import get_preset

    smol = resolve_model_path("embedded:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(smol)
    data = dict(get_preset("tinyllama-1.1b", "bench").config)
    data.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = AutoConfig.for_model(**data)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def run_overrides(model: str, method: str, data: Path, device: str, out_dir: str) -> list[str]:
    """The overrides of one measured run (shared with memory.py --model 1b)."""
    spec = MODELS[model]
    path = spec["path"] or str(bench_model_1b())
    return [
        f"model.path={path}",
        f"data.train={data}",
        "data.format=text",
        "data.eval=null",
        "data.limit=null",
        f"training.device={device}",
        "training.autocast=none",
        "training.grad_accum_steps=1",
        "checkpoint.at_end=false",
        "checkpoint.interval=null",
        "output.save_model=false",
        f"output.dir={out_dir}",
        *spec["overrides"],
        *methods(device)[method],
    ]


def machine_line(device: str) -> str:
    import torch

    machine = (
        f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    if device == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    return machine


def long_rows(path: Path, rows: int, seed: int = 0) -> None:
    """Text rows longer than any max_length here, so every batch is full."""
    rng = random.Random(seed)
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "with",
        "as",
        "by",
        "at",
        "from",
        "that",
        "this",
        "model",
        "layer",
    ]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(700))}) + "\n")


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive now (weights, data, state)."""
    import gc

    import torch

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return sum(seen.values())


def profiler_peak(prof: Any, marker: str | None = None, resets: tuple | list = ()) -> int:
    """The highest running total of the allocations and frees a torch profiler saw.
    At each `marker` event the total is set to the next of `resets` (bytes counted
    then), for frees the profiler cannot see (those done on other threads)."""
    events = sorted(
        (e.start_ns(), e.nbytes() if e.name() == "[memory]" else None)
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" or e.name() == marker
    )
    live = peak = 0
    counted = iter(resets)
    for _, d in events:
        if d is None:
            live = next(counted, live)
            continue
        live += d
        peak = max(peak, live)
    return peak


def child(overrides: list[str], recipe: Path = QUICKSTART) -> None:
    """Train once in this process; print one JSON line: measured peak, visited blocks
    (and the lowest visited: GRASS's activations reach down to it)."""
    import psutil
    import torch

    from grass_cli.engine import setup, train
    from grass_cli.recipe import load_recipe
    from grass_cli.telemetry import Telemetry

    recipe = load_recipe(recipe, overrides)
    cuda = recipe.training.device == "cuda"
    before = psutil.Process().memory_info().rss
    run = setup(recipe, Telemetry([]), overwrite=True)
    sink_events: list[dict] = []

    class Capture:
        def emit(self, event: dict) -> None:
            sink_events.append(event)

        def close(self) -> None:
            pass

    run.telemetry.add(Capture())
    after_setup = psutil.Process().memory_info().rss
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train(run)
    else:
        base = live_tensor_bytes()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: loading does not count
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            train(run)
    if run.optimizer.store is not None:
        run.optimizer.store.close()
    visited = {b for e in sink_events if e.get("event") == "step" for b in e["active"]}
    if cuda:
        measured = torch.cuda.max_memory_allocated()
        extra = {"cuda_base": base}
    else:
        # CPU's analogue of max_memory_allocated: tensors alive before training, plus
        # the highest running total of the allocations and frees the profiler saw
        measured = base + profiler_peak(prof)
        extra = {
            "live_before_train": base,
            "rss_before_load": before,
            "rss_after_setup": after_setup,
            "rss_peak_over_before_load": _vm("VmHWM") - before,
        }
    lowest = min(visited, default=None)
    print(json.dumps({"measured": measured, "visited": len(visited), "lowest": lowest, **extra}))


def predict(
    overrides: list[str], visited: int, device: str, recipe: Path = QUICKSTART, lowest: int = 0
) -> dict:
    """The plan for what the run met: the blocks `keep` visited and the lowest block
    a draw trained (the activations reach down to it; a user's plan assumes block 0)."""
    from grass_cli.planner.memory import plan, recipe_scenario
    from grass_cli.planner.shape import build_layout, load_config
    from grass_cli.recipe import load_recipe

    recipe = load_recipe(recipe, overrides)
    config, name = load_config(recipe)
    lay = build_layout(recipe, config, name)
    p = plan(recipe, lay, recipe_scenario(recipe), device=device, visited=visited, lowest=lowest)
    return p.to_json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", type=Path, default=QUICKSTART, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.recipe)
        return
    out = args.out or ROOT / f"benchmarks/results/plan_accuracy-{args.device}.json"
    chosen = args.methods or list(methods(args.device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long.jsonl"
        long_rows(data, 64)
        for model in args.models:
            for method in chosen:
                overrides = run_overrides(
                    model, method, data, args.device, f"{tmp}/{model}-{method}"
                )
                print(f"running {model} {method} ...", file=sys.stderr, flush=True)
                m, err = run_child(__file__, overrides)
                if m is None:  # (e.g. out of memory): say so, go on
                    print(f"  failed ({err})", file=sys.stderr, flush=True)
                    rows.append({"model": model, "method": method, "failed": err.split(":")[0]})
                    continue
                p = predict(overrides, m["visited"], args.device, lowest=m["lowest"] or 0)
                err = p["device_peak_bytes"] / m["measured"] - 1
                rows.append({"model": model, "method": method, **m, "plan": p, "error": err})
                print(
                    f"  predicted {p['device_peak_bytes'] / 2**30:.2f} GiB, measured "
                    f"{m['measured'] / 2**30:.2f} GiB ({err:+.1%})",
                    file=sys.stderr,
                    flush=True,
                )
    lines = [
        "| model | method | predicted (GiB) | measured (GiB) | error | predicted phase | "
        "weights | grads | state | activations |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['method']} | - | failed ({r['failed']}) |||||||")
            continue
        k = r["plan"]["kinds"]
        lines.append(
            f"| {r['model']} | {r['method']} | {r['plan']['device_peak_bytes'] / 2**30:.2f} | "
            f"{r['measured'] / 2**30:.2f} | {r['error']:+.1%} | {r['plan']['peak_phase']} | "
            + " | ".join(
                f"{k[x] / 2**30:.2f}"
                for x in ("weights", "gradients", "optimizer_state", "activations")
            )
            + " |"
        )
    cmd = "python benchmarks/plan_accuracy.py " + " ".join(sys.argv[1:])
    machine = machine_line(args.device)
    worst = max((abs(r["error"]) for r in rows if "error" in r), default=float("nan"))
    text = "\n".join(lines) + f"\n\nworst error: {worst:.1%}\n\ncommand: `{cmd.strip()}`\n\n"
    text += f"machine: {machine}\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": cmd.strip(), "machine": machine, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
