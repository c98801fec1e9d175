"""The engine adds no arithmetic of its own: its losses are bit for bit those of a
plain loop (forward, summed cross-entropy over the step's targets, backward,
AdamW), and switching the importance observation on or off changes nothing."""

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
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        n = int((labels != -100).sum())
        loss = F.cross_entropy(
            logits[:, :-1, :].reshape(-1, logits.size(-1)).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        loss = loss / n
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
