"""Batching tokenized rows: padding by position, resumable epochs, evaluation batches.

Padding is added by position in `collate`, never by comparing ids, because an
end-of-turn token may share its id with the pad token and must still be trained:
it is how the model learns to stop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from grass_cli.data.packing import collate_packed, count_micro_batches, pack_next
from grass_cli.data.tokens import IGNORE_INDEX, TokenizedData
from grass_cli.errors import DataError

if TYPE_CHECKING:
    import torch


def collate(
    input_ids: list[list[int]], labels: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one: input_ids, attention_mask, labels tensors.

    Padding is decided by position (past each row's length), never by comparing ids
    with `pad_id` or eos, so a trained end-of-turn token that shares the pad id keeps
    its label and attention.
    """
    import torch

    if not input_ids:
        raise ValueError("collate needs at least one row")
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} rows of input_ids but {len(labels)} of labels")
    width = max(len(r) for r in input_ids)
    n = len(input_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labs = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(input_ids, labels, strict=True)):
        if len(row) != len(lab):
            raise ValueError(f"row {i}: {len(row)} input ids but {len(lab)} labels")
        k = len(row)
        if k:
            ids[i, :k] = torch.tensor(row, dtype=torch.long)
            labs[i, :k] = torch.tensor(lab, dtype=torch.long)
            mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labs}


def steps_per_epoch(n_rows: int, micro_batch_size: int, grad_accum_steps: int) -> int:
    """Optimizer steps to see every row once: ceil(rows / (micro * accum)).

    Equals ceil(micro_batches / accum) with micro_batches = ceil(rows / micro), the
    count `BatchIterator` yields per epoch (it keeps the last partial micro batch).
    """
    if n_rows < 0 or micro_batch_size < 1 or grad_accum_steps < 1:
        raise ValueError("need n_rows >= 0, micro_batch_size >= 1, grad_accum_steps >= 1")
    return math.ceil(n_rows / (micro_batch_size * grad_accum_steps))


class BatchIterator:
    """Micro batches forever, epoch after epoch, resumable exactly.

    Epoch `e` visits the rows in a permutation drawn from a generator seeded with
    `(seed, e)`, so any epoch's order can be rebuilt from the seed alone and a resume
    needs only `(epoch, position)`, not a generator's internal state. `position` is
    the index, in the current epoch's order, of the next row to serve.

    The last micro batch of an epoch may be smaller: it is kept, not dropped and not
    topped up from the next epoch, so that every row is seen exactly once per epoch
    and batches never straddle an epoch. (Loss normalization over uneven batches is
    the trainer's concern.) `next_indices` gives the row indices; iterating gives the
    collated tensors.

    Data-parallel (`world` > 1): the *global* micro batch is `micro_batch_size x
    world` consecutive rows of the epoch's order, and rank r takes every world-th of
    them starting at r. Every rank walks the same order, so the ranks' shards are
    disjoint, together they are exactly the rows one process would take with the
    global batch size, and a resume needs nothing per rank. A rank whose share of an
    epoch's short last batch is empty gets one fully masked row (no loss, zero
    gradient), so that it still takes part in the step's collectives.

    Packing (`packing=True`, see packing.py): a micro batch is `micro_batch_size`
    sequences of up to `max_length` tokens, filled first-fit with whole rows taken
    in the same epoch order, and data-parallel ranks take every world-th sequence.
    A micro batch is still a function of `(epoch, position)`, so the state and
    the resume are unchanged.
    """

    def __init__(
        self,
        data: TokenizedData,
        micro_batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
        packing: bool = False,
        max_length: int | None = None,
    ):
        if len(data) == 0:
            raise ValueError("BatchIterator needs at least one row")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.rank, self.world = rank, world
        self.data = data
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1
        self.packing = packing
        if packing:
            if max_length is None:
                raise ValueError("packing needs max_length")
            self.max_length = max_length
            self._lengths = [len(r) for r in data.input_ids]

    @property
    def n_rows(self) -> int:
        return len(self.data)

    @property
    def batches_per_epoch(self) -> int:
        """Micro batches in the current epoch (with packing, they depend on its order)."""
        if self.packing:
            return self._packed_batches(self.epoch)
        return math.ceil(self.n_rows / (self.micro_batch_size * self.world))

    def _packed_batches(self, epoch: int) -> int:
        bins = self.micro_batch_size * self.world
        return count_micro_batches(self._lengths, self.order(epoch), bins, self.max_length)

    def steps_for_epochs(self, epochs: float, grad_accum_steps: int) -> int:
        """Optimizer steps for `epochs` passes over the rows (at least 1).

        Unpacked: ceil(epochs x steps_per_epoch), as always. Packed: the micro
        batches each epoch's order packs into, counted exactly (a fraction of an
        epoch takes that share of its batches), then grouped by accumulation.
        """
        if not self.packing:
            per_epoch = steps_per_epoch(
                self.n_rows, self.micro_batch_size * self.world, grad_accum_steps
            )
            return max(1, math.ceil(epochs * per_epoch))
        whole = math.floor(epochs)
        micro = sum(self._packed_batches(e) for e in range(whole))
        if epochs > whole:
            micro += math.ceil((epochs - whole) * self._packed_batches(whole))
        return max(1, math.ceil(micro / grad_accum_steps))

    def order(self, epoch: int) -> np.ndarray:
        """Row indices of `epoch` in visiting order (a pure function of seed and epoch)."""
        if not self.shuffle:
            return np.arange(self.n_rows)
        # SeedSequence needs non-negative entries; fold a negative seed into 64 bits.
        rng = np.random.default_rng([self.seed % 2**64, epoch])
        return rng.permutation(self.n_rows)

    def _current_order(self) -> np.ndarray:
        if self._order is None or self._order_epoch != self.epoch:
            self._order = self.order(self.epoch)
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self) -> list[int]:
        """The next micro batch's row indices (this rank's share of the global micro
        batch); moves to the next epoch after its last."""
        order = self._current_order()
        end = min(self.position + self.micro_batch_size * self.world, self.n_rows)
        batch = [int(i) for i in order[self.position : end]][self.rank :: self.world]
        self.position = end
        if self.position >= self.n_rows:
            self.epoch += 1
            self.position = 0
        return batch

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if not indices:  # an empty data-parallel share: one row that carries no loss
            row = self.data.input_ids[0][:2]
            return collate([row], [[IGNORE_INDEX] * len(row)], self.pad_id)
        return collate(
            [self.data.input_ids[i] for i in indices],
            [self.data.labels[i] for i in indices],
            self.pad_id,
        )

    def __iter__(self) -> BatchIterator:
        return self

    def next_sequences(self) -> list[list[int]]:
        """Packing: the next micro batch's sequences (row indices each), this rank's
        share of the global micro batch; moves to the next epoch after its last."""
        order = self._current_order()
        bins = self.micro_batch_size * self.world
        packed, self.position = pack_next(
            self._lengths, order, self.position, bins, self.max_length
        )
        if self.position >= self.n_rows:
            self.epoch += 1
            self.position = 0
        return packed[self.rank :: self.world]

    def packed_batch(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        """The tensors of packed sequences (`collate_packed`), as `batch` is for rows."""
        if not sequences:  # an empty data-parallel share: one row that carries no loss
            row = self.data.input_ids[0][:2]
            return collate_packed([[(row, [IGNORE_INDEX] * len(row))]], self.pad_id)
        d = self.data
        return collate_packed(
            [[(d.input_ids[i], d.labels[i]) for i in seq] for seq in sequences], self.pad_id
        )

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.packing:
            return self.packed_batch(self.next_sequences())
        return self.batch(self.next_indices())

    def state_dict(self) -> dict[str, Any]:
        state = {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "n_rows": self.n_rows,
        }
        if self.packing:  # only then: an unpacked run's state is what it always was
            state["packing"] = True
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state_dict` was taken; the order comes from the saved seed."""
        if state.get("streaming"):  # (StreamBatches' state)
            raise DataError(
                "the checkpoint was taken with data.streaming on, but it is now off",
                where="data.streaming",
                hint="resume with the data.streaming the run was started with",
            )
        if int(state["n_rows"]) != self.n_rows:
            raise DataError(
                f"the checkpoint was taken with {state['n_rows']} training rows, "
                f"but the data now has {self.n_rows}",
                where=self.data.source or None,
                hint="resume with the same data file, data.limit and data.max_length",
            )
        if bool(state.get("packing", False)) != self.packing:
            was = "on" if state.get("packing") else "off"
            raise DataError(
                f"the checkpoint was taken with data.packing {was}, but it is now "
                f"{'on' if self.packing else 'off'}: the batches would not continue "
                "where they stopped",
                where="data.packing",
                hint="resume with the data.packing the run was started with",
            )
        position = int(state["position"])
        if not 0 <= position < self.n_rows:
            raise ValueError(f"position {position} is outside 0..{self.n_rows - 1}")
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.position = position
        self._order = None


def eval_batches(
    data: TokenizedData, batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches over the rows in file order, once (for evaluation)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(data), batch_size):
        end = start + batch_size
        yield collate(data.input_ids[start:end], data.labels[start:end], pad_id)
