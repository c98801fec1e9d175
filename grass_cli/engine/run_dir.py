"""The run folder: what may start in it, what grass owns in it, and what --overwrite removes.

A run folder marks itself as grass's with `.grass-run.json`, which lists the files
grass wrote there beyond the ones whose names are grass's by construction
(`OWNED_PATTERNS`). `--overwrite` removes exactly those and the folders they leave
empty: a user's own file, even in `eval/` or `final/`, is never deleted. A folder
that holds files but no marker is not a run grass made, and is refused.

Every check here runs before the run folder gets a file, so a refused start
loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from grass_cli.atomic import (
    describe_write_error,
    write_atomic_bytes,
    write_atomic_json,
    write_atomic_text,
)
from grass_cli.checkpoint import CKPT_DIR, find_latest, read_state, verify
from grass_cli.engine.run_lock import LOCK
from grass_cli.errors import GrassError
from grass_cli.recipe import Recipe

MARKER = ".grass-run.json"
# Names that are grass's in a marked run folder, whoever made them.
OWNED_PATTERNS = (
    MARKER,
    "recipe.yaml",
    "metrics.jsonl",
    "summary.json",
    ".*.tmp",
    f"{CKPT_DIR}/step-*",
    f"{CKPT_DIR}/.tmp-step-*",
    f"{CKPT_DIR}/latest",
    f"{CKPT_DIR}/.latest.*tmp",
    "eval/step-*",
    ".final.tmp",
    "offload/*.bin",
    "offload/rank-*/*.bin",
    "tensorboard/events.out.tfevents.*",
    "wandb-run-id",
    "wandb/offline-run-*",
    "wandb/run-*",
    "wandb/latest-run",
    "wandb/debug.log",
    "wandb/debug-internal.log",
    "plots/importance_heatmap.png",
    "plots/active_counts.png",
    "plots/loss.png",
    "plots/memory.png",
)

# Recipe keys that shape a run's trajectory or state layout: a resumed run must
# keep them. Anything else (max_steps, eval, logging, lr...) may change, and the
# recipe given now wins; RESUME_FREE lists keys under these prefixes that may change
# too (they change how the same arithmetic is computed, not what is stored).
RESUME_FIXED = (
    "model.",
    "data.train",
    "data.format",
    "data.fields",
    "data.max_length",
    "data.truncation",
    "data.train_on_prompt",
    "data.chat_template",
    "data.system_prompt",
    "data.roles",
    "data.packing",
    "data.streaming",
    "data.shuffle_block",
    "data.limit",
    "sampler.strategy",
    "sampler.gamma",
    "sampler.train_",
    "optimizer.state_policy",
    "optimizer.state_dtype",  # the stored moments' format
    "training.micro_batch_size",
    "training.grad_accum_steps",
    "training.seed",
    "lora",
    "distributed.sharding",  # how the optimizer state was saved
)
RESUME_FREE = ("model.attn_implementation",)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "fields":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_diff(old_yaml: str, new: Recipe) -> list[str]:
    """Dotted keys whose values differ between a stored recipe and this one. A key the
    stored recipe lacks (one added to grass since) counts as its default value."""
    raw = yaml.safe_load(old_yaml) or {}
    with contextlib.suppress(ValueError):  # (an older schema: compared as written)
        raw = Recipe.model_validate(raw).model_dump(mode="json")
    old = _flat(raw)
    cur = _flat(new.model_dump(mode="json"))
    return sorted(k for k in old.keys() | cur.keys() if old.get(k) != cur.get(k))


def unwritable(run_dir: Path, why: str) -> GrassError:
    return GrassError(
        f"cannot write to the run dir ({why})",
        where=f"output.dir: {run_dir}",
        hint="choose a writable output.dir",
    )


def check_writable(run_dir: Path) -> None:
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise unwritable(run_dir, f"{probe} is not a writable folder")


# ------------------------------------------------------------------- ownership


def is_run_dir(run_dir: Path) -> bool:
    """A folder grass made for a run (its marker), or one from before markers existed."""
    return any((run_dir / n).exists() for n in (MARKER, "recipe.yaml", "metrics.jsonl"))


def _recorded(run_dir: Path) -> list[str]:
    try:
        data = json.loads((run_dir / MARKER).read_text(encoding="utf-8"))
        return [str(p) for p in data.get("owned", [])]
    except (OSError, ValueError, AttributeError):
        return []


def own(run_dir: Path, paths: list[Path]) -> None:
    """Record files grass wrote whose names are not grass's by construction (the
    final model's files, say), so that --overwrite may remove them later."""
    rel = {str(p.relative_to(run_dir)) for p in paths}
    owned = sorted(set(_recorded(run_dir)) | rel)
    write_atomic_json(run_dir / MARKER, {"tool": "grass", "format": 1, "owned": owned})


def owned_files(run_dir: Path) -> list[Path]:
    """Everything under the run folder that grass wrote (folders whole for the
    patterns that name a folder grass creates, like a checkpoint)."""
    found: set[Path] = set()
    for pattern in (*OWNED_PATTERNS, *_recorded(run_dir)):
        found.update(run_dir.glob(pattern))
    return sorted(found)


def remove_owned(run_dir: Path) -> None:
    """--overwrite: remove what grass wrote, then the folders that left empty."""
    parents: set[Path] = set()
    for path in owned_files(run_dir):
        parents.update(p for p in path.parents if run_dir in p.parents)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def foreign_files(run_dir: Path, under: str) -> list[str]:
    """Files in RUN_DIR/UNDER that grass did not write (a user's own)."""
    root = run_dir / under
    if not root.is_dir():
        return []
    mine = {p.resolve() for p in owned_files(run_dir)}
    return sorted(
        str(p.relative_to(run_dir))
        for p in root.rglob("*")
        if p.is_file() and p.resolve() not in mine and not (mine & set(p.resolve().parents))
    )


# ----------------------------------------------------------------- before start


def _refuse_existing(run_dir: Path, recipe: Recipe) -> None:
    stored = run_dir / "recipe.yaml"
    diff = recipe_diff(stored.read_text(encoding="utf-8"), recipe) if stored.exists() else []
    what = (
        f"the run dir already holds a run of a different recipe ({', '.join(diff[:5])} differ)"
        if diff
        else "the run dir already holds a run"
    )
    raise GrassError(
        what,
        where=f"output.dir: {run_dir}",
        hint="continue it with --resume auto, replace it with --overwrite, or choose "
        "another output.dir",
    )


def check_fresh_start(run_dir: Path, recipe: Recipe, overwrite: bool) -> None:
    """A new run may start in a new or empty folder, or over a run with --overwrite;
    never in a folder of someone else's files, and never over a user's final/."""
    if not run_dir.is_dir() or not any(p.name != LOCK for p in run_dir.iterdir()):
        return  # (a folder holding only the lock file this run took is empty)
    if not is_run_dir(run_dir):
        raise GrassError(
            "the run dir holds files that grass did not write",
            where=f"output.dir: {run_dir}",
            hint="choose a new or empty output.dir (grass never writes over files it did not make)",
        )
    if not overwrite:
        _refuse_existing(run_dir, recipe)
    if recipe.output.save_model and (theirs := foreign_files(run_dir, "final")):
        raise GrassError(
            f"final/ holds files grass did not write ({', '.join(theirs[:3])}); the trained "
            "model goes there",
            where=f"output.dir: {run_dir}",
            hint="move them elsewhere, or choose another output.dir",
        )


def resolve_resume(
    recipe: Recipe, resume: str | None, overwrite: bool, world: int = 1
) -> Path | None:
    """Check the run dir before anything loads; returns the checkpoint to resume from."""
    run_dir = Path(recipe.output.dir)
    check_writable(run_dir)
    if resume is None:
        check_fresh_start(run_dir, recipe, overwrite)
        return None
    if overwrite:
        raise GrassError(
            "--resume and --overwrite cannot be used together", hint="drop one of them"
        )
    if resume == "auto":
        ckpt = find_latest(run_dir)
        if ckpt is None:
            if is_run_dir(run_dir):
                raise GrassError(
                    "the run dir holds a run but no checkpoint to resume from",
                    where=f"output.dir: {run_dir}",
                    hint="start over with --overwrite (set checkpoint.interval to save "
                    "checkpoints during training)",
                )
            check_fresh_start(run_dir, recipe, overwrite=False)
            return None  # nothing to resume yet: a fresh start
    else:
        ckpt = Path(resume)
    _check_checkpoint(ckpt, recipe, world)
    if ckpt.resolve().parent.parent != run_dir.resolve():  # continuing into another folder
        check_fresh_start(run_dir, recipe, overwrite=False)
    return ckpt


def _holds_out(old_yaml: str, new: Recipe) -> bool:
    """Whether either recipe holds eval rows out of the training data (`data.eval` a
    fraction or count): then changing it changes the rows trained on."""
    old = (yaml.safe_load(old_yaml) or {}).get("data", {}).get("eval")
    return any(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new.data.eval))


def _check_checkpoint(ckpt: Path, recipe: Recipe, world: int) -> None:
    manifest = verify(ckpt)
    saved_world = int(manifest.get("world_size", 1))
    saved = yaml.safe_load(manifest["recipe"]) or {}
    sharded = (saved.get("distributed") or {}).get("sharding") == "fsdp"
    if saved_world != world and not sharded:  # (a sharded one re-shards on resume)
        raise GrassError(
            f"the checkpoint was written by {saved_world} process(es) but this run has {world}",
            where=str(ckpt),
            hint=f"resume with the same number of processes (torchrun --nproc-per-node "
            f"x --nnodes = {saved_world}"
            + (", or plain `grass train`)" if saved_world == 1 else ")"),
        )
    fixed = [
        k
        for k in recipe_diff(manifest["recipe"], recipe)
        if (k.startswith(RESUME_FIXED) and k not in RESUME_FREE)
        or (k == "data.eval" and _holds_out(manifest["recipe"], recipe))
    ]
    if fixed:
        raise GrassError(
            f"cannot resume with a recipe that changes {', '.join(fixed)}",
            where=str(ckpt),
            hint="resume with the recipe the run was started with (RUN_DIR/recipe.yaml); "
            "only keys such as training.max_steps, eval and logging may change",
        )


# ------------------------------------------------------------------- the start


def materialize(recipe: Recipe, overwrite: bool, resume: Path | None) -> Path:
    """Create the run dir's files once every check has passed: the marker, the
    recipe, and metrics.jsonl continued exactly where the checkpoint left it."""
    run_dir = Path(recipe.output.dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            remove_owned(run_dir)
        own(run_dir, [])
        write_atomic_text(run_dir / "recipe.yaml", recipe.to_yaml())
        if resume is not None:
            _continue_metrics(run_dir, resume)
    except OSError as e:
        raise unwritable(run_dir, describe_write_error(e)) from None
    return run_dir


def _continue_metrics(run_dir: Path, ckpt: Path) -> None:
    """metrics.jsonl up to the checkpoint's step: the run's own file cut back to the
    checkpoint's offset, or, resuming into a new folder, a copy of that much of the
    original run's file (an empty file when the original is gone)."""
    offset = read_state(ckpt).metrics_offset
    metrics = run_dir / "metrics.jsonl"
    source = ckpt.resolve().parent.parent / "metrics.jsonl"
    if source.resolve() != metrics.resolve():
        data = b""
        if source.is_file() and source.stat().st_size >= offset:
            with open(source, "rb") as f:
                data = f.read(offset)
        write_atomic_bytes(metrics, data)
        return
    if metrics.is_file() and metrics.stat().st_size >= offset:
        with open(metrics, "r+b") as f:
            f.truncate(offset)
