"""GRASS in your own training loop: the public Python API.

    import torch
    from grass_cli import Grass

    grass = Grass(model, sampler={"gamma": 4}, optimizer={"state_policy": "offload"})
    grass.probe(batches[:4])                  # GRASS's first importance estimate
    for step, batch in enumerate(batches):
        grass.begin_step(step)                # which blocks train; their state follows
        grass.backward(model(**batch).loss)   # backward, reading each block's gradient
        torch.nn.utils.clip_grad_norm_(grass.trainable_params(), 1.0)
        grass.step(lr=1e-4)                   # AdamW on the active blocks only
        grass.zero_grad()
    grass.close()

`Grass` holds the four pieces a layer-wise loop needs and nothing else: the block
map of a causal LM (`BlockMap`), the importance tracker (`ImportanceTracker`: MGN
from gradient hooks), the sampler (`Sampler`: which blocks, when) and the block
optimizer (`BlockAdamW`: AdamW per block, its state kept, dropped or offloaded to a
store). The data, the loss, the lr schedule, clipping and logging stay yours.
`grass train` runs on these same objects (engine/loop.py calls `begin_step`,
`probing` and `step`), and so does the Hugging Face Trainer plug-in
(grass_cli/integrations/hf.py): one implementation.

Stable (semver; CHANGELOG says when it changes): the names in `grass_cli.__all__`,
the methods and properties of `Grass` without a leading underscore, `Switch`, and
the keys of `SamplerConfig` and `OptimizerConfig` (the recipe's `sampler:` and
`optimizer:` sections, docs/recipes.md). Everything else in grass_cli may change
between minor versions.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grass_cli.offload.optimizer import BlockAdamW
from grass_cli.offload.store import build_store
from grass_cli.recipe import PROBING, OptimizerConfig, SamplerConfig
from grass_cli.sampling import Sampler, build_sampler
from grass_cli.sampling.blocks import BlockMap, build_block_map
from grass_cli.sampling.importance import ImportanceTracker
from grass_cli.treefile import load_tree, save_tree

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Switch:
    """A change of the active set at `step` (what `begin_step` returns when one
    happened): the blocks now trained, the groups switched on and off, when the
    next switch may come, and the drawn blocks' lr multipliers (lr_correction)."""

    step: int
    active: list[int]
    activated: list[str]
    frozen: list[str]
    next_switch: int | None
    lr_scales: dict[int, float]


def as_section(kind: type, value: Any) -> Any:
    """A config section from a dict (validated like the recipe's) or as given."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    return kind.model_validate(dict(value))


class Grass:
    """Layer-wise training of a causal LM: GRASS (or LISA, full, static, cyclic).

    `sampler` and `optimizer` take the recipe's `sampler:` and `optimizer:` keys (a
    dict or the config object). `state_dir` is where `optimizer.offload.target:
    disk` (or a host budget's spill) writes its files. `seed` seeds the draws.
    The model's parameters are frozen here; `begin_step` switches the drawn blocks
    (and the groups in `always_train`) on.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sampler: SamplerConfig | Mapping[str, Any] | None = None,
        optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
        *,
        seed: int = 0,
        blocks_attr: str | None = None,
        state_dir: str | Path | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        scfg: SamplerConfig = as_section(SamplerConfig, sampler)
        ocfg: OptimizerConfig = as_section(OptimizerConfig, optimizer)
        if scfg.strategy == "lora":
            raise ValueError("strategy lora is peft's: wrap the model with peft instead")
        if scfg.gamma == "auto":
            raise ValueError(
                "gamma auto is chosen by the planner from a recipe (`grass plan`); "
                "give a number of blocks"
            )
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        to_disk = ocfg.state_policy == "offload" and ocfg.offload.target == "disk"
        if to_disk and state_dir is None and ocfg.offload.path is None:
            raise ValueError("optimizer.offload.target disk needs state_dir (a folder)")
        blocks = build_block_map(model, blocks_attr)
        if scfg.strategy != "full" and scfg.gamma > blocks.num_blocks:
            raise ValueError(
                f"gamma {scfg.gamma} is more than the model's {blocks.num_blocks} blocks"
            )
        tracker = ImportanceTracker(blocks.blocks, scfg.alpha, dev)
        tracker.observing = scfg.strategy == "grass"  # only grass reads it while training
        for group in blocks.groups():
            group.set_trainable(False)
        store = build_store(ocfg, dev, state_dir or ".", None, _host_budget(ocfg))
        always = blocks.always_train(scfg.train_embeddings, scfg.train_norm, scfg.train_head)
        self._attach(
            model,
            blocks,
            tracker,
            build_sampler(scfg, blocks.num_blocks, tracker, seed=seed),
            BlockAdamW(blocks.groups(), ocfg, dev, store),
            [g.name for g in always],
        )

    @classmethod
    def from_parts(
        cls,
        model: torch.nn.Module,
        block_map: BlockMap,
        tracker: ImportanceTracker,
        sampler: Sampler,
        optimizer: BlockAdamW,
        always_train: list[str],
        reducer: Any = None,
    ) -> Grass:
        """A Grass over pieces built elsewhere (the engine builds them for several
        processes: a gradient reducer, sharded weights, a run folder's store)."""
        self = cls.__new__(cls)
        self._attach(model, block_map, tracker, sampler, optimizer, always_train, reducer)
        return self

    def _attach(
        self,
        model: torch.nn.Module,
        block_map: BlockMap,
        tracker: ImportanceTracker,
        sampler: Sampler,
        optimizer: BlockAdamW,
        always_train: list[str],
        reducer: Any = None,
    ) -> None:
        self.model = model
        self.block_map = block_map
        self.tracker = tracker
        self.sampler = sampler
        self.optimizer = optimizer
        self.always_train = list(always_train)
        self.reducer = reducer
        self._names: set[str] = set()
        self._scales: dict[int, float] = {}
        self._reducer_names: set[str] | None = None

    # ------------------------------------------------------------------ a step

    def begin_step(self, step: int) -> Switch | None:
        """The sampler's blocks for `step`: a new set switches the optimizer (the
        leaving groups' state is kept, dropped or offloaded by the state policy,
        the arriving ones' created or brought back). Returns the switch, if any."""
        active = self.sampler.active(step)
        names = {f"block.{i}" for i in active} | set(self.always_train)
        scales = self.sampler.lr_scales  # (a redraw of the same blocks can change them)
        upcoming = self.sampler.next_switch(step)
        switch = None
        if names != self._names or scales != self._scales:
            activated, frozen = self.optimizer.set_active(names)
            self._names, self._scales = names, dict(scales)
            switch = Switch(step, active, activated, frozen, upcoming, dict(scales))
        ahead = self.optimizer.stage_steps
        if ahead and upcoming is not None and upcoming - step == ahead:
            # the two-tier store starts reading the next interval's blocks from disk
            self.optimizer.stage({f"block.{i}" for i in self.sampler.upcoming(upcoming)})
        if self.reducer is not None and names != self._reducer_names:
            self.reducer.prepare(self.optimizer.trainable_params())
            self._reducer_names = names
        return switch

    def backward(self, loss: torch.Tensor, loss_scale: float = 1.0) -> None:
        """`loss.backward()`, with the blocks' gradient norms read on the way as one
        importance observation. `loss_scale`: what this micro-batch's mean loss was
        multiplied by (1/k for one of k accumulated micro-batches), so that the
        observation is the gradient of the micro-batch's own mean loss."""
        self.tracker.begin_micro_batch(loss_scale)
        loss.backward()
        self.tracker.end_micro_batch()

    def step(self, lr: float) -> None:
        """AdamW on every active group at `lr` (times a drawn block's lr_correction
        multiplier, if on)."""
        self.optimizer.step(lr, {f"block.{i}": v for i, v in self.sampler.lr_scales.items()})

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def trainable_params(self) -> list[torch.nn.Parameter]:
        """The parameters trained now (what to clip)."""
        return self.optimizer.trainable_params()

    # ----------------------------------------------------------------- probing

    def probing(
        self,
        batches: Iterable[Batch | list[Batch]],
        autocast: str = "none",
    ) -> Iterator[float]:
        """GRASS probing, lazily: a forward and backward per item of `batches` (a
        batch, or a list of micro-batches making one step) through every block with
        no update, activation checkpointing on; yields each step's loss. When it is
        exhausted the tracker holds every block's MGN and the model is as before."""
        from grass_cli.model_memory import checkpointed
        from grass_cli.sampling.probing import probe_blocks

        steps = ([b] if isinstance(b, Mapping) else list(b) for b in batches)
        with checkpointed(self.model):
            yield from probe_blocks(
                self.model,
                self.block_map,
                self.tracker,
                steps,
                self.optimizer.device,
                autocast,
                reducer=self.reducer,
            )

    def probe(self, batches: Iterable[Batch | list[Batch]], autocast: str = "none") -> list[float]:
        """Probe on `batches` (strategies grass and grass-static; the others draw
        without importance and need none); returns the losses."""
        if self.sampler.cfg.strategy not in PROBING:
            raise ValueError(f"strategy {self.sampler.cfg.strategy} does not probe")
        return list(self.probing(batches, autocast))

    # -------------------------------------------------------------- reading

    @property
    def active(self) -> list[int]:
        """The blocks trained now (their indices in the block map)."""
        return sorted(int(n.split(".")[1]) for n in self._names if n.startswith("block."))

    @property
    def importance(self) -> list[float | None]:
        """Each block's MGN (None: never observed)."""
        return self.tracker.values()

    @property
    def probabilities(self) -> list[float]:
        """Each block's probability in the next draw."""
        return self.sampler.probabilities()

    # ------------------------------------------------------------ saving state

    def state_dict(self) -> dict[str, Any]:
        """The sampler's and tracker's state and the active groups, as plain data
        (tensors, lists, numbers): what `save` writes besides the optimizer."""
        return {
            "sampler": self.sampler.state_dict(),
            "tracker": self.tracker.state_dict(),
            "active": sorted(self._names),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.tracker.load_state_dict(state["tracker"])
        self._names = set(state["active"])
        self._scales = dict(self.sampler.lr_scales)

    def save(self, folder: str | Path) -> Path:
        """Everything to continue exactly: `grass.json/.safetensors` (state_dict) and
        `optimizer/NAME.*` per group (offloaded groups read back one at a time). JSON
        and safetensors only: loading it runs no code. Written into a new hidden
        sibling and renamed into place, so a crash leaves the previous save whole; an
        existing folder is replaced only if it holds such a save."""
        folder = Path(folder)
        if folder.exists() and not (folder / "grass.json").exists():
            raise FileExistsError(f"{folder} exists and is not a GRASS state folder")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
        try:
            (tmp / "optimizer").mkdir()
            names = []
            for name, group in self.optimizer.export_groups():
                save_tree(tmp / "optimizer" / name, group)
                names.append(name)
            (tmp / "optimizer" / "index.json").write_text(json.dumps({"groups": names}))
            save_tree(tmp / "grass", self.state_dict())
            old = None
            if folder.exists():  # (ours: moved aside, removed once the new one is in)
                old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
                folder.rename(old / "state")
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old)
        return folder

    def load(self, folder: str | Path) -> None:
        """Restore what `save` wrote into this Grass (built the same way, over the
        same model with its weights restored)."""
        folder = Path(folder)
        state = load_tree(folder / "grass")
        names = json.loads((folder / "optimizer" / "index.json").read_text())["groups"]
        groups = ((n, load_tree(folder / "optimizer" / n)) for n in names)
        self.optimizer.import_groups(groups, active=set(state["active"]))
        self.load_state_dict(state)

    def close(self) -> None:
        """Close the state store (its files and pinned memory) and remove the hooks."""
        if self.optimizer.store is not None:
            self.optimizer.store.close()
        self.tracker.remove_hooks()


def _host_budget(cfg: OptimizerConfig) -> int | None:
    """optimizer.offload.host_budget in bytes: GB, or a share of this machine's RAM.
    `auto` is the planner's choice from a whole recipe (`grass train`); here, without
    one, it means no bound: every offloaded chunk stays in host memory."""
    b = cfg.offload.host_budget
    if cfg.state_policy != "offload" or cfg.offload.target != "cpu" or b in (None, "auto"):
        return None
    if isinstance(b, str):  # "40%"
        from grass_cli.planner.machine import host_memory

        return int(host_memory().total * float(b[:-1]) / 100)
    return int(b * 1e9)
