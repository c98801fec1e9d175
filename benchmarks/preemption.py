"""Preemption: how long a SIGTERM takes to become a checkpoint on disk.

    python benchmarks/preemption.py                      # quickstart and ~1.2B (about 15 min)
    python benchmarks/preemption.py --models quickstart  # the quickstart only (about 5 min)

A scheduler that preempts a job (SLURM at its time limit with `--signal=TERM@N`,
Kubernetes deleting a pod, a spot VM's notice) sends SIGTERM and kills the job a
grace period later. `grass train` finishes the step it is in, writes a checkpoint
and exits 143, so the grace period must cover a step plus a checkpoint write. This
script measures exactly that on real `grass train` processes:

- `quickstart`: recipes/quickstart.yaml as is (the real SmolLM2-135M, GRASS, state
  kept on the device), SIGTERM right after step `--at` (default 30) was logged, so a
  whole step is still to run: the worst moment. `--repeats` times per arm.
- `1.2b`: the ~1.2B random-weight bf16 Llama of benchmarks/plan_accuracy.py (built
  once and cached), GRASS with optimizer state offloaded to disk and streamed per
  step (memory.py --model 1b's arm), SIGTERM right after step 2. Once per arm.

Each with `checkpoint.on_signal: full` and `light`. Measured from outside the process:
SIGTERM to the checkpoint folder's rename (on disk: what the next job resumes from)
and to the process's exit; from its metrics.jsonl: the step times and the checkpoint
event's write time and size. The write rate (size / write time, SHA-256 of every file
included) then predicts the worst-case full checkpoint of a long run, when every
block has optimizer state: `grass plan`'s checkpoint size for the recipe.

Results: benchmarks/results/preemption.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import plan_accuracy as pa  # noqa: E402

from grass_cli.atomic import write_atomic_text  # noqa: E402
from grass_cli.telemetry.sinks import grace_period_s  # noqa: E402

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
COMMON = [
    "training.max_steps=100000",
    "checkpoint.interval=null",
    "checkpoint.at_end=false",
    "output.save_model=false",
    "output.log_interval=1000",
]


def arm_overrides(model: str, out: Path, data: Path | None) -> list[str]:
    """The run's overrides on recipes/quickstart.yaml, besides on_signal."""
    if model == "quickstart":
        return [f"output.dir={out}", *COMMON]
    assert data is not None
    over = pa.run_overrides("1b", "grass-offload", data, "cpu", str(out))
    return [*over, *COMMON]


def steps_logged(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.exists():
        return []
    events = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # (a line being appended)
            break
    return events


def one(model: str, on_signal: str, at: int, data: Path | None, tmp: Path) -> dict[str, Any]:
    """One `grass train`, SIGTERM right after step `at` was logged; its timings."""
    out = tmp / f"{model}-{on_signal}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "grass_cli", "train", str(QUICKSTART), "--no-live", "--quiet"]
    cmd += [*arm_overrides(model, out, data), f"checkpoint.on_signal={on_signal}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics, ckpts = out / "metrics.jsonl", out / "checkpoints"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{model} {on_signal}: grass train ended: {proc.stderr.read()}")
            steps = [e for e in steps_logged(metrics) if e["event"] == "step"]
            if len(steps) >= at:
                break
            time.sleep(0.005)
        t_sig = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        on_disk = None
        while proc.poll() is None:
            if on_disk is None and ckpts.is_dir() and any(ckpts.glob("step-*")):
                on_disk = time.perf_counter() - t_sig
            time.sleep(0.002)
        exited = time.perf_counter() - t_sig
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 143:
        raise SystemExit(f"{model} {on_signal}: exit {proc.returncode}, not 143: {err[-2000:]}")
    events = steps_logged(metrics)
    ck = next(e for e in events if e["event"] == "checkpoint")
    step_times = [e["step_time"] for e in events if e["event"] == "step"]
    return {
        "model": model,
        "on_signal": on_signal,
        "signal_after_step": at,
        "checkpoint_step": ck["step"],
        "sigterm_to_checkpoint_s": on_disk if on_disk is not None else exited,
        "sigterm_to_exit_s": exited,
        "checkpoint_write_s": ck["seconds"],
        "checkpoint_bytes": ck["bytes"],
        "step_s_median": statistics.median(step_times[1:] or step_times),
        "step_s_max": max(step_times),
    }


def worst_checkpoint_bytes(model: str, data: Path | None, out: Path) -> int:
    """`grass plan`'s figure for one checkpoint of this arm (weights plus the optimizer
    state of every block, a long run's worst case)."""
    from grass_cli.commands.plan import _plan

    overrides = arm_overrides(model, out, data)
    _, _, _, machine = _plan(QUICKSTART, overrides, None, "cpu", None, None)
    return machine.disk.checkpoint_weights + machine.disk.checkpoint_state


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Per model and on_signal: the medians over repeats, the rate, the prediction."""
    lines = [
        "| model | on_signal | runs | step (median / max) | SIGTERM → checkpoint on disk "
        "| SIGTERM → exit | checkpoint write | checkpoint size | write rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        for mode in ("full", "light"):
            rs = [r for r in rows if r["model"] == model and r["on_signal"] == mode]
            if not rs:
                continue

            def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
                return statistics.median(r[key] for r in rs)

            rate = med("checkpoint_bytes") / med("checkpoint_write_s")
            lines.append(
                f"| {model} | {mode} | {len(rs)} | {med('step_s_median'):.2f} s / "
                f"{max(r['step_s_max'] for r in rs):.2f} s | "
                f"{med('sigterm_to_checkpoint_s'):.2f} s (max "
                f"{max(r['sigterm_to_checkpoint_s'] for r in rs):.2f}) | "
                f"{med('sigterm_to_exit_s'):.2f} s | {med('checkpoint_write_s'):.2f} s | "
                f"{med('checkpoint_bytes') / 1e9:.2f} GB | {rate / 1e9:.2f} GB/s |"
            )
    return lines


def predictions(rows: list[dict[str, Any]], worst: dict[str, int]) -> list[str]:
    """A long run's full checkpoint (every block with state) at the measured rate."""
    lines = []
    for model, nbytes in worst.items():
        rs = [r for r in rows if r["model"] == model and r["on_signal"] == "full"]
        light = [r for r in rows if r["model"] == model and r["on_signal"] == "light"]
        if not rs:
            continue
        rate = statistics.median(r["checkpoint_bytes"] / r["checkpoint_write_s"] for r in rs)
        step = max(r["step_s_max"] for r in rs)
        need = step + nbytes / rate
        exit_light = max((r["sigterm_to_exit_s"] for r in light), default=None)
        lines.append(
            f"- {model}: a late full checkpoint is {nbytes / 1e9:.2f} GB (grass plan), "
            f"{nbytes / rate:.1f} s at {rate / 1e9:.2f} GB/s; with the slowest step "
            f"({step:.1f} s) a SIGTERM needs about {need:.1f} s: grace period "
            f"{grace_period_s(need)} s (SLURM `--signal=TERM@{grace_period_s(need)}`)."
            + (
                f" With `on_signal: light` the slowest exit was {exit_light:.1f} s: "
                f"{grace_period_s(exit_light)} s."
                if exit_light is not None
                else ""
            )
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models", nargs="+", default=["quickstart", "1.2b"], choices=["quickstart", "1.2b"]
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs per quickstart arm")
    ap.add_argument("--at", type=int, default=30, help="quickstart: SIGTERM after this step")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/preemption.json")
    args = ap.parse_args()  # fmt: skip
    rows: list[dict[str, Any]] = []
    worst: dict[str, int] = {}
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="grass-preempt-", dir=ROOT / "runs") as t:
        tmp = Path(t)
        data = None
        if "1.2b" in args.models:
            data = tmp / "long.jsonl"
            pa.long_rows(data, 64)
        for model in args.models:
            worst[model] = worst_checkpoint_bytes(model, data, tmp / "plan")
            repeats, at = (args.repeats, args.at) if model == "quickstart" else (1, 2)
            for k in range(repeats):
                for mode in ("full", "light"):
                    print(f"{model} {mode} {k + 1}/{repeats} ...", file=sys.stderr, flush=True)
                    row = one(model, mode, at, data, tmp)
                    print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
                    rows.append(row)
    cmd = "python benchmarks/preemption.py " + " ".join(sys.argv[1:])
    machine = pa.machine_line("cpu")
    text = "\n".join(
        [
            *table(rows),
            "",
            "Predicted for a long run (every block with optimizer state):",
            "",
            *predictions(rows, worst),
            "",
            f"command: `{cmd.strip()}`",
            "",
            f"machine: {machine}, output on {ROOT / 'runs'}",
            "",
        ]
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": cmd.strip(), "machine": machine, "rows": rows, "worst_bytes": worst}
    write_atomic_text(args.out, json.dumps(payload, indent=2) + "\n")
    write_atomic_text(args.out.with_suffix(".md"), text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
