"""Checkpoints: an explicit, versioned train state, written atomically and read without pickle.

A checkpoint is a folder `RUN_DIR/checkpoints/step-NNNNNNN/` holding:

- the model as an HF folder (config, safetensors weights, tokenizer), so `grass eval`
  and transformers load it as is (a model larger than `MODEL_SHARD_SIZE` is split
  into shards plus `model.safetensors.index.json`; restore reads either layout).
  LoRA runs save it with the adapters merged and add `adapter/` (peft's format),
  which is what a resume restores;
- `optimizer/`: per group its AdamW state and fp32 masters (`NAME.json` +
  `NAME.safetensors`, see grass_cli/treefile.py), offloaded groups included, read
  back from the store one group at a time; `index.json` lists the groups (none in
  a light checkpoint, `checkpoint.on_signal: light`, which says `light: true`);
- `state.json` + `state.safetensors`: the `TrainState` (step, data position,
  sampler and importance state, loss curve, metrics.jsonl offset, RNG states);
- `manifest.json`: the format version, the recipe, and the SHA-256 of every file,
  so a damaged checkpoint is refused instead of loaded.

Nothing here unpickles: JSON and safetensors only, so a crafted checkpoint cannot
run code. Format 1 (a pickled `trainer.pt`) is refused with a message naming it.

It is written into a temporary sibling folder and renamed into place, then
`checkpoints/latest` (a one-line pointer, itself replaced atomically) is updated,
then older checkpoints beyond `keep_last` are removed. A crash or a full disk at
any point leaves the previous checkpoint and pointer intact.

Data-parallel runs: rank 0 writes the model and optimizer once (they are
replicated); each rank adds `rank-NNNNN.json`/`.safetensors` with its own RNG
state. The manifest records the world size; a resume with another is refused.
Sharded runs: the model is gathered into the same HF folder, and each shard of the
optimizer state goes to `optimizer/shard-NNNNN/` (written by the rank that holds
it); such a checkpoint resumes on any number of ranks (grass_cli/sharded_io.py).
It knows nothing of the engine: it gets a `CheckpointContent`, returns a `TrainState`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from grass_cli.atomic import describe_write_error, write_atomic_text
from grass_cli.distributed import SINGLE, DistInfo, first_error
from grass_cli.errors import GrassError
from grass_cli.rng import rng_state
from grass_cli.run_state import RunState
from grass_cli.treefile import load_tree, save_tree

FORMAT = 2
CKPT_DIR = "checkpoints"
OPT_DIR = "optimizer"
STATE = "state"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Largest model shard in a checkpoint (transformers' `max_shard_size`: "5GB" or a
# byte count); None: transformers' own default. A module constant so tests can
# force a sharded checkpoint with a tiny model.
MODEL_SHARD_SIZE: int | str | None = None


@dataclass
class TrainState:
    """Everything a resume needs besides the weights and the optimizer state: the
    run's progress (the loop's own RunState, saved as it is) and the components'."""

    progress: RunState
    active_names: list[str]
    batches: dict[str, Any]  # the data stream's position
    sampler: dict[str, Any]
    tracker: dict[str, Any]  # importance (MGN) state
    rng: dict[str, Any]
    metrics_offset: int = 0  # bytes of metrics.jsonl written up to this step
    world_size: int = 1

    @property
    def step(self) -> int:
        return self.progress.step

    def to_tree(self) -> dict[str, Any]:
        """state.json's layout: the progress's fields beside the others (flat, as
        format 2 has always written them)."""
        tree = {k: v for k, v in asdict(self).items() if k != "progress"}
        return {**asdict(self.progress), **tree}

    @classmethod
    def from_tree(cls, data: dict[str, Any]) -> TrainState:
        """`to_tree`'s inverse; a field a checkpoint predates takes its default."""
        names = {f.name for f in fields(RunState)}
        progress = RunState(**{k: v for k, v in data.items() if k in names})
        return cls(progress=progress, **{k: v for k, v in data.items() if k not in names})


@dataclass
class CheckpointContent:
    """What one checkpoint holds, handed over by the engine."""

    state: TrainState
    write_model: Callable[[Path], None]  # writes the HF model + tokenizer into a folder
    optimizer_groups: Iterable[tuple[str, dict]]  # read lazily, one group at a time
    active: list[str]
    recipe_yaml: str
    # Sharded runs (distributed.sharding: fsdp): every rank writes its own shard of
    # the optimizer state, `shard` of `shards` (None: a replica of another rank's,
    # hybrid sharding), and every rank calls `gather_model` (rank 0 with the folder
    # to write, the others with None), which returns a write error's description.
    shards: int = 0
    shard: int | None = None
    gather_model: Callable[[Path | None], str | None] | None = None
    # checkpoint.on_signal: light: no optimizer state (`optimizer_groups` is empty);
    # marked in optimizer/index.json and the manifest, and resumed with fresh AdamW
    light: bool = False


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / CKPT_DIR


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: Path,
    content: CheckpointContent,
    keep_last: int,
    device: torch.device,
    info: DistInfo = SINGLE,
) -> Path:
    """Write a checkpoint of `content.state.step`; returns its folder.

    Every rank of a data-parallel run calls it; they agree on failure after each
    phase, so a full disk stops all of them with the same message."""
    root = checkpoint_root(run_dir)
    name = f"step-{content.state.step:07d}"
    final, tmp = root / name, root / f".tmp-{name}"
    error: str | None = None
    cause: GrassError | None = None
    names: list[str] = []  # the optimizer groups this rank wrote (sharded runs)
    if info.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            error = describe_write_error(e)
    error = first_error(error)
    if error is None and info.enabled:
        try:
            save_tree(tmp / f"rank-{info.rank:05d}", {"rng": rng_state(device)})
            if content.shards and content.shard is not None:
                folder = tmp / OPT_DIR / shard_dir(content.shard)
                names = _write_groups(folder, content.optimizer_groups)
        except GrassError as e:  # the state to save is bad (not the disk): said as it is
            cause, error = e, e.what
        except Exception as e:  # noqa: BLE001 (OSError or safetensors' I/O error)
            shared = "" if tmp.is_dir() else " (is output.dir on storage every node sees?)"
            error = f"rank {info.rank}: {describe_write_error(e)}{shared}"
        error = first_error(error)
    if error is None and content.gather_model is not None:  # every rank gathers
        error = first_error(content.gather_model(tmp if info.is_main else None))
    if error is None and info.is_main:
        try:
            _write_main(content, tmp, final, names)
            write_atomic_text(root / "latest", name + "\n")
        except GrassError as e:
            cause, error = e, e.what
        except Exception as e:  # noqa: BLE001
            error = describe_write_error(e)
    error = first_error(error)
    if error is not None:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if cause is not None:  # e.g. damaged offloaded state: its own message and advice
            raise cause
        previous = find_latest(run_dir)
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


def _write_main(content: CheckpointContent, tmp: Path, final: Path, names: list[str]) -> None:
    """Rank 0's part: model, optimizer, train state, manifest; then the rename.
    (Sharded: the model and the optimizer's shards, `names`, are already there.)"""
    opt_dir = tmp / OPT_DIR
    if not content.shards:
        content.write_model(tmp)
        names = _write_groups(opt_dir, content.optimizer_groups)
    index = {
        "groups": names,
        "active": sorted(content.active),
        "shards": content.shards,
        "light": content.light,
    }
    (opt_dir / "index.json").write_text(json.dumps(index), encoding="utf-8")
    save_tree(tmp / STATE, content.state.to_tree())
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "format": FORMAT,
        "step": content.state.step,
        "world_size": content.state.world_size,
        "light": content.light,
        "recipe": content.recipe_yaml,
        "files": {str(p.relative_to(tmp)): _sha256(p) for p in files},
    }
    write_atomic_text(tmp / "manifest.json", json.dumps(manifest, indent=1))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def shard_dir(shard: int) -> str:
    """The optimizer folder of one shard of a sharded run's state."""
    return f"shard-{shard:05d}"


def _write_groups(folder: Path, groups: Iterable[tuple[str, dict]]) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for name, group_state in groups:
        save_tree(folder / name, group_state)
        names.append(name)
    return names


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
    """Read the manifest, check the format and every file's checksum; returns it."""
    if not path.is_dir():
        raise GrassError(
            "checkpoint not found",
            where=str(path),
            hint="pass --resume auto or the path of a checkpoint folder",
        )
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        files = manifest["files"]
        version = manifest.get("format")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise _damaged("manifest.json is missing or unreadable", path) from None
    if version != FORMAT:
        raise GrassError(
            f"checkpoint format {version} is not supported: this grass reads format {FORMAT}"
            + (
                " (format 1 kept the trainer state as a pickle, which grass no longer loads: "
                "unpickling a file can run code)"
                if version == 1
                else ""
            ),
            where=str(path),
            hint="resume it with the grass version that wrote it, or start the run over with "
            "--overwrite",
        )
    # Every file the checkpoint was written with, model shards and their index
    # included: the manifest lists whatever the folder held when it was written.
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file() or _sha256(f) != digest:
            raise _damaged(f"{rel} is missing or does not match its checksum", path)
    return manifest


def read_state(path: Path) -> TrainState:
    """The train state of a verified checkpoint."""
    data = load_tree(path / STATE)
    try:
        return TrainState.from_tree(data)
    except TypeError:
        raise _damaged(f"{STATE}.json does not hold a train state", path) from None


def read_rank_rng(path: Path, rank: int) -> dict[str, Any]:
    """One rank's own RNG state (data-parallel checkpoints)."""
    return load_tree(path / f"rank-{rank:05d}")["rng"]


def _index(path: Path) -> dict[str, Any]:
    """optimizer/index.json, checked: its groups, shards and light mark."""
    try:
        index = json.loads((path / OPT_DIR / "index.json").read_text(encoding="utf-8"))
        groups, shards = [str(n) for n in index["groups"]], int(index.get("shards", 0))
        return {"groups": groups, "shards": shards, "light": bool(index.get("light", False))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise _damaged(f"{OPT_DIR}/index.json is missing or unreadable", path) from None


def optimizer_index(path: Path) -> tuple[list[str], int]:
    """The optimizer's group names and its number of shards (0: saved whole)."""
    index = _index(path)
    return index["groups"], index["shards"]


def is_light(path: Path) -> bool:
    """Whether the checkpoint has no optimizer state (checkpoint.on_signal: light)."""
    return _index(path)["light"]


def optimizer_groups(path: Path, shard: int | None = None) -> Iterator[tuple[str, dict]]:
    """The optimizer's groups (or one shard's of them), read one at a time as the
    caller goes."""
    names, _ = optimizer_index(path)
    folder = path / OPT_DIR if shard is None else path / OPT_DIR / shard_dir(shard)
    for name in names:
        yield name, load_tree(folder / name)


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


def restore_weights(model: torch.nn.Module, path: Path) -> None:
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
        result = model.load_state_dict(weights, strict=False)
        unexpected.extend(result.unexpected_keys)
        loaded.update(set(weights) - set(result.unexpected_keys))
        del weights
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    missing = set(model.state_dict()) - loaded - tied
    if unexpected or missing:
        raise GrassError(
            f"checkpoint weights do not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})",
            where=str(path),
            hint="resume with the recipe the run was started with",
        )
