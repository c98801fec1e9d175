"""`grass init`: a complete, commented recipe for a model, a dataset and a GPU, that
the planner says fits the GPU, the host's RAM and the disk.

    inputs.py   the model (preset, hub id, folder) and the data (format, length)
    choose.py   the fastest configuration that fits (planner-driven search)
    render.py   YAML with a comment on every choice

The library writes nothing and prints nothing: `make_recipe` returns the text and
the figures; the command writes the file (atomically, never over an existing one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grass_cli.init.choose import DEVICE_SLACK, Budget, Choice, choose
from grass_cli.init.inputs import DataInfo, ModelInfo, inspect_data, inspect_model, max_length_for
from grass_cli.init.render import render
from grass_cli.planner.machine import HostMemory

# Rows held out for the eval loss: 5% of the data, at least MIN_EVAL and at most
# MAX_EVAL rows; fewer than 4 x MIN_EVAL rows train without an eval.
EVAL_SHARE, MIN_EVAL, MAX_EVAL = 0.05, 10, 500


@dataclass
class InitOptions:
    """What the user asked for; None: chosen by `grass init`."""

    model: str
    data: str
    gpu_gb: float | None  # None: this machine's GPU, else the CPU
    host: HostMemory
    disk_gb: float | None = None  # None: this machine's free disk under output.dir
    strategy: str = "grass"
    format: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    max_length: int | None = None
    batch: int = 32
    epochs: float | None = None
    steps: int | None = None
    output_dir: str | None = None
    lr: float | None = None


@dataclass
class Made:
    """The recipe's text and what it was made from."""

    text: str
    choice: Choice
    model: ModelInfo
    data: DataInfo
    budget: Budget
    train_rows: int
    steps: int


def make_recipe(o: InitOptions, gpu_found: int | None) -> Made:
    """Inspect the model and data, choose what fits, render the recipe.
    `gpu_found`: the memory of this machine's GPU in bytes (None without one)."""
    from grass_cli.recipe import LAYERWISE

    model = inspect_model(o.model)
    data = inspect_data(o.data, o.format, o.fields)
    budget = _budget(o, gpu_found)
    held = (
        0
        if data.rows < 4 * MIN_EVAL
        else min(MAX_EVAL, max(MIN_EVAL, round(EVAL_SHARE * data.rows)))
    )
    train_rows = data.rows - held
    per_epoch = -(-train_rows // o.batch)
    steps = o.steps or max(1, round((o.epochs or 1.0) * per_epoch))
    base = _base(o, model, data, budget, held, steps)
    choice = choose(base, budget, o.strategy in LAYERWISE)
    from grass_cli.init.comments import explain

    why, header = explain(o, model, data, budget, choice, held, train_rows, steps)
    text = render(choice.recipe, why, header)
    from grass_cli.recipe import parse_yaml, validate_dict

    validate_dict(parse_yaml(text), "grass init")  # what is written loads as it was chosen
    return Made(text, choice, model, data, budget, train_rows, steps)


def _budget(o: InitOptions, gpu_found: int | None) -> Budget:
    gpu = o.gpu_gb * 1e9 if o.gpu_gb is not None else gpu_found
    disk = int(o.disk_gb * 1e9) if o.disk_gb is not None else None
    if gpu is None:
        label = f"{o.host.source}'s {o.host.total / 1e9:.0f} GB of RAM (no GPU)"
        return Budget(None, o.host, label, disk)
    source = "given" if o.gpu_gb is not None else "this machine's"
    label = f"a {gpu / 1e9:g} GB GPU ({source})"
    return Budget(int(gpu * (1 - DEVICE_SLACK)), o.host, label, disk)


def _base(
    o: InitOptions, m: ModelInfo, d: DataInfo, b: Budget, held: int, steps: int
) -> dict[str, Any]:
    """The recipe before the search sets micro-batch, checkpointing, gamma and state."""
    cuda = b.device is not None
    data: dict[str, Any] = {"train": d.path, "format": d.format}
    if d.fields:
        data["fields"] = dict(d.fields)
    data["eval"] = held or None
    data["max_length"] = max_length_for(d, m, o.max_length)
    training: dict[str, Any] = (
        {"epochs": o.epochs, "max_steps": None}
        if o.epochs and not o.steps
        else {"max_steps": steps}
    )
    training |= {
        "micro_batch_size": o.batch,
        "grad_accum_steps": 1,
        "lr_scheduler": "cosine",
        "warmup_steps": max(1, round(0.03 * steps)),
        "device": "cuda" if cuda else "cpu",
        "eval_interval": max(1, steps // 10) if held else None,
    }
    name = o.output_dir or f"runs/{m.path.rstrip('/').split('/')[-1].lower()}-{o.strategy}"
    recipe: dict[str, Any] = {
        "model": {"path": m.path, "dtype": "bfloat16" if cuda else "float32"},
        "data": data,
        "sampler": {"strategy": o.strategy},
        "optimizer": {"lr": o.lr or m.guide.lr_for(o.strategy), "weight_decay": 0.0},
        "training": training,
        "checkpoint": {"interval": max(1, steps // 5), "keep_last": 1, "at_end": True},
        "output": {"dir": name},
    }
    if o.strategy in ("grass", "lisa", "grass-static", "cyclic"):
        recipe["sampler"] |= {"train_embeddings": False, "train_head": False}
    return recipe
