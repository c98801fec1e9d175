"""The training loop: one screen, every stage by name.

choose blocks -> forward/backward with importance -> clip and step the active
groups -> telemetry -> eval / checkpoint. Every strategy (full, lisa, grass,
grass-static, cyclic, lora) runs this same loop; they differ only in the sampler
and the optimizer-state policy (and, for lora, in what a block's group holds).
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grass_cli import distributed
from grass_cli.distributed import any_rank
from grass_cli.engine import report
from grass_cli.engine.build import Run, setup
from grass_cli.engine.evals import evaluate_loss, task_eval
from grass_cli.engine.result import TrainResult
from grass_cli.engine.saving import restore, save_model, write_checkpoint
from grass_cli.engine.step import StepOutcome, run_step
from grass_cli.errors import GrassError
from grass_cli.oom import during
from grass_cli.recipe import PROBING, Recipe
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


def train(run: Run, stop: StopRequest | None = None) -> TrainResult:
    """Train `run` to its end; the run folder's lock is released however it ends
    (the run is over: another process may continue it)."""
    try:
        return loop(run, stop)
    finally:
        if run.lock is not None:
            run.lock.release()


def loop(run: Run, stop: StopRequest | None = None) -> TrainResult:
    """The training loop, top to bottom.

    `stop` is set by the CLI's signal handlers: the loop finishes the current step,
    writes a checkpoint and raises `Interrupted`.
    """
    res = begin(run)
    for step in range(res.progress.step, run.total_steps):
        # 1-3) the blocks, forward / backward, clip and update (engine/step.py)
        with phase(run, f"training step {step + 1}", "step"):
            out = run_step(run, step)
        if out.finite:
            res.progress.skipped_in_a_row = 0
        else:
            nonfinite(run, res, out)
        # 4) telemetry: one `step` event with everything a sink shows
        record_step(run, res, out)
        # 5) periodic evaluation, stop requests and checkpoints
        after_step(run, res, step + 1, stop)
    return finish(run, res)


def begin(run: Run) -> TrainResult:
    """A fresh start (first eval, probing) or the progress a checkpoint restores."""
    res = TrainResult(run.run_dir, None, run.total_steps, t_start=time.perf_counter())
    if run.resume_from is None:
        run.telemetry.emit("start", **report.run_facts(run))
        first_eval = evaluate_loss(run, 0)
        if first_eval is not None:
            res.progress.eval_losses[0] = first_eval
        if run.recipe.sampler.strategy in PROBING:
            probe_phase(run)
        return res
    state = restore(run, run.resume_from)
    res.progress = state.progress  # the RunState the checkpoint saved, as it was
    res.t_start = time.perf_counter() - state.progress.elapsed_s
    run.telemetry.emit(
        "resume", step=state.step, path=str(run.resume_from), **report.run_facts(run)
    )
    if res.progress.evals_due:  # the stop that wrote the checkpoint skipped them
        run_evals(run, res, state.step)
        res.progress.evals_due = False
    return res


def probe_phase(run: Run) -> None:
    """GRASS probing phase: T_p steps of forward+backward, no update; emits the MGN.

    Probing runs backward through every block: always with activation
    checkpointing, so its peak stays far below full fine-tuning's."""
    steps = run.recipe.sampler.probe_steps
    accum = run.recipe.training.grad_accum_steps
    batches = ([next(run.batches) for _ in range(accum)] for _ in range(steps))
    with phase(run, "probing block importance", "step"):
        for t, loss in enumerate(run.grass.probing(batches, run.recipe.training.autocast)):
            run.telemetry.emit(
                "probe", probe_step=t, probe_steps=steps, loss=loss, **memory_stats(run.device)
            )
    report.probe_done(run)


def nonfinite(run: Run, res: TrainResult, out: StepOutcome) -> None:
    """A NaN/inf step: warn and skip, or stop with a checkpoint. Never silent."""
    pr = res.progress
    pr.skipped += 1
    pr.skipped_in_a_row += 1
    tc, step = run.recipe.training, out.step
    bad = "loss" if not math.isfinite(out.loss) else "gradient norm"
    what = f"non-finite {bad} at step {step}"
    if tc.nonfinite == "skip" and pr.skipped_in_a_row < tc.max_skipped_steps:
        run.telemetry.emit("warning", step=step, message=f"{what}: step skipped (no update)")
        return
    path = checkpoint(run, res, step)
    reason = f"{pr.skipped_in_a_row} non-finite steps in a row" if tc.nonfinite == "skip" else what
    raise NonFiniteError(
        f"training stopped: {reason}; the last good state is saved in {path}",
        where=str(run.run_dir),
        hint="lower optimizer.lr, set training.grad_clip, or use training.autocast: none; "
        "then continue with --resume auto",
    )


def phase(run: Run, what: str, kind: str) -> AbstractContextManager[None]:
    """An allocation failure in the block is one message naming `what` (grass_cli/oom.py)."""
    return during(what, kind, run.recipe, run.device.type)


def record_step(run: Run, res: TrainResult, out: StepOutcome) -> None:
    """Account the step (tokens, time, memory) in the run's progress and emit its
    `step` event."""
    tokens, allreduce_bytes = report.step_tokens(run, out.micro)
    pr = res.progress
    pr.tokens += tokens
    pr.losses.append(out.loss)
    pr.slowest_step_s = max(pr.slowest_step_s, out.seconds)
    mem = memory_stats(run.device)
    pr.peak_rss = max(pr.peak_rss, mem["rss"])
    pr.elapsed_s = time.perf_counter() - res.t_start
    event = report.step_event(run, out, pr, tokens, allreduce_bytes, mem)
    run.telemetry.emit("step", **event)


def after_step(run: Run, res: TrainResult, done: int, stop: StopRequest | None) -> None:
    """A requested stop, then the evaluations and checkpoint due after `done` steps.

    The stop comes first: a preemption's grace period waits for no evaluation. The
    evaluations it skips are marked in the checkpoint and run by the resume."""
    ck = run.recipe.checkpoint
    res.progress.step = done
    if done >= run.total_steps:
        return
    stopping = stop is not None and stop.requested is not None
    if run.dist.enabled:  # a signal may reach the ranks at different steps
        stopping = any_rank(stopping, run.device)
    if stopping:
        res.progress.evals_due = any(evals_due(run, done))
        path = checkpoint(run, res, done, light=ck.on_signal == "light")
        raise Interrupted((stop and stop.requested) or "SIGTERM", done, path)
    run_evals(run, res, done)
    if ck.interval and done % ck.interval == 0:
        checkpoint(run, res, done)


def evals_due(run: Run, done: int) -> tuple[bool, bool]:
    """Whether the held-out loss and the task evaluation are due after `done` steps."""
    rc, tc = run.recipe, run.recipe.training
    loss = bool(tc.eval_interval) and done % tc.eval_interval == 0
    task = rc.eval is not None and bool(rc.eval.interval) and done % rc.eval.interval == 0
    return loss, task


def run_evals(run: Run, res: TrainResult, done: int) -> None:
    """The periodic evaluations due after `done` steps."""
    loss, task = evals_due(run, done)
    if loss:
        with phase(run, f"evaluating after step {done}", "eval"):
            ev = evaluate_loss(run, done)
        if ev is not None:
            res.progress.eval_losses[done] = ev
    if task:
        with phase(run, f"evaluating the task after step {done}", "eval"):
            task_eval(run, done)


def checkpoint(run: Run, res: TrainResult, step: int, light: bool = False) -> Path:
    """Write a checkpoint and say how long it took and how large it is (a preemption's
    grace period must cover the slowest step plus this)."""
    t0 = time.perf_counter()
    with phase(run, f"writing the checkpoint of step {step}", "save"):
        path = write_checkpoint(run, step, res.progress, light=light)
    seconds = time.perf_counter() - t0
    if not light:
        res.progress.slowest_checkpoint_s = max(res.progress.slowest_checkpoint_s, seconds)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
    run.telemetry.emit(
        "checkpoint", step=step, path=str(path), seconds=seconds, bytes=size, light=light
    )
    return path


def finish(run: Run, res: TrainResult) -> TrainResult:
    """Final evaluations, checkpoint, model and summary."""
    r, rc = res, run.recipe
    with phase(run, "evaluating at the end", "eval"):
        final_eval = evaluate_loss(run, run.total_steps)
        if final_eval is not None:
            r.progress.eval_losses[run.total_steps] = final_eval
        if rc.eval is not None:
            r.task_eval = task_eval(run, run.total_steps)
    if rc.checkpoint.at_end:
        checkpoint(run, res, run.total_steps)
    if rc.output.save_model and (run.dist.is_main or run.sharded is not None):
        with phase(run, "saving the final model", "save"):
            r.model_dir = save_model(run)  # (sharded: every rank gathers, rank 0 writes)
        run.telemetry.emit("saved", path=str(r.model_dir))
    r.progress.elapsed_s = time.perf_counter() - res.t_start
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
        if run is not None and run.lock is not None:  # (setup failed after building it)
            run.lock.release()
        telemetry.close()
        distributed.shutdown()
