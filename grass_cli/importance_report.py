"""Per-block importance without training: probe a model on a data file (or two, to
compare), or read a run's importance history; write importance.json and plots.

The library side of `grass inspect-importance` (the command parses and prints).
Probing goes through `grass_cli.sampling.probing.probe`, the very code `grass train` runs in
its probing phase (same block map, tracker hooks, loss normalisation and batches
from `BatchIterator`), so what this reports is what GRASS would sample from.
Heavy modules are imported inside the functions: `grass --help` imports the
command, which imports this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grass_cli.errors import GrassError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

    from grass_cli.recipe import DataConfig, ModelConfig, Recipe

DEFAULT_BATCHES = 8
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEED = 42


@dataclass
class Profile:
    """One dataset's importance profile: the probing MGN of every block."""

    data: str
    mgn: list[float | None]
    rank: list[int]  # rank of each block, 1 = highest MGN
    ranking: list[int]  # block indices, most important first (as probe_done's `ranking`)
    losses: list[float] = field(default_factory=list)  # loss of each probing step
    rows: int = 0


@dataclass(frozen=True)
class ProbeRequest:
    """What to probe: `grass inspect-importance`'s options, already parsed."""

    target: str  # a recipe YAML, or a model (folder, .gguf, hub id, embedded:...)
    data: str | None = None  # None: the recipe's data.train
    compare: str | None = None  # a second data file, probed with the same settings
    batches: int = DEFAULT_BATCHES
    batch_size: int | None = None  # None: the recipe's micro_batch_size, else 8
    out: Path | None = None  # None: ./inspect-NAME
    device: str = "auto"
    fields: dict[str, str] = field(default_factory=dict)  # added to the recipe's
    format: str | None = None  # replaces the recipe's format (and its fields)


def ranks(values: list[float | None]) -> tuple[list[int], list[int]]:
    """(rank per block with 1 = largest, block indices by decreasing value); unknown last."""
    from grass_cli.sampling.importance import ranking as by_importance

    ranking = by_importance(values)
    rank = [0] * len(values)
    for r, i in enumerate(ranking, 1):
        rank[i] = r
    return rank, ranking


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


# ------------------------------------------------------------------------- probing


def _batches(
    data_cfg: DataConfig, path: str | None, tokenizer: Any, batch_size: int, seed: int
) -> tuple[Iterator[dict[str, torch.Tensor]], int | None, str]:
    """The probe's batches, row count (None: a stream) and label, as training builds them.

    `path` is one source (a file, a saved folder, a hub dataset); None is the
    recipe's own training data whatever its form: a mixture, rows held out by
    data.eval left out, or a stream (data.streaming: its first rows)."""
    from grass_cli.data import BatchIterator
    from grass_cli.data.build import tokenized_source, train_specs
    from grass_cli.data.feed import training_batches
    from grass_cli.data.sources import as_spec

    if path is not None:
        dc = data_cfg.model_copy(update={"train": path})
        data = tokenized_source(path, "--data", dc, tokenizer, dc.limit)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return BatchIterator(data, batch_size, pad_id, seed=seed, shuffle=True), len(data), path
    label = " + ".join(as_spec(v).path for _, v in train_specs(data_cfg))
    batches, data, _ = training_batches(data_cfg, tokenizer, batch_size, seed, with_eval=False)
    return batches, (len(data) if data is not None else None), label


def probe_profile(
    model: torch.nn.Module,
    tokenizer: Any,
    data_cfg: DataConfig,
    path: str | None,
    batches: int,
    batch_size: int,
    device: torch.device,
    seed: int = DEFAULT_SEED,
    autocast: str = "none",
    blocks_attr: str | None = None,
) -> Profile:
    """Probe every block's MGN over `batches` steps of `batch_size` rows of `path` (a
    file, saved folder or hub dataset; None: the recipe's training data).

    Rows are formatted, masked and batched as training does (a seeded shuffle, so
    the probed rows are a sample of the whole data, the same one each time). The
    model is not updated and its parameters end as they started.
    """
    from grass_cli.sampling.blocks import build_block_map
    from grass_cli.sampling.importance import ImportanceTracker
    from grass_cli.sampling.probing import probe_blocks

    it, n_rows, label = _batches(data_cfg, path, tokenizer, batch_size, seed)
    block_map = build_block_map(model, blocks_attr)
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    for group in block_map.blocks:  # hooks can only be registered on grad-requiring tensors
        group.set_trainable(True)
    tracker = ImportanceTracker(block_map.blocks, alpha=1.0, device=device)
    was_training = model.training
    model.train()  # as in training's probing phase
    try:
        steps = ([next(it)] for _ in range(batches))
        losses = list(probe_blocks(model, block_map, tracker, steps, device, autocast))
    finally:
        tracker.remove_hooks()
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(trainable[id(p)])
    mgn = tracker.values()
    rank, ranking = ranks(mgn)
    return Profile(data=label, mgn=mgn, rank=rank, ranking=ranking, losses=losses, rows=n_rows or 0)


@dataclass
class _Setup:
    """A probe's model and data formatting, and the recipe they came from (if any)."""

    model: ModelConfig
    data: DataConfig
    recipe: Recipe | None
    name: str  # for the default output folder, inspect-NAME


def _setup(request: ProbeRequest) -> _Setup:
    """Model and data formatting from a recipe YAML, or a model with default formatting;
    then --format and --field on top."""
    from grass_cli.recipe import DataConfig, ModelConfig, load_recipe

    target, p = request.target, Path(request.target).expanduser()
    if p.suffix in (".yaml", ".yml"):
        recipe = load_recipe(p)
        model = recipe.model.model_copy(update={"gradient_checkpointing": False})
        setup = _Setup(model, recipe.data, recipe, p.stem)
    elif request.data is None:
        raise GrassError(
            "--data is required when inspecting a model (a recipe supplies data.train)",
            where="--data",
        )
    else:
        name = target.rstrip("/").split("/")[-1].split(":")[-1].removesuffix(".gguf") or "model"
        setup = _Setup(ModelConfig(path=target), DataConfig(train=request.data), None, name)
    updates: dict[str, Any] = {}
    if request.format is not None:  # another format's fields mean nothing here
        updates["format"] = request.format
        updates["fields"] = {}
    if request.fields:
        updates["fields"] = {**(updates.get("fields", setup.data.fields)), **request.fields}
    setup.data = setup.data.model_copy(update=updates)
    return setup


def probe_importance(request: ProbeRequest) -> dict[str, Any]:
    """Probe one dataset (or two), write importance.json and importance.png; return
    importance.json's content."""
    from grass_cli.data.sources import resolve, survey

    setup = _setup(request)
    path_a = request.data  # None: the recipe's data.train, whatever its form
    for key, path in (("--data", path_a), ("--compare", request.compare)):
        if path is not None:
            survey(resolve(path, key))  # a bad path fails before the model loads
    if request.compare is not None:
        spearman([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])  # so does a missing scipy

    from grass_cli.evaluate import pick_device
    from grass_cli.models import load_model_and_tokenizer

    device = pick_device(request.device)
    model, tokenizer, _ = load_model_and_tokenizer(setup.model)
    model.to(device)
    recipe = setup.recipe
    # The same settings for both profiles, so they differ only by their data.
    settings: dict[str, Any] = dict(
        batches=request.batches,
        batch_size=request.batch_size
        or (recipe.training.micro_batch_size if recipe else DEFAULT_BATCH_SIZE),
        device=device,
        seed=recipe.training.seed if recipe else DEFAULT_SEED,
        autocast=recipe.training.autocast if recipe else "none",
        blocks_attr=setup.model.blocks_attr,
    )
    a = probe_profile(model, tokenizer, setup.data, path_a, **settings)
    b = None
    if request.compare is not None:
        b = probe_profile(model, tokenizer, setup.data, request.compare, **settings)
    folder = request.out if request.out is not None else Path(f"inspect-{setup.name}")
    return _write_profiles(folder, setup.model.path, a, b, settings)


def _write_profiles(
    folder: Path, model: str, a: Profile, b: Profile | None, settings: dict[str, Any]
) -> dict[str, Any]:
    """importance.json (profile A, and B with the rank correlation) and the bar chart;
    `settings` are `probe_profile`'s keyword arguments, recorded with the profiles."""
    from grass_cli.plots import plot_importance_bars

    result: dict[str, Any] = {
        "model": model,
        "data": a.data,
        "batches": settings["batches"],
        "batch_size": settings["batch_size"],
        "seed": settings["seed"],
        "mgn": a.mgn,
        "rank": a.rank,
        "ranking": a.ranking,
        "probe_losses": a.losses,
    }
    if b is not None:
        result["compare"] = {k: v for k, v in asdict(b).items() if k != "rows"}
        result["compare"]["probe_losses"] = result["compare"].pop("losses")
        result["spearman"] = spearman(a.mgn, b.mgn)
    folder.mkdir(parents=True, exist_ok=True)
    plot = plot_importance_bars(
        [math.nan if v is None else v for v in a.mgn],
        folder / "importance.png",
        f"MGN per block: {model}",
        compare=None if b is None else [math.nan if v is None else v for v in b.mgn],
        labels=(_label(a.data), _label(b.data) if b else "B"),
    )
    result["plot"] = str(plot)
    (folder / "importance.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _label(path: str) -> str:
    """A short legend label that still tells data/a/train.jsonl from data/b/train.jsonl
    (each source of a mixture, `a + b`, shortened alike)."""
    return " + ".join("/".join(Path(part).parts[-2:]) for part in path.split(" + "))


# ------------------------------------------------------------------------- history


def is_run_dir(target: str) -> bool:
    """A run's folder (engine/run_dir.py's rule, the one `--overwrite` and resume
    use), whose history is read instead of probing."""
    from grass_cli.engine.run_dir import is_run_dir as made_by_grass

    p = Path(target).expanduser()
    return p.is_dir() and made_by_grass(p)


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
    result = {
        "run": str(run_dir),
        "model": start.get("model"),
        "strategy": start.get("strategy"),
        "num_blocks": n,
        "steps": len(steps),
        "active_counts": counts,
        "probe": list(done.get("importance") or [None] * n),
        "last_importance": history[-1],
        "last_step": steps[-1],
    }
    result["heatmap"] = str(plot_importance_heatmap(events, out / "importance_heatmap.png"))
    result["counts_plot"] = str(plot_active_counts(events, out / "active_counts.png"))
    (out / "importance.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
