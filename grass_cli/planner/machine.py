"""What the machine has, for the planner's verdicts: host RAM, free disk, GPU memory.

Each reading can be replaced by a figure the user gives (`--host-memory`,
`--gpu` / `--device-memory`), so a recipe can be planned here for another machine.
Nothing is allocated and no CUDA context is created by these readings beyond what
`torch.cuda.mem_get_info` needs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

# Share of the host's RAM a run may count on: the OS, the page cache and the
# user's other programs keep the rest.
HOST_USABLE = 0.9
# Share of a GPU a plan leaves free for what the planner does not model: the CUDA
# context and the caching allocator's slack.
DEVICE_SLACK = 0.1


@dataclass(frozen=True)
class HostMemory:
    """The RAM a plan is checked against, and where the figure came from."""

    total: int  # bytes
    source: str  # "this machine" | "--host-memory"

    @property
    def usable(self) -> int:
        return int(self.total * HOST_USABLE)


def host_memory(given_gb: float | None = None) -> HostMemory:
    """The RAM given in GB, else this machine's (psutil)."""
    if given_gb is not None:
        return HostMemory(int(given_gb * 1e9), "--host-memory")
    import psutil

    return HostMemory(int(psutil.virtual_memory().total), "this machine")


def runtime_bytes() -> int:
    """This process's resident memory once torch and transformers are imported: what a
    run holds before its model, data and state (a CUDA run adds CUDA's own on top)."""
    import psutil
    import torch  # noqa: F401  (what a run imports, measured as it stands)
    import transformers  # noqa: F401

    return int(psutil.Process().memory_info().rss)


def nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing parent: where a folder would be made."""
    probe = path.expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem a (maybe not yet made) folder would live on."""
    return shutil.disk_usage(nearest_existing(path)).free


def cuda_total_memory() -> int | None:
    """Total memory of the first CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(0)[1])
