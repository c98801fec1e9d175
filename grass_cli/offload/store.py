"""Offload stores: where a frozen block's optimizer state (and fp32 master weights) wait.

(`CpuStore` lives in cpu_store.py, the two-tier store in tiered.py; both are built
here by `build_store`.)

The optimizer decides *when* state moves (the `state_policy` and residency); a
store only keeps lists of tensors by group name and moves them:

- `put(name, tensors)`: take ownership of device tensors and write them out.
- `prefetch(name, device)`: start bringing them back (asynchronously if it can).
- `get(name, device)`: the tensors on the device, ready to use.

`CpuStore` keeps one reusable host slab per stored name (one flat allocation of
exactly the bytes it holds, pinned by registration when the device is CUDA), with
copies on a side stream ordered by events, so they overlap compute.
`DiskStore` writes one file per group under a folder and reads it back when needed,
so host RAM holds only the groups in use; a single background thread
does the I/O in submission order, so a read never overtakes the write before it.
Each tensor's CRC-32 is taken as it is written and checked as it is read back: a
file that changed on disk in between (a failing disk, a truncation, another process)
stops the run with one message naming it, and is never trained on. zlib's CRC runs
at several GB/s on one core and releases the GIL, in the I/O thread: its cost is
measured in benchmarks/offload_checksum.py.
Every buffer that thread touches is allocated, and finally released, by the training
thread (the I/O thread only copies bytes), so memory is owned, and measured, in one
place. Correctness never depends on timing: every `get` waits for its copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from grass_cli.errors import GrassError
from grass_cli.offload.common import Slot, tensor_bytes
from grass_cli.offload.cpu_store import CpuStore
from grass_cli.recipe import OptimizerConfig

__all__ = ["CpuStore", "DiskStore", "Store", "build_store", "tensor_bytes"]


class OffloadError(GrassError):
    """Offloaded optimizer state that cannot be trusted: a file that changed on disk
    after it was written, or one that could not be written (a full disk)."""

    exit_code = 1  # (a failure of the run, not of its input)


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())


class DiskStore:
    """One file per group; host RAM holds only what is in use."""

    target = "disk"

    def __init__(
        self, folder: Path, device: torch.device, overlap: bool = True, verify: bool = True
    ):
        self.folder = folder
        self.device = device
        self.verify = verify  # (off only to measure what the checks cost)
        self._slots: dict[str, list[Slot]] = {}
        self._sums: dict[str, list[int]] = {}  # name -> each tensor's CRC-32 as written
        self._io = ThreadPoolExecutor(max_workers=1) if overlap else None
        # name -> (its I/O job, None when done inline; the tensors it writes or fills)
        self._writes: dict[str, tuple[Future, list[torch.Tensor]]] = {}
        self._reads: dict[str, tuple[Future | None, list[torch.Tensor]]] = {}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".write-test"
            probe.write_bytes(b"0")
            probe.unlink()
        except OSError as e:
            raise GrassError(
                f"cannot write the offload folder ({e.strerror})",
                where=f"optimizer.offload.path: {folder}",
                hint="choose a writable folder with optimizer.offload.path",
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def names(self) -> list[str]:
        return list(self._slots)

    def _file(self, name: str) -> Path:
        return self.folder / f"{name}.bin"

    @staticmethod
    def check_space(folder: Path, needed: int) -> None:
        """Fail before training if the folder cannot hold every offloaded state."""
        probe = folder
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < needed * 1.05:
            raise GrassError(
                f"the offload folder needs {needed / 2**30:.2f} GiB for optimizer states but "
                f"only {free / 2**30:.2f} GiB is free",
                where=f"optimizer.offload.path: {folder}",
                hint="free space, point optimizer.offload.path at a bigger disk, or use "
                "optimizer.offload.target: cpu",
            )

    def _write(self, name: str, box: list[list[torch.Tensor]], slots: list[Slot]) -> None:
        # `box` hands the tensors over without this thread keeping a reference: the
        # training thread holds them until it sees the write done, and frees them.
        # Plain writes, not a memory map: a full disk is then an error to report, not
        # a SIGBUS when a mapped page finds no block to land in.
        host = box.pop()
        total = sum(s.nbytes for s in slots)
        path = self._file(name)
        same = path.exists() and path.stat().st_size == total
        try:
            with open(path, "r+b" if same else "wb") as f:
                for t, s in zip(host, slots, strict=True):
                    f.seek(s.offset)
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        except OSError as e:
            from grass_cli.atomic import describe_write_error

            self._sums.pop(name, None)  # (the file is not what was meant: never read)
            raise OffloadError(
                f"cannot write offloaded optimizer state ({describe_write_error(e, path)})",
                where=str(path),
                hint="free space where optimizer.offload.path points (or use "
                "optimizer.offload.target: cpu), then continue from the last checkpoint "
                "with --resume auto: checkpoints hold their own copy of the state",
            ) from None
        if self.verify:
            self._sums[name] = [_crc(t) for t in host]

    def _read_into(self, name: str, box: list[list[torch.Tensor]]) -> None:
        out = box.pop()
        slots = self._slots[name]
        total = sum(s.nbytes for s in slots)
        path = self._file(name)
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below, after the size check)
        except OSError:
            raise self._damaged(path, "the file is missing") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < total:
                raise self._damaged(path, f"the file has {size} bytes of the {total} written")
            for t, s in zip(out, slots, strict=True):
                f.seek(s.offset)
                if f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != s.nbytes:
                    raise self._damaged(path, "the file ended early")
        if self.verify and name in self._sums:
            for i, (t, want) in enumerate(zip(out, self._sums[name], strict=True)):
                if _crc(t) != want:
                    raise self._damaged(path, f"tensor {i} of {len(out)} fails its CRC-32")

    @staticmethod
    def _damaged(path: Path, why: str) -> OffloadError:
        return OffloadError(
            f"offloaded optimizer state changed on disk after it was written ({why}); "
            "the run stopped without using it",
            where=str(path),
            hint="check the disk (a failing or full disk, or another process writing "
            "there), then continue from the last checkpoint with --resume auto: "
            "checkpoints hold their own copy of the state",
        )

    def _buffers(self, name: str) -> list[torch.Tensor]:
        return [torch.empty(s.shape, dtype=s.dtype) for s in self._slots[name]]

    def _settle_writes(self, keep_newest: bool) -> None:
        """Wait for finished (and all but the newest running) writes; free their tensors."""
        running = [n for n, (f, _) in self._writes.items() if not f.done()]
        for n in running[:-1] if keep_newest else running:
            self._writes[n][0].result()
        for n, (f, _) in list(self._writes.items()):
            if f.done():
                f.result()  # a failed write surfaces here, not never
                del self._writes[n]

    def settle(self) -> None:
        """Wait for every write and free its tensors: called when the optimizer's
        step or switch ends, so no state waits in the queue through forward/backward."""
        if self._io is not None:
            self._settle_writes(keep_newest=False)

    def put(self, name: str, tensors: list[torch.Tensor]) -> None:
        self._reads.pop(name, None)
        slots, offset = [], 0
        for t in tensors:
            n = t.numel() * t.element_size()
            slots.append(Slot(t.shape, t.dtype, offset, n))
            offset += n
        self._slots[name] = slots
        host = [t.detach().to("cpu").contiguous() for t in tensors]
        if self._io is not None:
            # A pending write holds its tensors: wait for all but the newest before
            # queueing another, or a streamed step (one put per weight matrix, faster
            # than the disk) would keep the whole active set's state alive in the queue.
            self._settle_writes(keep_newest=True)
            self._writes[name] = (self._io.submit(self._write, name, [host], slots), host)
        else:
            self._write(name, [host], slots)

    def prefetch(self, name: str, device: torch.device) -> None:
        if name not in self._slots or name in self._reads:
            return
        out = self._buffers(name)
        if self._io is not None:
            self._reads[name] = (self._io.submit(self._read_into, name, [out]), out)
        else:
            self._read_into(name, [out])
            self._reads[name] = (None, out)

    def cancel(self, name: str) -> None:
        """Forget a prefetch that will not be used (its buffers are freed once read)."""
        entry = self._reads.pop(name, None)
        if entry is not None and entry[0] is not None:
            entry[0].result()  # freed here, by the thread that allocated them

    def forget(self, name: str) -> None:
        """Drop a chunk whose copy here is stale (the two-tier store holds it again):
        its write finished, its read dropped, its file removed."""
        if name in self._writes:
            self._writes.pop(name)[0].result()
        self.cancel(name)
        self._sums.pop(name, None)
        if self._slots.pop(name, None) is not None:
            self._file(name).unlink(missing_ok=True)

    def writing_bytes(self) -> int:
        """Host bytes of tensors waiting to be written."""
        return sum(tensor_bytes(t) for _, t in self._writes.values())

    def buffer_bytes(self) -> int:
        """Host bytes in flight: tensors waiting to be written, buffers read ahead."""
        return self.writing_bytes() + sum(tensor_bytes(t) for _, t in self._reads.values())

    def drain(self) -> None:
        """Wait for every write (freeing its tensors); reads ahead stay."""
        if self._io is not None:
            self._settle_writes(keep_newest=False)

    def get(self, name: str, device: torch.device) -> list[torch.Tensor] | None:
        if name not in self._slots:
            return None
        self.prefetch(name, device)
        read, out = self._reads.pop(name)
        if read is not None:
            read.result()
        return [t.to(device) for t in out]

    def host_tensors(self, name: str) -> list[torch.Tensor] | None:
        if name not in self._slots:
            return None
        if name in self._writes:
            self._writes[name][0].result()
        out = self._buffers(name)
        self._read_into(name, [out])
        return out

    def bytes(self) -> int:
        return sum(s.nbytes for slots in self._slots.values() for s in slots)

    def pinned_bytes(self) -> int:
        return 0

    def close(self, keep: bool = False) -> None:
        """Finish the I/O and (unless `keep`) remove the files. A write that failed is
        not raised again here: the run has already stopped on it (every step settles
        its writes), and closing must not hide that first error behind a second."""
        if self._io is not None:
            self._io.shutdown(wait=True)
            with contextlib.suppress(OffloadError):
                self._settle_writes(keep_newest=False)
            self._writes.clear()
            self._reads.clear()
        if not keep:
            for name in list(self._slots):
                self._file(name).unlink(missing_ok=True)
            # not empty (user files) or already gone: leave it
            with contextlib.suppress(OSError):
                self.folder.rmdir()


Store = Any  # CpuStore | DiskStore | TieredStore: put / prefetch / get / cancel / settle


def build_store(
    cfg: OptimizerConfig,
    device: torch.device,
    run_dir,
    subdir: str | None = None,
    host_budget: int | None = None,
) -> Store | None:
    """The offload store, if any. `subdir` separates the ranks of a data-parallel
    run on disk (each rank has its own store). `host_budget`: bytes the pinned store
    may hold (target cpu); given, the two-tier store spills the rest to disk."""
    if cfg.state_policy != "offload":
        return None
    folder = Path(cfg.offload.path) if cfg.offload.path else Path(run_dir) / "offload"
    if subdir:
        folder = folder / subdir
    if cfg.offload.target == "cpu" and host_budget is None:
        return CpuStore(device, overlap=cfg.offload.overlap)
    if cfg.offload.target == "cpu":
        from grass_cli.offload.tiered import TieredStore

        return TieredStore(device, host_budget, folder, overlap=cfg.offload.overlap)
    return DiskStore(folder, device, overlap=cfg.offload.overlap)
