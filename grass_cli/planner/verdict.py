"""The planner's verdicts: does a plan fit the device, the host's RAM and the disk,
which part to lower when it does not, and which recipe keys lower it.

memory.py predicts bytes; this module compares them with a machine and words the
advice. The advice names what the recipe can change: the weights are only blamed
when they alone exceed the device (and bfloat16 is only suggested to a float32
model), otherwise the largest part that a key lowers is named, with the key's
current value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from grass_cli.planner.machine import HostMemory, disk_free
from grass_cli.planner.memory import Plan
from grass_cli.planner.shape import Layout
from grass_cli.recipe import LAYERWISE, Recipe

# The parts of a device peak that a recipe key can lower.
LOWERABLE = ("activations", "optimizer_state", "gradients", "step_transient")
# Measured (tracemalloc over the quickstart's 105,727 tokens): the tokenized rows
# hold 55 bytes per token in memory (Python lists of ids and labels), and a JSONL
# file has about 3.3 bytes per token.
HELD_BYTES_PER_TOKEN = 56
FILE_BYTES_PER_TOKEN = 3.3


@dataclass
class DiskNeed:
    """What a run writes, by part, and the bytes per folder."""

    final_model: int
    # one checkpoint's weights and optimizer state (written however many are alive:
    # an interrupted run writes one; a light one, checkpoint.on_signal, only weights)
    checkpoint_weights: int
    checkpoint_state: int
    checkpoints_alive: int  # kept at once (keep_last + the one being written)
    offload_store: int
    folders: dict[str, int] = field(default_factory=dict)
    # besides the weights, each model copy (final, every checkpoint) holds the config
    # and tokenizer files; and the run writes its logs (metrics, TensorBoard) and plots
    model_files: int = 0
    logs: int = 0

    @property
    def total(self) -> int:
        return sum(self.folders.values())

    def breakdown(self) -> str:
        gb = 1e9
        parts = [f"final model {self.final_model / gb:.2f}"] if self.final_model else []
        if self.checkpoints_alive:
            each = self.checkpoint_weights + self.checkpoint_state
            parts.append(
                f"{self.checkpoints_alive} checkpoint{'s' if self.checkpoints_alive > 1 else ''}"
                f" at {each / gb:.2f} each (weights {self.checkpoint_weights / gb:.2f} + "
                f"optimizer state {self.checkpoint_state / gb:.2f})"
            )
        if self.offload_store:
            parts.append(f"offloaded state {self.offload_store / gb:.2f}")
        copies = (1 if self.final_model else 0) + self.checkpoints_alive
        if self.model_files and copies:
            parts.append(f"tokenizer and config {self.model_files / gb:.3f} per model copy")
        if self.logs:
            parts.append(f"logs and plots {self.logs / gb:.3f}")
        return ", ".join(parts) or "nothing"

    def hint(self) -> str:
        """The keys that lower the largest part."""
        ckpt = self.checkpoints_alive * (self.checkpoint_weights + self.checkpoint_state)
        keys = []
        if ckpt:
            many = self.checkpoints_alive > 1
            keys.append(
                "lower checkpoint.keep_last"
                if many
                else "set checkpoint.at_end: false "
                "(the final model is still saved; an interrupted run still checkpoints)"
            )
        if self.offload_store:
            keys.append("point optimizer.offload.path at a bigger disk")
        if self.final_model:
            keys.append("set output.save_model: false")
        keys.append("or point output.dir at a bigger disk")
        return ", ".join(keys)


# Bytes a run's logs take per optimizer step: metrics.jsonl's step event (about 1 KB,
# measured) and as much again for TensorBoard's events, with room; and its plots.
LOG_BYTES_PER_STEP = 2048
PLOT_BYTES = 1 << 20


def disk_need(
    recipe: Recipe, lay: Layout, p: Plan, model_files: int = 0, steps: int = 0
) -> DiskNeed:
    """Bytes the run writes: the final model, the checkpoints alive at once (each the
    weights plus the optimizer state it must carry for an exact resume), a disk
    offload store; `model_files` (config and tokenizer) with every model copy, and the
    logs of `steps` steps with the plots."""
    weights = lay.params * lay.weight_bytes
    sbytes = p.state_bytes_per_param
    if p.strategy in LAYERWISE and p.state_policy != "drop":
        # every block ends up with state (a long run visits them all), plus the
        # always-trained groups
        blocks = [lay.groups[b].numel for b in lay.blocks]
        active = sum(blocks[: min(recipe.sampler.gamma, len(blocks))])  # the plan's draw
        state = int((sum(blocks) + p.trainable_params - active) * sbytes)
    else:
        state = int(p.trainable_params * sbytes)
    ck = recipe.checkpoint
    alive = (ck.keep_last + 1) if ck.interval else (1 if ck.at_end else 0)
    store = p.disk_bytes
    out = str(Path(recipe.output.dir))
    copies = (1 if recipe.output.save_model else 0) + alive
    per_step = LOG_BYTES_PER_STEP * (2 if recipe.output.tensorboard else 1)
    logs = steps * per_step + PLOT_BYTES
    folders = {
        out: (weights if recipe.output.save_model else 0)
        + alive * (weights + state)
        + copies * model_files
        + logs
    }
    if store:
        opt = recipe.optimizer.offload
        folder = opt.path or str(Path(recipe.output.dir) / "offload")
        folders[folder] = folders.get(folder, 0) + store
    return DiskNeed(
        final_model=weights if recipe.output.save_model else 0,
        checkpoint_weights=weights,
        checkpoint_state=state,
        checkpoints_alive=alive,
        offload_store=store,
        folders=folders,
        model_files=model_files,
        logs=logs,
    )


def disk_short(need: DiskNeed, free_given: int | None = None) -> tuple[str, int, int] | None:
    """(folder, bytes needed on its filesystem, bytes free) of the first filesystem
    the run would fill, or None when every one has room. `free_given` stands for
    another machine's disk (`grass init --disk`): every folder on one filesystem
    with that much free."""
    import os

    from grass_cli.planner.machine import nearest_existing

    if free_given is not None:
        needed = sum(need.folders.values())
        first = next(iter(need.folders), "output.dir")
        return (first, needed, free_given) if needed > free_given else None
    by_device: dict[int, tuple[str, int]] = {}
    for folder, n in need.folders.items():
        dev = os.stat(nearest_existing(Path(folder))).st_dev
        first, total = by_device.get(dev, (folder, 0))
        by_device[dev] = (first, total + n)
    for folder, needed in by_device.values():
        free = disk_free(Path(folder))
        if needed > free:
            return folder, needed, free
    return None


def dataset_bytes(recipe: Recipe) -> int:
    """Host memory of the tokenized training rows, estimated from the local files'
    sizes (a hub dataset or a stream counts as 0: its size is not known ahead)."""
    from grass_cli.data.build import train_specs

    if recipe.data.streaming:
        return 0
    total = 0
    for _, spec in train_specs(recipe.data):
        path = Path(spec if isinstance(spec, str) else spec.path).expanduser()
        if path.is_file():
            total += path.stat().st_size
    return int(total / FILE_BYTES_PER_TOKEN * HELD_BYTES_PER_TOKEN)


def host_need(p: Plan, lay: Layout, dataset: int, runtime: int) -> dict[str, int]:
    """The host RAM a run needs, by part. On a GPU: the pinned store, or for a disk
    store the page cache its working set needs (the active blocks' state, read and
    written every step), or the weights while they load, whichever is larger; then
    the tokenized data and the process itself. On the CPU the device peak is host
    memory already."""
    if p.device == "cpu":
        need = {"training peak": p.device_peak_bytes}
    else:
        # the weights pass through the host while they load; the store and the page
        # cache fill afterwards, so the larger of the two counts
        resident = {"pinned store": p.host_kinds.get("store_pinned", 0)}
        if p.offload_target == "disk":
            # (sharded: each rank reads and writes its 1/N of the active state)
            active = p.trainable_params * p.state_bytes_per_param / max(p.shards, 1)
            resident = {"page cache": int(active)}
        if p.host_kinds.get("shards_pinned"):  # distributed.cpu_offload
            resident["pinned shards"] = p.host_kinds["shards_pinned"]
        loading = p.host_kinds.get("weights_at_load", 0)
        need = resident if sum(resident.values()) >= loading else {"weights while loading": loading}
    need["dataset"] = dataset
    need["runtime"] = runtime
    return need


def judge(p: Plan, recipe: Recipe, lay: Layout, device_budget: int | None) -> Plan:
    """The device verdict: fits or not, the part to lower, and how."""
    weights = p.kinds["weights"]
    lowerable = {k: v for k, v in p.kinds.items() if k in LOWERABLE}
    p.dominant = max(lowerable, key=lambda k: lowerable[k])
    if device_budget is not None:
        p.fits = p.device_peak_bytes <= device_budget
        if weights > device_budget:
            p.dominant = "weights"
        if not p.fits:
            p.advice = advice(p, recipe, lay, device_budget)
    return p


def advice(p: Plan, recipe: Recipe, lay: Layout, budget: int) -> str:
    """What to change, for the part that dominates: worded for this recipe's values."""
    m, t, s = recipe.model, recipe.training, recipe.sampler
    over = (p.device_peak_bytes - budget) / 1e9
    if p.dominant == "weights":
        if lay.weight_bytes == 4:
            return "the weights alone are too big in float32: use model.dtype: bfloat16"
        return (
            f"the weights alone ({p.kinds['weights'] / 1e9:.2f} GB in 16 bits) exceed the "
            "device: use a bigger device or a smaller model"
        )
    lead = f"{over:.2f} GB over, mostly {p.dominant.replace('_', ' ')}: "
    if p.dominant == "activations":
        ckpt = "" if m.gradient_checkpointing else "turn on model.gradient_checkpointing, or "
        return lead + (
            f"{ckpt}lower training.micro_batch_size (now {t.micro_batch_size}, raise "
            f"training.grad_accum_steps to keep the batch) or data.max_length (now "
            f"{recipe.data.max_length})"
        )
    if p.dominant == "optimizer_state":
        if p.state_policy != "offload":
            return lead + (
                "use optimizer.state_policy: offload with optimizer.offload.residency: step"
            )
        if p.residency == "interval":
            return lead + "use optimizer.offload.residency: step (state streamed per matrix)"
        return lead + f"lower sampler.gamma (now {s.gamma})"
    if p.dominant == "gradients":
        frozen = (
            ""
            if not (s.train_embeddings or s.train_head)
            else (
                ", or freeze the embeddings and head (sampler.train_embeddings / train_head: false)"
            )
        )
        return lead + f"lower sampler.gamma (now {s.gamma}){frozen}"
    return lead + "use optimizer.offload.residency: step (steps one weight matrix at a time)"


def judge_host(p: Plan, need: dict[str, int], host: HostMemory) -> tuple[bool, str | None]:
    """Whether the host's usable RAM holds what the run needs, and what to change."""
    total = sum(need.values())
    if total <= host.usable:
        return True, None
    if p.offload_target == "cpu" and need.get("pinned store"):
        return False, (
            "the pinned store is the largest part: use optimizer.offload.target: disk "
            f"(the state then lives in files: {need['pinned store'] / 1e9:.2f} GB of disk), "
            "or optimizer.state_policy: drop (frozen blocks lose their moments)"
        )
    if "dataset" in need and need["dataset"] == max(need.values()):
        return False, "the tokenized data is the largest part: set data.streaming: true"
    return False, "use a machine with more RAM, or a smaller model"
