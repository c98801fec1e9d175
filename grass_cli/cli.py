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
from grass_cli.commands.options import OverridesArg, RecipeArg
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
    except (MemoryError, RuntimeError, ImportError, OSError) as e:  # memory, outside a phase
        from grass_cli.oom import out_of_memory_kind

        found = out_of_memory_kind(e)
        if found is None or os.environ.get("GRASS_DEBUG"):
            raise
        what = "host memory" if found[0] == "host" else "GPU memory"
        asked = f" (it asked for {found[1] / 1e9:.2f} GB more)" if found[1] else ""
        if isinstance(e, MemoryError) and str(e):
            asked += f" while {e}"
        raise _fail(
            f"{what} ran out{asked}\n  hint: `grass plan RECIPE` shows what a run needs "
            "and the keys that lower it",
            1,
        ) from None


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
    epilog="Examples:\n\n  grass validate recipes/quickstart.yaml training.max_steps=50\n\n"
    "  grass validate my.yaml --print > resolved.yaml",
)
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    print_recipe: Annotated[
        bool,
        typer.Option("--print", help="Also write the resolved recipe (YAML) to stdout."),
    ] = False,
) -> None:
    """Check a recipe (and overrides) and everything it points at without loading the
    model: data, model path, folders, disk space, host RAM. The verdict and any
    warnings go to stderr."""
    from grass_cli.preflight import preflight
    from grass_cli.recipe import load_recipe

    resolved = _guard(lambda: load_recipe(recipe, overrides or []))
    found = _guard(lambda: preflight(resolved, run_dir=False, training=False))
    rows = ", ".join(
        f"{k} {n} rows" if isinstance(n, int) else f"{k} {n}" for k, n in found.rows.items()
    )
    writes = found.disk.breakdown() if found.disk else ""
    need = sum(found.disk_needed.values())
    host = sum(found.host_need.values())
    sys.stderr.write(
        f"{recipe}: valid ({found.params / 1e6:.0f}M parameters; {rows}; "
        f"about {need / 1e9:.2f} GB to write: {writes}; about {host / 1e9:.2f} GB of host RAM)\n"
    )
    checked = found.recipe or resolved
    if checked._gamma_auto:
        sys.stderr.write(f"sampler.gamma {checked.sampler.gamma}: {checked._gamma_auto}\n")
    _warn(found.warnings)
    if print_recipe:
        sys.stdout.write(checked.to_yaml())


def _warn(warnings: list[str]) -> None:
    """Valid settings that are surely not what was meant: one line each, on stderr."""
    if _main_rank():
        for w in warnings:
            sys.stderr.write(f"warning: {w}\n")


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
        from grass_cli.preflight import preflight
        from grass_cli.recipe import load_recipe

        cfg = load_recipe(recipe, overrides or [])
        found = preflight(cfg, resume=resume, overwrite=overwrite)  # before any file is written
        _warn(found.warnings)
        cfg = found.recipe or cfg  # (sampler.gamma: auto resolved)
        sinks = _train_sinks(cfg, resume is not None, no_live, log_every, quiet)
        result = _run(cfg, sinks, [str(recipe), *(overrides or [])], overwrite, resume)
        if result is None:
            return
        from grass_cli.plots import write_run_plots

        plots = write_run_plots(result.run_dir)
        sys.stdout.write(f"plots  {plots[0].parent} ({', '.join(p.name for p in plots)})\n")

    _guard(body)


def _train_sinks(
    cfg: Any, resumed: bool, no_live: bool, log_every: int | None, quiet: bool
) -> list[Any]:
    """TensorBoard and W&B (if asked) and the console: the dashboard or plain lines
    (rank 0)."""
    from grass_cli.telemetry.console import console_sinks

    if not _main_rank():
        return []
    sinks: list[Any] = []
    if cfg.output.tensorboard:
        from grass_cli.telemetry.tensorboard import TensorBoardSink

        # a resumed run adds to the event files of the run it continues
        sinks.append(TensorBoardSink(Path(cfg.output.dir) / "tensorboard", append=resumed))
    if cfg.output.wandb is not None:
        from grass_cli.telemetry.wandb import WandbSink

        # a resumed run continues the W&B run whose id RUN_DIR/wandb-run-id keeps
        run_dir = Path(cfg.output.dir)
        sinks.append(WandbSink(cfg.output.wandb, run_dir, cfg.model_dump(mode="json")))
    # The dashboard draws from the moment it is built: console sinks go last,
    # right before run_training, which closes every sink whatever happens.
    every = log_every or cfg.output.log_interval
    return sinks + console_sinks(sys.stdout, live=not no_live, every=every, quiet=quiet)


def _run(
    cfg: Any, sinks: list[Any], command: list[str], overwrite: bool, resume: str | None
) -> Any:
    """Train under the signal handlers; an interruption exits 130/143 with how to resume.
    Returns the result on rank 0, None on the others."""
    from grass_cli.engine import Interrupted, StopRequest, run_training
    from grass_cli.telemetry import Telemetry

    stop = StopRequest()
    with _stop_on_signals(stop):
        try:
            result = run_training(
                cfg, Telemetry(sinks), overwrite=overwrite, resume=resume, stop=stop
            )
        except Interrupted as e:
            code = 143 if e.signal_name == "SIGTERM" else 130
            _INTERRUPTED.append(code)
            if _main_rank():
                again = " ".join(["grass train", *command, "--resume auto"])
                sys.stderr.write(
                    f"Interrupted by {e.signal_name} after step {e.step}; checkpoint saved in "
                    f"{e.checkpoint}.\nResume with: {again}\n"
                )
            raise typer.Exit(code) from None
    return result if _main_rank() else None


register_all(app)


# The exit code of a run stopped by a signal, once its checkpoint is written (main()).
_INTERRUPTED: list[int] = []


def main() -> None:
    """The `grass` command. A run stopped by SIGTERM / SIGINT exits without the
    interpreter's teardown (about a second spent freeing the model's memory): its
    checkpoint is on disk and every file it wrote is closed, and a preemption's grace
    period is better spent on the checkpoint. (Only here: `app` called in-process,
    as tests do, returns normally.)"""
    try:
        app()
    except SystemExit:
        if _INTERRUPTED:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(_INTERRUPTED[-1])
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
