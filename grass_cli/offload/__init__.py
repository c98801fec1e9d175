"""Optimizer state and where it waits: block-wise AdamW and the offload stores.

optimizer.py (BlockAdamW: one AdamW per group, stepped only when active; the state
policy keep / drop / offload and the residency interval / step), group_state.py
(a group's state, moved one parameter at a time), store.py (CpuStore: exact pinned
host slabs and a side CUDA stream; DiskStore: memory-mapped files).
"""
