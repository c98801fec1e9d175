"""The planner's view of a sharded run (distributed.sharding: fsdp): what one rank
holds beyond its 1/N shards, and what a machine's ranks hold together.

planner/memory.py divides weights, gradients and optimizer state by the number of
shards; this module adds the rest: FSDP2's gathered weights and a block's whole
gradient before its reduce-scatter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grass_cli.planner.shape import GroupShape, Layout
    from grass_cli.recipe import Recipe


def shards(recipe: Recipe, world: int) -> int:
    """Into how many shards a run of `world` processes cuts each weight (0: the
    recipe replicates the model)."""
    d = recipe.distributed
    if d.sharding != "fsdp":
        return 0
    return d.shard_group_size or world


def sharding_extra(
    lay: Layout, trained: list[GroupShape], gbytes: int, device: str
) -> tuple[int, int]:
    """A sharded rank's working set beyond its shards: the gathered weights (the root
    unit, embeddings, norm and head, for the whole step; two blocks: the one computing
    and the next, prefetched), in the compute dtype (bf16 on CUDA); and the largest
    trained unit's whole gradient (`gbytes` a parameter) with the reduce-scatter's
    input copy of it (in fp32 on CUDA), which exist together before it is reduced.
    The root is a unit too: training the embeddings or head makes its whole
    gradient, vocabulary-sized, the largest."""
    cw = 2 if device == "cuda" else lay.weight_bytes
    root = sum(g.numel for g in lay.groups.values() if g.kind != "block")
    block = max(lay.groups[b].numel for b in lay.blocks)
    units = [g.numel for g in trained if g.kind == "block"]
    units.append(sum(g.numel for g in trained if g.kind in ("embed", "head", "norm")))
    copy = 4 if device == "cuda" else gbytes
    return (root + 2 * block) * cw, max(units) * (gbytes + copy)
