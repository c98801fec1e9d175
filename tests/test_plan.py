"""`grass plan`: the planner's model of memory, from a config alone, and its command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.planner.memory import Scenario, plan, plan_recipe
from grass_cli.planner.shape import build_layout, load_config
from grass_cli.recipe import validate_dict

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")


def recipe(**over):
    d = {
        "model": {"path": "embedded:smollm2-135m-instruct", "dtype": "bfloat16"},
        "data": {"train": TRAIN, "max_length": 512},
        "sampler": {"strategy": "grass", "gamma": 4},
        "optimizer": {"state_policy": "offload", "offload": {"residency": "step"}},
        "training": {"micro_batch_size": 1, "device": "cuda"},
    }
    for key, value in over.items():
        section, name = key.split("__")
        d.setdefault(section, {})[name] = value
    return validate_dict(d, "test.yaml")


def test_layout_matches_the_loaded_model_group_by_group(tiny_factory):
    """The meta-device layout has exactly the groups and sizes training uses."""
    from grass_cli.models import load_model_and_tokenizer
    from grass_cli.sampling.blocks import build_block_map

    folder = tiny_factory("llama", 4)
    r = recipe(model__path=str(folder), model__dtype="float32")
    config, name = load_config(r)
    lay = build_layout(r, config, name)
    model, _, _ = load_model_and_tokenizer(r.model)
    bm = build_block_map(model)
    assert {g.name: [p.numel() for p in g.tensors] for g in bm.groups()} == {
        n: g.params for n, g in lay.groups.items()
    }
    assert lay.params == sum(p.numel() for p in model.parameters())
    assert lay.weight_bytes == 4


def test_seven_and_eight_billion_fit_the_goals():
    """The lean GPU configuration (bf16, checkpointing, offload streamed per step,
    micro-batch 1 x 512) at the scale users care about: issue goals 19 GB and 22 GB."""
    r = recipe(model__gradient_checkpointing=True)
    for shape, limit in (("llama-2-7b", 19e9), ("llama-3-8b", 22e9)):
        lay, plans = plan_recipe(r, shape, all_scenarios=False)
        (p,) = plans
        assert p.strategy == "grass" and p.residency == "step"
        assert p.device_peak_bytes < limit, (shape, p.device_peak_bytes)
        assert p.kinds["weights"] == lay.params * 2
        # the store holds every block's fp32 master + two moments: 12 bytes a parameter
        block_params = sum(lay.groups[b].numel for b in lay.blocks)
        assert p.host_kinds["store_pinned"] >= 12 * block_params


def test_each_policy_orders_memory_as_the_engine_does():
    r = recipe(model__gradient_checkpointing=True)
    config, name = load_config(r, "llama-2-7b")
    lay = build_layout(r, config, name)
    peak = {
        sc.label: plan(r, lay, sc).device_peak_bytes
        for sc in (
            Scenario("full", "keep"),
            Scenario("grass", "keep"),
            Scenario("grass", "drop"),
            Scenario("grass", "offload", "cpu", "interval"),
            Scenario("grass", "offload", "cpu", "step"),
        )
    }
    assert (
        peak["full"]
        > peak["grass keep"]
        > peak["grass drop"]
        == peak["grass offload/interval"]
        > peak["grass offload/step"]
    )
    # streaming holds two weight matrices' state, not gamma blocks'
    streamed = plan(r, lay, Scenario("grass", "offload", "cpu", "step"))
    largest = sorted((n for g in lay.groups.values() for n in g.params), reverse=True)
    assert streamed.kinds["optimizer_state"] <= 12 * (largest[0] + largest[1])


def test_checkpointing_and_probing_stay_below_full_activations():
    plain = recipe(model__gradient_checkpointing=False, training__micro_batch_size=8)
    ckpt = recipe(model__gradient_checkpointing=True, training__micro_batch_size=8)
    sc = Scenario("grass", "offload", "cpu", "step")
    lay_p = build_layout(plain, *load_config(plain, "llama-2-7b"))
    lay_c = build_layout(ckpt, *load_config(ckpt, "llama-2-7b"))
    a = plan(plain, lay_p, sc)
    b = plan(ckpt, lay_c, sc)
    assert b.kinds["activations"] < a.kinds["activations"] / 4
    full = plan(plain, lay_p, Scenario("full", "keep"))
    # probing runs with checkpointing whatever the recipe says
    assert a.phases["probe"] - a.kinds["weights"] < full.kinds["activations"] / 4


def test_keep_grows_with_the_blocks_visited():
    r = recipe()
    lay = build_layout(r, *load_config(r, "tinyllama-1.1b"))
    sc = Scenario("lisa", "keep")
    few = plan(r, lay, sc, visited=4).kinds["optimizer_state"]
    many = plan(r, lay, sc, visited=10).kinds["optimizer_state"]
    block = lay.groups["block.0"].numel * 12
    assert many - few == 6 * block


def test_plan_command_json_and_verdict():
    runner = CliRunner()
    path = ROOT / "recipes/quickstart.yaml"
    # RAM for the store, and nothing written to this machine's disk
    args = ["output.save_model=false", "checkpoint.at_end=false"]
    args += ["--model-config", "llama-2-7b", "--host-memory", "200"]
    res = runner.invoke(app, ["plan", str(path), "--json", *args])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert {(r["strategy"], r["state_policy"]) for r in rows} >= {
        ("full", "keep"),
        ("lora", "keep"),
        ("lisa", "keep"),
        ("grass", "offload"),
    }
    for r in rows:
        assert r["device_peak_bytes"] > r["kinds"]["weights"] > 0 and r["host_bytes"] >= 0
    # a device too small: exit 1, and the verdict says what dominates and what to change
    res = runner.invoke(
        app,
        ["plan", str(path), *args, "--device-memory", "8"],
    )
    assert res.exit_code == 1
    # a float32 7B: its weights alone (27 GB) exceed 8 GB, and bfloat16 halves them
    assert "the weights alone exceed the device; does NOT fit 8 GB" in res.stdout
    assert "use model.dtype: bfloat16" in res.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-config", "llama-99b"], "unknown model preset 'llama-99b'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_plan_command_user_errors(args, message):
    res = CliRunner().invoke(app, ["plan", str(ROOT / "recipes/quickstart.yaml"), *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_the_loss_in_chunks_bounds_the_logits_term():
    """Llama-3's 128k vocabulary at 4096 tokens: the plain loss would hold 12 bytes
    per token and vocabulary entry (6 GB); the chunked loss holds one chunk, so the
    plan's activations drop by that much, and models with a scaled head keep the
    plain term."""
    from grass_cli.evaluate.loss import head_chunk_rows
    from grass_cli.planner.activations import activations, logits_bytes, logits_peak

    r = recipe(model__gradient_checkpointing=True, data__max_length=4096)
    config, name = load_config(r, "llama-3-8b")
    lay = build_layout(r, config, name)
    assert lay.chunked_head and lay.vocab == 128256
    tokens = 4096
    chunked = logits_bytes(lay, 2, tokens)
    assert chunked == head_chunk_rows(lay.vocab) * lay.vocab * 10 + tokens * lay.hidden * 2
    assert chunked < 0.05 * logits_peak(lay, 2) * tokens
    assert activations(r, lay, 4, True).logits == chunked
    # few tokens: one chunk, the plain path and its term
    assert logits_bytes(lay, 2, 8) == logits_peak(lay, 2) * 8
    plain = type(lay)(**{**lay.__dict__, "chunked_head": False})
    assert logits_bytes(plain, 2, tokens) == logits_peak(lay, 2) * tokens
    p_chunked = plan(r, lay, Scenario("grass", "offload", residency="step"))
    p_plain = plan(r, plain, Scenario("grass", "offload", residency="step"))
    saved = p_plain.device_peak_bytes - p_chunked.device_peak_bytes
    assert saved > 0.5 * logits_peak(lay, 2) * tokens  # (the peak moves to another phase)


def test_scaled_heads_are_not_chunked():
    from transformers import Gemma2Config, LlamaConfig

    from grass_cli.evaluate.loss import head_is_plain

    assert head_is_plain(LlamaConfig())
    assert not head_is_plain(Gemma2Config())  # final_logit_softcapping 30
    assert not head_is_plain(LlamaConfig(logit_scale=0.5))


def test_sharded_plan_is_one_ranks_share_and_the_machine_holds_every_rank():
    """--nproc N with distributed.sharding=fsdp: weights, gradients and state are
    1/N of one process's, plus the gathered root and blocks; the host and disk are
    the machine's (every rank's store); LoRA (replicated only) is left out."""
    path = str(ROOT / "recipes/gpu-grass.yaml")
    base = [path, "--model-config", "llama-3-8b", "--host-memory", "400", "--json"]

    def rows(*extra: str) -> dict[str, dict]:
        res = CliRunner().invoke(app, ["plan", *base, *extra])
        assert res.exit_code in (0, 1), res.output
        return {r["label"]: r for r in json.loads(res.stdout)}

    one, four = rows(), rows("--nproc", "4", "distributed.sharding=fsdp")
    assert "lora" in one and "lora" not in four
    for label, r in four.items():
        assert r["shards"] == 4 and r["processes"] == 4
        o = one[label]
        assert r["kinds"]["weights"] == o["kinds"]["weights"] // 4
        # the step holds shards only: weights, gradients, state and temporaries / 4
        assert r["phases"]["step"] == pytest.approx(o["phases"]["step"] / 4, abs=8)
        assert r["device_peak_bytes"] < o["device_peak_bytes"]
        # 4 ranks' stores on one machine: as much pinned RAM as one process's store
        assert sum(r["host_need"].values()) >= o["host_kinds"].get("store_pinned", 0)
    # replicated: one rank is one process, the machine holds 4 of them
    rep = rows("--nproc", "4")
    for label, r in rep.items():
        assert r["shards"] == 0 and r["device_peak_bytes"] == one[label]["device_peak_bytes"]
        for part, v in one[label]["host_need"].items():
            if part != "runtime":  # (this process's own size, measured: it grows)
                assert r["host_need"][part] == 4 * v, (label, part)


def test_plan_says_what_a_sigterm_writes():
    """The preemption line: a full checkpoint is the weights plus every visited block's
    optimizer state, a light one the weights (quickstart: 135M fp32 weights, GRASS
    keep: Adam's two fp32 moments for the 30 blocks and the trained norms)."""
    from grass_cli.commands.plan import _plan

    path = ROOT / "recipes/quickstart.yaml"
    _, _, own, m = _plan(path, [], None, "cuda", None, None)
    assert m.disk.checkpoint_weights == 134_515_008 * 4
    assert m.disk.checkpoint_state == pytest.approx(0.85e9, rel=0.01)
    res = CliRunner().invoke(app, ["plan", str(path)])
    text = " ".join(res.stdout.split())
    full = (m.disk.checkpoint_weights + m.disk.checkpoint_state) / 1e9
    assert (
        f"a SIGTERM finishes its step, then writes a {full:.2f} GB checkpoint "
        f"({m.disk.checkpoint_weights / 1e9:.2f} GB with checkpoint.on_signal: light)"
    ) in text


def test_a_higher_draw_saves_less_and_the_loss_is_not_counted_beside_the_gathered_root():
    """`lowest` (the validation benchmarks' draw): layers below the lowest trained block
    save nothing. Sharded: the loss runs after every unit resharded, so its buffers
    and FSDP2's gathered weights are never counted together (measured:
    benchmarks/results/plan_sharded.md)."""
    from grass_cli.planner.activations import activations, layer_act
    from grass_cli.planner.memory import _trained, plan, recipe_scenario
    from grass_cli.planner.shape import build_layout, load_config
    from grass_cli.planner.sharded import sharding_extra
    from grass_cli.recipe import load_recipe

    over = ["sampler.strategy=lisa", "optimizer.state_policy=keep", "distributed.sharding=fsdp"]
    r = load_recipe(ROOT / "recipes/quickstart.yaml", over)
    lay = build_layout(r, *load_config(r))
    sc = recipe_scenario(r)
    t = _trained(r, lay, sc)
    tokens = r.training.micro_batch_size * r.data.max_length
    worst, high = (activations(r, lay, t.active_blocks, False, k) for k in (0, 10))
    # 4 trained + 26 frozen layers against 4 trained + 16 frozen
    assert sum(worst.saved) - sum(high.saved) == 10 * layer_act(lay, 4, False) * tokens
    assert sum(high.saved[:10]) == 0
    p0 = plan(r, lay, sc, device="cpu", shards=2)
    assert plan(r, lay, sc, device="cpu", shards=2, lowest=0).phases == p0.phases
    assert plan(r, lay, sc, device="cpu", shards=2, lowest=10).device_peak_bytes < (
        p0.device_peak_bytes
    )
    gathered = sharding_extra(lay, t.groups, t.gbytes, "cpu").head
    base = p0.kinds["weights"] + p0.kinds["optimizer_state"]
    loss_point = base + sum(worst.saved) + worst.logits
    assert loss_point <= p0.phases["backward"] < loss_point + gathered


def test_sharded_units_gather_the_head_apart_from_the_embeddings():
    """sharding.shard_model makes untied embeddings and the head units of their own,
    so at the head's backward a rank gathers the head and the prefetched last block,
    and at a block's that block and the next (Llama-3-8B: the head is 525M
    parameters, a block 218M), never both vocabulary matrices; tied ones stay in the
    root, gathered throughout (SmolLM2). A trained head is its own unit, so its whole
    gradient is the largest one before a reduce-scatter."""
    from grass_cli.planner.sharded import sharding_extra, units
    from grass_cli.recipe import load_recipe

    r = load_recipe(ROOT / "recipes/gpu-grass.yaml", [])
    lay = build_layout(r, *load_config(r, "llama-3-8b"))
    g = lay.groups
    n = {k: v.numel for k, v in g.items()}
    block = g[lay.blocks[0]].numel
    assert units(lay) == {"root": n["norm"], "embed": n["embed"], "head": n["head"]}
    gx = sharding_extra(lay, [g[lay.blocks[3]]], 2, "cuda")
    assert gx.head == 2 * (n["norm"] + n["head"] + block)
    assert gx.blocks == 2 * (n["norm"] + 2 * block)
    assert gx.reduce == block * (2 + 4)  # bf16 gradient + its fp32 reduce-scatter input
    gx = sharding_extra(lay, [g[lay.blocks[3]], g["head"], g["norm"]], 2, "cuda")
    assert gx.reduce == n["head"] * 6
    q = load_recipe(ROOT / "recipes/quickstart.yaml", [])
    tied = build_layout(q, *load_config(q))
    t = tied.groups
    root = t["norm"].numel + t["embed"].numel
    assert units(tied) == {"root": root}
    gx = sharding_extra(tied, [t[tied.blocks[0]]], 4, "cuda")
    assert (gx.head, gx.blocks) == (
        2 * (root + t["block.0"].numel),
        2 * (root + 2 * t["block.0"].numel),
    )


def test_cpu_offload_keeps_the_shards_on_the_host():
    """distributed.cpu_offload: one rank's device holds no weights, gradients or
    optimizer state, only gathered units, a gradient before its reduce-scatter and
    the activations, so Llama-3.1-70B's GRASS fits 24 GB cards on 8 GPUs; the machine's
    host RAM holds every rank's shards (the bf16 weights at least) pinned."""
    path = str(ROOT / "recipes/gpu-grass.yaml")
    common = [path, "--model-config", "llama-3.1-70b", "--host-memory", "4096",
              "--device-memory", "24", "--nproc", "8", "--json",
              "distributed.sharding=fsdp", "training.micro_batch_size=1"]  # fmt: skip

    def rows(*extra: str) -> dict[str, dict]:
        res = CliRunner().invoke(app, ["plan", *common, *extra])
        assert res.exit_code in (0, 1), res.output
        return {r["label"]: r for r in json.loads(res.stdout)}

    on, off = rows("distributed.cpu_offload=true"), rows()
    for label, r in on.items():
        assert r["kinds"]["weights"] == r["kinds"]["gradients"] == 0, label
        assert r["kinds"]["optimizer_state"] == 0 and "step" not in r["phases"], label
        o = off[label]
        assert r["device_peak_bytes"] <= o["device_peak_bytes"] - o["kinds"]["weights"], label
        assert r["host_need"]["pinned shards"] >= 70.5e9 * 2  # every rank's bf16 weights
    grass = on["grass offload/step"]
    assert grass["fits"] and grass["device_peak_bytes"] < 24e9
    assert not off["grass offload/step"]["fits"]
    res = CliRunner().invoke(app, ["plan", *common[:-3], "distributed.sharding=fsdp",
                                   "distributed.cpu_offload=true"])  # fmt: skip
    text = " ".join(res.output.split())
    assert "the shards of weights, gradients and optimizer state in host RAM" in text
    assert "pinned shards" in text and "besides the weights" not in text
    # on the CPU host and device are one memory: the offload moves nothing
    from grass_cli.planner.memory import plan, recipe_scenario
    from grass_cli.recipe import load_recipe

    q = [load_recipe(ROOT / "recipes/quickstart.yaml", ["distributed.sharding=fsdp", *x])
         for x in ([], ["distributed.cpu_offload=true"])]  # fmt: skip
    lay = build_layout(q[0], *load_config(q[0]))
    cpu = [plan(r, lay, recipe_scenario(r), "cpu", shards=2).to_json() for r in q]
    assert cpu[0]["device_peak_bytes"] == cpu[1]["device_peak_bytes"]
    assert cpu[0]["host_bytes"] == cpu[1]["host_bytes"]
    refused = CliRunner().invoke(app, ["plan", path, "distributed.cpu_offload=true"])
    message = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "needs distributed.sharding: fsdp" in message
