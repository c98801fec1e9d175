"""`grass init MODEL DATA`: write a complete, commented recipe that the planner says
fits the GPU (`--gpu GB`, or this machine's), the host's RAM and the disk.

Thin: `grass_cli.init.make_recipe` inspects and chooses; this module reads the
flags, writes the file atomically (never over an existing one) and says what it
chose on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from grass_cli.commands.options import FormatOption, choice_value, fields_option, parse_fields

EPILOG = (
    "Examples:\n\n  grass init llama-3.1-8b my-chats.jsonl --gpu 24\n\n"
    "  grass init Qwen/Qwen2.5-7B-Instruct data/ --gpu 16 --strategy lora -o qwen.yaml\n\n"
    "  grass init --list-presets"
)
STRATEGIES = ("grass", "lisa", "cyclic", "grass-static", "full", "lora")


ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="A preset (`--list-presets`), a hub id, a model folder or a .gguf file.",
        show_default=False,
    ),
]
DataArg = Annotated[
    str | None,
    typer.Argument(
        help="Training data: a jsonl/json/csv/parquet file, a saved datasets folder, or a "
        "cached hub dataset id.",
        show_default=False,
    ),
]
GpuOpt = Annotated[
    float | None,
    typer.Option("--gpu", min=1, help="GPU memory in GB (default: this machine's GPU)."),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Recipe file to write (default: MODEL-STRATEGY.yaml)."),
]
StrategyOpt = Annotated[str, typer.Option("--strategy", help=", ".join(STRATEGIES))]
HostOpt = Annotated[
    float | None,
    typer.Option("--host-memory", min=0.1, help="Host RAM in GB (default: this machine's)."),
]
DiskOpt = Annotated[
    float | None,
    typer.Option(
        "--disk", min=0.1, help="Free disk for output.dir in GB (default: this machine's)."
    ),
]
FieldOpt = Annotated[list[str] | None, fields_option("FIELD=COLUMN for the format (repeatable).")]
MaxLengthOpt = Annotated[int | None, typer.Option("--max-length", min=16, help="Tokens per row.")]
BatchOpt = Annotated[int, typer.Option("--batch", min=1, help="Rows per optimizer step.")]
EpochsOpt = Annotated[
    float | None, typer.Option("--epochs", min=0.01, help="Passes over the data (default 1).")
]
StepsOpt = Annotated[int | None, typer.Option("--steps", min=1, help="Optimizer steps.")]
OutputDirOpt = Annotated[str | None, typer.Option("--output-dir", help="The run's output.dir.")]
LrOpt = Annotated[float | None, typer.Option("--lr", min=1e-9, max=1.0, help="Peak lr.")]
ListOpt = Annotated[bool, typer.Option("--list-presets", help="List the model presets and exit.")]


def init(
    model: ModelArg = None,
    data: DataArg = None,
    gpu: GpuOpt = None,
    out: OutOpt = None,
    strategy: StrategyOpt = "grass",
    host_memory: HostOpt = None,
    disk: DiskOpt = None,
    fmt: FormatOption = None,
    field: FieldOpt = None,
    max_length: MaxLengthOpt = None,
    batch: BatchOpt = 32,
    epochs: EpochsOpt = None,
    steps: StepsOpt = None,
    output_dir: OutputDirOpt = None,
    lr: LrOpt = None,
    list_presets: ListOpt = False,
) -> None:
    """Write a recipe for MODEL on DATA that fits the GPU, the host's RAM and the disk:
    micro-batch, accumulation, gamma, checkpointing and where optimizer state waits
    are chosen by the planner, the format from the data's columns, an eval held out
    from the data, and the lr from the model's preset."""
    from grass_cli.cli import _guard

    if list_presets:
        _print_presets()
        return
    given = dict(
        strategy=strategy,
        format=choice_value(fmt),
        max_length=max_length,
        batch=batch,
        epochs=epochs,
        steps=steps,
        output_dir=output_dir,
        lr=lr,
    )
    _guard(lambda: _init(model, data, gpu, out, host_memory, disk, field, given))


def _init(
    model: str | None,
    data: str | None,
    gpu: float | None,
    out: Path | None,
    host_memory: float | None,
    disk: float | None,
    field: list[str] | None,
    given: dict[str, Any],
) -> None:
    """Check the flags, make the recipe, write it (never over a file), say what it chose."""
    from grass_cli.atomic import write_atomic_text
    from grass_cli.errors import GrassError
    from grass_cli.init import InitOptions, make_recipe
    from grass_cli.planner.machine import cuda_total_memory
    from grass_cli.planner.machine import host_memory as host

    if model is None or data is None:
        raise GrassError(
            "give a MODEL and the training DATA",
            where="grass init",
            hint="for example: grass init llama-3.1-8b chats.jsonl --gpu 24 (presets: "
            "grass init --list-presets)",
        )
    strategy = given["strategy"]
    if strategy not in STRATEGIES:
        raise GrassError(
            f"unknown strategy {strategy!r}", where="--strategy", hint=", ".join(STRATEGIES)
        )
    if given["steps"] is not None and given["epochs"] is not None:
        raise GrassError("give --steps or --epochs, not both", where="grass init")
    opts = InitOptions(
        model=model,
        data=data,
        gpu_gb=gpu,
        host=host(host_memory),
        disk_gb=disk,
        fields=parse_fields(field),
        **given,
    )
    target = out or Path(f"{model.rstrip('/').split('/')[-1].lower()}-{strategy}.yaml")
    if target.exists():
        raise GrassError(
            "the recipe file already exists; grass init never overwrites a file",
            where=str(target),
            hint="choose another name with --out, or remove it yourself",
        )
    made = make_recipe(opts, None if gpu is not None else cuda_total_memory())
    write_atomic_text(target, made.text.replace("{this file}", str(target)))
    p = made.choice.plan
    sys.stderr.write(
        f"wrote {target}: {strategy} on {made.budget.device_label}; "
        f"{made.choice.notes[0]}; peak {p.device_peak_bytes / 1e9:.2f} GB\n"
        f"next: grass plan {target}   then   grass train {target}\n"
    )


def _print_presets() -> None:
    from rich.table import Table

    from grass_cli.commands.options import stdout_console
    from grass_cli.presets import get_preset, preset_names

    table = Table(title="Model presets (grass init NAME, --model-config NAME, model.path: NAME)")
    for col in ("name", "model", "params", "hub id", "lr grass / full / lora"):
        table.add_column(col)
    for name in preset_names():
        p = get_preset(name, "presets")
        lrs = " / ".join(f"{p.lr_for(s):g}" for s in ("grass", "full", "lora"))
        table.add_row(name, p.title, f"{p.params_b:g}B", p.hub_id, lrs)
    stdout_console(width=None if sys.stdout.isatty() else 140).print(table)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(init)
