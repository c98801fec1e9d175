"""What the loop tells its sinks: the run's facts, each step's event, the summary.

Diagnostics live here, beside the loop, so the loop shows only the stages of a
step; nothing here changes what trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from grass_cli.atomic import write_atomic_json
from grass_cli.distributed import all_sum
from grass_cli.sampling.importance import ranking
from grass_cli.sharding import local

if TYPE_CHECKING:
    from grass_cli.engine.build import Run
    from grass_cli.engine.result import TrainResult
    from grass_cli.engine.step import StepOutcome
    from grass_cli.run_state import RunState


def run_facts(run: Run) -> dict[str, Any]:
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
        "gamma_auto": rc._gamma_auto,  # why, when sampler.gamma: auto chose it
        "total_steps": run.total_steps,
        "global_batch": tc.micro_batch_size * tc.grad_accum_steps * run.dist.world,
        "micro_batch": tc.micro_batch_size,
        "grad_accum": tc.grad_accum_steps,
        "world_size": run.dist.world,
        "sharding": rc.distributed.sharding if run.dist.enabled or run.sharded else None,
        # distributed.cpu_offload: the shards (and AdamW) on the host
        "cpu_offload": bool(run.sharded and rc.distributed.cpu_offload),
        # None: data.streaming (the stream's length is unknown)
        "train_rows": run.train_data.rows if run.train_data else None,
        "train_tokens": run.train_data.trainable_tokens if run.train_data else None,
        "eval_rows": run.eval_data.rows if run.eval_data else 0,
        "device": str(run.device),
        # the kernel transformers chose or was asked for (model.attn_implementation)
        "attention": getattr(run.model.config, "_attn_implementation", None),
        "always_train": run.always_train,
        "run_dir": str(run.run_dir),
    }


def probe_done(run: Run) -> None:
    """The probing MGN, its ranking and the sampling probabilities it gives."""
    values = run.tracker.values()
    run.telemetry.emit(
        "probe_done",
        importance=values,
        ranking=ranking(values),
        probabilities=run.sampler.probabilities(),
        # data-parallel: every block's gradient was reduced at every probing step
        allreduce_bytes=run.reducer.take_bytes() if run.reducer is not None else 0,
    )


def step_tokens(run: Run, micro: list[dict[str, torch.Tensor]]) -> tuple[int, int]:
    """Tokens the step trained on (all ranks) and the bytes all-reduced for it."""
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    if run.reducer is None:
        return tokens, 0
    return round(all_sum([float(tokens)], run.device)[0]), run.reducer.take_bytes()


def memory_breakdown(run: Run, trainable: list[torch.nn.Parameter]) -> dict[str, int]:
    """Bytes by kind: weights, gradients of the trained parameters, optimizer state
    on the device and in the offload store, fp32 master weights. Sharded: this
    rank's shards (about 1/N of each)."""
    # (the block map's tensors: a sharded model's own may be gathered right now)
    weights = sum(
        local(p).numel() * p.element_size() for g in run.block_map.groups() for p in g.tensors
    )
    opt = run.optimizer.memory()
    if run.optimizer.device != run.device:  # distributed.cpu_offload: AdamW on the host
        opt["optimizer_state_offload_cpu_bytes"] += opt["optimizer_state_bytes"]
        opt["optimizer_state_bytes"] = 0
    return {
        "weights_bytes": weights,
        "grad_bytes": sum(local(p).numel() * p.element_size() for p in trainable),
        **opt,
    }


def step_event(
    run: Run,
    out: StepOutcome,
    progress: RunState,
    tokens: int,
    allreduce_bytes: int,
    mem: dict[str, Any],
) -> dict[str, Any]:
    """The fields of one `step` event (the schema docs/telemetry.md describes): the
    step's outcome, the run's totals so far, and the components' state."""
    return {
        "step": out.step,
        "total_steps": run.total_steps,
        "loss": out.loss,
        "lr": out.lr,
        "grad_norm": out.grad_norm,
        "skipped": not out.finite,
        "tokens": tokens,
        "tokens_total": progress.tokens,
        "tokens_per_s": tokens / out.seconds if out.seconds > 0 else 0.0,
        "step_time": out.seconds,
        "elapsed_s": progress.elapsed_s,
        "active": out.active,
        "importance": run.tracker.values(),
        "probabilities": run.sampler.probabilities(),
        "trainable_params": sum(p.numel() for p in out.params),
        "allreduce_bytes": allreduce_bytes,
        **memory_breakdown(run, out.params),
        "next_switch": run.sampler.next_switch(out.step),
        **mem,
    }


def write_summary(run: Run, result: TrainResult, final_eval: float | None) -> dict[str, Any]:
    """summary.json (written atomically), also the `end` event's fields."""
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
        # what a preemption's SIGTERM may wait for before its checkpoint is on disk
        # (the slowest step, then a checkpoint; None when no checkpoint was written)
        "slowest_step_s": result.progress.slowest_step_s,
        "slowest_checkpoint_s": result.progress.slowest_checkpoint_s or None,
        "sigterm_needs_s": (
            result.progress.slowest_step_s + result.progress.slowest_checkpoint_s
            if result.progress.slowest_checkpoint_s
            else None
        ),
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "run_dir": str(run.run_dir),
    }
    write_atomic_json(run.run_dir / "summary.json", summary)
    return summary
