"""`grass init`'s choice: the fastest configuration the planner says fits the GPU,
the host's RAM and the disk.

Candidates are tried in order of speed, and the first that fits wins:

1. where optimizer state waits: offloaded to pinned host RAM (fast copies; the
   two-tier store spills what the RAM cannot hold to disk, host_budget: auto),
   else to disk files, else dropped at each switch (BAdam's way, when neither
   holds every block's state); on the CPU, kept (RAM is the device);
2. how much is recomputed or streamed: no activation checkpointing with state
   moved once per switch, then checkpointing, then state streamed per weight
   matrix (`residency: step`), then both;
3. the micro-batch: as large as fits (8, 4, 2), the global batch kept by
   accumulation;
4. gamma: the most blocks that fit (at most half the model), at least 4 on a
   first pass; a second pass allows micro-batch 1 and fewer blocks, trying the
   most blocks first (accuracy before speed) down to a single one.

The device budget leaves DEVICE_SLACK of the card for what the planner does not
model (the CUDA context, the allocator's slack).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from grass_cli.errors import GrassError
from grass_cli.planner.machine import DEVICE_SLACK, HostMemory
from grass_cli.recipe import Recipe

MICROS = (8, 4, 2, 1)
# When the disk cannot hold the checkpoints: fewer of them, then none at the end
# (the final model is saved either way; an interrupted run still checkpoints).
_LIGHTER_CHECKPOINTS = (
    ({"interval": None}, "checkpoint.interval: null, because two checkpoints do not fit the disk"),
    ({"at_end": False}, "checkpoint.at_end: false, because a checkpoint does not fit the disk"),
)


@dataclass
class Budget:
    """What the run must fit: the device (None on the CPU: RAM is the device), the
    host's RAM, and the disk under output.dir (this machine's unless given)."""

    device: int | None
    host: HostMemory
    device_label: str  # "a 24 GB GPU" / "this machine's 25 GB of RAM"
    disk: int | None = None  # bytes free for output.dir (None: this machine's disk)


@dataclass
class Choice:
    """The recipe chosen (a plain dict, validated), its plan, and why."""

    recipe: dict[str, Any]
    plan: Any  # planner.memory.Plan
    host_need: dict[str, int]
    disk_total: int
    notes: list[str] = field(default_factory=list)


@dataclass
class _Try:
    """One configuration: the recipe overrides it sets and a label for messages."""

    policy: str  # keep | drop | offload
    target: str | None
    residency: str
    ckpt: bool
    micro: int
    gamma: int


def choose(base: dict[str, Any], budget: Budget, layerwise: bool) -> Choice:
    """The first configuration, in order of speed, that fits every budget."""
    from grass_cli.planner.machine import runtime_bytes
    from grass_cli.planner.shape import build_layout, load_config
    from grass_cli.planner.verdict import dataset_bytes
    from grass_cli.recipe import validate_dict

    first = validate_dict(base, "grass init")
    lay = build_layout(first, *load_config(first))
    fixed = (dataset_bytes(first), runtime_bytes())
    blocks = len(lay.blocks)
    leanest: tuple[int, _Try] | None = None
    other: tuple[str, _Try] | None = None  # the fastest that fit the GPU, and what it did not
    for pass_ in (1, 2):
        for t in _tries(base, budget, layerwise, blocks, pass_):
            got, peak, short = _fits(base, t, budget, lay, fixed)
            if got is not None:
                got.notes.insert(0, _describe(t, layerwise, blocks))
                return got
            if leanest is None or peak < leanest[0]:
                leanest = (peak, t)
            if other is None and short is not None:
                other = (short, t)
    assert leanest is not None
    if other is not None:  # the GPU was never the obstacle: RAM or disk was
        lean = _describe(other[1], layerwise, blocks).removeprefix("chosen: ")
        raise GrassError(
            f"no configuration fits: {budget.device_label} holds the fastest ({lean}), "
            f"but {other[0]}",
            where="grass init",
            hint="give the run more of what is short (--host-memory GB and --disk GB plan "
            "for another machine), or a smaller model",
        )
    raise _nothing_fits(first, lay, budget, leanest[0], leanest[1], layerwise)


def _tries(
    base: dict[str, Any], budget: Budget, layerwise: bool, blocks: int, pass_: int
) -> list[_Try]:
    """Every configuration of a pass, fastest first (see the module's docstring)."""
    batch = base["training"]["micro_batch_size"] * base["training"]["grad_accum_steps"]
    micros = [m for m in MICROS if batch % m == 0 and (m >= 2 or pass_ == 2)]
    if not layerwise:
        return [_Try("keep", None, "interval", c, m, 0) for c in (False, True) for m in micros]
    if budget.device is None:
        policies = [("keep", None), ("drop", None)]
    else:
        policies = [("offload", "cpu"), ("offload", "disk"), ("drop", None)]
    low = min(4, blocks)
    tiers_of = {
        "offload": [("interval", False), ("interval", True), ("step", False), ("step", True)]
    }
    plain = [("interval", False), ("interval", True)]
    if pass_ == 1:  # speed first, then the most blocks that fit
        gammas = list(range(max(blocks // 2, low), low - 1, -1))
        return [
            _Try(policy, target, residency, ckpt, m, g)
            for policy, target in policies
            for residency, ckpt in tiers_of.get(policy, plain)
            for m in micros
            for g in gammas
        ]
    # fewer blocks than a first pass allows: the most blocks first, then speed
    return [
        _Try(policy, target, residency, ckpt, m, g)
        for g in range(low - 1, 0, -1)
        for policy, target in policies
        for residency, ckpt in tiers_of.get(policy, plain)
        for m in micros
    ]


def _apply(base: dict[str, Any], t: _Try) -> dict[str, Any]:
    d = copy.deepcopy(base)
    batch = d["training"]["micro_batch_size"] * d["training"]["grad_accum_steps"]
    d["training"]["micro_batch_size"] = t.micro
    d["training"]["grad_accum_steps"] = batch // t.micro
    d["model"]["gradient_checkpointing"] = t.ckpt
    if t.gamma:
        d["sampler"]["gamma"] = t.gamma
        d["optimizer"]["state_policy"] = t.policy
        if t.policy == "offload":
            d["optimizer"]["offload"] = {"target": t.target, "residency": t.residency}
    return d


def _fits(
    base: dict[str, Any], t: _Try, budget: Budget, lay: Any, fixed: tuple[int, int]
) -> tuple[Choice | None, int, str | None]:
    """The choice when `t` fits device, host and disk (None otherwise), its device
    peak, and what fell short when the device was not it (host RAM or disk)."""
    from grass_cli.planner.memory import plan, recipe_scenario
    from grass_cli.planner.tiers import resolve_budget
    from grass_cli.planner.verdict import disk_need, disk_short, host_need, judge_host
    from grass_cli.recipe import validate_dict

    d = _apply(base, t)
    r = validate_dict(d, "grass init")
    device = "cpu" if budget.device is None else "cuda"
    r = resolve_budget(r, lay, device, budget.host, *fixed)  # the two-tier store's pinned part
    p = plan(r, lay, recipe_scenario(r), device)
    if budget.device is not None and p.device_peak_bytes > budget.device:
        return None, p.device_peak_bytes, None
    need = host_need(p, lay, *fixed)
    if not judge_host(p, need, budget.host)[0]:
        short = (
            f"the host needs {sum(need.values()) / 1e9:.1f} GB of RAM and "
            f"{budget.host.source}'s usable share is {budget.host.usable / 1e9:.1f} GB"
        )
        return None, p.device_peak_bytes, short
    notes: list[str] = []
    disk = disk_need(r, lay, p)
    for lighter, note in _LIGHTER_CHECKPOINTS:
        if disk_short(disk, budget.disk) is None:
            break
        d["checkpoint"] |= lighter
        r = validate_dict(d, "grass init")
        disk = disk_need(r, lay, p)
        notes.append(note)
    full = disk_short(disk, budget.disk)
    if full is not None:
        folder, needed, free = full
        short = (
            f"it writes {needed / 1e9:.1f} GB under {folder} and the disk has "
            f"{free / 1e9:.1f} GB free (the final model alone is "
            f"{lay.params * lay.weight_bytes / 1e9:.1f} GB)"
        )
        return None, p.device_peak_bytes, short
    return Choice(d, p, need, disk.total, notes), p.device_peak_bytes, None


def _describe(t: _Try, layerwise: bool, blocks: int) -> str:
    what = [f"micro-batch {t.micro}"]
    what.append("activation checkpointing" if t.ckpt else "no activation checkpointing")
    if layerwise:
        what.append(f"gamma {t.gamma} of {blocks} blocks")
        if t.policy == "offload":
            where = (
                "host RAM (spilling to disk past the RAM it has)"
                if t.target == "cpu"
                else "disk files"
            )
            how = "streamed per weight matrix" if t.residency == "step" else "moved per switch"
            what.append(f"optimizer state offloaded to {where}, {how}")
        else:
            what.append(f"optimizer state {t.policy}")
    return "chosen: " + ", ".join(what)


def _nothing_fits(
    r: Recipe, lay: Any, budget: Budget, peak: int, t: _Try, layerwise: bool
) -> GrassError:
    """One message: what the leanest configuration needs, and what would fit."""
    weights = lay.params * lay.weight_bytes
    lean = _describe(t, layerwise, len(lay.blocks)).removeprefix("chosen: ")
    if budget.device is None:
        return GrassError(
            f"no configuration fits {budget.device_label}: the leanest ({lean}) needs "
            f"about {peak / 1e9:.1f} GB of RAM",
            where="grass init",
            hint="use a machine with more RAM, a GPU (--gpu GB), or a smaller model",
        )
    need_gpu = peak / (1 - DEVICE_SLACK) / 1e9
    what = (
        f"no configuration fits {budget.device_label}: the leanest ({lean}) peaks at "
        f"{peak / 1e9:.1f} GB, of which the weights are {weights / 1e9:.1f} GB"
    )
    hint = f"a GPU of at least {need_gpu:.0f} GB (--gpu {need_gpu:.0f})"
    if peak - weights > 0.25 * peak:
        hint += f", or shorter rows (--max-length below {r.data.max_length})"
    small = _smaller_presets(budget.device, lay.weight_bytes)
    if small:
        hint += ", or a smaller model: " + ", ".join(small)
    return GrassError(what, where="grass init", hint=hint)


def _smaller_presets(device: int, weight_bytes: int) -> list[str]:
    """Presets whose weights take at most half the budget, the largest first."""
    from grass_cli.presets import get_preset, preset_names

    fit = [get_preset(n, "grass init") for n in preset_names()]
    fit = [p for p in fit if p.params_b * 1e9 * weight_bytes <= device / 2]
    return [p.name for p in sorted(fit, key=lambda p: -p.params_b)[:4]]
