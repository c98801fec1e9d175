"""Sample packing: several short rows in one sequence, with no leakage between them.

With `data.packing: true` a micro batch is `micro_batch_size` sequences of at most
`data.max_length` tokens, each holding as many whole rows as fit, instead of
`micro_batch_size` rows padded to the longest. Short rows then stop paying for
padding, and a step trains more tokens for about the same per-step overhead.

A packed row must train exactly as it would alone:

* positions restart at 0 for each row (`position_ids`), so it sees no offset;
* attention is block-diagonal: a row never sees the rows before it. The model
  gets `position_ids` and *no* `attention_mask`: that is how transformers (>= 4.5x,
  `masking_utils.find_packed_sequence_indices`) recognizes packed sequences and
  builds the block-diagonal causal mask for eager, sdpa and flex attention, and the
  varlen path of flash-attention. Padding at a sequence's end gets positions of
  its own, so it is one more block that no row attends to.
* the first token of every row is unlabeled (-100): otherwise the last token of
  one row would be trained to predict the first token of the next. Unpacked, a
  row's first token is never a target either (labels are shifted by one), so the
  loss's tokens and their count are the same.

Whether a model honours this is checked once, on the loaded model, by
`check_model_packs` (a model whose own code ignores restarting positions would
otherwise train on leaked context without a sign).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from grass_cli.data.tokens import IGNORE_INDEX
from grass_cli.errors import ModelError

if TYPE_CHECKING:
    import torch


def first_fit(
    peek: Callable[[], int | None], take: Callable[[], None], bins: int, capacity: int
) -> list[list[int]]:
    """The packing rule, once: rows taken in order, each into the first of `bins`
    sequences of `capacity` tokens with room; the first row that fits none ends the
    micro batch (it starts the next one). Never skipping ahead keeps every row seen
    once, in order, so a packing is a function of where it started. `peek()` is the
    next row's length (None: no more rows), `take()` moves past it. Returns the
    non-empty sequences as positions 0, 1, ... of the rows taken."""
    free = [capacity] * bins
    packed: list[list[int]] = [[] for _ in range(bins)]
    k = 0
    while (n := peek()) is not None:
        if n > capacity:
            raise ValueError(f"a row of {n} tokens, more than the capacity {capacity}")
        slot = next((b for b in range(bins) if free[b] >= n), None)
        if slot is None:
            break
        free[slot] -= n
        packed[slot].append(k)
        k += 1
        take()
    return [b for b in packed if b]


def pack_next(
    lengths: Sequence[int], order: Sequence[int], start: int, bins: int, capacity: int
) -> tuple[list[list[int]], int]:
    """`first_fit` over the rows `order[start:]`: the non-empty sequences (row
    indices) and the position after the last row taken. A resume needs only the
    position."""
    pos = start

    def peek() -> int | None:
        return lengths[int(order[pos])] if pos < len(order) else None

    def take() -> None:
        nonlocal pos
        pos += 1

    seqs = first_fit(peek, take, bins, capacity)
    return [[int(order[start + k]) for k in s] for s in seqs], pos


def count_micro_batches(
    lengths: Sequence[int], order: Sequence[int], bins: int, capacity: int
) -> int:
    """How many packed micro batches one epoch in `order` makes."""
    pos, count = 0, 0
    while pos < len(order):
        _, pos = pack_next(lengths, order, pos, bins, capacity)
        count += 1
    return count


def collate_packed(
    sequences: list[list[tuple[list[int], list[int]]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Packed sequences of (input_ids, labels) rows -> the batch tensors.

    Keys: input_ids, labels (each row's first label masked), position_ids
    (restarting at 0 for each row and for the padding), attention_mask (1 on
    rows' tokens, 0 on padding: what telemetry counts; it is not given to the
    model, see `model_inputs`).
    """
    import torch

    if not sequences or not all(sequences):
        raise ValueError("collate_packed needs non-empty sequences")
    width = max(sum(len(ids) for ids, _ in seq) for seq in sequences)
    n = len(sequences)
    ids_t = torch.full((n, width), pad_id, dtype=torch.long)
    labs_t = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    pos_t = torch.zeros((n, width), dtype=torch.long)
    mask_t = torch.zeros((n, width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        at = 0
        for ids, labels in seq:
            k = len(ids)
            if k != len(labels):
                raise ValueError(f"a row has {k} input ids but {len(labels)} labels")
            ids_t[i, at : at + k] = torch.tensor(ids, dtype=torch.long)
            labs_t[i, at : at + k] = torch.tensor(labels, dtype=torch.long)
            labs_t[i, at] = IGNORE_INDEX  # never predicted from the previous row
            pos_t[i, at : at + k] = torch.arange(k)
            mask_t[i, at : at + k] = 1
            at += k
        pos_t[i, at:] = torch.arange(width - at)  # padding: a block of its own
    return {
        "input_ids": ids_t,
        "attention_mask": mask_t,
        "labels": labs_t,
        "position_ids": pos_t,
    }


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments for a batch, packed or not.

    A packed batch (it has `position_ids`) goes in without its attention mask:
    transformers builds the block-diagonal mask from the positions only when no
    2D mask is given. An unpacked batch is called exactly as before packing
    existed (input_ids and attention_mask).
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# Two rows for the check: long enough that a leak moves the logits far more than
# kernel noise does, short enough to cost nothing. Fixed ids: no RNG is touched, so
# a run's seeded stream is the same with or without the check.
_ROW_A = [17, 301, 42, 977, 5, 233, 61, 1200, 88, 9, 450, 31]
_ROW_B = [73, 640, 12, 1500, 27, 390, 8, 211]


def check_model_packs(model: torch.nn.Module, device: torch.device) -> None:
    """Refuse a model whose attention or positions leak across packed rows.

    Packing relies on the model building its attention mask from restarting
    position ids, which transformers' own architectures do and remote code or
    older code may not. The check packs two rows, runs them once packed and once
    each alone, and requires the packed logits to match the alone ones far more
    closely than the logits of the same tokens run as one unpacked sequence do
    (a ratio, so the same test holds in float32 and bfloat16).
    """
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    a = [t % vocab for t in _ROW_A]
    b = [t % vocab for t in _ROW_B]
    packed = collate_packed([[(a, a), (b, b)]], pad_id=0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():

            def logits(**kw: torch.Tensor) -> torch.Tensor:
                kw = {k: v.to(device) for k, v in kw.items()}
                return model(**kw, use_cache=False).logits[0].float()

            alone_a = logits(input_ids=torch.tensor([a]))
            alone_b = logits(input_ids=torch.tensor([b]))
            joined = logits(input_ids=packed["input_ids"])
            got = logits(**model_inputs(packed))
    except TypeError as exc:  # a forward without position_ids
        raise _refusal(model, f"its forward does not take position_ids ({exc})") from exc
    finally:
        model.train(was_training)
    na = len(a)
    err = max(float((got[:na] - alone_a).abs().max()), float((got[na:] - alone_b).abs().max()))
    leak = float((joined[na:] - alone_b).abs().max())
    if not err <= 0.1 * leak:
        raise _refusal(
            model,
            f"a packed row's logits differ from the row's own by {err:.3g} "
            f"(unpacked, the next row's context moves them by {leak:.3g})",
        )


def _refusal(model: torch.nn.Module, why: str) -> ModelError:
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", type(model).__name__)
    impl = getattr(config, "_attn_implementation", None)
    return ModelError(
        f"data.packing: this model ({arch}, attention {impl}) does not keep packed rows "
        f"apart: {why}",
        where="data.packing",
        hint="set data.packing: false, or use a transformers architecture that builds "
        "its attention mask from position ids (Llama, Qwen2, Mistral, Gemma, GPT-2, ...)",
    )
