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

from grass_cli.engine import build as build_module
from grass_cli.engine import setup, train
from grass_cli.evaluate import loss as loss_module
from grass_cli.offload.adamw import adamw
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
def test_full_finetuning_losses_equal_a_plain_loop_bit_for_bit(
    fused, tiny_factory, tmp_path, monkeypatch
):
    # the tutorial's loop computes the loss in one piece and backpropagates the tied
    # embedding densely: the engine's two memory rewrites, which equal these up to the
    # order of a sum, are tested on their own (test_chunked_head_loss_equals_the_plain_loss,
    # test_tied_embeddings_get_sparse_backward_and_the_same_dense_gradient)
    monkeypatch.setattr(loss_module, "HEAD_CHUNK_BYTES", 2**40)
    monkeypatch.setattr(build_module, "sparse_tied_embedding_grads", lambda model: False)
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


def _batch(seed: int, lengths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    from grass_cli.data.batches import collate

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, 2000, (n,), generator=g).tolist() for n in lengths]
    labels = [[-100] * (len(r) // 3) + r[len(r) // 3 :] for r in ids]
    return collate(ids, labels, pad_id=0)


def _loss_and_grads(model, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    (loss / 7).backward()  # a scale, as the engine divides by the step's tokens
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2", "gpt_neox"])
def test_chunked_head_loss_equals_the_plain_loss(arch, tiny_factory, monkeypatch):
    """The head and loss in chunks of rows (gradients made chunk by chunk) give the
    one-piece loss and gradients up to rounding, with and without gradients, and the
    head itself then runs on no rows."""
    from grass_cli.evaluate import loss_sum, row_loss_sums

    model = AutoModelForCausalLM.from_pretrained(tiny_factory(arch, 2), dtype=torch.float32)
    batch = _batch(1, (40, 23, 57, 9))
    n = int((batch["labels"][:, 1:] != -100).sum())
    vocab = model.get_output_embeddings().out_features
    ref, ref_grads = _loss_and_grads(model, lambda: loss_sum(model, batch))
    with torch.no_grad():
        ref_rows, ref_counts = row_loss_sums(model, batch)
    assert loss_module._chunk_rows(model, model.get_output_embeddings(), n) == 0  # one piece

    monkeypatch.setattr(loss_module, "HEAD_CHUNK_BYTES", 4 * vocab * 16)  # 16 rows a chunk
    assert loss_module._chunk_rows(model, model.get_output_embeddings(), n) == 16 < n
    rows_seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: rows_seen.append(args[0].shape[0])
    )
    ours, our_grads = _loss_and_grads(model, lambda: loss_sum(model, batch))
    hook.remove()
    assert rows_seen == [0]  # no (N, V) logits were made by the model
    assert float(ours) == pytest.approx(float(ref), rel=1e-6)
    assert len(our_grads) == len(ref_grads)
    for a, b in zip(our_grads, ref_grads, strict=True):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm())  # sums in another order
    with torch.no_grad():
        assert float(loss_sum(model, batch)) == pytest.approx(float(ref), rel=1e-6)
        rows, counts = row_loss_sums(model, batch)
    assert torch.equal(counts, ref_counts)
    assert torch.allclose(rows, ref_rows, rtol=1e-6)


def test_chunked_head_loss_with_a_frozen_head_and_under_bf16_autocast(tiny_factory, monkeypatch):
    """A frozen head (GRASS's and LISA's default) gets no gradient buffer, the hidden
    states still get theirs; under bf16 autocast the chunked loss stays within
    bf16 rounding of the plain one."""
    from grass_cli.evaluate import loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama", 2), dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied: the head too
    batch = _batch(2, (50, 31))
    ref, ref_grads = _loss_and_grads(model, lambda: loss_sum(model, batch))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref16, ref16_grads = _loss_and_grads(model, lambda: loss_sum(model, batch))
    monkeypatch.setattr(loss_module, "HEAD_CHUNK_BYTES", 4 * 49152 * 8)
    ours, our_grads = _loss_and_grads(model, lambda: loss_sum(model, batch))
    assert model.get_output_embeddings().weight.grad is None
    assert float(ours) == pytest.approx(float(ref), rel=1e-6)
    for a, b in zip(our_grads, ref_grads, strict=True):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm())  # sums in another order
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours16, our16_grads = _loss_and_grads(model, lambda: loss_sum(model, batch))
    assert float(ours16) == pytest.approx(float(ref16), rel=1e-2)
    for a, b in zip(our16_grads, ref16_grads, strict=True):
        assert float((a - b).norm()) <= 0.05 * float(b.norm())


def test_heads_followed_by_a_scale_keep_the_plain_loss(tiny_factory, monkeypatch):
    """A model that changes its logits after the head (Gemma 2's soft-capping,
    Cohere's logit scale) or a head that is not a plain Linear (LoRA-wrapped)
    is never chunked: the chunked loss would skip what the model does after it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama", 2), dtype=torch.float32)
    monkeypatch.setattr(loss_module, "HEAD_CHUNK_BYTES", 1)
    head = model.get_output_embeddings()
    assert loss_module._chunk_rows(model, head, 10) == 1
    model.config.final_logit_softcapping = 30.0
    assert loss_module._chunk_rows(model, head, 10) == 0
    model.config.final_logit_softcapping = None
    model.config.model_type = "cohere"
    assert loss_module._chunk_rows(model, head, 10) == 0
    model.config.model_type = "llama"
    assert loss_module._chunk_rows(model, torch.nn.Sequential(head), 10) == 0


def test_tied_embeddings_get_sparse_backward_and_the_same_dense_gradient(tiny_factory):
    """The input embedding tied to the head backpropagates sparsely; the weight's
    gradient is still dense and equals the dense embedding's up to the order in
    which a repeated token's gradients are summed (bit for bit for the others)."""
    from grass_cli.evaluate import loss_sum
    from grass_cli.model_memory import sparse_tied_embedding_grads

    batch = _batch(3, (30, 12, 21))
    grads = []
    for sparse in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama", 2), dtype=torch.float32)
        if sparse:
            assert sparse_tied_embedding_grads(model)
            assert model.get_input_embeddings().sparse
        _, g = _loss_and_grads(model, lambda m=model: loss_sum(m, batch))
        weight = model.get_input_embeddings().weight
        assert weight.grad is not None and weight.grad.layout == torch.strided
        grads.append(g)
    (dense_emb, *dense_rest), (sparse_emb, *sparse_rest) = grads
    assert all(torch.equal(a, b) for a, b in zip(dense_rest, sparse_rest, strict=True))
    assert float((dense_emb - sparse_emb).norm()) <= 1e-6 * float(dense_emb.norm())
    untied = AutoModelForCausalLM.from_pretrained(tiny_factory("qwen2", 2), dtype=torch.float32)
    assert not sparse_tied_embedding_grads(untied)  # alone, its gradient would stay sparse
    assert not untied.get_input_embeddings().sparse


SPARSE_PEAK = """
import sys, time, torch
from pathlib import Path
V, d = 49152, 576
emb = torch.nn.Embedding(V, d, sparse=sys.argv[1] == "sparse")
head = torch.nn.Linear(d, V, bias=False)
head.weight = emb.weight
ids = torch.randint(0, V, (8, 64), generator=torch.Generator().manual_seed(0))
for _ in range(2):
    emb.weight.grad = None
    out = head(emb(ids)[:, :4]).sum()
    Path("/proc/self/clear_refs").write_text("5")
    out.backward()
status = Path("/proc/self/status").read_text()
hwm = [l for l in status.splitlines() if l.startswith("VmHWM:")][0].split()[1]
rss = [l for l in status.splitlines() if l.startswith("VmRSS:")][0].split()[1]
print(int(hwm) * 1024 - int(rss) * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_sparse_tied_backward_saves_a_vocabulary_sized_buffer(tmp_path):
    """Measured, not assumed: the high-water mark of the tied weight's backward over
    what is resident after it, dense and sparse, in fresh processes (SmolLM2's
    head shape: 49152 x 576 fp32, 113 MB)."""
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text(SPARSE_PEAK)
    over = {}
    for mode in ("dense", "sparse"):
        out = subprocess.run(
            [sys.executable, str(script), mode], capture_output=True, text=True, check=True
        )
        over[mode] = int(out.stdout.split()[-1])
    buffer = 49152 * 576 * 4
    assert over["dense"] - over["sparse"] >= 0.8 * buffer, over


def test_one_fused_call_for_all_groups_equals_each_optimizer_stepping():
    """BlockAdamW steps its fp32 groups together (one fused call per hyperparameter
    set): bit for bit each optimizer's own step, with the same state tensors, for
    optimizers at different step counts and with decayed and undecayed groups."""
    from grass_cli.offload.adamw import step_together

    def make(seed: int) -> tuple[list[torch.optim.AdamW], list[torch.nn.Parameter]]:
        g = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(8, 4), (4,), (3, 5)]]
        cfg = OptimizerConfig(fused=True, lr=1e-2, weight_decay=0.1)
        opts = [
            adamw(
                [
                    {"params": params[:1], "weight_decay": 0.1},
                    {"params": params[1:2], "weight_decay": 0.0},
                ],
                cfg,
            ),
            adamw([{"params": params[2:], "weight_decay": 0.1}], cfg),
        ]
        return opts, params

    ours, ours_p = make(0)
    ref, ref_p = make(0)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in ours_p]
        active = [0, 1] if step != 1 else [1]  # the first optimizer skips a step
        for params in (ours_p, ref_p):
            owner = [0, 0, 1]  # the optimizer of each parameter
            for i, p in enumerate(params):
                p.grad = grads[i].clone() if owner[i] in active else None
        step_together([ours[i] for i in active])
        for i in active:
            ref[i].step()
        for p, q in zip(ours_p, ref_p, strict=True):
            assert torch.equal(p, q)
    for o, r in zip(ours, ref, strict=True):
        so, sr = o.state_dict()["state"], r.state_dict()["state"]
        assert so.keys() == sr.keys()
        for k in so:
            assert {n: torch.equal(so[k][n], sr[k][n]) for n in so[k]} == {n: True for n in sr[k]}
    assert float(ours[0].state_dict()["state"][0]["step"]) == 3.0  # skipped one of four


def test_chunked_head_loss_with_a_bias_and_uneven_chunks():
    """A head with a bias (Phi's) and a last chunk shorter than the others: the
    loss and the gradients of hidden states, weight and bias equal the plain ones."""
    from grass_cli.evaluate.loss import ChunkedHeadLoss

    g = torch.Generator().manual_seed(4)
    weight = torch.randn(300, 16, generator=g, requires_grad=True)
    bias = torch.randn(300, generator=g, requires_grad=True)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (23,), generator=g)
    results = []
    for fn in (
        lambda: F.cross_entropy(F.linear(hidden, weight, bias), labels, reduction="sum"),
        lambda: ChunkedHeadLoss.apply(hidden, weight, bias, labels, 5),  # 5 x 4 + 3
    ):
        weight.grad = bias.grad = hidden.grad = None
        loss = fn()
        (loss * 0.37).backward()
        results.append((float(loss.detach()), [t.grad.clone() for t in (hidden, weight, bias)]))
    (plain, plain_grads), (ours, our_grads) = results
    assert ours == pytest.approx(plain, rel=1e-6)
    for a, b in zip(our_grads, plain_grads, strict=True):
        assert float((a - b).norm()) <= 1e-5 * float(b.norm())
    with torch.no_grad():  # no gradient wanted: none made, the same loss
        assert float(ChunkedHeadLoss.apply(hidden, weight, bias, labels, 5)) == pytest.approx(
            plain, rel=1e-6
        )
