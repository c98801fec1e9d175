"""What a training run returns: its folder, model, loss curve, evaluations and totals.

A module of its own so that the loop, which fills it, and the modules that read it
(report.py for the summary, saving.py for checkpoints) depend on it and not on
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)
    tokens: int = 0
    elapsed_s: float = 0.0
    peak_rss: int = 0
    skipped: int = 0
    task_eval: dict[str, Any] | None = None
