"""A recipe's plans with what only a machine decides resolved first: sampler.gamma:
auto (the most blocks that fit) and the two-tier store's pinned budget (what the
host's RAM leaves). `grass plan` and the planner's callers come through here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from grass_cli.planner.memory import Plan, plan, recipe_scenario, scenarios
from grass_cli.planner.shape import Layout, build_layout, load_config
from grass_cli.recipe import Recipe

if TYPE_CHECKING:
    from grass_cli.planner.machine import HostMemory


def plan_resolved(
    recipe: Recipe,
    model_config: str | None = None,
    device: str | None = None,
    device_memory_gb: float | None = None,
    all_scenarios: bool = True,
    flag: bool = False,
    host: HostMemory | None = None,
    beside: tuple[int, int] | None = None,
    shards: int = 0,
    local: int = 1,
) -> tuple[Recipe, Layout, list[Plan]]:
    """Plans for every scenario (or the recipe's own), and the recipe they planned:
    sampler.gamma: auto resolved for the device memory given (else this machine's
    card), and with `host`, the two-tier store's pinned budget for that RAM. `flag`:
    the caller offers --model-config (its hints may name it). `beside`: (dataset,
    runtime) bytes, measured once by a caller that judges the host with them too.
    `shards`: plan one rank of a sharded run (planner/sharded.py); `local`: the
    processes of a machine, which share its RAM."""
    from grass_cli.planner.auto import needs_resolving, resolve_gamma
    from grass_cli.planner.verdict import judge

    config, name = load_config(recipe, model_config, flag=flag)
    lay = build_layout(recipe, config, name)
    if device is None:
        device = "cpu" if recipe.training.device == "cpu" else "cuda"
    budget = None if device_memory_gb is None else int(device_memory_gb * 1e9)
    if needs_resolving(recipe):
        from grass_cli.planner.machine import cuda_total_memory

        total = budget
        if total is None and device == "cuda":
            total = cuda_total_memory()
        recipe = resolve_gamma(recipe, device, total, lay=lay)
    if host is not None:
        from grass_cli.planner.machine import runtime_bytes
        from grass_cli.planner.tiers import resolve_budget
        from grass_cli.planner.verdict import dataset_bytes

        data, runtime = beside or (dataset_bytes(recipe), runtime_bytes())
        recipe = resolve_budget(recipe, lay, device, host, data, runtime, local, shards)
    chosen = scenarios(recipe) if all_scenarios else [recipe_scenario(recipe)]
    if shards:  # (LoRA trains replicated only)
        chosen = [sc for sc in chosen if sc.strategy != "lora"]
    plans = [plan(recipe, lay, sc, device, shards=shards) for sc in chosen]
    return recipe, lay, [judge(p, recipe, lay, budget) for p in plans]
