"""Memory planner: the peak device memory and host memory of a recipe, from the
model's config alone (`grass plan`).

The model is built on the meta device, so its parameter groups (the same block
map training uses) are known exactly without reading a weight. Every other term
follows what the engine does, phase by phase:

- **probe** (grass, grass-static): forward + backward through every block with no
  update; each gradient is freed as soon as its norm is read, and the engine runs
  probing with activation checkpointing, so its peak is weights + checkpointed
  activations, never full fine-tuning's.
- **backward**: weights + the state the policy keeps on the device + activations
  still waiting for backward + gradients produced so far. Backward is swept layer
  by layer from the head down, because gradients grow while activations shrink; the
  peak is the worst point of that sweep, not the sum of both maxima.
- **step**: weights + gradients + device state + what AdamW allocates while it
  updates (fp32 gradient copies for the fp32 masters of bf16 weights, and one
  temporary of the size of what is stepped at once: a group with CUDA's foreach
  kernels, a parameter on the CPU or when streaming). A streamed step (`residency:
  step`) is swept parameter by parameter: gradients are freed as they are consumed
  and three parameters' state is on the device at once (write-back, current,
  prefetch).

Activations per token and layer follow from the decoder's shapes (hidden h,
intermediate i, query and key/value widths), counting what autograd saves for a
Llama-style block: fp32 RMSNorm inputs, q/k/v/output for attention, and the MLP's
gate, up and product; a frozen layer between the lowest trained block and the loss
saves only what the input gradient needs (no matmul inputs). The logits cost up to
12 bytes per token and vocabulary entry at their peak (planner/activations.py), or,
for models whose loss runs in chunks of rows, one chunk's buffers whatever the
number of tokens, plus the head's gradient made in fp32 during the forward. Layers
below the lowest trained block save nothing, which is why layer-wise training
with frozen embeddings is cheap; the planner assumes the worst draw (the lowest
block among the active ones).

Numbers are bytes. Python, the CUDA context and allocator slack are not modelled:
`benchmarks/plan_accuracy.py` measures how close the prediction is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from grass_cli.planner.activations import Acts, activations
from grass_cli.planner.shape import GroupShape, Layout, always_groups
from grass_cli.planner.sharded import Gathered, sharding_extra
from grass_cli.planner.step import streamed, transient
from grass_cli.recipe import LAYERWISE, PROBING, Recipe

# ------------------------------------------------------------------------- scenario


@dataclass
class Scenario:
    strategy: str  # full | lora | lisa | grass | grass-static | cyclic
    state_policy: str  # keep | drop | offload
    target: str = "cpu"  # offload target
    residency: str = "interval"
    # train embeddings, final norm and head too (what LISA does), whatever the recipe says
    embed_head: bool = False
    # target cpu: the pinned tier's bytes (optimizer.offload.host_budget, resolved by
    # planner/tiers.py); the rest of the store spills to disk. None: all pinned.
    host_budget: int | None = None

    @property
    def label(self) -> str:
        if self.strategy in ("full", "lora"):
            return self.strategy
        policy = self.state_policy
        if policy == "offload":
            policy = f"offload/{self.residency}"
        extra = " +emb/head" if self.embed_head else ""
        return f"{self.strategy} {policy}{extra}"


@dataclass
class Plan:
    strategy: str
    state_policy: str
    offload_target: str | None
    residency: str | None
    embed_head_trained: bool
    label: str
    device: str
    device_peak_bytes: int
    peak_phase: str
    host_bytes: int
    disk_bytes: int
    kinds: dict[str, int]  # the peak phase's bytes by kind
    phases: dict[str, int]  # peak bytes of each phase
    host_kinds: dict[str, int]
    trainable_params: int
    state_bytes_per_param: float = 8.0  # moments (+ fp32 master): state_dtype decides
    fits: bool | None = None  # on the device (when a device memory is given)
    dominant: str | None = None  # the part to lower: weights only when they alone are too big
    advice: str | None = None
    host_need: dict[str, int] | None = None  # host RAM by part (verdict.host_need)
    host_fits: bool | None = None
    host_advice: str | None = None
    disk_traffic: dict[str, Any] | None = None  # the recipe's own: grass plan's disk line
    shards: int = 0  # one rank of a sharded run whose weights are cut in this many shards
    processes: int = 1  # of the job (grass plan --nproc x --nodes): the plan is one rank's

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def scenarios(recipe: Recipe) -> list[Scenario]:
    """Every strategy x state policy worth comparing for this recipe."""
    layerwise = recipe.sampler.strategy if recipe.sampler.strategy in LAYERWISE else "grass"
    target = recipe.optimizer.offload.target
    budget = recipe._host_budget if target == "cpu" else None
    out = [Scenario("full", "keep"), Scenario("lora", "keep")]
    for strategy in dict.fromkeys(["lisa", layerwise]):
        out += [
            Scenario(strategy, "keep"),
            Scenario(strategy, "drop"),
            Scenario(strategy, "offload", target, "interval", host_budget=budget),
            Scenario(strategy, "offload", target, "step", host_budget=budget),
        ]
    s = recipe.sampler
    if not (s.train_embeddings and s.train_head):  # what training them would cost
        out.append(Scenario(layerwise, "offload", target, "step", True, budget))
    return out


def recipe_scenario(recipe: Recipe) -> Scenario:
    off = recipe.optimizer.offload
    policy = recipe.optimizer.state_policy
    budget = recipe._host_budget if off.target == "cpu" else None
    return Scenario(recipe.sampler.strategy, policy, off.target, off.residency, False, budget)


# ------------------------------------------------------------------------ activations


@dataclass
class _Trained:
    """What trains in a scenario: the groups (worst draw: the lowest blocks), bytes
    per parameter of their gradients and state, and how many blocks are active."""

    groups: list[GroupShape]
    gbytes: int
    sbytes: float
    active_blocks: int
    lowest: int = 0  # the draw's lowest block (the worst draw: 0)

    @property
    def head(self) -> bool:
        """Whether the LM head trains (itself, or as embeddings tied to it)."""
        return any(g.kind == "head" or (g.kind == "embed" and g.tied) for g in self.groups)


def state_bytes_per_param(weight_bytes: int, strategy: str, state_dtype: str = "fp32") -> float:
    """AdamW's bytes per trained parameter: two moments (8 bytes in fp32, 4 in bf16,
    about 2 in 8 bits: offload/compact.py), plus an fp32 master copy of 16-bit
    weights (peft keeps LoRA adapters in fp32: moments only)."""
    from grass_cli.offload.compact import state_bytes

    return state_bytes(state_dtype, weight_bytes, master=strategy != "lora")


def _trained(recipe: Recipe, lay: Layout, sc: Scenario, lowest: int = 0) -> _Trained:
    s, L, w = recipe.sampler, len(lay.blocks), lay.weight_bytes
    sbytes = state_bytes_per_param(w, sc.strategy, recipe.optimizer.state_dtype)
    if sc.strategy == "lora":  # peft keeps the adapters in fp32
        return _Trained([lay.lora[b] for b in lay.blocks], 4, sbytes, L)
    if sc.strategy == "full":
        always = [g for g in lay.groups.values() if g.kind != "block"]
        active = L
    else:
        if sc.embed_head:
            always = always_groups(lay, True, True, True)
        else:
            always = always_groups(lay, s.train_embeddings, s.train_norm, s.train_head)
        active = min(s.gamma, L)
    first = min(lowest, L - active)
    drawn = [lay.groups[b] for b in lay.blocks[first : first + active]]
    return _Trained(always + drawn, w, sbytes, active, first)


def _state(lay: Layout, sc: Scenario, t: _Trained, visited: int | None) -> tuple[int, int]:
    """Optimizer state (moments, fp32 masters) on the device, and in the store."""
    L, groups = len(lay.blocks), lay.groups
    state_of = {g.name: g.numel * t.sbytes for g in t.groups}
    if sc.strategy in ("full", "lora"):
        device_state = sum(state_of.values())
    elif sc.state_policy == "keep":
        nvis = L if visited is None else max(t.active_blocks, min(visited, L))
        device_state = sum(state_of[g.name] for g in t.groups if g.kind != "block")
        device_state += sum(groups[b].numel * t.sbytes for b in lay.blocks[:nvis])
    elif sc.state_policy == "offload" and sc.residency == "step":
        chunks = sorted((n * t.sbytes for g in t.groups for n in g.params), reverse=True)
        device_state = sum(chunks[:3])  # (the streamed sweep finds the actual worst point)
    else:  # drop, offload-interval: the active groups' state only
        device_state = sum(state_of.values())
    store = 0
    if sc.state_policy == "offload" and sc.strategy not in ("full", "lora"):
        # every block visited so far (by default all of them) has state in the store
        nvis = L if visited is None else max(t.active_blocks, min(visited, L))
        every = [groups[b] for b in lay.blocks[:nvis]]
        every += [g for g in t.groups if g.kind not in ("block", "lora")]
        store = sum(g.numel * t.sbytes for g in every)
    return device_state, store


def _backward_peak(
    lay: Layout, t: _Trained, acts: Acts, base: int, ckpt: bool, accum: bool, shards: int = 1,
    gx: Gathered | None = None, host_grads: bool = False,
) -> int:  # fmt: skip
    """Backward swept from the head down to block 0 (the worst draw has the lowest
    block active, so every block is in the gradient range): activations shrink as
    gradients grow; the peak is the worst point of the sweep. Sharded: the
    gradients made so far are shards, plus one block's whole gradient (`gx.reduce`);
    accumulating micro-batches hold whole gradients until the step's last one.
    FSDP2's gathered weights (`gx`): the chunked loss gathers the head at the loss;
    the plain one from the head's backward on, when the loss's buffers are down to
    the logits' gradient (every unit reshards after its forward and the loss runs
    outside the model's). `host_grads` (cpu_offload): shards go to the host."""
    grads_of = {g.name: 0 if host_grads else g.numel * t.gbytes // shards for g in t.groups}
    grads = sum(grads_of.values())
    groups, L = lay.groups, len(lay.blocks)
    head_grads = sum(v for n, v in grads_of.items() if groups.get(n) and groups[n].kind != "block")
    block_grads = [grads_of.get(b, 0) for b in lay.blocks]
    gx = gx or Gathered()
    reduce = [gx.reduce * any(g.name == b for g in t.groups) for b in lay.blocks]
    g_before = grads * shards if accum else 0
    # the chunked loss makes a trained head's gradient in fp32 during the forward: at
    # the loss it is that buffer; as backward starts, also its copy in the weight's dtype
    head_numel = lay.vocab * lay.hidden if acts.fp32_head_grad and t.head else 0
    loss_grads = head_grads + head_numel * (4 - t.gbytes)
    peak = base + gx.loss + sum(acts.saved) + acts.logits + max(g_before, loss_grads)
    if head_numel and t.gbytes < 4:
        peak = max(peak, base + sum(acts.saved) + max(g_before, loss_grads + head_numel * t.gbytes))
    if gx.head:  # the head's backward: the head gathered again beside the logits' gradient
        peak = max(peak, base + gx.head + sum(acts.saved) + acts.logits_grad + loss_grads)
    for k in range(L - 1, -1, -1):
        live = sum(acts.saved[:k]) + (acts.per_layer[k] if ckpt else acts.saved[k]) + acts.work
        produced = head_grads + sum(block_grads[k:]) + reduce[k]
        peak = max(peak, base + gx.blocks + live + max(g_before, produced))
    return peak


def plan(
    recipe: Recipe,
    lay: Layout,
    sc: Scenario,
    device: str = "cuda",
    visited: int | None = None,
    checkpointing: bool | None = None,
    shards: int = 0,
    lowest: int = 0,
) -> Plan:
    """Predict one scenario's peaks. `visited`: blocks whose state `keep` holds
    (default: all of them, which a long enough run reaches). `shards`: one rank of
    a sharded run (distributed.sharding: fsdp) whose weights, gradients and state
    are cut in that many shards (0: not sharded). `lowest`: the lowest block a
    layer-wise draw trains (default 0, the worst draw, which a long run meets);
    the validation benchmarks pass the one their run drew."""
    ckpt = recipe.model.gradient_checkpointing if checkpointing is None else checkpointing
    w, masters = lay.weight_bytes, lay.weight_bytes == 2
    t = _trained(recipe, lay, sc, lowest)
    ns = max(shards, 1)
    on_host = bool(shards) and recipe.distributed.cpu_offload and device != "cpu"  # (FSDP2)
    weights = lay.params * w // ns
    grads = sum(g.numel * t.gbytes for g in t.groups) // ns
    device_state, store = (x // ns for x in _state(lay, sc, t, visited))
    from grass_cli.offload.compact import STEP_TEMP_BYTES

    compact = STEP_TEMP_BYTES[recipe.optimizer.state_dtype]["cpu" if device == "cpu" else "cuda"]
    streaming = sc.state_policy == "offload" and sc.residency == "step"
    lora = sc.strategy == "lora"  # (peft's fp32 adapters: no master gradients)
    step_transient = transient(t.groups, streaming, lora, masters, device, compact) // ns
    embed = any(g.kind == "embed" for g in t.groups)  # (every layer in the gradient range)
    # sharded, a trained head takes the plain loss (its gradient is FSDP2's to reduce)
    acts = activations(recipe, replace(lay, chunked_head=False) if shards and t.head else lay,
                       t.active_blocks, ckpt, t.lowest, embed)  # fmt: skip
    # the shards, their gradients and AdamW on the host: the device keeps none of them
    host_side = weights + grads + device_state + step_transient if on_host else 0
    if on_host:
        weights = grads = device_state = step_transient = 0
    # streamed state exists only inside the step: nothing of it during backward
    base = weights + (0 if streaming else device_state)
    chunk = acts.fp32_head_grad
    gx = sharding_extra(lay, t.groups, t.gbytes, device, chunk) if shards else Gathered()
    accum = recipe.training.grad_accum_steps > 1
    phases = {
        "backward": _backward_peak(lay, t, acts, base, ckpt, accum, ns, gx, host_grads=on_host)
    }
    temps = 2 if device == "cpu" else 1  # AdamW's sqrt and quotient (CPU) / one fused
    if streaming and not on_host:  # (cpu_offload: the step runs on the host)
        phases["step"] = (
            weights + streamed(t.groups, t.gbytes, t.sbytes, masters, temps, compact) // ns
        )
    elif not on_host:
        phases["step"] = weights + grads + device_state + step_transient
    if sc.strategy in PROBING:
        phases["probe"] = _probe_peak(lay, acts, gx, weights, on_host)
    phase = max(phases, key=lambda k: phases[k])
    kinds = {
        "weights": weights,
        "gradients": grads if phase != "probe" else 0,
        "optimizer_state": device_state
        if phase == "step" or (phase == "backward" and not streaming)
        else 0,
        "activations": sum(acts.saved) + acts.logits
        if phase != "probe"
        else phases["probe"] - weights,
        "step_transient": step_transient if phase == "step" else 0,
    }
    p = _result(sc, t, device, phases, phase, kinds, lay.params * w // ns, store)
    p.shards = shards
    if on_host:
        h = p.host_kinds
        h["shards_pinned"] = host_side
        p.host_bytes = max(h["weights_at_load"], host_side + h["store_pinned"])
    return p


def _probe_peak(lay: Layout, acts: Acts, gx: Gathered, weights: int, on_host: bool) -> int:
    """Probing: every block in the gradient range, checkpointed, one gradient at a
    time (sharded: what FSDP2 gathers and one unit's whole gradient, as in
    backward), and the temporaries of the largest matrix's squared norm (on the host
    with cpu_offload, where the reduced shard is read)."""
    live = len(lay.blocks) * acts.layer_in + max(
        gx.loss + acts.logits,
        gx.head + acts.logits_grad,
        gx.blocks + gx.reduce + acts.layer_trained + acts.work,
    )
    largest = max(n for b in lay.blocks for n in lay.groups[b].params) * (lay.weight_bytes + 8)
    return weights + live + (0 if on_host else largest)


def _result(
    sc: Scenario,
    t: _Trained,
    device: str,
    phases: dict[str, int],
    phase: str,
    kinds: dict[str, int],
    weights: int,
    store: int,
) -> Plan:
    peak = phases[phase]
    on_cpu = device == "cpu"
    # the two-tier store: the pinned tier holds up to its budget, the rest is on disk
    pinned = store if sc.host_budget is None else min(store, sc.host_budget)
    host_kinds = {
        "store_pinned" if not on_cpu else "store": pinned if sc.target == "cpu" else 0,
        "weights_at_load": 0 if on_cpu else weights,
    }
    host = max(host_kinds.values()) if not on_cpu else peak + host_kinds.get("store", 0)
    offload = sc.state_policy == "offload"
    disk = store if offload and sc.target == "disk" else (store - pinned if offload else 0)
    return Plan(
        strategy=sc.strategy,
        state_policy=sc.state_policy,
        offload_target=sc.target if sc.state_policy == "offload" else None,
        residency=sc.residency if sc.state_policy == "offload" else None,
        embed_head_trained=any(g.kind in ("embed", "head") for g in t.groups),
        label=sc.label,
        device=device,
        device_peak_bytes=int(peak + (host_kinds.get("store", 0) if on_cpu else 0)),
        peak_phase=phase,
        host_bytes=int(host),
        disk_bytes=int(disk),
        kinds={k: int(v) for k, v in kinds.items()},
        phases={k: int(v) for k, v in phases.items()},
        host_kinds={k: int(v) for k, v in host_kinds.items()},
        trainable_params=sum(g.numel for g in t.groups),
        state_bytes_per_param=t.sbytes,
    )


def plan_recipe(
    recipe: Recipe,
    model_config: str | None = None,
    device: str | None = None,
    device_memory_gb: float | None = None,
    all_scenarios: bool = True,
    flag: bool = False,
) -> tuple[Layout, list[Plan]]:
    """Plans for every scenario (or the recipe's own) of a recipe. `flag`: the caller
    offers --model-config (its hints may name it)."""
    from grass_cli.planner.resolve import plan_resolved

    _, lay, plans = plan_resolved(
        recipe, model_config, device, device_memory_gb, all_scenarios, flag
    )
    return lay, plans


def gb(n: int) -> float:
    return n / 1e9
