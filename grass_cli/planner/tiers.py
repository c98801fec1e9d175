"""The two-tier store's budget: how much of the offloaded state stays in pinned host RAM
(`optimizer.offload.host_budget`), the rest spilling to disk.

One owner for the number, used by `grass plan`, pre-flight, `grass init` and the
engine's store: a number of GB, a share of the RAM ("40%"), or `auto`: what the
run leaves of the machine's usable RAM once everything else it holds at the same
time is counted (the tokenized data, the process itself, and on the CPU the
training peak without the store). `auto` keeps every block's state in RAM when it
fits, which is today's pinned store; only a machine short of RAM spills.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from grass_cli.recipe import Recipe

if TYPE_CHECKING:
    from grass_cli.planner.machine import HostMemory
    from grass_cli.planner.shape import Layout


def applies(recipe: Recipe) -> bool:
    """A pinned store whose size a budget can bound: offload to the cpu target."""
    opt = recipe.optimizer
    return opt.state_policy == "offload" and opt.offload.target == "cpu"


def budget_bytes(recipe: Recipe, store: int, others: int, host: HostMemory) -> int | None:
    """The pinned tier's bytes; None: unbounded (every chunk pinned). `store`: the
    whole store's bytes; `others`: what the run holds in RAM beside it."""
    b = recipe.optimizer.offload.host_budget
    if b is None or not applies(recipe):
        return None
    if isinstance(b, str) and b.endswith("%"):
        return int(host.total * float(b[:-1]) / 100)
    if not isinstance(b, str):
        return int(b * 1e9)
    free = host.usable - others
    return None if store <= free else max(free, 0)


def with_budget(recipe: Recipe, budget: int | None) -> Recipe:
    """A copy of the recipe that carries its resolved budget (for the planner)."""
    out = recipe.model_copy()
    out._source = recipe.source
    out._gamma_auto = recipe._gamma_auto
    out._host_budget = budget
    return out


def resolve_budget(
    recipe: Recipe,
    lay: Layout,
    device: str,
    host: HostMemory,
    dataset: int,
    runtime: int,
    local: int = 1,
    shards: int = 0,
) -> Recipe:
    """The recipe with its pinned budget resolved against this host, from the plan of
    its unbounded store. The budget is the machine's: `local` processes of a torchrun
    job share it (each holds a store, of 1/`shards` of the state when sharded), so
    each gets its share."""
    from grass_cli.planner.memory import plan, recipe_scenario

    if not applies(recipe):
        return recipe
    p = plan(recipe, lay, recipe_scenario(with_budget(recipe, None)), device, shards=shards)
    store = p.host_kinds.get("store_pinned", 0) or p.host_kinds.get("store", 0)
    others = dataset + runtime
    if device == "cpu":
        others += p.device_peak_bytes - store  # the training peak beside the store
    total = budget_bytes(recipe, store * local, others * local, host)
    return with_budget(recipe, None if total is None else total // local)
