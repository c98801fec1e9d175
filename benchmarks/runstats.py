"""What every benchmark child reports about the training run it just did.

Shared by memory.py and compare.py, so both measure a run the same way: peak RSS
is this process's high-water mark (the child trains once), and throughput is
trained tokens per second over the steps after the first two (allocator and
cache warm-up), from the run's metrics.jsonl.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any


def train_child(recipe_path: Path, overrides: list[str]) -> tuple[list[dict], list[dict]]:
    """Train once in this process; returns (all events, step events) of the run."""
    from grass_cli.engine import run_training
    from grass_cli.recipe import load_recipe
    from grass_cli.telemetry import Telemetry

    recipe = load_recipe(recipe_path, overrides)
    result = run_training(recipe, Telemetry([]), overwrite=True)
    return read_events(result.run_dir)


def run_child(
    script: str | Path, overrides: list[str], options: list[str] | None = None
) -> tuple[dict | None, str]:
    """Run `script [OPTIONS] --child OVERRIDES` in a fresh process (its peak memory is
    its own); returns the JSON object of its last stdout line, or None and the end of
    stderr."""
    proc = subprocess.run(
        [sys.executable, str(script), *(options or []), "--child", *overrides],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        return None, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def run_children(script: str | Path, payloads: dict[str, dict], verb: str) -> dict[str, dict]:
    """`run_child(script, [json of payload])` for each named payload, one after the
    other; the first failure stops the benchmark with its stderr."""
    results: dict[str, dict] = {}
    for name, payload in payloads.items():
        print(f"{verb} {name} ...", file=sys.stderr, flush=True)
        row, err = run_child(script, [json.dumps(payload)])
        if row is None:
            sys.exit(f"{name} failed ({err})")
        results[name] = row
    return results


def read_events(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(all events, step events) of a run dir's metrics.jsonl."""
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return events, [e for e in events if e["event"] == "step"]


def training_peak_rss(steps: list[dict]) -> int:
    """The process's RSS high-water mark at its last training step: model load, the
    first validation pass, probing and every step, but not the final evaluation and
    the model save that follow training (the same work for every method)."""
    return max(e.get("rss_peak") or e["rss"] for e in steps)


def common_stats(steps: list[dict]) -> dict[str, Any]:
    """Peak RSS, tokens/s after warm-up, and the run's token count."""
    timed = steps[2:] if len(steps) > 4 else steps
    return {
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "tokens_per_s": sum(e["tokens"] for e in timed) / sum(e["step_time"] for e in timed),
        "tokens": sum(e["tokens"] for e in steps),
    }
