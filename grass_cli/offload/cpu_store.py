"""The host-memory offload store: one exact-size slab per stored chunk, pinned on CUDA,
with copies on a side stream ordered by events so they overlap compute.

Split from store.py (which keeps the disk store, the shared interface and the
factory): `CpuStore` is also the hot tier of the two-tier store (tiered.py).
"""

from __future__ import annotations

import torch

from grass_cli.offload.common import tensor_bytes


def slab_bytes(tensors: list[torch.Tensor]) -> int:
    """Host bytes a slab holding these tensors takes (each 64-byte aligned)."""
    return sum(-(-t.numel() * t.element_size() // _Slab.ALIGN) * _Slab.ALIGN for t in tensors)


class _Slab:
    """One group's host copy: a single flat allocation, tensors are views into it.

    One allocation of exactly the bytes needed (each tensor 64-byte aligned), not
    one per tensor: PyTorch's pinned-memory allocator rounds every allocation up to
    a power of two, which for a 7B model's fp32 state wastes about a third of the
    host memory. On CUDA the slab is pinned by registering an ordinary allocation
    with `cudaHostRegister`, which pins exactly the bytes asked for.
    """

    ALIGN = 64

    def __init__(self, tensors: list[torch.Tensor], pin: bool):
        self.layout: list[tuple[torch.Size, torch.dtype]] = [(t.shape, t.dtype) for t in tensors]
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // self.ALIGN) * self.ALIGN
        self.nbytes = total
        self.data_bytes = tensor_bytes(tensors)
        self.raw = torch.empty(max(total, 1), dtype=torch.uint8)
        self.registered = False
        self.pinned = False
        if pin:
            self._pin()
        self.views = [
            self.raw[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for o, t in zip(offsets, tensors, strict=True)
        ]

    def _pin(self) -> None:
        try:
            err = torch.cuda.cudart().cudaHostRegister(self.raw.data_ptr(), self.raw.numel(), 0)
            self.registered = int(err) == 0
        except (AttributeError, RuntimeError):
            self.registered = False
        if not self.registered:  # fall back to the caching pinned allocator
            self.raw = self.raw.pin_memory()
        self.pinned = True

    def fits(self, tensors: list[torch.Tensor]) -> bool:
        return self.layout == [(t.shape, t.dtype) for t in tensors]

    def free(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.raw.data_ptr())
            self.registered = False
        self.views = []
        self.raw = torch.empty(0, dtype=torch.uint8)


class CpuStore:
    """Host-memory store with asynchronous device<->host copies on CUDA."""

    target = "cpu"

    def __init__(self, device: torch.device, overlap: bool = True):
        self.device = device
        self.cuda = device.type == "cuda"
        self.overlap = overlap and self.cuda
        self.stream = torch.cuda.Stream(device) if self.overlap else None
        self._host: dict[str, _Slab] = {}
        self._pending: dict[str, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self._ready: dict[str, torch.cuda.Event] = {}  # host buffer fully written

    def __contains__(self, name: str) -> bool:
        return name in self._host

    def names(self) -> list[str]:
        return list(self._host)

    def _buffers(self, name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The name's slab, reused when the layout is the same (it always is for a
        parameter's state), so the host memory is allocated once per chunk."""
        slab = self._host.get(name)
        if slab is None or not slab.fits(tensors):
            if slab is not None:
                self._wait_written(name)
                slab.free()
            slab = _Slab(tensors, pin=self.cuda)
            self._host[name] = slab
        return slab.views

    def _wait_written(self, name: str) -> None:
        event = self._ready.pop(name, None)
        if event is not None:
            event.synchronize()

    def put(self, name: str, tensors: list[torch.Tensor]) -> None:
        self._pending.pop(name, None)
        bufs = self._buffers(name, tensors)
        if self.stream is not None:
            # The side stream must see the step's writes before copying them out.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for b, t in zip(bufs, tensors, strict=True):
                    b.copy_(t, non_blocking=True)
                    t.record_stream(self.stream)  # keep t's memory until the copy ends
                event = torch.cuda.Event()
                event.record(self.stream)
            self._ready[name] = event
        else:
            for b, t in zip(bufs, tensors, strict=True):
                b.copy_(t)

    def prefetch(self, name: str, device: torch.device) -> None:
        if name not in self._host or name in self._pending:
            return
        bufs = self._host[name].views
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                out = [b.to(device, non_blocking=True) for b in bufs]
                event = torch.cuda.Event()
                event.record(self.stream)
            self._pending[name] = (out, event)
        else:
            self._pending[name] = ([b.to(device, copy=True) for b in bufs], None)

    def cancel(self, name: str) -> None:
        """Forget a prefetch that will not be used (its device copy is freed)."""
        self._pending.pop(name, None)

    def drop(self, name: str) -> None:
        """Forget a chunk and free its slab (the two-tier store moved it to disk; a
        copy still reading the slab keeps the bytes alive until it ends)."""
        self._pending.pop(name, None)
        slab = self._host.pop(name, None)
        if slab is not None:
            self._wait_written(name)
            slab.free()

    def get(self, name: str, device: torch.device) -> list[torch.Tensor] | None:
        if name not in self._host:
            return None
        self.prefetch(name, device)
        out, event = self._pending.pop(name)
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
            for t in out:
                t.record_stream(torch.cuda.current_stream(device))
        return out

    def settle(self) -> None:
        """Nothing to wait for: a device tensor being copied out is kept alive by
        `record_stream` and the host slab is reused, so no buffer lingers."""

    def host_tensors(self, name: str) -> list[torch.Tensor] | None:
        """The stored tensors on the host (waits for pending writes), for checkpoints."""
        if name not in self._host:
            return None
        event = self._ready.get(name)
        if event is not None:
            event.synchronize()
        return self._host[name].views

    def bytes(self) -> int:
        """Bytes of state held (what the host buffers store)."""
        return sum(s.data_bytes for s in self._host.values())

    def host_bytes(self) -> int:
        """Bytes the host buffers occupy (alignment included)."""
        return sum(s.nbytes for s in self._host.values())

    def pinned_bytes(self) -> int:
        """Page-locked host bytes (CUDA only): at most 1.05x `bytes()`."""
        return sum(s.raw.numel() for s in self._host.values() if s.pinned)

    def close(self, keep: bool = False) -> None:
        if self.stream is not None:
            self.stream.synchronize()
        self._pending.clear()
        for slab in self._host.values():
            slab.free()
        self._host.clear()
