"""`grass plan --nproc N distributed.sharding=fsdp` against measurement: one rank's
predicted peak vs what each rank measured, with 2 and 4 gloo processes on the CPU.

    python benchmarks/plan_sharded.py                          # 135m and 1b, 2 and 4 ranks
    python benchmarks/plan_sharded.py --models 135m --nprocs 2 # the quick one

The models, data, methods and settings are benchmarks/plan_accuracy.py's (SmolLM2-135M
in float32; the ~1.2B random-weight Llama in bfloat16 with checkpointing), minus LoRA
(which trains replicated only), each trained under `torchrun --nproc-per-node N` with
`distributed.sharding=fsdp`. Every rank measures itself as plan_accuracy.py's child
does: the tensors alive before training plus the highest running total of the
allocations and frees torch's profiler saw during training (the CPU's analogue of
`torch.cuda.max_memory_allocated`), reset at each step's end to the live tensor
bytes counted there (the profiler misses the frees gloo's threads do, which would
otherwise pile up step after step), and writes it to a file; the table gives the
largest rank's and the prediction for one rank. Goal (issue 38): within +-10%.
Results: benchmarks/results/plan_sharded.{json,md}. Runs one job at a time: give it
a quiet machine (2 ranks each use one core).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import plan_accuracy as pa  # noqa: E402 (benchmarks/ first on the path)

RESULTS = ROOT / "benchmarks/results"
METHODS = ("full", "lisa-keep", "grass-offload")


def rank_child(out: Path, overrides: list[str]) -> None:
    """Under torchrun: train, measure this rank, write OUT/rank-R.json."""
    import torch

    from grass_cli.engine import setup, train
    from grass_cli.recipe import load_recipe
    from grass_cli.telemetry import Telemetry

    recipe = load_recipe(pa.QUICKSTART, overrides)
    run = setup(recipe, Telemetry([]), overwrite=True)
    steps: list[dict] = []

    class Capture:
        def emit(self, event: dict) -> None:
            if event.get("event") == "step":
                steps.append(event)

        def close(self) -> None:
            pass

    run.telemetry.add(Capture())
    base = pa.live_tensor_bytes()
    actual: list[int] = []  # live tensor bytes at each step's end, counted

    class StepEnd:
        def emit(self, event: dict) -> None:
            if event.get("event") in ("step", "probe"):  # (probing steps too)
                actual.append(pa.live_tensor_bytes() - base)
                with torch.profiler.record_function("grass-step-end"):
                    pass

        def close(self) -> None:
            pass

    run.telemetry.add(StepEnd())
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        train(run)
    if run.optimizer.store is not None:
        run.optimizer.store.close()
    # The profiler sees every allocation but not the frees done on gloo's own
    # threads (a collective's buffers), so its running total drifts up by those;
    # at each (probing) step's end it is reset to the live bytes counted there, which
    # leaves at most one step's missed frees in the peak.
    peak = pa.profiler_peak(prof, "grass-step-end", actual)
    visited = {b for e in steps for b in e["active"]}
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "measured": base + peak,
        "live_before_train": base,
        "visited": len(visited),
        "lowest": min(visited, default=0),
    }
    (out / f"rank-{rank}.json").write_text(json.dumps(result))


def predict(overrides: list[str], visited: int, shards: int, lowest: int = 0) -> dict:
    """One rank's plan for what the run met: the blocks `keep` visited and the lowest
    block a draw trained (a user's plan assumes block 0, the worst draw)."""
    from grass_cli.planner.memory import plan, recipe_scenario
    from grass_cli.planner.shape import build_layout, load_config
    from grass_cli.recipe import load_recipe

    recipe = load_recipe(pa.QUICKSTART, overrides)
    lay = build_layout(recipe, *load_config(recipe))
    sc = recipe_scenario(recipe)
    return plan(
        recipe, lay, sc, device="cpu", visited=visited, shards=shards, lowest=lowest
    ).to_json()


def measure(model: str, method: str, nproc: int, data: Path, work: Path) -> dict:
    out = work / f"{model}-{method}-{nproc}"
    out.mkdir(parents=True, exist_ok=True)
    overrides = pa.run_overrides(model, method, data, "cpu", str(out / "run"))
    overrides.append("distributed.sharding=fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", __file__, "--rank-child", str(out), *overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{model} {method} x{nproc} failed:\n{proc.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(nproc)]
    worst = max(r["measured"] for r in ranks)
    visited = max(r["visited"] for r in ranks)
    lowest = min(r["lowest"] for r in ranks)
    p = predict(overrides, visited, nproc, lowest)
    predicted = p["device_peak_bytes"]
    return {
        "model": model,
        "method": method,
        "nproc": nproc,
        "measured_per_rank": [r["measured"] for r in ranks],
        "measured": worst,
        "predicted": predicted,
        "ratio": predicted / worst,
        "phase": p["peak_phase"],
        "visited": visited,
        "lowest": lowest,
    }


def to_md(res: dict) -> str:
    lines = [
        "# grass plan --nproc N (sharded, FSDP2) against measured per-rank peaks",
        "",
        "Commands: "
        + ", ".join(
            f"`{c}`" for c in dict.fromkeys(r.get("command") or res["command"] for r in res["rows"])
        )
        + (f" (predictions: `{res['repredicted']}`)" if res.get("repredicted") else "")
        + "  ",
        f"Machine: {res['machine']}",
        "",
        "| model | method | ranks | lowest block drawn | measured (largest rank) "
        "| predicted (one rank) | predicted / measured | peak phase |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lowest = "all" if r["method"] == "full" else r.get("lowest", "-")
        lines.append(
            f"| {r['model']} | {r['method']} | {r['nproc']} | {lowest} | "
            f"{r['measured'] / 1e9:.3f} GB "
            f"| {r['predicted'] / 1e9:.3f} GB | {r['ratio']:.2f} | {r['phase']} |"
        )
    ratios = [r["ratio"] for r in res["rows"]]
    lines += ["", f"Ratios from {min(ratios):.2f} to {max(ratios):.2f} (goal: 0.90 to 1.10).", ""]
    for r in res.get("earlier_runs", []):
        per_rank = ", ".join(f"{b / 1e9:.3f}" for b in r["measured_per_rank"])
        lines.append(
            f"Measured again: {r['model']} {r['method']} x{r['nproc']}; an earlier run "
            f"(`{r['command']}`) measured {r['measured'] / 1e9:.3f} GB on its largest rank "
            f"(ranks: {per_rank} GB), {r['ratio']:.2f} of it predicted."
        )
    if res.get("earlier_runs"):
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(pa.MODELS), choices=list(pa.MODELS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--nprocs", nargs="+", type=int, default=[2, 4])
    ap.add_argument(
        "--repredict",
        action="store_true",
        help="predict again for the measurements in results/plan_sharded.json (after a "
        "planner change), without training",
    )
    ap.add_argument("--rank-child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_child:
        rank_child(Path(args.rank_child[0]), args.rank_child[1:])
        return
    if args.repredict:
        res = json.loads((RESULTS / "plan_sharded.json").read_text())
        data = Path(tempfile.gettempdir()) / "unused.jsonl"  # (only its name is planned)
        for row in res["rows"]:
            overrides = pa.run_overrides(row["model"], row["method"], data, "cpu", "unused")
            p = predict(
                [*overrides, "distributed.sharding=fsdp"],
                row["visited"],
                row["nproc"],
                row.get("lowest", 0),
            )
            row["predicted"] = p["device_peak_bytes"]
            row["ratio"] = row["predicted"] / row["measured"]
            row["phase"] = p["peak_phase"]
        res["repredicted"] = "python benchmarks/plan_sharded.py --repredict"
        (RESULTS / "plan_sharded.json").write_text(json.dumps(res, indent=1) + "\n")
        (RESULTS / "plan_sharded.md").write_text(to_md(res))
        print(to_md(res))
        return
    command = "python benchmarks/plan_sharded.py " + " ".join(sys.argv[1:])
    res = {"command": command, "machine": pa.machine_line("cpu"), "rows": []}
    # rows not measured now stay, with the command that measured them; a row measured
    # again keeps its earlier measurement under earlier_runs (the table's footnote)
    path = RESULTS / "plan_sharded.json"
    earlier = json.loads(path.read_text()) if path.exists() else {"rows": []}
    now = {(m, meth, n) for m in args.models for meth in args.methods for n in args.nprocs}
    kept, res["earlier_runs"] = [], earlier.get("earlier_runs", [])
    for r in earlier["rows"]:
        r = {"command": earlier.get("command"), **r}
        again = (r["model"], r["method"], r["nproc"]) in now
        (res["earlier_runs"] if again else kept).append(r)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "long.jsonl"
        pa.long_rows(data, 64)
        for model in args.models:
            for nproc in args.nprocs:
                for method in args.methods:
                    row = measure(model, method, nproc, data, Path(tmp))
                    print(json.dumps(row), flush=True)
                    res["rows"].append({"command": command, **row})
    res["rows"] = [*kept, *res["rows"]]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plan_sharded.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "plan_sharded.md").write_text(to_md(res))
    print(to_md(res))


if __name__ == "__main__":
    main()
