"""`sampler.gamma: auto`: the most blocks whose plan fits the memory budget, chosen by
the planner from the model's config before anything loads.

More blocks per step means each block is updated more often: accuracy a small fixed
gamma leaves on the table when the card has room (docs/benchmarks.md). The budget
says how much memory GRASS may take for it: a number of GB, `lora` (what LoRA needs
on the same recipe: GRASS at LoRA's memory, one key), or `device` (the card less
DEVICE_SLACK, or the host's usable RAM on the CPU). The choice is deterministic, so
every rank of a torchrun job, a resume and `grass plan` arrive at the same gamma.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from grass_cli.errors import GrassError
from grass_cli.recipe import LAYERWISE, Recipe

if TYPE_CHECKING:
    from grass_cli.planner.shape import Layout


# The gamma for which a recipe's optimizer.lr is written when sampler.auto_lr is sqrt:
# the default gamma, at which the recipes' and presets' lrs were tuned.
AUTO_LR_GAMMA = 4


def needs_resolving(recipe: Recipe) -> bool:
    return recipe.sampler.gamma == "auto" and recipe.sampler.strategy in LAYERWISE


def with_gamma(recipe: Recipe, gamma: int, why: str | None = None) -> Recipe:
    """A copy of the recipe with this gamma (and `why`, if auto chose it)."""
    sampler = recipe.sampler.model_copy(update={"gamma": gamma})
    out = recipe.model_copy(update={"sampler": sampler})
    out._source = recipe.source
    out._gamma_auto = why
    return out


def lr_for_gamma(lr: float, gamma: int) -> float:
    """The lr for `gamma` blocks, given the lr for AUTO_LR_GAMMA: x sqrt(4 / gamma).

    Each step moves gamma blocks; their changes add up in the model's output, so the
    step that is right for 4 blocks overshoots for 16. The square root is what the
    GRASS study measured (docs/recipes.md): the best lr at gamma 24 was 4e-4 against
    8e-4 at gamma 4 (the rule says 3.3e-4) and full fine-tuning's, every block and the
    embeddings, 2e-4 (the rule, at 30 blocks: 2.9e-4): within 1.5x of both, where a
    fixed lr is 2x and 4x off and a linear rule (x 4 / gamma) 3x off at 24 blocks."""
    return lr * math.sqrt(AUTO_LR_GAMMA / gamma)


def auto_lr(recipe: Recipe) -> Recipe:
    """The resolved recipe with optimizer.lr scaled for its gamma (sampler.auto_lr:
    sqrt), and the scaling named in its `why`."""
    if recipe.sampler.auto_lr != "sqrt":
        return recipe
    gamma, lr = int(recipe.sampler.gamma), recipe.optimizer.lr
    new = lr_for_gamma(lr, gamma)
    optimizer = recipe.optimizer.model_copy(update={"lr": new})
    out = recipe.model_copy(update={"optimizer": optimizer})
    out._source = recipe.source
    out._gamma_auto = (
        f"{recipe._gamma_auto}; optimizer.lr {lr:.3g} x sqrt({AUTO_LR_GAMMA}/{gamma}) = {new:.3g}"
        " (sampler.auto_lr: sqrt)"
    )
    return out


def budget(recipe: Recipe, lay: Layout, device: str, device_total: int | None) -> tuple[int, str]:
    """The budget in bytes of device peak, and how to name it in messages."""
    from grass_cli.planner.machine import DEVICE_SLACK, host_memory
    from grass_cli.planner.memory import Scenario, plan

    b = recipe.sampler.memory_budget
    if not isinstance(b, str):
        return int(b * 1e9), f"sampler.memory_budget {b:g} GB"
    if b == "lora":
        p = plan(recipe, lay, Scenario("lora", "keep"), device)
        return p.device_peak_bytes, f"LoRA's {p.device_peak_bytes / 1e9:.2f} GB"
    if device == "cpu":
        host = host_memory()
        return host.usable, f"{host.source}'s usable RAM, {host.usable / 1e9:.2f} GB"
    if device_total is None:
        raise GrassError(
            "sampler.gamma is auto with sampler.memory_budget: device, but there is no CUDA "
            "device here to read the memory of",
            where="sampler.memory_budget",
            hint="give the budget in GB (sampler.memory_budget: 20), or lora; `grass plan "
            "--device-memory GB` plans for a card",
        )
    usable = int(device_total * (1 - DEVICE_SLACK))
    return usable, f"the GPU's {device_total / 1e9:.1f} GB less {DEVICE_SLACK:.0%}"


def resolve_gamma(
    recipe: Recipe,
    device: str,
    device_total: int | None = None,
    model_config: str | None = None,
    lay: Layout | None = None,
) -> Recipe:
    """The recipe with gamma: auto replaced by the most blocks that fit the budget
    (unchanged when gamma is a number or the strategy draws no blocks)."""
    if not needs_resolving(recipe):
        return recipe
    from grass_cli.planner.memory import plan, recipe_scenario
    from grass_cli.planner.shape import build_layout, load_config

    if lay is None:
        lay = build_layout(recipe, *load_config(recipe, model_config))
    limit, label = budget(recipe, lay, device, device_total)
    blocks = len(lay.blocks)
    peak = 0
    for gamma in range(blocks, 0, -1):
        r = with_gamma(recipe, gamma)
        peak = plan(r, lay, recipe_scenario(r), device).device_peak_bytes
        if peak <= limit:
            why = f"auto: the most of {blocks} blocks that fit {label} ({peak / 1e9:.2f} GB)"
            return auto_lr(with_gamma(recipe, gamma, why))
    raise GrassError(
        f"sampler.gamma is auto, but even one block needs {peak / 1e9:.2f} GB, more than {label}",
        where="sampler.gamma",
        hint="raise sampler.memory_budget, or lower what every block costs: "
        "model.gradient_checkpointing, training.micro_batch_size, data.max_length, "
        "optimizer.state_policy: offload (`grass plan` shows the parts)",
    )
