"""GGUF metadata from a Hugging Face config: which architectures, which rotary
settings, and the key-value pairs llama.cpp reads (grass_cli/export/__init__.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grass_cli.errors import ModelError

# --quant -> (GGML tensor type, llama.cpp's file type) names in the gguf package
QUANTS = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# HF architecture -> (llama.cpp architecture, whether q/k rows are reordered)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
CONVERTER_HINT = (
    "llama.cpp's converter handles more: python convert_hf_to_gguf.py MODEL_DIR "
    "(https://github.com/ggml-org/llama.cpp)"
)
# tokenizer.json pre-tokenizers -> llama.cpp's name for the same splitting rule


def read_json(path: Path, model_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            "not a Hugging Face model folder (no config.json)", where=str(model_dir)
        ) from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path.name}: {e}", where=str(model_dir)) from None
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} is not a JSON object", where=str(model_dir))
    return data


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, the scaling dict or None); transformers 5 keeps both in
    rope_parameters, 4.x in rope_theta and rope_scaling."""
    params = config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling")
    kind = params.get("rope_type") or params.get("type")
    if kind and kind != "default":
        scaling = params
    return theta, scaling


def check_config(config: dict[str, Any], model_dir: Path) -> None:
    _, scaling = _rope(config)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if scaling and kind != "linear":
        raise ModelError(
            f"GGUF export writes plain and linear rotary embeddings; this model uses "
            f"{kind!r} rotary scaling",
            where=str(model_dir),
            hint=CONVERTER_HINT,
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ModelError(
            f"the llama family in llama.cpp uses SiLU; this model's hidden_act is "
            f"{config['hidden_act']!r}",
            where=str(model_dir),
            hint=CONVERTER_HINT,
        )


def write_metadata(
    writer: Any, gguf: Any, config: dict[str, Any], arch: str, quant: str, name: str
) -> None:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType[QUANTS[quant][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
