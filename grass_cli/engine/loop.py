"""The training loop: one screen, every stage by name.

choose blocks -> forward/backward with importance -> clip and step the active
groups -> telemetry -> eval / checkpoint. Every strategy (full, lisa, grass,
grass-static, cyclic, lora) runs this same loop; they differ only in the sampler
and the optimizer-state policy (and, for lora, in what a block's group holds).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grass_cli import distributed
from grass_cli.distributed import any_rank, check_same
from grass_cli.engine import report
from grass_cli.engine.build import Run, setup
from grass_cli.engine.evals import evaluate_loss, task_eval
from grass_cli.engine.result import TrainResult
from grass_cli.engine.saving import restore, save_model, write_checkpoint
from grass_cli.engine.schedule import lr_at
from grass_cli.errors import GrassError
from grass_cli.recipe import PROBING, Recipe
from grass_cli.sampling.probing import forward_backward
from grass_cli.sharding import as_float
from grass_cli.telemetry import Telemetry
from grass_cli.telemetry.memory import memory_stats


@dataclass
class StopRequest:
    """Set by a signal handler (the CLI's): the loop checkpoints and stops after the step."""

    requested: str | None = None  # the signal's name, e.g. "SIGINT"


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


@dataclass
class Progress:
    """What the loop carries from step to step (and a checkpoint saves)."""

    result: TrainResult
    t_start: float
    start_step: int = 0
    skipped_in_a_row: int = 0


def train(run: Run, stop: StopRequest | None = None) -> TrainResult:
    """The training loop, top to bottom.

    `stop` is set by the CLI's signal handlers: the loop finishes the current step,
    writes a checkpoint and raises `Interrupted`.
    """
    tc = run.recipe.training
    pr = begin(run)
    for step in range(pr.start_step, run.total_steps):
        t0 = time.perf_counter()
        # 1) which blocks train now: requires_grad and optimizer state follow
        active = choose_blocks(run, step)
        lr = lr_at(step, run.total_steps, run.recipe.optimizer.lr, tc)
        # 2) forward / backward over the step's micro-batches; the tracker reads each
        #    block's gradient norm in backward (data-parallel: summed across ranks)
        micro = [next(run.batches) for _ in range(tc.grad_accum_steps)]
        loss = forward_backward(
            run.model, run.tracker, micro, run.device, tc.autocast, reducer=run.reducer
        )
        # 3) clip and step the active groups only, unless something is NaN/inf
        params = run.optimizer.trainable_params()
        max_norm = tc.grad_clip if tc.grad_clip is not None else math.inf
        grad_norm = as_float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            run.grass.step(lr)
            pr.skipped_in_a_row = 0
        run.grass.zero_grad()
        if not finite:
            nonfinite(run, pr, step, loss, grad_norm)
        # 4) telemetry: one `step` event with everything a sink shows
        record_step(run, pr, step, t0, micro, loss, lr, grad_norm, finite, active, params)
        # 5) periodic evaluation, stop requests and checkpoints
        after_step(run, pr, step + 1, stop)
    return finish(run, pr)


def begin(run: Run) -> Progress:
    """A fresh start (first eval, probing) or the state a checkpoint restores."""
    pr = Progress(TrainResult(run.run_dir, None, run.total_steps), time.perf_counter())
    if run.resume_from is None:
        run.telemetry.emit("start", **report.run_facts(run))
        first_eval = evaluate_loss(run, 0)
        if first_eval is not None:
            pr.result.eval_losses[0] = first_eval
        if run.recipe.sampler.strategy in PROBING:
            probe(run)
        return pr
    state = restore(run, run.resume_from)
    pr.start_step = state.step
    r = pr.result
    r.losses, r.eval_losses = list(state.losses), dict(state.eval_losses)
    r.tokens, r.peak_rss, r.skipped = state.tokens, state.peak_rss, state.skipped
    pr.t_start -= state.elapsed_s
    run.telemetry.emit(
        "resume", step=pr.start_step, path=str(run.resume_from), **report.run_facts(run)
    )
    return pr


def probe(run: Run) -> None:
    """GRASS probing phase: T_p steps of forward+backward, no update; emits the MGN.

    Probing runs backward through every block: always with activation
    checkpointing, so its peak stays far below full fine-tuning's."""
    steps = run.recipe.sampler.probe_steps
    accum = run.recipe.training.grad_accum_steps
    batches = ([next(run.batches) for _ in range(accum)] for _ in range(steps))
    for t, loss in enumerate(run.grass.probing(batches, run.recipe.training.autocast)):
        run.telemetry.emit(
            "probe", probe_step=t, probe_steps=steps, loss=loss, **memory_stats(run.device)
        )
    report.probe_done(run)


def choose_blocks(run: Run, step: int) -> list[int]:
    """The sampler's blocks for this step; a new set switches the optimizer (and a
    redraw that changes only the lr_correction multipliers is logged as one too)."""
    switch = run.grass.begin_step(step)
    if switch is not None:
        s = switch.lr_scales
        scales = {"lr_scales": [s[i] for i in switch.active]} if s else {}
        run.telemetry.emit(
            "switch",
            step=step,
            active=switch.active,
            activated=switch.activated,
            frozen=switch.frozen,
            next_switch=switch.next_switch,
            **scales,
        )
        if run.reducer is not None:  # every rank must have drawn the same blocks
            check_same("the active blocks", switch.active, run.device, step)
    return run.grass.active


def nonfinite(run: Run, pr: Progress, step: int, loss: float, grad_norm: float) -> None:
    """A NaN/inf step: warn and skip, or stop with a checkpoint. Never silent."""
    pr.result.skipped += 1
    pr.skipped_in_a_row += 1
    tc = run.recipe.training
    what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step}"
    if tc.nonfinite == "skip" and pr.skipped_in_a_row < tc.max_skipped_steps:
        run.telemetry.emit("warning", step=step, message=f"{what}: step skipped (no update)")
        return
    path = checkpoint(run, pr, step)
    reason = f"{pr.skipped_in_a_row} non-finite steps in a row" if tc.nonfinite == "skip" else what
    raise NonFiniteError(
        f"training stopped: {reason}; the last good state is saved in {path}",
        where=str(run.run_dir),
        hint="lower optimizer.lr, set training.grad_clip, or use training.autocast: none; "
        "then continue with --resume auto",
    )


def record_step(
    run: Run,
    pr: Progress,
    step: int,
    t0: float,
    micro: list[dict[str, torch.Tensor]],
    loss: float,
    lr: float,
    grad_norm: float,
    finite: bool,
    active: list[int],
    params: list[torch.nn.Parameter],
) -> None:
    """Account the step (tokens, time, memory) and emit its `step` event."""
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    dt = time.perf_counter() - t0
    tokens, allreduce_bytes = report.step_tokens(run, micro)
    r = pr.result
    r.tokens += tokens
    r.losses.append(loss)
    mem = memory_stats(run.device)
    r.peak_rss = max(r.peak_rss, mem["rss"])
    r.elapsed_s = time.perf_counter() - pr.t_start
    event = report.step_event(
        run,
        step,
        r,
        loss=loss,
        lr=lr,
        grad_norm=grad_norm,
        skipped=not finite,
        tokens=tokens,
        step_time=dt,
        active=active,
        params=params,
        allreduce_bytes=allreduce_bytes,
        mem=mem,
    )
    run.telemetry.emit("step", **event)


def after_step(run: Run, pr: Progress, done: int, stop: StopRequest | None) -> None:
    """Evaluations and checkpoints due after `done` steps, and a requested stop."""
    rc, tc = run.recipe, run.recipe.training
    if done >= run.total_steps:
        return
    if tc.eval_interval and done % tc.eval_interval == 0:
        ev = evaluate_loss(run, done)
        if ev is not None:
            pr.result.eval_losses[done] = ev
    if rc.eval and rc.eval.interval and done % rc.eval.interval == 0:
        task_eval(run, done)
    stopping = stop is not None and stop.requested is not None
    if run.dist.enabled:  # a signal may reach the ranks at different steps
        stopping = any_rank(stopping, run.device)
    if stopping:
        path = checkpoint(run, pr, done)
        raise Interrupted((stop and stop.requested) or "SIGTERM", done, path)
    if rc.checkpoint.interval and done % rc.checkpoint.interval == 0:
        checkpoint(run, pr, done)


def checkpoint(run: Run, pr: Progress, step: int) -> Path:
    path = write_checkpoint(run, step, pr.result)
    run.telemetry.emit("checkpoint", step=step, path=str(path))
    return path


def finish(run: Run, pr: Progress) -> TrainResult:
    """Final evaluations, checkpoint, model and summary."""
    r, rc = pr.result, run.recipe
    final_eval = evaluate_loss(run, run.total_steps)
    if final_eval is not None:
        r.eval_losses[run.total_steps] = final_eval
    if rc.eval is not None:
        r.task_eval = task_eval(run, run.total_steps)
    if rc.checkpoint.at_end:
        checkpoint(run, pr, run.total_steps)
    if rc.output.save_model and (run.dist.is_main or run.sharded is not None):
        r.model_dir = save_model(run)  # (sharded: every rank gathers, rank 0 writes)
        run.telemetry.emit("saved", path=str(r.model_dir))
    r.elapsed_s = time.perf_counter() - pr.t_start
    if not run.dist.is_main:
        distributed.barrier()  # rank 0 writes the model and summary
        return r
    summary = report.write_summary(run, r, final_eval)
    run.telemetry.emit("end", **summary)
    distributed.barrier()
    return r


def run_training(
    recipe: Recipe,
    telemetry: Telemetry,
    overwrite: bool = False,
    resume: str | None = None,
    stop: StopRequest | None = None,
    dist_info: Any = None,
) -> TrainResult:
    """Build and train; the store and sinks are always closed, even on error."""
    run = None
    try:
        run = setup(recipe, telemetry, overwrite=overwrite, resume=resume, dist_info=dist_info)
        return train(run, stop)
    except RuntimeError as e:  # a collective whose peer is gone: one message, not a trace
        lost = run and distributed.peer_lost(e, run.dist, recipe.distributed.timeout_s)
        if lost:
            raise lost from None
        raise
    finally:
        if run is not None and run.optimizer.store is not None:
            run.optimizer.store.close()
        telemetry.close()
        distributed.shutdown()
