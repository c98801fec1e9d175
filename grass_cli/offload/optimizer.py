"""Block-wise AdamW: one torch AdamW per parameter group, stepped only when active.

A frozen group's optimizer is never stepped, so it gets no update at all, weight
decay included (a single AdamW over the whole model would still decay frozen
weights whose gradient is zero, not None). Per-group optimizers are also the unit
the state policy works on:

- keep: a frozen group's state stays where it is (on the device).
- drop: it is discarded; a re-activated group starts with fresh moments.
- offload: it moves to a store (host memory or disk) and comes back intact when
  the group is sampled again. With residency `interval` it moves once per switch:
  an activated group's copies start at the switch and are waited for at its first
  step, so they overlap that step's forward and backward. With `step` only the
  parameter being stepped, and the next one (prefetched while this one steps), are
  on the device.

Reduced-precision models (bf16/fp16 weights) get fp32 master weights for the
active groups only; the masters live and move with the group's optimizer state.

Sharded models (distributed.sharding: fsdp) have DTensor parameters: the optimizer
steps plain tensors sharing storage with each rank's local shards (grass_cli/
sharding.py), so everything above works on 1/N of every tensor, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from grass_cli.offload.adamw import adamw, step_together
from grass_cli.offload.compact import state_bytes
from grass_cli.offload.group_state import EMPTY, GroupState, chunk_name
from grass_cli.offload.store import Store, tensor_bytes
from grass_cli.recipe import OptimizerConfig
from grass_cli.sampling.blocks import ParamGroup
from grass_cli.sharding import is_sharded, local


def _by_decay(params: list[torch.nn.Parameter]) -> tuple[list, list]:
    """Matrices are decayed, norms and biases not (common practice): the two
    parameter groups of every group's AdamW, in this order."""
    return [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]


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
        # a sharded parameter is stepped through a plain tensor over its local shard
        params = [
            torch.nn.Parameter(local(p), requires_grad=False) if is_sharded(p) else p
            for p in group.tensors
        ]
        master = None
        if any(p.dtype in (torch.bfloat16, torch.float16) for p in params):
            if self.policy == "offload" and self.residency == "step":
                # streamed: each master is made when its parameter first steps, so
                # activating a group never holds the whole group's masters at once
                master = [torch.nn.Parameter(p.new_empty(0, dtype=torch.float32)) for p in params]
            else:
                master = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
        opt_params = master if master is not None else params
        decay, no_decay = _by_decay(opt_params)
        param_groups = [
            {"params": decay, "weight_decay": self.cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        opt = adamw([g for g in param_groups if g["params"]], self.cfg)
        return GroupState(group.name, params, opt, master)

    def state_order(self, name: str) -> list[torch.nn.Parameter]:
        """A group's model parameters in the order its optimizer's state dict numbers
        them (a checkpoint's `state` indices)."""
        decay, no_decay = _by_decay(self.groups[name].tensors)
        return decay + no_decay

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
        if self.store is not None:
            self.store.settle()
        return activated, frozen

    @property
    def stage_steps(self) -> int:
        """Steps before a switch to call `stage` (0: the store cannot use it)."""
        if self.store is None or not hasattr(self.store, "stage"):
            return 0
        return self.cfg.offload.stage_steps

    def stage(self, names: set[str]) -> None:
        """Groups about to become active: the store starts bringing their state in
        from its slower tier (their offloaded chunks), ahead of the switch."""
        chunks = [
            chunk_name(n, j)
            for n in sorted(names - self.active)
            if n in self.states
            for j in sorted(self.states[n].out)
        ]
        self.store.stage(chunks)

    def _acquire(self, name: str) -> None:
        """A group becomes active: create its state, or bring it back."""
        st = self.states.get(name)
        if st is None:
            self.states[name] = self._make(self.groups[name])
            return
        if self.policy == "drop" and st.master is not None and st.master_tensors() == []:
            # dropped: fresh masters from the current weights (a streamed run makes
            # them one matrix at a time in the step instead)
            for m, p in zip(st.master, st.params, strict=True):
                m.data = p.detach().float().clone()
        if self.policy == "offload" and st.offloaded and self.residency == "interval":
            # Started now, waited for only when the step needs it: the copies run
            # during the interval's first forward and backward, not before them.
            for j in sorted(st.out):
                self.store.prefetch(chunk_name(st.name, j), self.device)

    def _bring_back(self, st: GroupState) -> None:
        """Every chunk of a group back on the device (prefetched at the switch; any
        not yet started are started before the first is waited for)."""
        chunks = sorted(st.out)
        for j in chunks:
            self.store.prefetch(chunk_name(st.name, j), self.device)
        for j in chunks:
            st.give_chunk(j, self.store.get(chunk_name(st.name, j), self.device))

    def _release(self, name: str) -> None:
        """A group is frozen: apply the state policy."""
        st = self.states[name]
        if self.policy == "drop":
            st.optimizer.state.clear()
            if st.master is not None:
                for m in st.master:
                    m.data = EMPTY
        elif self.policy == "offload":
            for j in st.out:  # activated, then frozen before its first step
                self.store.cancel(chunk_name(name, j))
            self._offload(st)

    def _offload(self, st: GroupState, chunks: Iterable[int] | None = None) -> None:
        for j in range(len(st.opt_params)) if chunks is None else chunks:
            if j in st.out:
                continue
            tensors = st.take_chunk(j)
            if tensors:  # (nothing to move for a parameter never stepped)
                self.store.put(chunk_name(st.name, j), tensors)

    # ------------------------------------------------------------------ step

    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for name in sorted(self.active) for p in self.groups[name].tensors]

    def step(self, lr: float, scales: dict[str, float] | None = None) -> None:
        """AdamW on every active group, in a fixed order; `scales` multiplies the lr
        of the groups it names (sampler.lr_correction).

        With residency `step`, the update streams one parameter at a time: its state
        is fetched just before its update (it was prefetched while the previous
        parameter stepped) and written back right after, so at most two weight
        matrices' state (moments + fp32 master) are on the device at once, plus the
        previous one's while its write-back finishes. Each gradient is freed once
        its parameter is updated. The step returns once every write-back has
        finished (`store.settle`), so no state is held through the next forward and
        backward.
        """
        order = sorted(self.active)
        self._link_sharded_grads(order)
        for name in order:
            scale = scales.get(name, 1.0) if scales else 1.0
            for pg in self.states[name].optimizer.param_groups:
                pg["lr"] = lr * scale
        if self.policy == "offload" and self.residency == "step":
            self._step_streaming(order)
            self.store.settle()
            return
        together = []  # fp32 groups: one fused call for all of them
        for name in order:
            st = self.states[name]
            if st.offloaded:  # (interval residency: brought back at its first step)
                self._bring_back(st)
            if st.master is None:
                together.append(st.optimizer)
                continue
            # fp32 masters of bf16 weights: one group's fp32 gradient copies at a time
            for m, p in zip(st.master, st.params, strict=True):
                m.grad = None if p.grad is None else p.grad.float()
            st.optimizer.step()
            with torch.no_grad():
                for m, p in zip(st.master, st.params, strict=True):
                    p.copy_(m)
                    m.grad = None
        step_together(together)

    def _link_sharded_grads(self, order: list[str]) -> None:
        """Sharded groups: each local view gets its shard of the reduced gradient (and
        follows the shard if FSDP2 re-allocated it, which an in-place copy never does)."""
        for name in order:
            st = self.states[name]
            for v, p in zip(st.params, self.groups[name].tensors, strict=True):
                if v is p:
                    continue
                shard = local(p)
                if v.data_ptr() != shard.data_ptr() or v.shape != shard.shape:
                    v.data = shard
                v.grad = None if p.grad is None else local(p.grad)

    def _step_streaming(self, order: list[str]) -> None:
        units = [
            (self.states[name], j)
            for name in order
            for j in range(len(self.states[name].opt_params))
            if self.states[name].params[j].grad is not None
        ]

        def prefetch(k: int) -> None:
            if k < len(units) and units[k][1] in units[k][0].out:
                st, j = units[k]
                self.store.prefetch(chunk_name(st.name, j), self.device)

        prefetch(0)
        for k, (st, j) in enumerate(units):
            if j in st.out:
                st.give_chunk(j, self.store.get(chunk_name(st.name, j), self.device))
            prefetch(k + 1)
            p = st.params[j]
            if st.master is not None:
                m = st.master[j]
                if m.numel() == 0:  # a new or dropped chunk: master from the weights
                    m.data = p.detach().float().clone()
                m.grad = p.grad.float()
                p.grad = None  # consumed: the step's peak shrinks as it goes
            st.step_chunk(j)
            if st.master is not None:
                with torch.no_grad():
                    p.copy_(st.master[j])
                st.master[j].grad = None
            p.grad = None
            self.groups[st.name].tensors[j].grad = None  # (the sharded one's, if any)
            self._offload(st, [j])

    def zero_grad(self) -> None:
        for name in self.active:
            for p in self.groups[name].tensors:
                p.grad = None
            if name in self.states:
                for v in self.states[name].params:
                    v.grad = None

    # ------------------------------------------------------------- checkpoints

    def export_groups(self) -> Iterator[tuple[str, dict]]:
        """Every group's state for a checkpoint, one group at a time.

        An offloaded group's tensors are read back from the store only when its turn
        comes, so a checkpoint of an offloaded run needs one group's state in host
        memory, not every group's at once (for a 7B model, 56 GB)."""
        for name in list(self.states):
            st = self.states[name]
            stored = {}
            if self.store is not None:
                for j in sorted(st.out):
                    stored[j] = self.store.host_tensors(chunk_name(name, j))
            yield name, st.export(stored)

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
                    m.data = t.to(self.device) if t.numel() > 0 else EMPTY
            self.states[name] = st
            if name not in self.active:
                self._release(name)
            elif self.policy == "offload" and self.residency == "step":
                self._offload(st)  # streaming: states wait in the store between steps
        for name in sorted(self.active - set(self.states)):  # (a light checkpoint's)
            self._acquire(name)  # fresh state, as at a first activation

    # ------------------------------------------------------------- accounting

    def memory(self) -> dict[str, int]:
        """Bytes of optimizer state and masters on the device and in the store."""
        state = sum(tensor_bytes(s.state_tensors()) for s in self.states.values())
        master = sum(tensor_bytes(s.master_tensors()) for s in self.states.values())
        stored = self.store.bytes() if self.store is not None else 0
        target = self.store.target if self.store is not None else None
        # the two-tier store: its hot tier in host memory, the rest on disk
        hot = self.store.hot_bytes() if target == "tiered" else stored
        return {
            "optimizer_state_bytes": state,
            "master_weight_bytes": master,
            "optimizer_state_offload_cpu_bytes": hot if target in ("cpu", "tiered") else 0,
            "optimizer_state_offload_disk_bytes": (
                stored if target == "disk" else max(stored - hot, 0) if target == "tiered" else 0
            ),
            # page-locked host memory behind the cpu store (CUDA only)
            "offload_pinned_bytes": self.store.pinned_bytes() if self.store is not None else 0,
        }

    def stored_groups(self) -> set[str]:
        """Groups with at least one chunk in the store."""
        return {name for name, st in self.states.items() if st.offloaded}

    def offload_bytes_needed(self, names: list[str]) -> int:
        """Upper bound of the store's size: AdamW moments (+ masters) of these groups."""
        total = 0
        for name in names:
            for p in self.groups[name].tensors:
                per = state_bytes(self.cfg.state_dtype, p.element_size())
                total += int(local(p).numel() * per)  # (a rank's shard when sharded)
        return total
