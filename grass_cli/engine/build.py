"""Building a run: each component from its own recipe section, in dependency order.

recipe -> run folder checks -> device -> model + tokenizer -> block map -> data
-> importance tracker (+ gradient reducer) -> sampler -> state store + AdamW.

Everything a user can get wrong (run folder, checkpoint, model, data, gamma) is
checked before the run folder gets a single file. The loop (loop.py) holds what
this returns; the components never hold the loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grass_cli import distributed, sharded_io, sharding
from grass_cli.api import Grass
from grass_cli.atomic import describe_write_error
from grass_cli.data import BatchIterator, TokenizedData
from grass_cli.data.feed import training_batches
from grass_cli.data.packing import check_model_packs
from grass_cli.data.stream import StreamBatches
from grass_cli.distributed import SINGLE, DistInfo, GradReducer
from grass_cli.engine import run_dir as rundir
from grass_cli.engine import run_lock
from grass_cli.engine.run_lock import RunLock
from grass_cli.evaluate.source import check_source, require_source
from grass_cli.model_memory import sparse_tied_embedding_grads
from grass_cli.models import (
    has_safetensors,
    load_model_and_tokenizer,
    max_positions,
    resolve_device,
    resolve_model_path,
)
from grass_cli.offload.optimizer import BlockAdamW
from grass_cli.offload.store import DiskStore, build_store
from grass_cli.oom import during
from grass_cli.planner.auto import resolve_gamma
from grass_cli.recipe import Recipe
from grass_cli.sampling import Sampler, build_sampler
from grass_cli.sampling.blocks import BlockMap, build_block_map, find_blocks
from grass_cli.sampling.importance import ImportanceTracker
from grass_cli.sharding import Sharded, ShardedGrads
from grass_cli.telemetry import Telemetry
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
    train_data: TokenizedData | None  # None: data.streaming (rows tokenized as they come)
    eval_data: TokenizedData | None
    batches: BatchIterator | StreamBatches
    # the layer-wise core, the public API's object (grass_cli/api.py): block map,
    # importance tracker, sampler, block optimizer and, several processes, the reducer
    grass: Grass
    total_steps: int
    telemetry: Telemetry
    metrics_sink: JsonlSink | None  # rank 0 only
    resume_from: Path | None = None
    dist: DistInfo = SINGLE
    # strategy lora: peft's wrapper around `model` (which trains with the adapters
    # injected), kept to save the merged model and the adapter.
    peft_model: Any = None
    sharded: Sharded | None = None  # distributed.sharding: fsdp under torchrun
    # rank 0's hold on the run folder (engine/run_lock.py), released when the run ends
    lock: RunLock | None = None

    # (read through `grass`, their one owner)
    @property
    def block_map(self) -> BlockMap:
        return self.grass.block_map

    @property
    def tracker(self) -> ImportanceTracker:
        return self.grass.tracker

    @property
    def sampler(self) -> Sampler:
        return self.grass.sampler

    @property
    def optimizer(self) -> BlockAdamW:
        return self.grass.optimizer

    @property
    def always_train(self) -> list[str]:
        return self.grass.always_train

    @property
    def reducer(self) -> GradReducer | ShardedGrads | None:
        return self.grass.reducer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(
    recipe: Recipe,
    telemetry: Telemetry,
    overwrite: bool = False,
    resume: str | None = None,
    dist_info: DistInfo | None = None,
) -> Run:
    """Build every part of a run, in dependency order; nothing trains yet.

    Under torchrun (`dist_info` from the environment when not given) every rank
    builds the same run; rank 0 alone writes the run folder's files.
    """
    info = dist_info if dist_info is not None else distributed.from_env()
    lock = lock_run_dir(recipe, info)  # before the folder's first check: no race
    try:
        run = _build(recipe, telemetry, overwrite, resume, info)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    if lock is not None and lock.stale:
        telemetry.emit(
            "warning",
            message=f"the run folder's lock was left by {run_lock.describe(lock.stale)}, "
            "which is no longer running; taken over",
        )
    return run


def lock_run_dir(recipe: Recipe, info: DistInfo) -> RunLock | None:
    """Rank 0 locks the run folder (one live run per folder), or one message naming
    the live run that holds it."""
    if not info.is_main:
        return None
    run_dir = Path(recipe.output.dir)
    rundir.check_writable(run_dir)
    try:
        return run_lock.acquire(run_dir)
    except OSError as e:
        raise rundir.unwritable(run_dir, describe_write_error(e)) from None


def _build(
    recipe: Recipe, telemetry: Telemetry, overwrite: bool, resume: str | None, info: DistInfo
) -> Run:
    device = distributed.device_for(info, resolve_device(recipe.training.device))
    # sampler.gamma: auto becomes a number first: the run folder records it, and a
    # resume compares it with the one the run started with
    recipe = resolve_gamma(recipe, device.type, _device_total(device))
    resume_from = rundir.resolve_resume(recipe, resume, overwrite, info.world)
    sharding.check_launch(recipe.distributed, info.world, recipe.source)
    dc = recipe.distributed
    distributed.init(
        info, device, dc.timeout_s, alone_too=sharding.wanted(dc),
        host_tensors=_params_on_host(recipe),
    )  # fmt: skip
    seed_everything(recipe.training.seed)
    with during("loading the model", "model", recipe, device.type):
        model, tokenizer, source, block_map, peft_model, sharded = build_model(recipe, device, info)
    with during("reading and tokenizing the data", "data", recipe, device.type):
        train_data, eval_data, batches, total_steps = build_data(recipe, tokenizer, info)
    run_dir, metrics_sink = open_run_dir(recipe, overwrite, resume_from, info, telemetry)
    tracker, reducer = build_importance(recipe, block_map, device, info, sharded)
    sampler = build_sampler(
        recipe.sampler, block_map.num_blocks, tracker, seed=recipe.training.seed + 1
    )
    with during("building the optimizer", "optimizer", recipe, device.type):
        optimizer, always = build_optimizer(recipe, block_map, device, run_dir, info, peft_model)
    s = recipe.sampler
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
        train_data=train_data,
        eval_data=eval_data,
        batches=batches,
        grass=Grass.from_parts(model, block_map, tracker, sampler, optimizer, always, reducer),
        total_steps=total_steps,
        telemetry=telemetry,
        metrics_sink=metrics_sink,
        resume_from=resume_from,
        dist=info,
        peft_model=peft_model,
        sharded=sharded,
    )


def _device_total(device: torch.device) -> int | None:
    """A CUDA device's total memory (sampler.gamma: auto's `device` budget)."""
    return int(torch.cuda.mem_get_info(device)[1]) if device.type == "cuda" else None


def build_model(
    recipe: Recipe, device: torch.device, info: DistInfo
) -> tuple[Any, Any, str, BlockMap, Any, Sharded | None]:
    """Model, tokenizer, where it came from, its block map, peft's wrapper (LoRA),
    and, sharded, the FSDP2 units (the block map then holds the sharded weights)."""
    shard = sharding.wanted(recipe.distributed)  # (LoRA is refused with it)
    # sharded, no rank loads the whole model: each reads its own rows of the weights
    empty = shard and has_safetensors(resolve_model_path(recipe.model.path))
    model, tokenizer, source = load_model_and_tokenizer(recipe.model, empty_weights=empty)
    peft_model, sharded = None, None
    if recipe.sampler.strategy == "lora":
        from grass_cli import lora  # imports peft: only for LoRA runs

        peft_model = lora.wrap(model, recipe.lora, recipe.model.blocks_attr)
        block_map = lora.adapter_block_map(peft_model, recipe.model.blocks_attr)
    elif shard:
        layers, _ = find_blocks(model, recipe.model.blocks_attr)
        sharded = sharding.shard_model(model, layers, recipe.distributed, info, device)
        if empty:  # (cpu_offload: the shards live on the host)
            home = torch.device("cpu") if _params_on_host(recipe) else device
            sharded_io.materialize(model, home, Path(source))
        block_map = build_block_map(model, recipe.model.blocks_attr)  # the sharded weights
    else:
        block_map = build_block_map(model, recipe.model.blocks_attr)
        sparse_tied_embedding_grads(model)  # (a sparse gradient cannot be reduce-scattered)
    recipe.check_against_model(block_map.num_blocks, max_positions(model))
    if sharded is None:
        model.to(device)
    if recipe.data.packing:  # a model that would leak across packed rows is refused
        check_model_packs(model, device)
    model.train()
    return model, tokenizer, source, block_map, peft_model, sharded


def build_data(
    recipe: Recipe, tokenizer: Any, info: DistInfo
) -> tuple[TokenizedData | None, TokenizedData | None, BatchIterator | StreamBatches, int]:
    """Training and eval data, the seeded batch stream, and the number of steps
    (the task-eval file is checked too: a missing one must not cost a training run)."""
    tc = recipe.training
    if recipe.eval is not None:
        check_source(require_source(recipe.eval, recipe.data))
    batches, train_data, eval_data = training_batches(
        recipe.data, tokenizer, tc.micro_batch_size, tc.seed, rank=info.rank, world=info.world
    )
    if tc.max_steps is not None:  # (the recipe refuses epochs with streaming)
        return train_data, eval_data, batches, tc.max_steps
    assert isinstance(batches, BatchIterator)
    total = batches.steps_for_epochs(float(tc.epochs or 1), tc.grad_accum_steps)
    return train_data, eval_data, batches, total


def open_run_dir(
    recipe: Recipe,
    overwrite: bool,
    resume_from: Path | None,
    info: DistInfo,
    telemetry: Telemetry,
) -> tuple[Path, JsonlSink | None]:
    """The run folder's files (rank 0): marker, recipe, metrics.jsonl continued where
    the checkpoint left it, and the sink that appends to it."""
    run_dir = Path(recipe.output.dir)
    sink = None
    if info.is_main:
        run_dir = rundir.materialize(recipe, overwrite, resume_from)
        sink = JsonlSink(run_dir / "metrics.jsonl", append=resume_from is not None)
        telemetry.add(sink)
    distributed.barrier()  # the run folder exists (and stale files are gone) for every rank
    return run_dir, sink


def build_importance(
    recipe: Recipe,
    block_map: BlockMap,
    device: torch.device,
    info: DistInfo,
    sharded: Sharded | None,
) -> tuple[ImportanceTracker, GradReducer | ShardedGrads | None]:
    """The MGN tracker (hooks can only be registered while parameters require grad,
    so before anything is frozen) and, data-parallel, the gradient reducer that
    feeds it the summed gradients (sharded: FSDP2 reduces them, and the tracker
    sums each rank's squared norms)."""
    tracker = ImportanceTracker(block_map.blocks, recipe.sampler.alpha, device)
    # Only grass reads the MGN while it trains (probing observes for every
    # strategy that probes); `output.importance: always` observes anyway.
    tracker.observing = recipe.sampler.strategy == "grass" or recipe.output.importance == "always"
    reducer: GradReducer | ShardedGrads | None = None
    if sharded is not None:
        tracker.local_hooks = False
        tracker.observe_shards = True
        tracker.reduce = sharding.sum_over(sharded.group)
        reducer = ShardedGrads(sharded.units)
    elif info.enabled:
        tracker.local_hooks = False
        params = list({id(p): p for g in block_map.groups() for p in g.tensors}.values())
        bucket = int(recipe.training.allreduce_bucket_mb * 2**20)
        reducer = GradReducer(params, bucket, observe=tracker.observe)
    for group in block_map.groups():
        group.set_trainable(False)
    return tracker, reducer


def build_optimizer(
    recipe: Recipe,
    block_map: BlockMap,
    device: torch.device,
    run_dir: Path,
    info: DistInfo,
    peft_model: Any,
) -> tuple[BlockAdamW, list[str]]:
    """Block-wise AdamW with its state store, and the groups that always train."""
    s = recipe.sampler
    always = [
        g.name for g in block_map.always_train(s.train_embeddings, s.train_norm, s.train_head)
    ]
    if peft_model is not None:
        always = []  # LoRA: only the adapters train; embeddings, norms and head stay frozen
    trainable = [b.name for b in block_map.blocks] + always
    budget = _host_budget(recipe, device)
    subdir = f"rank-{info.rank}" if info.enabled else None
    # distributed.cpu_offload: the shards, their gradients and so AdamW are on the host
    home = torch.device("cpu") if _params_on_host(recipe) else device
    store = build_store(recipe.optimizer, home, run_dir, subdir, budget)
    optimizer = BlockAdamW(block_map.groups(), recipe.optimizer, home, store)
    if store is not None and store.target in ("disk", "tiered"):
        spill = optimizer.offload_bytes_needed(trainable) - (budget or 0)
        DiskStore.check_space(store.folder, max(spill, 0))
    return optimizer, always


def _params_on_host(recipe: Recipe) -> bool:
    return sharding.wanted(recipe.distributed) and recipe.distributed.cpu_offload


def _host_budget(recipe: Recipe, device: torch.device) -> int | None:
    """The two-tier store's pinned budget in bytes (None: every chunk pinned), as the
    planner resolves optimizer.offload.host_budget against this machine's RAM."""
    from grass_cli.planner import tiers
    from grass_cli.planner.machine import host_memory, runtime_bytes
    from grass_cli.planner.shape import build_layout, load_config
    from grass_cli.planner.sharded import shards as plan_shards
    from grass_cli.planner.verdict import dataset_bytes

    if not tiers.applies(recipe) or recipe.optimizer.offload.host_budget is None:
        return None
    if recipe._host_budget is not None:  # pre-flight resolved it (grass train)
        return recipe._host_budget
    lay = build_layout(recipe, *load_config(recipe))
    r = tiers.resolve_budget(
        recipe,
        lay,
        device.type,
        host_memory(),
        dataset_bytes(recipe),
        runtime_bytes(),
        distributed.local_world(),
        plan_shards(recipe, distributed.from_env().world),
    )
    return r._host_budget
