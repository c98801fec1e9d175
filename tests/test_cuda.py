"""CUDA only (`pytest -m cuda`; every test here skips without a CUDA device).

What the CPU suite cannot check: the host store's pinned slabs and side-stream
copies, offloading bit-identical to keep on a GPU (where copies really are
asynchronous), bf16 weights with fp32 masters, `grass plan`'s predicted peak
against the peak the caching allocator measures, and sample packing with CUDA's
attention kernels (each packed row's loss its unpacked loss, fp32 and bf16), and
the sharded (FSDP2) path over NCCL.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import ListSink

from grass_cli.engine import setup, train
from grass_cli.offload.store import CpuStore
from grass_cli.recipe import validate_dict
from grass_cli.telemetry import Telemetry

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")


def cuda_recipe(
    model_dir: Path,
    out: Path,
    optimizer: dict,
    *,
    data: dict | None = None,
    sampler: dict | None = None,
    training: dict | None = None,
    **model,
):
    """tests/test_offload.py's recipe, on the GPU."""
    return validate_dict(
        {
            "model": {"path": str(model_dir), **model},
            "data": data or {"train": TRAIN, "max_length": 64, "limit": 32},
            "sampler": sampler or {"strategy": "lisa", "gamma": 2, "switch_interval": 2},
            "optimizer": {"lr": 1e-3, "weight_decay": 0.01, **optimizer},
            "training": {
                "max_steps": 8,
                "micro_batch_size": 4,
                "seed": 3,
                "device": "cuda",
                **(training or {}),
            },
            "checkpoint": {"at_end": False},
            "output": {"dir": str(out), "save_model": False},
        },
        "test_cuda.yaml",
    )


def run_on_cuda(recipe, math_attention: bool = False):
    """Train; `math_attention` pins SDPA to its math backend, whose backward is
    deterministic (the fused flash / memory-efficient kernels may accumulate with
    atomics, so two identical runs could differ in the last bit)."""
    ctx = contextlib.nullcontext()
    if math_attention:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.MATH)
    sink = ListSink()
    with ctx:
        r = setup(recipe, Telemetry([sink]), overwrite=True)
        result = train(r)
    if r.optimizer.store is not None:
        r.optimizer.store.close()
    return r, sink, result


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ the host store


@pytest.mark.parametrize("overlap", [True, False])
def test_cpu_store_pins_exact_host_copies(overlap):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    # Sizes just past a power of two: PyTorch's pinned allocator (pin_memory) rounds
    # every allocation up to the next power of two, which would take ~2x these bytes
    # (4 + 8 + 4 MiB for about 8.4 MB).
    live = [
        torch.randn(2**19 + 1, device=dev),  # 2 MiB + 4 B
        torch.randn(1025, 1025, device=dev),  # 4 MiB + 8 KiB
        torch.randn(2**20 + 3, device=dev).to(torch.bfloat16),  # 2 MiB + 6 B
        torch.randn(3, device=dev),  # smaller than the 64-byte alignment
    ]
    expect = [t.clone() for t in live]
    data_bytes = sum(t.numel() * t.element_size() for t in live)
    store = CpuStore(dev, overlap=overlap)
    store.put("g@0", live)

    held = store.host_tensors("g@0")  # waits for the device-to-host copy
    torch.cuda.synchronize()
    for h, t, e in zip(held, live, expect, strict=True):
        assert h.device.type == "cpu" and h.is_pinned()
        assert h.dtype == t.dtype and h.shape == t.shape
        assert h.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        assert torch.equal(h, e.cpu())

    # A copy, not a reference: changing the device tensors leaves the host copy alone.
    for t in live:
        t.add_(100)
    torch.cuda.synchronize()
    for h, e in zip(held, expect, strict=True):
        assert torch.equal(h, e.cpu())

    back = store.get("g@0", dev)
    for b, e in zip(back, expect, strict=True):
        assert b.device.type == "cuda" and b.dtype == e.dtype
        assert torch.equal(b, e)  # ordered after the copy by the store's event
    torch.cuda.synchronize()

    # One exact-size slab, registered with cudaHostRegister (not the power-of-two
    # pin_memory fallback): pinned bytes are the data plus 64-byte alignment.
    slab = store._host["g@0"]
    assert slab.registered, "cudaHostRegister failed: the store fell back to pin_memory"
    assert store.bytes() == data_bytes
    assert store.pinned_bytes() == store.host_bytes()
    assert data_bytes <= store.pinned_bytes() <= 1.05 * data_bytes

    raw = slab.raw  # kept alive past close(), so its memory can be asked about
    assert raw.is_pinned()
    store.close()
    assert not slab.registered and not raw.is_pinned()  # unregistered: pageable again
    assert store.names() == [] and store.pinned_bytes() == 0


# ------------------------------------------------- offloading changes nothing


@pytest.fixture(scope="module")
def keep_cuda(tiny_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("keep-cuda")
    rec = cuda_recipe(tiny_factory("llama", 4), out, {"state_policy": "keep"})
    r, _, result = run_on_cuda(rec, math_attention=True)
    return params(r.model), result.losses


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sync"])
@pytest.mark.parametrize("residency", ["interval", "step"])
def test_offload_matches_keep_on_cuda(residency, overlap, keep_cuda, tiny_factory, tmp_path):
    keep_params, keep_losses = keep_cuda
    rec = cuda_recipe(
        tiny_factory("llama", 4),
        tmp_path / "run",
        {
            "state_policy": "offload",
            "offload": {"target": "cpu", "residency": residency, "overlap": overlap},
        },
    )
    r, sink, result = run_on_cuda(rec, math_attention=True)
    assert len(sink.of("switch")) == 4  # blocks leave for the host and come back
    assert next(r.model.parameters()).device.type == "cuda"
    last = sink.of("step")[-1]
    assert last["optimizer_state_offload_cpu_bytes"] > 0
    assert last["offload_pinned_bytes"] >= last["optimizer_state_offload_cpu_bytes"]
    got = params(r.model)
    if residency == "interval":
        # The same AdamW calls on the same tensors: state only went to the host and back.
        assert result.losses == keep_losses
        for name, p in got.items():
            assert torch.equal(p, keep_params[name]), name
    else:
        # The streamed step calls AdamW once per parameter, so its foreach kernels get
        # one-tensor lists instead of a group's; CUDA does not promise the same bits
        # for a different launch (list chunking, vectorized paths), only the same
        # float32 arithmetic per element, so compare within float32 rounding.
        assert torch.allclose(
            torch.tensor(result.losses), torch.tensor(keep_losses), rtol=1e-5, atol=1e-7
        )
        for name, p in got.items():
            assert torch.allclose(p, keep_params[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sync"])
def test_two_tier_store_matches_all_pinned_on_cuda(overlap, tiny_factory, tmp_path):
    """A pinned budget of about one block: chunks are evicted to disk and read back
    (and staged ahead of switches) between the device, pinned slabs and files, and
    training is that of the all-pinned store, within the budget."""
    from grass_cli.offload.tiered import TieredStore

    folder = tiny_factory("llama", 4)
    offload = {"target": "cpu", "residency": "interval", "overlap": overlap}
    pinned = cuda_recipe(
        folder,
        tmp_path / "pinned",
        {"state_policy": "offload", "offload": {**offload, "host_budget": None}},
    )
    r0, _, want = run_on_cuda(pinned, math_attention=True)
    probe = setup(pinned, Telemetry([]), overwrite=True)
    block = probe.optimizer.offload_bytes_needed(["block.0"])
    probe.optimizer.store.close()
    budget = 1.2 * block / 1e9
    rec = cuda_recipe(
        folder,
        tmp_path / "run",
        {"state_policy": "offload", "offload": {**offload, "host_budget": budget}},
    )
    sink = ListSink()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        r = setup(rec, Telemetry([sink]), overwrite=True)
        result = train(r)
    store = r.optimizer.store
    assert isinstance(store, TieredStore) and store.evictions > 0
    assert store.peak_host <= store.budget
    assert result.losses == want.losses
    for name, p in params(r.model).items():
        assert torch.equal(p, params(r0.model)[name]), name
    store.close()


@pytest.mark.parametrize("state_dtype", ["bf16", "8bit"])
def test_compact_states_stream_exactly_on_cuda(state_dtype, tiny_factory, tmp_path):
    """Compact moments on CUDA (bitsandbytes' CUDA kernel for 8-bit), offloaded to
    pinned memory: streamed per matrix (residency step) they train exactly as moved
    once per switch (interval), and the stored moments keep their compact dtype."""
    folder = tiny_factory("gpt2", 4)  # its MLP matrices have 4096 values: 8-bit states
    runs = {}
    for residency in ("interval", "step"):
        offload = {"target": "cpu", "residency": residency, "host_budget": None}
        rec = cuda_recipe(
            folder,
            tmp_path / residency,
            {"state_policy": "offload", "offload": offload, "state_dtype": state_dtype},
        )
        r, _, result = run_on_cuda(rec, math_attention=True)
        runs[residency] = (params(r.model), result.losses)
        dtypes = {t.dtype for st in r.optimizer.states.values() for t in st.state_tensors()}
        want = torch.uint8 if state_dtype == "8bit" else torch.bfloat16
        assert want in dtypes or residency == "step"  # (streamed: all in the store)
    assert runs["step"][1] == runs["interval"][1]
    for name, p in runs["step"][0].items():
        assert torch.equal(p, runs["interval"][0][name]), name


# ------------------------------------------------------- bf16 with fp32 masters


@pytest.mark.parametrize("residency", ["interval", "step"])
def test_bf16_weights_with_fp32_masters_on_cuda(residency, tiny_factory, tmp_path):
    # Four rows and a micro-batch of four: every step sees the same batch, so the
    # loss must go down over ten steps (there is no batch-to-batch noise).
    rec = cuda_recipe(
        tiny_factory("llama", 4),
        tmp_path / "run",
        {"state_policy": "offload", "offload": {"target": "cpu", "residency": residency}},
        data={"train": TRAIN, "max_length": 64, "limit": 4},
        training={"max_steps": 10, "grad_clip": 1.0},
        dtype="bfloat16",
    )
    r, sink, result = run_on_cuda(rec)
    for name, p in r.model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.device.type == "cuda", name
    steps = sink.of("step")
    assert len(steps) == 10
    for e in steps:
        if residency == "step":
            # masters stream with their moments: none waits on the device between steps
            assert e["master_weight_bytes"] == 0 and e["optimizer_state_bytes"] == 0
        else:
            active = [f"block.{i}" for i in e["active"]] + r.always_train
            numel = sum(r.block_map.by_name()[n].numel for n in active)
            assert e["master_weight_bytes"] == 4 * numel  # fp32 masters of active groups
    assert steps[-1]["offload_pinned_bytes"] > 0
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0], result.losses


# ---------------------------------------------------- grass plan vs measurement


def _mid_llama(folder: Path, tokenizer) -> Path:
    """A llama big enough that weights, logits and state all count (about 150M
    parameters, 0.3 GB in bf16), with the tiny models' tokenizer (49152 tokens)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,  # no GQA: the planner's k/v width is the stored one
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _long_rows(path: Path, rows: int = 16) -> Path:
    """Text rows far longer than max_length: every row is cut to exactly max_length,
    so every micro-batch is micro_batch_size x max_length tokens, as the plan assumes."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            words = " ".join(f"row {i} says {j} apples and {j * 7 % 13} pears." for j in range(60))
            f.write(json.dumps({"text": words}) + "\n")
    return path


def _warm_up_cublas() -> None:
    """Create cuBLAS's handles and workspaces (tens of MiB that stay allocated for the
    process) for this thread's forward and autograd's backward thread, in fp32 and
    bf16, so they are in the baseline and not counted as the run's memory."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(256, 256, device="cuda", dtype=dtype, requires_grad=True)
        (x @ x).float().sum().backward()
    torch.cuda.synchronize()


def test_streamed_run_peak_matches_plan(tokenizer, tmp_path):
    from grass_cli.planner.memory import plan_recipe

    model_dir = _mid_llama(tmp_path / "mid-llama", tokenizer)
    recipe = cuda_recipe(
        model_dir,
        tmp_path / "run",
        {"state_policy": "offload", "offload": {"target": "cpu", "residency": "step"}},
        data={
            "train": str(_long_rows(tmp_path / "long.jsonl")),
            "format": "text",
            "max_length": 128,
        },
        sampler={
            "strategy": "grass",
            "gamma": 2,
            "switch_interval": 2,
            "probe_steps": 2,
            "update_interval": 2,
        },
        training={"max_steps": 6, "micro_batch_size": 2, "grad_accum_steps": 1, "autocast": "none"},
        dtype="bfloat16",
        gradient_checkpointing=True,
    )
    _, plans = plan_recipe(recipe, device="cuda", all_scenarios=False)
    predicted = plans[0].device_peak_bytes

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    _warm_up_cublas()
    # What is allocated before the run (cuBLAS workspaces, other tests' leftovers)
    # is not the run's: the plan models the run, not the process.
    base = torch.cuda.memory_allocated()
    sink = ListSink()
    run = setup(recipe, Telemetry([sink]), overwrite=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        train(run)
    finally:
        run.optimizer.store.close()
    steps = sink.of("step")
    assert steps and all(e["tokens"] == 2 * 128 for e in steps)  # full-length rows
    measured = steps[-1]["cuda_peak"] - base  # cumulative since the reset: probing too
    ratio = predicted / measured
    detail = (
        f"predicted {predicted / 2**20:.1f} MiB ({plans[0].peak_phase}: {plans[0].kinds}), "
        f"measured {measured / 2**20:.1f} MiB (peak {steps[-1]['cuda_peak'] / 2**20:.1f} "
        f"MiB - baseline {base / 2**20:.1f} MiB), ratio {ratio:.3f}"
    )
    print(detail)
    assert 0.9 <= ratio <= 1.1, detail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_on_cuda_equals_the_plain_loss_in_less_memory(dtype):
    """The chunked head + loss on the GPU: the plain loss and gradients up to rounding,
    and a peak (max_memory_allocated) below the plain path's by most of its (N, V)
    buffers, at Llama-3's vocabulary and 2048 target tokens."""
    import torch.nn.functional as F

    from grass_cli.evaluate.loss import ChunkedHeadLoss, head_chunk_rows

    V, d, N = 128256, 512, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(V, d, device="cuda", generator=g) * 0.02).to(dtype).requires_grad_()
    hidden = torch.randn(N, d, device="cuda", generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)

    def measure(fn) -> tuple[float, list[torch.Tensor], int]:
        weight.grad = hidden.grad = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        (loss / N).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return float(loss), [weight.grad.clone(), hidden.grad.clone()], peak

    plain_loss, plain_grads, plain_peak = measure(
        lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
    )
    rows = head_chunk_rows(V)
    ours_loss, our_grads, our_peak = measure(
        lambda: ChunkedHeadLoss.apply(hidden, weight, None, labels, rows)
    )
    assert ours_loss == pytest.approx(plain_loss, rel=1e-5 if dtype == torch.float32 else 1e-2)
    for a, b in zip(our_grads, plain_grads, strict=True):
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        assert float((a.float() - b.float()).norm()) <= tol * float(b.float().norm())
    logits_fp32 = N * V * 4
    assert our_peak < plain_peak - logits_fp32, (our_peak, plain_peak)


# ------------------------------------------------------------------ sample packing


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_rows_on_cuda_equal_unpacked(dtype, tiny_factory, tokenizer, tmp_path):
    """data.packing on the GPU: the model check passes with CUDA's sdpa kernels, each
    packed row's loss is its unpacked loss, and a packed bf16 run trains."""
    from test_packing import packed_row_losses
    from transformers import AutoModelForCausalLM

    from grass_cli.data import BatchIterator, collate, load_rows, tokenize_rows
    from grass_cli.data.packing import check_model_packs
    from grass_cli.evaluate.loss import row_loss_sums
    from grass_cli.recipe import DataConfig

    dev = torch.device("cuda")
    cfg = DataConfig(train=TRAIN, max_length=128, train_on_prompt=True)
    rows = tokenize_rows(load_rows(TRAIN, 24), cfg, tokenizer, TRAIN)
    model_dir = tiny_factory("llama", 2)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="sdpa", dtype=getattr(torch, dtype)
    )
    model = model.to(dev).eval()
    check_model_packs(model, dev)
    it = BatchIterator(rows, 3, tokenizer.pad_token_id, seed=1, packing=True, max_length=128)
    sequences = it.next_sequences()
    assert max(len(s) for s in sequences) >= 2
    order = [i for s in sequences for i in s]
    packed = {k: v.to(dev) for k, v in it.packed_batch(sequences).items()}
    plain = collate([rows.input_ids[i] for i in order], [rows.labels[i] for i in order], 0)
    with torch.no_grad():
        per_row = packed_row_losses(model, packed, sequences)
        sums, _ = row_loss_sums(model, {k: v.to(dev) for k, v in plain.items()})
    rel = 1e-4 if dtype == "float32" else 1e-2  # bf16: kernels tile other lengths otherwise
    for row, expected in zip(order, sums.tolist(), strict=True):
        assert per_row[row] == pytest.approx(expected, rel=rel)

    data = {"train": TRAIN, "max_length": 256, "limit": 64, "packing": True}
    recipe = cuda_recipe(model_dir, tmp_path / "run", {}, data=data, dtype="bfloat16")
    _, sink, result = run_on_cuda(recipe)
    assert len(result.losses) == 8 and all(math.isfinite(x) for x in result.losses)
    steps = sink.of("step")
    assert min(e["tokens"] for e in steps) > 4 * 53  # several rows a sequence


def test_sharded_on_one_cuda_device_matches_replicated(tiny_factory, tmp_path):
    """FSDP2 over NCCL with a mesh of one process (torchrun --nproc-per-node 1): bf16
    weights (so the mixed-precision policy only adds fp32 gradient reduction) train
    as the replicated path does, to bf16 rounding; with distributed.cpu_offload too
    (pinned shards, AdamW on the host, clipping over gloo beside NCCL), on an untied
    model whose embeddings and head are units of their own, with a lower CUDA peak."""
    import os
    import subprocess
    import sys

    import yaml

    model = tiny_factory("qwen2", 4)
    losses, peaks = {}, {}
    for mode in ("replicate", "fsdp", "fsdp-offload"):
        out = tmp_path / mode
        recipe = tmp_path / f"{mode}.yaml"
        data = cuda_recipe(
            model, out, {"state_policy": "offload"}, training={"max_steps": 6}, dtype="bfloat16"
        ).model_dump(mode="json")
        data["distributed"]["sharding"] = mode.split("-")[0]
        data["distributed"]["cpu_offload"] = mode.endswith("offload")
        recipe.write_text(yaml.safe_dump(data))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=1", "-m", "grass_cli", "train", str(recipe),
               "--no-live"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = (out / "metrics.jsonl").read_text().splitlines()
        steps = [e for e in map(json.loads, lines) if e["event"] == "step"]
        losses[mode] = [e["loss"] for e in steps]
        peaks[mode] = max(e.get("cuda_peak", 0) for e in steps)
        if mode == "fsdp-offload":  # AdamW's state is on the host, and reported there
            assert all(e["optimizer_state_bytes"] == 0 for e in steps)
            assert max(e["optimizer_state_offload_cpu_bytes"] for e in steps) > 0
    assert len(losses["fsdp"]) == len(losses["fsdp-offload"]) == 6
    assert losses["fsdp"] == pytest.approx(losses["replicate"], rel=2e-2)
    assert losses["fsdp-offload"] == pytest.approx(losses["fsdp"], rel=2e-2)
    assert 0 < peaks["fsdp-offload"] < peaks["fsdp"]
