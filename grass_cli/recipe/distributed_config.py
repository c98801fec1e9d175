"""The recipe's distributed section: how the processes of a torchrun job share the model.

A module of its own (sections.py holds the others) because only a run under
torchrun reads it; a single process ignores it. No torch here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from grass_cli.recipe.base import Section


class DistributedConfig(Section):
    """How the processes started by torchrun hold the model (one process: ignored).

    replicate: every rank holds the whole model and the active blocks' optimizer
    state, and gradients of the trained groups are summed across ranks (today's
    data-parallel path). fsdp: every decoder block is its own FSDP2 unit (torch's
    `fully_shard`), so each rank holds 1/N of every weight, gradient and optimizer
    state; weights are gathered one block at a time for its forward and backward.
    """

    # replicate | fsdp (see docs/distributed.md for when each pays off).
    sharding: Literal["replicate", "fsdp"] = "replicate"
    # fsdp only: ranks that shard one copy of the model among them; the copies are
    # replicated across the groups (hybrid sharding: e.g. 8 on 8-GPU nodes shards
    # inside a node and only all-reduces across nodes). null: every rank shards.
    shard_group_size: int | None = Field(None, ge=1)
    # fsdp only: free a block's gathered weights after its forward and gather them
    # again in backward (less memory, one more all-gather per trained block).
    reshard_after_forward: bool = True
    # fsdp only: keep each rank's shards of the weights, their gradients and the
    # optimizer on the host (FSDP2's CPUOffloadPolicy; pinned on CUDA): the device
    # holds only the units being computed, their gradients until reduced, and the
    # activations, and AdamW steps on the CPU. For models whose shards alone crowd
    # the card (70B on 24 GB cards); it costs host RAM and a slower step.
    cpu_offload: bool = False
    # Seconds a rank waits in a collective for the others (either mode): a rank
    # that died or hangs makes the others stop with a message after this long
    # instead of waiting forever. Longer than the longest one-rank phase (rank 0's
    # task evaluation of a replicated run, the final save).
    timeout_s: float = Field(3600.0, gt=0)


def sharding_conflict(
    sharding: str, strategy: str, task_eval: bool, cpu_offload: bool = False
) -> str | None:
    """What a sharded run cannot do yet, as one message (None: nothing)."""
    if sharding != "fsdp":
        if cpu_offload:
            return (
                "distributed.cpu_offload is true but distributed.sharding is "
                f"{sharding}: it keeps each rank's shards on the host, so it needs "
                "distributed.sharding: fsdp (replicated runs offload optimizer state "
                "with optimizer.state_policy: offload instead)"
            )
        return None
    if strategy == "lora":
        return (
            "distributed.sharding is fsdp but sampler.strategy is lora, which grass trains "
            "replicated only: LoRA's adapters are small enough for every rank to hold; set "
            "distributed.sharding: replicate (or use a layer-wise strategy to shard)"
        )
    if task_eval:
        return (
            "distributed.sharding is fsdp but the recipe has an eval: section; task "
            "evaluation (generation) runs on one rank, which cannot hold a sharded model "
            "alone: remove eval: and score the final model with `grass eval` afterwards"
        )
    return None
