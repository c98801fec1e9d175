"""GRASS CLI: memory-efficient full-parameter fine-tuning by adaptive layer-wise sampling.

Importing this package must stay cheap: no torch, no transformers.
"""

__version__ = "0.1.0"
