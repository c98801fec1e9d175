"""Sharded training (distributed.sharding: fsdp): 2 and 4 gloo processes under torchrun.

Every run goes through the real CLI (`python -m torch.distributed.run --standalone
--nproc-per-node N -m grass_cli train RECIPE distributed.sharding=fsdp`) and is
compared with one process on the same global batch (micro batch x N), so every
step sees the same rows: the same blocks, losses, MGN and, to float rounding,
the same weights, while each rank holds about 1/N of the weights and state.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import EVAL, ROOT, events, torchrun
from test_distributed import write_recipe as dist_recipe

from grass_cli.engine import run_training
from grass_cli.recipe import load_recipe
from grass_cli.telemetry import Telemetry

STEPS = 6
pytestmark = pytest.mark.slow

# strategy, state policy, offload: every strategy and every state policy once
CASES = {
    "grass-offload-cpu": ("grass", "offload", {"target": "cpu", "residency": "interval"}),
    "lisa-offload-disk": ("lisa", "offload", {"target": "disk", "residency": "step"}),
    "full-keep": ("full", "keep", {}),
    "cyclic-drop": ("cyclic", "drop", {}),
    "grass-static-keep": ("grass-static", "keep", {}),
}


def write_recipe(path: Path, model: Path, out: Path, strategy: str, policy: str, off: dict) -> Path:
    """test_distributed's recipe, sharded, with a checkpoint mid-run and 7 eval rows
    (an odd number: the ranks' shares of the eval batches differ)."""
    return dist_recipe(
        path, model, out, strategy, off, policy,
        data={"eval_limit": 7},
        checkpoint={"interval": 3},
        distributed={"sharding": "fsdp"},
    )  # fmt: skip


def train_sharded(recipe: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    proc = torchrun("-m", "grass_cli", "train", str(recipe), "--no-live", *extra, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def sharded_runs(tiny_factory, tmp_path_factory):
    """Each case trained once on 2 sharded processes (shared by the tests below)."""
    model = tiny_factory("llama", 4)
    root = tmp_path_factory.mktemp("fsdp")
    runs = {}
    for name, case in CASES.items():
        recipe = write_recipe(root / f"{name}.yaml", model, root / name, *case)
        runs[name] = (recipe, root / name, train_sharded(recipe))
    return model, runs


def single_run(
    recipe: Path, out: Path, world: int, micro: int = 2, extra: list[str] | None = None
) -> Path:
    """One process, the same global batch, replicated (nothing to shard)."""
    one = load_recipe(
        recipe,
        [f"output.dir={out}", f"training.micro_batch_size={micro * world}",
         "distributed.sharding=replicate", *(extra or [])],
    )  # fmt: skip
    return run_training(one, Telemetry([]), overwrite=True).run_dir


def assert_same_training(sharded: Path, one: Path, model: Path) -> None:
    a, b = events(sharded, "step"), events(one, "step")
    assert len(a) == STEPS
    assert [e["active"] for e in a] == [e["active"] for e in b]
    assert [e["tokens"] for e in a] == [e["tokens"] for e in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    ea = [e["eval_loss"] for e in events(sharded, "eval")]
    assert ea == pytest.approx([e["eval_loss"] for e in events(one, "eval")], rel=1e-5)
    if events(one, "probe_done"):  # MGN from the shards, summed == the unsharded MGN
        ma = events(sharded, "probe_done")[0]["importance"]
        assert ma == pytest.approx(events(one, "probe_done")[0]["importance"], rel=1e-4)
    # the gathered final model: the single run's weights, to float summation order
    wa = load_file(sharded / "final/model.safetensors")
    wb = load_file(one / "final/model.safetensors")
    base = load_file(model / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wb:
        update = (wb[k] - base[k]).norm() if k in base else wb[k].norm()
        assert (wa[k] - wb[k]).norm() <= 1e-3 * update + 1e-6, k
    assert sum(not torch.equal(wb[k], base[k]) for k in wb if k in base) >= 4


@pytest.mark.parametrize("name", list(CASES))
def test_two_sharded_processes_match_one(name, sharded_runs, tmp_path):
    model, runs = sharded_runs
    recipe, out, proc = runs[name]
    assert_same_training(out, single_run(recipe, tmp_path / "one", 2), model)
    assert "batch=4 (2 x 2 processes, sharded)" in proc.stdout
    start = events(out, "start")[0]
    assert start["sharding"] == "fsdp" and start["world_size"] == 2


def test_each_rank_holds_half_of_the_weights_and_state(sharded_runs, tmp_path):
    _, runs = sharded_runs
    recipe, out, _ = runs["grass-offload-cpu"]
    one = single_run(recipe, tmp_path / "one", 2)
    for a, b in zip(events(out, "step"), events(one, "step"), strict=True):
        # dim-0 shards of 2: exactly half of every tensor (the tiny model's rows are even)
        assert 2 * a["weights_bytes"] == b["weights_bytes"]
        assert 2 * a["grad_bytes"] == b["grad_bytes"]
        assert 2 * a["optimizer_state_offload_cpu_bytes"] == b["optimizer_state_offload_cpu_bytes"]
        # FSDP2 reduce-scatters the trained groups' whole gradients, nothing for frozen blocks
        assert a["allreduce_bytes"] == 4 * a["trainable_params"]


def test_checkpoint_holds_one_shard_per_rank_and_a_plain_model(sharded_runs):
    _, runs = sharded_runs
    _, out, _ = runs["grass-offload-cpu"]
    ckpt = out / "checkpoints/step-0000003"
    index = json.loads((ckpt / "optimizer/index.json").read_text())
    assert index["shards"] == 2
    names = sorted(p.name for p in (ckpt / "optimizer").iterdir() if p.is_dir())
    assert names == ["shard-00000", "shard-00001"]
    # each shard holds half of each moment
    a = load_file(ckpt / "optimizer/shard-00000/block.3.safetensors")
    b = load_file(ckpt / "optimizer/shard-00001/block.3.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert a[k].shape == b[k].shape
    # the model is a plain HF folder: transformers loads it as it is
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(ckpt)
    assert sum(p.numel() for p in m.parameters()) > 0


def test_resume_on_the_same_and_on_other_numbers_of_ranks(sharded_runs, tmp_path):
    model, runs = sharded_runs
    recipe, straight, _ = runs["grass-offload-cpu"]
    ckpt = straight / "checkpoints/step-0000003"
    # 2 -> 2: bit-identical to the straight run
    same = tmp_path / "same"
    train_sharded(recipe, f"output.dir={same}", "--resume", str(ckpt))
    # 2 -> 4 -> 2: re-sharded to 4 (no step taken), saved, back to 2: still identical,
    # so cutting the state anew loses nothing
    four, back = tmp_path / "four", tmp_path / "back"
    proc = train_sharded(
        recipe, f"output.dir={four}", "training.max_steps=3", "--resume", str(ckpt), nproc=4
    )
    assert "2 processes" in proc.stdout and "4" in proc.stdout  # the warning says so
    index = json.loads((four / "checkpoints/step-0000003/optimizer/index.json").read_text())
    assert index["shards"] == 4
    train_sharded(recipe, f"output.dir={back}", "--resume", str(four / "checkpoints/step-0000003"))
    wa = load_file(straight / "final/model.safetensors")
    for run in (same, back):
        assert [e["loss"] for e in events(run, "step")] == [
            e["loss"] for e in events(straight, "step")
        ]
        wb = load_file(run / "final/model.safetensors")
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (run.name, k)


@pytest.mark.parametrize(
    ("arch", "group"),
    [("llama", None), ("llama", 2), ("qwen2", None)],
    ids=["fsdp-4", "hybrid-2x2", "fsdp-4-untied"],
)
def test_four_processes_full_and_hybrid_sharding_match_one(tiny_factory, tmp_path, arch, group):
    model = tiny_factory(arch, 4)
    case = CASES["grass-offload-cpu"]
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "four", *case)
    extra = [] if group is None else [f"distributed.shard_group_size={group}"]
    # text rows longer than max_length, micro batch 4: 4 x 63 target tokens whose
    # logits pass HEAD_CHUNK_BYTES, so the loss runs in chunks after the forward:
    # sharded, with the frozen head gathered for it (its own unit, or the root's
    # when tied) and the root kept gathered for the final norm's backward
    # (sharding.gather_head)
    words = ("the", "of", "model", "layer", "and", "to", "in", "is")
    rows = [" ".join(words[(i * 7 + j) % 8] for j in range(200)) for i in range(48)]
    text = tmp_path / "long.jsonl"
    text.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    data = [f"data.train={text}", "data.format=text", "data.eval=null"]
    train_sharded(recipe, "training.micro_batch_size=4", *data, *extra, nproc=4)
    one = single_run(recipe, tmp_path / "one", 4, micro=4, extra=data)
    assert_same_training(tmp_path / "four", one, model)


@pytest.mark.parametrize("strategy", ["lisa", "grass"])
def test_cpu_offload_and_untied_embedding_and_head_units_match_one(
    tiny_factory, tmp_path, strategy
):
    """distributed.cpu_offload (FSDP2's CPUOffloadPolicy) on an untied model whose
    input embeddings and head are FSDP2 units of their own, both trained: the same
    training as one process, for a strategy that probes (GRASS) and one that
    switches before its first forward (LISA)."""
    model = tiny_factory("qwen2", 4)
    case = (strategy, "offload", {"target": "disk", "residency": "step"})
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "off", *case)
    extra = ["distributed.cpu_offload=true", "sampler.train_embeddings=true",
             "sampler.train_head=true"]  # fmt: skip
    proc = train_sharded(recipe, *extra)
    one = single_run(recipe, tmp_path / "one", 2, extra=extra[1:])
    assert_same_training(tmp_path / "off", one, model)
    start = events(tmp_path / "off", "start")[0]
    assert start["sharding"] == "fsdp" and start["cpu_offload"] is True
    assert "(2 x 2 processes, sharded, shards on the host)" in proc.stdout
    if strategy == "grass":  # resumed from step 3, bit-identical to the straight run
        again = tmp_path / "again"
        ckpt = tmp_path / "off/checkpoints/step-0000003"
        train_sharded(recipe, *extra, f"output.dir={again}", "--resume", str(ckpt))
        wa = load_file(tmp_path / "off/final/model.safetensors")
        wb = load_file(again / "final/model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_three_ranks_pad_uneven_shards_and_lisa_still_trains_them(tiny_factory, tmp_path):
    """3 ranks cut the tiny model's 32-row weights 11 / 11 / 10, which FSDP2 pads by
    replacing each shard's local tensor (when the weights are read into the meta
    model, `to_empty`). The block optimizer steps views of the local tensors, made at
    LISA's first switch, before any forward: the run still equals one process."""
    model = tiny_factory("llama", 4)
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "three", "lisa", "keep", {})
    # no eval data: nothing runs a forward before the first switch
    train_sharded(recipe, "data.eval=null", "training.eval_interval=null", nproc=3)
    one = single_run(recipe, tmp_path / "one", 3, extra=["data.eval=null"])
    assert_same_training(tmp_path / "three", one, model)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "grass_cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)


def test_what_sharding_needs_is_said_before_the_model_loads(tiny_factory, tmp_path):
    model = tiny_factory("llama", 4)
    recipe = write_recipe(tmp_path / "r.yaml", model, tmp_path / "out", *CASES["full-keep"])
    # without torchrun
    proc = _cli("train", str(recipe), "--no-live")
    assert proc.returncode == 2 and "needs the processes torchrun starts" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    # a shard group that does not divide the processes
    proc = torchrun("-m", "grass_cli", "train", str(recipe), "--no-live",
                    "distributed.shard_group_size=3")  # fmt: skip
    assert proc.returncode != 0
    assert "distributed.shard_group_size is 3 but the job has 2 process(es)" in proc.stderr
    # (torchrun prints its own traceback of the failed launch; none comes from grass)
    assert f'File "{ROOT / "grass_cli"}' not in proc.stderr
    assert not (tmp_path / "out").exists()
    # what sharding cannot do yet: refused by validate, before anything loads
    for key, words in (("sampler.strategy=lora", "trains replicated only"),
                       (f"eval.data={EVAL}", "task evaluation")):  # fmt: skip
        proc = _cli("validate", str(recipe), key)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr


def _rank_pid(recipe: Path, rank: int) -> int | None:
    """The pid of the training process of `rank` that trains `recipe`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(recipe).encode() in cmd and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_a_rank_that_hangs_stops_the_others_with_a_message(tiny_factory, tmp_path):
    import signal
    import time

    model = tiny_factory("llama", 4)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model, out, *CASES["full-keep"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "grass_cli", "train", str(recipe), "--no-live", "training.max_steps=100000",
           "checkpoint.interval=null", "training.eval_interval=null",
           "distributed.timeout_s=4"]  # fmt: skip
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pid = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
            (out / "metrics.jsonl").exists() and '"step"' in (out / "metrics.jsonl").read_text()
        ):
            time.sleep(0.5)
        pid = _rank_pid(recipe, 1)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # alive, but never answers again
        stopped = time.time()
        _, err = job.communicate(timeout=120)
        waited = time.time() - stopped
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.kill()
    assert job.returncode != 0
    assert "rank 0 stopped: another process of the job died or stopped answering" in err
    assert "waited up to 4 s" in err
    assert f'File "{ROOT / "grass_cli"}' not in err
    assert waited < 60
