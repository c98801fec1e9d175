"""The recipe's sections as pydantic models, one per YAML section, and `Recipe`.

Each field's comment is its documentation (docs/recipes.md repeats it for users).
Cross-section rules live on `Recipe`; checks that need the loaded model are in
`Recipe.check_against_model`. No torch here: `grass validate` stays fast.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from grass_cli.errors import RecipeError
from grass_cli.eval_config import EvalConfig
from grass_cli.recipe.base import Section, expand_home
from grass_cli.recipe.data_config import DataConfig
from grass_cli.recipe.distributed_config import DistributedConfig, sharding_conflict
from grass_cli.recipe.lora_config import LoraConfig
from grass_cli.recipe.model_config import ModelConfig
from grass_cli.recipe.wandb_config import WandbConfig

Strategy = Literal["full", "lisa", "grass", "grass-static", "cyclic", "lora"]
# Strategies that pick a subset of blocks (everything but `full`).
LAYERWISE = ("lisa", "grass", "grass-static", "cyclic")
# Strategies that probe MGN before training.
PROBING = ("grass", "grass-static")


class SamplerConfig(Section):
    """Which blocks train at each step (GRASS_SPEC.md)."""

    strategy: Strategy = "grass"
    # Defaults: the configuration that did best against LoRA, LISA and GRASS-static
    # (docs/benchmarks.md, "The GRASS study"); gamma 2, tau 1, probe_steps 8 did no better.
    # Blocks trained at once (layer-wise strategies), or `auto`: the most blocks whose
    # plan fits `memory_budget`, chosen by the planner before the model loads.
    gamma: int | Literal["auto"] = 4
    # What gamma: auto fills: a device peak in GB, `lora` (what LoRA with the lora
    # section needs on this recipe: GRASS at LoRA's memory), or `device` (a CUDA
    # card's memory less 10%, or 90% of the host's RAM on the CPU).
    memory_budget: float | Literal["device", "lora"] = Field("device")
    # How optimizer.lr follows the gamma that auto chose. `sqrt`: optimizer.lr is the
    # lr for AUTO_LR_GAMMA (4) blocks, the default for which the recipes' and presets'
    # lrs are tuned, and is scaled by sqrt(4 / gamma): more blocks moving at once need
    # a smaller step (the GRASS study's best lr was 8e-4 at gamma 4, 4e-4 at 24, full
    # fine-tuning's 2e-4 at 30: docs/recipes.md). `fixed`: optimizer.lr as written.
    auto_lr: Literal["sqrt", "fixed"] = "sqrt"
    # T_s: optimizer steps between re-samplings of the active set.
    switch_interval: int = Field(10, ge=1)
    # T_p: probing steps (forward+backward, no update) before training; grass only.
    probe_steps: int = Field(4, ge=1)
    # T_u: steps between EMA refreshes of the MGN of trained blocks; grass only.
    update_interval: int = Field(10, ge=1)
    # Temperature of softmax(m / mean(m) / tau): large -> uniform, small -> greedy.
    tau: float = Field(0.5, gt=0)
    # EMA weight of the newest window's MGN.
    alpha: float = Field(0.5, gt=0, le=1)
    # Exploration floor: p <- (1 - eps) p + eps / L. 0 is the paper's plain
    # softmax: a small tau can then give blocks a probability of exactly 0, and if
    # fewer than gamma blocks remain possible the sampler takes those and fills the
    # set with the highest-MGN others (tau -> 0's greedy limit) instead of failing.
    eps: float = Field(0.1, ge=0, le=1)
    # Our addition to the paper (grass, grass-static): `inverse_probability` scales
    # each drawn block's lr by how much less likely than a uniform draw it was to be
    # drawn (clipped to [1/lr_correction_clip, lr_correction_clip]), so that in
    # expectation every block moves as far as under uniform sampling while the
    # important ones are still visited more often. `none`: the paper's equal lr.
    lr_correction: Literal["none", "inverse_probability"] = "none"
    lr_correction_clip: float = Field(4.0, ge=1)
    # Ours too: `balanced` trains each block as often as random draws do on average,
    # without their luck (each switch adds a block's inclusion probability to its
    # credit and takes the gamma most credited). `random`: the paper's draws.
    draw: Literal["random", "balanced"] = "random"
    # Always-train groups outside the blocks. Tied embedding/head weights are one
    # group, trained when either switch is on.
    train_embeddings: bool = False
    train_norm: bool = True
    train_head: bool = False

    @field_validator("gamma", mode="before")
    @classmethod
    def _gamma(cls, v: Any) -> Any:
        # one message for both kinds of value (pydantic would report the int and the
        # literal branch of the union separately)
        if isinstance(v, bool):
            raise ValueError("Input should be a number of blocks or auto, not a boolean")
        if v == "auto" or (isinstance(v, int) and v >= 1):
            return v
        if isinstance(v, str) and v.strip().isdigit() and int(v) >= 1:
            return int(v)
        raise ValueError("Input should be a number of blocks (at least 1) or auto")

    @field_validator("memory_budget")
    @classmethod
    def _positive_budget(cls, v: float | str) -> float | str:
        if isinstance(v, float) and v <= 0:
            raise ValueError("must be a positive number of GB, device or lora")
        return v

    @model_validator(mode="after")
    def _draw_options_need_draws(self) -> SamplerConfig:
        if self.lr_correction != "none" and self.strategy not in ("grass", "grass-static"):
            raise ValueError(
                f"sampler.lr_correction is {self.lr_correction} but sampler.strategy "
                f"{self.strategy} draws every block with the same probability, so there is "
                "nothing to correct; use it with strategy grass or grass-static, or set it "
                "to none"
            )
        if self.draw != "random" and self.strategy not in ("lisa", "grass", "grass-static"):
            raise ValueError(
                f"sampler.draw is {self.draw} but sampler.strategy {self.strategy} draws "
                "nothing at random; use it with strategy lisa, grass or grass-static, or "
                "set it to random"
            )
        return self


class OffloadConfig(Section):
    """Where offloaded optimizer states live (optimizer.state_policy: offload)."""

    # cpu: host memory (pinned, async copies on a side CUDA stream on GPU);
    # disk: memory-mapped files, for machines short of host RAM.
    target: Literal["cpu", "disk"] = "cpu"
    # interval: an active block's state stays on the device until it is frozen;
    # step: only the block being stepped (and the next, prefetched) is on the device.
    residency: Literal["interval", "step"] = "interval"
    # Folder for target disk; null: RUN_DIR/offload. `~` is expanded.
    path: str | None = None
    # Overlap copies with compute (side CUDA stream / background disk thread).
    # Off only to measure what the overlap buys.
    overlap: bool = True
    # target cpu: the most host RAM the pinned store may hold; beyond it the least
    # recently used state waits in files (`path`, or RUN_DIR/offload): the two-tier
    # store. GB, a share of the machine's RAM ("40%"), auto (what the plan leaves of
    # this machine's RAM: every block's state in RAM when it fits), or null (no bound).
    host_budget: float | str | None = "auto"
    # Two-tier store: steps before a switch at which the next interval's blocks start
    # coming back from disk (0: at the switch).
    stage_steps: int = Field(2, ge=0)

    @field_validator("path")
    @classmethod
    def _expand_path(cls, v: str | None) -> str | None:
        return expand_home(v)

    @field_validator("host_budget")
    @classmethod
    def _budget(cls, v: float | str | None) -> float | str | None:
        if v is None or v == "auto":
            return v
        if isinstance(v, str) and v.endswith("%"):
            try:
                share = float(v[:-1])
            except ValueError:
                share = -1.0
            if 0 < share <= 100:
                return v
        elif isinstance(v, (int, float)) and v > 0:
            return float(v)
        raise ValueError("must be a number of GB, a share of RAM such as 40%, auto or null")


class OptimizerConfig(Section):
    """AdamW, stepped block by block."""

    # Peak learning rate. At most 1: AdamW's step is about lr per weight, so a
    # larger one (a typo such as 1e4 for 1e-4) only destroys the model.
    lr: float = Field(1e-4, gt=0, le=1)
    betas: tuple[float, float] = (0.9, 0.999)
    # At most 1, so a typo such as 1e8 for 1e-8 cannot silently stall every update.
    eps: float = Field(1e-8, gt=0, le=1)
    # Decoupled weight decay, applied to matrices only (not norms or biases), and
    # never to frozen blocks. At most 1: each step multiplies weights by 1 - lr * wd.
    weight_decay: float = Field(0.0, ge=0, le=1)
    # keep: frozen blocks keep their AdamW state on the device (LMFlow/axolotl);
    # drop: state is reset when a block is frozen (BAdam);
    # offload: state of frozen blocks moves to a host/disk store and comes back (GRASS).
    state_policy: Literal["keep", "drop", "offload"] = "keep"
    offload: OffloadConfig = Field(default_factory=OffloadConfig)
    # One fused AdamW kernel per group where torch has one (CPU, CUDA), as HF
    # Trainer's default; false: torch's default (per-tensor loop on the CPU).
    fused: bool = True
    # AdamW's moments: fp32 (8 bytes a parameter), bf16 (4) or 8bit (bitsandbytes'
    # blockwise 8-bit AdamW, about 2). They are what an offloaded run keeps for every
    # visited block: compact moments shrink the store, its disk tier and checkpoints.
    state_dtype: Literal["fp32", "bf16", "8bit"] = "fp32"

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimizerConfig:
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        return self


class TrainingConfig(Section):
    """Steps, batch, schedule, device."""

    # Optimizer updates (probing steps are extra). Setting `epochs` replaces it.
    max_steps: int | None = Field(100, ge=1)
    epochs: float | None = Field(None, gt=0)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    # Final lr as a fraction of optimizer.lr for linear / cosine decay.
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    # Max global grad norm over trained parameters; null disables clipping.
    grad_clip: float | None = Field(1.0, gt=0)
    # Any integer torch.manual_seed takes (its range: -2**63 .. 2**64 - 1).
    seed: int = Field(42, ge=-(2**63), le=2**64 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Autocast dtype for forward/backward: none | bf16. (fp16 would need loss
    # scaling; bf16 has float32's range and does not.)
    autocast: Literal["none", "bf16"] = "none"
    # Evaluate every N optimizer steps (and always before and after training).
    eval_interval: int | None = Field(None, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    # A NaN/inf loss or gradient: skip the step (no update, logged) or stop with a
    # checkpoint of the last good state. Never silent.
    nonfinite: Literal["skip", "stop"] = "stop"
    # With nonfinite: skip, stop anyway after this many non-finite steps in a row.
    max_skipped_steps: int = Field(5, ge=1)
    # Data-parallel (torchrun): gradients are summed across ranks in buckets of
    # about this size, each launched as soon as backward has filled it.
    allreduce_bucket_mb: float = Field(25.0, gt=0)

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainingConfig:
        if self.epochs is not None:
            if "max_steps" in self.model_fields_set and self.max_steps is not None:
                raise ValueError(
                    "set either max_steps or epochs, not both (max_steps=null clears it)"
                )
            self.max_steps = None
        elif self.max_steps is None:
            raise ValueError("set max_steps or epochs")
        return self


class CheckpointConfig(Section):
    """When to write checkpoints (RUN_DIR/checkpoints/step-N) for exact resume."""

    # Every N optimizer steps; null: only at the end and on interruption.
    interval: int | None = Field(None, ge=1)
    # Checkpoints kept on disk (oldest removed first); the newest is never removed.
    keep_last: int = Field(2, ge=1)
    # Also write one at the end of training (the final model is saved regardless).
    at_end: bool = True
    # The checkpoint a SIGTERM / SIGINT writes before the run exits. full: the same
    # as every other (exact resume). light: the weights and the run's progress
    # (data position, sampler, importance, RNG) without the optimizer state, for a
    # preemption grace period too short for a full one; the resume restarts AdamW's
    # moments (and fp32 masters from the saved weights), so it is not bit-identical.
    on_signal: Literal["full", "light"] = "full"


class OutputConfig(Section):
    """Where the run writes."""

    # `~` is expanded; an empty path is refused (write `.` for the current folder).
    dir: str = "runs/grass"
    # Plain log line every N steps.
    log_interval: int = Field(1, ge=1)
    save_model: bool = True
    # Also write TensorBoard event files to <dir>/tensorboard (needs the extra:
    # pip install 'grass-cli[tensorboard]').
    tensorboard: bool = False
    # Also log to Weights & Biases (a section, e.g. {project: my-project}); null: off.
    wandb: WandbConfig | None = None
    # Observe per-block MGN while training. auto: where it is read (grass, and
    # probing); always: every strategy (one more pass over each gradient).
    importance: Literal["auto", "always"] = "auto"

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: str) -> str:
        # An empty dir would silently mean the current folder, which then fills
        # with a run's files (and --overwrite would clear them there).
        if not v.strip():
            raise ValueError("Input should be a folder, not empty (write . for the current folder)")
        return expand_home(v) or v


class EvalSection(EvalConfig, Section):
    """The `eval:` section: EvalConfig with the rules every recipe section follows.

    eval_config.py is a leaf module that cannot import this package (it is imported
    by it), so the shared rules (booleans and inf/nan refused for numbers) are added
    here; `~` in eval.data is expanded like every other path key.
    """

    @field_validator("data")
    @classmethod
    def _expand_data(cls, v: str | None) -> str | None:
        return expand_home(v)


class Recipe(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    # Several processes under torchrun: replicated (default) or sharded (FSDP2).
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    # Task evaluation (generation accuracy, multiple choice, loss) every
    # eval.interval steps and at the end; null: eval loss on data.eval only.
    eval: EvalSection | None = None
    # LoRA adapters (sampler.strategy: lora only); null with lora: the defaults.
    lora: LoraConfig | None = None

    # Not part of the YAML: where the recipe came from, for error messages; and why
    # sampler.gamma has its value when `auto` chose it (planner/auto.py).
    _source: str = "<recipe>"
    _gamma_auto: str | None = None
    # optimizer.offload.host_budget in bytes, once planner/tiers.py resolved it
    _host_budget: int | None = None

    @property
    def source(self) -> str:
        return self._source

    @model_validator(mode="after")
    def _no_float16_training(self) -> Recipe:
        # Training in float16 needs loss scaling, which the loop does not do: small
        # gradients flush to zero (and large ones overflow), so a run would train
        # badly or not at all without saying so. bfloat16 has float32's range.
        if self.model.dtype == "float16":
            raise ValueError(
                "model.dtype is float16, but training in float16 needs loss scaling, which "
                "grass does not do (small gradients underflow to zero); use model.dtype: "
                "bfloat16, or model.dtype: float32 with training.autocast: bf16"
            )
        return self

    @model_validator(mode="after")
    def _streaming_steps(self) -> Recipe:
        # A stream's length is unknown until it ends, so an epoch cannot be counted
        # ahead (the schedule, the ETA and the last step all need the total).
        if self.data.streaming and self.training.max_steps is None:
            raise ValueError(
                "data.streaming is on, but training.epochs needs the number of rows, which "
                "a stream does not know ahead: set training.max_steps instead"
            )
        return self

    @model_validator(mode="after")
    def _lora_strategy(self) -> Recipe:
        if self.sampler.strategy != "lora":
            return self
        # Every block's adapters train at every step: nothing is ever frozen, so
        # there is no state for drop or offload to act on; refusing beats a run
        # that looks like it measured offloading.
        if self.optimizer.state_policy != "keep":
            raise ValueError(
                f"optimizer.state_policy is {self.optimizer.state_policy} but "
                "sampler.strategy lora trains every block's adapters at every step, so it "
                "must be keep (there is never a frozen block whose state could be dropped "
                "or offloaded)"
            )
        if self.lora is None:
            self.lora = LoraConfig()  # resolved, so recipe.yaml shows what ran
        return self

    @model_validator(mode="after")
    def _sharding(self) -> Recipe:
        d = self.distributed
        problem = sharding_conflict(
            d.sharding, self.sampler.strategy, self.eval is not None, d.cpu_offload
        )
        if problem:
            raise ValueError(problem)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def check_against_model(self, num_blocks: int, max_positions: int | None) -> None:
        """Checks that need the model: done once it is loaded, before training."""
        s = self.sampler
        if s.strategy in LAYERWISE and s.gamma > num_blocks:
            raise RecipeError(
                f"sampler.gamma is {s.gamma} but the model has only {num_blocks} blocks",
                where=self._source,
                hint=f"set sampler.gamma to at most {num_blocks}",
            )
        if max_positions is not None and self.data.max_length > max_positions:
            raise RecipeError(
                f"data.max_length is {self.data.max_length} but the model handles at most "
                f"{max_positions} positions",
                where=self._source,
                hint=f"set data.max_length to at most {max_positions}",
            )
