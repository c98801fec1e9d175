"""Compact AdamW moments (optimizer.state_dtype: bf16 | 8bit): the bytes they take,
measured against the planner; checkpoints that carry them as they are; a resume
that is bit-identical; the two-tier store moving them exactly; updates close to
fp32's; and one clear message when bitsandbytes is missing."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_checkpoint import make_recipe, run_interrupted, run_straight

from grass_cli.errors import GrassError
from grass_cli.offload.compact import MOMENT_BYTES, BF16MomentsAdamW
from grass_cli.recipe import OptimizerConfig

OFFLOAD = {"state_policy": "offload", "offload": {"target": "cpu", "host_budget": None}}
MOMENT_KEYS = {
    "bf16": {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16},
    "8bit": {"state1": torch.uint8, "state2": torch.uint8},
}


def moment_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(bytes of every state tensor, parameters with state) of one optimizer."""
    total = params = 0
    for p, st in opt.state.items():
        params += p.numel()
        total += sum(v.numel() * v.element_size() for v in st.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0)  # fmt: skip
    return total, params


@pytest.mark.parametrize("dtype", ["bf16", "8bit"])
def test_moments_take_the_bytes_the_planner_counts(dtype):
    """A 4096 x 1024 matrix: bf16 moments are 4 bytes a parameter, 8-bit ones 2 plus
    an fp32 scale per 256 values (MOMENT_BYTES, which the planner uses), exactly."""
    from grass_cli.offload.adamw import adamw

    p = torch.nn.Parameter(torch.randn(4096, 1024) * 0.02)
    opt = adamw([{"params": [p], "weight_decay": 0.0}], OptimizerConfig(state_dtype=dtype))
    p.grad = torch.randn_like(p)
    opt.step()
    for key, want in MOMENT_KEYS[dtype].items():
        assert opt.state[p][key].dtype == want
    total, n = moment_bytes(opt)
    extra = 2 * 256 * 4 if dtype == "8bit" else 0  # bitsandbytes' two 256-entry code maps
    assert total - extra == n * MOMENT_BYTES[dtype]


def test_bf16_moments_follow_fp32_adamw_closely():
    """The same 50 steps with fp32 and with bf16 moments: the weights move the same
    way to within 1% of the update (the moments' rounding, not a different rule),
    and they are not identical (the moments really are bf16)."""
    torch.manual_seed(0)
    start = torch.randn(512, 256) * 0.02
    grads = [torch.randn(512, 256) * 1e-2 for _ in range(50)]
    out = {}
    for name, cls in {"fp32": torch.optim.AdamW, "bf16": BF16MomentsAdamW}.items():
        p = torch.nn.Parameter(start.clone())
        opt = cls([p], lr=1e-3, weight_decay=0.01)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out[name] = p.detach()
    moved = (out["fp32"] - start).norm()
    gap = (out["bf16"] - out["fp32"]).norm()
    assert 0 < gap < 0.01 * moved, (gap, moved)


@pytest.mark.parametrize("dtype", ["bf16", "8bit"])
def test_compact_states_round_trip_through_a_checkpoint(dtype, tiny_factory, tmp_path):
    """A GRASS run with offloaded compact moments, interrupted after step 3 and
    resumed, ends bit-identical to one never interrupted; the checkpoint's
    safetensors hold the moments as they were (bf16 / uint8 tensors), not fp32."""
    from safetensors.torch import load_file

    model_dir = tiny_factory("gpt2", 4)
    opt = {**OFFLOAD, "state_dtype": dtype}
    a, ra = run_straight(make_recipe(model_dir, tmp_path / "a", "grass", opt))
    b, rb = run_interrupted(make_recipe(model_dir, tmp_path / "b", "grass", opt), k=3)
    assert rb.losses == ra.losses and len(ra.losses) == 7
    pa = dict(a.model.named_parameters())
    for name, p in b.model.named_parameters():
        assert torch.equal(p, pa[name]), name
    ckpt = tmp_path / "b/checkpoints/step-0000003"
    files = sorted(ckpt.rglob("*.safetensors"))
    dtypes = {t.dtype for f in files for t in load_file(f).values()}
    want = set(MOMENT_KEYS[dtype].values())
    assert want <= dtypes, dtypes
    # and each state tensor came back with the dtype it was saved in (bitsandbytes
    # keeps fp32 moments for tensors under 4096 values)
    checked = 0
    for st in b.optimizer.states.values():
        for p, state in st.optimizer.state.items():
            for key, dt in MOMENT_KEYS[dtype].items():
                t = state.get(key)
                if t is None or t.numel() == 0 or (dtype == "8bit" and p.numel() < 4096):
                    continue
                assert t.dtype == dt, (key, t.dtype)
                checked += 1
    assert checked > 0


def test_the_two_tier_store_moves_8bit_states_exactly(tiny_factory, tmp_path):
    """8-bit moments through a pinned budget of about one block (chunks go to disk
    and back): the run is bit-identical to the all-pinned one, and its store holds
    little more than half the fp32 store's bytes (the tiny GPT-2's MLP matrices have
    8-bit moments; its smaller tensors keep fp32 ones, as bitsandbytes does below
    4096 values)."""
    from grass_cli.engine import setup, train
    from grass_cli.telemetry import Telemetry

    model_dir = tiny_factory("gpt2", 4)

    def go(out: str, state_dtype: str, budget: float | None):
        opt = {
            "state_policy": "offload",
            "offload": {"target": "cpu", "host_budget": budget},
            "state_dtype": state_dtype,
        }
        rec = make_recipe(model_dir, tmp_path / out, "lisa", opt)
        rec.training.max_steps = 12
        r = setup(rec, Telemetry([]), overwrite=True)
        result = train(r)
        stored = r.optimizer.store.bytes()
        return r, result, stored

    full, full_res, full_bytes = go("fp32", "fp32", None)
    full.optimizer.store.close()
    pinned, pinned_res, pinned_bytes = go("pinned", "8bit", None)
    pinned.optimizer.store.close()
    block = pinned_bytes / 2  # (2 frozen blocks of 4 hold state at the end)
    tiered, tiered_res, _ = go("tiered", "8bit", 1.2 * block / 1e9)
    store = tiered.optimizer.store
    assert store.evictions > 0 and store.peak_host <= store.budget
    assert tiered_res.losses == pinned_res.losses
    for (name, p), q in zip(
        pinned.model.named_parameters(), tiered.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    assert pinned_bytes < 0.6 * full_bytes
    stored = [store.host_tensors(n) for n in store.names()]
    assert any(t.dtype == torch.uint8 for ts in stored for t in ts)
    store.close()


def test_the_planner_counts_compact_moments(tiny_factory, tmp_path):
    """The planner's store for 8-bit and bf16 moments against fp32: the state part of
    every figure shrinks by MOMENT_BYTES' ratio, for an 8B preset."""
    from grass_cli.planner.memory import plan_recipe

    plans = {}
    for dtype in ("fp32", "bf16", "8bit"):
        rec = make_recipe(tiny_factory("llama", 4), tmp_path / dtype, "grass", {**OFFLOAD})
        d = rec.model_dump(mode="json")
        d["model"]["path"] = "llama-3.1-8b"
        d["model"]["dtype"] = "bfloat16"
        d["optimizer"]["state_dtype"] = dtype
        from grass_cli.recipe import validate_dict

        _, (p,) = plan_recipe(validate_dict(d, "t.yaml"), all_scenarios=False)
        plans[dtype] = p
    assert plans["fp32"].state_bytes_per_param == 12
    assert plans["bf16"].state_bytes_per_param == 8
    assert plans["8bit"].state_bytes_per_param == pytest.approx(6.03125)
    store = {k: p.host_kinds["store_pinned"] for k, p in plans.items()}
    assert store["bf16"] == pytest.approx(store["fp32"] * 8 / 12, rel=1e-6)
    assert store["8bit"] == pytest.approx(store["fp32"] * 6.03125 / 12, rel=1e-6)


def test_8bit_without_bitsandbytes_is_one_message_before_the_model_loads(
    tiny_factory, tmp_path, monkeypatch
):
    """bitsandbytes not importable (None in sys.modules is how Python marks a module
    that must not import): pre-flight refuses the recipe with what to install."""
    from grass_cli.preflight import check_extras

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    rec = make_recipe(tiny_factory("llama", 4), tmp_path / "r", "grass", {"state_dtype": "8bit"})
    with pytest.raises(GrassError) as exc:
        check_extras(rec)
    assert "needs the bitsandbytes package" in str(exc.value)
    assert "grass-cli[compact]" in exc.value.hint
    json.dumps(rec.model_dump(mode="json"))  # (the recipe itself is valid)


@pytest.mark.parametrize("dtype", ["bf16", "8bit"])
def test_streamed_steps_match_interval_residency(dtype, tiny_factory, tmp_path):
    """Compact moments streamed one weight matrix at a time (residency: step) give
    the same training, bit for bit, as moved once per switch (residency: interval)."""
    model_dir = tiny_factory("gpt2", 4)
    runs = {}
    for residency in ("interval", "step"):
        opt = {
            "state_policy": "offload",
            "offload": {"target": "cpu", "residency": residency, "host_budget": None},
            "state_dtype": dtype,
        }
        r, res = run_straight(make_recipe(model_dir, tmp_path / residency, "grass", opt))
        runs[residency] = (dict(r.model.named_parameters()), res.losses)
    assert runs["step"][1] == runs["interval"][1]
    for name, p in runs["step"][0].items():
        assert torch.equal(p, runs["interval"][0][name]), name


def test_a_resume_refuses_another_state_dtype(tiny_factory, tmp_path):
    """The checkpoint holds the moments in the run's format: resuming with another
    state_dtype is one message before anything trains (changing it needs a new run)."""
    from grass_cli.engine import setup
    from grass_cli.telemetry import Telemetry

    model_dir = tiny_factory("gpt2", 4)
    rec = make_recipe(model_dir, tmp_path / "run", "grass", {**OFFLOAD, "state_dtype": "bf16"})
    rec.training.max_steps = 2
    run_straight(rec)
    other = make_recipe(model_dir, tmp_path / "run", "grass", {**OFFLOAD, "state_dtype": "8bit"})
    with pytest.raises(
        GrassError, match="cannot resume with a recipe that changes optimizer.state_dtype"
    ):
        setup(other, Telemetry([]), resume="auto")
