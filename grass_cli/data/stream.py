"""Streamed training data (`data.streaming: true`): rows read and tokenized as training takes them.

The in-memory path (build.py, batches.py) tokenizes every row before the first
step and shuffles whole epochs. A stream cannot: its length is unknown and it may
not fit on disk. So the stream is cut into blocks of `data.shuffle_block` rows.
Block b draws its rows from the sources (by `weight`, with a generator seeded by
`(training.seed, b)`; without weights the sources take turns), tokenizes them
(the same renderer and tokenizer as in memory), and is trained in a seeded
permutation of its rows.

A block is then a pure function of the seed, its index and where each source
stood when it began. The stream's whole state is small JSON: the block, the
offset in it, and each source's position (`SourceStream.state`) at the block's
start. A resume re-reads and re-tokenizes that one block and continues with
exactly the rows an uninterrupted run would have trained, in the same order.

Held-out rows (`data.eval: 200`) are the first rows of each source (split among
them by weight, else evenly), which the training passes skip: disjoint even when
a source is read again. Nothing is put in the token cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from grass_cli.data.batches import collate
from grass_cli.data.mixture import _rng, concat, shares, subset
from grass_cli.data.packing import collate_packed, first_fit
from grass_cli.data.reading import _quiet_datasets
from grass_cli.data.sources import resolve
from grass_cli.data.stream_sources import SourceStream
from grass_cli.data.tokens import IGNORE_INDEX, TokenizedData, tokenize_rows
from grass_cli.errors import DataError
from grass_cli.recipe import DataConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

_PICK_STREAM = 0x50434B  # which source each row of a block comes from
_ORDER_STREAM = 0x4F5244  # the order a block is trained in

Row = tuple[np.ndarray, np.ndarray]  # input ids, labels (int32: a block stays small)


class RowStream:
    """Tokenized training rows from the sources, block by block, resumable.

    `peek()` is the next row, `advance()` moves past it: the packer looks at a row
    before deciding that it starts the next micro batch.
    """

    def __init__(
        self,
        streams: list[SourceStream],
        configs: list[DataConfig],
        weights: list[float] | None,
        tokenizer: PreTrainedTokenizerBase,
        block_size: int,
        seed: int,
    ):
        self.streams, self.configs, self.tokenizer = streams, configs, tokenizer
        self.probs = None if weights is None else np.asarray(weights) / sum(weights)
        self.block_size, self.seed = block_size, seed
        self.block = -1
        self.offset = 0
        self.rows: list[Row] = []
        self._starts: list[dict[str, Any]] = []

    def _picks(self, b: int) -> np.ndarray:
        n = len(self.streams)
        if self.probs is None:  # the sources take turns, continuing across blocks
            return (np.arange(self.block_size) + b * self.block_size) % n
        return _rng(self.seed, _PICK_STREAM, b).choice(n, size=self.block_size, p=self.probs)

    def _tokenize(self, i: int, drawn: list[tuple[int, dict[str, Any]]]) -> list[Row]:
        """Source i's rows of this block, in runs of consecutive row numbers (a new pass
        restarts the numbering), so that an error names the source's own row."""
        out: list[Row] = []
        start = 0
        for k in range(1, len(drawn) + 1):
            if k < len(drawn) and drawn[k][0] == drawn[k - 1][0] + 1:
                continue
            run = drawn[start:k]
            data = tokenize_rows(
                [r for _, r in run],
                self.configs[i],
                self.tokenizer,
                self.streams[i].where,
                first_row=run[0][0],
                allow_empty=True,
            )
            for ids, labels in zip(data.input_ids, data.labels, strict=True):
                out.append((np.asarray(ids, np.int32), np.asarray(labels, np.int32)))
            start = k
        return out

    def _build(self, b: int) -> None:
        """Read, tokenize and order block b; the sources stand where it begins."""
        self._starts = [s.state() for s in self.streams]
        drawn: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in self.streams]
        with _quiet_datasets():
            for i in self._picks(b):
                drawn[int(i)].append(self.streams[int(i)].next())
        # grouped by source, then put in a seeded order: where a row sat before the
        # permutation does not matter, which is what lets each source tokenize its
        # rows of the block in one batched call
        rows = [r for i, d in enumerate(drawn) if d for r in self._tokenize(i, d)]
        order = _rng(self.seed, _ORDER_STREAM, b).permutation(len(rows))
        self.rows = [rows[k] for k in order]
        self.block, self.offset = b, 0

    def peek(self) -> Row:
        empty = 0
        while self.offset >= len(self.rows):
            self._build(self.block + 1)
            empty += not self.rows
            if empty >= 3:  # 3 x shuffle_block rows in a row, none of them kept
                raise DataError(
                    f"no row in {3 * self.block_size} read from the stream fits: every one "
                    f"is longer than data.max_length={self.configs[0].max_length} and "
                    "data.truncation is drop",
                    where="data.train",
                    hint="raise data.max_length or use data.truncation: left",
                )
        return self.rows[self.offset]

    def advance(self) -> None:
        self.offset += 1

    def state_dict(self) -> dict[str, Any]:
        self.peek()  # at a block's end, the position is the next block's start
        return {"block": self.block, "offset": self.offset, "sources": self._starts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sources = state["sources"]
        if len(sources) != len(self.streams):
            raise DataError(
                f"the checkpoint was taken with {len(sources)} training sources, but the "
                f"recipe now has {len(self.streams)}",
                where="data.train",
                hint="resume with the data.train the run was started with",
            )
        for stream, st in zip(self.streams, sources, strict=True):
            stream.start(st)
        self._build(int(state["block"]))
        offset = int(state["offset"])
        if not 0 <= offset < len(self.rows):
            raise ValueError(f"offset {offset} is outside block {self.block}'s rows")
        self.offset = offset


class StreamBatches:
    """`BatchIterator`'s interface over a `RowStream`: micro batches (packed or padded),
    a state dict, a resume. Data-parallel ranks all read the stream and each takes
    every world-th row (or packed sequence) of the global micro batch."""

    def __init__(
        self,
        rows: RowStream,
        micro_batch_size: int,
        pad_id: int,
        rank: int = 0,
        world: int = 1,
        packing: bool = False,
        max_length: int | None = None,
    ):
        if packing and max_length is None:
            raise ValueError("packing needs max_length")
        self.rows, self.micro_batch_size, self.pad_id = rows, micro_batch_size, pad_id
        self.rank, self.world = rank, world
        self.packing, self.max_length = packing, max_length

    def __iter__(self) -> StreamBatches:
        return self

    def _take(self) -> list[Row]:
        out = []
        for _ in range(self.micro_batch_size * self.world):
            out.append(self.rows.peek())
            self.rows.advance()
        return out[self.rank :: self.world]

    def _pack(self) -> list[list[Row]]:
        """packing.first_fit into micro x world sequences, in stream order; this
        rank's share of them."""
        assert self.max_length is not None
        taken: list[Row] = []

        def take() -> None:
            taken.append(self.rows.peek())
            self.rows.advance()

        seqs = first_fit(
            lambda: len(self.rows.peek()[0]), take, self.micro_batch_size * self.world,
            self.max_length,
        )  # fmt: skip
        return [[taken[k] for k in s] for s in seqs][self.rank :: self.world]

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.packing:
            rows = self._take()
            return collate([r[0] for r in rows], [r[1] for r in rows], self.pad_id)
        seqs = self._pack()
        if not seqs:  # an empty data-parallel share: one row that carries no loss
            ids = self.rows.peek()[0][:2]
            return collate_packed([[(ids, [IGNORE_INDEX] * len(ids))]], self.pad_id)
        return collate_packed([[(ids, labels) for ids, labels in s] for s in seqs], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {
            "streaming": True,
            "packing": self.packing,
            "seed": self.rows.seed,
            **self.rows.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("streaming"):
            raise DataError(
                "the checkpoint was taken with data.streaming off, but it is now on",
                where="data.streaming",
                hint="resume with the data.streaming the run was started with",
            )
        if bool(state.get("packing")) != self.packing:
            was = "on" if state.get("packing") else "off"
            raise DataError(
                f"the checkpoint was taken with data.packing {was}, but it is now "
                f"{'on' if self.packing else 'off'}",
                where="data.packing",
                hint="resume with the data.packing the run was started with",
            )
        self.rows.seed = int(state["seed"])
        self.rows.load_state_dict(state)


def build_stream(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
) -> tuple[RowStream, TokenizedData | None]:
    """The training row stream of `cfg` (data.streaming on) and its eval data: rows
    held out of the stream's head (`data.eval: N`), or an eval source read whole."""
    from grass_cli.data.build import held_out, source_config, tokenized_source, train_specs

    named = train_specs(cfg)
    sources = [resolve(v, k) for k, v in named]
    weights = [s.spec.weight for s in sources]
    w = None if any(x is None for x in weights) else [float(x) for x in weights]  # type: ignore[arg-type]
    held = held_out(cfg)
    skips = [0] * len(sources)
    eval_data = None
    if held is not None:
        skips = shares(int(held), w or [1.0] * len(sources))
        parts = []
        for s, k in zip(sources, skips, strict=True):
            if k == 0:
                continue
            head = SourceStream(s, cfg.limit)
            head.start()
            rows = head.take(k)
            if len(rows) < k or (cfg.limit is not None and k >= cfg.limit):
                has = len(rows) if len(rows) < k else cfg.limit
                raise DataError(
                    f"data.eval holds out {k} rows of this source, but it has {has}: "
                    "nothing would be left to train on",
                    where=f"{s.key}: {s.name}",
                    hint="hold out fewer rows, or give an eval source",
                )
            ev = tokenize_rows(rows, source_config(cfg, s.spec), tokenizer, f"{s.name} (held out)")
            parts.append(ev)
        eval_data = concat(parts, " + ".join(p.source for p in parts))
        if cfg.eval_limit is not None and cfg.eval_limit < len(eval_data):
            eval_data = subset(eval_data, list(range(cfg.eval_limit)))
    elif cfg.eval is not None:
        eval_data = tokenized_source(cfg.eval, "data.eval", cfg, tokenizer, cfg.eval_limit)
    streams = [SourceStream(s, cfg.limit, k) for s, k in zip(sources, skips, strict=True)]
    for s in streams:
        s.start()
    configs = [source_config(cfg, s.spec) for s in sources]
    return RowStream(streams, configs, w, tokenizer, cfg.shuffle_block, seed), eval_data
