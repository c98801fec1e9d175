"""The disk's speed for the offloaded state, measured once by a short probe, and the
traffic a recipe's store puts on it (`grass plan`'s disk traffic line).

A disk-backed store (optimizer.offload.target: disk, or the two-tier store's spill)
moves blocks' optimizer state through files: the planner knows how many bytes, the
disk's speed decides how long. The probe writes 128 MiB of incompressible bytes to a
file in the folder the state would go to, syncs it, asks the kernel to drop it from
the page cache, reads it back, and removes it: sequential large-block I/O, which is
how the store reads and writes (one file per weight matrix). The result is kept in
$GRASS_CACHE/disk-speed.json per filesystem, so a filesystem is probed once
(`grass plan --probe-disk` measures again; `--disk-speed GB/s` plans for another).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

PROBE_BYTES = 128 * 2**20
_BLOCK = 4 * 2**20


@dataclass(frozen=True)
class DiskSpeed:
    """Sequential read and write speed, bytes/s, and where the figure came from."""

    read_bps: float
    write_bps: float
    source: str  # "measured now under X" | "measured on DATE under X" | "--disk-speed"


def _cache_file() -> Path:
    from grass_cli.models import cache_dir

    return cache_dir() / "disk-speed.json"


def _fs_key(folder: Path) -> str:
    from grass_cli.planner.machine import nearest_existing

    return str(os.stat(nearest_existing(folder)).st_dev)


def measure(folder: Path, nbytes: int = PROBE_BYTES) -> DiskSpeed:
    """Write, sync, uncache and read back `nbytes` in `folder` (its nearest existing
    parent); the file is removed whatever happens."""
    from grass_cli.planner.machine import nearest_existing

    where = nearest_existing(folder)
    block = os.urandom(_BLOCK)  # incompressible: a compressing filesystem cannot cheat
    path = where / f".grass-disk-probe-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        t0 = time.perf_counter()
        written = 0
        while written < nbytes:
            written += os.write(fd, block)
        os.fsync(fd)
        write_s = time.perf_counter() - t0
        os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # the read must come from the disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        read = 0
        while chunk := os.read(fd, _BLOCK):
            read += len(chunk)
        read_s = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return DiskSpeed(
        read / max(read_s, 1e-9), written / max(write_s, 1e-9), f"measured now under {where}"
    )


def disk_speed(folder: Path, given_gbps: float | None = None, again: bool = False) -> DiskSpeed:
    """The speed of the disk under `folder`: given, else the cached probe of its
    filesystem, else a probe now (cached for next time)."""
    from grass_cli.atomic import write_atomic_text

    if given_gbps is not None:
        return DiskSpeed(given_gbps * 1e9, given_gbps * 1e9, "--disk-speed")
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    key = _fs_key(folder)
    got = known.get(key)
    if not again and isinstance(got, dict) and {"read_bps", "write_bps"} <= got.keys():
        source = f"measured on {got.get('date', '?')} under {got.get('folder', '?')}"
        return DiskSpeed(float(got["read_bps"]), float(got["write_bps"]), source)
    speed = measure(folder)
    known[key] = {
        "read_bps": speed.read_bps,
        "write_bps": speed.write_bps,
        "date": date.today().isoformat(),
        "folder": speed.source.removeprefix("measured now under "),
    }
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_text(cache, json.dumps(known, indent=2) + "\n")
    except OSError:
        pass  # a read-only cache: the figure is still good for this plan
    return speed


@dataclass(frozen=True)
class Traffic:
    """Bytes the store moves through the disk, and how often."""

    read: int  # bytes read per event
    written: int  # bytes written per event
    every_steps: int  # 1: every step (a disk store streamed per matrix), else a switch
    what: str  # which store and why it moves that much

    def seconds(self, speed: DiskSpeed) -> float:
        """Time for one event's reads and writes, one after the other."""
        return self.read / speed.read_bps + self.written / speed.write_bps


def traffic(recipe, lay, p) -> Traffic | None:  # noqa: ANN001 (Recipe, Layout, Plan)
    """The disk traffic of the recipe's store, or None when no state goes to disk.

    - target disk, residency step: every step reads and writes the active blocks'
      state (one matrix at a time);
    - target disk, residency interval: a switch reads the incoming blocks' state and
      writes the outgoing blocks';
    - the two-tier store: a switch reads the incoming blocks' spilled share (their
      state is on disk in the proportion the spill is of the whole store, for draws
      that do not favour recent blocks) and writes as much to make room.
    The page cache can serve reads of recently written state: these are upper bounds.
    """
    if p.state_policy != "offload" or not p.disk_bytes:
        return None
    blocks = [lay.groups[b].numel for b in lay.blocks]
    gamma = min(int(recipe.sampler.gamma), len(blocks))
    moved = int(sum(sorted(blocks, reverse=True)[:gamma]) * p.state_bytes_per_param)
    every = recipe.sampler.switch_interval
    if p.offload_target == "disk":
        if p.residency == "step":
            return Traffic(moved, moved, 1, "disk store streamed per matrix")
        return Traffic(moved, moved, every, "disk store moved per switch")
    pinned = p.host_kinds.get("store_pinned", p.host_kinds.get("store", 0))
    cold = p.disk_bytes / max(pinned + p.disk_bytes, 1)
    spilled = int(moved * cold)
    return Traffic(spilled, spilled, every, f"two-tier store, {cold:.0%} of the state on disk")
