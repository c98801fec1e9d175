"""What a run writes to keep: checkpoints (through grass_cli/checkpoint.py) and the final model.

The engine hands checkpoint.py an explicit `TrainState` and a way to write the
model; checkpoint.py never sees the run. Every write failure (a full disk, a file
size limit) ends in one message that says what was kept and where.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from grass_cli import checkpoint as ckpt
from grass_cli import distributed, sharded_io
from grass_cli.atomic import describe_write_error
from grass_cli.engine import run_dir as rundir
from grass_cli.errors import GrassError
from grass_cli.models import quiet_stderr
from grass_cli.rng import rng_state, set_rng_state

if TYPE_CHECKING:
    from grass_cli.engine.build import Run
    from grass_cli.run_state import RunState


def write_model(run: Run, folder: Path, shard_size: int | str | None = None) -> None:
    """The model as an HF folder (LoRA: merged, plus adapter/) and the tokenizer."""
    with quiet_stderr():  # transformers' "Writing model shards" bar
        if run.peft_model is not None:
            from grass_cli import lora

            lora.save(run.peft_model, folder)
        else:
            shard = {} if shard_size is None else {"max_shard_size": shard_size}
            run.model.save_pretrained(folder, safe_serialization=True, **shard)
        run.tokenizer.save_pretrained(folder)


def write_checkpoint(run: Run, step: int, progress: RunState, light: bool = False) -> Path:
    """A checkpoint of the run after `step` optimizer steps: the loop's progress as it
    is (a non-finite stop saves the last good step, before the one that failed).
    `light` (checkpoint.on_signal: light) leaves the optimizer state out."""
    if run.metrics_sink is not None:
        run.metrics_sink.flush()
    grass = run.grass.state_dict()
    state = ckpt.TrainState(
        progress=dataclasses.replace(progress, step=step),
        active_names=grass["active"],
        batches=run.batches.state_dict(),
        sampler=grass["sampler"],
        tracker=grass["tracker"],
        rng=rng_state(run.device),
        metrics_offset=run.metrics_sink.tell() if run.metrics_sink is not None else 0,
        world_size=run.dist.world,
    )
    content = ckpt.CheckpointContent(
        state=state,
        write_model=lambda folder: write_model(run, folder, ckpt.MODEL_SHARD_SIZE),
        optimizer_groups=() if light else run.optimizer.export_groups(),
        active=sorted(run.optimizer.active),
        recipe_yaml=run.recipe.to_yaml(),
        light=light,
    )
    if run.sharded is not None:  # every rank: its optimizer shard, and the gathers
        content.shards, content.shard = run.sharded.shards, run.sharded.saved_shard
        content.gather_model = lambda folder: write_sharded(run, folder)
    keep = run.recipe.checkpoint.keep_last
    return ckpt.save_checkpoint(run.run_dir, content, keep, run.device, run.dist)


def restore(run: Run, path: Path) -> ckpt.TrainState:
    """Load a verified checkpoint into a freshly built run; returns its train state."""
    state = ckpt.read_state(path)
    if run.peft_model is not None:
        from grass_cli import lora

        lora.load_adapter(run.peft_model, path / lora.ADAPTER_DIR, where=str(path))
    elif run.sharded is not None:
        restore_shards(run, path)
    else:
        ckpt.restore_weights(run.model, path)
    if ckpt.is_light(path):  # weights and progress only: AdamW starts afresh
        groups: Iterable[tuple[str, dict]] = ()
        run.telemetry.emit(
            "warning",
            message=f"{path.name} is a light checkpoint (checkpoint.on_signal: light): "
            "the optimizer state restarts here (fresh AdamW moments, fp32 masters from the "
            "saved weights), so this run is not bit-identical to one never stopped",
        )
    elif run.sharded is None:
        groups = ckpt.optimizer_groups(path)
    else:
        groups = sharded_groups(run, path)
    run.optimizer.import_groups(groups, active=set(state.active_names))
    run.batches.load_state_dict(state.batches)
    grass = {"sampler": state.sampler, "tracker": state.tracker, "active": state.active_names}
    run.grass.load_state_dict(grass)
    if state.world_size != run.dist.world:  # (a sharded checkpoint: re-sharded above)
        tc = run.recipe.training
        rows = tc.micro_batch_size * tc.grad_accum_steps  # (per process)
        run.telemetry.emit(
            "warning",
            message=f"resuming on {run.dist.world} processes a run saved by "
            f"{state.world_size} processes: the global batch is now "
            f"{rows * run.dist.world} rows (was {rows * state.world_size})",
        )
    if run.dist.enabled and run.dist.world == state.world_size:  # each rank its own streams
        set_rng_state(ckpt.read_rank_rng(path, run.dist.rank))
    else:
        set_rng_state(state.rng)
    return state


def restore_shards(run: Run, path: Path) -> None:
    """Each rank reads its own rows of every weight from the checkpoint's HF folder."""
    found = sharded_io.load_into_shards(run.model, ckpt.weight_files(path))
    missing = set(run.model.state_dict()) - found - sharded_io.tied_names(run.model)
    if missing:
        raise GrassError(
            f"checkpoint weights do not fit this model (missing {sorted(missing)[:3]})",
            where=str(path),
            hint="resume with the recipe the run was started with",
        )


def sharded_groups(run: Run, path: Path) -> Iterator[tuple[str, dict]]:
    """This rank's optimizer shard: its own saved one, or cut anew from all of them
    when the checkpoint was saved in another number of shards."""
    assert run.sharded is not None
    names, saved = ckpt.optimizer_index(path)
    if saved == run.sharded.shards:
        return ckpt.optimizer_groups(path, run.sharded.shard)
    if run.recipe.optimizer.state_dtype == "8bit":
        raise GrassError(
            f"the checkpoint's 8-bit optimizer state is in {saved} shards and this run "
            f"has {run.sharded.shards}: 8-bit state (quantized in blocks of each shard) "
            "cannot be cut anew",
            where=str(path),
            hint=f"resume with {saved} processes sharing the model (torchrun "
            "--nproc-per-node), or start over with optimizer.state_dtype bf16 or fp32",
        )
    shards = [ckpt.optimizer_groups(path, k) for k in range(saved)]
    joined = ((name, [next(s)[1] for s in shards]) for name in names)
    return sharded_io.resharded(joined, run.optimizer)


def save_model(run: Run) -> Path:
    """RUN_DIR/final/ (safetensors + tokenizer), written beside and moved into place.

    Only files grass wrote are replaced; the new files are recorded in the run
    folder's marker, so a later --overwrite removes them and nothing else.
    Sharded runs: every rank calls it (each weight is gathered), rank 0 writes."""
    final = run.run_dir / "final"
    tmp = run.run_dir / ".final.tmp"
    main = run.dist.is_main
    error = None
    try:
        if main and tmp.exists():
            shutil.rmtree(tmp)
        if run.sharded is not None:
            error = distributed.first_error(write_sharded(run, tmp if main else None))
        else:
            write_model(run, tmp)
        if error is None and main:
            _move_into(run.run_dir, tmp, final)
    except (OSError, SafetensorError) as e:
        error = describe_write_error(e)
    if error is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = ckpt.find_latest(run.run_dir)
        kept = (
            f"the checkpoint {latest} holds the last saved weights"
            if latest
            else "no checkpoint holds them: the trained weights are lost"
        )
        raise GrassError(
            f"{error} while saving the trained model; {kept}",
            where=str(final),
            hint="free space (the folder needs about the model's size), then continue with "
            "`grass train RECIPE --resume auto`"
            if latest
            else "free space and train again; set checkpoint.at_end: true to keep a copy",
        )
    if not main:
        return final
    rundir.own(run.run_dir, [p for p in final.rglob("*") if p.is_file()])
    return final


def write_sharded(run: Run, folder: Path | None) -> str | None:
    """A sharded model as one HF folder, gathered tensor by tensor (every rank
    calls it; `folder` on rank 0 only); returns rank 0's write error, if any."""
    error = None
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            error = describe_write_error(e)
    gathered = sharded_io.write_gathered(run.model, folder if error is None else None)
    if folder is None or error is not None or gathered is not None:
        return error or gathered
    try:
        run.model.config.save_pretrained(folder)
        if getattr(run.model, "generation_config", None) is not None:
            run.model.generation_config.save_pretrained(folder)
        with quiet_stderr():
            run.tokenizer.save_pretrained(folder)
    except OSError as e:
        return describe_write_error(e)
    return None


def _move_into(run_dir: Path, tmp: Path, final: Path) -> None:
    """Replace final/ with tmp/: whole when final/ holds only grass's files,
    file by file when a user put something there since the run started."""
    if final.exists():
        if rundir.foreign_files(run_dir, "final"):
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                dest = final / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
            shutil.rmtree(tmp)
            return
        shutil.rmtree(final)
    os.replace(tmp, final)
