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
saves only what the input gradient needs (no matmul inputs). The logits cost
12 bytes per token and vocabulary entry at their peak (the logits, the copy of the
shifted logits, the fp32 copy and the log-softmax output of the loss). Layers
below the lowest trained block save nothing, which is why layer-wise training
with frozen embeddings is cheap; the planner assumes the worst draw (the lowest
block among the active ones).

Numbers are bytes. Python, the CUDA context and allocator slack are not modelled:
`benchmarks/plan_accuracy.py` measures how close the prediction is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from grass_cli.model_shape import GroupShape, Layout, build_layout, load_config
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
    fits: bool | None = None
    dominant: str | None = None
    advice: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def scenarios(recipe: Recipe) -> list[Scenario]:
    """Every strategy x state policy worth comparing for this recipe."""
    layerwise = recipe.sampler.strategy if recipe.sampler.strategy in LAYERWISE else "grass"
    target = recipe.optimizer.offload.target
    out = [Scenario("full", "keep"), Scenario("lora", "keep")]
    for strategy in dict.fromkeys(["lisa", layerwise]):
        out += [
            Scenario(strategy, "keep"),
            Scenario(strategy, "drop"),
            Scenario(strategy, "offload", target, "interval"),
            Scenario(strategy, "offload", target, "step"),
        ]
    s = recipe.sampler
    if not (s.train_embeddings and s.train_head):  # what training them would cost
        out.append(Scenario(layerwise, "offload", target, "step", embed_head=True))
    return out


def recipe_scenario(recipe: Recipe) -> Scenario:
    off = recipe.optimizer.offload
    policy = recipe.optimizer.state_policy
    return Scenario(recipe.sampler.strategy, policy, off.target, off.residency)


# ------------------------------------------------------------------------ activations


def _layer_act(lay: Layout, a: int, trainable: bool) -> int:
    """Bytes per token that autograd saves in one decoder layer."""
    h, i, q, kv = lay.hidden, lay.intermediate, lay.q_width, lay.kv_width
    attention = a * (q + 2 * kv + q)  # sdpa saves q, k, v (grouped, not repeated), output
    if trainable:
        norms = 2 * (4 * h + a * h)  # fp32 input + normed output (the matmuls' input)
        return norms + attention + a * q + 4 * a * i  # o_proj input; gate, silu, up, product
    return 2 * 4 * h + attention + 3 * a * i  # silu input, mul's operands


def _logits_peak(lay: Layout, a: int) -> int:
    """Bytes per token at the loss: the logits, the contiguous copy of the shifted
    logits, their fp32 copy (when not fp32 already) and the log-softmax output."""
    return (2 * a + 4 + (4 if a < 4 else 0)) * lay.vocab


# ------------------------------------------------------------------------------ plan


def _streamed_step(
    trained: list[GroupShape], gbytes: int, sbytes: int, masters: bool, temps: int
) -> int:
    """The worst point of a streamed step, parameter by parameter in the engine's
    order: the gradients not yet consumed, this parameter's fp32 gradient and AdamW
    temporaries, and three parameters' state (the previous one's write-back, this
    one's, the next one's prefetch)."""
    units = [n for g in sorted(trained, key=lambda g: g.name) for n in g.params]
    worst = 0
    for k, n in enumerate(units):
        waiting = sum(units[k + 1 :]) * gbytes
        own = n * 4 if masters else n * gbytes  # the fp32 copy, or the gradient itself
        state = sum(units[max(k - 1, 0) : k + 2]) * sbytes
        worst = max(worst, waiting + own + n * 4 * temps + state)
    return worst


def plan(
    recipe: Recipe,
    lay: Layout,
    sc: Scenario,
    device: str = "cuda",
    visited: int | None = None,
    checkpointing: bool | None = None,
) -> Plan:
    """Predict one scenario's peaks. `visited`: blocks whose state `keep` holds
    (default: all of them, which a long enough run reaches)."""
    s = recipe.sampler
    tc = recipe.training
    ckpt = recipe.model.gradient_checkpointing if checkpointing is None else checkpointing
    w = lay.weight_bytes
    a = 2 if (w == 2 or tc.autocast == "bf16") else 4
    tokens = tc.micro_batch_size * recipe.data.max_length
    L = len(lay.blocks)
    groups = lay.groups
    masters = w == 2

    # what trains: (group shapes, bytes per param of grads, of state)
    if sc.strategy == "lora":
        trained = [lay.lora[b] for b in lay.blocks]
        gbytes, sbytes = 4, 8  # peft keeps the adapters in fp32
        active_blocks = L
    else:
        gbytes, sbytes = w, 8 + (4 if masters else 0)
        if sc.strategy == "full":
            always = [g for g in groups.values() if g.kind != "block"]
            active_blocks = L
        else:
            if sc.embed_head:
                always = _always(lay, True, True, True)
            else:
                always = _always(lay, s.train_embeddings, s.train_norm, s.train_head)
            active_blocks = min(s.gamma, L)
        trained = always + [groups[b] for b in lay.blocks[:active_blocks]]
    weights = lay.params * w
    grads_of = {g.name: g.numel * gbytes for g in trained}
    grads = sum(grads_of.values())

    # optimizer state on the device (moments, fp32 masters) and in the store
    state_of = {g.name: g.numel * sbytes for g in trained}
    if sc.strategy in ("full", "lora"):
        device_state = sum(state_of.values())
    elif sc.state_policy == "keep":
        nvis = L if visited is None else max(active_blocks, min(visited, L))
        device_state = sum(state_of[g.name] for g in trained if g.kind != "block")
        device_state += sum(groups[b].numel * sbytes for b in lay.blocks[:nvis])
    elif sc.state_policy == "offload" and sc.residency == "step":
        chunks = sorted((n * sbytes for g in trained for n in g.params), reverse=True)
        device_state = sum(chunks[:3])  # (the sweep below finds the actual worst point)
    else:  # drop, offload-interval: the active groups' state only
        device_state = sum(state_of.values())
    all_trainable = [g for g in groups.values() if g.kind == "block"] + [
        g for g in trained if g.kind not in ("block", "lora")
    ]
    store = 0
    if sc.state_policy == "offload" and sc.strategy not in ("full", "lora"):
        store = sum(g.numel * sbytes for g in all_trainable)

    # step transient: fp32 grads for masters + one AdamW temporary
    largest_param = max(n for g in trained for n in g.params)
    largest_group = max(g.numel for g in trained)
    streaming = sc.state_policy == "offload" and sc.residency == "step"
    unit = largest_param if (streaming or device == "cpu") else largest_group
    fp32_grads = (largest_param if streaming else largest_group) * 4 if masters else 0
    if sc.strategy == "lora":
        fp32_grads = 0
    step_transient = fp32_grads + unit * 4

    # activations and the backward sweep (head first, down to block 0: the worst draw
    # has the lowest block active, so every block is in the gradient range)
    logits = _logits_peak(lay, a) * tokens
    layer_t = _layer_act(lay, a, True) * tokens
    layer_f = _layer_act(lay, a, False) * tokens
    layer_in = a * lay.hidden * tokens
    per_layer = [layer_t if k < active_blocks else layer_f for k in range(L)]
    saved = [layer_in if ckpt else per_layer[k] for k in range(L)]
    work = a * tokens * (2 * lay.hidden + 2 * lay.intermediate)  # grads in flight in a layer
    head_grads = sum(v for n, v in grads_of.items() if groups.get(n) and groups[n].kind != "block")
    block_grads = [grads_of.get(b, 0) for b in lay.blocks]
    accum = tc.grad_accum_steps > 1
    # streamed state exists only inside the step: nothing of it during backward
    base = weights + (0 if streaming else device_state)
    g_before = grads if accum else 0
    peak_bwd = base + sum(saved) + logits + max(g_before, head_grads)
    for k in range(L - 1, -1, -1):
        live = sum(saved[:k]) + (per_layer[k] if ckpt else saved[k]) + work
        produced = head_grads + sum(block_grads[k:])
        peak_bwd = max(peak_bwd, base + live + max(g_before, produced))
    act_peak = sum(saved) + logits
    temps = 2 if device == "cpu" else 1  # AdamW's sqrt and quotient (CPU) / one fused
    if streaming:
        peak_step = weights + _streamed_step(trained, gbytes, sbytes, masters, temps)
    else:
        peak_step = weights + grads + device_state + step_transient

    phases = {"backward": peak_bwd, "step": peak_step}
    if sc.strategy in PROBING:
        # all blocks in the gradient range, checkpointed; one gradient at a time
        probe_live = L * layer_in + max(logits, layer_t + work)
        largest_block_param = max(n for b in lay.blocks for n in groups[b].params)
        phases["probe"] = weights + probe_live + largest_block_param * (w + 8)
    phase = max(phases, key=lambda k: phases[k])
    peak = phases[phase]
    kinds = {
        "weights": weights,
        "gradients": grads if phase != "probe" else 0,
        # (streamed state exists only inside the step)
        "optimizer_state": device_state
        if phase == "step" or (phase == "backward" and not streaming)
        else 0,
        "activations": act_peak if phase != "probe" else phases["probe"] - weights,
        "step_transient": step_transient if phase == "step" else 0,
    }
    on_cpu = device == "cpu"
    host_kinds = {
        "store_pinned" if not on_cpu else "store": store if sc.target == "cpu" else 0,
        "weights_at_load": 0 if on_cpu else weights,
    }
    host = max(host_kinds.values()) if not on_cpu else peak + host_kinds.get("store", 0)
    disk = store if sc.state_policy == "offload" and sc.target == "disk" else 0
    return Plan(
        strategy=sc.strategy,
        state_policy=sc.state_policy,
        offload_target=sc.target if sc.state_policy == "offload" else None,
        residency=sc.residency if sc.state_policy == "offload" else None,
        embed_head_trained=any(g.kind in ("embed", "head") for g in trained),
        label=sc.label,
        device=device,
        device_peak_bytes=int(peak + (host_kinds.get("store", 0) if on_cpu else 0)),
        peak_phase=phase,
        host_bytes=int(host),
        disk_bytes=int(disk),
        kinds={k: int(v) for k, v in kinds.items()},
        phases={k: int(v) for k, v in phases.items()},
        host_kinds={k: int(v) for k, v in host_kinds.items()},
        trainable_params=sum(g.numel for g in trained),
    )


def _always(lay: Layout, embeddings: bool, norm: bool, head: bool) -> list[GroupShape]:
    g = lay.groups
    out = []
    emb = g.get("embed")
    if emb is not None and (embeddings or (emb.tied and head)):
        out.append(emb)
    if norm and "norm" in g:
        out.append(g["norm"])
    if head and "head" in g:
        out.append(g["head"])
    return out


ADVICE = {
    "weights": "the weights alone are too big: use model.dtype: bfloat16, or a bigger device",
    "activations": "turn on model.gradient_checkpointing, or lower training.micro_batch_size "
    "or data.max_length",
    "optimizer_state": "use optimizer.state_policy: offload with optimizer.offload.residency: "
    "step (or lower sampler.gamma)",
    "gradients": "lower sampler.gamma, or freeze the embeddings and head "
    "(sampler.train_embeddings / train_head: false)",
    "step_transient": "use optimizer.offload.residency: step (steps one weight matrix at a time)",
}


def judge(p: Plan, device_memory_bytes: int | None) -> Plan:
    """Fill in the verdict: fits or not, and what dominates."""
    p.dominant = max(p.kinds, key=lambda k: p.kinds[k])
    if device_memory_bytes is not None:
        p.fits = p.device_peak_bytes <= device_memory_bytes
        if not p.fits:
            p.advice = ADVICE[p.dominant]
    return p


def plan_recipe(
    recipe: Recipe,
    model_config: str | None = None,
    device: str | None = None,
    device_memory_gb: float | None = None,
    all_scenarios: bool = True,
) -> tuple[Layout, list[Plan]]:
    """Plans for every scenario (or the recipe's own) of a recipe."""
    config, name = load_config(recipe, model_config)
    lay = build_layout(recipe, config, name)
    if device is None:
        device = "cpu" if recipe.training.device == "cpu" else "cuda"
    budget = None if device_memory_gb is None else int(device_memory_gb * 1e9)
    chosen = scenarios(recipe) if all_scenarios else [recipe_scenario(recipe)]
    return lay, [judge(plan(recipe, lay, sc, device), budget) for sc in chosen]


def gb(n: int) -> float:
    return n / 1e9
