"""Where a training run stands: the one record the loop advances, a checkpoint saves
and training returns.

Its own module, imported by both the engine and checkpoint.py (which knows nothing
of the engine), so the counters exist once: the loop mutates this object, a
checkpoint writes it as it is, a resume reads it back, and `TrainResult` hands it
to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    losses: list[float] = field(default_factory=list)  # one per step
    eval_losses: dict[int, float] = field(default_factory=dict)  # step -> eval loss
    tokens: int = 0  # trained tokens, all ranks
    elapsed_s: float = 0.0  # training time, across resumes
    peak_rss: int = 0  # this process's highest RSS at a step's end
    skipped: int = 0  # non-finite steps skipped
    skipped_in_a_row: int = 0  # (training.max_skipped_steps counts these)
    # A stop (SIGTERM / SIGINT) checkpointed before the evaluations due after `step`:
    # the resume runs them first, so a preemption never waits for an eval.
    evals_due: bool = False
    # The slowest step and checkpoint write so far (seconds): together, the time a
    # SIGTERM may need before the run's checkpoint is on disk.
    slowest_step_s: float = 0.0
    slowest_checkpoint_s: float = 0.0
