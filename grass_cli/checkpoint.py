"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a folder `RUN_DIR/checkpoints/step-NNNNNNN/` holding:

- the model as an HF folder (config, model.safetensors, tokenizer), so `grass eval`
  and transformers load it as is (a model larger than `MODEL_SHARD_SIZE` is split
  into `model-0000i-of-0000N.safetensors` shards and `model.safetensors.index.json`;
  restore reads either layout); LoRA runs save it with the adapters merged and
  add `adapter/` (peft's format), which is what a resume restores: their base
  weights never change and are read again from `model.path`;
- `optimizer/`: one file per group with its AdamW state and fp32 masters,
  offloaded ones included (read back from the store one group at a time, so
  saving never holds every group's state in memory at once), and `index.pt`
  (the group order and the active groups);
- `trainer.pt`: step, data position, sampler and importance state, the loss curve
  so far, the metrics.jsonl offset, and the Python / NumPy / torch / CUDA RNG;
- `manifest.json`: the SHA-256 of every file, so a damaged checkpoint is detected
  and refused instead of loaded.

It is written into a temporary sibling folder and renamed into place, then
`checkpoints/latest` (a one-line pointer, itself replaced atomically) is updated,
then older checkpoints beyond `keep_last` are removed. A crash or a full disk at
any point leaves the previous checkpoint and pointer intact.

Data-parallel runs: the model and optimizer state are replicated (every rank
applies the same reduced gradients), so rank 0 writes them once; each rank adds
`rank-NNNNN.pt` with its own RNG state, and on resume rebuilds its own offload
store from `optimizer/`. The manifest records the world size, and a resume
with a different one is refused. The run dir must be on storage every node sees.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from grass_cli.distributed import first_error
from grass_cli.errors import GrassError
from grass_cli.models import quiet_stderr

if TYPE_CHECKING:
    from grass_cli.engine import Run

FORMAT = 1
CKPT_DIR = "checkpoints"
OPT_DIR = "optimizer"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Largest model shard in a checkpoint (transformers' `max_shard_size`: "5GB" or a
# byte count); None: transformers' own default. A module constant so tests can
# force a sharded checkpoint with a tiny model.
MODEL_SHARD_SIZE: int | str | None = None


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CKPT_DIR


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save


def _describe(e: OSError) -> str:
    return "disk full" if e.errno == errno.ENOSPC else f"cannot write ({e.strerror or e})"


def save_checkpoint(run: Run, step: int, trainer: dict[str, Any], keep_last: int) -> Path:
    """Write a checkpoint after `step` optimizer steps; returns its folder.

    Every rank of a data-parallel run calls it; they agree on failure after each
    phase, so a full disk stops all of them with the same message."""
    root = checkpoint_root(run.run_dir)
    name = f"step-{step:07d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    info = run.dist
    error: str | None = None
    if info.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            error = _describe(e)
    error = first_error(error)
    if error is None and info.enabled:
        try:
            torch.save({"rng": rng_state(run.device)}, tmp / f"rank-{info.rank:05d}.pt")
        except OSError as e:
            shared = "" if tmp.is_dir() else " (is output.dir on storage every node sees?)"
            error = f"rank {info.rank}: {_describe(e)}{shared}"
        error = first_error(error)
    if error is None and info.is_main:
        try:
            _write_main(run, tmp, final, step, trainer)
            _write_atomic_text(root / "latest", name + "\n")
        except OSError as e:
            error = _describe(e)
    error = first_error(error)
    if error is not None:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = find_latest(run.run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no checkpoint"
        raise GrassError(
            f"{error} while writing checkpoint {name}; {kept}",
            where=str(root),
            hint="free space (or set checkpoint.keep_last lower), then continue with "
            "`grass train RECIPE --resume auto`",
        )
    if info.is_main:
        _prune(root, keep_last)
    return final


def _write_main(run: Run, tmp: Path, final: Path, step: int, trainer: dict[str, Any]) -> None:
    """Rank 0's part: model, optimizer, trainer state, manifest; then the rename."""
    with quiet_stderr():  # transformers' "Writing model shards" bar
        if run.peft_model is not None:  # merged HF model + adapter/
            from grass_cli import lora

            lora.save(run.peft_model, tmp)
        else:
            shard = {} if MODEL_SHARD_SIZE is None else {"max_shard_size": MODEL_SHARD_SIZE}
            run.model.save_pretrained(tmp, safe_serialization=True, **shard)
        run.tokenizer.save_pretrained(tmp)
    opt_dir = tmp / OPT_DIR
    opt_dir.mkdir()
    names = []
    for name, state in run.optimizer.export_groups():
        torch.save(state, opt_dir / f"{name}.pt")
        names.append(name)
    torch.save({"groups": names, "active": sorted(run.optimizer.active)}, opt_dir / "index.pt")
    torch.save(
        {
            **trainer,
            "step": step,
            "batches": run.batches.state_dict(),
            "sampler": run.sampler.state_dict(),
            "tracker": run.tracker.state_dict(),
            "rng": rng_state(run.device),
        },
        tmp / "trainer.pt",
    )
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT,
        "step": step,
        "world_size": run.dist.world,
        "recipe": run.recipe.to_yaml(),
        "files": {str(p.relative_to(tmp)): _sha256(p) for p in files},
    }
    _write_atomic_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- load


def _damaged(what: str, path: Path) -> GrassError:
    return GrassError(
        f"damaged checkpoint: {what}",
        where=str(path),
        hint="resume from an earlier checkpoint in the same folder",
    )


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files: model.safetensors, or the shards its
    index names (transformers' layout for a model above `max_shard_size`)."""
    index = path / WEIGHTS_INDEX
    if not index.is_file():
        if not (path / WEIGHTS_FILE).is_file():
            raise _damaged(f"it holds neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX}", path)
        return [path / WEIGHTS_FILE]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise _damaged(f"{WEIGHTS_INDEX} is unreadable or has no weight_map", path) from None
    for shard in shards:
        if not isinstance(shard, str) or not (path / shard).is_file():
            raise _damaged(f"model shard {shard} (named in {WEIGHTS_INDEX}) is missing", path)
    return [path / shard for shard in shards]


def _restore_weights(run: Run, path: Path) -> None:
    """Every weight of the model from the checkpoint, one safetensors file at a time.

    A shard is copied into the model and dropped before the next is read, so
    restoring never holds more than one shard beside the model. Afterwards every
    tensor of the model's state dict must have come from some file (tied weights
    are saved once), so a shard that lost tensors is refused, not half-loaded.
    """
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in weight_files(path):
        weights = load_file(file, device="cpu")
        result = run.model.load_state_dict(weights, strict=False)
        unexpected.extend(result.unexpected_keys)
        loaded.update(set(weights) - set(result.unexpected_keys))
        del weights
    tied = {n for n, p in run.model.named_parameters(remove_duplicate=False)} - {
        n for n, p in run.model.named_parameters()
    }
    missing = set(run.model.state_dict()) - loaded - tied
    if unexpected or missing:
        raise GrassError(
            f"checkpoint weights do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})",
            where=str(path),
            hint="resume with the recipe the run was started with",
        )


def find_latest(run_dir: Path) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.exists():
        target = root / pointer.read_text(encoding="utf-8").strip()
        if target.is_dir():
            return target
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    return done[-1] if done else None


def verify(path: Path) -> dict[str, Any]:
    """Read the manifest and check every file's checksum; returns the manifest."""
    manifest_path = path / "manifest.json"
    if not path.is_dir():
        raise GrassError(
            "checkpoint not found",
            where=str(path),
            hint="pass --resume auto or the path of a checkpoint folder",
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        raise _damaged("manifest.json is missing or unreadable", path) from None
    # Every file the checkpoint was written with, model shards and their index
    # included: the manifest lists whatever the folder held when it was written.
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file() or _sha256(f) != digest:
            raise _damaged(f"{rel} is missing or does not match its checksum", path)
    return manifest


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def read_trainer(path: Path) -> dict[str, Any]:
    return _load(path / "trainer.pt")


def restore(run: Run, path: Path) -> dict[str, Any]:
    """Load a verified checkpoint into a freshly built run; returns the trainer state."""
    trainer = read_trainer(path)
    if run.peft_model is not None:
        from grass_cli import lora

        lora.load_adapter(run.peft_model, path / lora.ADAPTER_DIR, where=str(path))
    else:
        _restore_weights(run, path)
    active = set(trainer["active_names"])
    if (path / "optimizer.pt").exists():  # written before optimizer/ (one file)
        run.optimizer.import_state(_load(path / "optimizer.pt"), active=active)
    else:
        index = _load(path / OPT_DIR / "index.pt")
        groups = ((n, _load(path / OPT_DIR / f"{n}.pt")) for n in index["groups"])
        run.optimizer.import_groups(groups, active=active)
    run.batches.load_state_dict(trainer["batches"])
    run.sampler.load_state_dict(trainer["sampler"])
    run.tracker.load_state_dict(trainer["tracker"])
    if run.dist.enabled:  # each rank continues its own random streams
        own = torch.load(
            path / f"rank-{run.dist.rank:05d}.pt", map_location="cpu", weights_only=False
        )
        set_rng_state(own["rng"])
    else:
        set_rng_state(trainer["rng"])
    return trainer
