"""The recipe: pydantic models mirroring the YAML sections, loading, overrides, errors.

Every section forbids unknown keys so that a typo fails at once with a "did you
mean" hint instead of silently training with a default. All validation errors are
gathered into one report before anything heavy (torch, a model) is loaded.
This package must not import torch: `grass validate` and `grass --help` stay fast.

    base.py      rules every section shares (booleans and inf/nan refused for
                 numbers, `~` in paths)
    sections.py  the section models and `Recipe` (model_config.py, data_config.py,
                 lora_config.py, distributed_config.py, wandb_config.py: the model,
                 data, lora, distributed and output.wandb sections)
    keys.py      every dotted key; "did you mean" suggestions
    loading.py   YAML (duplicate keys refused), overrides, one error report
"""

from __future__ import annotations

from grass_cli.recipe.base import EMBEDDED_SMOLLM2, Section, expand_home
from grass_cli.recipe.keys import all_keys, did_you_mean, suggest_key
from grass_cli.recipe.loading import (
    DuplicateKeyError,
    UniqueKeyLoader,
    apply_overrides,
    format_error,
    load_recipe,
    load_yaml,
    parse_override,
    parse_yaml,
    validate_dict,
)
from grass_cli.recipe.model_config import ModelConfig
from grass_cli.recipe.sections import (
    LAYERWISE,
    PROBING,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EvalSection,
    LoraConfig,
    OffloadConfig,
    OptimizerConfig,
    OutputConfig,
    Recipe,
    SamplerConfig,
    Strategy,
    TrainingConfig,
)

__all__ = [
    "EMBEDDED_SMOLLM2",
    "LAYERWISE",
    "PROBING",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "DuplicateKeyError",
    "EvalSection",
    "LoraConfig",
    "ModelConfig",
    "OffloadConfig",
    "OptimizerConfig",
    "OutputConfig",
    "Recipe",
    "SamplerConfig",
    "Section",
    "Strategy",
    "TrainingConfig",
    "UniqueKeyLoader",
    "all_keys",
    "apply_overrides",
    "did_you_mean",
    "expand_home",
    "format_error",
    "load_recipe",
    "load_yaml",
    "parse_override",
    "parse_yaml",
    "suggest_key",
    "validate_dict",
]
