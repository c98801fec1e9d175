"""A sharded model in and out of plain Hugging Face folders: gathered one tensor at a
time to write, and each rank reading only its own rows to load.

Writing: every rank takes part in each tensor's all-gather (`full_tensor`), in
the state dict's order; rank 0 alone writes, one safetensors file at a time, so
no rank holds more than one file's worth of weights (`shard_bytes`) plus the
tensor being gathered, never the whole model. The files are planned from the
global shapes before anything is gathered, so they carry transformers' names
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`) and a
folder written by 2 ranks is byte-identical to one written by 4.

Reading: each rank opens the files lazily and copies only the rows of each
tensor its shard holds (safetensors reads slices), so loading a checkpoint into
any number of ranks needs no gather and no rank reads a whole tensor into memory
beyond its share.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from grass_cli.atomic import describe_write_error, write_atomic_text
from grass_cli.checkpoint import WEIGHTS_FILE, WEIGHTS_INDEX
from grass_cli.errors import ModelError
from grass_cli.sharding import is_sharded, local, shard_coords

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from grass_cli.offload.optimizer import BlockAdamW

# Largest weights file of a gathered model (transformers' own default is 5 GB; a
# smaller one bounds what rank 0 holds while it writes).
SHARD_BYTES = 2 * 2**30


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The state dict's tensors in order, tied weights once (as transformers saves
    them: the first name wins, the head's tied copy is dropped)."""
    seen: set[int] = set()
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


def tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of tied copies (saved once, under the first name)."""
    kept = {name for name, _ in _named_tensors(model)}
    return set(model.state_dict(keep_vars=True)) - kept


def _plan(named: list[tuple[str, torch.Tensor]], shard_bytes: int) -> list[list[int]]:
    """Indices of `named` per file, in order, each file at most `shard_bytes`
    (a larger tensor gets a file of its own)."""
    files: list[list[int]] = [[]]
    size = 0
    for i, (_, t) in enumerate(named):
        n = t.numel() * t.element_size()
        if files[-1] and size + n > shard_bytes:
            files.append([])
            size = 0
        files[-1].append(i)
        size += n
    return files


def write_gathered(
    model: torch.nn.Module, folder: Path | None, shard_bytes: int = SHARD_BYTES
) -> str | None:
    """Gather every weight and, where `folder` is given (rank 0), write them as an HF
    weights layout there. Every rank calls it. Returns a write error's description
    instead of raising, after the last gather, so no rank is left waiting in a
    collective; the caller makes the ranks agree (distributed.first_error)."""
    named = _named_tensors(model)
    files = _plan(named, shard_bytes)
    names = (
        [WEIGHTS_FILE]
        if len(files) == 1
        else [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
    )
    error: str | None = None
    weight_map: dict[str, str] = {}
    total = 0
    for fname, indices in zip(names, files, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for i in indices:
            name, t = named[i]
            full = t.full_tensor() if is_sharded(t) else t
            if folder is not None:
                tensors[name] = full.detach().to("cpu", copy=True).contiguous()
                weight_map[name] = fname
                total += full.numel() * full.element_size()
            del full
        if folder is not None and error is None:
            try:
                save_file(tensors, str(folder / fname), metadata={"format": "pt"})
            except Exception as e:  # noqa: BLE001 (OSError or safetensors' I/O error)
                error = describe_write_error(e)
        del tensors
    if folder is not None and error is None and len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        try:
            write_atomic_text(folder / WEIGHTS_INDEX, json.dumps(index, indent=2) + "\n")
        except OSError as e:
            error = describe_write_error(e)
    return error


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: one, or the shards its index names."""
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        return [folder / WEIGHTS_FILE]
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    return [folder / f for f in sorted(set(weight_map.values()))]


def load_into_shards(model: torch.nn.Module, files: list[Path]) -> set[str]:
    """Copy each weight's rows that this rank holds from `files` into the model's
    shards (plain tensors, as buffers, whole); returns the names found."""
    params = dict(model.state_dict(keep_vars=True))
    found: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = params.get(name)
                if t is None:
                    continue
                found.add(name)
                with torch.no_grad():
                    if is_sharded(t):
                        start, rows = shard_rows(t)
                        if rows:
                            local(t).copy_(f.get_slice(name)[start : start + rows])
                    else:
                        t.copy_(f.get_tensor(name))
    return found


def shard_rows(t: DTensor) -> tuple[int, int]:
    """The first row and the number of rows of dim 0 this rank's shard holds.

    FSDP2 shards dim 0 as torch.chunk does over the mesh's shard dimension: chunks
    of ceil(n / N) rows, the last ones shorter or empty."""
    n = t.shape[0]
    coord, ranks = shard_coords(t.device_mesh)
    chunk = -(-n // ranks)
    start = min(coord * chunk, n)
    return start, min(chunk, n - start)


def resharded(
    groups: Iterator[tuple[str, list[dict]]], optimizer: BlockAdamW
) -> Iterator[tuple[str, dict]]:
    """Optimizer groups saved in N shards, cut for this rank's shards of any number.

    `groups`: per group, its state as each old shard saved it (in shard order);
    `optimizer`: the live one, whose groups hold the sharded (DTensor) parameters.
    Every row-sharded tensor (moments, fp32 masters) is joined along dim 0 and
    this rank's rows taken; scalars (AdamW's step) are the same in every shard.
    State that is not row-shaped (bitsandbytes' blockwise 8-bit) cannot be cut
    anew and is refused by the caller's world-size check before it gets here.
    """
    for name, parts in groups:
        params = optimizer.state_order(name)
        first = parts[0]
        sd = first["opt"]
        state = {}
        for i, entry in sd["state"].items():
            p = params[i]
            state[i] = {
                k: _rows_of(p, [q["opt"]["state"][i][k] for q in parts], f"{name} {k}")
                if isinstance(v, torch.Tensor) and v.dim() > 0
                else v
                for k, v in entry.items()
            }
        masters = first["master"]
        if masters is not None:
            tensors = optimizer.groups[name].tensors  # (masters follow the group's order)
            masters = [
                _rows_of(p, [q["master"][j] for q in parts], f"{name} master")
                for j, p in enumerate(tensors)
            ]
        yield name, {"opt": {**sd, "state": state}, "master": masters}


def _rows_of(p: torch.Tensor, pieces: list[torch.Tensor], what: str) -> torch.Tensor:
    if all(t.numel() == 0 for t in pieces):
        return pieces[0]  # (an offloaded or dropped master: nothing saved)
    full = torch.cat(pieces, dim=0)
    if full.shape[0] != p.shape[0]:
        raise ValueError(f"{what}: {full.shape[0]} rows saved for a weight of {p.shape[0]}")
    start, rows = shard_rows(p)
    return full[start : start + rows].clone()


def materialize(model: torch.nn.Module, device: torch.device, folder: Path) -> None:
    """A sharded model built on the meta device gets its weights: each rank
    allocates its shards on `device` and reads its own rows from `folder`'s
    safetensors files (buffers, real already, are kept)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # tied weights' modules
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, name))
    model.to_empty(device=device)  # (allocates each module's parameters apart)
    for (first, name), *others in owners.values():
        for module, other in others:  # tied again, as they were
            setattr(module, other, getattr(first, name))
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    found = load_into_shards(model, weight_files(folder))
    missing = set(model.state_dict()) - found - tied_names(model) - set(buffers)
    if missing:
        raise ModelError(
            f"the model's weights files lack {len(missing)} of its weights "
            f"(e.g. {sorted(missing)[0]})",
            where=str(folder),
            hint="point model.path at a complete folder written by save_pretrained",
        )
