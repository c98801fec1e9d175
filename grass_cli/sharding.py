"""Sharded training on torch's FSDP2 (`distributed.sharding: fsdp`): each decoder
block one `fully_shard` unit, and the block optimizer on each rank's own shards.

Layer-wise training and FSDP2 fit each other: a block is a unit, the sampler
switches blocks with `requires_grad` as it does on one process, and a frozen
unit gets no gradient and sends no reduce-scatter. Its weights are still gathered
for forward (and for backward above the lowest trained block).

What the rest of grass sees:

- `shard_model` replaces every parameter of the model with a DTensor holding
  this rank's rows (dim-0 shards, padded by FSDP2); the block map is built after
  it, so groups hold the sharded parameters.
- `local` is a parameter's (or gradient's) plain local tensor. The block
  optimizer (offload/optimizer.py) steps plain tensors that share storage with
  the local shards, so keep / drop / offload, compact moments and checkpoints
  work on shards exactly as on whole tensors: each rank holds and moves only its
  1/N of the active blocks' state.
- `ShardedGrads` takes the place of the replicated path's `GradReducer` in a
  step: FSDP2 reduce-scatters the trained blocks' gradients itself, once per
  optimizer step (earlier micro-batches accumulate unsharded, like DDP's
  no_sync); this class feeds the importance tracker each rank's local squared
  norms, which the tracker sums over the shard group, so the MGN equals the
  unsharded value.

Gradients are summed across ranks, not averaged (each rank's loss is already its
share of the global token mean), as in the replicated path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from grass_cli.distributed import DistInfo
from grass_cli.errors import GrassError
from grass_cli.recipe import DistributedConfig


@dataclass
class Sharded:
    """A sharded run's device mesh and FSDP2 units (every block, then the root)."""

    mesh: Any
    units: list[Any]

    @property
    def group(self) -> Any:
        """The process group whose ranks hold different shards of the same copy."""
        return self.mesh.get_group("shard")

    @property
    def shards(self) -> int:
        """Into how many shards each weight is cut."""
        return shard_coords(self.mesh)[1]

    @property
    def shard(self) -> int:
        """Which of them this rank holds."""
        return shard_coords(self.mesh)[0]

    @property
    def saved_shard(self) -> int | None:
        """The shard this rank writes to a checkpoint (None: a replica's rank,
        hybrid sharding, whose shard the first copy's rank writes)."""
        if "replicate" in self.mesh.mesh_dim_names and self.mesh.get_local_rank("replicate"):
            return None
        return self.shard


def shard_coords(mesh: Any) -> tuple[int, int]:
    """(this rank's shard, the number of shards) on a mesh `build_mesh` made."""
    return mesh.get_local_rank("shard"), mesh.size(mesh.mesh_dim_names.index("shard"))


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor. Looked up only once something imported
    torch.distributed.tensor (half a second of imports a single process never
    needs): a DTensor cannot exist before."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def module_class(module: torch.nn.Module) -> type:
    """A module's own class, under the class FSDP2 swaps in when it makes the module
    a unit (`FSDP<cls>`, whose bases are FSDPModule and the original class)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = type(module)
    if fsdp is not None and isinstance(module, fsdp.FSDPModule):
        return cls.__bases__[-1]
    return cls


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard as a plain tensor (sharing its storage); any other
    tensor as it is."""
    return t._local_tensor if is_sharded(t) else t


def as_float(t: torch.Tensor) -> float:
    """A scalar's value; a DTensor's (a sharded gradient norm) as the whole mesh sees it."""
    return float(t.full_tensor() if is_sharded(t) else t)


def wanted(cfg: DistributedConfig) -> bool:
    return cfg.sharding == "fsdp"


def check_launch(cfg: DistributedConfig, world: int, where: str) -> None:
    """What sharding needs from the launch, said before the model loads: torchrun
    (a mesh of one process is allowed: it runs the sharded code path on one GPU),
    and a shard group size that divides the number of processes."""
    if not wanted(cfg):
        return
    if "MASTER_ADDR" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise GrassError(
            "distributed.sharding is fsdp, which needs the processes torchrun starts",
            where=where,
            hint="launch with torchrun --nproc-per-node N -m grass_cli train RECIPE "
            "(N GPUs, or N CPU processes), or set distributed.sharding: replicate",
        )
    g = cfg.shard_group_size
    if g is not None and (g > world or world % g):
        raise GrassError(
            f"distributed.shard_group_size is {g} but the job has {world} process(es); "
            "it must divide the number of processes",
            where=where,
            hint=f"set it to a divisor of {world} (the GPUs of one node, for hybrid "
            "sharding), or null to shard across every process",
        )


def build_mesh(cfg: DistributedConfig, info: DistInfo, device: torch.device) -> Any:
    """A 1-D mesh over every rank, or (replicate, shard) for hybrid sharding."""
    from torch.distributed.device_mesh import init_device_mesh

    g = cfg.shard_group_size or info.world
    if g == info.world:
        return init_device_mesh(device.type, (info.world,), mesh_dim_names=("shard",))
    return init_device_mesh(
        device.type, (info.world // g, g), mesh_dim_names=("replicate", "shard")
    )


def mixed_precision(device: torch.device, weights: torch.dtype) -> Any:
    """On CUDA: bf16 compute on fp32 sharded weights, gradients reduced in fp32
    (the weights and the optimizer keep fp32). On the CPU: none, so a sharded run
    computes exactly what one process does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return MixedPrecisionPolicy()
    param = torch.bfloat16 if weights == torch.float32 else None
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=torch.float32)


def offload_policy(cfg: DistributedConfig, device: torch.device) -> Any:
    """FSDP2's CPUOffloadPolicy with `distributed.cpu_offload` (pinned on CUDA, so
    the copies to and from the card are asynchronous), else none."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    if not cfg.cpu_offload:
        return OffloadPolicy()
    return CPUOffloadPolicy(pin_memory=device.type == "cuda")


def shard_model(
    model: torch.nn.Module,
    layers: torch.nn.ModuleList,
    cfg: DistributedConfig,
    info: DistInfo,
    device: torch.device,
) -> Sharded:
    """`fully_shard` every block, the input embeddings and the head (each a unit of
    its own unless they are tied), then the root (the final norm, and tied
    embeddings). Gradients are summed, not averaged, across ranks. The weights move
    to the device as shards (or stay on the host, `cpu_offload`): no rank puts the
    whole model on its device.

    Why the embeddings and the head are units apart: the root's weights are
    gathered for the model's whole forward, so a root holding a vocabulary-sized
    matrix or two (1 GB each in bf16 for Llama-3-8B) would keep them gathered
    beside every block; as units of their own each is gathered only while it
    computes (the head again for the chunked loss, or for its backward)."""
    from torch.distributed.fsdp import fully_shard

    mesh = build_mesh(cfg, info, device)
    weights = next(model.parameters()).dtype
    opts = {
        "mesh": mesh,
        "reshard_after_forward": cfg.reshard_after_forward,
        "mp_policy": mixed_precision(device, weights),
        "offload_policy": offload_policy(cfg, device),
    }
    units = [fully_shard(layer, **opts) for layer in layers]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and any(p is q for p in embed.parameters() for q in head.parameters())
    if not tied:  # (tied: one weight, which must stay in one unit, the root)
        units += [fully_shard(m, **opts) for m in (embed, head) if m is not None]
    # the root: what is left (the final norm, tied embeddings and head)
    units.append(fully_shard(model, **opts))
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # (gloo has no pre-scaled sum)
    return Sharded(mesh, units)


def gather_head(
    model: torch.nn.Module, head: torch.nn.Linear
) -> tuple[torch.Tensor, torch.Tensor | None, Callable[[], None]]:
    """The head's weight and bias for the chunked loss (evaluate/loss.py), which runs
    the head after the model's forward, and what frees them. One process: as they
    are. Sharded, FSDP2 gathers a unit only inside its forward and backward hooks,
    so:

    - the head's unit is gathered here and resharded once the loss is made; its
      backward needs no weight (the chunked loss makes the hidden states' gradient
      in its forward), so the head is not gathered again;
    - the root (the final norm; tied embeddings and head) is gathered too and kept
      until FSDP2's end-of-backward callback reshards it: the loss is taken from
      the head's input, not from the root's output, so FSDP2's hook that gathers
      the root for its backward never fires, and the final norm's backward would
      read freed weights. (Without gradients, nothing runs backward: both are
      resharded once the loss is made.)"""
    if not is_sharded(head.weight):
        return head.weight, head.bias, lambda: None
    from torch.distributed.fsdp import FSDPModule

    units = [model] + ([head] if isinstance(head, FSDPModule) else [])
    for unit in units:
        unit.unshard()  # type: ignore[operator]
    backward = torch.is_grad_enabled()

    def release() -> None:
        for unit in units:
            if unit is head or not backward:
                unit.reshard()  # type: ignore[operator]

    return head.weight, head.bias, release


class ShardedGrads:
    """One step's gradients in sharded mode, with `GradReducer`'s interface.

    `arm()` before the backward of the step's last micro-batch turns FSDP2's
    reduce-scatter on (earlier ones accumulate unsharded), `finish()` after it
    counts the bytes reduced. The importance tracker reads each gradient shard as
    FSDP2 assigns it (`ImportanceTracker.observe_shards`), and while probing frees
    it right away, so probing holds one block's gradient at a time, not all of them.
    """

    frees_grads = False  # (the tracker frees each shard once it has read it)

    def __init__(self, units: list[Any]) -> None:
        self.units = units
        self._params: list[torch.nn.Parameter] = []
        self.keep_grads = True
        self.armed = False
        self.bytes_reduced = 0
        self._sync(False)

    def _sync(self, on: bool) -> None:
        for unit in self.units:
            unit.set_requires_gradient_sync(on, recurse=False)

    def prepare(self, params: list[torch.nn.Parameter]) -> None:
        """The parameters trained from now on (at each switch)."""
        self._params = list(params)

    def arm(self, keep_grads: bool = True) -> None:
        self.keep_grads = keep_grads
        self.armed = True
        self._sync(True)

    def finish(self) -> None:
        if not self.armed:
            return
        for p in self._params:
            if not p.requires_grad:
                continue
            # what each rank feeds the reduce-scatter: the whole gradient
            self.bytes_reduced += p.numel() * p.element_size()
            if not self.keep_grads:
                p.grad = None
        self.armed = False
        self._sync(False)

    def take_bytes(self) -> int:
        """Gradient bytes sent into collectives since the last call (one step's)."""
        n, self.bytes_reduced = self.bytes_reduced, 0
        return n


def sum_over(group: Any) -> Callable[[torch.Tensor], None]:
    """An in-place sum of a tensor over `group` (the tracker's squared norms)."""

    def reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, group=group)

    return reduce
