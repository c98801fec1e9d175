"""MGN, probabilities, and the samplers' selection statistics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from grass_cli.recipe import SamplerConfig
from grass_cli.sampling import build_sampler, draw_distinct
from grass_cli.sampling.blocks import ParamGroup
from grass_cli.sampling.importance import ImportanceTracker, probabilities


def make_blocks(sizes: list[int]) -> list[ParamGroup]:
    return [
        ParamGroup(
            name=f"block.{i}",
            kind="block",
            index=i,
            params=[(f"w{i}", torch.nn.Parameter(torch.zeros(n)))],
        )
        for i, n in enumerate(sizes)
    ]


def tracker_with(mgn: list[float], alpha: float = 0.5) -> ImportanceTracker:
    t = ImportanceTracker(make_blocks([1] * len(mgn)), alpha, torch.device("cpu"))
    t.mgn = torch.tensor(mgn, dtype=torch.float64)
    return t


# ----------------------------------------------------------------------------- MGN


def test_mgn_on_hand_computed_gradients():
    blocks = make_blocks([4, 2])
    tracker = ImportanceTracker(blocks, alpha=0.5, device=torch.device("cpu"))
    w0, w1 = blocks[0].tensors[0], blocks[1].tensors[0]
    for p in (w0, w1):
        p.requires_grad_(True)
    # Observation 1: d/dw0 = c0, d/dw1 = c1 (loss linear in w)
    c0 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    c1 = torch.tensor([3.0, 4.0])
    tracker.begin_micro_batch(loss_scale=1.0)
    ((w0 * c0).sum() + (w1 * c1).sum()).backward()
    tracker.end_micro_batch()
    # Observation 2: the loss was scaled by 0.5 (accumulation); the tracker undoes it.
    tracker.begin_micro_batch(loss_scale=0.5)
    (0.5 * ((w0 * 2 * c0).sum() + (w1 * 0).sum())).backward()
    tracker.end_micro_batch()
    mgn = tracker.finish_probe()
    rms0_a = math.sqrt((1 + 4 + 9 + 16) / 4)  # sqrt(||g||^2 / N)
    rms0_b = math.sqrt(4 * (1 + 4 + 9 + 16) / 4)
    rms1_a = math.sqrt((9 + 16) / 2)
    assert mgn[0].item() == pytest.approx((rms0_a + rms0_b) / 2, rel=1e-6)
    # Mean of per-observation RMS, not the RMS of the mean gradient.
    assert mgn[1].item() == pytest.approx((rms1_a + 0.0) / 2, rel=1e-6)


def test_probing_frees_gradients_but_records_norms():
    blocks = make_blocks([3])
    tracker = ImportanceTracker(blocks, alpha=0.5, device=torch.device("cpu"))
    w = blocks[0].tensors[0]
    w.requires_grad_(True)
    tracker.free_grads = True
    tracker.begin_micro_batch(1.0)
    (w * torch.tensor([2.0, 2.0, 2.0])).sum().backward()
    tracker.end_micro_batch()
    assert w.grad is None
    assert tracker.finish_probe()[0].item() == pytest.approx(2.0)


def test_ema_refresh_only_for_trained_blocks():
    t = tracker_with([1.0, 2.0, 3.0], alpha=0.25)
    t._win_sum[:] = torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64)
    t._win_count[:] = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    assert t.refresh() == [0]
    assert t.mgn.tolist() == pytest.approx([0.25 * 2.0 + 0.75 * 1.0, 2.0, 3.0])


# ------------------------------------------------------------------- probabilities


def test_probabilities_are_scale_free_with_floor():
    m = np.array([1e-5, 2e-5, 4e-5])
    p = probabilities(m, tau=1.0, eps=0.0)
    assert p == pytest.approx(probabilities(m * 1e4, tau=1.0, eps=0.0))
    x = m / m.mean()
    expect = np.exp(x) / np.exp(x).sum()
    assert p == pytest.approx(expect)
    p_eps = probabilities(m, tau=1.0, eps=0.3)
    assert p_eps == pytest.approx(0.7 * expect + 0.1)
    assert probabilities(m, tau=1e6, eps=0.0) == pytest.approx([1 / 3] * 3, abs=1e-5)
    assert probabilities(m, tau=1e-3, eps=0.0)[2] == pytest.approx(1.0)
    # Unknown MGN (NaN) falls back to uniform rather than poisoning the softmax.
    assert probabilities([math.nan, 1.0], 1.0, 0.0) == pytest.approx([0.5, 0.5])


# ----------------------------------------------------------------------- samplers


def draws(strategy: str, mgn: list[float], gamma: int, n: int, **kw) -> list[list[int]]:
    cfg = SamplerConfig(
        strategy=strategy, gamma=gamma, switch_interval=1, update_interval=10**9, **kw
    )
    s = build_sampler(cfg, len(mgn), tracker_with(mgn), seed=123)
    return [s.active(step) for step in range(n)]


def test_lisa_is_uniform_without_replacement():
    L, gamma, n = 6, 2, 6000
    sets = draws("lisa", [1.0] * L, gamma, n)
    assert all(len(set(a)) == gamma for a in sets)
    counts = np.bincount(np.concatenate(sets), minlength=L)
    assert counts.sum() == n * gamma
    assert chisquare(counts, [n * gamma / L] * L).pvalue > 0.01


def test_grass_gamma1_follows_softmax_of_mgn():
    mgn = [1.0, 2.0, 3.0, 0.5, 1.5]
    tau, eps, n = 0.7, 0.1, 8000
    sets = draws("grass", mgn, 1, n, tau=tau, eps=eps)
    counts = np.bincount([a[0] for a in sets], minlength=len(mgn))
    p = probabilities(mgn, tau, eps)
    assert chisquare(counts, p * n).pvalue > 0.01
    # ...and is clearly not uniform.
    assert chisquare(counts, [n / len(mgn)] * len(mgn)).pvalue < 1e-6


def inclusion_probabilities(p: np.ndarray, gamma: int) -> np.ndarray:
    """Exact inclusion probability under successive sampling without replacement."""
    incl = np.zeros(len(p))
    for order in itertools.permutations(range(len(p)), gamma):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        for i in order:
            incl[i] += prob
    return incl


def test_grass_gamma2_matches_exact_inclusion_probabilities():
    mgn = [1.0, 2.0, 3.0, 0.5, 1.5]
    tau, eps, n, gamma = 0.5, 0.05, 8000, 2
    sets = draws("grass", mgn, gamma, n, tau=tau, eps=eps)
    assert all(len(set(a)) == gamma for a in sets)
    counts = np.bincount(np.concatenate(sets), minlength=len(mgn))
    expect = inclusion_probabilities(probabilities(mgn, tau, eps), gamma) * n
    assert expect.sum() == pytest.approx(n * gamma)
    assert chisquare(counts, expect).pvalue > 0.01


def test_cyclic_sweeps_in_order():
    cfg = SamplerConfig(strategy="cyclic", gamma=2, switch_interval=3)
    s = build_sampler(cfg, 5, tracker_with([1.0] * 5), seed=0)
    got = [s.active(step) for step in range(12)]
    assert got[0:3] == [[0, 1]] * 3
    assert got[3:6] == [[2, 3]] * 3
    assert got[6:9] == [[0, 4]] * 3  # wraps: 4, 0
    assert got[9:12] == [[1, 2]] * 3


def test_full_is_every_block():
    cfg = SamplerConfig(strategy="full")
    s = build_sampler(cfg, 4, tracker_with([1.0] * 4), seed=0)
    assert [s.active(i) for i in range(3)] == [[0, 1, 2, 3]] * 3
    assert s.next_switch(0) is None


def test_switch_interval_and_seed_reproducibility():
    cfg = SamplerConfig(strategy="lisa", gamma=2, switch_interval=4)
    a = build_sampler(cfg, 8, tracker_with([1.0] * 8), seed=7)
    b = build_sampler(cfg, 8, tracker_with([1.0] * 8), seed=7)
    seq_a = [a.active(i) for i in range(40)]
    assert seq_a == [b.active(i) for i in range(40)]
    for k in range(10):
        assert len({tuple(x) for x in seq_a[4 * k : 4 * k + 4]}) == 1
    assert len({tuple(x) for x in seq_a}) > 3


def test_sampler_state_roundtrip_continues_identically():
    cfg = SamplerConfig(strategy="grass", gamma=2, switch_interval=1)
    a = build_sampler(cfg, 6, tracker_with([1, 2, 3, 4, 5, 6.0]), seed=3)
    for i in range(5):
        a.active(i)
    state = a.state_dict()
    b = build_sampler(cfg, 6, tracker_with([1, 2, 3, 4, 5, 6.0]), seed=999)
    b.load_state_dict(state)
    assert [a.active(i) for i in range(5, 20)] == [b.active(i) for i in range(5, 20)]


def test_static_grass_keeps_probe_mgn_while_grass_refreshes():
    for strategy, expect_changed in (("grass", True), ("grass-static", False)):
        t = tracker_with([1.0, 1.0])
        cfg = SamplerConfig(strategy=strategy, gamma=1, switch_interval=1, update_interval=2)
        s = build_sampler(cfg, 2, t, seed=0)
        s.active(0)
        t._win_sum[:] = torch.tensor([10.0, 0.0], dtype=torch.float64)
        t._win_count[:] = torch.tensor([1.0, 0.0], dtype=torch.float64)
        s.active(1)
        s.active(2)  # refresh due at step 2
        assert (t.mgn[0].item() != 1.0) is expect_changed


# ---------------------------------------------------- sampling never fails (eps: 0)


def test_grass_plain_softmax_with_small_tau_never_fails():
    # eps 0 (the paper's plain softmax) and a small tau: exp underflows to exactly 0
    # for every block far below the best, and numpy refuses to draw 3 distinct blocks
    # from 1 possible one. This crashed training mid-run.
    mgn, tau, gamma = [1.0, 3.0, 2.0, 1.0, 10.0], 1e-3, 3
    p = probabilities(mgn, tau, 0.0)
    assert np.count_nonzero(p) == 1
    with pytest.raises(ValueError, match="Fewer non-zero entries in p than size"):
        np.random.default_rng(0).choice(len(mgn), size=gamma, replace=False, p=p)
    # The sampler takes the possible block and fills with the highest-MGN others.
    sets = draws("grass", mgn, gamma, 50, tau=tau, eps=0.0)
    assert all(s == [1, 2, 4] for s in sets)
    # Two possible blocks (a tie at the top), gamma 3: both, then the next by MGN.
    sets = draws("grass", [10.0, 10.0, 1.0, 2.0, 1.0], 3, 50, tau=tau, eps=0.0)
    assert all(s == [0, 1, 3] for s in sets)


def test_grass_still_samples_when_enough_blocks_are_possible_with_eps0():
    # 3 of 5 blocks possible, gamma 2: a real draw among them, never the others.
    mgn = [10.0, 10.0, 9.99, 1.0, 1.0]
    p = probabilities(mgn, 1e-3, 0.0)
    assert np.count_nonzero(p) == 3
    sets = draws("grass", mgn, 2, 300, tau=1e-3, eps=0.0)
    assert {tuple(s) for s in sets} <= {(0, 1), (0, 2), (1, 2)}
    assert len({tuple(s) for s in sets}) > 1


def test_grass_tau_so_small_that_the_softmax_overflows_never_fails():
    # tau 1e-310 is valid (> 0) but overflows m / tau to inf, and inf - inf is NaN:
    # numpy refuses NaN probabilities whatever eps is. The NaN entries count as
    # impossible and the set is filled by MGN, highest first.
    mgn, tau = [1.0, 3.0, 2.0, 0.5], 1e-310
    assert draws("grass", mgn, 2, 5, tau=tau, eps=0.0) == [[1, 2]] * 5
    assert all(len(set(a)) == 2 for a in draws("grass", mgn, 2, 5, tau=tau, eps=0.1))
    nan = math.nan
    with pytest.raises(ValueError, match="contain NaN"):
        np.random.default_rng(0).choice(4, size=2, replace=False, p=[nan, 0.5, nan, 0.5])
    rng = np.random.default_rng(0)
    assert draw_distinct(rng, np.array([nan] * 4), 2, [1, 2, 0, 3]) == [1, 2]
    assert sorted(draw_distinct(rng, np.array([nan, 0.5, nan, 0.5]), 2, [0, 2])) == [1, 3]


def test_negative_seed_is_folded_and_other_seeds_are_unchanged():
    # The engine seeds the sampler with training.seed + 1, and torch takes negative
    # seeds; PCG64 does not ("expected non-negative integer").
    with pytest.raises(ValueError):
        np.random.PCG64(-5)
    cfg = SamplerConfig(strategy="lisa", gamma=2, switch_interval=1)
    s = build_sampler(cfg, 6, tracker_with([1.0] * 6), seed=-5)
    assert all(len(set(s.active(i))) == 2 for i in range(5))
    same = build_sampler(cfg, 6, tracker_with([1.0] * 6), seed=7)
    rng = np.random.Generator(np.random.PCG64(7))
    expect = [sorted(int(i) for i in rng.choice(6, size=2, replace=False)) for _ in range(5)]
    assert [same.active(i) for i in range(5)] == expect


# ------------------------------------------------------------------- lr correction


def test_inverse_probability_scales():
    from grass_cli.sampling.samplers import inverse_probability_scales

    assert np.allclose(inverse_probability_scales(np.full(6, 1 / 6), 2, 4.0), 1.0, atol=0.03)
    p = np.array([0.5, 0.3, 0.1, 0.06, 0.03, 0.01, 0.0])
    s = inverse_probability_scales(p, 2, 4.0)
    assert s[0] < s[1] < 1.0 < s[2] < s[3] < s[4] <= 4.0  # rarer: larger steps
    assert s[5] == 4.0 and s[6] == 4.0  # clipped (p = 0: drawn only to fill the set)
    assert s[0] >= 0.25
    assert np.array_equal(s, inverse_probability_scales(p, 2, 4.0))  # the same every call
    # gamma 1: pi_b = p_b, so E[scale of b] = p_b * s_b = 1 / L for every block
    p1 = np.array([0.4, 0.3, 0.2, 0.1])
    assert np.allclose(p1 * inverse_probability_scales(p1, 1, 10.0), 0.25, rtol=0.03)


def test_lr_correction_evens_out_expected_steps_without_replacement():
    """gamma 2 of 5: against the exact inclusion probabilities of drawing without
    replacement (enumerated), each block's expected lr multiplier per step is a
    uniform draw's, gamma / L, within the estimate's error."""
    from grass_cli.sampling.samplers import inclusion_probabilities as estimated
    from grass_cli.sampling.samplers import inverse_probability_scales

    p = probabilities([1.0, 2.0, 3.0, 0.5, 1.5], 0.5, 0.05)
    exact = inclusion_probabilities(p, 2)
    assert np.allclose(estimated(p, 2), exact, atol=0.012)
    expected = exact * inverse_probability_scales(p, 2, 100.0)
    assert np.allclose(expected, 2 / 5, rtol=0.04)
    assert np.ptp(exact) > 0.5  # without the correction: far from even


def test_grass_sampler_records_the_drawn_blocks_scales():
    cfg = SamplerConfig(
        strategy="grass", gamma=2, switch_interval=1, tau=0.5, lr_correction="inverse_probability"
    )
    s = build_sampler(cfg, 5, tracker_with([1.0, 2.0, 3.0, 0.5, 1.5]), seed=0)
    for step in range(6):
        active = s.active(step)
        assert sorted(s.lr_scales) == active
    assert len({round(v, 6) for v in s.lr_scales.values()}) >= 1
    state = s.state_dict()
    b = build_sampler(cfg, 5, tracker_with([1.0, 2.0, 3.0, 0.5, 1.5]), seed=1)
    b.load_state_dict(state)
    assert b.lr_scales == s.lr_scales
    lisa = build_sampler(SamplerConfig(strategy="lisa", gamma=2), 5, tracker_with([1.0] * 5), 0)
    lisa.active(0)
    assert lisa.lr_scales == {}
    plain = build_sampler(SamplerConfig(strategy="grass", gamma=2), 5, tracker_with([1.0] * 5), 0)
    plain.active(0)
    assert plain.lr_scales == {}


# ----------------------------------------------------------------- balanced draws


def test_draw_balanced_follows_pi_without_luck():
    """Over many calls each index is taken within 1 of its expected count, at
    every prefix, where random draws of the same pi stray by several."""
    from grass_cli.sampling.samplers import draw_balanced

    p = probabilities([1.0, 2.0, 3.0, 0.5, 1.5, 0.2, 2.5, 1.0], 0.5, 0.05)
    exact = inclusion_probabilities(p, 3)
    rng, credit = np.random.default_rng(0), np.zeros(p.size)
    counts = np.zeros(p.size)
    worst = 0.0
    for n in range(1, 2001):
        chosen = draw_balanced(rng, credit, exact, 3)
        assert len(set(chosen)) == 3
        counts[chosen] += 1
        worst = max(worst, float(np.abs(counts - n * exact).max()))
    assert worst < 1.0
    assert np.abs(credit).max() < 1.0 and credit.sum() == pytest.approx(0.0, abs=1e-9)
    # random draws of the same 2000 sets: off by tens
    rand = draws("grass", [1.0, 2.0, 3.0, 0.5, 1.5, 0.2, 2.5, 1.0], 3, 2000, tau=0.5, eps=0.05)
    off = np.abs(np.bincount(np.concatenate(rand), minlength=p.size) - 2000 * exact)
    assert off.max() > 10


def test_balanced_lisa_trains_every_block_equally_often():
    """LISA's 15 switches of 4 blocks of 30: balanced draws train each block exactly
    twice (random draws: 0 to 5 times); the seed still changes the order."""

    def counts(seed: int, draw: str) -> tuple[np.ndarray, list[list[int]]]:
        cfg = SamplerConfig(strategy="lisa", gamma=4, switch_interval=1, draw=draw)
        s = build_sampler(cfg, 30, tracker_with([1.0] * 30), seed=seed)
        sets = [s.active(step) for step in range(15)]
        assert all(len(set(a)) == 4 for a in sets)
        return np.bincount(np.concatenate(sets), minlength=30), sets

    a, sets_a = counts(0, "balanced")
    b, sets_b = counts(1, "balanced")
    assert a.tolist() == [2] * 30 and b.tolist() == [2] * 30
    assert sets_a != sets_b
    rand, _ = counts(0, "random")
    assert rand.sum() == 60 and rand.min() < 2 < rand.max()


def test_balanced_grass_tracks_inclusion_probabilities_and_resumes():
    mgn = [1.0, 2.0, 3.0, 0.5, 1.5]
    cfg = SamplerConfig(strategy="grass", gamma=2, switch_interval=1, tau=0.5, eps=0.05,
                        draw="balanced")  # fmt: skip
    s = build_sampler(cfg, 5, tracker_with(mgn), seed=4)
    sets = [s.active(step) for step in range(300)]
    counts = np.bincount(np.concatenate(sets), minlength=5)
    exact = inclusion_probabilities(probabilities(mgn, 0.5, 0.05), 2)
    # the Gumbel estimate of pi has error ~0.0035 per draw: within 300 x 0.012 + 1
    assert np.abs(counts - 300 * exact).max() < 300 * 0.012 + 1
    state = s.state_dict()
    assert len(state["credit"]) == 5
    b = build_sampler(cfg, 5, tracker_with(mgn), seed=99)
    b.load_state_dict(state)
    assert [s.active(i) for i in range(300, 340)] == [b.active(i) for i in range(300, 340)]


def test_balanced_grass_with_an_overflowing_softmax_takes_the_greedy_set():
    mgn, tau = [1.0, 3.0, 2.0, 0.5], 1e-310
    assert draws("grass", mgn, 2, 4, tau=tau, eps=0.0, draw="balanced") == [[1, 2]] * 4


def test_one_ranking_of_importance_everywhere():
    """Most important first, never-observed (None, NaN) last, ties by block index: the
    sampler's fallback, probing's `ranking` event and inspect-importance share it."""
    import math

    from grass_cli.importance_report import ranks
    from grass_cli.sampling.importance import ranking

    values = [0.2, math.nan, 0.5, None, 0.2, float("inf")]
    assert ranking(values) == [2, 0, 4, 1, 3, 5]
    assert ranks(values) == ([2, 4, 1, 5, 3, 6], [2, 0, 4, 1, 3, 5])
