"""The `grass` command: thin. Parse, call the library, map errors to exit codes.

Nothing here imports torch or transformers at module level: `grass --help` and
`grass validate` must answer in well under a second.
Exit codes: 0 success, 1 a failed run (e.g. NaN loss) or a bug (traceback), 2 user
error, 130 interrupted (SIGINT), 143 terminated (SIGTERM).
Set GRASS_DEBUG=1 to get a traceback for user errors too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

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


def _main_rank() -> bool:
    """Under torchrun only rank 0 talks to the user; the others stay silent.

    Reads RANK itself rather than through grass_cli.distributed, which imports torch
    (this module must not, for a fast `grass --help`)."""
    return os.environ.get("RANK", "0") in ("0", "")


def _guard(fn: Callable[[], T]) -> T:
    """Run a command body: user errors become one message and exit code 2."""
    try:
        return fn()
    except GrassError as e:
        if os.environ.get("GRASS_DEBUG"):
            raise
        if not _main_rank():
            raise typer.Exit(e.exit_code) from None
        raise _fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        raise typer.Exit(130) from None


@contextlib.contextmanager
def _stop_on_signals(stop: Any) -> Iterator[None]:
    """SIGINT/SIGTERM ask the training loop to checkpoint and stop after the step;
    a second signal aborts at once (checkpoints are never written in place, so the
    last complete one stays valid)."""

    def handler(signum: int, frame: object) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = signal.Signals(signum).name
        if _main_rank():
            sys.stderr.write(
                f"\n{stop.requested}: finishing this step and saving a checkpoint "
                "(Ctrl-C again aborts now)\n"
            )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
        bool,
        typer.Option(
            "--no-live",
            help="Plain log lines instead of the live dashboard (plain is automatic "
            "when stdout is not a terminal).",
        ),
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
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue a run: 'auto' (the newest checkpoint in output.dir, or a fresh "
            "start if there is none) or the path of a checkpoint folder.",
        ),
    ] = None,
) -> None:
    """Fine-tune a model from a YAML recipe.

    Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits
    130 / 143; a second Ctrl-C aborts at once. Several processes (data-parallel):
    torchrun --nproc-per-node N -m grass_cli train RECIPE.
    """

    def body() -> None:
        from grass_cli.recipe import load_recipe

        cfg = load_recipe(recipe, overrides or [])
        from grass_cli.engine import Interrupted, StopRequest, run_training
        from grass_cli.plots import write_run_plots
        from grass_cli.telemetry import Sink, Telemetry
        from grass_cli.telemetry.console import console_sinks

        main = _main_rank()
        sinks: list[Sink] = []
        if cfg.output.tensorboard and main:
            from grass_cli.telemetry.tensorboard import TensorBoardSink

            # a resumed run adds to the event files of the run it continues
            tb_dir = Path(cfg.output.dir) / "tensorboard"
            sinks.append(TensorBoardSink(tb_dir, append=resume is not None))
        # The dashboard draws from the moment it is built: console sinks go last,
        # right before run_training, which closes every sink whatever happens.
        if main:
            sinks += console_sinks(
                sys.stdout,
                live=not no_live,
                every=log_every or cfg.output.log_interval,
                quiet=quiet,
            )
        stop = StopRequest()
        with _stop_on_signals(stop):
            try:
                result = run_training(
                    cfg, Telemetry(sinks), overwrite=overwrite, resume=resume, stop=stop
                )
            except Interrupted as e:
                code = 143 if e.signal_name == "SIGTERM" else 130
                if not main:
                    raise typer.Exit(code) from None
                again = " ".join(["grass train", str(recipe), *(overrides or []), "--resume auto"])
                sys.stderr.write(
                    f"Interrupted by {e.signal_name} after step {e.step}; checkpoint saved in "
                    f"{e.checkpoint}.\nResume with: {again}\n"
                )
                raise typer.Exit(code) from None
        if not main:
            return
        plots = write_run_plots(result.run_dir)
        sys.stdout.write(f"plots  {plots[0].parent} ({', '.join(p.name for p in plots)})\n")

    _guard(body)


register_all(app)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
