"""GRASS as a Hugging Face Trainer / TRL plug-in: a callback and the optimizer it makes.

    from grass_cli.integrations.hf import GrassCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds)   # or TRL's SFTTrainer
    GrassCallback(sampler={"gamma": 4}, optimizer={"state_policy": "offload"}).attach(trainer)
    trainer.train()

`attach` gives the Trainer GRASS's optimizer and puts the callback first, so that
what it adds to the logs reaches the reporting callbacks (W&B, TensorBoard) that the
Trainer registered before it. (Passing `callbacks=[cb]` and
`optimizers=cb.optimizers(model)` to the Trainer works too, without that ordering.)

The callback owns a `grass_cli.Grass` (the object `grass train` runs on) built when
training begins, on the model's final device:

- `on_train_begin`: GRASS probing on the first `probe_steps` batches of the training
  data (or `probe_data`); on a resume, the saved sampler, importance and optimizer
  state instead;
- `on_step_begin`: the sampler's blocks for the step; the optimizer's state follows
  (kept, dropped or offloaded by `optimizer.state_policy`);
- after each backward (`on_substep_end`, `on_pre_optimizer_step`): the blocks'
  gradient norms become one importance observation;
- the optimizer's `step`: AdamW on the active blocks at the Trainer scheduler's lr
  (times the lr correction, if on); the Trainer clips before it, as usual;
- `on_save`: `checkpoint-N/grass/` beside the Trainer's files (JSON + safetensors,
  no pickle): resuming with `trainer.train(resume_from_checkpoint=...)` continues
  the same draws;
- `on_log`: each block's MGN and whether it trains now, as scalars (`grass/mgn/N`,
  `grass/active/N`), and how many train (`grass/active_blocks`), in the Trainer's logs.

`sampler={"strategy": "lisa", "gamma": 2}` is LISA (uniform draws, no probing): one
argument switches methods. AdamW's betas, eps and weight decay come from
`optimizer` (the recipe's keys), not from TrainingArguments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from grass_cli.api import Grass, as_section
from grass_cli.recipe import PROBING, OptimizerConfig, SamplerConfig

STATE_DIR = "grass"  # inside each checkpoint-N/


class GrassOptimizer(torch.optim.Optimizer):
    """What the Trainer steps: one parameter group whose `lr` the Trainer's scheduler
    sets; `step` runs the callback's Grass (AdamW on the active blocks)."""

    def __init__(self, callback: GrassCallback, params: Iterable[torch.nn.Parameter]):
        super().__init__(list(params), {"lr": callback.lr})
        self.callback = callback

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        grass = self.callback.grass
        if grass is None:
            raise RuntimeError("GrassCallback is not in the Trainer's callbacks")
        grass.step(self.param_groups[0]["lr"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.callback.grass is not None:
            self.callback.grass.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        # The AdamW state is GRASS's own (checkpoint-N/grass/, written by the
        # callback): the Trainer's optimizer.pt keeps only the lr.
        return {"state": {}, "param_groups": [{"lr": self.param_groups[0]["lr"], "params": []}]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.param_groups[0]["lr"] = state_dict["param_groups"][0]["lr"]


class GrassCallback(TrainerCallback):
    """GRASS (or LISA, full, static, cyclic) in a transformers Trainer.

    `sampler` / `optimizer`: the recipe's `sampler:` and `optimizer:` keys (dicts or
    configs). `probe_data`: batches to probe on (default: the training data's
    first `probe_steps`). `resume_from`: a checkpoint folder whose `grass/` to load
    when the Trainer resumes from somewhere other than `output_dir/checkpoint-N`.
    `state_dir`: where a disk store keeps its files (default `output_dir/grass-offload`).
    """

    def __init__(
        self,
        sampler: SamplerConfig | Mapping[str, Any] | None = None,
        optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
        *,
        probe_data: Iterable[Mapping[str, torch.Tensor]] | None = None,
        resume_from: str | Path | None = None,
        state_dir: str | Path | None = None,
        blocks_attr: str | None = None,
    ) -> None:
        self.sampler_cfg = sampler
        self.optimizer_cfg = optimizer
        self.probe_data = probe_data
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.state_dir = state_dir
        self.blocks_attr = blocks_attr
        self.lr = 0.0  # set by optimizers(): the Trainer's scheduler takes it from here
        self.grass: Grass | None = None
        self._accum = 1

    def optimizers(
        self, model: torch.nn.Module, lr: float | None = None
    ) -> tuple[GrassOptimizer, None]:
        """The Trainer's `optimizers=` argument: GRASS's optimizer and no scheduler (the
        Trainer makes its own from TrainingArguments over this optimizer's lr).
        `lr`: the peak lr (default: the `optimizer` section's `lr`)."""
        ocfg = as_section(OptimizerConfig, self.optimizer_cfg)
        self.lr = ocfg.lr if lr is None else lr
        return GrassOptimizer(self, model.parameters()), None

    # ------------------------------------------------------------------ events

    def attach(self, trainer: Any) -> GrassCallback:
        """Give `trainer` GRASS's optimizer and this callback, first in its list (the
        reporting callbacks then see what `on_log` adds). Before `trainer.train()`."""
        if trainer.optimizer is not None:
            raise ValueError("the Trainer already has an optimizer: attach GRASS before train()")
        trainer.optimizer, _ = self.optimizers(trainer.model, trainer.args.learning_rate)
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
        opt = kw.get("optimizer")
        if not isinstance(opt, GrassOptimizer) and not _wraps_ours(opt):
            raise ValueError(
                "GrassCallback needs its optimizer: GrassCallback(...).attach(trainer), or "
                "Trainer(..., optimizers=callback.optimizers(model))"
            )
        self._accum = args.gradient_accumulation_steps
        state_dir = self.state_dir or Path(args.output_dir) / "grass-offload"
        self.grass = Grass(
            model,
            self.sampler_cfg,
            as_section(OptimizerConfig, self.optimizer_cfg),
            seed=args.seed,
            blocks_attr=self.blocks_attr,
            state_dir=state_dir,
        )
        if state.global_step > 0:  # a resume: the Trainer restored weights and data
            folder = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not (folder / STATE_DIR / "grass.json").exists():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step}, but {folder / STATE_DIR} holds no "
                    "GRASS state: pass GrassCallback(resume_from=CHECKPOINT_FOLDER)"
                )
            self.grass.load(folder / STATE_DIR)
            return
        if self.grass.sampler.cfg.strategy in PROBING:
            steps = self.grass.sampler.cfg.probe_steps
            data = self.probe_data if self.probe_data is not None else train_dataloader
            batches = [b for _, b in zip(range(steps), data, strict=False)]
            self.grass.probe(batches)

    def on_step_begin(self, args, state, control, **kw):
        self.grass.begin_step(state.global_step)

    def on_substep_end(self, args, state, control, **kw):
        self._observe()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self._observe()

    def _observe(self) -> None:
        """The micro-batch's gradient norms, read in backward, as one observation (the
        Trainer divides each micro-batch's loss by the accumulation steps)."""
        t = self.grass.tracker
        t.begin_micro_batch(1.0 / self._accum)
        t.end_micro_batch()

    def on_save(self, args, state, control, **kw):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            self.grass.save(folder / STATE_DIR)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is None or self.grass is None:
            return
        active = set(self.grass.active)
        ours: dict[str, float] = {"grass/active_blocks": len(active)}
        for i, v in enumerate(self.grass.importance):
            ours[f"grass/active/{i}"] = float(i in active)
            if v is not None and math.isfinite(v):
                ours[f"grass/mgn/{i}"] = v
        logs.update(ours)
        # (the Trainer put a copy of `logs` in its history just before this event)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(ours)

    def on_train_end(self, args, state, control, **kw):
        if self.grass is not None:
            self.grass.close()


def _wraps_ours(optimizer: Any) -> bool:
    """accelerate wraps the Trainer's optimizer (AcceleratedOptimizer.optimizer)."""
    return isinstance(getattr(optimizer, "optimizer", None), GrassOptimizer)
