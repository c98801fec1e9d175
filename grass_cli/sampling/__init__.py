"""Which blocks train: the block map, layer importance (MGN), the samplers, probing.

blocks.py (every parameter in exactly one group: embed, norm, head, block.i),
importance.py (MGN read in backward hooks, EMA refresh, sampling probabilities),
samplers.py (full, lisa, grass, grass-static, cyclic: `active(step)`), probing.py
(forward/backward of a step and GRASS probing, shared with inspect-importance).
"""

from grass_cli.sampling.samplers import (
    CyclicSampler,
    FullSampler,
    GrassSampler,
    LisaSampler,
    Sampler,
    StaticGrassSampler,
    build_sampler,
    draw_distinct,
)

__all__ = [
    "CyclicSampler",
    "FullSampler",
    "GrassSampler",
    "LisaSampler",
    "Sampler",
    "StaticGrassSampler",
    "build_sampler",
    "draw_distinct",
]
