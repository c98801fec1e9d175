"""The two-tier store: optimizer state in pinned host memory up to a byte budget, the
rest in files on disk (optimizer.offload.host_budget).

An 8B model's AdamW state for every block is 84 GB: more than the 32-64 GB of RAM a
24 GB-card workstation has, and streaming all of it from disk every step is slow. The
state in use is small: the active blocks' and the next interval's. So the hot tier
(a `CpuStore`) holds the most recently used chunks while they fit the budget, and
the least recently used are written to the cold tier (a `DiskStore`) to make room.

Host memory is the hot tier's slabs plus the cold tier's buffers in flight (writes
not yet on disk, reads not yet taken); `_make_room` keeps their sum within the
budget by evicting, then by waiting for the disk, and only a single chunk larger
than the whole budget (never kept hot) or a working set larger than it can exceed
it. Sampled blocks are known a little ahead (`Sampler.upcoming`): `stage` starts
their disk reads during the last steps of an interval, so a switch finds them in
memory. Every tier move is a copy whose completion `get` waits for, so correctness
never depends on timing; a checkpoint reads each chunk from whichever tier holds it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from grass_cli.offload.common import tensor_bytes
from grass_cli.offload.cpu_store import CpuStore, slab_bytes
from grass_cli.offload.store import DiskStore


class TieredStore:
    """Pinned host memory up to `budget` bytes, the least recently used on disk."""

    target = "tiered"

    def __init__(self, device: torch.device, budget: int, folder: Path, overlap: bool = True):
        self.device = device
        self.budget = int(budget)
        self.hot = CpuStore(device, overlap)
        self.cold = DiskStore(folder, device, overlap)
        self.lru: OrderedDict[str, int] = OrderedDict()  # hot names -> slab bytes, oldest first
        self.sizes: dict[str, int] = {}  # every stored name -> bytes
        self.in_use: set[str] = set()  # prefetched for a get: not to be evicted
        self.staged: set[str] = set()  # cold reads started ahead of a switch
        self.peak_host = 0  # the most host bytes held at once (measured, for tests)
        self.evictions = 0
        self.stage_hits = 0

    @property
    def folder(self) -> Path:
        return self.cold.folder

    def __contains__(self, name: str) -> bool:
        return name in self.sizes

    def names(self) -> list[str]:
        return list(self.sizes)

    def tier(self, name: str) -> str | None:
        """Where a chunk is: 'hot', 'cold', or None."""
        if name in self.lru:
            return "hot"
        return "cold" if name in self.sizes else None

    # ------------------------------------------------------------------ memory

    def host_bytes(self) -> int:
        """Host memory held: the hot slabs and the disk tier's buffers in flight."""
        return self.hot.host_bytes() + self.cold.buffer_bytes()

    def _note_peak(self) -> None:
        self.peak_host = max(self.peak_host, self.host_bytes())

    def _make_room(self, n: int, keep: set[str]) -> None:
        """Free host memory until `n` more bytes fit the budget: wait for writes already
        under way (an evicted slab is freed when its write ends), evict the least
        recently used chunk (not in `keep`, not in use), then give up reads staged
        ahead (they are only a hint). What is left over is the working set itself."""
        while self.host_bytes() + n > self.budget:
            if self.cold.writing_bytes():
                self.cold.drain()
                continue
            victim = next((k for k in self.lru if k not in keep and k not in self.in_use), None)
            if victim is not None:
                self._evict(victim)
                continue
            dropped = next((k for k in self.staged if k not in keep and k not in self.in_use), None)
            if dropped is None:
                return  # the working set alone exceeds the budget
            self.staged.discard(dropped)
            self.cold.cancel(dropped)

    def _evict(self, name: str) -> None:
        """A hot chunk to disk: its slab's bytes are written, then the slab is freed
        (the write keeps the bytes alive until it is on disk, counted in flight)."""
        tensors = self.hot.host_tensors(name)
        assert tensors is not None
        self.cold.put(name, tensors)
        self.hot.drop(name)
        del self.lru[name]
        self.evictions += 1

    # ------------------------------------------------------------ store API

    def put(self, name: str, tensors: list[torch.Tensor]) -> None:
        n = tensor_bytes(tensors)
        self.cold.forget(name)  # any disk copy is stale from now on
        self.staged.discard(name)
        self.in_use.discard(name)
        self.sizes[name] = n
        if n > self.budget:  # could never be hot
            if name in self.lru:
                self.hot.drop(name)
                del self.lru[name]
            self.cold.put(name, tensors)
            self._note_peak()
            return
        held = slab_bytes(tensors)  # what the hot tier's slab takes, alignment included
        self._make_room(held - self.lru.get(name, 0), keep={name})
        self.hot.put(name, tensors)
        self.lru[name] = held
        self.lru.move_to_end(name)
        self._note_peak()

    def stage(self, names: list[str]) -> None:
        """Start reading these chunks from disk now (the next interval's blocks), as
        far as the budget allows without evicting what is in use or staged."""
        for name in names:
            if self.tier(name) != "cold" or name in self.staged:
                continue
            keep = set(names) | self.staged
            self._make_room(self.sizes[name], keep=keep)
            if self.host_bytes() + self.sizes[name] > self.budget:
                return  # no room: the switch reads the rest
            self.cold.prefetch(name, self.device)
            self.staged.add(name)
            self._note_peak()

    def prefetch(self, name: str, device: torch.device) -> None:
        if name in self.lru:
            self.hot.prefetch(name, device)
            self.lru.move_to_end(name)
        elif name in self.sizes and name not in self.in_use:
            if name in self.staged:
                self.stage_hits += 1
            else:
                self._make_room(self.sizes[name], keep={name})
            self.cold.prefetch(name, device)
        else:
            return
        self.in_use.add(name)
        self._note_peak()

    def cancel(self, name: str) -> None:
        self.in_use.discard(name)
        self.staged.discard(name)
        if name in self.lru:
            self.hot.cancel(name)
        else:
            self.cold.cancel(name)

    def get(self, name: str, device: torch.device) -> list[torch.Tensor] | None:
        if name not in self.sizes:
            return None
        self.prefetch(name, device)
        if name in self.lru:
            out = self.hot.get(name, device)
        else:
            out = self.cold.get(name, device)
            self.staged.discard(name)
        self.in_use.discard(name)
        return out

    def settle(self) -> None:
        self.hot.settle()
        self.cold.settle()

    def host_tensors(self, name: str) -> list[torch.Tensor] | None:
        if name in self.lru:
            return self.hot.host_tensors(name)
        return self.cold.host_tensors(name)

    def bytes(self) -> int:
        return sum(self.sizes.values())

    def hot_bytes(self) -> int:
        """Bytes of the hot tier's slabs."""
        return sum(self.lru.values())

    def pinned_bytes(self) -> int:
        return self.hot.pinned_bytes()

    def close(self, keep: bool = False) -> None:
        self.hot.close(keep)
        self.cold.close(keep)
