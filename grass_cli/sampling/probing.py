"""Forward/backward of one step, and GRASS probing: shared by `grass train` and
`grass inspect-importance`, so both measure importance with the same code."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from grass_cli.distributed import GradReducer, all_sum
from grass_cli.evaluate import autocast_ctx, count_targets, loss_sum
from grass_cli.sampling.blocks import BlockMap
from grass_cli.sampling.importance import ImportanceTracker


def forward_backward(
    model: torch.nn.Module,
    tracker: ImportanceTracker,
    micro: list[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: str = "none",
    reducer: GradReducer | None = None,
    probing: bool = False,
) -> float:
    """Accumulate gradients of the step's token-mean loss over its micro-batches.

    Each micro-batch's summed loss is divided by the whole step's target-token
    count, so accumulation gives the gradient of one big batch. Returns the loss.

    Data-parallel (`reducer` given): the token counts are summed across ranks
    first, so each rank's loss is its share of the *global* mean and the summed
    gradients equal one process's gradient on the global batch. Gradients are
    reduced once per step, during the last micro-batch's backward (earlier ones
    accumulate locally), and the tracker observes the reduced gradient: one MGN
    observation per step instead of per micro-batch. While `probing`, every
    micro-batch is reduced and observed on its own, as on one process.
    """
    counts = [count_targets(b) for b in micro]
    if reducer is not None:
        counts = [round(c) for c in all_sum([float(c) for c in counts], device)]
    n_targets = sum(counts)
    last = max((i for i, c in enumerate(counts) if c), default=-1)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        n_micro = counts[i]
        if n_micro == 0:  # (the global count: every rank skips the same ones)
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast_ctx(device, autocast):
            loss = loss_sum(model, batch) / n_targets
        if reducer is None:
            tracker.begin_micro_batch(loss_scale=n_micro / n_targets)
            loss.backward()
            tracker.end_micro_batch()
        elif probing:
            tracker.begin_micro_batch(loss_scale=n_micro / n_targets)
            reducer.arm(keep_grads=False)
            loss.backward()
            reducer.finish()
            tracker.end_micro_batch()
        else:
            if i == last:
                reducer.arm()
            loss.backward()
            if i == last:
                tracker.begin_micro_batch(loss_scale=1.0)
                reducer.finish()
                tracker.end_micro_batch()
        total += loss.detach().double()
    if reducer is not None:
        return all_sum([float(total)], device)[0]
    return float(total)


def probe_blocks(
    model: torch.nn.Module,
    block_map: BlockMap,
    tracker: ImportanceTracker,
    steps: Iterable[list[dict[str, torch.Tensor]]],
    device: torch.device,
    autocast: str = "none",
    reducer: GradReducer | None = None,
) -> Iterator[float]:
    """GRASS probing: forward + backward through every block with no update.

    Yields each step's loss. Gradients are freed in their post-accumulate hooks as
    soon as their norm is read, so probing never holds the model's gradients; the
    groups outside the blocks get none at all. When the generator is exhausted the
    tracker holds the probing MGN (`finish_probe` has run) and every block is
    frozen again.

    Data-parallel (`reducer` given), each block's gradient is summed across ranks
    bucket by bucket and observed, and the buckets are freed as backward goes on.
    """
    params = list(model.parameters())  # (a sharded model's are swapped in forward)
    trainable_before = [p.requires_grad for p in params]
    for group in block_map.groups():
        group.set_trainable(group.kind == "block")
    if reducer is not None:
        reducer.prepare([p for b in block_map.blocks for p in b.tensors])
    # freed once read (a GradReducer frees what it has reduced itself)
    tracker.free_grads = reducer is None or not reducer.frees_grads
    observing_before, tracker.observing = tracker.observing, True
    try:
        for micro in steps:
            yield forward_backward(
                model, tracker, micro, device, autocast, reducer=reducer, probing=True
            )
        tracker.finish_probe()
    finally:
        tracker.free_grads = False
        tracker.observing = observing_before
        for p, trainable in zip(params, trainable_before, strict=True):
            p.grad = None
            p.requires_grad_(trainable)
