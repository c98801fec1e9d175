"""The training engine: build the parts in dependency order, then one straight loop.

recipe -> device -> model + tokenizer -> block map -> data -> importance tracker
-> sampler -> state store + block-wise AdamW -> [probe] -> train loop -> save.

Every strategy (full, lisa, grass, grass-static, cyclic) runs this same loop;
they differ only in the sampler and the optimizer-state policy.
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

from grass_cli.blocks import BlockMap, build_block_map
from grass_cli.data import (
    BatchIterator,
    TokenizedData,
    build_dataset,
    eval_batches,
    steps_per_epoch,
)
from grass_cli.errors import GrassError
from grass_cli.evaluate import count_targets, eval_loss
from grass_cli.importance import ImportanceTracker
from grass_cli.models import load_model_and_tokenizer, max_positions
from grass_cli.optim import BlockAdamW, build_store, lr_at
from grass_cli.probing import forward_backward
from grass_cli.probing import probe as probe_blocks
from grass_cli.recipe import PROBING, Recipe
from grass_cli.sampling import Sampler, build_sampler
from grass_cli.state_store import DiskStore
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


# ----------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise GrassError(
            "training.device is cuda but no CUDA device is available",
            where="training.device",
            hint="use training.device=auto or cpu, or install a CUDA build of torch",
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(recipe: Recipe, overwrite: bool) -> Path:
    """Create the run dir; refuse to mix a new run into an old one's files."""
    run_dir = Path(recipe.output.dir)
    if (run_dir / "metrics.jsonl").exists() and not overwrite:
        raise GrassError(
            "the run dir already holds a run",
            where=f"output.dir: {run_dir}",
            hint="choose another output.dir, or pass --overwrite to replace it",
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise GrassError(
            f"cannot write to the run dir ({e.strerror})",
            where=f"output.dir: {run_dir}",
            hint="choose a writable output.dir",
        ) from None
    if overwrite:
        for stale in ("metrics.jsonl", "summary.json", "final"):
            target = run_dir / stale
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    return run_dir


def setup(recipe: Recipe, telemetry: Telemetry, overwrite: bool = False) -> Run:
    """Build every part of a run, in dependency order; nothing trains yet."""
    # 1) run dir first: a bad output.dir must fail before minutes of loading
    run_dir = prepare_run_dir(recipe, overwrite)
    telemetry.add(JsonlSink(run_dir / "metrics.jsonl"))
    tc = recipe.training
    device = resolve_device(tc.device)
    seed_everything(tc.seed)

    # 2) model and tokenizer, then the blocks, then checks that need the model
    model, tokenizer, source = load_model_and_tokenizer(recipe.model)
    block_map = build_block_map(model, recipe.model.blocks_attr)
    recipe.check_against_model(block_map.num_blocks, max_positions(model))
    model.to(device)
    model.train()

    # 3) data
    train_data = build_dataset(recipe.data, tokenizer, "train")
    eval_data = build_dataset(recipe.data, tokenizer, "eval") if recipe.data.eval else None
    batches = BatchIterator(
        train_data, tc.micro_batch_size, tokenizer.pad_token_id, seed=tc.seed, shuffle=True
    )
    if tc.max_steps is not None:
        total_steps = tc.max_steps
    else:
        per_epoch = steps_per_epoch(train_data.rows, tc.micro_batch_size, tc.grad_accum_steps)
        total_steps = max(1, math.ceil(float(tc.epochs or 1) * per_epoch))

    # 4) importance, sampler, optimizer (with its state policy)
    # Hooks can only be registered while parameters require grad: tracker first.
    tracker = ImportanceTracker(block_map.blocks, recipe.sampler.alpha, device)
    for group in block_map.groups():
        group.set_trainable(False)
    sampler = build_sampler(recipe.sampler, block_map.num_blocks, tracker, seed=tc.seed + 1)
    s = recipe.sampler
    always = [
        g.name for g in block_map.always_train(s.train_embeddings, s.train_norm, s.train_head)
    ]
    store = build_store(recipe.optimizer, device, run_dir)
    optimizer = BlockAdamW(block_map.groups(), recipe.optimizer, device, store)
    if isinstance(store, DiskStore):
        trainable = [b.name for b in block_map.blocks] + always
        DiskStore.check_space(store.folder, optimizer.offload_bytes_needed(trainable))
    if block_map.tied and s.train_embeddings != s.train_head:
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
    loss, n = eval_loss(
        run.model,
        eval_batches(
            run.eval_data, tc.eval_batch_size or tc.micro_batch_size, run.tokenizer.pad_token_id
        ),
        run.device,
        tc.autocast,
    )
    run.telemetry.emit(
        "eval", step=step, eval_loss=loss, eval_ppl=math.exp(min(loss, 50.0)), eval_tokens=n
    )
    return loss


def probe(run: Run) -> None:
    """GRASS probing phase: T_p steps of forward+backward, no update; emits the MGN."""
    steps = run.recipe.sampler.probe_steps
    batches = (_next_step_batches(run)[0] for _ in range(steps))
    probing = probe_blocks(
        run.model, run.block_map, run.tracker, batches, run.device, run.recipe.training.autocast
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
    )


def train(run: Run) -> TrainResult:
    """The training loop, top to bottom."""
    rc, tc = run.recipe, run.recipe.training
    result = TrainResult(run_dir=run.run_dir, model_dir=None, steps=run.total_steps)
    n_params = sum(g.numel for g in run.block_map.groups())
    global_batch = tc.micro_batch_size * tc.grad_accum_steps
    run.telemetry.emit(
        "start",
        model=rc.model.path,
        model_source=run.model_source,
        num_blocks=run.block_map.num_blocks,
        blocks_path=run.block_map.blocks_path,
        params=n_params,
        tied=run.block_map.tied,
        strategy=rc.sampler.strategy,
        gamma=rc.sampler.gamma,
        total_steps=run.total_steps,
        global_batch=global_batch,
        train_rows=run.train_data.rows,
        train_tokens=run.train_data.trainable_tokens,
        eval_rows=run.eval_data.rows if run.eval_data else 0,
        device=str(run.device),
        always_train=run.always_train,
        run_dir=str(run.run_dir),
    )
    t_start = time.perf_counter()
    first_eval = _evaluate(run, 0)
    if first_eval is not None:
        result.eval_losses[0] = first_eval
    if rc.sampler.strategy in PROBING:
        probe(run)

    active_names: set[str] = set()
    for step in range(run.total_steps):
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
        lr = lr_at(step, run.total_steps, rc.optimizer.lr, tc)
        # 2) forward / backward over the step's micro-batches
        micro, _ = _next_step_batches(run)
        loss = forward_backward(run.model, run.tracker, micro, run.device, tc.autocast)
        # 3) clip and step the active groups only
        params = run.optimizer.trainable_params()
        max_norm = tc.grad_clip if tc.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        run.optimizer.step(lr)
        run.optimizer.zero_grad()
        # ---- everything below is diagnostics
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        dt = time.perf_counter() - t0
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        result.tokens += tokens
        result.losses.append(loss)
        mem = memory_stats(run.device)
        result.peak_rss = max(result.peak_rss, mem["rss"])
        run.telemetry.emit(
            "step",
            step=step,
            total_steps=run.total_steps,
            loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens=tokens,
            tokens_total=result.tokens,
            tokens_per_s=tokens / dt if dt > 0 else 0.0,
            step_time=dt,
            elapsed_s=time.perf_counter() - t_start,
            active=active,
            importance=run.tracker.values(),
            probabilities=run.sampler.probabilities(),
            trainable_params=sum(p.numel() for p in params),
            **memory_breakdown(run, params),
            next_switch=run.sampler.next_switch(step),
            **mem,
        )
        if tc.eval_interval and (step + 1) % tc.eval_interval == 0 and step + 1 < run.total_steps:
            ev = _evaluate(run, step + 1)
            if ev is not None:
                result.eval_losses[step + 1] = ev

    final_eval = _evaluate(run, run.total_steps)
    if final_eval is not None:
        result.eval_losses[run.total_steps] = final_eval
    if rc.output.save_model:
        result.model_dir = save_model(run)
        run.telemetry.emit("saved", path=str(result.model_dir))
    result.elapsed_s = time.perf_counter() - t_start
    evals = list(result.eval_losses.values())
    summary = {
        "steps": run.total_steps,
        "elapsed_s": result.elapsed_s,
        "tokens": result.tokens,
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
    return result


def memory_breakdown(run: Run, trainable: list[torch.nn.Parameter]) -> dict[str, int]:
    """Bytes by kind: weights, gradients of the trained parameters, optimizer state
    on the device and in the offload store, fp32 master weights."""
    weights = sum(g.numel * g.tensors[0].element_size() for g in run.block_map.groups())
    return {
        "weights_bytes": weights,
        "grad_bytes": sum(p.numel() * p.element_size() for p in trainable),
        **run.optimizer.memory(),
    }


def save_model(run: Run) -> Path:
    """HF folder (safetensors + tokenizer), written beside and renamed into place."""
    final = run.run_dir / "final"
    tmp = run.run_dir / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    run.model.save_pretrained(tmp, safe_serialization=True)
    run.tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def run_training(recipe: Recipe, telemetry: Telemetry, overwrite: bool = False) -> TrainResult:
    """Build and train; the sinks are always closed, even on error."""
    run = None
    try:
        run = setup(recipe, telemetry, overwrite=overwrite)
        return train(run)
    finally:
        if run is not None and run.optimizer.store is not None:
            run.optimizer.store.close()
        telemetry.close()
