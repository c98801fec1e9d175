"""Data-parallel training across processes started by torchrun.

One process per device, each with a full copy of the model and of the optimizer
state. Every optimizer step, each rank runs forward/backward on its own shard of
the global batch; then the gradients of the *trainable* parameters only (the
active blocks and the always-trained groups) are summed across ranks, so every
rank applies the same update and stays identical. Frozen blocks have no gradient
and cause no traffic: with `gamma` of `L` blocks active, a step moves about
`gamma / L` of a full model's gradient bytes.

No DDP module: DDP fixes the set of parameters it reduces when it is built, and
layer-wise training changes that set at every switch. `GradReducer` instead lays
out buckets for the current trainable parameters at each switch and launches one
asynchronous all-reduce per bucket from post-accumulate-grad hooks, so the
reductions overlap the rest of backward. Buckets are launched strictly in bucket
order on every rank, whatever order the hooks fire in, so the collectives always
pair up.

Without torchrun (WORLD_SIZE unset or 1) nothing here is used and training is
exactly the single-process code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from grass_cli.errors import GrassError

# Words of the errors a collective raises when another rank died or stopped
# answering (gloo: "Timed out waiting", "Connection closed by peer"; NCCL: watchdog
# timeouts and aborted communicators).
_PEER_LOST = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
              "aborted", "connection refused")  # fmt: skip


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (from torchrun's environment)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise GrassError(
            f"environment variable {name}={raw!r} is not an integer",
            hint="launch with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK",
        ) from None


def local_world() -> int:
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE; 1 alone):
    each holds its own store, data and runtime in the machine's RAM."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def from_env() -> DistInfo:
    """Rank and world size as torchrun sets them; a plain process is rank 0 of 1."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise GrassError(
            f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}",
            hint="launch with torchrun --nproc-per-node N -m grass_cli train RECIPE",
        )
    return DistInfo(rank=rank, world=world, local_rank=local)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """One CUDA device per process: rank with LOCAL_RANK k trains on cuda:k."""
    if info.enabled and device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise GrassError(
                f"LOCAL_RANK {info.local_rank} but this machine has "
                f"{torch.cuda.device_count()} CUDA devices",
                hint="use --nproc-per-node at most the number of GPUs per machine",
            )
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


_owned = False  # whether init() created the process group (and shutdown() ends it)


def init(
    info: DistInfo, device: torch.device, timeout_s: float = 3600.0, alone_too: bool = False,
    host_tensors: bool = False,
) -> None:  # fmt: skip
    """Join the process group (NCCL between CUDA devices, gloo on CPU) and wait
    for every rank: past this point, every rank has passed the start-up checks.
    A collective waits at most `timeout_s` for the other ranks. `alone_too`: a
    group of one process too (a sharded run on one device). `host_tensors`: CUDA
    collectives over host tensors too (FSDP2's CPU offload: clipping, gathering
    host shards), which go over gloo beside NCCL, as torchtune does."""
    global _owned
    if not (info.enabled or alone_too):
        return
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        both = backend == "nccl" and host_tensors
        kwargs: dict[str, Any] = {"backend": "cpu:gloo,cuda:nccl" if both else backend}
        kwargs["timeout"] = timeout
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        _owned = True
    dist.barrier()


class PeerLost(GrassError):
    """Another rank died or stopped answering while this one waited for it."""

    exit_code = 1


def peer_lost(e: BaseException, info: DistInfo, timeout_s: float) -> PeerLost | None:
    """The error a collective raised, as one message, when it means another rank
    is gone (None: some other error, left as it is)."""
    text = str(e).lower()
    if not (dist.is_available() and dist.is_initialized()) or not any(
        w in text for w in _PEER_LOST
    ):
        return None
    return PeerLost(
        f"rank {info.rank} stopped: another process of the job died or stopped answering "
        f"(a collective waited up to {timeout_s:g} s: {str(e).splitlines()[0][:160]})",
        hint="see the other ranks' output for the first error; resume with "
        "`--resume auto` once it is fixed (distributed.timeout_s sets how long ranks wait)",
    )


def shutdown() -> None:
    """Leave the process group if `init` created it (a caller's own group stays)."""
    global _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False


# ------------------------------------------------------------------ small collectives


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum across ranks (float64), or the values themselves alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when the flag is set on at least one rank (e.g. a stop request)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_error(error: str | None) -> str | None:
    """Agree on failure: every rank learns the first rank's error, if any had one.

    Used around file writes that only some ranks do, so that a full disk on rank 0
    stops every rank with the same message instead of leaving the others waiting.
    """
    errors = gather_objects(error)
    return next((e for e in errors if e), None)


class RankDisagreement(GrassError):
    """Ranks computed different values of something that must be identical."""

    exit_code = 1


def check_same(what: str, values: list[int], device: torch.device, step: int) -> None:
    """Stop every rank with one message when ranks disagree on `values`.

    The sampler's decisions must be identical everywhere (same seeded RNG, MGN
    reduced across ranks); a rank that drew different blocks would silently train
    a different model, so it is checked at every switch: two tiny all-reduces.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    t = torch.tensor(values, dtype=torch.int64, device=device)
    hi, lo = t.clone(), t.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if torch.equal(hi, lo):
        return
    per_rank = gather_objects(list(values))
    shown = "; ".join(f"rank {r}: {v}" for r, v in enumerate(per_rank))
    raise RankDisagreement(
        f"ranks disagree on {what} at step {step} ({shown}); stopped before they diverge",
        hint="every rank must run the same recipe, data files and grass/torch versions; "
        "report it as a bug if they do",
    )


# ------------------------------------------------------------------------ gradients


class _Bucket:
    __slots__ = ("params", "offsets", "numel", "dtype", "device", "buf", "copied", "work")

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.params: list[torch.nn.Parameter] = []
        self.offsets: list[int] = []
        self.numel = 0
        self.dtype = dtype
        self.device = device
        self.buf: torch.Tensor | None = None
        self.copied: set[int] = set()  # indices of params whose gradient is in buf
        self.work: Any = None

    def view(self, i: int) -> torch.Tensor:
        assert self.buf is not None
        p = self.params[i]
        return self.buf[self.offsets[i] : self.offsets[i] + p.numel()].view_as(p)


Observer = Callable[[torch.nn.Parameter, torch.Tensor], None]


class GradReducer:
    """Sums the trainable parameters' gradients across ranks, in buckets.

    Use per optimizer step: `arm()` before the backward of the step's last
    micro-batch, `finish()` after it. Each parameter's post-accumulate-grad hook
    copies its (locally accumulated) gradient into its bucket and frees the local
    gradient; a full bucket is all-reduced asynchronously while backward goes on.
    `finish()` launches what is left, waits, and makes each `p.grad` a view of the
    reduced bucket. `observe` (the importance tracker) sees every reduced gradient.

    With `keep_grads=False` (GRASS probing, where every block has a gradient) the
    reduced buckets are observed and freed as soon as the next ones are launched,
    so probing never holds the whole model's gradients, as on one process.
    """

    frees_grads = True  # (probing: the reduced buckets are freed here, not by the tracker)

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        bucket_bytes: int,
        observe: Observer | None = None,
    ) -> None:
        self.bucket_bytes = max(1, bucket_bytes)
        self.observe = observe
        # Backward reaches the last layers first: bucket in reverse parameter order.
        self._order = list(reversed(params))
        self._slot: dict[int, tuple[int, int]] = {}
        self.buckets: list[_Bucket] = []
        self.armed = False
        self.keep_grads = True
        self._next = 0  # next bucket to launch
        self._consumed = 0  # buckets already observed and freed (keep_grads=False)
        self.bytes_reduced = 0  # gradient bytes all-reduced since the last `take_bytes`
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def prepare(self, params: list[torch.nn.Parameter]) -> None:
        """Lay out buckets for the parameters trained from now on (at each switch)."""
        wanted = {id(p) for p in params}
        self.buckets, self._slot = [], {}
        current: _Bucket | None = None
        for p in self._order:
            if id(p) not in wanted:
                continue
            size = p.numel() * p.element_size()
            if (
                current is None
                or current.dtype != p.dtype
                or current.device != p.device
                or (current.numel and (current.numel * p.element_size() + size) > self.bucket_bytes)
            ):
                current = _Bucket(p.dtype, p.device)
                self.buckets.append(current)
            self._slot[id(p)] = (len(self.buckets) - 1, len(current.params))
            current.params.append(p)
            current.offsets.append(current.numel)
            current.numel += p.numel()

    def arm(self, keep_grads: bool = True) -> None:
        for b in self.buckets:
            b.buf = torch.empty(b.numel, dtype=b.dtype, device=b.device)
            b.copied, b.work = set(), None
        self._next = self._consumed = 0
        self.keep_grads = keep_grads
        self.armed = True

    def _on_grad(self, p: torch.Tensor) -> None:
        slot = self._slot.get(id(p)) if self.armed else None
        if slot is None or p.grad is None:
            return
        b = self.buckets[slot[0]]
        b.view(slot[1]).copy_(p.grad)
        p.grad = None  # the bucket holds it now
        b.copied.add(slot[1])
        self._launch_ready()

    def _launch(self, b: _Bucket) -> None:
        assert b.buf is not None
        b.work = dist.all_reduce(b.buf, async_op=True)
        self.bytes_reduced += b.buf.numel() * b.buf.element_size()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            b = self.buckets[self._next]
            if len(b.copied) < len(b.params):
                return
            self._launch(b)
            self._next += 1
            if not self.keep_grads:
                # bounded memory: finish buckets two behind the newest one
                while self._consumed < self._next - 2:
                    self._consume(self.buckets[self._consumed])
                    self._consumed += 1

    def _consume(self, b: _Bucket) -> None:
        b.work.wait()
        for i, p in enumerate(b.params):
            g = b.view(i)
            if self.observe is not None:
                self.observe(p, g)
            if self.keep_grads:
                p.grad = g
        if not self.keep_grads:
            b.buf = None

    def finish(self) -> None:
        """Launch the rest (a parameter that got no gradient counts as zeros), wait,
        and hand the reduced gradients back."""
        if not self.armed:
            return
        for b in self.buckets[self._next :]:
            assert b.buf is not None
            for i, p in enumerate(b.params):
                if i in b.copied:
                    continue
                if p.grad is not None:  # accumulated before arm(), no hook since
                    b.view(i).copy_(p.grad)
                    p.grad = None
                else:  # no gradient this step on this rank: contributes zeros
                    b.view(i).zero_()
            self._launch(b)
        self._next = len(self.buckets)
        for b in self.buckets[self._consumed :]:
            self._consume(b)
        self._consumed = len(self.buckets)
        self.armed = False

    def take_bytes(self) -> int:
        """Gradient bytes all-reduced since the last call (one step's traffic)."""
        n, self.bytes_reduced = self.bytes_reduced, 0
        return n
