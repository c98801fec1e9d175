"""The recipe's lora section: the adapters of `sampler.strategy: lora`.

A module of its own (sections.py holds the others) because only the LoRA
baseline (grass_cli/lora.py) and the planner read it. No peft import here: the
recipe validates without loading it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from grass_cli.recipe.base import Section


class LoraConfig(Section):
    """LoRA adapters for `sampler.strategy: lora` (the baseline GRASS is compared with).

    Ignored by every other strategy. Adapters go on linear layers inside the
    decoder blocks only, so each belongs to one block and the same telemetry
    (per-block MGN, trainable parameters, optimizer state) describes both methods.
    """

    # Rank of each adapter: trainable parameters are r x (in + out) per adapted layer.
    r: int = Field(16, ge=1)
    # Scaling numerator: the adapter's update is (alpha / r) B A.
    alpha: float = Field(32.0, gt=0)
    # Dropout on the adapters' input (uses the torch RNG, which checkpoints restore).
    dropout: float = Field(0.0, ge=0, lt=1)
    # `all-linear`: every linear layer in the blocks (never the LM head or
    # embeddings); or names relative to a block, e.g. [q_proj, v_proj].
    target_modules: list[str] | Literal["all-linear"] = "all-linear"

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        # One clear message instead of pydantic's two union branches.
        if v == "all-linear":
            return v
        if not isinstance(v, list) or not v or not all(isinstance(t, str) and t.strip() for t in v):
            raise ValueError(
                "must be all-linear or a non-empty list of module names, e.g. [q_proj, v_proj]"
            )
        return v
