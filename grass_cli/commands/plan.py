"""`grass plan RECIPE`: the device and host memory a recipe needs, from the model's
config alone (no weights loaded), for every strategy and state policy.

Thin: `grass_cli.planner.memory.plan_recipe` computes the plans; this module marks the
recipe's own choice, prints the table and its verdict (or JSON) and exits 1 when
`--device-memory` is given and the recipe's choice does not fit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from grass_cli.commands.options import (
    OverridesArg,
    RecipeArg,
    json_option,
    print_json,
    stdout_console,
)

if TYPE_CHECKING:
    from grass_cli.planner.memory import Plan
    from grass_cli.planner.shape import Layout

EPILOG = (
    "Examples:\n\n  grass plan recipes/gpu-grass.yaml --model-config llama-2-7b "
    "--device-memory 24\n\n  grass plan my.yaml data.max_length=1024 --json"
)
KINDS = ("weights", "gradients", "optimizer_state", "activations")  # the peak's parts
COLUMNS = ("strategy", "peak", "phase", "weights", "grads", "state", "activ.", "host", "disk")

ModelConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--model-config",
        help="Plan for another model shape: a config.json, or a shipped shape "
        "(llama-2-7b, llama-3-8b, tinyllama-1.1b). Default: model.path's config.",
        show_default=False,
    ),
]
DeviceMemoryOpt = Annotated[
    float | None,
    typer.Option(
        "--device-memory",
        help="Device memory in GB (1e9 bytes): each plan says whether it fits.",
        min=0.1,
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="cuda or cpu (default: training.device; auto means cuda).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, json_option("One JSON object per strategy/policy, a list.")]


def plan(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    model_config: ModelConfigOpt = None,
    device_memory: DeviceMemoryOpt = None,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Predict peak device memory and host memory, by kind, for every strategy x state
    policy (no weights loaded)."""
    from grass_cli.cli import _guard

    result = _guard(lambda: _plan(recipe, overrides or [], model_config, device, device_memory))
    layout, plans, own = result
    if json_out:
        print_json([p.to_json() for p in plans], indent=2)
        return
    # a table of ten columns: do not squeeze it to 80 columns in a pipe or log
    console = stdout_console(width=None if sys.stdout.isatty() else 120)
    console.print(render(layout, plans, own, device_memory), soft_wrap=True)
    if device_memory is not None and not own.fits:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(plan)


def _plan(
    recipe: Path,
    overrides: list[str],
    model_config: str | None,
    device: str | None,
    device_memory: float | None,
) -> tuple[Layout, list[Plan], Plan]:
    """The layout, every strategy x policy's plan, and the recipe's own among them."""
    from grass_cli.errors import GrassError
    from grass_cli.planner.memory import plan_recipe, recipe_scenario
    from grass_cli.recipe import load_recipe

    if device not in (None, "cuda", "cpu"):
        raise GrassError(f"unknown device {device!r}", where="--device", hint="cuda or cpu")
    r = load_recipe(recipe, overrides)
    layout, plans = plan_recipe(r, model_config, device, device_memory)
    label = recipe_scenario(r).label
    own = next(p for p in plans if p.label == label)  # scenarios() covers every recipe
    return layout, plans, own


# ---------------------------------------------------------------------- the output


def render(layout: Layout, plans: list[Plan], own: Plan, device_memory: float | None) -> Any:
    """The plan table and the verdict for the recipe's own choice (pure, testable)."""
    from rich.console import Group
    from rich.text import Text

    from grass_cli.planner.memory import gb

    verdict = (
        f"* the recipe ({own.label}): {gb(own.device_peak_bytes):.2f} GB peak in "
        f"{own.peak_phase}, largest part: {own.dominant}"
    )
    if own.fits is not None:
        verdict += (
            f"; fits {device_memory:g} GB"
            if own.fits
            else f"; does NOT fit {device_memory:g} GB: {own.advice}"
        )
    note = Text(
        "keep: the state of every block visited (a long run's worst case). Python, the "
        "CUDA context and allocator slack are not included.",
        style="dim",
    )
    return Group(plan_table(layout, plans, own, device_memory), Text(verdict), note)


def plan_table(layout: Layout, plans: list[Plan], own: Plan, device_memory: float | None) -> Any:
    """One row per strategy x policy, the recipe's own in bold and starred; a `fits`
    column when a device memory is given."""
    from rich.table import Table

    first = plans[0]
    title = (
        f"{layout.name}: {layout.params / 1e9:.2f}B parameters, {len(layout.blocks)} blocks, "
        f"{layout.weight_bytes * 8}-bit weights, device {first.device}"
    )
    table = Table(title=title, title_justify="left")
    table.caption = (
        "GB (1e9 bytes). peak: device peak; weights..activ.: its parts; host: pinned store "
        f"(offload target {first.offload_target or 'cpu'}) or the weights while loading"
    )
    table.caption_justify = "left"
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("strategy", "phase") else "right")
    if device_memory is not None:
        table.add_column("fits")
    for p in plans:
        table.add_row(*_row(p, own, device_memory), style="bold" if p is own else None)
    return table


def _row(p: Plan, own: Plan, device_memory: float | None) -> list[str]:
    """A plan's cells, in GB: peak and its phase, the peak's parts, host and disk."""
    from grass_cli.planner.memory import gb

    k = p.kinds
    row = [
        p.label + (" *" if p is own else ""),
        f"{gb(p.device_peak_bytes):.2f}",
        p.peak_phase,
        *(f"{gb(k[kind]):.2f}" for kind in KINDS),
        f"{gb(p.host_bytes):.2f}",
        f"{gb(p.disk_bytes):.2f}",
    ]
    if device_memory is not None:
        row.append("yes" if p.fits else "no")
    return row
