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


def units(lay: Layout) -> dict[str, int]:
    """The FSDP2 units outside the blocks and their parameters, as
    sharding.shard_model makes them: the input embeddings and the head are units
    of their own unless tied; the root holds the rest (the final norm, and tied
    embeddings)."""
    g = lay.groups
    tied = "embed" in g and g["embed"].tied
    out = {"root": sum(x.numel for x in g.values() if x.kind == "norm")}
    for name in ("embed", "head"):
        if name in g:
            if tied:
                out["root"] += g[name].numel
            else:
                out[name] = g[name].numel
    return out


def sharding_extra(
    lay: Layout, trained: list[GroupShape], gbytes: int, device: str
) -> tuple[int, int]:
    """A sharded rank's working set beyond its shards: the gathered weights, in the
    compute dtype (bf16 on CUDA), at their worst: the root unit (gathered for the
    model's whole forward) with two blocks (the one computing and the next,
    prefetched), or with the head and a block (the head's backward, the last
    block prefetched); and the largest trained unit's whole gradient (`gbytes` a
    parameter) with the reduce-scatter's input copy of it (in fp32 on CUDA), which
    exist together before it is reduced. Tied embeddings are in the root, and
    training them makes the root's whole gradient, vocabulary-sized, the largest."""
    cw = 2 if device == "cuda" else lay.weight_bytes
    outer = units(lay)
    block = max(lay.groups[b].numel for b in lay.blocks)
    vocab = max(outer.get("embed", 0), outer.get("head", 0))  # (untied: units apart)
    gathered = outer["root"] + max(2 * block, vocab + block)
    unit_of = {n: n for n in outer} | {"norm": "root"}
    if "root" in outer and "embed" not in outer:
        unit_of |= {"embed": "root", "head": "root"}
    trained_units: dict[str, int] = {}
    for g in trained:
        key = g.name if g.kind == "block" else unit_of.get(g.kind, "root")
        trained_units[key] = trained_units.get(key, 0) + g.numel
    copy = 4 if device == "cuda" else gbytes
    return gathered * cw, max(trained_units.values(), default=0) * (gbytes + copy)
