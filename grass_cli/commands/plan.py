"""`grass plan RECIPE`: the device and host memory a recipe needs, from the model's
config alone (no weights loaded), for every strategy and state policy."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

# cli.py defines these before it registers the commands, so this import works
# while cli.py is still being imported.
from grass_cli.cli import OverridesArg, RecipeArg


def register(app: typer.Typer) -> None:
    @app.command(
        epilog="Examples:\n\n  grass plan recipes/gpu-grass.yaml --model-config llama-2-7b "
        "--device-memory 24\n\n  grass plan my.yaml data.max_length=1024 --json",
    )
    def plan(
        recipe: RecipeArg,
        overrides: OverridesArg = None,
        model_config: Annotated[
            str | None,
            typer.Option(
                "--model-config",
                help="Plan for another model shape: a config.json, or a shipped shape "
                "(llama-2-7b, llama-3-8b, tinyllama-1.1b). Default: model.path's config.",
                show_default=False,
            ),
        ] = None,
        device_memory: Annotated[
            float | None,
            typer.Option(
                "--device-memory",
                help="Device memory in GB (1e9 bytes): each plan says whether it fits.",
                min=0.1,
                show_default=False,
            ),
        ] = None,
        device: Annotated[
            str | None,
            typer.Option(
                "--device",
                help="cuda or cpu (default: training.device; auto means cuda).",
                show_default=False,
            ),
        ] = None,
        json_out: Annotated[
            bool, typer.Option("--json", help="One JSON object per strategy/policy, a list.")
        ] = False,
    ) -> None:
        """Predict peak device memory and host memory, by kind, for every strategy x state
        policy (no weights loaded)."""
        from grass_cli.cli import _guard

        result = _guard(lambda: _plan(recipe, overrides or [], model_config, device, device_memory))
        layout, plans, own = result
        if json_out:
            sys.stdout.write(json.dumps([p.to_json() for p in plans], indent=2) + "\n")
            return
        from rich.console import Console

        # a table of ten columns: do not squeeze it to 80 columns in a pipe or log
        console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120)
        console.print(render(layout, plans, own, device_memory), soft_wrap=True)
        if device_memory is not None and not own.fits:
            raise typer.Exit(1)


def _plan(recipe: Path, overrides: list[str], model_config, device, device_memory):
    from grass_cli.errors import GrassError
    from grass_cli.plan import plan_recipe, recipe_scenario
    from grass_cli.recipe import load_recipe

    if device not in (None, "cuda", "cpu"):
        raise GrassError(f"unknown device {device!r}", where="--device", hint="cuda or cpu")
    r = load_recipe(recipe, overrides)
    layout, plans = plan_recipe(r, model_config, device, device_memory)
    label = recipe_scenario(r).label
    own = next(p for p in plans if p.label == label)  # scenarios() covers every recipe
    return layout, plans, own


def render(layout, plans, own, device_memory):
    """The plan table and the verdict for the recipe's own choice (pure, testable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from grass_cli.plan import gb

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
    for col in ("strategy", "peak", "phase", "weights", "grads", "state", "activ.", "host", "disk"):
        table.add_column(col, justify="left" if col in ("strategy", "phase") else "right")
    if device_memory is not None:
        table.add_column("fits")
    for p in plans:
        k = p.kinds
        row = [
            p.label + (" *" if p is own else ""),
            f"{gb(p.device_peak_bytes):.2f}",
            p.peak_phase,
            f"{gb(k['weights']):.2f}",
            f"{gb(k['gradients']):.2f}",
            f"{gb(k['optimizer_state']):.2f}",
            f"{gb(k['activations']):.2f}",
            f"{gb(p.host_bytes):.2f}",
            f"{gb(p.disk_bytes):.2f}",
        ]
        if device_memory is not None:
            row.append("yes" if p.fits else "no")
        table.add_row(*row, style="bold" if p is own else None)
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
    lines = [table, Text(verdict)]
    lines.append(
        Text(
            "keep: the state of every block visited (a long run's worst case). Python, the "
            "CUDA context and allocator slack are not included.",
            style="dim",
        )
    )
    return Group(*lines)
