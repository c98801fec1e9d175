"""`grass inspect-importance`: per-block MGN on some data without training, or the
importance history of a finished run.

Probing goes through `grass_cli.probing.probe`, the very code `grass train` runs in
its probing phase (same block map, tracker hooks, loss normalisation and batches
from `BatchIterator`), so what this command shows is what GRASS would sample
from. Heavy modules are imported inside the functions: `grass --help` imports this
module.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from grass_cli.commands.eval import Device, FormatOpt, parse_fields
from grass_cli.errors import GrassError

if TYPE_CHECKING:
    import torch

    from grass_cli.recipe import DataConfig, ModelConfig

DEFAULT_BATCHES = 8
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEED = 42
BAR_WIDTH = 24
_EIGHTHS = " ▏▎▍▌▋▊▉"


@dataclass
class Profile:
    """One dataset's importance profile: the probing MGN of every block."""

    data: str
    mgn: list[float | None]
    rank: list[int]  # rank of each block, 1 = highest MGN
    ranking: list[int]  # block indices, most important first (as probe_done's `ranking`)
    losses: list[float] = field(default_factory=list)  # loss of each probing step
    rows: int = 0


def ranks(values: list[float | None]) -> tuple[list[int], list[int]]:
    """(rank per block with 1 = largest, block indices by decreasing value); unknown last."""
    key = [-v if v is not None and math.isfinite(v) else math.inf for v in values]
    ranking = sorted(range(len(values)), key=lambda i: (key[i], i))
    rank = [0] * len(values)
    for r, i in enumerate(ranking, 1):
        rank[i] = r
    return rank, ranking


def probe_profile(
    model: torch.nn.Module,
    tokenizer: Any,
    data_cfg: DataConfig,
    path: str,
    batches: int,
    batch_size: int,
    device: torch.device,
    seed: int = DEFAULT_SEED,
    autocast: str = "none",
    blocks_attr: str | None = None,
) -> Profile:
    """Probe every block's MGN over `batches` steps of `batch_size` rows of `path`.

    Rows are formatted, masked and batched as training does (a seeded shuffle, so
    the probed rows are a sample of the whole file, the same one each time). The
    model is not updated and its parameters end as they started.
    """
    from grass_cli.blocks import build_block_map
    from grass_cli.data import BatchIterator, load_rows, tokenize_rows
    from grass_cli.importance import ImportanceTracker
    from grass_cli.probing import probe

    dc = data_cfg.model_copy(update={"train": path})
    data = tokenize_rows(load_rows(path, dc.limit), dc, tokenizer, path)
    block_map = build_block_map(model, blocks_attr)
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    for group in block_map.blocks:  # hooks can only be registered on grad-requiring tensors
        group.set_trainable(True)
    tracker = ImportanceTracker(block_map.blocks, alpha=1.0, device=device)
    was_training = model.training
    model.train()  # as in training's probing phase
    try:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        it = BatchIterator(data, batch_size, pad_id, seed=seed, shuffle=True)
        steps = ([next(it)] for _ in range(batches))
        losses = list(probe(model, block_map, tracker, steps, device, autocast))
    finally:
        tracker.remove_hooks()
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(trainable[id(p)])
    mgn = tracker.values()
    rank, ranking = ranks(mgn)
    return Profile(data=path, mgn=mgn, rank=rank, ranking=ranking, losses=losses, rows=len(data))


def spearman(a: list[float | None], b: list[float | None]) -> dict[str, float]:
    """Spearman rank correlation of two profiles (blocks known in both)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        raise GrassError(
            "--compare needs scipy for the rank correlation",
            where="--compare",
            hint="pip install scipy",
        ) from None

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if len(pairs) < 3:
        return {"rho": math.nan, "p": math.nan}
    rho, p = spearmanr([x for x, _ in pairs], [y for _, y in pairs])
    return {"rho": float(rho), "p": float(p)}


# --------------------------------------------------------------------------- display


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


# ------------------------------------------------------------------------------ modes


def run_history(run_dir: Path, out: Path) -> dict[str, Any]:
    """Importance history of a finished (or running) run, from its metrics.jsonl."""
    from grass_cli.plots import (
        active_counts,
        importance_history,
        load_metrics,
        plot_active_counts,
        plot_importance_heatmap,
    )

    events = load_metrics(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = next((e for e in events if e.get("event") == "start"), {})
    done = next((e for e in reversed(events) if e.get("event") == "probe_done"), {})
    counts = active_counts(events)
    steps, history = importance_history(events)
    if not steps:
        raise GrassError(
            "the run has no training step with importance yet",
            where=str(run_dir / "metrics.jsonl"),
            hint="inspect a run that has taken at least one step",
        )
    n = len(counts)
    probe_mgn = list(done.get("importance") or [None] * n)
    result = {
        "run": str(run_dir),
        "model": start.get("model"),
        "strategy": start.get("strategy"),
        "num_blocks": n,
        "steps": len(steps),
        "active_counts": counts,
        "probe": probe_mgn,
        "last_importance": history[-1],
        "last_step": steps[-1],
    }
    result["heatmap"] = str(plot_importance_heatmap(events, out / "importance_heatmap.png"))
    result["counts_plot"] = str(plot_active_counts(events, out / "active_counts.png"))
    (out / "importance.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _label(path: str) -> str:
    """A short legend label that still tells data/a/train.jsonl from data/b/train.jsonl."""
    return "/".join(Path(path).parts[-2:])


def _setup(target: str, data: str | None) -> tuple[ModelConfig, DataConfig, Any, str]:
    """Model and data formatting from a recipe YAML, or a model with default formatting."""
    from grass_cli.recipe import DataConfig, ModelConfig, load_recipe

    p = Path(target).expanduser()
    if p.suffix in (".yaml", ".yml"):
        recipe = load_recipe(p)
        model = recipe.model.model_copy(update={"gradient_checkpointing": False})
        return model, recipe.data, recipe, p.stem
    if data is None:
        raise GrassError(
            "--data is required when inspecting a model (a recipe supplies data.train)",
            where="--data",
        )
    name = target.rstrip("/").split("/")[-1].split(":")[-1].removesuffix(".gguf") or "model"
    return ModelConfig(path=target), DataConfig(train=data), None, name


def probe_command(
    target: str,
    data: str | None,
    compare: str | None,
    batches: int,
    batch_size: int | None,
    out: Path | None,
    device_name: str,
    fields: dict[str, str],
    fmt: str | None,
) -> dict[str, Any]:
    """Probe one dataset (or two), write importance.json and importance.png."""
    from grass_cli.data import load_rows

    model_cfg, data_cfg, recipe, name = _setup(target, data)
    updates: dict[str, Any] = {}
    if fmt is not None:
        updates["format"] = fmt
        updates["fields"] = {}
    if fields:
        updates["fields"] = {**(updates.get("fields", data_cfg.fields)), **fields}
    data_cfg = data_cfg.model_copy(update=updates)
    path_a = data or data_cfg.train
    for path in (path_a, compare):
        if path is not None:
            load_rows(path, 1)  # a bad path fails before the model loads
    if compare is not None:
        spearman([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])  # so does a missing scipy

    from grass_cli.evaluate import pick_device
    from grass_cli.models import load_model_and_tokenizer

    device = pick_device(device_name)
    model, tokenizer, _ = load_model_and_tokenizer(model_cfg)
    model.to(device)
    bs = batch_size or (recipe.training.micro_batch_size if recipe else DEFAULT_BATCH_SIZE)
    seed = recipe.training.seed if recipe else DEFAULT_SEED
    autocast = recipe.training.autocast if recipe else "none"
    kw = dict(
        batches=batches,
        batch_size=bs,
        device=device,
        seed=seed,
        autocast=autocast,
        blocks_attr=model_cfg.blocks_attr,
    )
    a = probe_profile(model, tokenizer, data_cfg, path_a, **kw)  # type: ignore[arg-type]
    result: dict[str, Any] = {
        "model": model_cfg.path,
        "data": a.data,
        "batches": batches,
        "batch_size": bs,
        "seed": seed,
        "mgn": a.mgn,
        "rank": a.rank,
        "ranking": a.ranking,
        "probe_losses": a.losses,
    }
    b = None
    if compare is not None:
        b = probe_profile(model, tokenizer, data_cfg, compare, **kw)  # type: ignore[arg-type]
        result["compare"] = {k: v for k, v in asdict(b).items() if k != "rows"}
        result["compare"]["probe_losses"] = result["compare"].pop("losses")
        result["spearman"] = spearman(a.mgn, b.mgn)

    from grass_cli.plots import plot_importance_bars

    folder = out if out is not None else Path(f"inspect-{name}")
    folder.mkdir(parents=True, exist_ok=True)
    title = f"MGN per block: {model_cfg.path}"
    plot = plot_importance_bars(
        [math.nan if v is None else v for v in a.mgn],
        folder / "importance.png",
        title,
        compare=None if b is None else [math.nan if v is None else v for v in b.mgn],
        labels=(_label(a.data), _label(b.data) if b else "B"),
    )
    result["plot"] = str(plot)
    (folder / "importance.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def register(app: typer.Typer) -> None:
    @app.command(
        "inspect-importance",
        epilog="Examples:\n\n  grass inspect-importance recipes/quickstart.yaml\n\n"
        "  grass inspect-importance embedded:smollm2-135m-instruct --data a.jsonl "
        "--compare b.jsonl\n\n  grass inspect-importance runs/quickstart",
    )
    def inspect_importance(
        target: Annotated[
            str,
            typer.Argument(
                help="A recipe YAML (its model and data formatting), a model (folder, .gguf, "
                "hub id, embedded:...), or a run dir (its importance history).",
                show_default=False,
            ),
        ],
        data: Annotated[
            str | None,
            typer.Option("--data", help="Data to probe on. Default: the recipe's data.train."),
        ] = None,
        compare: Annotated[
            str | None,
            typer.Option("--compare", help="A second data file: both profiles side by side."),
        ] = None,
        batches: Annotated[
            int, typer.Option("--batches", min=1, help="Probing steps (one batch each).")
        ] = DEFAULT_BATCHES,
        batch_size: Annotated[
            int | None,
            typer.Option(
                "--batch-size", min=1, help="Rows per batch. Default: the recipe's, else 8."
            ),
        ] = None,
        fmt: Annotated[
            FormatOpt | None,
            typer.Option(
                "--format", help="Row format. Default: the recipe's, else prompt-completion."
            ),  # fmt: skip
        ] = None,
        field_: Annotated[
            list[str] | None,
            typer.Option("--field", help="FIELD=COLUMN, repeatable (e.g. prompt=question)."),
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option(
                "--out",
                help="Output folder. Default: ./inspect-NAME, or RUN_DIR/importance for a run.",
            ),
        ] = None,
        json_out: Annotated[
            bool, typer.Option("--json", help="Print importance.json on stdout.")
        ] = False,
        device: Annotated[Device, typer.Option("--device")] = Device.auto,
    ) -> None:
        """Per-block importance (MGN) on some data without training, or a run's history."""
        from grass_cli.cli import _guard

        def body() -> tuple[dict[str, Any], Any]:
            p = Path(target).expanduser()
            if p.is_dir() and (p / "metrics.jsonl").is_file():
                result = run_history(p, out if out is not None else p / "importance")
                return result, history_table
            result = probe_command(
                target,
                data,
                compare,
                batches,
                batch_size,
                out,
                device.value,
                parse_fields(field_ or []),
                fmt.value if fmt else None,
            )
            return result, profile_table

        result, render = _guard(body)
        if json_out:
            sys.stdout.write(json.dumps(result) + "\n")
            return
        from rich.console import Console

        console = Console(file=sys.stdout)
        console.print(render(result))
        files = [result[k] for k in ("plot", "heatmap", "counts_plot") if k in result]
        console.print("wrote " + ", ".join(files), soft_wrap=True)
