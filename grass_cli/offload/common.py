"""What the offload stores share: byte counts and a stored tensor's place in a file."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Slot:
    shape: torch.Size
    dtype: torch.dtype
    offset: int
    nbytes: int
