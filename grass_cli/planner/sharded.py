"""The planner's view of a sharded run (distributed.sharding: fsdp): what one rank
holds beyond its 1/N shards, and what a machine's ranks hold together.

planner/memory.py divides weights, gradients and optimizer state by the number of
shards; this module adds the rest: FSDP2's gathered weights and a block's whole
gradient before its reduce-scatter.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class Gathered:
    """What FSDP2 holds whole on a rank beyond its shards, in bytes: the weights
    gathered at the loss (`loss`: the chunked loss gathers the head after the
    forward), at the head's backward (`head`: the plain loss's) and at a block's
    (`blocks`), and the largest trained unit's gradient before its reduce-scatter
    (`reduce`)."""

    loss: int = 0
    head: int = 0
    blocks: int = 0
    reduce: int = 0


def sharding_extra(
    lay: Layout, trained: list[GroupShape], gbytes: int, device: str, chunked: bool = False
) -> Gathered:
    """A sharded rank's working set beyond its shards. The gathered weights, in the
    compute dtype (bf16 on CUDA), always include the root unit (the final norm, and
    tied embeddings and head). With it: `chunked` (a frozen head, sharding.
    gather_head), the head at the loss, not again in backward; else the head (a
    unit of its own unless tied) and the last block, prefetched, at the head's
    backward; and at a block's backward that block and the next one down. The
    largest trained unit's whole gradient (`gbytes` a parameter) and the
    reduce-scatter's input copy of it (in fp32 on CUDA) exist together before it is
    reduced; tied embeddings are in the root, and training them makes the root's
    whole gradient, vocabulary-sized, the largest."""
    cw = 2 if device == "cuda" else lay.weight_bytes
    outer = units(lay)
    block = max(lay.groups[b].numel for b in lay.blocks)
    trained_units: dict[str, int] = {}
    for g in trained:  # (embed and head are units of their own when untied, else the root's)
        key = g.name if g.kind == "block" else g.kind if g.kind in outer else "root"
        trained_units[key] = trained_units.get(key, 0) + g.numel
    copy = 4 if device == "cuda" else gbytes
    head = outer["root"] + outer.get("head", 0)
    return Gathered(
        loss=head * cw if chunked else 0,
        head=0 if chunked else (head + block) * cw,
        blocks=(outer["root"] + 2 * block) * cw,
        reduce=max(trained_units.values(), default=0) * (gbytes + copy),
    )
