"""Evaluation metrics. Loss uses exactly the training formatting and masking."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F


def autocast_ctx(device: torch.device, autocast: str) -> contextlib.AbstractContextManager:
    if autocast == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's trainable (label != -100) tokens.

    Summing (not averaging) per micro-batch lets gradient accumulation divide by
    the step's total token count, so every token weighs the same however the
    rows fall into micro-batches.
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits  # (B, T, V)
    shift_logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
    shift_labels = batch["labels"][:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: str = "none",
) -> tuple[float, int]:
    """Token-weighted mean loss over all batches, and the number of target tokens."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for batch in batches:
        n += count_targets(batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_ctx(device, autocast):
            total += loss_sum(model, batch).double()
    model.train(was_training)
    return (float(total) / n if n else math.nan), n
