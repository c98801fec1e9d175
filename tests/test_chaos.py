"""The fault-injection harness in its CI form (benchmarks/chaos.py --kills 15): real
`grass train` runs of GRASS with disk offload, LISA and LoRA killed at seeded random
moments and on purpose inside a checkpoint write, an offload write-back and the final
save (SIGKILL, SIGTERM, SIGINT), resumed until done, and checked against runs never
killed: losses and final weights bit-identical, each step once in metrics.jsonl, no
temporary file left, the folder never above pre-flight's prediction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fifteen_kills_lose_nothing(tmp_path):
    out = tmp_path / "chaos"
    res = subprocess.run(
        [sys.executable, "benchmarks/chaos.py", "--kills", "15", "--seed", "3", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=1500,
    )  # fmt: skip
    report = json.loads(out.with_suffix(".json").read_text())
    fails = [f for r in report["recipes"].values() for f in r["failures"]]
    assert res.returncode == 0 and report["passed"], fails or res.stderr[-2000:]
    assert sum(r["kills"] for r in report["recipes"].values()) == 15
    signals: dict[str, int] = {}
    moments: set[str] = set()
    for r in report["recipes"].values():
        for k, n in r["by_signal"].items():
            signals[k] = signals.get(k, 0) + n
        moments |= set(r["by_moment"])
        assert r["max_folder_bytes"] <= r["predicted_bytes"]
    assert signals["SIGKILL"] >= 9 and signals["SIGTERM"] >= 3 and signals["SIGINT"] >= 3
    assert {"checkpoint write", "final save"} <= moments, moments
