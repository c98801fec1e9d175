"""Running out of memory, host or GPU, said in one message instead of a traceback.

An allocation that fails (torch's "DefaultCPUAllocator: can't allocate memory", a
Python `MemoryError`, `torch.cuda.OutOfMemoryError`) inside a phase of a run
wrapped in `during(...)` becomes `OutOfMemory`:

    host memory ran out while evaluating after step 4 (it asked for 6.40 GB more);
    grass plan predicts 0.67 GB for this run (its largest phase, backward), and this
    process may use 2.10 GB (its address-space limit)
      hint: lower it with training.eval_batch_size; the last checkpoint step-0000002
      is intact: fix the recipe and continue with --resume auto

The phase is the innermost `during` the failure happened in: loading the model,
tokenizing, building the optimizer, probing, a step, an evaluation, a checkpoint,
the final save. Each names the recipe keys that lower what it allocates. The plan's
figure comes from the same planner as `grass plan` (config only, no weights).
Checkpoints are written into a temporary folder and renamed, so the last complete
one is never touched by a failure.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from grass_cli.errors import GrassError

if TYPE_CHECKING:
    from grass_cli.recipe import Recipe

_ASKED = re.compile(r"(?:tried to allocate|Tried to allocate) ([\d.]+) ?(bytes|[KMGT]i?B)")
_UNITS = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
          "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}  # fmt: skip

# phase kind -> the recipe keys that lower what that phase allocates
LOWER = {
    "model": "model.dtype: bfloat16 (half the weights), a smaller model, or several GPUs "
    "with distributed.sharding: fsdp",
    "data": "data.max_length, data.streaming: true (rows read as they are trained on)",
    "optimizer": "optimizer.state_policy: offload (optimizer.offload.target: disk, or "
    "optimizer.offload.host_budget for host RAM), optimizer.state_dtype: 8bit",
    "step": "training.micro_batch_size (with training.grad_accum_steps to keep the batch), "
    "data.max_length, model.gradient_checkpointing: true, a smaller sampler.gamma, "
    "optimizer.state_policy: offload",
    "eval": "training.eval_batch_size (and eval.batch_size for the task eval)",
    "save": "optimizer.offload.target: disk or optimizer.offload.host_budget (the "
    "optimizer state is copied to the host to be saved)",
}


class OutOfMemory(GrassError):
    """An allocation failed: what ran out, in which phase, against grass plan's figure."""

    exit_code = 1


def out_of_memory_kind(e: BaseException) -> tuple[str, float | None] | None:
    """("host" | "gpu", bytes it asked for, if said) when `e` is an allocation failure."""
    text = str(e)
    asked = None
    if m := _ASKED.search(text):
        asked = float(m.group(1)) * _UNITS[m.group(2)]
    if isinstance(e, MemoryError):
        return "host", asked
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return "gpu", asked
    except ImportError:
        pass
    if isinstance(e, RuntimeError):
        if "can't allocate memory" in text or "DefaultCPUAllocator" in text:
            return "host", asked
        if "CUDA out of memory" in text:
            return "gpu", asked
    # a library that cannot be mapped into the address space: memory, under another name
    if isinstance(e, (ImportError, OSError)) and (
        "failed to map segment" in text or "Cannot allocate memory" in text
    ):
        return "host", asked
    return None


@contextlib.contextmanager
def during(phase: str, kind: str, recipe: Recipe, device_type: str) -> Iterator[None]:
    """Turn an allocation failure inside the block into `OutOfMemory` for `phase`
    (`kind`: a LOWER key). Anything else passes through untouched."""
    try:
        yield
        return
    except (MemoryError, RuntimeError) as e:
        found = out_of_memory_kind(e)
        if found is None:
            raise
        where, asked = found
    # (outside the except: the failed frames and their tensors are released first)
    gc.collect()
    raise explain(where, asked, phase, kind, recipe, device_type)


def explain(
    where: str, asked: float | None, phase: str, kind: str, recipe: Recipe, device_type: str
) -> OutOfMemory:
    what = "host memory" if where == "host" else "GPU memory"
    text = f"{what} ran out while {phase}"
    if asked:
        text += f" (it asked for {asked / 1e9:.2f} GB more)"
    predicted = _predicted(recipe, "cuda" if where == "gpu" else device_type, where)
    limit = _limit(where)
    facts = [f for f in (predicted, limit) if f]
    if facts:
        text += "; " + ", and ".join(facts)
    return OutOfMemory(
        text,
        where=f"output.dir: {recipe.output.dir}",
        hint=f"lower it with {LOWER[kind]}; {_kept(Path(recipe.output.dir))}",
    )


def _predicted(recipe: Recipe, device: str, where: str) -> str | None:
    """grass plan's figure for this run: the peak of its largest phase on the device
    (host RAM, for a CPU run or a host allocation)."""
    try:
        from grass_cli.planner.memory import plan_recipe

        _, plans = plan_recipe(recipe, device=device, all_scenarios=False)
    except Exception:  # noqa: BLE001 (a hint; never a second error over the first)
        return None
    p = plans[0]
    peak = p.device_peak_bytes if where == "gpu" or device == "cpu" else p.host_bytes
    return (
        f"grass plan predicts {peak / 1e9:.2f} GB of {'GPU' if where == 'gpu' else 'host'} "
        f"memory for this run (its largest phase, {p.peak_phase})"
    )


def _limit(where: str) -> str | None:
    """What this process may use: its address-space limit, or the machine's memory
    (host); the device's total (GPU)."""
    try:
        if where == "gpu":
            import torch

            total = torch.cuda.mem_get_info()[1]
            return f"the GPU has {total / 1e9:.2f} GB"
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            return f"this process may use {soft / 1e9:.2f} GB (its address-space limit)"
        import psutil

        vm = psutil.virtual_memory()
        return f"this machine has {vm.total / 1e9:.2f} GB ({vm.available / 1e9:.2f} GB free)"
    except Exception:  # noqa: BLE001
        return None


def _kept(run_dir: Path) -> str:
    from grass_cli.checkpoint import find_latest

    latest = find_latest(run_dir) if run_dir.is_dir() else None
    if latest is None:
        return "no checkpoint was written yet: fix the recipe and start again"
    return (
        f"the last checkpoint {latest.name} is intact: fix the recipe and continue with "
        "--resume auto"
    )
