"""What happens to a block's AdamW state when the block is frozen.

The narrow interface the optimizer uses: `release(name, optimizer)` when a group
is frozen and `fetch(name, optimizer)` when it becomes active again. Policies:

- keep: the state stays where it is (on the device), so memory grows toward full
  fine-tuning as blocks are visited: what LMFlow and axolotl's LISA do.
- drop: the state is thrown away, so a re-activated block restarts its moments
  from zero: what BAdam and MISA do.
"""

from __future__ import annotations

from typing import Protocol

import torch


class StateStore(Protocol):
    policy: str

    def release(self, name: str, optimizer: torch.optim.Optimizer) -> None: ...

    def fetch(self, name: str, optimizer: torch.optim.Optimizer) -> None: ...


class KeepStore:
    policy = "keep"

    def release(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Nothing moves: the frozen block's moments stay on the device."""

    def fetch(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Nothing to bring back: the state never left."""


class DropStore:
    policy = "drop"

    def release(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        optimizer.state.clear()

    def fetch(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """A re-activated block starts with fresh moments (state was dropped)."""


def build_store(policy: str) -> StateStore:
    return {"keep": KeepStore, "drop": DropStore}[policy]()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's state tensors."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total
