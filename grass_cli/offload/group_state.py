"""A group's optimizer state as the offload store moves it: one parameter ("chunk") at a time.

`GroupState` holds one group's torch AdamW, its fp32 masters (bf16 weights), and
which parameters' state is out in the store (`out`). The optimizer
(offload/optimizer.py) decides when state moves; this class only takes a chunk's
tensors out of the torch optimizer, puts them back, and steps one chunk alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EMPTY = torch.empty(0)


def chunk_name(group: str, index: int) -> str:
    """The store's name for one parameter's state within a group."""
    return f"{group}@{index}"


@dataclass
class GroupState:
    """A group's optimizer and, for reduced-precision weights, its fp32 masters.

    State moves to and from a store one parameter at a time (a *chunk*: the
    parameter's AdamW moments and its fp32 master), so a streamed step holds at
    most two weight matrices' state on the device, not two blocks' (for a 7B
    model, about 1 GB instead of about 5 GB)."""

    name: str
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer  # torch's AdamW, or a compact-moment one
    master: list[torch.nn.Parameter] | None = None
    # indices (into opt_params) of the chunks now in the store
    out: set[int] = field(default_factory=set)
    # state keys taken out of each chunk, in order
    _keys: dict[int, list[str]] = field(default_factory=dict)

    @property
    def opt_params(self) -> list[torch.nn.Parameter]:
        return self.master if self.master is not None else self.params

    @property
    def offloaded(self) -> bool:
        return bool(self.out)

    def take_chunk(self, j: int) -> list[torch.Tensor]:
        """Remove parameter j's state tensors (and master) from the optimizer.

        Returns [] (and takes nothing) when there is nothing to move yet: a
        parameter that was never stepped has no moments."""
        p = self.opt_params[j]
        st = self.optimizer.state.get(p, {})
        keys = [k for k in sorted(st) if isinstance(st[k], torch.Tensor) and st[k].dim() > 0]
        has_master = self.master is not None and p.numel() > 0
        if not keys and not has_master:
            return []
        out = [st[k] for k in keys]
        for k in keys:
            st[k] = EMPTY
        if self.master is not None:
            out.append(p.data)
            p.data = EMPTY
        self._keys[j] = keys
        self.out.add(j)
        return out

    def give_chunk(self, j: int, tensors: list[torch.Tensor]) -> None:
        """Put back what `take_chunk(j)` removed."""
        p = self.opt_params[j]
        it = iter(tensors)
        for k in self._keys[j]:
            self.optimizer.state[p][k] = next(it)
        if self.master is not None:
            p.data = next(it)
        self.out.discard(j)

    def export(self, stored: dict[int, list[torch.Tensor]]) -> dict:
        """State dict + masters for a checkpoint; `stored` are the offloaded chunks."""
        sd = self.optimizer.state_dict()
        # state_dict() shares the per-parameter dicts with the live optimizer: copy
        # them before putting the offloaded tensors in.
        sd["state"] = {
            i: {k: dict(x) if isinstance(x, dict) else x for k, x in v.items()}
            for i, v in sd["state"].items()
        }
        masters = [m.data for m in self.master] if self.master is not None else None
        flat = (p for g in self.optimizer.param_groups for p in g["params"])
        index = {id(p): i for i, p in enumerate(flat)}
        for j, tensors in stored.items():
            p = self.opt_params[j]
            it = iter(tensors)
            entry = sd["state"][index[id(p)]]
            for k in self._keys[j]:
                # bitsandbytes' state_dict nests its quantization tensors one level
                # down (hidden from FSDP's gathering): the tensor goes where the key is
                nested = next((v for v in entry.values() if isinstance(v, dict) and k in v), None)
                (entry if nested is None else nested)[k] = next(it)
            if masters is not None:
                masters[j] = next(it)
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

    def step_chunk(self, j: int) -> None:
        """AdamW on parameter j alone (the streamed step).

        torch's AdamW updates every parameter that has a gradient, so the other
        parameters' gradients are set aside for the call; the arithmetic per
        parameter is the same as a whole-group step."""
        target = self.opt_params[j]
        aside = [(q, q.grad) for q in self.opt_params if q is not target and q.grad is not None]
        for q, _ in aside:
            q.grad = None
        try:
            self.optimizer.step()
        finally:
            for q, g in aside:
                q.grad = g
