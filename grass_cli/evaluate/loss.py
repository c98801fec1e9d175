"""Loss and perplexity: the token-summed loss training uses, and its evaluation.

`loss_sum` is the one loss function of the project (training's step and
evaluation both call it, or its per-row form), so an evaluated loss is the loss
training reports on the same tokens and masks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from grass_cli.data import IGNORE_INDEX, eval_batches, tokenize_rows
from grass_cli.data.packing import model_inputs
from grass_cli.evaluate.common import EvalContext
from grass_cli.recipe import DataConfig
from grass_cli.sharding import gather_head, is_sharded, module_class


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
    out = _head_output(model, batch, chunked=True)
    if isinstance(out, _Hidden):
        try:
            if not torch.is_grad_enabled():
                return out.token_losses().sum()
            return ChunkedHeadLoss.apply(out.hidden, out.weight, out.bias, out.labels, out.rows)
        finally:
            out.release()
    logits, labels, _ = out
    return F.cross_entropy(logits.float(), labels, reduction="sum")


# The head and its loss are computed in chunks of rows whose fp32 logits take at
# most this many bytes, once a batch's logits would take more (see ChunkedHeadLoss).
HEAD_CHUNK_BYTES = 32 * 2**20

# Model types whose forward returns the LM head's output unchanged (no soft-capping,
# no logit scale), so the loss may be computed from the head's input directly.
# Others (Gemma 2/3, Cohere, Granite, any type not listed) keep the plain path.
PLAIN_HEAD_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
        "phi", "phi3", "gemma", "gpt2", "gpt_neox", "olmo", "olmo2", "smollm3",
        "stablelm", "starcoder2", "gptj",
    }
)  # fmt: skip
_SCALED_HEAD_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class _Hidden:
    """The head's input at target positions, with what the chunked loss needs."""

    hidden: torch.Tensor  # (N, d)
    weight: torch.Tensor  # (V, d)
    bias: torch.Tensor | None
    labels: torch.Tensor  # (N,)
    rows: int  # per chunk
    keep: torch.Tensor  # (B, T-1) target positions
    # sharded: frees the head's weight, gathered for the loss (sharding.gather_head)
    release: Callable[[], None] = lambda: None

    @torch.no_grad()
    def token_losses(self) -> torch.Tensor:
        """Each target's cross-entropy (N,) fp32, a chunk of logits at a time."""
        n, rows = self.hidden.shape[0], self.rows
        return torch.cat(
            [
                _chunk_loss(self.hidden, self.weight, self.bias, self.labels, slice(s, s + rows))[3]
                for s in range(0, n, rows)
            ]
        )


def _chunk_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    at: slice,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of targets: its fp32 logits (V wide), their log-sum-exp, its labels
    and each target's cross-entropy. (A function, not a generator: the caller drops
    a chunk's logits before the next chunk's are made.)"""
    logits = F.linear(hidden[at], weight, bias).float()
    lse = torch.logsumexp(logits, dim=-1)
    y = labels[at]
    return logits, lse, y, lse - logits.gather(1, y[:, None]).squeeze(1)


def head_is_plain(config: Any) -> bool:
    """Whether a model of this config returns its LM head's output unchanged (no
    soft-capping or logit scale after it), so its loss may be chunked."""
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return False
    return all(getattr(config, k, None) in (None, 1, 1.0) for k in _SCALED_HEAD_KEYS)


def head_chunk_rows(vocab: int) -> int:
    """Target rows per chunk of the chunked loss, for a vocabulary of `vocab`."""
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab))


def _chunk_rows(model: torch.nn.Module, head: torch.nn.Module | None, n: int) -> int:
    """Rows per chunk when the loss may be chunked and `n` rows need more than one;
    0 for the plain path (one (N, V) logits tensor, as a model computes it)."""
    if head is None or module_class(head) is not torch.nn.Linear:  # LoRA-wrapped, custom
        return 0
    if is_sharded(head.weight) and head.weight.requires_grad and torch.is_grad_enabled():
        # sharded (FSDP2) with a trained head: its gradient must go through FSDP2's
        # reduce-scatter, which only the head's own backward does: the plain loss
        return 0
    if not head_is_plain(getattr(model, "config", None)):
        return 0
    rows = head_chunk_rows(head.out_features)
    return rows if n > rows else 0


def _head_output(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunked: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | _Hidden:
    """The model's forward with its head at target positions only: the logits there
    (N, V), their labels (N,) and the (B, T-1) mask of those positions (position t
    predicts token t+1); or, `chunked` with large logits and a plain head, the
    head's input at those positions for a chunked loss (`_Hidden`), the head itself
    run on zero rows.

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
    seen: list[torch.Tensor] = []
    rows = _chunk_rows(model, head, int(keep.sum())) if chunked else 0

    def select(_module: torch.nn.Module, args: tuple) -> tuple | None:
        h = args[0]
        if seen or h.dim() != 3 or h.shape[:2] != batch["labels"].shape:
            return None
        h = h[:, :-1][keep]
        seen.append(h)
        return (h[:0] if rows else h, *args[1:])

    handle = head.register_forward_pre_hook(select) if head is not None else None
    try:
        logits = model(**model_inputs(batch), use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    if not seen:  # the head saw something else: full (B, T, V) logits
        return logits[:, :-1][keep], labels[keep], keep
    if rows:
        assert isinstance(head, torch.nn.Linear)  # (FSDP2's FSDPLinear is one too)
        weight, bias, release = gather_head(model, head)
        return _Hidden(seen[0], weight, bias, labels[keep], rows, keep, release)
    return logits, labels[keep], keep


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (torch < 2.4 has no argument)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


class ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `labels`, computed
    `rows` rows at a time, with the gradients made in the same pass.

    The plain path holds the (N, V) logits, the log-softmax autograd saves and, in
    backward, the gradient of each: three N x V fp32 buffers, which for a 128k
    vocabulary and a few thousand target tokens are gigabytes, the largest
    activation of a training step. Here one chunk's logits live at a time: the
    softmax is made in place from them, its gradient (softmax minus one-hot) goes
    straight into the gradients of the hidden states and the weight, and backward
    only scales what forward made by the incoming gradient (the loss's 1/tokens).
    No matmul is added (forward does the head's forward and both of its backward
    matmuls); the weight's gradient buffer exists from the end of forward instead
    of from the start of backward. The idea is Liger Kernel's fused linear
    cross-entropy, written here for plain torch on any device.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        rows: int,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        grad_b = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if need_b
            else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], rows):
            at = slice(s, s + rows)
            logits, lse, y, ce = _chunk_loss(hidden, weight, bias, labels, at)
            total += ce.sum()
            if not (need_h or need_w or need_b):
                continue
            h = hidden[at]
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            if grad_b is not None:
                grad_b += g.sum(0)
            # the matmuls in the dtype the plain backward uses: autocast's, or the weight's
            if not _autocast_on(g.device.type):
                g, h = g.to(weight.dtype), h.to(weight.dtype)
            if grad_h is not None:
                grad_h[at] = g @ weight
            if grad_w is not None:
                grad_w += g.T @ h
            del g, logits
        # the gradients are made here, not saved inputs: kept on ctx and scaled in place
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        gh, gw, gb = ctx.grads
        ctx.grads = None  # once: the buffers become the gradients
        if gh is not None:
            gh = gh.mul_(grad_out.to(gh.dtype))
        if gw is not None:
            gw = gw.mul_(grad_out).to(ctx.dtypes[0])
        if gb is not None:
            gb = gb.mul_(grad_out).to(ctx.dtypes[1])
        return gh, gw, gb, None, None


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
    out = _head_output(model, batch, chunked=not torch.is_grad_enabled())
    if isinstance(out, _Hidden):
        try:
            ce, keep = out.token_losses().double(), out.keep
        finally:
            out.release()
    else:
        logits, labels, keep = out
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
