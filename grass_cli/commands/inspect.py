"""`grass inspect-importance`: per-block MGN on some data without training, or the
importance history of a finished run.

Thin: the options become a `ProbeRequest` for `grass_cli.importance_report`, which
probes (with the code `grass train` probes with) or reads the run's history and
writes importance.json and plots; this module prints the result as a table with
bars, or as JSON. Heavy modules are imported inside the functions: `grass --help`
imports this module.
"""

from __future__ import annotations

import math
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
from grass_cli.importance_report import DEFAULT_BATCHES, probe_profile, ranks

__all__ = [
    "bar",
    "format_mgn",
    "history_table",
    "inspect_importance",
    "probe_profile",  # re-exported: it lived here before grass_cli.importance_report
    "profile_table",
    "ranks",  # re-exported, as probe_profile
    "register",
]

BAR_WIDTH = 24
_EIGHTHS = " ▏▎▍▌▋▊▉"

EPILOG = (
    "Examples:\n\n  grass inspect-importance recipes/quickstart.yaml\n\n"
    "  grass inspect-importance embedded:smollm2-135m-instruct --data a.jsonl "
    "--compare b.jsonl\n\n  grass inspect-importance runs/quickstart"
)

# ---------------------------------------------------------------------- the options

TargetArg = Annotated[
    str,
    target_argument(
        "A recipe YAML (its model and data formatting), a model (folder, .gguf, "
        "hub id, embedded:...), or a run dir (its importance history)."
    ),
]
DataOpt = Annotated[
    str | None,
    data_option(
        "Data to probe on: a file, a folder saved by datasets or a hub dataset id. "
        "Default: the recipe's training data (a mixture, a stream: as it trains)."
    ),
]
CompareOpt = Annotated[
    str | None,
    typer.Option("--compare", help="Second data (as --data): both profiles side by side."),
]
BatchesOpt = Annotated[
    int, typer.Option("--batches", min=1, help="Probing steps (one batch each).")
]
BatchSizeOpt = Annotated[
    int | None, batch_size_option("Rows per batch. Default: the recipe's, else 8.")
]
FieldOpt = Annotated[
    list[str] | None, fields_option("FIELD=COLUMN, repeatable (e.g. prompt=question).")
]
OutOpt = Annotated[
    Path | None,
    out_option("Output folder. Default: ./inspect-NAME, or RUN_DIR/importance for a run."),
]
JsonOpt = Annotated[bool, json_option("Print importance.json on stdout.")]

# ---------------------------------------------------------------------- the command


def inspect_importance(
    target: TargetArg,
    data: DataOpt = None,
    compare: CompareOpt = None,
    batches: BatchesOpt = DEFAULT_BATCHES,
    batch_size: BatchSizeOpt = None,
    fmt: FormatOption = None,
    field_: FieldOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    device: DeviceOption = Device.auto,
) -> None:
    """Per-block importance (MGN) on some data without training, or a run's history."""
    from grass_cli.cli import _guard
    from grass_cli.importance_report import (
        ProbeRequest,
        is_run_dir,
        probe_importance,
        run_history,
    )

    def body() -> tuple[dict[str, Any], Any]:
        if is_run_dir(target):
            p = Path(target).expanduser()
            return run_history(p, out if out is not None else p / "importance"), history_table
        request = ProbeRequest(
            target=target,
            data=data,
            compare=compare,
            batches=batches,
            batch_size=batch_size,
            out=out,
            device=device.value,
            fields=parse_fields(field_),
            format=choice_value(fmt),
        )
        return probe_importance(request), profile_table

    result, render = _guard(body)
    if json_out:
        print_json(result)
        return
    console = stdout_console()
    console.print(render(result))
    files = [result[k] for k in ("plot", "heatmap", "counts_plot") if k in result]
    console.print("wrote " + ", ".join(files), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("inspect-importance", epilog=EPILOG)(inspect_importance)


# ---------------------------------------------------------------------- the output


def format_mgn(v: float | None) -> str:
    """How the table prints an MGN value: three significant digits (they are tiny)."""
    return "-" if v is None else f"{v:.3e}"


def bar(value: float | None, top: float, width: int = BAR_WIDTH) -> str:
    """A text bar, `value / top` of `width` cells, drawn in eighths of a cell."""
    if value is None or top <= 0 or not math.isfinite(value):
        return ""
    eighths = round(max(0.0, min(1.0, value / top)) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[part] if part else "")


def _top(values: list[float | None]) -> float:
    return max((v for v in values if v is not None), default=0.0)


def profile_table(result: dict[str, Any]) -> Any:
    """Rich table of importance.json's content: one row per block (pure, testable)."""
    from rich.table import Table

    a = result["mgn"]
    b = result.get("compare", {}).get("mgn")
    # Each profile's bars are scaled to its own largest MGN: GRASS samples from
    # m / mean(m), so a profile's shape matters, not its overall size (which
    # differs between datasets with different loss and tokens per row).
    top_a, top_b = _top(a), _top(b or [])
    width = BAR_WIDTH if b is None else BAR_WIDTH // 2  # two profiles fit 80 columns
    table = Table(title=f"MGN per block  {result['model']}", title_justify="left")
    table.add_column("block", justify="right", min_width=5)
    table.add_column("MGN A" if b else "MGN", justify="right", min_width=9)
    table.add_column("rank", justify="right", min_width=4)
    table.add_column("", style="cyan", no_wrap=True)
    if b is not None:
        table.add_column("MGN B", justify="right", min_width=9)
        table.add_column("rank", justify="right", min_width=4)
        table.add_column("", style="magenta", no_wrap=True)
    for i, v in enumerate(a):
        row = [str(i), format_mgn(v), str(result["rank"][i]), bar(v, top_a, width)]
        if b is not None:
            rb = result["compare"]["rank"][i]
            row += [format_mgn(b[i]), str(rb), bar(b[i], top_b, width)]
        table.add_row(*row)
    if b is not None:
        s = result["spearman"]
        table.caption = (
            f"A: {result['data']}\nB: {result['compare']['data']}\n"
            f"Spearman rank correlation {s['rho']:.3f} (p = {s['p']:.2g})"
        )
        table.caption_justify = "left"
    return table


def history_table(result: dict[str, Any]) -> Any:
    """Rich table of a run's importance history: activations and last MGN per block."""
    from rich.table import Table

    counts, last, first = result["active_counts"], result["last_importance"], result["probe"]
    table = Table(
        title=f"Importance history  {result['run']}  ({result['strategy']}, "
        f"{result['steps']} steps)",
        title_justify="left",
    )
    table.add_column("block", justify="right", min_width=5)
    table.add_column("trained", justify="right", min_width=7)  # steps the block was active
    table.add_column("", style="green", no_wrap=True)
    table.add_column("probe MGN", justify="right", min_width=9)
    table.add_column("last MGN", justify="right", min_width=9)
    table.add_column("", style="cyan", no_wrap=True)
    top_c, top_m = max(counts, default=0), _top(last)
    half = BAR_WIDTH // 2  # two bars fit 80 columns
    for i, c in enumerate(counts):
        p = first[i] if i < len(first) else None
        m = last[i] if i < len(last) else None
        table.add_row(
            str(i), str(c), bar(c, top_c, half), format_mgn(p), format_mgn(m), bar(m, top_m, half)
        )
    return table
