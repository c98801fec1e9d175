"""`grass plan`'s memory model: a model's shape from its config, and the peaks it predicts.

shape.py (the groups and widths of a model built on the meta device, no weights;
the shipped shapes in shapes/), memory.py (peak device and host memory by phase and
kind, per strategy x state policy, and the verdict against a device's memory).
"""
