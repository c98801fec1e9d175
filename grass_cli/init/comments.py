"""The comments of a `grass init` recipe: why each value, with the figures it came
from, so a reader can change one choice knowing what it trades."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grass_cli.init import InitOptions
    from grass_cli.init.choose import Budget, Choice
    from grass_cli.init.inputs import DataInfo, ModelInfo

GB = 1e9


def explain(
    o: InitOptions,
    m: ModelInfo,
    d: DataInfo,
    b: Budget,
    c: Choice,
    held: int,
    train_rows: int,
    steps: int,
) -> tuple[dict[str, str], list[str]]:
    """(dotted key -> comment, the header lines)."""
    r, p = c.recipe, c.plan
    k = p.kinds
    host = sum(c.host_need.values())
    header = [
        f"Written by `grass init {o.model} {o.data}`: {o.strategy} on {b.device_label}.",
        f"The planner's figures for it: {p.device_peak_bytes / GB:.2f} GB peak on the "
        f"{'GPU' if b.device is not None else 'host'} (weights {k['weights'] / GB:.2f}, "
        f"activations {k['activations'] / GB:.2f}, gradients {k['gradients'] / GB:.2f}, "
        f"optimizer state {k['optimizer_state'] / GB:.2f}), about {host / GB:.2f} GB of host "
        f"RAM and {c.disk_total / GB:.2f} GB of disk.",
        *[n[0].upper() + n[1:] + "." for n in c.notes],
        "",
        "  grass plan {this file}     # every strategy's memory, and the verdicts",
        "  grass validate {this file} # data, model, folders, disk, RAM: no weights loaded",
        "  grass train {this file}",
    ]
    why: dict[str, str] = {}
    source = "its preset" if m.preset else f"the nearest preset in size, {m.guide.name}"
    why["model.path"] = (
        f"{m.preset.title}, downloaded from {m.preset.hub_id} on the first train"
        + (
            " (gated: accept its licence on the hub, then `hf auth login`)"
            if m.preset.gated
            else ""
        )
        if m.preset
        else f"{m.params / GB:.2f}B parameters, {m.blocks} blocks"
    )
    if r["model"]["dtype"] == "bfloat16":
        why["model.dtype"] = "2 bytes per weight; AdamW keeps fp32 masters of what it steps"
    why["model.gradient_checkpointing"] = (
        "on: the activations did not fit otherwise (about 30% more compute)"
        if r["model"]["gradient_checkpointing"]
        else "off: the activations fit without recomputation (turn on to free memory)"
    )
    fields = f", columns {d.fields}" if d.fields else ""
    why["data.format"] = f"detected from the columns ({', '.join(d.columns)}){fields}"
    why["data.eval"] = (
        f"{held} of the {d.rows} rows held out for the eval loss (seeded draw)"
        if held
        else f"only {d.rows} rows: none held out; set data.eval to an eval file"
    )
    why["data.max_length"] = (
        f"99% of rows are under about {d.p99_tokens} tokens (estimated at 3 characters a "
        "token); longer rows are cut (data.truncation)"
        if o.max_length is None
        else "as given (--max-length)"
    )
    why["optimizer.lr"] = (
        f"from {source}: {m.guide.lr_source}" if o.lr is None else "as given (--lr)"
    )
    _training(why, r, train_rows, steps, o)
    if o.strategy in ("grass", "lisa", "grass-static", "cyclic"):
        _layerwise(why, r, m, p)
    why["checkpoint.interval"] = (
        "a checkpoint every fifth of the run, one kept: `grass train FILE --resume auto`"
    )
    return why, header


def _training(why: dict[str, str], r: dict, rows: int, steps: int, o: InitOptions) -> None:
    t = r["training"]
    batch = t["micro_batch_size"] * t["grad_accum_steps"]
    why["training.micro_batch_size"] = (
        f"the largest that fits; x grad_accum_steps {t['grad_accum_steps']} = a batch of "
        f"{batch} rows ({steps} steps over {rows} training rows)"
    )
    why["training.warmup_steps"] = "3% of the steps"


def _layerwise(why: dict[str, str], r: dict, m: ModelInfo, p: Any) -> None:
    opt = r["optimizer"]
    why["sampler.gamma"] = (
        f"blocks trained at once, the most that fit (at most half of {m.blocks}): more blocks "
        "learn more per step (docs/benchmarks.md)"
    )
    why["sampler.train_embeddings"] = (
        "embeddings and head frozen: no gradient or state for the vocabulary matrices, and "
        "backward stops at the lowest active block"
    )
    policy = opt["state_policy"]
    if policy == "offload":
        off = opt["offload"]
        where = "files on disk (RAM is short)"
        if off["target"] == "cpu":
            pinned, spill = p.host_kinds.get("store_pinned", 0), p.disk_bytes
            where = f"pinned host RAM ({pinned / GB:.2f} GB"
            where += (
                f"; the other {spill / GB:.2f} GB in files on disk: optimizer.offload."
                "host_budget: auto sizes the pinned part to this machine's RAM)"
                if spill
                else ")"
            )
        how = (
            "streamed one weight matrix at a time in the step"
            if off["residency"] == "step"
            else "moved once per switch"
        )
        why["optimizer.state_policy"] = (
            f"frozen blocks' AdamW state waits in {where}, {how}, and comes back when the "
            "block is drawn again"
        )
    elif policy == "drop":
        why["optimizer.state_policy"] = (
            "drop (BAdam's way): neither host RAM nor disk holds every block's state, so a "
            "frozen block's moments are reset; more RAM or disk allows offload"
        )
