"""`grass eval`: loss / perplexity, generation accuracy and multiple-choice accuracy.

Thin: the options become an `EvalConfig` on top of the target's recipe, then
`grass_cli.eval_target` resolves the target and evaluates it; this module prints
the result as a table or JSON and draws a progress bar on a terminal.
Nothing heavy is imported at module level (`grass --help` imports this module).
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from grass_cli.commands.options import (
    Device,
    DeviceOption,
    FormatOption,
    batch_size_option,
    choice_value,
    data_option,
    fields_option,
    json_option,
    out_option,
    parse_fields,
    print_json,
    stdout_console,
    target_argument,
)


class Kind(str, Enum):
    """`--kind`: what to measure (EvalConfig.kind)."""

    loss = "loss"
    generate = "generate"
    choice = "choice"


class ScorerOpt(str, Enum):
    """`--scorer`: how a generated answer is compared with the gold one."""

    exact = "exact"
    numeric = "numeric"
    regex = "regex"


class ChoiceScore(str, Enum):
    """`--choice-score`: how a choice's token log-likelihoods add up."""

    sum = "sum"
    mean = "mean"


EPILOG = (
    "Examples:\n\n"
    "  grass eval embedded:smollm2-135m-instruct --data data/quickstart/test.jsonl "
    "--scorer numeric\n\n"
    "  grass eval runs/quickstart --data data/quickstart/test.jsonl --limit 200 --json\n\n"
    "  grass eval ./my-model --data gsm8k.jsonl --field prompt=question --scorer numeric "
    "--max-new-tokens 256\n\n"
    "  grass eval ./my-model --data mc.jsonl --kind choice\n\n"
    "  grass eval runs/quickstart --harness hellaswag,arc_easy --limit 200\n\n"
    "  grass eval runs/quickstart --harness my_task --harness-include my_tasks/"
)

# ---------------------------------------------------------------------- the options

TargetArg = Annotated[
    str,
    target_argument(
        "A run dir (uses RUN_DIR/final and its recipe's formatting), a model "
        "folder or checkpoint, a .gguf file, a hub id, or "
        "embedded:smollm2-135m-instruct."
    ),
]
DataOpt = Annotated[
    str | None,
    data_option(
        "A data file (jsonl/json/csv/tsv/parquet), a folder saved by datasets or a hub "
        "dataset id. Default: the run's data.eval."
    ),
]
SplitOpt = Annotated[
    str | None,
    typer.Option(
        "--split", help="Split of a folder or hub dataset (test, test[:200]). Default: train."
    ),
]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", help="Configuration (subset) of a hub dataset, e.g. main.")
]
FieldOpt = Annotated[
    list[str] | None,
    fields_option("FIELD=COLUMN, repeatable: e.g. prompt=question, answer=label, choices=options."),
]
KindOpt = Annotated[
    list[Kind] | None,
    typer.Option(
        "--kind",
        help="What to measure, repeatable. Default: loss, plus generate when rows "
        "have an answer (choice when they have choices).",
    ),
]
MaxNewTokensOpt = Annotated[int | None, typer.Option("--max-new-tokens", min=1, help="Default 64.")]
StopOpt = Annotated[
    list[str] | None,
    typer.Option("--stop", help="Stop string (repeatable); the answer is cut before it."),
]
ScorerOption = Annotated[
    ScorerOpt | None,
    typer.Option(
        "--scorer",
        help="exact (normalised text, default), numeric (`#### N` or the last "
        "number), regex (--regex's first group).",
    ),
]
RegexOpt = Annotated[str | None, typer.Option("--regex", help="Pattern for --scorer regex.")]
ChoiceScoreOpt = Annotated[
    ChoiceScore | None,
    typer.Option(
        "--choice-score",
        help="Multiple choice: sum (default) or mean (length-normalised) log-likelihood.",
    ),
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N rows.")]
BatchSizeOpt = Annotated[int | None, batch_size_option("Rows per batch (default 8).")]
JsonOpt = Annotated[bool, json_option("Print the result as JSON on stdout.")]
HarnessOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--harness",
        help="Score with EleutherAI's lm-evaluation-harness instead: task names, "
        "comma-separated or repeated (hellaswag,arc_easy). Needs the \\[harness] extra.",
    ),
]
HarnessIncludeOpt = Annotated[
    Path | None,
    typer.Option("--harness-include", help="A folder of your own harness task YAML files."),
]
FewshotOpt = Annotated[
    int | None,
    typer.Option("--num-fewshot", min=0, help="--harness: examples in each prompt (task default)."),
]
HarnessChatOpt = Annotated[
    bool,
    typer.Option(
        "--harness-chat-template",
        help="--harness: wrap each prompt in the model's chat template (default: plain text, "
        "as leaderboards score).",
    ),
]
OutOpt = Annotated[
    Path | None,
    out_option(
        "Folder for predictions.jsonl and result.json. Default: RUN_DIR/eval "
        "for a run, else eval-NAME next to the model."
    ),
]

# ---------------------------------------------------------------------- the command


def eval_command(
    target: TargetArg,
    data: DataOpt = None,
    split: SplitOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOption = None,
    field: FieldOpt = None,
    kind: KindOpt = None,
    max_new_tokens: MaxNewTokensOpt = None,
    stop: StopOpt = None,
    scorer: ScorerOption = None,
    regex: RegexOpt = None,
    choice_score: ChoiceScoreOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = None,
    json_out: JsonOpt = False,
    out: OutOpt = None,
    device: DeviceOption = Device.auto,
    harness: HarnessOpt = None,
    harness_include: HarnessIncludeOpt = None,
    num_fewshot: FewshotOpt = None,
    harness_chat_template: HarnessChatOpt = False,
) -> None:
    """Evaluate a model: loss and perplexity, generation accuracy, multiple choice, or
    lm-evaluation-harness tasks."""
    from grass_cli.cli import _guard
    from grass_cli.eval_target import build_config, evaluate_target, resolve_target

    if harness:
        tasks = [t.strip() for arg in harness for t in arg.split(",") if t.strip()]
        own = {"--data": data, "--kind": kind, "--field": field, "--scorer": scorer}
        given = [name for name, value in own.items() if value]
        if sys.stderr.isatty() and not json_out:  # (the harness's own bars are kept quiet)
            sys.stderr.write(f"lm-evaluation-harness: {', '.join(tasks)} (this can take a while)\n")
        result = _guard(lambda: _harness(target, tasks, given, harness_include, device.value,
                                         out, limit, num_fewshot, batch_size,
                                         harness_chat_template))  # fmt: skip
        if json_out:
            print_json(result)
        else:
            stdout_console().print(render_harness(result))
        return

    def body() -> dict[str, Any]:
        tgt = resolve_target(target)
        options = {
            "data": data,
            "split": split,
            "config": config,
            "format": choice_value(fmt),
            "fields": parse_fields(field) if field else None,
            "kind": [k.value for k in kind] if kind else None,
            "max_new_tokens": max_new_tokens,
            "stop": stop or None,
            "scorer": choice_value(scorer),
            "regex": regex,
            "choice_score": choice_value(choice_score),
            "limit": limit,
            "batch_size": batch_size,
        }
        cfg = build_config(tgt.recipe, options)
        bar, report = _progress_reporter(sys.stderr.isatty() and not json_out)
        try:
            return evaluate_target(tgt, cfg, device.value, out, progress=report)
        finally:
            if bar is not None:
                bar.stop()

    result = _guard(body)
    if json_out:
        print_json(result)
        return
    stdout_console().print(render_result(result, result.get("model", target)))


def _harness(
    target: str,
    tasks: list[str],
    given: list[str],
    include: Path | None,
    device: str,
    out: Path | None,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int | None,
    chat_template: bool,
) -> dict[str, Any]:
    from grass_cli.errors import GrassError
    from grass_cli.eval_target import evaluate_harness, resolve_target

    if given:
        raise GrassError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} grass eval's own; "
            "harness tasks read their own data and score themselves",
            where="--harness",
            hint="run the two separately",
        )
    if not tasks:
        raise GrassError("no task names", where="--harness", hint="e.g. --harness hellaswag")
    return evaluate_harness(
        resolve_target(target), tasks, include, device, out, limit=limit,
        num_fewshot=num_fewshot, batch_size=batch_size, chat_template=chat_template,
    )  # fmt: skip


def render_harness(result: dict[str, Any]) -> Any:
    """One row per task and metric, its value and standard error."""
    from rich.table import Table

    table = Table(title=f"lm-evaluation-harness: {result['model']}")
    for col in ("task", "metric", "value", "± stderr", "items"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metrics in result["tasks"].items():
        n = result["n_samples"].get(task)
        for name, value in metrics.items():
            if name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{name}_stderr")
            table.add_row(
                task, name, f"{value:.4f}",
                f"{err:.4f}" if isinstance(err, (int, float)) else "-",
                str(n) if n is not None else "-",
            )  # fmt: skip
    return table


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EPILOG)(eval_command)


# ---------------------------------------------------------------------- the output


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
    """A transient Rich progress bar on stderr, or nothing when stderr is not a terminal.

    The bar starts at the first report, once the model has loaded and evaluation
    begins, so it never sits empty over the loading; the caller stops it."""
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
        if not tasks:
            bar.start()
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done)

    return bar, report
