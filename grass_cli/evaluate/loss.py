"""Loss and perplexity: the token-summed loss training uses, and its evaluation.

`loss_sum` is the one loss function of the project (training's step and
evaluation both call it, or its per-row form), so an evaluated loss is the loss
training reports on the same tokens and masks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from grass_cli.data import IGNORE_INDEX, eval_batches, tokenize_rows
from grass_cli.data.packing import model_inputs
from grass_cli.evaluate.common import EvalContext
from grass_cli.recipe import DataConfig


def autocast_ctx(device: torch.device, autocast: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for `autocast: bf16`; otherwise nothing."""
    if autocast == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's trainable (label != -100) tokens.

    Summing (not averaging) per micro-batch lets gradient accumulation divide by
    the step's total token count, so every token weighs the same however the
    rows fall into micro-batches. A packed batch (data.packing) goes in with its
    position ids instead of its attention mask (see data/packing.py); its rows'
    target tokens are the ones they have unpacked, so the sum is the same.
    """
    logits, labels, _ = target_logits(model, batch)
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def target_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that carry loss only: (N, V), their labels (N,), and
    the (B, T-1) mask of those positions (position t predicts token t+1).

    The LM head is the largest matmul of a small model (49152 x 576 per token for
    SmolLM2-135M) and its softmax runs over the whole vocabulary, so computing it
    at prompt and padding positions, whose logits no loss reads, costs about a
    third of a step. A pre-hook on the output embeddings hands the head only the
    hidden states of target positions; whatever the model does after the head
    (Gemma's soft-capping, a logit scale) is elementwise and sees the same values.
    The result equals the full computation up to float rounding (a matmul of other
    shapes sums in another order). Models without output embeddings, or whose
    head is not called on (B, T, d) hidden states, get the full logits, selected.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: list[bool] = []

    def select(_module: torch.nn.Module, args: tuple) -> tuple | None:
        h = args[0]
        if seen or h.dim() != 3 or h.shape[:2] != batch["labels"].shape:
            return None
        seen.append(True)
        return (h[:, :-1][keep], *args[1:])

    handle = head.register_forward_pre_hook(select) if head is not None else None
    try:
        logits = model(**model_inputs(batch), use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if not seen:  # the head saw something else: full (B, T, V) logits
        logits = logits[:, :-1][keep]
    return logits, labels[keep], keep


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


def row_loss_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed cross-entropy (float64) and target-token counts, shapes (B,), (B,).

    The same shift and masking as `loss_sum`, kept per row so eval can report each
    item's loss and multiple choice can compare continuations.
    """
    logits, labels, keep = target_logits(model, batch)
    ce = F.cross_entropy(logits.float(), labels, reduction="none").double()  # (N,)
    rows = keep.nonzero()[:, 0]  # the row of each target position, in order
    sums = torch.zeros(keep.shape[0], dtype=torch.float64, device=ce.device)
    return sums.index_add_(0, rows, ce), keep.sum(-1)


def perplexity(mean_loss: float) -> float:
    """exp(mean token loss); capped at exp(700) so a diverged model stays JSON-able."""
    return math.exp(min(mean_loss, 700.0)) if not math.isnan(mean_loss) else math.nan


def loss_metrics(ctx: EvalContext, rows: list[dict[str, Any]], dc: DataConfig) -> dict[str, Any]:
    """Token-weighted mean loss and perplexity, with training's tokens and masks."""
    data = tokenize_rows(rows, dc, ctx.tokenizer, str(dc.train))
    per_row = len(data) == len(rows)  # `truncation: drop` loses the row <-> item mapping
    total, n_tokens, done = 0.0, 0, 0
    for batch in eval_batches(data, ctx.cfg.batch_size, ctx.pad_id):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        with autocast_ctx(ctx.device, ctx.autocast):
            sums, counts = row_loss_sums(ctx.model, batch)
        for s, c in zip(sums.tolist(), counts.tolist(), strict=True):
            if per_row:
                ctx.items[done]["loss"] = s / c
                ctx.items[done]["loss_tokens"] = c
            total += s
            n_tokens += c
            done += 1
        ctx.report("loss", done, len(data))
    loss = total / n_tokens if n_tokens else math.nan
    out: dict[str, Any] = {"loss": loss, "ppl": perplexity(loss), "loss_tokens": n_tokens}
    if data.dropped:
        out["loss_rows_dropped"] = data.dropped
    return out
