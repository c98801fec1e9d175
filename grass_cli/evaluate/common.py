"""What every evaluation measurement shares: the model to run, how, and where to report.

Measurements (loss, generation, multiple choice) take one `EvalContext` instead of
seven arguments each, and write per-row results into its `items`, which become
predictions.jsonl.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from grass_cli.eval_config import EvalConfig
from grass_cli.models import resolve_device

# Called as progress(phase, done, total) while evaluating; the library never prints.
Progress = Callable[[str, int, int], None]


@dataclass
class EvalContext:
    """A model (already on `device`, in eval mode) and the options it is evaluated with."""

    model: torch.nn.Module
    tokenizer: Any
    cfg: EvalConfig
    device: torch.device
    autocast: str
    items: list[dict[str, Any]]  # one dict per row, in file order
    progress: Progress | None = None

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0

    def report(self, phase: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(phase, done, total)


def batched(n: int, size: int) -> Iterable[tuple[int, int]]:
    """(start, end) of consecutive slices of at most `size` out of `n`."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def pick_device(name: str) -> torch.device:
    """The `--device` option of `grass eval` / `inspect-importance`."""
    return resolve_device(name, where="--device")
