"""Running out of memory is one message, not a traceback: a real host allocation
failure under RLIMIT_AS (the kernel refusing the address space) in a real `grass
train`, and a real CUDA out-of-memory (CUDA-only). The message names the phase,
grass plan's figure and the keys that lower it; the last checkpoint stays intact and
resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_checkpoint import make_recipe

from grass_cli.checkpoint import find_latest, verify

ROOT = Path(__file__).resolve().parent.parent

# The limit is set after the imports (their address space is not the run's): this
# process's current size plus HEADROOM, which a tiny model's training fits in and a
# 200-row evaluation batch's logits (200 x ~40 tokens x 49k vocabulary x 4 bytes,
# about 1.6 GB) do not.
LIMITED = """
import resource, sys
import torch, transformers  # noqa: F401
import grass_cli.cli, grass_cli.engine.loop, grass_cli.preflight  # noqa: F401
import grass_cli.planner.shape, grass_cli.planner.memory, datasets  # noqa: F401
import transformers.models.llama.modeling_llama as llama
llama.LlamaForCausalLM(llama.LlamaConfig(hidden_size=8, intermediate_size=8,
    num_hidden_layers=1, num_attention_heads=1, vocab_size=8))(torch.zeros(1, 2, dtype=torch.long))
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
limit = size + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.argv = ["grass", "train", sys.argv[1], "--no-live", "--quiet", *sys.argv[3:]]
grass_cli.cli.main()
"""
HEADROOM = 600 * 2**20


def limited_train(recipe_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", LIMITED, str(recipe_file), str(HEADROOM), *args],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )  # fmt: skip


def _long_row_data(folder: Path) -> Path:
    """48 short rows and one of about 1,500 tokens. With eager attention the batch
    that holds it keeps 8 rows x 4 heads x 1,500^2 attention weights x 4 bytes (288 MB)
    per block for the backward, over 1 GB in all; the other batches need a few MB."""
    rows = [{"prompt": f"What is {i} + {i}?", "completion": str(2 * i)} for i in range(48)]
    rows.insert(20, {"prompt": "Repeat the word.", "completion": " grass" * 1500})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe_with_the_long_row_at_step(tiny_llama, tmp_path, tokenizer, at_least: int):
    """A full fine-tuning recipe (no probing: step k trains batch k) and a seed whose
    shuffle puts the long row in step `at_least` or later (found with the engine's
    own batch order); returns the recipe and that step."""
    from grass_cli.data.feed import training_batches

    train_file = _long_row_data(tmp_path)
    for seed in range(50):
        rec = make_recipe(
            tiny_llama, tmp_path / "run", strategy="full",
            model={"attn_implementation": "eager"},
            data={"train": str(train_file), "eval": None, "limit": None, "max_length": 2048},
            training={"max_steps": 6, "micro_batch_size": 8, "seed": seed,
                      "eval_interval": None},
            checkpoint={"interval": 1, "keep_last": 10},
        )  # fmt: skip
        batches, _, _ = training_batches(rec.data, tokenizer, 8, seed, with_eval=False)
        widths = [next(batches)["input_ids"].shape[1] for _ in range(6)]
        step = next(i for i, w in enumerate(widths, 1) if w > 1000)
        if step >= at_least:
            return rec, step
    raise AssertionError("no seed puts the long row late enough")


def test_a_host_allocation_failure_names_the_phase_the_plan_and_the_keys(
    tiny_llama, tokenizer, tmp_path
):
    rec, step = _recipe_with_the_long_row_at_step(tiny_llama, tmp_path, tokenizer, 3)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(rec.to_yaml())
    res = limited_train(recipe_file)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    err = res.stderr
    assert f"host memory ran out while training step {step}" in err, err
    assert "it asked for" in err and "GB more" in err
    assert "grass plan predicts" in err and "(its address-space limit)" in err
    assert "lower it with training.micro_batch_size" in err
    assert f"the last checkpoint step-{step - 1:07d} is intact" in err, err
    ckpt = find_latest(tmp_path / "run")
    assert ckpt.name == f"step-{step - 1:07d}"
    verify(ckpt)  # nothing of it lost


OUTSIDE = """
import resource, sys
import numpy, torch, transformers  # noqa: F401  (their libraries mapped first)
import grass_cli.cli, grass_cli.eval_target, grass_cli.models  # noqa: F401
from transformers import LlamaForCausalLM  # noqa: F401
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 256 * 2**20, size + 256 * 2**20))
sys.argv = ["grass", "eval", *sys.argv[1:]]
grass_cli.cli.main()
"""


def test_memory_that_runs_out_outside_a_training_phase_is_one_message(smollm2_dir, tmp_path):
    """`grass eval` of SmolLM2 (540 MB of float32 weights) with 256 MB to spare: the
    allocation fails while the model loads, outside any training phase, and is still
    one message with grass plan named."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1 + 1 =", "completion": " 2"}) + "\n")
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", OUTSIDE, str(smollm2_dir), "--data", str(data), "--out",
         str(tmp_path / "ev")],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "host memory ran out" in res.stderr and "grass plan" in res.stderr
    assert res.stderr.count("Error:") == 1


@pytest.mark.cuda
def test_a_cuda_out_of_memory_names_the_phase_and_the_plan(tiny_llama, tmp_path):
    import torch

    free, _ = torch.cuda.mem_get_info()
    rec = make_recipe(
        tiny_llama, tmp_path / "run",
        data={"eval_limit": 200},
        training={"max_steps": 4, "eval_interval": 2, "eval_batch_size": 200, "device": "cuda"},
    )  # fmt: skip
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(rec.to_yaml())
    # everything but 1 GB of the GPU taken first, by this test's own allocation
    code = (
        "import sys, torch\n"
        f"hold = torch.empty({max(free - 2**30, 0)}, dtype=torch.uint8, device='cuda')\n"
        "from grass_cli.cli import main\n"
        "sys.argv = ['grass', 'train', sys.argv[1], '--no-live', '--quiet']\n"
        "main()\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(recipe_file)], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "GPU memory ran out while evaluating after step 2" in res.stderr
    assert "grass plan predicts" in res.stderr and "the GPU has" in res.stderr
