"""Compact AdamW moments (`optimizer.state_dtype`): bf16 or 8-bit instead of fp32.

The moments are two thirds of what an offloaded run keeps per trained parameter
(two fp32 moments, 8 bytes, beside a 4-byte fp32 master of bf16 weights), and
they are what the store holds for every block the run has visited. Compact
moments shrink that store, its disk tier and the checkpoints, which carry them as
they are (plain tensors: the store, the disk tier and safetensors take them
without a conversion, so a resume continues from the very bytes it stopped at).

- `bf16`: each moment kept in bfloat16 (4 bytes a parameter instead of 8). The
  arithmetic is torch's own fused AdamW, in fp32, on one parameter's upcast
  moments at a time; the moments are rounded back to bf16 after the update. The
  fp32 master of bf16 weights is kept, so the weight update itself is as exact as
  with fp32 moments: only the moments' precision changes (8 mantissa bits: the
  second moment's square root, the part that matters, is off by at most 0.2%).
- `8bit`: bitsandbytes' blockwise 8-bit AdamW (Dettmers et al., 2022): each
  moment in one byte with an fp32 scale per 256 values (2.03 bytes a parameter
  instead of 8). Tensors under 4096 values (norms) keep fp32 moments, as
  bitsandbytes does. Chosen over torchao's 8-bit AdamW, which keeps its state in
  tensor subclasses (the store and the checkpoints would have to take them
  apart) and compiles each parameter shape on its first step; on this project's
  CPU the two step at about the same speed (benchmarks/compact_states.py).
"""

from __future__ import annotations

from typing import Any

import torch

# Bytes a parameter for AdamW's two moments, by state_dtype. bitsandbytes' 8-bit
# states add one fp32 absmax per 256 values to each moment's byte.
MOMENT_BYTES: dict[str, float] = {"fp32": 8.0, "bf16": 4.0, "8bit": 2.0 + 2 * 4 / 256}


def state_bytes(state_dtype: str, weight_bytes: int, master: bool = True) -> float:
    """AdamW's bytes per trained parameter: the moments, plus the fp32 master copy a
    16-bit weight is stepped through (`master`: peft keeps LoRA's adapters in fp32, so
    LoRA has none). The one rule the planner and the optimizer's store sizing share."""
    return MOMENT_BYTES[state_dtype] + (4 if master and weight_bytes < 4 else 0)


# Temporaries a step makes per parameter of the matrix being updated, beyond fp32
# AdamW's: bf16 moments upcast to fp32 (8); bitsandbytes' CPU path dequantizes both
# moments and upcasts the weight and gradient (20), its CUDA kernel works in place.
# Measured: the process's high-water mark over 3 steps of an 8192 x 4096 matrix.
STEP_TEMP_BYTES: dict[str, dict[str, int]] = {
    "fp32": {"cpu": 0, "cuda": 0},
    "bf16": {"cpu": 8, "cuda": 8},
    "8bit": {"cpu": 20, "cuda": 0},
}


class BF16MomentsAdamW(torch.optim.AdamW):
    """torch's AdamW with its two moments stored in bfloat16.

    Each step upcasts one parameter's moments to fp32, runs torch's AdamW kernel
    (fused where the device has one) on them, and rounds them back, so at most one
    parameter's fp32 moments exist at a time beside the bf16 ones."""

    def __init__(self, params: Any, fused: bool = False, **kw: Any):
        super().__init__(params, **kw)
        self._fused_kernel = fused  # torch's flag would make step() refuse bf16 state

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """One AdamW update of every parameter with a gradient (no closure)."""
        from torch.optim.adamw import adamw as adamw_fn

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                m, v = state["exp_avg"].float(), state["exp_avg_sq"].float()
                fused = self._fused_kernel and p.device.type in ("cpu", "cuda")
                adamw_fn([p], [p.grad], [m], [v], [], [state["step"]], fused=fused or None,
                         foreach=False, amsgrad=False, beta1=beta1, beta2=beta2,
                         lr=group["lr"], weight_decay=group["weight_decay"],
                         eps=group["eps"], maximize=group["maximize"])  # fmt: skip
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts loaded state to the parameter's dtype (fp32); the moments go
        back to bf16, exactly (they were bf16 values when saved)."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                if isinstance(st.get(k), torch.Tensor) and st[k].dim() > 0:
                    st[k] = st[k].to(torch.bfloat16)


def check_eight_bit() -> None:
    """Pre-flight: `state_dtype: 8bit` needs bitsandbytes, known before the model loads."""
    import importlib.util

    from grass_cli.errors import GrassError

    if importlib.util.find_spec("bitsandbytes") is None:
        raise GrassError(
            "optimizer.state_dtype: 8bit needs the bitsandbytes package, which is not installed",
            where="optimizer.state_dtype",
            hint="pip install 'grass-cli[compact]' (or bitsandbytes), or use state_dtype: bf16",
        )


def eight_bit_adamw(param_groups: list[dict], kw: dict[str, Any]) -> torch.optim.Optimizer:
    """bitsandbytes' blockwise 8-bit AdamW over these groups."""
    import logging

    check_eight_bit()
    # bitsandbytes logs, on import, that a 4-bit CPU matmul kernel it looks for on
    # the hub is missing: 4-bit matmuls are not used here, so that line is noise
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(param_groups, **kw)
