"""Samplers: which blocks train at each optimizer step.

One narrow interface, `Sampler.active(step) -> list[int]`, so every strategy runs
on the same training loop. A sampler re-samples every `switch_interval` steps
and returns the cached set in between; its RNG is a seeded NumPy generator whose
state goes into checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from grass_cli.recipe import SamplerConfig
from grass_cli.sampling.importance import ImportanceTracker, probabilities, ranking


def draw_distinct(
    rng: np.random.Generator, p: np.ndarray, size: int, fallback: Sequence[int]
) -> list[int]:
    """`size` distinct indices drawn from `p` without replacement; never fails.

    numpy refuses ("Fewer non-zero entries in p than size") when fewer than `size`
    entries of `p` are non-zero, which a plain softmax (sampler.eps: 0) with a small
    tau produces: exp underflows to exactly 0 for every block far below the best.
    Then each index that can be drawn is taken and the set is filled from
    `fallback` in order (for GRASS: by MGN, highest first, which is what sampling
    from softmax(m / tau) tends to as tau -> 0). Non-finite or negative entries
    count as 0. A `p` numpy accepts is passed on unchanged, so seeded runs draw
    exactly what they always drew.
    """
    p = _finite(p)
    possible = np.flatnonzero(p)
    if possible.size >= size:
        return [int(i) for i in rng.choice(p.size, size=size, replace=False, p=p)]
    return _possible_then_fallback(p, size, fallback)


def _finite(p: np.ndarray) -> np.ndarray:
    """`p` with non-finite or negative entries as 0, renormalised if any were."""
    p = np.asarray(p, dtype=np.float64)
    bad = ~np.isfinite(p) | (p < 0)
    if bad.any():
        p = np.where(bad, 0.0, p)
        total = p.sum()
        if total > 0:
            p = p / total
    return p


def _possible_then_fallback(p: np.ndarray, size: int, fallback: Sequence[int]) -> list[int]:
    chosen = [int(i) for i in np.flatnonzero(p)]
    return chosen + [int(i) for i in fallback if p[i] == 0][: size - len(chosen)]


def draw_inclusion(p: np.ndarray, size: int, fallback: Sequence[int]) -> np.ndarray:
    """Each index's probability of being among `size` that `draw_distinct` draws:
    `inclusion_probabilities`, or 1 for the indices it takes when fewer than `size`
    entries of `p` can be drawn (and 0 for the rest)."""
    p = _finite(p)
    if np.count_nonzero(p) >= size:
        return inclusion_probabilities(p, size)
    pi = np.zeros(p.size)
    pi[_possible_then_fallback(p, size, fallback)] = 1.0
    return pi


def inclusion_probabilities(p: np.ndarray, gamma: int, draws: int = 20_000) -> np.ndarray:
    """Each block's probability of being among `gamma` drawn without replacement
    with probabilities `p` (successive sampling, as `draw_distinct` draws).

    It has no closed form; this estimates it from `draws` Gumbel-top-k draws, which
    follow the same distribution (the top gamma of log p + Gumbel noise), with a
    generator of its own and a fixed seed, so the estimate is the same on every
    call (a resumed run gets the same scales) and the sampler's draws are untouched.
    Standard error at most 0.5 / sqrt(draws), 0.0035 by default.
    """
    L = len(p)
    if gamma >= L:
        return np.ones(L)
    rng = np.random.Generator(np.random.PCG64(0))
    with np.errstate(divide="ignore"):
        keys = np.log(np.clip(p, 0.0, None))[None, :] + rng.gumbel(size=(draws, L))
    top = np.argpartition(-keys, gamma - 1, axis=1)[:, :gamma]
    return np.bincount(top.ravel(), minlength=L) / draws


def inverse_probability_scales(p: np.ndarray, gamma: int, clip: float) -> np.ndarray:
    """Each block's lr multiplier under `sampler.lr_correction: inverse_probability`.

    A block drawn with inclusion probability pi_b and updated with lr x (gamma / L)
    / pi_b moves, in expectation over the draws, as far per step as under a uniform
    draw (pi = gamma / L): the Horvitz-Thompson correction of importance-sampled
    SGD. GRASS keeps visiting the important blocks more often, and the rarely drawn
    ones no longer fall behind in how far they have moved. The clip keeps a block
    drawn almost never (or only to fill the set: p = 0) from taking a step many
    times the lr.
    """
    pi = inclusion_probabilities(np.asarray(p, dtype=np.float64), gamma)
    with np.errstate(divide="ignore"):
        scales = (gamma / len(p)) / pi
    return np.clip(scales, 1.0 / clip, clip)


def draw_balanced(
    rng: np.random.Generator, credit: np.ndarray, pi: np.ndarray, size: int
) -> list[int]:
    """`size` distinct indices whose counts over many calls follow `pi`, with no luck.

    Each call adds each index's inclusion probability `pi` (summing to `size`, each
    at most 1) to its running `credit` (changed in place) and takes the `size`
    indices with the most credit, which then pay 1 each. After n calls index b has
    been taken within about one of sum(pi_b) times (its credit), where
    random draws stray by about sqrt(n pi_b (1 - pi_b)): with GRASS's 15 switches,
    a block drawn with probability 0.3 is trained 4.5 +- 1.8 times at random and 4 or
    5 times balanced. Ties (the first call, equal pi) are broken by `rng`, so seeds
    still differ.
    """
    credit += pi
    order = rng.permutation(credit.size)
    # rounded so that credits equal but for float error count as ties
    chosen = order[np.argsort(-np.round(credit[order], 9), kind="stable")[:size]]
    credit[chosen] -= 1.0
    return [int(i) for i in chosen]


class Sampler(ABC):
    """Base: holds the current active set and refreshes importance every T_u steps.

    Importance is refreshed for every strategy, but only `grass` samples from it
    (`grass-static` keeps its probing values); the others observe gradients only
    with `output.importance: always`, so by default their refresh finds nothing.
    """

    adaptive = True  # refresh MGN every update_interval steps
    name = "base"

    def __init__(self, cfg: SamplerConfig, num_blocks: int, tracker: ImportanceTracker, seed: int):
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.tracker = tracker
        # PCG64 takes no negative seed; training.seed may be one (torch takes it),
        # so fold it into 64 bits like the data order does.
        self.rng = np.random.Generator(np.random.PCG64(seed % 2**64))
        self.current: list[int] = []
        self.last_switch = -1
        # lr multiplier of each drawn block (sampler.lr_correction); empty: all 1
        self.lr_scales: dict[int, float] = {}
        # each block's credit under sampler.draw: balanced (draw_balanced)
        self.credit = np.zeros(num_blocks)

    def switch_due(self, step: int) -> bool:
        return not self.current or step % self.cfg.switch_interval == 0

    def active(self, step: int) -> list[int]:
        if self.adaptive and step > 0 and step % self.cfg.update_interval == 0:
            self.tracker.refresh()
        if self.switch_due(step) and step != self.last_switch:
            self.current = sorted(int(i) for i in self._sample(step))
            self.last_switch = step
        return list(self.current)

    def next_switch(self, step: int) -> int | None:
        """The next step at which the active set may change (None: never)."""
        t = self.cfg.switch_interval
        return (step // t + 1) * t

    def probabilities(self) -> list[float]:
        """Per-draw selection probability of each block (sums to 1; for telemetry)."""
        return [1.0 / self.num_blocks] * self.num_blocks

    def upcoming(self, switch_step: int) -> list[int]:
        """The blocks the draw at `switch_step` will give if importance does not change
        before it: the same RNG stream, peeked without consuming it. Exact for lisa,
        cyclic and grass-static; for grass a prediction (its MGN refresh can move the
        draw), which the two-tier store only uses to read state from disk early."""
        saved = (self.rng.bit_generator.state, self.credit.copy(), dict(self.lr_scales))
        try:
            return sorted(int(i) for i in self._sample(switch_step))
        finally:
            self.rng.bit_generator.state = saved[0]
            self.credit, self.lr_scales = saved[1], saved[2]

    @abstractmethod
    def _sample(self, step: int) -> list[int]:
        """Draw a new active set (called only when a switch is due)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "current": self.current,
            "last_switch": self.last_switch,
            "lr_scales": [[i, v] for i, v in sorted(self.lr_scales.items())],
            "credit": self.credit.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.current = list(state["current"])
        self.last_switch = int(state["last_switch"])
        # (checkpoints from before lr_correction have none: every scale was 1)
        self.lr_scales = {int(i): float(v) for i, v in state.get("lr_scales", [])}
        # (and from before sampler.draw: no credit, which only balanced draws read)
        self.credit = np.array(state.get("credit", [0.0] * self.num_blocks), dtype=np.float64)


class FullSampler(Sampler):
    """Full fine-tuning: every block, always."""

    name = "full"

    def switch_due(self, step: int) -> bool:
        return not self.current

    def next_switch(self, step: int) -> int | None:
        return None

    def _sample(self, step: int) -> list[int]:
        return list(range(self.num_blocks))


class LisaSampler(Sampler):
    """LISA: gamma blocks drawn uniformly without replacement every T_s steps."""

    name = "lisa"

    def _sample(self, step: int) -> list[int]:
        if self.cfg.draw == "balanced":
            pi = np.full(self.num_blocks, min(1.0, self.cfg.gamma / self.num_blocks))
            return draw_balanced(self.rng, self.credit, pi, self.cfg.gamma)
        return list(self.rng.choice(self.num_blocks, size=self.cfg.gamma, replace=False))


class GrassSampler(Sampler):
    """GRASS: gamma blocks drawn without replacement from softmax(MGN / mean / tau)."""

    name = "grass"

    def probabilities(self) -> list[float]:
        # A tau small enough to overflow the softmax gives NaN, which _sample
        # handles; numpy's RuntimeWarning would only print.
        with np.errstate(over="ignore", invalid="ignore"):
            p = probabilities(self.tracker.mgn.numpy(), self.cfg.tau, self.cfg.eps)
        return p.tolist()

    def _sample(self, step: int) -> list[int]:
        p = np.asarray(self.probabilities())
        # Highest MGN first (never-observed NaN last): the tau -> 0 limit of sampling.
        by_mgn = np.array(ranking(self.tracker.mgn.tolist()))
        gamma = self.cfg.gamma
        if self.cfg.draw == "balanced":
            pi = draw_inclusion(p, gamma, by_mgn)
            drawn = draw_balanced(self.rng, self.credit, pi, gamma)
        else:
            drawn = draw_distinct(self.rng, p, gamma, by_mgn)
        if self.cfg.lr_correction == "inverse_probability":
            scales = inverse_probability_scales(p, gamma, self.cfg.lr_correction_clip)
            self.lr_scales = {int(i): float(scales[i]) for i in drawn}
        return drawn


class StaticGrassSampler(GrassSampler):
    """GRASS with the probing MGN kept for the whole run."""

    name = "grass-static"
    adaptive = False


class CyclicSampler(Sampler):
    """BAdam-style ordered sweep: blocks 0..gamma-1, then gamma..2gamma-1, wrapping."""

    name = "cyclic"

    def _sample(self, step: int) -> list[int]:
        k = step // self.cfg.switch_interval
        start = k * self.cfg.gamma
        return [(start + j) % self.num_blocks for j in range(self.cfg.gamma)]


SAMPLERS: dict[str, type[Sampler]] = {
    "full": FullSampler,
    "lisa": LisaSampler,
    "grass": GrassSampler,
    "grass-static": StaticGrassSampler,
    "cyclic": CyclicSampler,
    # LoRA trains every block's adapters at every step: the full sampler, no probing.
    "lora": FullSampler,
}


def build_sampler(
    cfg: SamplerConfig, num_blocks: int, tracker: ImportanceTracker, seed: int
) -> Sampler:
    return SAMPLERS[cfg.strategy](cfg, num_blocks, tracker, seed)
