"""The training engine: build the parts in dependency order, then one straight loop.

recipe -> device -> model + tokenizer -> block map -> data -> importance tracker
-> sampler -> state store + block-wise AdamW -> [probe] -> train loop -> save.

Every strategy (full, lisa, grass, grass-static, cyclic, lora) runs this same loop;
they differ only in the sampler and the optimizer-state policy (and, for lora,
in what a block's group holds: its adapters, see grass_cli/lora.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from grass_cli import distributed
from grass_cli.blocks import BlockMap, build_block_map
from grass_cli.checkpoint import (
    CKPT_DIR,
    find_latest,
    read_trainer,
    restore,
    save_checkpoint,
    verify,
)
from grass_cli.data import (
    BatchIterator,
    TokenizedData,
    build_dataset,
    eval_batches,
    steps_per_epoch,
)
from grass_cli.distributed import SINGLE, DistInfo, GradReducer, all_sum, any_rank, check_same
from grass_cli.errors import GrassError
from grass_cli.evaluate import count_targets, eval_loss, run_eval
from grass_cli.importance import ImportanceTracker
from grass_cli.models import (
    checkpointed,
    load_model_and_tokenizer,
    max_positions,
    quiet_stderr,
    resolve_device,
)
from grass_cli.optim import BlockAdamW
from grass_cli.probing import forward_backward
from grass_cli.probing import probe as probe_blocks
from grass_cli.recipe import PROBING, Recipe
from grass_cli.sampling import Sampler, build_sampler
from grass_cli.schedule import lr_at
from grass_cli.state_store import DiskStore, build_store
from grass_cli.telemetry import Telemetry
from grass_cli.telemetry.memory import memory_stats
from grass_cli.telemetry.sinks import JsonlSink


@dataclass
class Run:
    """Everything one training run is built from."""

    recipe: Recipe
    run_dir: Path
    device: torch.device
    model: torch.nn.Module
    tokenizer: Any
    model_source: str
    block_map: BlockMap
    train_data: TokenizedData
    eval_data: TokenizedData | None
    batches: BatchIterator
    tracker: ImportanceTracker
    sampler: Sampler
    optimizer: BlockAdamW
    total_steps: int
    always_train: list[str]
    telemetry: Telemetry
    metrics_sink: JsonlSink | None  # rank 0 only
    resume_from: Path | None = None
    dist: DistInfo = SINGLE
    reducer: GradReducer | None = None  # data-parallel runs only
    # strategy lora: peft's wrapper around `model` (which trains with the adapters
    # injected), kept to save the merged model and the adapter.
    peft_model: Any = None


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: dict[int, float] = field(default_factory=dict)
    tokens: int = 0
    elapsed_s: float = 0.0
    peak_rss: int = 0
    skipped: int = 0
    task_eval: dict[str, Any] | None = None


@dataclass
class StopRequest:
    """Set by a signal handler (the CLI's): the loop checkpoints and stops after the step."""

    requested: str | None = None  # the signal's name, e.g. "SIGINT"


# ----------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Recipe keys that shape a run's trajectory or state layout: a resumed run must
# keep them. Anything else (max_steps, eval, logging, lr...) may change, and the
# recipe given now wins.
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
    "data.limit",
    "sampler.strategy",
    "sampler.gamma",
    "sampler.train_",
    "optimizer.state_policy",
    "training.micro_batch_size",
    "training.grad_accum_steps",
    "training.seed",
    "lora",
)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "fields":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_diff(old_yaml: str, new: Recipe) -> list[str]:
    """Dotted keys whose values differ between a stored recipe and this one."""
    old = _flat(yaml.safe_load(old_yaml) or {})
    cur = _flat(new.model_dump(mode="json"))
    return sorted(k for k in old.keys() | cur.keys() if old.get(k) != cur.get(k))


def _check_writable(run_dir: Path) -> None:
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise GrassError(
            f"cannot write to the run dir ({probe} is not a writable folder)",
            where=f"output.dir: {run_dir}",
            hint="choose a writable output.dir",
        )


def resolve_resume(
    recipe: Recipe, resume: str | None, overwrite: bool, world: int = 1
) -> Path | None:
    """Check the run dir before anything loads; returns the checkpoint to resume from.

    A run dir that already holds a run is refused unless --resume or --overwrite;
    nothing is written here, so a refused or failed start loses nothing.
    """
    run_dir = Path(recipe.output.dir)
    _check_writable(run_dir)
    stored = run_dir / "recipe.yaml"
    has_run = (run_dir / "metrics.jsonl").exists() or stored.exists()
    if resume is None:
        if has_run and not overwrite:
            diff = (
                recipe_diff(stored.read_text(encoding="utf-8"), recipe) if stored.exists() else []
            )
            what = (
                f"the run dir already holds a run of a different recipe ({', '.join(diff[:5])} "
                "differ)"
                if diff
                else "the run dir already holds a run"
            )
            raise GrassError(
                what,
                where=f"output.dir: {run_dir}",
                hint="continue it with --resume auto, replace it with --overwrite, or choose "
                "another output.dir",
            )
        return None
    if overwrite:
        raise GrassError(
            "--resume and --overwrite cannot be used together", hint="drop one of them"
        )
    if resume == "auto":
        ckpt = find_latest(run_dir)
        if ckpt is None:
            if has_run:
                raise GrassError(
                    "the run dir holds a run but no checkpoint to resume from",
                    where=f"output.dir: {run_dir}",
                    hint="start over with --overwrite (set checkpoint.interval to save "
                    "checkpoints during training)",
                )
            return None  # nothing to resume yet: a fresh start
    else:
        ckpt = Path(resume)
    manifest = verify(ckpt)
    saved_world = int(manifest.get("world_size", 1))
    if saved_world != world:
        raise GrassError(
            f"the checkpoint was written by {saved_world} process(es) but this run has {world}",
            where=str(ckpt),
            hint=f"resume with the same number of processes (torchrun --nproc-per-node "
            f"x --nnodes = {saved_world}"
            + (", or plain `grass train`)" if saved_world == 1 else ")"),
        )
    fixed = [k for k in recipe_diff(manifest["recipe"], recipe) if k.startswith(RESUME_FIXED)]
    if fixed:
        raise GrassError(
            f"cannot resume with a recipe that changes {', '.join(fixed)}",
            where=str(ckpt),
            hint="resume with the recipe the run was started with (RUN_DIR/recipe.yaml); "
            "only keys such as training.max_steps, eval and logging may change",
        )
    return ckpt


def materialize_run_dir(recipe: Recipe, overwrite: bool, resume: Path | None) -> Path:
    """Create the run dir's files once every check has passed."""
    run_dir = Path(recipe.output.dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            stale_files = (
                "metrics.jsonl",
                "summary.json",
                "final",
                CKPT_DIR,
                "offload",
                "eval",
                "plots",
                "tensorboard",
            )
            for stale in stale_files:
                target = run_dir / stale
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        (run_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    except OSError as e:
        raise GrassError(
            f"cannot write to the run dir ({e.strerror})",
            where=f"output.dir: {run_dir}",
            hint="choose a writable output.dir",
        ) from None
    return run_dir


def setup(
    recipe: Recipe,
    telemetry: Telemetry,
    overwrite: bool = False,
    resume: str | None = None,
    dist_info: DistInfo | None = None,
) -> Run:
    """Build every part of a run, in dependency order; nothing trains yet.

    Everything a user can get wrong (run dir, checkpoint, model, data, gamma) is
    checked before the run dir gets a single file. Under torchrun (`dist_info`
    from the environment when not given) every rank builds the same run; rank 0
    alone writes the run dir's files.
    """
    info = dist_info if dist_info is not None else distributed.from_env()
    # 1) run dir and checkpoint: fail in a second, before minutes of loading
    resume_from = resolve_resume(recipe, resume, overwrite, info.world)
    tc = recipe.training
    device = distributed.device_for(info, resolve_device(tc.device))
    distributed.init(info, device)
    seed_everything(tc.seed)

    # 2) model and tokenizer, then the blocks, then checks that need the model
    model, tokenizer, source = load_model_and_tokenizer(recipe.model)
    peft_model = None
    if recipe.sampler.strategy == "lora":
        from grass_cli import lora  # imports peft: only for LoRA runs

        peft_model = lora.wrap(model, recipe.lora, recipe.model.blocks_attr)
        block_map = lora.adapter_block_map(peft_model, recipe.model.blocks_attr)
    else:
        block_map = build_block_map(model, recipe.model.blocks_attr)
    recipe.check_against_model(block_map.num_blocks, max_positions(model))
    model.to(device)
    model.train()

    # 3) data (the task-eval file too: a missing one must not cost a training run)
    if recipe.eval is not None:
        eval_file = recipe.eval.data or recipe.data.eval
        if eval_file is None or not Path(eval_file).is_file():
            raise GrassError(
                "eval data file not found" if eval_file else "eval has no data file",
                where=f"eval.data: {eval_file}",
                hint="set eval.data (or data.eval) to an existing file",
            )
    train_data = build_dataset(recipe.data, tokenizer, "train")
    eval_data = build_dataset(recipe.data, tokenizer, "eval") if recipe.data.eval else None
    batches = BatchIterator(
        train_data,
        tc.micro_batch_size,
        tokenizer.pad_token_id,
        seed=tc.seed,
        shuffle=True,
        rank=info.rank,
        world=info.world,
    )
    if tc.max_steps is not None:
        total_steps = tc.max_steps
    else:
        per_epoch = steps_per_epoch(
            train_data.rows, tc.micro_batch_size * info.world, tc.grad_accum_steps
        )
        total_steps = max(1, math.ceil(float(tc.epochs or 1) * per_epoch))

    # 4) the run dir's files (rank 0); metrics.jsonl continues where the checkpoint left it
    run_dir = Path(recipe.output.dir)
    metrics_sink = None
    if info.is_main:
        run_dir = materialize_run_dir(recipe, overwrite, resume_from)
        metrics = run_dir / "metrics.jsonl"
        if resume_from is not None:
            offset = read_trainer(resume_from)["metrics_offset"]
            with open(metrics, "a+b") as f:
                f.truncate(offset)
        metrics_sink = JsonlSink(metrics, append=resume_from is not None)
        telemetry.add(metrics_sink)
    distributed.barrier()  # the run dir exists (and stale files are gone) for every rank

    # 5) importance, sampler, optimizer (with its state policy and store)
    # Hooks can only be registered while parameters require grad: tracker first.
    tracker = ImportanceTracker(block_map.blocks, recipe.sampler.alpha, device)
    reducer = None
    if info.enabled:  # gradients summed across ranks; the tracker observes the sums
        tracker.local_hooks = False
        params = list({id(p): p for g in block_map.groups() for p in g.tensors}.values())
        bucket = int(tc.allreduce_bucket_mb * 2**20)
        reducer = GradReducer(params, bucket, observe=tracker.observe)
    for group in block_map.groups():
        group.set_trainable(False)
    sampler = build_sampler(recipe.sampler, block_map.num_blocks, tracker, seed=tc.seed + 1)
    s = recipe.sampler
    always = [
        g.name for g in block_map.always_train(s.train_embeddings, s.train_norm, s.train_head)
    ]
    if peft_model is not None:
        always = []  # LoRA: only the adapters train; embeddings, norms and head stay frozen
    store = build_store(
        recipe.optimizer, device, run_dir, subdir=f"rank-{info.rank}" if info.enabled else None
    )
    optimizer = BlockAdamW(block_map.groups(), recipe.optimizer, device, store)

    if isinstance(store, DiskStore):
        trainable = [b.name for b in block_map.blocks] + always
        DiskStore.check_space(store.folder, optimizer.offload_bytes_needed(trainable))
    if block_map.tied and s.train_embeddings != s.train_head and peft_model is None:
        telemetry.emit(
            "warning",
            message="embeddings and LM head are tied (one weight): it trains because "
            "train_embeddings or train_head is on",
        )
    return Run(
        recipe=recipe,
        run_dir=run_dir,
        device=device,
        model=model,
        tokenizer=tokenizer,
        model_source=source,
        block_map=block_map,
        train_data=train_data,
        eval_data=eval_data,
        batches=batches,
        tracker=tracker,
        sampler=sampler,
        optimizer=optimizer,
        total_steps=total_steps,
        always_train=always,
        telemetry=telemetry,
        metrics_sink=metrics_sink,
        resume_from=resume_from,
        dist=info,
        reducer=reducer,
        peft_model=peft_model,
    )


# ------------------------------------------------------------------------------ loop


def _next_step_batches(run: Run) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The micro-batches of one optimizer step and their total target tokens."""
    micro = [next(run.batches) for _ in range(run.recipe.training.grad_accum_steps)]
    return micro, sum(count_targets(b) for b in micro)


def _evaluate(run: Run, step: int) -> float | None:
    if run.eval_data is None:
        return None
    tc = run.recipe.training
    run.telemetry.emit("eval_start", step=step, target="loss")
    batches = eval_batches(
        run.eval_data, tc.eval_batch_size or tc.micro_batch_size, run.tokenizer.pad_token_id
    )
    info = run.dist
    if info.enabled:  # each rank a share of the batches; token-weighted sums reduced
        batches = (b for i, b in enumerate(batches) if i % info.world == info.rank)
    loss, n = eval_loss(run.model, batches, run.device, tc.autocast)
    if info.enabled:
        total, count = all_sum([loss * n if n else 0.0, float(n)], run.device)
        loss, n = (total / count if count else math.nan), int(count)
    run.telemetry.emit(
        "eval", step=step, eval_loss=loss, eval_ppl=math.exp(min(loss, 50.0)), eval_tokens=n
    )
    return loss


def _task_eval(run: Run, step: int) -> dict[str, Any]:
    """The recipe's `eval:` section (accuracy, choices, loss); per-item predictions
    go to RUN_DIR/eval/step-N/. Data-parallel: rank 0 evaluates, the others wait."""
    assert run.recipe.eval is not None
    out = run.run_dir / "eval" / f"step-{step:07d}"
    if not run.dist.is_main:
        distributed.barrier()
        return {}
    run.telemetry.emit("eval_start", step=step, target="task")
    res = run_eval(
        run.model,
        run.tokenizer,
        run.recipe.eval,
        run.recipe.data,
        run.device,
        out,
        autocast=run.recipe.training.autocast,
        step=step,
    )
    run.model.train()
    run.telemetry.emit("task_eval", **{**res, "step": step, "dir": str(out)})
    distributed.barrier()
    return res


def probe(run: Run) -> None:
    """GRASS probing phase: T_p steps of forward+backward, no update; emits the MGN."""
    steps = run.recipe.sampler.probe_steps
    batches = (_next_step_batches(run)[0] for _ in range(steps))
    # Probing runs backward through every block: always with activation
    # checkpointing, so its peak stays far below full fine-tuning's.
    with checkpointed(run.model):
        probing = probe_blocks(
            run.model,
            run.block_map,
            run.tracker,
            batches,
            run.device,
            run.recipe.training.autocast,
            reducer=run.reducer,
        )
        for t, loss in enumerate(probing):
            run.telemetry.emit(
                "probe", probe_step=t, probe_steps=steps, loss=loss, **memory_stats(run.device)
            )
    mgn = run.tracker.mgn
    ranking = sorted(range(len(mgn)), key=lambda i: -float(mgn[i]))
    run.telemetry.emit(
        "probe_done",
        importance=run.tracker.values(),
        ranking=ranking,
        probabilities=run.sampler.probabilities(),
        # data-parallel: every block's gradient was reduced at every probing step
        allreduce_bytes=run.reducer.take_bytes() if run.reducer is not None else 0,
    )


class Interrupted(Exception):
    """Training stopped on request (SIGINT / SIGTERM) after saving a checkpoint."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(f"{signal_name} at step {step}; checkpoint {checkpoint}")


class NonFiniteError(GrassError):
    """Loss or gradients became NaN/inf; a checkpoint of the last good state was saved."""

    exit_code = 1


def _checkpoint(run: Run, step: int, result: TrainResult, active_names: set[str]) -> Path:
    if run.metrics_sink is not None:
        run.metrics_sink.flush()
    trainer = {
        "losses": result.losses,
        "eval_losses": result.eval_losses,
        "tokens": result.tokens,
        "peak_rss": result.peak_rss,
        "elapsed_s": result.elapsed_s,
        "active_names": sorted(active_names),
        "skipped": result.skipped,
        "metrics_offset": run.metrics_sink.tell() if run.metrics_sink is not None else 0,
        "world_size": run.dist.world,
    }
    path = save_checkpoint(run, step, trainer, run.recipe.checkpoint.keep_last)
    run.telemetry.emit("checkpoint", step=step, path=str(path))
    return path


def _run_facts(run: Run) -> dict[str, Any]:
    """What a console needs to describe the run: sent with `start` and `resume`."""
    rc, tc = run.recipe, run.recipe.training
    return {
        "model": rc.model.path,
        "model_source": run.model_source,
        "num_blocks": run.block_map.num_blocks,
        "blocks_path": run.block_map.blocks_path,
        # the model's parameters (the groups' for every strategy but lora, whose
        # groups leave the frozen base weights of the blocks out)
        "params": sum(p.numel() for p in run.model.parameters()),
        "tied": run.block_map.tied,
        "strategy": rc.sampler.strategy,
        "gamma": rc.sampler.gamma,
        "total_steps": run.total_steps,
        "global_batch": tc.micro_batch_size * tc.grad_accum_steps * run.dist.world,
        "micro_batch": tc.micro_batch_size,
        "grad_accum": tc.grad_accum_steps,
        "world_size": run.dist.world,
        "train_rows": run.train_data.rows,
        "train_tokens": run.train_data.trainable_tokens,
        "eval_rows": run.eval_data.rows if run.eval_data else 0,
        "device": str(run.device),
        "always_train": run.always_train,
        "run_dir": str(run.run_dir),
    }


def train(run: Run, stop: StopRequest | None = None) -> TrainResult:
    """The training loop, top to bottom.

    `stop` is set by the CLI's signal handlers: the loop finishes the current step,
    writes a checkpoint and raises `Interrupted`.
    """
    rc, tc = run.recipe, run.recipe.training
    result = TrainResult(run_dir=run.run_dir, model_dir=None, steps=run.total_steps)
    t_start = time.perf_counter()
    start_step = 0
    active_names: set[str] = set()
    if run.resume_from is not None:
        trainer = restore(run, run.resume_from)
        start_step = trainer["step"]
        active_names = set(trainer["active_names"])
        result.losses = list(trainer["losses"])
        result.eval_losses = dict(trainer["eval_losses"])
        result.tokens, result.peak_rss = trainer["tokens"], trainer["peak_rss"]
        result.skipped = trainer["skipped"]
        t_start -= trainer["elapsed_s"]
        run.telemetry.emit("resume", step=start_step, path=str(run.resume_from), **_run_facts(run))
    else:
        run.telemetry.emit("start", **_run_facts(run))
        first_eval = _evaluate(run, 0)
        if first_eval is not None:
            result.eval_losses[0] = first_eval
        if rc.sampler.strategy in PROBING:
            probe(run)

    skipped_in_a_row = 0
    reducer_names: set[str] | None = None  # what the reducer's buckets are laid out for
    for step in range(start_step, run.total_steps):
        t0 = time.perf_counter()
        # 1) which blocks train now; switch requires_grad and optimizer state
        active = run.sampler.active(step)
        names = {f"block.{i}" for i in active} | set(run.always_train)
        if names != active_names:
            activated, frozen = run.optimizer.set_active(names)
            active_names = names
            run.telemetry.emit(
                "switch",
                step=step,
                active=active,
                activated=activated,
                frozen=frozen,
                next_switch=run.sampler.next_switch(step),
            )
        if run.reducer is not None and names != reducer_names:
            # every rank must have drawn the same blocks, or they would diverge
            check_same("the active blocks", active, run.device, step)
            run.reducer.prepare(run.optimizer.trainable_params())
            reducer_names = names
        lr = lr_at(step, run.total_steps, rc.optimizer.lr, tc)
        # 2) forward / backward over the step's micro-batches (data-parallel: the
        #    trainable groups' gradients are summed across ranks during backward)
        micro, _ = _next_step_batches(run)
        loss = forward_backward(
            run.model, run.tracker, micro, run.device, tc.autocast, reducer=run.reducer
        )
        # 3) clip and step the active groups only, unless something is NaN/inf
        params = run.optimizer.trainable_params()
        max_norm = tc.grad_clip if tc.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            run.optimizer.step(lr)
            skipped_in_a_row = 0
        run.optimizer.zero_grad()
        if not finite:
            result.skipped += 1
            skipped_in_a_row += 1
            _nonfinite(run, step, loss, grad_norm, result, active_names, skipped_in_a_row)
        # ---- everything below is diagnostics
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        dt = time.perf_counter() - t0
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        allreduce_bytes = 0
        if run.reducer is not None:
            tokens = round(all_sum([float(tokens)], run.device)[0])
            allreduce_bytes = run.reducer.take_bytes()
        result.tokens += tokens
        result.losses.append(loss)
        mem = memory_stats(run.device)
        result.peak_rss = max(result.peak_rss, mem["rss"])
        result.elapsed_s = time.perf_counter() - t_start
        run.telemetry.emit(
            "step",
            step=step,
            total_steps=run.total_steps,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            skipped=not finite,
            tokens=tokens,
            tokens_total=result.tokens,
            tokens_per_s=tokens / dt if dt > 0 else 0.0,
            step_time=dt,
            elapsed_s=result.elapsed_s,
            active=active,
            importance=run.tracker.values(),
            probabilities=run.sampler.probabilities(),
            trainable_params=sum(p.numel() for p in params),
            allreduce_bytes=allreduce_bytes,
            **memory_breakdown(run, params),
            next_switch=run.sampler.next_switch(step),
            **mem,
        )
        done = step + 1
        if tc.eval_interval and done % tc.eval_interval == 0 and done < run.total_steps:
            ev = _evaluate(run, done)
            if ev is not None:
                result.eval_losses[done] = ev
        task = rc.eval
        if task and task.interval and done % task.interval == 0 and done < run.total_steps:
            _task_eval(run, done)
        stopping = stop is not None and stop.requested is not None
        if run.dist.enabled:  # a signal may reach the ranks at different steps
            stopping = any_rank(stopping, run.device)
        if stopping and done < run.total_steps:
            path = _checkpoint(run, done, result, active_names)
            raise Interrupted((stop and stop.requested) or "SIGTERM", done, path)
        interval = rc.checkpoint.interval
        if interval and done % interval == 0 and done < run.total_steps:
            _checkpoint(run, done, result, active_names)

    final_eval = _evaluate(run, run.total_steps)
    if final_eval is not None:
        result.eval_losses[run.total_steps] = final_eval
    if rc.eval is not None:
        result.task_eval = _task_eval(run, run.total_steps)
    if rc.checkpoint.at_end:
        _checkpoint(run, run.total_steps, result, active_names)
    if rc.output.save_model and run.dist.is_main:
        result.model_dir = save_model(run)
        run.telemetry.emit("saved", path=str(result.model_dir))
    result.elapsed_s = time.perf_counter() - t_start
    if not run.dist.is_main:
        distributed.barrier()  # rank 0 writes the model and summary
        return result
    evals = list(result.eval_losses.values())
    summary = {
        "steps": run.total_steps,
        "elapsed_s": result.elapsed_s,
        "tokens": result.tokens,
        "skipped_steps": result.skipped,
        "final_loss": result.losses[-1] if result.losses else None,
        "first_eval_loss": evals[0] if evals else None,
        "final_eval_loss": final_eval,
        "best_eval_loss": min(evals) if evals else None,
        "peak_rss": result.peak_rss,
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "run_dir": str(run.run_dir),
    }
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    run.telemetry.emit("end", **summary)
    distributed.barrier()
    return result


def _nonfinite(
    run: Run,
    step: int,
    loss: float,
    grad_norm: float,
    result: TrainResult,
    active_names: set[str],
    in_a_row: int,
) -> None:
    """A NaN/inf step: warn and skip, or stop with a checkpoint. Never silent."""
    tc = run.recipe.training
    what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step}"
    if tc.nonfinite == "skip" and in_a_row < tc.max_skipped_steps:
        run.telemetry.emit("warning", step=step, message=f"{what}: step skipped (no update)")
        return
    path = _checkpoint(run, step, result, active_names)
    reason = f"{in_a_row} non-finite steps in a row" if tc.nonfinite == "skip" else what
    raise NonFiniteError(
        f"training stopped: {reason}; the last good state is saved in {path}",
        where=str(run.run_dir),
        hint="lower optimizer.lr, set training.grad_clip, or use training.autocast: none; "
        "then continue with --resume auto",
    )


def memory_breakdown(run: Run, trainable: list[torch.nn.Parameter]) -> dict[str, int]:
    """Bytes by kind: weights, gradients of the trained parameters, optimizer state
    on the device and in the offload store, fp32 master weights."""
    weights = sum(p.numel() * p.element_size() for p in run.model.parameters())
    return {
        "weights_bytes": weights,
        "grad_bytes": sum(p.numel() * p.element_size() for p in trainable),
        **run.optimizer.memory(),
    }


def save_model(run: Run) -> Path:
    """HF folder (safetensors + tokenizer), written beside and renamed into place.

    LoRA runs save the adapters merged (a plain HF model, like every strategy's)
    and the unmerged adapter in final/adapter/."""
    final = run.run_dir / "final"
    tmp = run.run_dir / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_stderr():  # transformers' "Writing model shards" bar
        if run.peft_model is not None:  # merged HF model + final/adapter/
            from grass_cli import lora

            lora.save(run.peft_model, tmp)
        else:
            run.model.save_pretrained(tmp, safe_serialization=True)
        run.tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def run_training(
    recipe: Recipe,
    telemetry: Telemetry,
    overwrite: bool = False,
    resume: str | None = None,
    stop: StopRequest | None = None,
    dist_info: DistInfo | None = None,
) -> TrainResult:
    """Build and train; the store and sinks are always closed, even on error."""
    run = None
    try:
        run = setup(recipe, telemetry, overwrite=overwrite, resume=resume, dist_info=dist_info)
        return train(run, stop)
    finally:
        if run is not None and run.optimizer.store is not None:
            run.optimizer.store.close()
        telemetry.close()
        distributed.shutdown()
