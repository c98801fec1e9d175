"""The training batches a recipe's data section gives: one builder for training and
for `grass inspect-importance`, so the importance it reports is measured on the
batches training would draw (the same rows, held-out rows left out, order, packing).

Rows in memory (`BatchIterator`, shuffled by `seed`) or, with `data.streaming`, a
`StreamBatches`; each rank of a data-parallel run takes its share (`rank`, `world`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from grass_cli.data.batches import BatchIterator
from grass_cli.data.build import build_dataset, build_splits, held_out
from grass_cli.data.stream import StreamBatches, build_stream
from grass_cli.data.tokens import TokenizedData
from grass_cli.recipe import DataConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def training_batches(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    micro_batch_size: int,
    seed: int,
    *,
    rank: int = 0,
    world: int = 1,
    with_eval: bool = True,
) -> tuple[BatchIterator | StreamBatches, TokenizedData | None, TokenizedData | None]:
    """(batches, training rows or None for a stream, eval rows or None).

    `with_eval=False` builds no eval rows a caller would not read (rows that
    `data.eval: 0.05` holds out are still left out of training's)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cut = {"rank": rank, "world": world, "packing": cfg.packing, "max_length": cfg.max_length}
    if cfg.streaming:
        if not with_eval and held_out(cfg) is None:
            cfg = cfg.model_copy(update={"eval": None})  # (a separate eval source: unread)
        rows, eval_data = build_stream(cfg, tokenizer, seed=seed)
        return StreamBatches(rows, micro_batch_size, pad_id, **cut), None, eval_data
    if with_eval:
        train_data, eval_data = build_splits(cfg, tokenizer, seed=seed)
    else:
        train_data, eval_data = build_dataset(cfg, tokenizer, "train", seed=seed), None
    batches = BatchIterator(train_data, micro_batch_size, pad_id, seed=seed, **cut)
    return batches, train_data, eval_data
