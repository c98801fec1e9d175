"""Activation bytes of a Llama-style decoder, per token, for the memory planner.

What autograd saves for a block (fp32 RMSNorm inputs, q/k/v/output for attention,
the MLP's gate, up and product), what a frozen layer between the lowest trained
block and the loss keeps (only what the input gradient needs), and the logits'
peak at the loss (target positions only). planner/memory.py turns these into the backward sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from grass_cli.planner.shape import Layout

if TYPE_CHECKING:
    from grass_cli.recipe import Recipe


def layer_act(lay: Layout, a: int, trainable: bool) -> int:
    """Bytes per token that autograd saves in one decoder layer."""
    h, i, q, kv = lay.hidden, lay.intermediate, lay.q_width, lay.kv_width
    attention = a * (q + 2 * kv + q)  # sdpa saves q, k, v (grouped, not repeated), output
    if trainable:
        norms = 2 * (4 * h + a * h)  # fp32 input + normed output (the matmuls' input)
        return norms + attention + a * q + 4 * a * i  # o_proj input; gate, silu, up, product
    return 2 * 4 * h + attention + 3 * a * i  # silu input, mul's operands


def logits_peak(lay: Layout, a: int) -> int:
    """Bytes per token at the loss, where backward holds the most V-wide buffers: the
    logits, the gradient of the log-softmax, their fp32 copy (when not fp32
    already) and the log-softmax output itself.

    The head runs at target positions only (evaluate/loss.py); the plan counts
    every position as a target, so it holds for any data and overestimates
    prompt-heavy data. Measured on SmolLM2-135M, the peaks did not move when the
    head stopped running at every position (benchmarks/plan_accuracy.py, before
    and after): the copy of the shifted logits it no longer makes was never at
    the peak, the backward's buffers are.
    """
    return (2 * a + 4 + (4 if a < 4 else 0)) * lay.vocab


def loss_chunk_rows(lay: Layout, tokens: int) -> int:
    """Rows per chunk of the chunked loss (evaluate/loss.py, ChunkedHeadLoss) for
    `tokens` target tokens; 0 for the plain path (a plain head of one chunk or less)."""
    from grass_cli.evaluate.loss import head_chunk_rows

    rows = head_chunk_rows(lay.vocab)
    return rows if lay.chunked_head and tokens > rows else 0


def logits_bytes(lay: Layout, a: int, tokens: int) -> int:
    """The loss's peak for `tokens` target tokens. The chunked loss holds one chunk's
    V-wide buffers however many tokens there are (the fp32 logits turned softmax in
    place, the log-sum-exp's temporary, the gradient's copy in the matmul dtype) and
    the hidden states' gradient; the plain path holds `logits_peak` per token."""
    rows = loss_chunk_rows(lay, tokens)
    if not rows:
        return logits_peak(lay, a) * tokens
    return rows * lay.vocab * (8 + (a if a < 4 else 0)) + tokens * lay.hidden * a


# ------------------------------------------------------------------------------ plan


@dataclass
class Acts:
    """Activation terms of one micro-batch (bytes)."""

    logits: int
    layer_trained: int  # a trained layer's saved activations
    layer_in: int  # a checkpointed layer's input
    per_layer: list[int]
    saved: list[int]  # what each layer keeps until backward
    work: int  # gradients in flight inside a layer
    # the chunked loss makes a trained head's gradient in fp32 during the forward
    fp32_head_grad: bool = False
    logits_grad: int = 0  # the plain loss's gradient of the logits, in the compute dtype


def activations(
    recipe: Recipe,
    lay: Layout,
    active_blocks: int,
    ckpt: bool,
    lowest: int = 0,
    embed_trained: bool = False,
) -> Acts:
    """The activation terms when blocks `lowest` to `lowest + active_blocks - 1` train:
    the layers below them save nothing unless the embeddings train too (no gradient
    flows there), the ones above save what the input gradient needs."""
    tc, L = recipe.training, len(lay.blocks)
    a = 2 if (lay.weight_bytes == 2 or tc.autocast == "bf16") else 4
    tokens = tc.micro_batch_size * recipe.data.max_length
    layer_t = layer_act(lay, a, True) * tokens
    layer_f = layer_act(lay, a, False) * tokens
    layer_in = a * lay.hidden * tokens
    below = layer_f if embed_trained else 0
    per_layer = [
        below if k < lowest else layer_t if k < lowest + active_blocks else layer_f
        for k in range(L)
    ]
    saved = [(layer_in if per_layer[k] else 0) if ckpt else per_layer[k] for k in range(L)]
    work = a * tokens * (2 * lay.hidden + 2 * lay.intermediate)
    return Acts(
        logits_bytes(lay, a, tokens),
        layer_t,
        layer_in,
        per_layer,
        saved,
        work,
        loss_chunk_rows(lay, tokens) > 0,
        a * lay.vocab * tokens,
    )
