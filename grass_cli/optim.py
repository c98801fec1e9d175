"""Block-wise AdamW: one torch AdamW per parameter group, stepped only when active.

A frozen group's optimizer is never stepped, so it gets no update at all, weight
decay included (a single AdamW over the whole model would still decay frozen
weights whose gradient is zero, not None). Per-group optimizers also give the
state store a natural unit to keep, drop or move.
"""

from __future__ import annotations

import math

import torch

from grass_cli.blocks import ParamGroup
from grass_cli.recipe import OptimizerConfig, TrainingConfig
from grass_cli.state_store import StateStore, state_bytes


class BlockAdamW:
    def __init__(self, groups: list[ParamGroup], cfg: OptimizerConfig, store: StateStore):
        self.groups = {g.name: g for g in groups}
        self.cfg = cfg
        self.store = store
        self.optimizers: dict[str, torch.optim.AdamW] = {}
        self.active: set[str] = set()

    def _make(self, group: ParamGroup) -> torch.optim.AdamW:
        # Decay matrices only: norms and biases are not decayed (common practice).
        decay = [p for p in group.tensors if p.ndim >= 2]
        no_decay = [p for p in group.tensors if p.ndim < 2]
        param_groups = [
            {"params": decay, "weight_decay": self.cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            [g for g in param_groups if g["params"]],
            lr=self.cfg.lr,
            betas=self.cfg.betas,
            eps=self.cfg.eps,
        )

    def set_active(self, names: set[str]) -> tuple[list[str], list[str]]:
        """Switch the active groups; returns (activated, frozen) group names."""
        activated = sorted(names - self.active)
        frozen = sorted(self.active - names)
        for name in frozen:
            group = self.groups[name]
            group.set_trainable(False)
            for p in group.tensors:
                p.grad = None
            self.store.release(name, self.optimizers[name])
        for name in activated:
            group = self.groups[name]
            group.set_trainable(True)
            if name not in self.optimizers:
                self.optimizers[name] = self._make(group)
            self.store.fetch(name, self.optimizers[name])
        self.active = set(names)
        return activated, frozen

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for name in sorted(self.active) for p in self.groups[name].tensors]

    def step(self, lr: float) -> None:
        for name in sorted(self.active):
            opt = self.optimizers[name]
            for pg in opt.param_groups:
                pg["lr"] = lr
            opt.step()

    def zero_grad(self) -> None:
        for name in self.active:
            self.optimizers[name].zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        return sum(state_bytes(o) for o in self.optimizers.values())


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
