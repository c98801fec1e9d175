"""The learning-rate schedule: linear warmup, then constant, linear or cosine decay."""

from __future__ import annotations

import math

from grass_cli.recipe import TrainingConfig


def lr_at(step: int, total_steps: int, base_lr: float, cfg: TrainingConfig) -> float:
    """Learning rate at optimizer step `step` (0-based), nanoGPT-style."""
    # 1) linear warmup from base_lr / warmup to base_lr
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler == "constant":
        return base_lr
    # 2) decay from base_lr to min_lr over the remaining steps
    min_lr = base_lr * cfg.min_lr_ratio
    span = max(1, total_steps - cfg.warmup_steps)
    ratio = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_scheduler == "linear":
        return base_lr - (base_lr - min_lr) * ratio
    # 3) cosine
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (base_lr - min_lr)
