"""`grass plan RECIPE`: the device and host memory a recipe needs, from the model's
config alone (no weights loaded), for every strategy and state policy.

Thin: `grass_cli.planner.memory.plan_recipe` computes the plans; this module marks the
recipe's own choice, prints the table and its verdict (or JSON) and exits 1 when
`--device-memory` is given and the recipe's choice does not fit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from grass_cli.commands.options import (
    OverridesArg,
    RecipeArg,
    json_option,
    print_json,
    stdout_console,
)

if TYPE_CHECKING:
    from grass_cli.planner.disk_speed import DiskSpeed, Traffic
    from grass_cli.planner.machine import HostMemory
    from grass_cli.planner.memory import Plan
    from grass_cli.planner.shape import Layout
    from grass_cli.planner.verdict import DiskNeed

EPILOG = (
    "Examples:\n\n  grass plan recipes/gpu-grass.yaml --model-config llama-3.1-8b "
    "--device-memory 24 --host-memory 64\n\n  grass plan my.yaml --model-config "
    "Qwen/Qwen2.5-7B-Instruct\n\n  grass plan my.yaml data.max_length=1024 --json"
)
KINDS = ("weights", "gradients", "optimizer_state", "activations")  # the peak's parts
COLUMNS = ("strategy", "peak", "phase", "weights", "grads", "state", "activ.", "host", "disk")

ModelConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--model-config",
        help="Plan for another model: a preset (llama-3.1-8b, qwen2.5-7b, ...: "
        "`grass init --list-presets`), a hub id (its config.json only), or a config.json "
        "file. Default: model.path's config.",
        show_default=False,
    ),
]
DeviceMemoryOpt = Annotated[
    float | None,
    typer.Option(
        "--device-memory",
        help="Device memory in GB (1e9 bytes): each plan says whether it fits.",
        min=0.1,
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="cuda or cpu (default: training.device; auto means cuda).",
        show_default=False,
    ),
]
HostMemoryOpt = Annotated[
    float | None,
    typer.Option(
        "--host-memory",
        help="Host RAM in GB to check against (default: this machine's).",
        min=0.1,
        show_default=False,
    ),
]
DiskSpeedOpt = Annotated[
    float | None,
    typer.Option(
        "--disk-speed",
        help="Disk speed in GB/s for the offloaded state's traffic (default: measured once "
        "by a 128 MiB probe where the state would go, then cached).",
        min=0.001,
        show_default=False,
    ),
]
ProbeOpt = Annotated[
    bool, typer.Option("--probe-disk", help="Measure the disk's speed again (not the cached one).")
]
NprocOpt = Annotated[
    int,
    typer.Option(
        "--nproc",
        help="Processes per machine (torchrun --nproc-per-node): plan one rank, and the "
        "machine's RAM for all of them. With distributed.sharding=fsdp each rank holds "
        "1/N of the weights, gradients and state.",
        min=1,
    ),
]
NodesOpt = Annotated[int, typer.Option("--nodes", help="Machines (torchrun --nnodes).", min=1)]
JsonOpt = Annotated[bool, json_option("One JSON object per strategy/policy, a list.")]


def plan(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    model_config: ModelConfigOpt = None,
    device_memory: DeviceMemoryOpt = None,
    device: DeviceOpt = None,
    host_memory: HostMemoryOpt = None,
    disk_speed: DiskSpeedOpt = None,
    probe_disk: ProbeOpt = False,
    nproc: NprocOpt = 1,
    nodes: NodesOpt = 1,
    json_out: JsonOpt = False,
) -> None:
    """Predict peak device memory, host RAM and disk, by kind, for every strategy x
    state policy (no weights loaded), and whether the recipe's choice fits. Exits 1
    when it does not fit the device (with --device-memory), the host's RAM or the disk."""
    from grass_cli.cli import _guard

    args = (recipe, overrides or [], model_config, device, device_memory, host_memory,
            (disk_speed, probe_disk), (nproc, nodes))  # fmt: skip
    layout, plans, own, extra = _guard(lambda: _plan(*args))
    if json_out:
        print_json([p.to_json() for p in plans], indent=2)
    else:
        # a table of ten columns: do not squeeze it to 80 columns in a pipe or log
        console = stdout_console(width=None if sys.stdout.isatty() else 120)
        console.print(render(layout, plans, own, device_memory, extra), soft_wrap=True)
    if own.fits is False or own.host_fits is False or extra.disk_short is not None:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(plan)


@dataclass
class Machine:
    """What the recipe's plan was checked against besides the device."""

    host: HostMemory
    disk: DiskNeed
    disk_short: tuple[str, int, int] | None  # (folder, needed, free) when short
    gamma: int | str = 0  # the recipe's sampler.gamma, as planned
    gamma_auto: str | None = None  # why, when gamma: auto chose it
    traffic: Traffic | None = None  # what the store moves through the disk
    speed: DiskSpeed | None = None  # the disk's, measured or given


def _plan(
    recipe: Path,
    overrides: list[str],
    model_config: str | None,
    device: str | None,
    device_memory: float | None,
    host_memory: float | None,
    speed_opts: tuple[float | None, bool] = (None, False),
    procs: tuple[int, int] = (1, 1),
) -> tuple[Layout, list[Plan], Plan, Machine]:
    """The layout, every strategy x policy's plan (with its host verdict), the
    recipe's own among them, and the host and disk it was checked against.
    `procs` (per machine, machines): the plans are one rank's, the host's RAM and
    disk a machine's."""
    from grass_cli.errors import GrassError
    from grass_cli.planner import disk_speed, machine, sharded, verdict
    from grass_cli.planner.memory import recipe_scenario
    from grass_cli.planner.resolve import plan_resolved
    from grass_cli.recipe import load_recipe

    if device not in (None, "cuda", "cpu"):
        raise GrassError(f"unknown device {device!r}", where="--device", hint="cuda or cpu")
    r = load_recipe(recipe, overrides)
    nproc, nodes = procs
    shards = sharded.shards(r, nproc * nodes)
    host = machine.host_memory(host_memory)
    data, runtime = verdict.dataset_bytes(r), machine.runtime_bytes()
    r, layout, plans = plan_resolved(
        r, model_config, device, device_memory, flag=True, host=host, beside=(data, runtime),
        shards=shards, local=nproc,
    )  # fmt: skip
    for p in plans:
        # every process of a machine has its own store, data and runtime
        p.host_need = {k: v * nproc for k, v in verdict.host_need(p, layout, data, runtime).items()}
        p.host_fits, p.host_advice = verdict.judge_host(p, p.host_need, host)
        p.disk_bytes *= nproc
        p.processes = nproc * nodes
    label = recipe_scenario(r).label
    own = next(p for p in plans if p.label == label)  # scenarios() covers every recipe
    disk = verdict.disk_need(r, layout, own)
    m = Machine(host, disk, verdict.disk_short(disk), r.sampler.gamma, r._gamma_auto)
    m.traffic = disk_speed.traffic(r, layout, own)
    if m.traffic is not None:
        opt = r.optimizer.offload
        folder = Path(opt.path) if opt.path else Path(r.output.dir) / "offload"
        m.speed = disk_speed.disk_speed(folder, *speed_opts)
        own.disk_traffic = {
            "read_bytes": m.traffic.read,
            "written_bytes": m.traffic.written,
            "every_steps": m.traffic.every_steps,
            "seconds": m.traffic.seconds(m.speed),
            "read_bps": m.speed.read_bps,
            "write_bps": m.speed.write_bps,
            "speed_source": m.speed.source,
        }
    return layout, plans, own, m


# ---------------------------------------------------------------------- the output


def render(
    layout: Layout, plans: list[Plan], own: Plan, device_memory: float | None, m: Machine
) -> Any:
    """The plan table and the verdicts for the recipe's own choice: device, host RAM
    and disk (pure, testable)."""
    from rich.console import Group
    from rich.text import Text

    from grass_cli.planner.memory import gb

    k = own.kinds
    device = (
        f"* the recipe ({own.label}): {gb(own.device_peak_bytes):.2f} GB peak in "
        f"{own.peak_phase}; besides the weights ({gb(k['weights']):.2f}), the largest part "
        f"is {own.dominant.replace('_', ' ') if own.dominant else '-'}"
    )
    if own.host_kinds.get("shards_pinned"):  # distributed.cpu_offload
        device = device.replace(
            f"besides the weights ({gb(k['weights']):.2f})",
            "the shards of weights, gradients and optimizer state in host RAM "
            "(distributed.cpu_offload)",
        )
    if own.dominant == "weights":
        device = device.rsplit(";", 1)[0] + "; the weights alone exceed the device"
    elif own.dominant:
        device += f" ({gb(k[own.dominant]):.2f})"
    if own.fits is not None:
        device += (
            f"; fits {device_memory:g} GB"
            if own.fits
            else f"; does NOT fit {device_memory:g} GB: {own.advice}"
        )
    need = own.host_need or {}
    host = (
        f"* host RAM: about {gb(sum(need.values())):.2f} GB ("
        + ", ".join(f"{part} {gb(v):.2f}" for part, v in need.items())
        + f") of {m.host.source}'s {gb(m.host.total):.2f} GB ({gb(m.host.usable):.2f} usable)"
        + ("; fits" if own.host_fits else f"; does NOT fit: {own.host_advice}")
    )
    disk = f"* disk: about {gb(m.disk.total):.2f} GB written ({m.disk.breakdown()})"
    if m.disk_short is None:
        disk += "; fits"
    else:
        folder, needed, free = m.disk_short
        disk += (
            f"; does NOT fit: {gb(needed):.2f} GB on the disk of {folder}, {gb(free):.2f} GB "
            f"free: {m.disk.hint()}"
        )
    note = Text(
        "keep: the state of every block visited (a long run's worst case). Python, the "
        "CUDA context and allocator slack are not included in the device peak.",
        style="dim",
    )
    table = plan_table(layout, plans, own, device_memory)
    lines = [Text(device), Text(host), Text(disk), Text(_preemption_line(m.disk))]
    if m.traffic is not None and m.speed is not None:
        lines.append(Text(_traffic_line(m.traffic, m.speed, own)))
    if m.gamma_auto:
        lines.insert(0, Text(f"* sampler.gamma {m.gamma}: {m.gamma_auto}"))
    return Group(table, *lines, note)


def _preemption_line(disk: DiskNeed) -> str:
    """What a SIGTERM writes after its step: the grace period must cover writing it."""
    from grass_cli.planner.memory import gb

    full = disk.checkpoint_weights + disk.checkpoint_state
    return (
        f"* preemption: a SIGTERM finishes its step, then writes a {gb(full):.2f} GB "
        f"checkpoint ({gb(disk.checkpoint_weights):.2f} GB with checkpoint.on_signal: light); "
        "a short run's log gives the seconds and the grace period to ask for (docs/runs.md)"
    )


def _traffic_line(t: Traffic, speed: DiskSpeed, own: Plan) -> str:
    """What the store moves through the disk and the time that takes at its speed."""
    from grass_cli.planner.memory import gb

    secs = t.seconds(speed)
    when = "every step" if t.every_steps == 1 else f"per switch (every {t.every_steps} steps)"
    line = (
        f"* disk traffic ({t.what}): about {gb(t.read):.2f} GB read and {gb(t.written):.2f} "
        f"GB written {when}: {secs:.1f} s at {gb(speed.read_bps):.2f} GB/s read and "
        f"{gb(speed.write_bps):.2f} GB/s write ({speed.source})"
    )
    if t.every_steps > 1:
        line += f", {secs / t.every_steps:.2f} s a step on average"
        if own.offload_target == "cpu":
            line += "; read ahead of each switch (optimizer.offload.stage_steps), beside training"
    return line


def plan_table(layout: Layout, plans: list[Plan], own: Plan, device_memory: float | None) -> Any:
    """One row per strategy x policy, the recipe's own in bold and starred; `fits`
    judges the host's RAM, and the device when a device memory is given."""
    from rich.table import Table

    first = plans[0]
    title = (
        f"{layout.name}: {layout.params / 1e9:.2f}B parameters, {len(layout.blocks)} blocks, "
        f"{layout.weight_bytes * 8}-bit weights, device {first.device}"
    )
    if first.processes > 1 or first.shards:
        how = f"sharded in {first.shards}" if first.shards else "replicated"
        title += f"; one rank of {first.processes} processes ({how}), host and disk per machine"
    table = Table(title=title, title_justify="left")
    table.caption = (
        "GB (1e9 bytes). peak: device peak; weights..activ.: its parts; host: RAM needed "
        f"(store of offload target {first.offload_target or 'cpu'} or the weights while "
        "loading, data, runtime); disk: offloaded state on disk"
    )
    table.caption_justify = "left"
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("strategy", "phase") else "right")
    table.add_column("fits")
    for p in plans:
        table.add_row(*_row(p, own), style="bold" if p is own else None)
    return table


def _row(p: Plan, own: Plan) -> list[str]:
    """A plan's cells, in GB: peak and its phase, the peak's parts, host and disk."""
    from grass_cli.planner.memory import gb

    k = p.kinds
    short = [what for what, ok in (("device", p.fits), ("host", p.host_fits)) if ok is False]
    return [
        p.label + (" *" if p is own else ""),
        f"{gb(p.device_peak_bytes):.2f}",
        p.peak_phase,
        *(f"{gb(k[kind]):.2f}" for kind in KINDS),
        f"{gb(sum((p.host_need or {}).values())):.2f}",
        f"{gb(p.disk_bytes):.2f}",
        "no: " + " + ".join(short) if short else "yes",
    ]
