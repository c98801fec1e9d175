"""Small helpers shared by the tests (pytest puts this folder on sys.path)."""

from __future__ import annotations


class ListSink:
    """A telemetry sink that keeps every event, for assertions."""

    def __init__(self):
        self.events: list[dict] = []

    def emit(self, event):
        self.events.append(event)

    def close(self):
        pass

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]


def layerwise_recipe(model_dir, out, steps: int, probe_steps: int = 2, **training):
    """A tiny GRASS recipe for the API and plug-in tests: gamma 2, a switch every 3
    steps, offloaded state, 64 quickstart rows; `training` adds training keys."""
    from pathlib import Path

    from grass_cli.recipe import validate_dict

    train = str(Path(__file__).resolve().parent.parent / "data/quickstart/train.jsonl")
    return validate_dict(
        {
            "model": {"path": str(model_dir)},
            "data": {"train": train, "max_length": 64, "limit": 64},
            "sampler": {
                "strategy": "grass",
                "gamma": 2,
                "switch_interval": 3,
                "probe_steps": probe_steps,
                "update_interval": 2,
            },  # fmt: skip
            "optimizer": {"lr": 1e-3, "state_policy": "offload"},
            "training": {
                "max_steps": steps,
                "micro_batch_size": 4,
                "seed": 3,
                "grad_clip": 1.0,
                **training,
            },  # fmt: skip
            "output": {"dir": str(out), "save_model": False},
        },
        "test.yaml",
    )


def grass(*args: str, timeout: int = 600):
    """`grass ARGS...` in a child process from the checkout's root, output captured."""
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run(
        [sys.executable, "-m", "grass_cli", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=timeout,
    )
