"""Mean Gradient Norm (MGN) per block: probing, observation, EMA refresh.

`m_l = mean_t sqrt(||g_t^l||^2 / N_l)`: the per-observation RMS of block l's
gradient, averaged over observations (GRASS_SPEC.md, step 2). Gradients are read
in tensor hooks as they arrive in backward, so no extra pass and no `.item()`
sync: the squared norms accumulate in a device tensor.

[ours] One observation is one micro-batch: the gradient of that micro-batch's
mean token loss (the hook undoes the loss scaling used for accumulation). With
`grad_accum_steps: 1` this is exactly the paper's per-step MGN; with accumulation
it lets probing free each gradient right away instead of holding the full
model's gradients until the step ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from grass_cli.sampling.blocks import ParamGroup


def ranking(values: Sequence[float | None]) -> list[int]:
    """Block indices, most important first: the one ordering of MGN values that the
    sampler's fallback, probing's `ranking` event and `grass inspect-importance`
    share. Never-observed blocks (None, NaN) come last; ties keep block order."""
    key = [-float(v) if v is not None and math.isfinite(v) else math.inf for v in values]
    return sorted(range(len(key)), key=lambda i: (key[i], i))


def probabilities(mgn: Sequence[float] | np.ndarray, tau: float, eps: float) -> np.ndarray:
    """Scale-free softmax of MGN with an exploration floor.

    MGN values are tiny and model-dependent, so they are divided by their mean
    before the temperature: tau means the same for every model. Then
    `p <- (1 - eps) p + eps / L` keeps every block reachable.
    """
    m = np.asarray(mgn, dtype=np.float64)
    if m.size == 0:
        return m
    if not np.all(np.isfinite(m)) or m.mean() <= 0:
        return np.full(m.size, 1.0 / m.size)
    x = (m / m.mean()) / tau
    x = x - x.max()
    p = np.exp(x)
    p = p / p.sum()
    p = (1.0 - eps) * p + eps / m.size
    return p / p.sum()


class ImportanceTracker:
    """Observes block gradients in backward and keeps each block's MGN."""

    def __init__(self, blocks: list[ParamGroup], alpha: float, device: torch.device):
        self.blocks = blocks
        self.alpha = alpha
        self.device = device
        self.numel = torch.tensor([g.numel for g in blocks], dtype=torch.float64)
        n = len(blocks)
        # The sampling statistic. NaN = never observed (non-probing strategies).
        self.mgn = torch.full((n,), math.nan, dtype=torch.float64)
        self._micro_sq = torch.zeros(n, dtype=torch.float32, device=device)
        self._win_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self._win_count = torch.zeros(n, dtype=torch.float64)
        self._touched: set[int] = set()
        self._scale = 1.0  # undoes the loss scaling of the current micro-batch
        # While probing, gradients are freed as soon as they are accumulated, so
        # probing never holds the whole model's gradients.
        self.free_grads = False
        # Data-parallel runs observe the gradients summed across ranks (`observe`,
        # called by the GradReducer), not each rank's local part in the hooks.
        self.local_hooks = True
        # Sharded runs observe each rank's shard of the reduced gradients as FSDP2
        # hands it over (it runs a parameter's post-accumulate-grad hooks when it
        # assigns the shard), and `reduce` sums the squared norms over the ranks
        # holding the other shards (sharding.sum_over) before they become an
        # observation.
        self.observe_shards = False
        self.reduce: Callable[[torch.Tensor], None] | None = None
        # Off where nothing reads the MGN (output.importance: auto and a sampler
        # other than grass, after probing): the hooks then return at once instead
        # of reading every gradient a second time.
        self.observing = True
        self._block_of: dict[int, int] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for i, group in enumerate(blocks):
            for _, p in group.params:
                self._block_of[id(p)] = i
                self._handles.append(p.register_hook(self._make_hook(i)))
                self._handles.append(p.register_post_accumulate_grad_hook(self._free))

    def _make_hook(self, index: int):
        def hook(grad: torch.Tensor) -> None:
            if self.local_hooks and self.observing:
                self._micro_sq[index] += grad.detach().float().pow(2).sum().to(self.device)
                self._touched.add(index)

        return hook

    def observe(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Add a (reduced) gradient of one parameter to the current observation."""
        index = self._block_of.get(id(p))
        if index is not None and self.observing:
            self._micro_sq[index] += grad.detach().float().pow(2).sum().to(self.device)
            self._touched.add(index)

    def _free(self, p: torch.Tensor) -> None:
        if self.observe_shards and p.grad is not None:
            self.observe(p, p.grad._local_tensor)  # (a DTensor: this rank's shard)
        if self.free_grads:
            p.grad = None

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ observing

    def begin_micro_batch(self, loss_scale: float) -> None:
        """`loss_scale` is what the micro-batch's mean loss was multiplied by."""
        self._scale = 1.0 / loss_scale

    def end_micro_batch(self) -> None:
        """Turn this micro-batch's squared norms into one RMS observation per block."""
        if not self._touched:
            return
        if self.reduce is not None:  # (every rank observed the same blocks' shards)
            self.reduce(self._micro_sq)
        # (indices built on the host and copied over: reading them back from the
        # device would wait for the whole backward on a GPU)
        host_idx = torch.tensor(sorted(self._touched))
        idx = host_idx.to(self.device, non_blocking=True)
        sq = self._micro_sq.index_select(0, idx).double() * (self._scale**2)
        rms = torch.sqrt(sq / self.numel.to(self.device).index_select(0, idx))
        self._win_sum.index_add_(0, idx, rms)
        self._win_count[host_idx] += 1
        self._micro_sq.zero_()
        self._touched.clear()

    def window_mean(self) -> torch.Tensor:
        """MGN of the current window (NaN where a block had no observation)."""
        s = self._win_sum.cpu()
        out = torch.full_like(s, math.nan)
        seen = self._win_count > 0
        out[seen] = s[seen] / self._win_count[seen]
        return out

    def _reset_window(self) -> None:
        self._win_sum.zero_()
        self._win_count.zero_()

    # ------------------------------------------------------------------- updating

    def finish_probe(self) -> torch.Tensor:
        """End of probing: every block's MGN is its probing mean."""
        mean = self.window_mean()
        self.mgn = torch.where(torch.isnan(mean), self.mgn, mean)
        self._reset_window()
        return self.mgn.clone()

    def refresh(self) -> list[int]:
        """EMA update for blocks trained in the window; others keep their value."""
        mean = self.window_mean()
        updated: list[int] = []
        for i in range(len(self.blocks)):
            new = float(mean[i])
            if math.isnan(new):
                continue
            old = float(self.mgn[i])
            self.mgn[i] = new if math.isnan(old) else self.alpha * new + (1 - self.alpha) * old
            updated.append(i)
        self._reset_window()
        return updated

    def values(self) -> list[float | None]:
        return [None if math.isnan(v) else float(v) for v in self.mgn.tolist()]

    # --------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        return {
            "mgn": self.mgn.clone(),
            "win_sum": self._win_sum.cpu().clone(),
            "win_count": self._win_count.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.mgn = state["mgn"].clone().double()
        self._win_sum.copy_(state["win_sum"].to(self.device))
        self._win_count = state["win_count"].clone().double()
