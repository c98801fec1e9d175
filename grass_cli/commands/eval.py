"""`grass eval`: loss / perplexity, generation accuracy and multiple-choice accuracy.

Thin: interpret the target (model, checkpoint or run dir), build an `EvalConfig`
from the options, call `grass_cli.evaluate.run_eval`, print a table or JSON.
Nothing heavy is imported at module level (`grass --help` imports this module).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from grass_cli.errors import GrassError, ModelError

if TYPE_CHECKING:
    from grass_cli.recipe import ModelConfig, Recipe


class Kind(str, Enum):
    loss = "loss"
    generate = "generate"
    choice = "choice"


class ScorerOpt(str, Enum):
    exact = "exact"
    numeric = "numeric"
    regex = "regex"


class FormatOpt(str, Enum):
    prompt_completion = "prompt-completion"
    alpaca = "alpaca"
    chat = "chat"
    text = "text"


class ChoiceScore(str, Enum):
    sum = "sum"
    mean = "mean"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


EPILOG = (
    "Examples:\n\n"
    "  grass eval embedded:smollm2-135m-instruct --data data/quickstart/test.jsonl "
    "--scorer numeric\n\n"
    "  grass eval runs/quickstart --data data/quickstart/test.jsonl --limit 200 --json\n\n"
    "  grass eval ./my-model --data gsm8k.jsonl --field prompt=question --scorer numeric "
    "--max-new-tokens 256\n\n"
    "  grass eval ./my-model --data mc.jsonl --kind choice"
)


@dataclass
class Target:
    """What `grass eval TARGET` names: the model to load and the recipe it came with."""

    model: ModelConfig
    recipe: Recipe | None
    out_dir: Path  # default output folder, next to the model
    label: str


def resolve_target(target: str) -> Target:
    """A run dir (RUN_DIR/final + its recipe), a model folder, a .gguf, an embedded
    model or a hub id. A model folder inside a run dir (RUN_DIR/final, a checkpoint)
    also picks up the run's recipe, so its rows are formatted as in training."""
    from grass_cli.recipe import ModelConfig, load_recipe

    p = Path(target).expanduser()
    if p.is_dir():
        if (p / "config.json").exists():
            recipe_file = next(
                (r for r in (p / "recipe.yaml", p.parent / "recipe.yaml") if r.is_file()), None
            )
            recipe = load_recipe(recipe_file) if recipe_file else None
            model = (recipe.model if recipe else ModelConfig()).model_copy(
                update={"path": str(p), "gradient_checkpointing": False}
            )
            return Target(model, recipe, p.parent / f"eval-{p.name}", str(p))
        if (p / "recipe.yaml").is_file():
            final = p / "final"
            if not (final / "config.json").exists():
                raise ModelError(
                    "the run dir has no final model (final/config.json)",
                    where=target,
                    hint="the run may not have finished; pass a checkpoint folder instead",
                )
            recipe = load_recipe(p / "recipe.yaml")
            model = recipe.model.model_copy(
                update={"path": str(final), "gradient_checkpointing": False}
            )
            return Target(model, recipe, p / "eval", str(p))
        raise ModelError(
            "this folder is neither a run dir (recipe.yaml + final/) nor a model folder "
            "(config.json)",
            where=target,
            hint="pass a run dir, a model folder, a .gguf file, a hub id or "
            "embedded:smollm2-135m-instruct",
        )
    name = target.rstrip("/").split("/")[-1].split(":")[-1]
    name = name.removesuffix(".gguf") or "model"
    out = p.parent / f"eval-{name}" if p.suffix == ".gguf" else Path(f"eval-{name}")
    return Target(ModelConfig(path=target), None, out, target)


def parse_fields(pairs: list[str]) -> dict[str, str]:
    """`--field prompt=question` (repeatable) -> {"prompt": "question"}."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise GrassError(
                f"--field {pair!r} is not of the form FIELD=COLUMN",
                where="--field",
                hint="for example --field prompt=question --field answer=label",
            )
        out[name.strip()] = column.strip()
    return out


def build_config(recipe: Recipe | None, options: dict[str, Any]) -> Any:
    """The recipe's `eval:` section (when it has one) with the options given on top."""
    from pydantic import ValidationError

    from grass_cli.eval_config import EvalConfig

    base = getattr(recipe, "eval", None) if recipe is not None else None
    values: dict[str, Any] = base.model_dump(exclude_unset=True) if base is not None else {}
    values.update({k: v for k, v in options.items() if v is not None})
    try:
        return EvalConfig.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'options'}: "
            + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )
        raise GrassError(
            f"invalid eval options: {problems}", hint="see grass eval --help"
        ) from None


def render_result(result: dict[str, Any], label: str) -> Any:
    """The Rich table of one result dict (pure: tested by rendering it)."""
    from rich.table import Table

    table = Table(title=f"grass eval  {label}", title_justify="left", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right", overflow="fold")
    table.add_row("data", f"{result['data']} ({result['rows']} rows)")
    if "loss" in result:
        table.add_row("loss (nats/token)", f"{result['loss']:.4f}")
        table.add_row("perplexity", f"{result['ppl']:.3f}")
        table.add_row("loss tokens", str(result["loss_tokens"]))
    if "accuracy" in result:
        table.add_row(
            f"accuracy ({result['scorer']})",
            f"{100 * result['accuracy']:.1f}%  ({result['correct']}/{result['scored']})",
        )
        table.add_row("new tokens (mean)", f"{result['new_tokens'] / max(1, result['scored']):.1f}")
    if "choice_accuracy" in result:
        n = result["rows"]
        table.add_row(
            f"choice accuracy ({result['choice_score']} log-lik)",
            f"{100 * result['choice_accuracy']:.1f}%  ({result['choice_correct']}/{n})",
        )
    table.add_row("time", f"{result['elapsed_s']:.1f} s")
    if "predictions" in result:
        table.add_row("predictions", result["predictions"])
    return table


def _progress_reporter(enabled: bool) -> tuple[Any, Any]:
    """A transient Rich progress bar on stderr, or nothing when stderr is not a terminal."""
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def report(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done)

    return bar, report


def register(app: typer.Typer) -> None:
    @app.command("eval", epilog=EPILOG)
    def eval_command(
        target: Annotated[
            str,
            typer.Argument(
                help="A run dir (uses RUN_DIR/final and its recipe's formatting), a model "
                "folder or checkpoint, a .gguf file, a hub id, or "
                "embedded:smollm2-135m-instruct.",
                show_default=False,
            ),
        ],
        data: Annotated[
            str | None,
            typer.Option(
                "--data",
                help="Data file (jsonl/json/csv/tsv/parquet). Default: the run's data.eval.",
            ),
        ] = None,
        fmt: Annotated[
            FormatOpt | None,
            typer.Option(
                "--format", help="Row format. Default: the recipe's, else prompt-completion."
            ),  # fmt: skip
        ] = None,
        field: Annotated[
            list[str] | None,
            typer.Option(
                "--field",
                help="FIELD=COLUMN, repeatable: e.g. prompt=question, answer=label, "
                "choices=options.",
            ),
        ] = None,
        kind: Annotated[
            list[Kind] | None,
            typer.Option(
                "--kind",
                help="What to measure, repeatable. Default: loss, plus generate when rows "
                "have an answer (choice when they have choices).",
            ),
        ] = None,
        max_new_tokens: Annotated[
            int | None, typer.Option("--max-new-tokens", min=1, help="Default 64.")
        ] = None,
        stop: Annotated[
            list[str] | None,
            typer.Option("--stop", help="Stop string (repeatable); the answer is cut before it."),
        ] = None,
        scorer: Annotated[
            ScorerOpt | None,
            typer.Option(
                "--scorer",
                help="exact (normalised text, default), numeric (`#### N` or the last "
                "number), regex (--regex's first group).",
            ),
        ] = None,
        regex: Annotated[
            str | None, typer.Option("--regex", help="Pattern for --scorer regex.")
        ] = None,
        choice_score: Annotated[
            ChoiceScore | None,
            typer.Option(
                "--choice-score",
                help="Multiple choice: sum (default) or mean (length-normalised) log-likelihood.",
            ),
        ] = None,
        limit: Annotated[
            int | None, typer.Option("--limit", min=1, help="Only the first N rows.")
        ] = None,
        batch_size: Annotated[
            int | None, typer.Option("--batch-size", min=1, help="Rows per batch (default 8).")
        ] = None,
        json_out: Annotated[
            bool, typer.Option("--json", help="Print the result as JSON on stdout.")
        ] = False,
        out: Annotated[
            Path | None,
            typer.Option(
                "--out",
                help="Folder for predictions.jsonl and result.json. Default: RUN_DIR/eval "
                "for a run, else eval-NAME next to the model.",
            ),
        ] = None,
        device: Annotated[Device, typer.Option("--device")] = Device.auto,
    ) -> None:
        """Evaluate a model: loss and perplexity, generation accuracy, multiple choice."""
        from grass_cli.cli import _guard

        def body() -> dict[str, Any]:
            tgt = resolve_target(target)
            cfg = build_config(
                tgt.recipe,
                {
                    "data": data,
                    "format": fmt.value if fmt else None,
                    "fields": parse_fields(field) if field else None,
                    "kind": [k.value for k in kind] if kind else None,
                    "max_new_tokens": max_new_tokens,
                    "stop": stop or None,
                    "scorer": scorer.value if scorer else None,
                    "regex": regex,
                    "choice_score": choice_score.value if choice_score else None,
                    "limit": limit,
                    "batch_size": batch_size,
                },
            )
            data_cfg = tgt.recipe.data if tgt.recipe is not None else None
            if cfg.data is None and (data_cfg is None or data_cfg.eval is None):
                raise GrassError(
                    "no data to evaluate on",
                    where="--data",
                    hint="pass --data FILE (a run's recipe with data.eval supplies a default)",
                )
            from grass_cli.data import load_rows

            # Check the data file before minutes of model loading.
            load_rows(cfg.data or data_cfg.eval, 1)  # type: ignore[union-attr]

            from grass_cli.evaluate import pick_device, run_eval
            from grass_cli.models import load_model_and_tokenizer

            dev = pick_device(device.value)
            model, tokenizer, _ = load_model_and_tokenizer(tgt.model)
            model.to(dev)
            autocast = tgt.recipe.training.autocast if tgt.recipe is not None else "none"
            bar, report = _progress_reporter(sys.stderr.isatty() and not json_out)
            try:
                if bar is not None:
                    bar.start()
                return run_eval(
                    model,
                    tokenizer,
                    cfg,
                    data_cfg,
                    dev,
                    out if out is not None else tgt.out_dir,
                    autocast=autocast,
                    model_name=tgt.label,
                    progress=report,
                )
            finally:
                if bar is not None:
                    bar.stop()

        result = _guard(body)
        if json_out:
            sys.stdout.write(json.dumps(result) + "\n")
            return
        from rich.console import Console

        Console(file=sys.stdout).print(render_result(result, result.get("model", target)))
