"""What a training run returns: its folder, model, evaluations and its RunState.

A module of its own so that the loop, which fills it, and the modules that read it
(report.py for the summary, saving.py for checkpoints) depend on it and not on
each other. The counters live in `progress` (grass_cli/run_state.py), the object
the loop advances and checkpoints save; the properties read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_cli.run_state import RunState


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    steps: int  # the run's total
    progress: RunState = field(default_factory=RunState)
    task_eval: dict[str, Any] | None = None
    # perf_counter() at the run's start, less a resumed run's earlier time: the
    # loop's clock for progress.elapsed_s (this process's, so not saved)
    t_start: float = field(default=0.0, repr=False)

    @property
    def losses(self) -> list[float]:
        return self.progress.losses

    @property
    def eval_losses(self) -> dict[int, float]:
        return self.progress.eval_losses

    @property
    def tokens(self) -> int:
        return self.progress.tokens

    @property
    def elapsed_s(self) -> float:
        return self.progress.elapsed_s

    @property
    def peak_rss(self) -> int:
        return self.progress.peak_rss

    @property
    def skipped(self) -> int:
        return self.progress.skipped
