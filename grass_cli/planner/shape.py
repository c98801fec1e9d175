"""A model's shape for the memory planner: its parameter groups (the same block map
training uses, built on the meta device, so no weight is read), its LoRA adapters,
and the widths its activations have. Configs come from `model.path`, or from a
model preset (grass_cli/presets/), a config.json or a hub id given instead."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_cli.errors import GrassError
from grass_cli.presets import Preset, close_presets, find_preset, get_preset
from grass_cli.recipe import LoraConfig, Recipe


@dataclass
class GroupShape:
    name: str
    kind: str  # embed | norm | head | block | lora
    params: list[int]  # numel of each parameter, in the engine's order
    tied: bool = False

    @property
    def numel(self) -> int:
        return sum(self.params)


@dataclass
class Layout:
    """What the planner needs of a model: its groups and its activation shapes."""

    name: str
    groups: dict[str, GroupShape]
    blocks: list[str]
    hidden: int
    intermediate: int
    q_width: int  # heads x head_dim
    kv_width: int  # kv heads x head_dim
    vocab: int
    weight_bytes: int  # per parameter, from model.dtype
    params: int
    lora: dict[str, GroupShape] = field(default_factory=dict)  # block name -> adapters
    chunked_head: bool = False  # the loss runs in chunks of rows (evaluate/loss.py)


def load_config(
    recipe: Recipe, model_config: str | None = None, flag: bool = False, download: bool = False
) -> tuple[Any, str]:
    """The transformers config of `model.path` (or of `model_config`: a preset name,
    a config.json file or a hub id), read without loading any weight.

    `flag`: the caller offers `--model-config` (only `grass plan` does), so a model
    whose config cannot be read may be planned from another shape. `download`: a
    preset in model.path must be reachable too (train: its weights come from the
    hub), not just planned from its shipped shape (validate, plan).
    """
    from grass_cli.models import quiet_hf

    quiet_hf()
    if model_config is not None:
        return _given_config(recipe, model_config)
    src = recipe.model.path
    # a preset's name or hub id: planned from its shipped shape (no network)
    preset = None if Path(src).expanduser().exists() else find_preset(src)
    if preset is not None:
        if download:
            from grass_cli.hub import hub_source

            shown = f" (preset of {preset.hub_id})" if src != preset.hub_id else ""
            hub_source(preset.hub_id, f"model.path: {src}{shown}")
        return _preset_config(preset), preset.name
    try:
        return _path_config(recipe, src), src
    except GrassError as e:
        close = close_presets(src) if "/" not in src else []
        if not close:
            raise
        raise GrassError(
            "not a model preset, a folder or a hub model the hub has",
            where=f"model.path: {src}",
            hint=f"did you mean {' or '.join(close)}? (`grass init --list-presets`)",
        ) from e
    except (OSError, ValueError) as e:
        other = "pass --model-config with a preset, a config.json or a hub id, or " if flag else ""
        raise GrassError(
            f"cannot read the model's config ({str(e).splitlines()[0]})",
            where=f"model.path: {src}",
            hint=f"point model.path at a model folder, a cached hub id or a preset ({other}"
            "`grass plan --help` lists the presets)",
        ) from None


def _preset_config(preset: Preset) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(**preset.config)


def _given_config(recipe: Recipe, model_config: str) -> tuple[Any, str]:
    """--model-config: a config.json file, a preset name, or a hub id (its config.json
    from the local cache, or one quick request)."""
    from transformers import AutoConfig

    where = f"--model-config {model_config}"
    path = Path(model_config).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return AutoConfig.for_model(**data), path.stem
        except (ValueError, KeyError, TypeError) as e:
            raise GrassError(f"not a model config: {e}", where=str(path)) from None
    preset = find_preset(model_config)
    if preset is not None:
        return _preset_config(preset), preset.name
    if "/" not in model_config or path.suffix:
        get_preset(model_config, where)  # raises: unknown preset, with the close ones
    from grass_cli.hub import hub_source

    try:
        target = hub_source(model_config, where)
        return AutoConfig.from_pretrained(
            target, trust_remote_code=recipe.model.trust_remote_code
        ), model_config
    except (OSError, ValueError) as e:
        raise GrassError(
            f"cannot read this hub model's config ({str(e).splitlines()[0]})",
            where=where,
            hint="give a preset name, a config.json file, or a hub id the hub has",
        ) from None


def _path_config(recipe: Recipe, src: str) -> Any:
    """model.path's config: the embedded model, a .gguf file, a folder or a hub id."""
    from transformers import AutoConfig

    from grass_cli.models import EMBEDDED, _gguf_cache_folder, embedded_gguf

    if src in EMBEDDED:
        gguf = embedded_gguf(src)
        cached = _gguf_cache_folder(gguf)
        if (cached / "config.json").exists():
            return AutoConfig.from_pretrained(cached)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    p = Path(src).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            what = "is a folder, not a .gguf file" if p.is_dir() else "does not exist"
            raise GrassError(
                f"GGUF file not found: {p} {what}",
                where=f"model.path: {src}",
                hint="check the path of the .gguf file",
            )
        return AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
    from grass_cli.hub import hub_source  # a hub id: the cache first, no retry storm

    target = str(p) if p.is_dir() else hub_source(src, f"model.path: {src}")
    return AutoConfig.from_pretrained(target, trust_remote_code=recipe.model.trust_remote_code)


def _weight_bytes(recipe: Recipe, config: Any) -> int:
    name = recipe.model.dtype
    if name == "auto":
        name = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", "float32"))
    return 2 if ("bfloat16" in name or "float16" in name) else 4


def build_layout(recipe: Recipe, config: Any, name: str) -> Layout:
    """The model's groups, from a model built on the meta device (no weights)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from grass_cli.evaluate.loss import head_is_plain
    from grass_cli.sampling.blocks import build_block_map, find_blocks

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    bm = build_block_map(model, recipe.model.blocks_attr)
    groups = {
        g.name: GroupShape(g.name, g.kind, [p.numel() for p in g.tensors], g.tied)
        for g in bm.groups()
    }
    # LoRA adapters, for the lora strategy's plan: cheap to count, so always counted
    lc = recipe.lora or LoraConfig()
    lora: dict[str, GroupShape] = {}
    layers, _ = find_blocks(model, recipe.model.blocks_attr)
    for block, layer in zip(bm.blocks, layers, strict=True):
        adapters: list[int] = []
        for mod_name, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            if lc.target_modules == "all-linear" or mod_name.split(".")[-1] in lc.target_modules:
                adapters += [lc.r * mod.in_features, lc.r * mod.out_features]
        lora[block.name] = GroupShape(block.name, "lora", adapters)
    text = getattr(config, "text_config", None) or config
    hidden = int(getattr(text, "hidden_size", None) or text.n_embd)
    heads = int(getattr(text, "num_attention_heads", None) or text.n_head)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    inter = int(
        getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    )
    return Layout(
        name=name,
        groups=groups,
        blocks=[b.name for b in bm.blocks],
        hidden=hidden,
        intermediate=inter,
        q_width=heads * head_dim,
        kv_width=kv_heads * head_dim,
        vocab=int(text.vocab_size),
        weight_bytes=_weight_bytes(recipe, config),
        params=sum(p.numel() for p in model.parameters()),
        lora=lora,
        # (a sharded run computes the plain logits: evaluate/loss.py)
        chunked_head=head_is_plain(model.config)
        and recipe.distributed.sharding != "fsdp"
        and type(model.get_output_embeddings()) is nn.Linear,
    )


def always_groups(lay: Layout, embeddings: bool, norm: bool, head: bool) -> list[GroupShape]:
    """The non-block groups a layer-wise run trains (the engine's BlockMap.always_train,
    on shapes): a tied embedding trains when either side is on."""
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
