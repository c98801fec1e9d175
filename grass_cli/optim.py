"""Block-wise AdamW: one torch AdamW per parameter group, stepped only when active.

A frozen group's optimizer is never stepped, so it gets no update at all, weight
decay included (a single AdamW over the whole model would still decay frozen
weights whose gradient is zero, not None). Per-group optimizers are also the unit
the state policy works on:

- keep: a frozen group's state stays where it is (on the device).
- drop: it is discarded; a re-activated group starts with fresh moments.
- offload: it moves to a store (host memory or disk) and comes back intact when
  the group is sampled again. With residency `interval` it moves once per switch;
  with `step` only the group being stepped, and the next one (prefetched while this
  one steps), are on the device.

Reduced-precision models (bf16/fp16 weights) get fp32 master weights for the
active groups only; the masters live and move with the group's optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from grass_cli.blocks import ParamGroup
from grass_cli.recipe import OptimizerConfig, TrainingConfig
from grass_cli.state_store import CpuStore, DiskStore, Store, tensor_bytes

_EMPTY = torch.empty(0)


@dataclass
class GroupState:
    """A group's optimizer and, for reduced-precision weights, its fp32 masters."""

    name: str
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    master: list[torch.nn.Parameter] | None = None
    offloaded: bool = False
    # (param, key) of every state tensor taken out when offloaded, in order.
    _layout: list[tuple[torch.Tensor, str]] = field(default_factory=list)

    @property
    def opt_params(self) -> list[torch.nn.Parameter]:
        return self.master if self.master is not None else self.params

    def take(self) -> list[torch.Tensor]:
        """Remove the state tensors (and masters) from the optimizer, for a store."""
        out: list[torch.Tensor] = []
        self._layout = []
        for p in self.opt_params:
            st = self.optimizer.state.get(p, {})
            for key in sorted(st):
                v = st[key]
                if isinstance(v, torch.Tensor) and v.dim() > 0:  # not the scalar step
                    out.append(v)
                    self._layout.append((p, key))
                    st[key] = _EMPTY
        if self.master is not None:
            for m in self.master:
                out.append(m.data)
                m.data = _EMPTY
        self.offloaded = True
        return out

    def give(self, tensors: list[torch.Tensor] | None) -> None:
        """Put back what `take` removed."""
        if tensors is None:
            self.offloaded = False
            return
        it = iter(tensors)
        for p, key in self._layout:
            self.optimizer.state[p][key] = next(it)
        if self.master is not None:
            for m in self.master:
                m.data = next(it)
        self.offloaded = False

    def export(self, stored: list[torch.Tensor] | None) -> dict:
        """State dict + masters for a checkpoint; `stored` are the offloaded tensors."""
        sd = self.optimizer.state_dict()
        # state_dict() shares the per-parameter dicts with the live optimizer: copy
        # them before putting the offloaded tensors in.
        sd["state"] = {i: dict(v) for i, v in sd["state"].items()}
        masters = [m.data for m in self.master] if self.master is not None else None
        if self.offloaded and stored is not None:
            index = {
                id(p): i
                for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])
            }
            it = iter(stored)
            for p, key in self._layout:
                sd["state"][index[id(p)]][key] = next(it)
            if self.master is not None:
                masters = [next(it) for _ in self.master]
        return {"opt": sd, "master": masters}

    def state_tensors(self) -> list[torch.Tensor]:
        """State tensors currently held by the optimizer (not offloaded)."""
        out = []
        for st in self.optimizer.state.values():
            out.extend(v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        return [t for t in out if t.numel() > 0]

    def master_tensors(self) -> list[torch.Tensor]:
        if self.master is None:
            return []
        return [m.data for m in self.master if m.numel() > 0]


class BlockAdamW:
    def __init__(
        self,
        groups: list[ParamGroup],
        cfg: OptimizerConfig,
        device: torch.device,
        store: Store | None = None,
    ):
        self.groups = {g.name: g for g in groups}
        self.cfg = cfg
        self.device = device
        self.policy = cfg.state_policy
        self.residency = cfg.offload.residency if self.policy == "offload" else "interval"
        self.store = store
        if self.policy == "offload" and store is None:
            raise ValueError("state_policy offload needs a store")
        self.states: dict[str, GroupState] = {}
        self.active: set[str] = set()

    # ---------------------------------------------------------------- building

    def _make(self, group: ParamGroup) -> GroupState:
        params = group.tensors
        master = None
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in params):
            master = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
        opt_params = master if master is not None else params
        # Decay matrices only: norms and biases are not decayed (common practice).
        decay = [p for p in opt_params if p.ndim >= 2]
        no_decay = [p for p in opt_params if p.ndim < 2]
        param_groups = [
            {"params": decay, "weight_decay": self.cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(
            [g for g in param_groups if g["params"]],
            lr=self.cfg.lr,
            betas=self.cfg.betas,
            eps=self.cfg.eps,
        )
        return GroupState(group.name, params, opt, master)

    # ------------------------------------------------------------- switching

    def set_active(self, names: set[str]) -> tuple[list[str], list[str]]:
        """Switch the active groups; returns (activated, frozen) group names."""
        activated = sorted(names - self.active)
        frozen = sorted(self.active - names)
        for name in frozen:
            group = self.groups[name]
            group.set_trainable(False)
            for p in group.tensors:
                p.grad = None
            self._release(name)
        for name in activated:
            self.groups[name].set_trainable(True)
            self._acquire(name)
        self.active = set(names)
        return activated, frozen

    def _acquire(self, name: str) -> None:
        """A group becomes active: create its state, or bring it back."""
        st = self.states.get(name)
        if st is None:
            self.states[name] = self._make(self.groups[name])
            return
        if st.master is not None and st.master_tensors() == [] and not st.offloaded:
            # dropped: fresh masters from the current weights
            for m, p in zip(st.master, st.params, strict=True):
                m.data = p.detach().float().clone()
        if self.policy == "offload" and st.offloaded and self.residency == "interval":
            st.give(self.store.get(name, self.device))

    def _release(self, name: str) -> None:
        """A group is frozen: apply the state policy."""
        st = self.states[name]
        if self.policy == "drop":
            st.optimizer.state.clear()
            if st.master is not None:
                for m in st.master:
                    m.data = _EMPTY
        elif self.policy == "offload" and not st.offloaded:
            self._offload(st)

    def _offload(self, st: GroupState) -> None:
        tensors = st.take()
        if tensors:
            self.store.put(st.name, tensors)
        else:
            st.offloaded = False  # nothing to move yet (never stepped)

    # ------------------------------------------------------------------ step

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for name in sorted(self.active) for p in self.groups[name].tensors]

    def step(self, lr: float) -> None:
        """AdamW on every active group, in a fixed order.

        With residency `step`, group i's state is fetched just before its update
        (it was prefetched while group i-1 stepped) and written back right after,
        so at most two groups' states are on the device at once.
        """
        order = sorted(self.active)
        streaming = self.policy == "offload" and self.residency == "step"
        if streaming and order:
            self.store.prefetch(order[0], self.device)
        for i, name in enumerate(order):
            st = self.states[name]
            if streaming:
                if st.offloaded:
                    st.give(self.store.get(name, self.device))
                if i + 1 < len(order) and self.states[order[i + 1]].offloaded:
                    self.store.prefetch(order[i + 1], self.device)
            if st.master is not None:
                for m, p in zip(st.master, st.params, strict=True):
                    m.grad = None if p.grad is None else p.grad.float()
            for pg in st.optimizer.param_groups:
                pg["lr"] = lr
            st.optimizer.step()
            if st.master is not None:
                with torch.no_grad():
                    for m, p in zip(st.master, st.params, strict=True):
                        p.copy_(m)
                        m.grad = None
            if streaming:
                self._offload(st)

    def zero_grad(self) -> None:
        for name in self.active:
            for p in self.groups[name].tensors:
                p.grad = None

    # ------------------------------------------------------------- checkpoints

    def export_groups(self) -> Iterator[tuple[str, dict]]:
        """Every group's state for a checkpoint, one group at a time.

        An offloaded group's tensors are read back from the store only when its turn
        comes, so a checkpoint of an offloaded run needs one group's state in host
        memory, not every group's at once (for a 7B model, 56 GB)."""
        for name in list(self.states):
            st = self.states[name]
            stored = self.store.host_tensors(name) if st.offloaded and self.store else None
            yield name, st.export(stored)

    def export_state(self) -> dict:
        """Every group's state in one dict (small models and tests)."""
        return {"groups": dict(self.export_groups()), "active": sorted(self.active)}

    def import_state(self, data: dict, active: set[str]) -> None:
        """Rebuild the groups' states from `export_state`'s dict."""
        self.import_groups(data["groups"].items(), active)

    def import_groups(self, groups: Iterable[tuple[str, dict]], active: set[str]) -> None:
        """Rebuild the groups' states from a checkpoint, one group at a time, each put
        where the state policy wants it (device or store) before the next is read."""
        for name, group in self.groups.items():
            group.set_trainable(name in active)
        self.active = set(active)
        for name, d in groups:
            st = self._make(self.groups[name])
            st.optimizer.load_state_dict(d["opt"])
            if st.master is not None and d["master"] is not None:
                for m, t in zip(st.master, d["master"], strict=True):
                    m.data = t.to(self.device) if t.numel() > 0 else _EMPTY
            self.states[name] = st
            if name not in self.active:
                self._release(name)
            elif self.policy == "offload" and self.residency == "step":
                self._offload(st)  # streaming: states wait in the store between steps

    # ------------------------------------------------------------- accounting

    def memory(self) -> dict[str, int]:
        """Bytes of optimizer state and masters on the device and in the store."""
        state = sum(tensor_bytes(s.state_tensors()) for s in self.states.values())
        master = sum(tensor_bytes(s.master_tensors()) for s in self.states.values())
        stored = self.store.bytes() if self.store is not None else 0
        target = self.store.target if self.store is not None else None
        return {
            "optimizer_state_bytes": state,
            "master_weight_bytes": master,
            "optimizer_state_offload_cpu_bytes": stored if target == "cpu" else 0,
            "optimizer_state_offload_disk_bytes": stored if target == "disk" else 0,
        }

    def state_bytes(self) -> int:
        return self.memory()["optimizer_state_bytes"]

    def offload_bytes_needed(self, names: list[str]) -> int:
        """Upper bound of the store's size: AdamW moments (+ masters) of these groups."""
        total = 0
        for name in names:
            for p in self.groups[name].tensors:
                per = 8 if p.dtype == torch.float32 else 12  # 2 fp32 moments (+ master)
                total += p.numel() * per
        return total


def build_store(
    cfg: OptimizerConfig, device: torch.device, run_dir, subdir: str | None = None
) -> Store | None:
    """The offload store, if any. `subdir` separates the ranks of a data-parallel
    run on disk (each rank has its own store)."""
    if cfg.state_policy != "offload":
        return None
    if cfg.offload.target == "cpu":
        return CpuStore(device, overlap=cfg.offload.overlap)
    from pathlib import Path

    folder = Path(cfg.offload.path) if cfg.offload.path else Path(run_dir) / "offload"
    if subdir:
        folder = folder / subdir
    return DiskStore(folder, device, overlap=cfg.offload.overlap)


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
