"""Memory readings for telemetry: host RSS and, on CUDA, allocated/reserved/peak."""

from __future__ import annotations

import psutil
import torch

_PROC = psutil.Process()


def memory_stats(device: torch.device) -> dict[str, int]:
    """Bytes: rss (this process), and cuda_allocated / cuda_reserved / cuda_peak on GPU."""
    stats = {"rss": _PROC.memory_info().rss}
    if device.type == "cuda":
        stats["cuda_allocated"] = torch.cuda.memory_allocated(device)
        stats["cuda_reserved"] = torch.cuda.memory_reserved(device)
        stats["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return stats
