"""torch's AdamW as every block group uses it: built fused where a kernel exists, in
the recipe's moment dtype, and stepped several groups per fused call.

Apart from offload/optimizer.py (which decides when groups step and where their
state lives) because these are the arithmetic, tested bit for bit against torch.
"""

from __future__ import annotations

import torch

from grass_cli.recipe import OptimizerConfig

# Devices with a fused AdamW kernel (torch 2.4+); torch checks this only at the
# first step, too late to fall back, so it is checked here when the group is made.
FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu")


def adamw(param_groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """torch's AdamW, fused where torch has a kernel for these parameters (`cfg.fused`),
    with its moments in the recipe's `state_dtype` (offload/compact.py).

    The fused kernel updates a group's tensors in one call instead of a handful
    of elementwise ops per tensor: on this project's 2-core CPU it halves the
    optimizer's share of a step. Parameters without a kernel (a device outside
    FUSED_DEVICES, a non-float dtype) get the default implementation, so
    `fused: true` never stops a run.
    """
    from grass_cli.offload.compact import BF16MomentsAdamW, eight_bit_adamw

    kw = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps}
    params = [p for g in param_groups for p in g["params"]]
    fused = cfg.fused and all(
        p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params
    )
    if cfg.state_dtype == "8bit":
        return eight_bit_adamw(param_groups, kw)
    if cfg.state_dtype == "bf16":
        return BF16MomentsAdamW(param_groups, fused=fused, **kw)
    if fused:
        return torch.optim.AdamW(param_groups, fused=True, **kw)
    return torch.optim.AdamW(param_groups, **kw)


def step_together(optimizers: list[torch.optim.Optimizer]) -> None:
    """Step several AdamW instances (one per active group) with one fused call per
    set of hyperparameters, instead of one call per optimizer and parameter group.

    The fused kernel updates each tensor on its own, so the result is bit for bit
    what each optimizer's `step()` gives (tested); only the number of calls changes.
    The state is made and kept as torch's AdamW makes it (`step`, `exp_avg`,
    `exp_avg_sq`; a float32 step tensor on the parameter's device, as fused keeps
    it), so checkpoints and the per-group offloading see the same tensors. Optimizers
    that are not fused (compact moments among them), or use amsgrad, step on their
    own.
    """
    from torch.optim.adamw import adamw as adamw_fn

    buckets: dict[tuple, tuple[list[torch.Tensor], ...]] = {}
    for opt in optimizers:
        if not opt.defaults.get("fused") or opt.defaults.get("amsgrad"):
            opt.step()
            continue
        for group in opt.param_groups:
            key = (group["lr"], *group["betas"], group["eps"], group["weight_decay"],
                   group["maximize"])  # fmt: skip
            params, grads, avgs, sqs, steps = buckets.setdefault(key, ([], [], [], [], []))
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = opt.state[p]
                if not state:  # as AdamW's lazy initialisation makes it, fused
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                avgs.append(state["exp_avg"])
                sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
    with torch.no_grad():
        for (lr, beta1, beta2, eps, weight_decay, maximize), lists in buckets.items():
            if lists[0]:
                adamw_fn(*lists[:4], [], lists[4], fused=True, amsgrad=False, beta1=beta1,
                         beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps,
                         maximize=maximize)  # fmt: skip
