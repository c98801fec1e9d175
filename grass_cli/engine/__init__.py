"""The training engine: build a run from a recipe (build.py), then one straight loop (loop.py).

Layout: build.py (each component from its recipe section), loop.py (train: a step
-> telemetry -> eval/checkpoint), step.py (one step: choose blocks ->
forward/backward -> clip -> update, and its outcome), report.py
(what the loop tells its sinks), evals.py (evaluation during training), saving.py
(checkpoints and the final model), run_dir.py (the run folder's rules), result.py
(what a run returns; its progress is grass_cli/run_state.py's RunState).
"""

from grass_cli.engine.build import Run, seed_everything, setup
from grass_cli.engine.loop import (
    Interrupted,
    NonFiniteError,
    StopRequest,
    probe_phase,
    run_training,
    train,
)
from grass_cli.engine.result import TrainResult

__all__ = [
    "Interrupted",
    "NonFiniteError",
    "Run",
    "StopRequest",
    "TrainResult",
    "probe_phase",
    "run_training",
    "seed_everything",
    "setup",
    "train",
]
