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
  model's config (the planner's meta-device layout, no weights read);
- the host has the RAM the run needs (pinned store, page cache of a disk store,
  the tokenized data), and `device: cuda` has a CUDA device: refused by train,
  warnings in validate, whose recipe may be meant for another machine;
- settings that are valid but surely not meant (an eval interval with no eval
  data, a tiny file trained over many times) become warnings.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from grass_cli.errors import DataError, GrassError
from grass_cli.recipe import Recipe

if TYPE_CHECKING:
    from grass_cli.planner.shape import Layout
    from grass_cli.planner.verdict import DiskNeed

# More passes over the training rows than this is surely a mistake (a test file,
# or steps meant for a bigger dataset): fine-tuning runs take 1 to a few epochs.
MANY_PASSES = 20


@dataclass
class Preflight:
    """What the checks found (for `grass validate` to show)."""

    params: int = 0
    weight_bytes: int = 4
    rows: dict[str, int | str] = field(default_factory=dict)  # str: "streamed"
    disk_needed: dict[str, int] = field(default_factory=dict)  # folder -> bytes
    disk: DiskNeed | None = None
    host_need: dict[str, int] = field(default_factory=dict)  # part -> bytes
    warnings: list[str] = field(default_factory=list)  # valid, but surely not meant
    recipe: Recipe | None = None  # as checked: sampler.gamma: auto resolved


# Config and tokenizer files of a model that is not on this disk yet: Llama 3's
# tokenizer.json (9 MB) is the largest common one; rounded up.
MODEL_FILES_UNKNOWN = 16 << 20


def model_files(recipe: Recipe) -> int:
    """Bytes of a model copy besides its weights (config, tokenizer, chat template),
    read from the model folder when it is on this disk."""
    from grass_cli.models import EMBEDDED, _gguf_cache_folder, embedded_gguf

    path = recipe.model.path
    folder = Path(path).expanduser()
    with contextlib.suppress(Exception):  # (an estimate: never an error of its own)
        if path in EMBEDDED:
            folder = _gguf_cache_folder(embedded_gguf(path))
        elif folder.suffix == ".gguf":
            folder = _gguf_cache_folder(folder)
    if not folder.is_dir():
        return MODEL_FILES_UNKNOWN
    weights = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
    return sum(
        f.stat().st_size for f in folder.iterdir() if f.is_file() and not f.name.endswith(weights)
    )


def planned_steps(recipe: Recipe, found: Preflight) -> int:
    """The optimizer steps the run takes: max_steps, or its epochs of the rows found."""
    tc = recipe.training
    if tc.max_steps is not None:
        return tc.max_steps
    rows = found.rows.get("data.train")
    if not isinstance(rows, int):
        return 0
    per_step = tc.micro_batch_size * tc.grad_accum_steps
    return int(-(-rows // per_step) * (tc.epochs or 1))


def _check_folder(path: Path, key: str) -> None:
    from grass_cli.planner.machine import nearest_existing

    probe = nearest_existing(path)
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise GrassError(
            f"cannot write there ({probe} is not a writable folder)",
            where=f"{key}: {path}",
            hint=f"choose a writable folder for {key}",
        )


def _stale_eval(err: DataError, path: str, columns: list[str]) -> DataError:
    """The columns error of a data.eval file that does not fit the recipe's format,
    though data.train does: most often a recipe copied from another task, with
    data.eval still naming that task's file. Its hint replaces the file's own, which
    would change data.format or data.fields, and so break data.train."""
    from grass_cli.data.rows import detect_format

    hint = (
        f"data.eval still points at {path}: set data.eval to your own eval file, or to "
        "a share of data.train such as data.eval: 0.05"
    )
    guess = detect_format(columns)
    if guess is not None:
        fields = f", fields: {guess.mapping_text()}" if guess.fields else ""
        hint += (
            f" (if it is an eval file in the {guess.format} format, give it as a source: "
            f"data.eval: {{path: {path}, format: {guess.format}{fields}}})"
        )
    return DataError(err.what, where=err.where, hint=hint)


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
            try:
                resolve_columns(scfg.format, dict(scfg.fields), columns, source.name)
            except DataError as e:
                # data.eval comes last, so data.train's columns have passed by now.
                if key != "data.eval" or source.spec.format is not None:
                    raise
                raise _stale_eval(e, source.name, columns) from None
    if held is not None and train_rows:
        found.rows["data.eval"] = held_out_count(held, train_rows)
    elif held is not None and cfg.streaming:  # a count (the recipe refuses a share)
        found.rows["data.eval"] = int(held)
    if task is not None and "eval.data" not in found.rows:
        n = check_source(task)  # (it maps its own fields)
        found.rows["eval.data"] = n if n is not None else "not downloaded yet"


def check_extras(recipe: Recipe) -> None:
    """What the recipe asks of the installed packages: the attention kernel (and
    its device), bitsandbytes for 8-bit optimizer states, W&B (and a login for
    online mode, and its folder), known before the model loads."""
    from grass_cli.attention import check_recipe

    check_recipe(recipe)
    if recipe.optimizer.state_dtype == "8bit":
        from grass_cli.offload.compact import check_eight_bit

        check_eight_bit()
    if recipe.output.wandb is not None:
        from grass_cli.telemetry.wandb import check_wandb

        check_wandb(recipe.output.wandb)
        if recipe.output.wandb.dir:
            _check_folder(Path(recipe.output.wandb.dir), "output.wandb.dir")


def check_device(recipe: Recipe, found: Preflight, training: bool) -> str:
    """The device the run would use here. `device: cuda` on a machine without CUDA is
    refused before a model loads (train) or said as a warning (validate: the recipe
    may be meant for another machine)."""
    import torch

    has_cuda = torch.cuda.is_available()
    device = recipe.training.device
    if device == "cuda" and not has_cuda:
        what = "training.device is cuda but this machine has no CUDA device"
        if training:
            raise GrassError(
                what + f" (torch {torch.__version__} sees none)",
                where="training.device",
                hint="run on a GPU machine with a CUDA build of torch, or set "
                "training.device: cpu (or auto)",
            )
        found.warnings.append(what + ": `grass train` will refuse to start here")
    return "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"


def check_memory(recipe: Recipe, found: Preflight, layout: Layout, training: bool) -> None:
    """The recipe's own plan against this machine: the disk it writes (refused when a
    filesystem is short), the host RAM it needs (refused by train, a warning in
    validate) and, on the CPU, nothing more (host memory is the device)."""
    from grass_cli.distributed import from_env, local_world
    from grass_cli.planner.machine import host_memory, runtime_bytes
    from grass_cli.planner.memory import plan, recipe_scenario
    from grass_cli.planner.sharded import shards
    from grass_cli.planner.tiers import resolve_budget
    from grass_cli.planner.verdict import (
        dataset_bytes,
        disk_need,
        disk_short,
        host_need,
        judge_host,
    )

    device = check_device(recipe, found, training)
    recipe = _resolve_gamma(recipe, found, layout, device, training)
    host, local, runtime = host_memory(), local_world(), runtime_bytes()
    data = dataset_bytes(recipe)
    n = shards(recipe, from_env().world)  # (one rank's plan when sharded)
    recipe = found.recipe = resolve_budget(recipe, layout, device, host, data, runtime, local, n)
    p = plan(recipe, layout, recipe_scenario(recipe), device, shards=n)
    need = disk_need(recipe, layout, p, model_files(recipe), planned_steps(recipe, found))
    found.disk = need
    found.disk_needed = dict(need.folders)
    short = disk_short(need)
    if short is not None:
        folder, needed, free = short
        raise GrassError(
            f"not enough disk space: the run writes about {needed / 1e9:.2f} GB there "
            f"({need.breakdown()}) and {free / 1e9:.2f} GB is free",
            where=folder,
            hint=need.hint(),
        )
    # every process of a torchrun job on this machine holds its own copy of each part
    need = host_need(p, layout, data, runtime)
    found.host_need = {k: v * local for k, v in need.items()}
    ok, fix = judge_host(p, found.host_need, host)
    if not ok:
        total = sum(found.host_need.values())
        per = f", {local} processes" if local > 1 else ""
        what = (
            f"the run needs about {total / 1e9:.2f} GB of host RAM ("
            + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in found.host_need.items())
            + f"{per}) and {host.source} has {host.total / 1e9:.2f} GB"
        )
        # refused only beyond the whole RAM: between the usable share and all of it
        # the estimate's margin decides, so a warning
        if training and total > host.total:
            raise GrassError(what, where="optimizer.offload", hint=fix)
        found.warnings.append(f"{what}: {fix}")


def _resolve_gamma(
    recipe: Recipe, found: Preflight, layout: Layout, device: str, training: bool
) -> Recipe:
    """sampler.gamma: auto, as this machine resolves it. Validating for a GPU machine
    from one without CUDA cannot read the card: a warning, and the checks below count
    one block."""
    from grass_cli.planner.auto import needs_resolving, resolve_gamma, with_gamma
    from grass_cli.planner.machine import cuda_total_memory

    if not needs_resolving(recipe):
        return recipe
    try:
        total = cuda_total_memory() if device == "cuda" else None
        return resolve_gamma(recipe, device, total, lay=layout)
    except GrassError as e:
        if training or "no CUDA device here" not in e.what:
            raise
        found.warnings.append(
            "sampler.gamma: auto fills the GPU's memory, which only the training machine "
            "can read: the checks here count one block"
        )
        return with_gamma(recipe, 1)


def check_schedule(recipe: Recipe, found: Preflight) -> None:
    """Settings that are valid but do nothing, or surely not what was meant."""
    from grass_cli.data.build import held_out

    t, d, s = recipe.training, recipe.data, recipe.sampler
    if s.memory_budget != "device" and s.gamma != "auto" and recipe._gamma_auto is None:
        found.warnings.append(
            f"sampler.memory_budget is {s.memory_budget} but sampler.gamma is {s.gamma}: the "
            "budget is read only with sampler.gamma: auto"
        )
    if t.eval_interval is not None and d.eval is None:
        found.warnings.append(
            f"training.eval_interval is {t.eval_interval} but data.eval is null, so no eval "
            "loss is ever computed: set data.eval (a file, or a share such as 0.05)"
        )
    counts = [n for k, n in found.rows.items() if k.startswith("data.train")]
    if t.max_steps is None or not counts or not all(isinstance(n, int) for n in counts):
        return
    rows = sum(int(n) if d.limit is None else min(int(n), d.limit) for n in counts)
    if held_out(d) is not None and isinstance(found.rows.get("data.eval"), int):
        rows -= int(found.rows["data.eval"])
    batch = t.micro_batch_size * t.grad_accum_steps
    passes = t.max_steps * batch / max(rows, 1)
    if passes > MANY_PASSES:
        found.warnings.append(
            f"{t.max_steps} steps x a batch of {batch} rows go over the {rows} training "
            f"row{'s' if rows != 1 else ''} {passes:.0f} times: the model will learn them by "
            "heart; lower training.max_steps, set training.epochs, or add data"
        )


def preflight(
    recipe: Recipe,
    resume: str | None = None,
    overwrite: bool = False,
    run_dir: bool = True,
    training: bool = True,
) -> Preflight:
    """Every check that needs no model weights; raises the first GrassError found.
    `run_dir`: also apply the run folder's rules for a start with these flags.
    `training`: checks for a run on this machine (train), not only of the recipe
    (validate): what this machine lacks is then an error, not a warning."""
    from grass_cli.engine.run_dir import check_fresh_start, check_writable
    from grass_cli.engine.run_lock import check_not_live
    from grass_cli.planner.shape import build_layout, load_config

    found = Preflight()
    out = Path(recipe.output.dir)
    check_writable(out)
    if run_dir:
        check_not_live(out)
    if run_dir and resume is None:
        check_fresh_start(out, recipe, overwrite)
    opt = recipe.optimizer
    if opt.state_policy == "offload" and opt.offload.target == "disk" and opt.offload.path:
        _check_folder(Path(opt.offload.path), "optimizer.offload.path")
    check_extras(recipe)
    check_data(recipe, found)
    config, name = load_config(recipe, download=training)
    layout = build_layout(recipe, config, name)
    found.params, found.weight_bytes = layout.params, layout.weight_bytes
    check_memory(recipe, found, layout, training)
    check_schedule(recipe, found)
    return found
