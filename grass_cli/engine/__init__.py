"""The training engine: build a run from a recipe (build.py), then one straight loop (loop.py).

Layout: build.py (each component from its recipe section), loop.py (train: choose
blocks -> forward/backward -> step -> telemetry -> eval/checkpoint), report.py
(what the loop tells its sinks), evals.py (evaluation during training), saving.py
(checkpoints and the final model), run_dir.py (the run folder's rules), result.py
(what a run returns).
"""

from grass_cli.engine.build import Run, seed_everything, setup
from grass_cli.engine.loop import (
    Interrupted,
    NonFiniteError,
    StopRequest,
    probe,
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
    "probe",
    "run_training",
    "seed_everything",
    "setup",
    "train",
]
