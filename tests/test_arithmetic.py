"""The engine adds no arithmetic of its own: its losses are bit for bit those of a
plain loop (forward, the LM head at target positions, summed cross-entropy,
backward, AdamW), switching the importance observation on or off changes nothing,
and the head computed at target positions only gives the full computation's loss
and gradients up to float rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import ListSink
from transformers import AutoModelForCausalLM

from grass_cli.engine import setup, train
from grass_cli.offload.optimizer import adamw
from grass_cli.recipe import OptimizerConfig, validate_dict
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
STEPS = 5


def recipe(model_dir: Path, out: Path, strategy: str, fused: bool, **output) -> object:
    return validate_dict(
        {
            "model": {"path": str(model_dir)},
            "data": {"train": TRAIN, "eval": None, "max_length": 64, "limit": 40},
            "sampler": {
                "strategy": strategy,
                "gamma": 2,
                "switch_interval": 2,
                "probe_steps": 1,
                "update_interval": 2,
                "train_embeddings": True,
                "train_head": True,
            },
            "optimizer": {"lr": 1e-3, "fused": fused},
            "training": {
                "max_steps": STEPS,
                "micro_batch_size": 4,
                "seed": 3,
                "lr_scheduler": "constant",
                "warmup_steps": 0,
                "grad_clip": None,
            },
            "checkpoint": {"at_end": False},
            "output": {"dir": str(out), "save_model": False, **output},
        },
        "test.yaml",
    )


def engine_losses(rec) -> tuple[list[float], object]:
    sink = ListSink()
    run = setup(rec, Telemetry([sink]), overwrite=True)
    train(run)
    return [e["loss"] for e in sink.of("step")], run


def plain_loop_losses(rec, model_dir: Path, fused: bool) -> list[float]:
    """Full fine-tuning written the way a tutorial writes it, on the engine's batches."""
    batches = setup(rec, Telemetry([]), overwrite=True).batches
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=fused or None)
    losses = []
    for _ in range(STEPS):
        b = next(batches)
        # the head at target positions only (position t predicts token t + 1)
        hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        labels = b["labels"][:, 1:]
        keep = labels != -100
        logits = model.lm_head(hidden.last_hidden_state[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum") / int(keep.sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach().double()))
    return losses


@pytest.mark.parametrize("fused", [True, False])
def test_full_finetuning_losses_equal_a_plain_loop_bit_for_bit(fused, tiny_factory, tmp_path):
    model_dir = tiny_factory("llama", 4)
    rec = recipe(model_dir, tmp_path / "run", "full", fused)
    ours, _ = engine_losses(rec)
    plain = plain_loop_losses(recipe(model_dir, tmp_path / "ref", "full", fused), model_dir, fused)
    assert len(ours) == STEPS
    assert ours == plain  # exact: the same floats, not merely close ones
    assert ours[-1] < ours[0]  # (and it trains)


@pytest.mark.parametrize("strategy", ["lisa", "full"])
def test_importance_observation_changes_no_loss(strategy, tiny_factory, tmp_path):
    model_dir = tiny_factory("llama", 4)
    auto, run_auto = engine_losses(recipe(model_dir, tmp_path / "a", strategy, True))
    always, run_always = engine_losses(
        recipe(model_dir, tmp_path / "b", strategy, True, importance="always")
    )
    assert auto == always
    for p, q in zip(run_auto.model.parameters(), run_always.model.parameters(), strict=True):
        assert torch.equal(p, q)
    # auto: nothing read the gradients (no MGN); always: the trained blocks were observed
    assert run_auto.tracker.values() == [None] * 4
    observed = [v for v in run_always.tracker.values() if v is not None]
    assert len(observed) >= 2 and all(v > 0 for v in observed)


def test_grass_observes_importance_by_default(tiny_factory, tmp_path):
    model_dir = tiny_factory("llama", 4)
    _, run = engine_losses(recipe(model_dir, tmp_path / "g", "grass", True))
    assert run.tracker.observing
    assert all(v is not None and v > 0 for v in run.tracker.values())  # probing, then EMA


def test_fused_adamw_on_this_device_and_its_fallback():
    p = torch.nn.Parameter(torch.ones(3))
    assert adamw([{"params": [p]}], OptimizerConfig(fused=True)).defaults["fused"] is True
    assert not adamw([{"params": [p]}], OptimizerConfig(fused=False)).defaults["fused"]
    # torch has no fused kernel for complex parameters (it would say so only at the
    # first step): the default implementation, which steps
    c = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))
    opt = adamw([{"params": [c]}], OptimizerConfig(fused=True))
    assert not opt.defaults["fused"]
    c.grad = torch.ones_like(c)
    opt.step()
    assert not torch.equal(c.detach(), torch.ones(3, dtype=torch.complex64))


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2", "gpt_neox"])
def test_head_at_target_positions_equals_the_full_head(arch, tiny_factory):
    """Same loss and gradients as the full (B, T, V) logits, for every architecture
    the tests build (GPT-2 and GPT-NeoX name and tie their heads differently)."""
    from grass_cli.data.batches import collate
    from grass_cli.evaluate import loss_sum, row_loss_sums

    model = AutoModelForCausalLM.from_pretrained(tiny_factory(arch, 2), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (9, 17, 4)]
    labels = [[-100] * (len(r) // 2) + r[len(r) // 2 :] for r in ids]
    batch = collate(ids, labels, pad_id=0)

    def full_logits_loss() -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )

    def loss_and_grads(fn) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return float(loss.detach()), [
            p.grad.clone() for p in model.parameters() if p.grad is not None
        ]

    ref, ref_grads = loss_and_grads(full_logits_loss)
    shapes: list[tuple[int, ...]] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: shapes.append(tuple(args[0].shape))
    )
    ours, our_grads = loss_and_grads(lambda: loss_sum(model, batch))
    hook.remove()
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert [s[0] for s in shapes] == [n_targets] and len(shapes[0]) == 2  # targets only
    assert ours == pytest.approx(ref, rel=1e-6)
    assert len(our_grads) == len(ref_grads)
    for a, b in zip(our_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        sums, counts = row_loss_sums(model, batch)
    assert counts.tolist() == [len(r) - len(r) // 2 - (1 if len(r) // 2 == 0 else 0) for r in ids]
    assert float(sums.sum()) == pytest.approx(ref, rel=1e-6)
