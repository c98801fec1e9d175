"""Evaluation: loss / perplexity, generation accuracy, multiple-choice accuracy.

Everything here renders rows exactly as training does (grass_cli.data): the loss
uses the same tokens and masks, and a generation prompt is the exact token prefix a
training row has before its answer, so an evaluated model sees what it was trained
on. One module per thing measured:

* `loss`: the token-summed loss training uses (`loss_sum`), eval loss, perplexity.
* `generation`: batched greedy decoding and scored answers.
* `choice`: multiple choice by the likelihood of each choice.
* `plan`: what to measure on a file, checked against its columns.
* `prompts`: rows -> prompt tokens through the data package's renderer.
* `runner`: `run_eval`, the one entry point for `grass eval` and training's `eval:`.

Answer extraction and scorers live in `grass_cli.scoring`, the `eval:` options in
`grass_cli.eval_config`: both are torch-free, so the recipe and `grass --help`
can import them without loading torch.
"""

from grass_cli.evaluate.choice import choice_logprobs, choice_metrics, gold_choice
from grass_cli.evaluate.common import EvalContext, Progress, pick_device
from grass_cli.evaluate.generation import (
    END_OF_TURN_TOKENS,
    Generation,
    generate_metrics,
    greedy_generate,
    stop_token_ids,
)
from grass_cli.evaluate.loss import (
    autocast_ctx,
    count_targets,
    eval_loss,
    loss_metrics,
    loss_sum,
    perplexity,
    row_loss_sums,
)
from grass_cli.evaluate.plan import EvalPlan, eval_data_config, plan_eval
from grass_cli.evaluate.prompts import PromptRenderer
from grass_cli.evaluate.runner import run_eval

__all__ = [
    "END_OF_TURN_TOKENS",
    "EvalContext",
    "EvalPlan",
    "Generation",
    "Progress",
    "PromptRenderer",
    "autocast_ctx",
    "choice_logprobs",
    "choice_metrics",
    "count_targets",
    "eval_data_config",
    "eval_loss",
    "generate_metrics",
    "gold_choice",
    "greedy_generate",
    "loss_metrics",
    "loss_sum",
    "perplexity",
    "pick_device",
    "plan_eval",
    "row_loss_sums",
    "run_eval",
    "stop_token_ids",
]
