"""`grass plot RUN_DIR`: (re)draw a run's PNG plots from its metrics.jsonl.

`grass train` writes the same plots at the end of a run; this command draws them
for a run that was interrupted or is still going, or after an upgrade.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

RunDirArg = Annotated[
    Path,
    typer.Argument(help="A run dir (output.dir of a `grass train` run).", show_default=False),
]


def plot(run_dir: RunDirArg) -> None:
    """Draw the importance heatmap, active counts, loss and memory plots into RUN_DIR/plots/."""
    from grass_cli.cli import _guard
    from grass_cli.plots import write_run_plots

    paths = _guard(lambda: write_run_plots(run_dir))
    for path in paths:
        sys.stdout.write(f"{path}\n")


def register(app: typer.Typer) -> None:
    app.command(epilog="Example: grass plot runs/quickstart")(plot)
