"""Forward/backward of one step, and GRASS probing: shared by `grass train` and
`grass inspect-importance`, so both measure importance with the same code."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from grass_cli.blocks import BlockMap
from grass_cli.evaluate import autocast_ctx, count_targets, loss_sum
from grass_cli.importance import ImportanceTracker


def forward_backward(
    model: torch.nn.Module,
    tracker: ImportanceTracker,
    micro: list[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: str = "none",
) -> float:
    """Accumulate gradients of the step's token-mean loss over its micro-batches.

    Each micro-batch's summed loss is divided by the whole step's target-token
    count, so accumulation gives the gradient of one big batch. Returns the loss.
    """
    n_targets = sum(count_targets(b) for b in micro)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for batch in micro:
        n_micro = count_targets(batch)
        if n_micro == 0:
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast_ctx(device, autocast):
            loss = loss_sum(model, batch) / n_targets
        tracker.begin_micro_batch(loss_scale=n_micro / n_targets)
        loss.backward()
        tracker.end_micro_batch()
        total += loss.detach().double()
    return float(total)


def probe(
    model: torch.nn.Module,
    block_map: BlockMap,
    tracker: ImportanceTracker,
    steps: Iterable[list[dict[str, torch.Tensor]]],
    device: torch.device,
    autocast: str = "none",
) -> Iterator[float]:
    """GRASS probing: forward + backward through every block with no update.

    Yields each step's loss. Gradients are freed in their post-accumulate hooks as
    soon as their norm is read, so probing never holds the model's gradients; the
    groups outside the blocks get none at all. When the generator is exhausted the
    tracker holds the probing MGN (`finish_probe` has run) and every block is
    frozen again.
    """
    trainable_before = {id(p): p.requires_grad for p in model.parameters()}
    for group in block_map.groups():
        group.set_trainable(group.kind == "block")
    tracker.free_grads = True
    try:
        for micro in steps:
            yield forward_backward(model, tracker, micro, device, autocast)
        tracker.finish_probe()
    finally:
        tracker.free_grads = False
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(trainable_before[id(p)])
