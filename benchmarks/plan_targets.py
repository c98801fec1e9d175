"""Per-GPU predictions where users live: `grass plan --nproc N` for the sizes of issue
38's table (Llama-3-8B on 2 and 4 x 24 GB, a 13B and a 32B on 4 x 24 GB, Llama-3.1-70B
on 8 x 80 GB and 8 x 24 GB), sharded with FSDP2, recipes/gpu-grass.yaml at micro-batch 1.

    python benchmarks/plan_targets.py      # seconds: the planner reads configs only

Each row is one `grass plan` call (the command is in the results): one rank's device
peak for GRASS offload/step (the recipe), GRASS drop, LISA offload/step and full
fine-tuning (keep), and one machine's host RAM for GRASS offload/step with the whole
optimizer state pinned in it (`--host-memory` large enough that nothing spills to
disk: what a node needs so the state never touches a disk). Then the same GRASS with
`distributed.cpu_offload: true`, the shards on the host: its device peak, and the
host RAM with the state pinned or on disk. Results:
benchmarks/results/plan_targets.{json,md}. Predictions, not measurements: the planner
is validated against measured peaks on this CPU (docs/distributed.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from grass_cli.atomic import write_atomic_text  # noqa: E402

# (model preset, GPUs, GB per GPU)
TARGETS = [
    ("llama-3-8b", 2, 24),
    ("llama-3-8b", 4, 24),
    ("llama-2-13b", 4, 24),
    ("qwen2.5-32b", 4, 24),
    ("llama-3.1-70b", 8, 80),
    ("llama-3.1-70b", 8, 24),
]
ROWS = {
    "GRASS offload/step": ("grass", "offload", "step", False),
    "GRASS drop": ("grass", "drop", None, False),
    "LISA offload/step": ("lisa", "offload", "step", False),
    "full (keep)": ("full", "keep", None, True),
}
HOST_GB = 4096  # a node's RAM large enough that no state spills to disk


# distributed.cpu_offload (FSDP2's CPUOffloadPolicy): GRASS offload/step with every
# rank's shards on the host, its optimizer state pinned there too or on disk
HOST_ROWS = {
    "state pinned": ["optimizer.offload.target=cpu", "optimizer.offload.host_budget=null"],
    "state on disk": ["optimizer.offload.target=disk"],
}


def plan(model: str, gpus: int, gb: int, *extra: str) -> tuple[list[dict], str]:
    args = [
        "recipes/gpu-grass.yaml", "--model-config", model, "--device-memory", str(gb),
        "--host-memory", str(HOST_GB), "--nproc", str(gpus),
        "distributed.sharding=fsdp", "training.micro_batch_size=1",
        *(extra or HOST_ROWS["state pinned"]),
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "grass_cli", "plan", *args, "--json"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if out.returncode not in (0, 1):  # (1: the recipe does not fit, a verdict)
        raise SystemExit(f"grass plan failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout), "grass plan " + " ".join(args)


def pick(rows: list[dict], key: tuple) -> dict:
    strategy, policy, residency, embed = key
    for r in rows:
        same = (r["strategy"], r["state_policy"], r["residency"]) == (strategy, policy, residency)
        if same and (r["embed_head_trained"] == embed or strategy == "full"):
            return r
    raise KeyError(key)


def main() -> None:
    results = []
    for model, gpus, gb in TARGETS:
        rows, cmd = plan(model, gpus, gb)
        entry = {"model": model, "gpus": gpus, "gb": gb, "command": cmd, "rows": {}}
        for label, key in ROWS.items():
            r = pick(rows, key)
            entry["rows"][label] = {
                "peak_gb": r["device_peak_bytes"] / 1e9, "phase": r["peak_phase"],
                "fits": r["device_peak_bytes"] <= gb * 1e9,
                # one machine's RAM, all its ranks (host_bytes is one rank's)
                "host_gb": sum(r["host_need"].values()) / 1e9, "host_need": r["host_need"],
                "kinds": r["kinds"],
            }  # fmt: skip
        entry["cpu_offload"] = {}
        for label, state in HOST_ROWS.items():
            rows, cmd = plan(model, gpus, gb, "distributed.cpu_offload=true", *state)
            r = pick(rows, ROWS["GRASS offload/step"])
            entry["cpu_offload"][label] = {
                "peak_gb": r["device_peak_bytes"] / 1e9, "phase": r["peak_phase"],
                "fits": r["device_peak_bytes"] <= gb * 1e9, "command": cmd,
                "host_gb": sum(r["host_need"].values()) / 1e9, "host_need": r["host_need"],
            }  # fmt: skip
        results.append(entry)
    lines = [
        "# Sharded predictions (FSDP2), recipes/gpu-grass.yaml, micro-batch 1, 512 tokens",
        "",
        "One rank's device peak in GB (1e9 bytes; `*`: over the card), and for GRASS "
        "offload/step one machine's host RAM with the whole optimizer state pinned.",
        "",
        "| model | GPUs | " + " | ".join(ROWS) + " | host RAM per machine, GRASS offload/step |",
        "|---|---|" + "---|" * len(ROWS) + "---|",
    ]
    for e in results:
        cells = " | ".join(
            f"{v['peak_gb']:.1f}{'' if v['fits'] else ' *'}" for v in e["rows"].values()
        )
        host = e["rows"]["GRASS offload/step"]["host_gb"]
        lines.append(f"| {e['model']} | {e['gpus']} x {e['gb']} GB | {cells} | {host:.0f} GB |")
    lines += [
        "",
        "With `distributed.cpu_offload: true` (every rank's shards of the weights, their "
        "gradients and AdamW on the host): GRASS offload/step's device peak, and one "
        "machine's host RAM with the optimizer state pinned there or on disk "
        "(`optimizer.offload.target: disk`; the page cache holds the active blocks' state).",
        "",
        "| model | GPUs | device peak | host RAM per machine, state pinned | "
        "host RAM per machine, state on disk |",
        "|---|---|---|---|---|",
    ]
    for e in results:
        pinned, disk = e["cpu_offload"]["state pinned"], e["cpu_offload"]["state on disk"]
        lines.append(
            f"| {e['model']} | {e['gpus']} x {e['gb']} GB | {pinned['peak_gb']:.1f}"
            f"{'' if pinned['fits'] else ' *'} | {pinned['host_gb']:.0f} GB | "
            f"{disk['host_gb']:.0f} GB |"
        )
    lines += ["", "Commands:", ""] + [f"- `{e['command']}`" for e in results]
    lines += [f"- `{v['command']}`" for e in results for v in e["cpu_offload"].values()]
    out = ROOT / "benchmarks/results/plan_targets"
    write_atomic_text(out.with_suffix(".json"), json.dumps(results, indent=1))
    write_atomic_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
