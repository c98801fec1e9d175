"""model.attn_implementation: the attention kernel, checked before the model loads.

transformers notices a missing kernel package only inside `from_pretrained`, and a
FlashAttention kernel on a CPU or on float32 tensors only at the first forward
pass: for a large model, minutes after the start. Everything needed to tell is
in the recipe and the installed packages, so the check runs in pre-flight (for
`grass validate` and `grass train`) and again where any command loads a model.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from grass_cli.errors import ModelError

if TYPE_CHECKING:
    from grass_cli.recipe import Recipe

KEY = "model.attn_implementation"

# FlashAttention kernels: the module transformers imports, and how to get it.
FLASH = {
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": (
        "flash_attn_interface",
        "build FlashAttention 3 from the hopper/ folder of the flash-attention repository",
    ),
}


def load_kwargs(name: str | None) -> dict[str, Any]:
    """What `from_pretrained` gets: nothing for null, so transformers keeps its own
    choice (sdpa where the model supports it, else eager)."""
    return {} if name is None else {"attn_implementation": name}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import
        return False


def check_attention(name: str | None, device: str | None = None, half: bool | None = None) -> None:
    """Refuse a kernel that cannot run here. `device` ("cpu", "cuda") and `half`
    (the run computes in bf16/fp16) are checked when known (None: not known)."""
    if name is None or name in ("eager", "sdpa"):
        return  # every supported torch has both
    if name == "flex_attention":
        if not _installed("torch.nn.attention.flex_attention"):
            raise ModelError(
                "flex_attention needs torch >= 2.5, which is not installed",
                where=f"{KEY}: {name}",
                hint=f"upgrade torch, or set {KEY}: sdpa",
            )
        return
    module, install = FLASH[name]
    if not _installed(module):
        raise ModelError(
            f"{name} needs the {module} package, which is not installed",
            where=f"{KEY}: {name}",
            hint=f"{install} (a CUDA GPU only), or set {KEY}: sdpa",
        )
    if device is not None and device != "cuda":
        raise ModelError(
            f"{name} runs only on a CUDA GPU, and this run's device is {device}",
            where=f"{KEY}: {name}",
            hint=f"set {KEY}: sdpa (or null) on {device}",
        )
    if half is False:
        raise ModelError(
            f"{name} computes in bfloat16 or float16 only, and this run computes in float32",
            where=f"{KEY}: {name}",
            hint=f"set training.autocast: bf16 or model.dtype: bfloat16, or {KEY}: sdpa",
        )


def check_recipe(recipe: Recipe) -> None:
    """Pre-flight: the recipe's kernel against the installed packages and its device."""
    name = recipe.model.attn_implementation
    if name not in FLASH:
        check_attention(name)
        return
    device = recipe.training.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    # dtype auto is the checkpoint's own, unknown before loading: not refused here
    dtype = recipe.model.dtype
    half = None if dtype == "auto" else dtype != "float32" or recipe.training.autocast == "bf16"
    check_attention(name, device, half)
