"""LoRA baseline (`sampler.strategy: lora`), built on peft.

The point is a like-for-like comparison: LoRA runs on the same engine, data,
schedule, optimizer and telemetry as GRASS. So the model is wrapped with peft's
own LoRA (the implementation users compare against), and everything else is the
engine's usual machinery:

- LoRA goes on linear layers *inside the decoder blocks* only (never the LM head
  or embeddings), so each adapter belongs to exactly one block. The block map's
  `block.i` group holds block i's lora_A / lora_B weights and nothing else; the
  base weights are frozen and in no trained group. The full sampler then trains
  every block's adapters at every step, and the importance tracker measures the
  MGN of the adapter gradients.
- The engine trains the peft-injected *base* model (a plain transformers class
  whose targeted layers now add their adapters), not the `PeftModel` wrapper:
  the wrapper's `forward(**kwargs)` hides the base model's signature, which the
  evaluator's generation loop inspects (position ids, cache, logits_to_keep).
- Saved models (final and in checkpoints) are plain HF folders with the adapters
  merged, so `grass eval` and transformers load them like any other strategy's;
  the unmerged adapter goes beside them in `adapter/` (peft's format), and is
  what a resume restores: the base weights never change, so they are read again
  from `model.path`.

peft is imported only when a LoRA run needs it; the parameter count does not
need it at all.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from grass_cli.errors import GrassError, ModelError, RecipeError
from grass_cli.recipe import LoraConfig
from grass_cli.sampling.blocks import BlockMap, build_block_map, find_blocks

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_DIR = "adapter"


def _linear_types() -> tuple[type[nn.Module], ...]:
    """nn.Linear, and transformers' Conv1D (GPT-2's linear layers, weight stored
    transposed), which peft adapts too."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def target_module_names(
    model: nn.Module, cfg: LoraConfig | None = None, blocks_attr: str | None = None
) -> list[str]:
    """Full names of the linear layers LoRA adapts: inside the decoder blocks only.

    `all-linear` is every linear layer in the blocks; a list selects the layers
    whose name, relative to a block, is or ends with one of its entries
    (`q_proj`, `self_attn.q_proj`). An entry that selects nothing is an error
    rather than a silently smaller adapter.
    """
    cfg = cfg or LoraConfig()
    layers, path = find_blocks(model, blocks_attr)
    linear = _linear_types()
    wanted = None if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    names: list[str] = []
    available: set[str] = set()
    used: set[str] = set()
    for i, layer in enumerate(layers):
        for rel, module in layer.named_modules():
            if not rel or not isinstance(module, linear):
                continue
            available.add(rel)
            hits = [t for t in wanted or [] if rel == t or rel.endswith("." + t)]
            if wanted is None or hits:
                used.update(hits)
                names.append(f"{path}.{i}.{rel}")
    missing = [t for t in wanted or [] if t not in used]
    if missing or not names:
        what = (
            f"lora.target_modules {missing} match no linear layer in the decoder blocks"
            if missing
            else "the decoder blocks have no linear layer for LoRA to adapt"
        )
        raise RecipeError(
            what,
            where="lora.target_modules",
            hint="use all-linear, or names of the blocks' linear layers: "
            + ", ".join(sorted(available)[:12]),
        )
    return names


def _in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer; Conv1D stores (in, out)."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])


def lora_trainable_params(
    model: nn.Module, cfg: LoraConfig | None = None, blocks_attr: str | None = None
) -> int:
    """Trainable parameters LoRA with `cfg` would add to `model` (a plain, unwrapped
    transformers model): r x (in + out) per adapted layer (lora_A is r x in,
    lora_B is out x r, no bias).

    Computed from shapes alone, so a model built on the meta device (no memory)
    works, and a benchmark can pick `r` so LoRA trains as many parameters as
    GRASS's gamma blocks (see `lora_rank_for`).
    """
    cfg = cfg or LoraConfig()
    total = 0
    for name in target_module_names(model, cfg, blocks_attr):
        i, o = _in_out(model.get_submodule(name))
        total += cfg.r * (i + o)
    return total


def lora_rank_for(
    model: nn.Module,
    n_params: int,
    cfg: LoraConfig | None = None,
    blocks_attr: str | None = None,
) -> int:
    """The rank r (at least 1) whose trainable-parameter count is closest to
    `n_params`, with `cfg`'s target modules: the count is linear in r."""
    base = (cfg or LoraConfig()).model_copy(update={"r": 1})
    per_rank = lora_trainable_params(model, base, blocks_attr)
    return max(1, round(n_params / per_rank))


# ---------------------------------------------------------------------- wrapping


def wrap(model: nn.Module, cfg: LoraConfig | None, blocks_attr: str | None = None) -> PeftModel:
    """Add LoRA adapters to `model` in place and return peft's wrapper around it.

    Base weights are frozen by peft; adapter init draws from the torch RNG, which
    the engine has seeded, so the same seed gives the same adapters.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    cfg = cfg or LoraConfig()
    targets = target_module_names(model, cfg, blocks_attr)
    conv1d = not any(isinstance(model.get_submodule(n), nn.Linear) for n in targets)
    peft_cfg = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        # Full names: exactly the layers chosen above, whatever else shares a leaf name.
        target_modules=targets,
        bias="none",
        # GPT-2's Conv1D stores weights transposed; peft would flip it with a warning.
        fan_in_fan_out=conv1d,
    )
    with warnings.catch_warnings():
        # peft calls transformers APIs that transformers has deprecated (FutureWarning);
        # the library never prints.
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, peft_cfg)


def adapter_block_map(peft_model: PeftModel, blocks_attr: str | None = None) -> BlockMap:
    """The base model's block map with each block's group cut down to its adapters.

    Embedding / norm / head groups keep their (frozen) base weights; the engine
    never trains them for LoRA. Base block weights are in no group: nothing may
    step them.
    """
    base = peft_model.get_base_model()
    block_map = build_block_map(base, blocks_attr)
    in_blocks: set[int] = set()
    for group in block_map.blocks:
        group.params = [(n, p) for n, p in group.params if p.requires_grad]
        in_blocks.update(id(p) for _, p in group.params)
    stray = [n for n, p in base.named_parameters() if p.requires_grad and id(p) not in in_blocks]
    if stray or not in_blocks:
        raise ModelError(
            f"LoRA adapters outside the decoder blocks ({stray[:3]})"
            if stray
            else "LoRA added no trainable parameter to the decoder blocks",
            where="lora.target_modules",
        )
    return block_map


# ------------------------------------------------------------------ save / load


@torch.no_grad()
def merged_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original names, adapters merged in:
    W + (alpha / r) B A for every adapted layer; the live model is not touched.

    Merged weights are built on the CPU, one layer at a time, so saving never needs
    a second copy of the model on the device (peft's merge_and_unload on a copy
    would); the sum is taken in float32 and rounded once to the weight's dtype.
    """
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    adapter_keys = {
        f"{name}.{n}"
        for name, m in layers.items()
        for n, _ in m.named_parameters()
        if not n.startswith("base_layer.")
    }
    out: dict[str, torch.Tensor] = {}
    for key, t in base.state_dict().items():
        if key in adapter_keys:
            continue
        owner, sep, leaf = key.partition(".base_layer.")
        if sep and owner in layers:
            key = f"{owner}.{leaf}"
            if leaf == "weight":
                merged = t.detach().to("cpu", torch.float32, copy=True)
                merged += layers[owner].get_delta_weight(adapter).to("cpu", torch.float32)
                t = merged.to(t.dtype)
        out[key] = t
    return out


def save(peft_model: PeftModel, folder: Path) -> None:
    """The merged model as a plain HF folder, and the adapter in `folder/adapter/`.

    The caller writes the tokenizer (and silences transformers' progress bar)."""
    base = peft_model.get_base_model()
    base.save_pretrained(folder, state_dict=merged_state_dict(peft_model), safe_serialization=True)
    peft_model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)


def load_adapter(peft_model: PeftModel, folder: Path, where: str) -> None:
    """Restore adapter weights saved by `save` (exact copies: a resume is bit-identical).

    Every adapter tensor of the model must be in the file with its shape, and
    nothing else: a partial load would silently train from a mix of states."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        weights = load_file(folder / "adapter_model.safetensors", device="cpu")
    except OSError as e:
        raise GrassError(f"cannot read the LoRA adapter: {e}", where=where) from None
    expected: dict[str, Any] = get_peft_model_state_dict(peft_model)
    misfit = sorted(
        k
        for k in weights.keys() | expected.keys()
        if k not in weights or k not in expected or weights[k].shape != expected[k].shape
    )
    if misfit:
        raise GrassError(
            f"checkpoint LoRA adapter does not fit this model ({misfit[:3]})",
            where=where,
            hint="resume with the recipe the run was started with",
        )
    set_peft_model_state_dict(peft_model, weights)
