"""Pre-flight: everything checkable without loading the model, shared by `validate` and `train`.

A mistake found after a 7B model has loaded costs minutes; one found after the run
folder got its first file costs a confusing retry ("a different recipe"). So
before either, and without writing anything:

- the data files exist and parse (every row, with the file and line of a bad one),
  and hold the columns the data format needs;
- the model path resolves: a folder with config.json, a .gguf file, an embedded
  name, or a hub id in the local cache (or one the hub confirms, in seconds);
- the output folder and the offload folder can be written (checked on the
  nearest existing parent, without creating anything), and a new run may start
  in the output folder (grass/engine/run_dir.py's rules);
- each filesystem has room for what the run will write there: the final model,
  the checkpoints kept at once, and a disk offload store, estimated from the
  model's config (the planner's meta-device layout, no weights read).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from grass_cli.errors import GrassError
from grass_cli.recipe import Recipe


@dataclass
class Preflight:
    """What the checks found (for `grass validate` to show)."""

    params: int = 0
    weight_bytes: int = 4
    rows: dict[str, int | str] = field(default_factory=dict)  # str: "streamed"
    disk_needed: dict[str, int] = field(default_factory=dict)  # folder -> bytes


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return probe


def _check_folder(path: Path, key: str) -> None:
    probe = _nearest_existing(path)
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise GrassError(
            f"cannot write there ({probe} is not a writable folder)",
            where=f"{key}: {path}",
            hint=f"choose a writable folder for {key}",
        )


def check_data(recipe: Recipe, found: Preflight) -> None:
    """Every source parses and has its format's columns (files: every row; folders and
    cached hub datasets: their Arrow tables; a hub dataset not cached: that the hub has
    it, without downloading), and rows held out by data.eval leave some to train on."""
    from grass_cli.data import resolve_columns
    from grass_cli.data.build import held_out, source_config, train_specs
    from grass_cli.data.mixture import held_out_count
    from grass_cli.data.sources import resolve, survey
    from grass_cli.data.stream_sources import first_columns
    from grass_cli.evaluate.source import check_source, require_source

    cfg = recipe.data
    named = train_specs(cfg)
    held = held_out(cfg)
    if cfg.eval is not None and held is None:
        named.append(("data.eval", cfg.eval))  # type: ignore[arg-type]
    task = None if recipe.eval is None else require_source(recipe.eval, cfg)
    train_rows: int | None = 0
    for key, value in named:
        if key in found.rows:
            continue
        source = resolve(value, key)
        if cfg.streaming and key != "data.eval":  # opened and its first row read, not counted
            n, columns = None, first_columns(source)
            found.rows[key] = "streamed"
        else:
            n, columns = survey(source)
        if n is not None:
            found.rows[key] = n
        if key != "data.eval":  # (data.limit applies to each training source)
            used = n if n is None or cfg.limit is None else min(n, cfg.limit)
            train_rows = None if used is None or train_rows is None else train_rows + used
        if columns is not None:
            scfg = source_config(cfg, source.spec)
            resolve_columns(scfg.format, dict(scfg.fields), columns, source.name)
    if held is not None and train_rows:
        found.rows["data.eval"] = held_out_count(held, train_rows)
    elif held is not None and cfg.streaming:  # a count (the recipe refuses a share)
        found.rows["data.eval"] = int(held)
    if task is not None and "eval.data" not in found.rows:
        n = check_source(task)  # (it maps its own fields)
        found.rows["eval.data"] = n if n is not None else "not downloaded yet"


def check_extras(recipe: Recipe) -> None:
    """What the recipe asks of the installed packages: the attention kernel (and
    its device), W&B (and a login for online mode, and its folder), known before
    the model loads."""
    from grass_cli.attention import check_recipe

    check_recipe(recipe)
    if recipe.output.wandb is not None:
        from grass_cli.telemetry.wandb import check_wandb

        check_wandb(recipe.output.wandb)
        if recipe.output.wandb.dir:
            _check_folder(Path(recipe.output.wandb.dir), "output.wandb.dir")


def _disk_needs(recipe: Recipe, params: int, weight_bytes: int) -> dict[Path, int]:
    """Bytes the run writes per folder: the final model, the checkpoints alive at
    once (keep_last + the one being written), a disk offload store."""
    weights = params * weight_bytes
    state = params * (8 + (4 if weight_bytes < 4 else 0))  # AdamW moments (+ fp32 masters)
    out_dir = Path(recipe.output.dir)
    needs: dict[Path, int] = {out_dir: 0}
    if recipe.output.save_model:
        needs[out_dir] += weights
    ck = recipe.checkpoint
    if ck.interval or ck.at_end:
        alive = (ck.keep_last + 1) if ck.interval else 1
        needs[out_dir] += alive * (weights + state)
    opt = recipe.optimizer
    if opt.state_policy == "offload" and opt.offload.target == "disk":
        folder = Path(opt.offload.path) if opt.offload.path else out_dir / "offload"
        needs[folder] = needs.get(folder, 0) + state
    return needs


def check_disk(recipe: Recipe, found: Preflight) -> None:
    by_device: dict[int, tuple[Path, int]] = {}
    for folder, n in _disk_needs(recipe, found.params, found.weight_bytes).items():
        found.disk_needed[str(folder)] = n
        probe = _nearest_existing(folder)
        dev = probe.stat().st_dev
        first, total = by_device.get(dev, (probe, 0))
        by_device[dev] = (first, total + n)
    for probe, needed in by_device.values():
        free = shutil.disk_usage(probe).free
        if needed > free:
            raise GrassError(
                f"not enough disk space: the run writes about {needed / 1e9:.2f} GB there "
                f"(final model, checkpoints, offloaded state) and {free / 1e9:.2f} GB is free",
                where=str(probe),
                hint="free space, lower checkpoint.keep_last, set output.save_model: false, "
                "or point output.dir / optimizer.offload.path at a bigger disk",
            )


def preflight(
    recipe: Recipe, resume: str | None = None, overwrite: bool = False, run_dir: bool = True
) -> Preflight:
    """Every check that needs no model weights; raises the first GrassError found.
    `run_dir`: also apply the run folder's rules for a start with these flags."""
    from grass_cli.engine.run_dir import check_fresh_start, check_writable
    from grass_cli.planner.shape import build_layout, load_config

    found = Preflight()
    out = Path(recipe.output.dir)
    check_writable(out)
    if run_dir and resume is None:
        check_fresh_start(out, recipe, overwrite)
    opt = recipe.optimizer
    if opt.state_policy == "offload" and opt.offload.target == "disk" and opt.offload.path:
        _check_folder(Path(opt.offload.path), "optimizer.offload.path")
    check_extras(recipe)
    check_data(recipe, found)
    config, name = load_config(recipe)
    layout = build_layout(recipe, config, name)
    found.params, found.weight_bytes = layout.params, layout.weight_bytes
    check_disk(recipe, found)
    return found
