"""One training step, start to end, and the outcome it hands to telemetry.

choose blocks (Grass.begin_step; a switch is logged) -> forward/backward over the
step's micro-batches (the tracker reads each block's gradient norm) -> clip the
active groups -> AdamW on them unless something is NaN/inf. `run_step` returns a
`StepOutcome`, which the loop accounts and report.step_event turns into the event.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from grass_cli.distributed import check_same
from grass_cli.engine.schedule import lr_at
from grass_cli.sampling.probing import forward_backward
from grass_cli.sharding import as_float

if TYPE_CHECKING:
    from grass_cli.engine.build import Run


@dataclass
class StepOutcome:
    """What one step did: what telemetry reads and the loop accounts."""

    step: int
    active: list[int]  # the blocks trained
    lr: float  # the schedule's (before any lr_correction multiplier)
    micro: list[dict[str, torch.Tensor]]  # the micro-batches (their tokens are counted)
    loss: float
    grad_norm: float  # before clipping
    params: list[torch.nn.Parameter]  # the parameters trained
    seconds: float  # the step's wall time (CUDA: synchronized)

    @property
    def finite(self) -> bool:
        """False: NaN/inf loss or gradients, and no update was made."""
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def run_step(run: Run, step: int) -> StepOutcome:
    """The step: blocks, forward/backward, clip, update (skipped when not finite)."""
    tc = run.recipe.training
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
    if math.isfinite(loss) and math.isfinite(grad_norm):
        run.grass.step(lr)
    run.grass.zero_grad()
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - t0
    return StepOutcome(step, active, lr, micro, loss, grad_norm, params, seconds)


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
