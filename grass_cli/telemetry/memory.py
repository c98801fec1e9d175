"""Memory readings for telemetry: host RSS and, on CUDA, allocated/reserved/peak."""

from __future__ import annotations

import sys

import psutil
import torch

_PROC = psutil.Process()


def memory_stats(device: torch.device) -> dict[str, int]:
    """Bytes: rss (this process, now), rss_peak (its high-water mark so far, which
    catches the peaks inside a step that `rss` at step boundaries misses), and
    cuda_allocated / cuda_reserved / cuda_peak on GPU."""
    stats = {"rss": _PROC.memory_info().rss}
    peak = _rss_peak()
    if peak:
        stats["rss_peak"] = max(peak, stats["rss"])
    if device.type == "cuda":
        stats["cuda_allocated"] = torch.cuda.memory_allocated(device)
        stats["cuda_reserved"] = torch.cuda.memory_reserved(device)
        stats["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return stats


def _rss_peak() -> int:
    """ru_maxrss in bytes (KiB on Linux, bytes on macOS); 0 where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
