"""The `grass` command: thin. Parse, call the library, map errors to exit codes.

Nothing here imports torch or transformers at module level: `grass --help` and
`grass validate` must answer in well under a second.
Exit codes: 0 success, 1 bug (traceback), 2 user error, 130 interrupted.
Set GRASS_DEBUG=1 to get a traceback for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from grass_cli import __version__
from grass_cli.commands import register_all
from grass_cli.errors import GrassError

app = typer.Typer(
    name="grass",
    help="Memory-efficient full-parameter fine-tuning of LLMs with GRASS "
    "(gradient-based adaptive layer-wise importance sampling).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Dotted overrides, key.path=value (value parsed as YAML), "
        "e.g. training.max_steps=200 sampler.gamma=4.",
        show_default=False,
    ),
]


def _fail(message: str, code: int) -> typer.Exit:
    sys.stderr.write(f"Error: {message}\n")
    return typer.Exit(code)


def _guard(fn: Callable[[], T]) -> T:
    """Run a command body: user errors become one message and exit code 2."""
    try:
        return fn()
    except GrassError as e:
        if os.environ.get("GRASS_DEBUG"):
            raise
        raise _fail(str(e), 2) from None
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"grass {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """GRASS CLI."""


@app.command(
    epilog="Example: grass validate recipes/quickstart.yaml training.max_steps=50",
)
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe (and overrides) without loading a model; print the resolved recipe."""
    from grass_cli.recipe import load_recipe

    resolved = _guard(lambda: load_recipe(recipe, overrides or []))
    sys.stderr.write(f"{recipe}: valid\n")
    sys.stdout.write(resolved.to_yaml())


@app.command(
    epilog="Examples:\n\n  grass train recipes/quickstart.yaml\n\n"
    "  grass train my.yaml training.max_steps=200 sampler.gamma=4 --no-live",
)
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    no_live: Annotated[
        bool, typer.Option("--no-live", help="Plain log lines instead of the live dashboard.")
    ] = False,
    log_every: Annotated[
        int | None,
        typer.Option(
            "--log-every",
            min=1,
            help="Plain mode: a line every N steps (default: output.log_interval).",
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only errors and the final summary.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a previous run in output.dir.")
    ] = False,
) -> None:
    """Fine-tune a model from a YAML recipe."""

    def body() -> None:
        from grass_cli.recipe import load_recipe

        cfg = load_recipe(recipe, overrides or [])
        from grass_cli.engine import run_training
        from grass_cli.telemetry import Telemetry
        from grass_cli.telemetry.console import console_sinks

        sinks = console_sinks(
            sys.stdout,
            live=not no_live and sys.stdout.isatty(),
            every=log_every or cfg.output.log_interval,
            quiet=quiet,
        )
        run_training(cfg, Telemetry(sinks), overwrite=overwrite)

    _guard(body)


register_all(app)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
