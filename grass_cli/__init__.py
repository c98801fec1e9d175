"""GRASS CLI: memory-efficient full-parameter fine-tuning by adaptive layer-wise sampling.

Importing this package must stay cheap: no torch, no transformers. The public Python
API (grass_cli/api.py, docs/python-api.md) is loaded on first use of one of its
names: `from grass_cli import Grass`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The stable names (semver): where each lives.
_PUBLIC = {
    "Grass": "grass_cli.api",
    "Switch": "grass_cli.api",
    "SamplerConfig": "grass_cli.recipe",
    "OptimizerConfig": "grass_cli.recipe",
    "BlockMap": "grass_cli.sampling.blocks",
    "build_block_map": "grass_cli.sampling.blocks",
    "ImportanceTracker": "grass_cli.sampling.importance",
    "Sampler": "grass_cli.sampling",
    "build_sampler": "grass_cli.sampling",
    "BlockAdamW": "grass_cli.offload.optimizer",
}
__all__ = [
    "BlockAdamW",
    "BlockMap",
    "Grass",
    "ImportanceTracker",
    "OptimizerConfig",
    "Sampler",
    "SamplerConfig",
    "Switch",
    "build_block_map",
    "build_sampler",
]

if TYPE_CHECKING:
    from grass_cli.api import Grass, Switch
    from grass_cli.offload.optimizer import BlockAdamW
    from grass_cli.recipe import OptimizerConfig, SamplerConfig
    from grass_cli.sampling import Sampler, build_sampler
    from grass_cli.sampling.blocks import BlockMap, build_block_map
    from grass_cli.sampling.importance import ImportanceTracker


def __getattr__(name: str) -> Any:
    """The public names, imported when first asked for (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'grass_cli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
