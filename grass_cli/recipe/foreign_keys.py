"""Keys users bring from other fine-tuning tools, and the recipe key that does their job.

A recipe written after an axolotl, LLaMA-Factory, LMFlow or TRL / HF
TrainingArguments config carries their names (`base_model`, `learning_rate`,
`num_train_epochs`). Spelling similarity finds the wrong key for many of them
(`base_model` is closest to `output.save_model`), so "did you mean" looks a
foreign name up here first and names the tool it comes from.

The lookup is by a key's last dotted part, so `learning_rate` at the top level and
`training.learning_rate` both match. Names that are also ours (micro_batch_size,
max_length, lr_scheduler, weight_decay, gradient_checkpointing, packing, ...) are
not here: the leaf match of `keys.suggest_key` already finds them in the right
section. No pydantic here: keys.py imports this module, and tests check that every
target is a real key.
"""

from __future__ import annotations

from typing import NamedTuple

AXOLOTL = "axolotl"
LLAMA_FACTORY = "LLaMA-Factory"
LMFLOW = "LMFlow"
TRL = "TRL"
HF = "HF TrainingArguments"
HF_SCRIPTS = "HF example scripts"
# TrainingArguments fields that LLaMA-Factory (built on it) and axolotl also read.
HF_ALL = (HF, LLAMA_FACTORY, AXOLOTL)
HF_LF = (HF, LLAMA_FACTORY)


class ForeignKey(NamedTuple):
    """Our dotted key for a foreign one, the tools that use the foreign name, and a
    short note where the meaning differs (shown in parentheses after our key)."""

    ours: str
    tools: tuple[str, ...]
    note: str = ""


_F = ForeignKey
_LISA = "with sampler.strategy: lisa"
_SHARE = "a share of data.train such as 0.05, a row count, or an eval file"

FOREIGN_KEYS: dict[str, ForeignKey] = {
    # model
    "base_model": _F("model.path", (AXOLOTL,)),
    "model_name_or_path": _F("model.path", (HF_SCRIPTS, LLAMA_FACTORY, TRL)),
    "torch_dtype": _F("model.dtype", (TRL, HF_SCRIPTS)),
    "bf16": _F(
        "model.dtype",
        HF_ALL,
        "bf16: true is model.dtype: bfloat16, or training.autocast: bf16 with float32 weights",
    ),
    "fp16": _F("model.dtype", HF_ALL, "float16 training is refused: use model.dtype: bfloat16"),
    "flash_attention": _F(
        "model.attn_implementation", (AXOLOTL,), "flash_attention: true is flash_attention_2"
    ),
    "sdp_attention": _F("model.attn_implementation", (AXOLOTL,), "sdp_attention: true is sdpa"),
    "flash_attn": _F("model.attn_implementation", (LLAMA_FACTORY,), "fa2 is flash_attention_2"),
    "lisa_layers_attribute": _F("model.blocks_attr", (AXOLOTL,)),
    # data
    "datasets": _F("data.train", (AXOLOTL,)),
    "dataset": _F("data.train", (LLAMA_FACTORY,)),
    "dataset_name": _F("data.train", (TRL,)),
    "train_file": _F("data.train", (HF_SCRIPTS,)),
    "validation_file": _F("data.eval", (HF_SCRIPTS,)),
    "eval_dataset": _F("data.eval", (LLAMA_FACTORY,)),
    "test_datasets": _F("data.eval", (AXOLOTL,)),
    "val_set_size": _F("data.eval", (AXOLOTL,), _SHARE),
    "val_size": _F("data.eval", (LLAMA_FACTORY,), _SHARE),
    "cutoff_len": _F("data.max_length", (LLAMA_FACTORY,)),
    "sequence_len": _F("data.max_length", (AXOLOTL,)),
    "max_seq_length": _F("data.max_length", (TRL,)),
    "sample_packing": _F("data.packing", (AXOLOTL,)),
    "train_on_inputs": _F("data.train_on_prompt", (AXOLOTL,)),
    "template": _F("data.chat_template", (LLAMA_FACTORY,)),
    "max_samples": _F("data.limit", (LLAMA_FACTORY,)),
    "default_system": _F("data.system_prompt", (LLAMA_FACTORY,)),
    "dataset_text_field": _F("data.fields", (TRL,), "data.fields: {text: COLUMN}"),
    # sampler
    "lisa_activated_layers": _F("sampler.gamma", (LMFLOW,), _LISA),
    "lisa_n_layers": _F("sampler.gamma", (AXOLOTL,), _LISA),
    "lisa_interval_steps": _F("sampler.switch_interval", (LMFLOW,)),
    "lisa_step_interval": _F("sampler.switch_interval", (AXOLOTL,)),
    "badam_switch_interval": _F("sampler.switch_interval", (LLAMA_FACTORY,)),
    "use_badam": _F(
        "sampler.strategy", (LLAMA_FACTORY,), "BAdam is cyclic with optimizer.state_policy: drop"
    ),
    "adapter": _F("sampler.strategy", (AXOLOTL,), "adapter: lora is sampler.strategy: lora"),
    "finetuning_type": _F("sampler.strategy", (LLAMA_FACTORY,), "lora or full"),
    # optimizer
    "learning_rate": _F("optimizer.lr", HF_ALL),
    "adam_beta1": _F("optimizer.betas", HF_ALL, "one pair, e.g. optimizer.betas: [0.9, 0.999]"),
    "adam_beta2": _F("optimizer.betas", HF_ALL, "one pair, e.g. optimizer.betas: [0.9, 0.999]"),
    "adam_epsilon": _F("optimizer.eps", HF_ALL),
    # training
    "num_epochs": _F("training.epochs", (AXOLOTL,)),
    "num_train_epochs": _F("training.epochs", HF_LF),
    "per_device_train_batch_size": _F("training.micro_batch_size", HF_LF),
    "per_device_eval_batch_size": _F("training.eval_batch_size", HF_LF),
    "gradient_accumulation_steps": _F("training.grad_accum_steps", HF_ALL),
    "lr_scheduler_type": _F("training.lr_scheduler", HF_LF),
    "warmup_ratio": _F("training.warmup_steps", HF_ALL, "a step count, not a ratio"),
    "cosine_min_lr_ratio": _F("training.min_lr_ratio", (AXOLOTL,)),
    "max_grad_norm": _F("training.grad_clip", HF_ALL),
    "eval_steps": _F("training.eval_interval", HF_ALL),
    "use_cpu": _F("training.device", (HF,), "training.device: cpu"),
    # checkpoint
    "save_steps": _F("checkpoint.interval", HF_ALL),
    "save_total_limit": _F("checkpoint.keep_last", HF_ALL),
    # output
    "output_dir": _F("output.dir", HF_ALL),
    "logging_steps": _F("output.log_interval", HF_ALL),
    "wandb_project": _F("output.wandb.project", (AXOLOTL,)),
    "wandb_entity": _F("output.wandb.entity", (AXOLOTL,)),
    "wandb_name": _F("output.wandb.name", (AXOLOTL,)),
    "run_name": _F("output.wandb.name", (HF,)),
    # lora
    "lora_r": _F("lora.r", (AXOLOTL,)),
    "lora_rank": _F("lora.r", (LLAMA_FACTORY,)),
    "lora_alpha": _F("lora.alpha", (AXOLOTL, LLAMA_FACTORY)),
    "lora_dropout": _F("lora.dropout", (AXOLOTL, LLAMA_FACTORY)),
    "lora_target_modules": _F("lora.target_modules", (AXOLOTL,)),
    "lora_target": _F("lora.target_modules", (LLAMA_FACTORY,), "a list, or all-linear"),
    "lora_target_linear": _F(
        "lora.target_modules", (AXOLOTL,), "lora_target_linear: true is all-linear"
    ),
}


def foreign_key(key: str) -> ForeignKey | None:
    """The entry for a dotted key's last part, or None when no other tool uses it."""
    return FOREIGN_KEYS.get(key.rsplit(".", 1)[-1])


def foreign_hint(key: str) -> str | None:
    """`'base_model' is axolotl's key; ours is 'model.path'`, or None for a key of no
    other tool. Several tools: `the HF TrainingArguments / LLaMA-Factory key`."""
    entry = foreign_key(key)
    if entry is None:
        return None
    leaf = key.rsplit(".", 1)[-1]
    tools = entry.tools
    whose = f"{tools[0]}'s" if len(tools) == 1 else f"the {' / '.join(tools)}"
    note = f" ({entry.note})" if entry.note else ""
    return f"'{leaf}' is {whose} key; ours is '{entry.ours}'{note}"
