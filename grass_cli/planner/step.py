"""The optimizer step's terms for the memory planner (planner/memory.py): what a
streamed step holds at its worst parameter, and a whole step's temporaries."""

from __future__ import annotations

from grass_cli.planner.shape import GroupShape


def streamed(
    trained: list[GroupShape], gbytes: int, sbytes: float, masters: bool, temps: int,
    compact: int = 0,
) -> int:  # fmt: skip
    """The worst point of a streamed step, parameter by parameter in the engine's
    order: the gradients not yet consumed, this parameter's fp32 gradient and AdamW
    temporaries (`compact` bytes a parameter more for compact moments), and three
    parameters' state (the previous one's write-back, this one's, the next one's
    prefetch)."""
    units = [n for g in sorted(trained, key=lambda g: g.name) for n in g.params]
    worst = 0
    for k, n in enumerate(units):
        waiting = sum(units[k + 1 :]) * gbytes
        own = n * 4 if masters else n * gbytes  # the fp32 copy, or the gradient itself
        state = sum(units[max(k - 1, 0) : k + 2]) * sbytes
        worst = max(worst, waiting + own + n * (4 * temps + compact) + state)
    return int(worst)


def transient(
    groups: list[GroupShape], streaming: bool, lora: bool, masters: bool, device: str,
    compact: int = 0,
) -> int:  # fmt: skip
    """fp32 gradients for the masters + one AdamW temporary (non-streamed step), and
    the compact moments' temporaries of the largest matrix (stepped one at a time).
    (peft keeps LoRA's adapters in fp32: no master gradients.)"""
    largest_param = max(n for g in groups for n in g.params)
    largest_group = max(g.numel for g in groups)
    unit = largest_param if (streaming or device == "cpu") else largest_group
    fp32_grads = (largest_param if streaming else largest_group) * 4 if masters else 0
    if lora:
        fp32_grads = 0
    return fp32_grads + unit * 4 + largest_param * compact
