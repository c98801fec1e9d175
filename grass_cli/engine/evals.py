"""Evaluation during training: held-out loss, and the recipe's task evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from grass_cli import distributed
from grass_cli.data import eval_batches
from grass_cli.data.tokens import IGNORE_INDEX
from grass_cli.distributed import all_sum
from grass_cli.evaluate import eval_loss, run_eval

if TYPE_CHECKING:
    from grass_cli.engine.build import Run


def evaluate_loss(run: Run, step: int) -> float | None:
    """Token-weighted loss on the eval data (None without eval data)."""
    if run.eval_data is None:
        return None
    tc = run.recipe.training
    run.telemetry.emit("eval_start", step=step, target="loss")
    batches = eval_batches(
        run.eval_data, tc.eval_batch_size or tc.micro_batch_size, run.tokenizer.pad_token_id
    )
    info = run.dist
    if info.enabled:  # each rank a share of the batches; token-weighted sums reduced
        batches = _share(batches, info.rank, info.world, lockstep=run.sharded is not None)
    loss, n = eval_loss(run.model, batches, run.device, tc.autocast)
    if info.enabled:
        total, count = all_sum([loss * n if n else 0.0, float(n)], run.device)
        loss, n = (total / count if count else math.nan), int(count)
    run.telemetry.emit(
        "eval", step=step, eval_loss=loss, eval_ppl=math.exp(min(loss, 50.0)), eval_tokens=n
    )
    return loss


def _share(
    batches: Iterator[dict[str, Any]], rank: int, world: int, lockstep: bool
) -> Iterator[dict[str, Any]]:
    """Every `world`-th batch from `rank` on. `lockstep` (sharded: FSDP2's gathers
    are collectives, so every rank must run as many forwards): a rank whose share
    is one short runs a copy of the first batch with every label masked, which
    counts no token."""
    first, mine, total = None, 0, 0
    for i, b in enumerate(batches):
        first = b if first is None else first
        total += 1
        if i % world == rank:
            mine += 1
            yield b
    if lockstep and first is not None and mine < math.ceil(total / world):
        yield {**first, "labels": torch.full_like(first["labels"], IGNORE_INDEX)}


def task_eval(run: Run, step: int) -> dict[str, Any]:
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
