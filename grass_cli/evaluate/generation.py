"""Generation: batched greedy decoding and the accuracy of generated answers.

A prompt is the exact token prefix a training row has before its answer
(`PromptRenderer`), and decoding stops where training taught the model to stop:
at eos or the chat template's end-of-turn token. Decoding is transformers'
`model.generate` (greedy, left padded, its own KV cache), with the model's own
sampling and penalty defaults set aside, so it is plain argmax decoding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from grass_cli.evaluate.common import EvalContext, batched
from grass_cli.evaluate.loss import autocast_ctx
from grass_cli.scoring import Scorer, cut_at_stop

# End-of-turn tokens of common chat templates. A template that writes one of them
# ends the assistant turn with it, so greedy generation stops there too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_token_ids(model: torch.nn.Module, tokenizer: Any, template: str | None = None) -> set[int]:
    """Token ids that end a generated answer: eos, the generation config's eos ids,
    and the end-of-turn token the chat template writes after an assistant turn.

    `template` is the template the prompts were rendered with (data.chat_template
    may pick a named or file template); None: the tokenizer's single template.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        vocab = tokenizer.get_vocab()
        for tok in END_OF_TURN_TOKENS:
            if tok in template and tok in vocab:
                ids.add(int(vocab[tok]))
    return ids


@dataclass
class Generation:
    """One generated answer: its new token ids (stop token excluded) and why it ended."""

    tokens: list[int]
    finish: str  # "eos", "stop" (a stop string), or "length" (max_new_tokens)
    text: str = ""


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask (B, T) with every prompt ending in the last column."""
    if min(len(p) for p in prompts) == 0:
        raise ValueError("greedy_generate needs non-empty prompts")
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _finish(new: list[int], stop_ids: set[int], stops: list[str], tokenizer: Any) -> Generation:
    """A row's answer from its generated tokens: cut before the first stop token, or
    after the token that completes a stop string (the text cut before that string).

    Tokens after that point (generate's padding of a finished row) are never read.
    """
    g = Generation(tokens=[], finish="length")
    for tok in new:
        if tok in stop_ids:
            g.finish = "eos"
            break
        g.tokens.append(tok)
        if stops and cut_at_stop(tokenizer.decode(g.tokens, skip_special_tokens=True), stops)[1]:
            g.finish = "stop"
            break
    g.text = cut_at_stop(tokenizer.decode(g.tokens, skip_special_tokens=True), stops)[0]
    return g


def _stop_string_criteria(tokenizer: Any, stops: list[str], start: int, stop_ids: set[int]) -> Any:
    """A stopping criterion ending a row once its decoded answer contains a stop string.

    transformers' own `stop_strings` matches only at the end of the text and can
    match across the prompt; this one decodes the new tokens, skipping special
    tokens, exactly as `_finish` and the scorer read them.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = []
            for row in input_ids[:, start:].tolist():
                if any(t in stop_ids for t in row):  # ended by a stop token already
                    done.append(True)
                    continue
                text = tokenizer.decode(row, skip_special_tokens=True)
                done.append(cut_at_stop(text, stops)[1])
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])


@contextlib.contextmanager
def _greedy_config(
    model: torch.nn.Module, max_new_tokens: int, stop_ids: set[int], pad_id: int
) -> Iterator[Any]:
    """A generation config for plain greedy decoding, installed on the model meanwhile.

    transformers fills the unset values of a config passed to `generate` from the
    model's own `generation_config` (sampling, repetition penalty, forced or
    suppressed tokens a model card chose for chat use). Evaluation must be argmax
    decoding whatever the model ships, so that config is swapped out for the call.
    """
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(stop_ids) or None,
        pad_token_id=pad_id,
        use_cache=True,
    )
    saved = model.generation_config
    model.generation_config = config
    try:
        yield config
    finally:
        model.generation_config = saved


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    device: torch.device,
    stop_ids: set[int] | None = None,
    stop_strings: list[str] | None = None,
    autocast: str = "none",
) -> list[Generation]:
    """Greedy decoding of a batch of token prompts, left padded, with `model.generate`.

    Left padding keeps every row's last prompt token in the last column; generate
    derives position ids from the attention mask, so a padded row sees the
    positions it would see alone: batched output equals unbatched output token for
    token (tested in float32). A row stops at a stop token (not included) or when
    its decoded text contains a stop string (the text is cut before it); finished
    rows are padded until all are done.
    """
    stop_ids = stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids
    stops = [s for s in (stop_strings or []) if s]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = (t.to(device) for t in _left_pad(prompts, pad_id))
    width = ids.shape[1]
    # peft's wrapper copies its own generation config onto the model it wraps; the
    # adapters live in that model's layers, so it is the one to call.
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    criteria = _stop_string_criteria(tokenizer, stops, width, stop_ids) if stops else None
    with (
        _greedy_config(lm, max_new_tokens, stop_ids, pad_id) as config,
        autocast_ctx(device, autocast),
    ):
        out = lm.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            stopping_criteria=criteria,
        )
    return [_finish(row, stop_ids, stops, tokenizer) for row in out[:, width:].tolist()]


def generate_metrics(
    ctx: EvalContext, prompts: list[list[int]], golds: list[Any], template: str | None = None
) -> dict[str, Any]:
    """Batched greedy generation, then answer extraction and scoring.

    `template` is the chat template the prompts were rendered with (its end-of-turn
    token ends an answer); None: the tokenizer's own.
    """
    cfg = ctx.cfg
    scorer = Scorer(cfg.scorer, cfg.regex)
    stop_ids = stop_token_ids(ctx.model, ctx.tokenizer, template)
    # Sorting by length keeps padding (wasted compute) small; results go back by index.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    correct = new_tokens = 0
    for start, end in batched(len(order), cfg.batch_size):
        idx = order[start:end]
        gens = greedy_generate(
            ctx.model,
            ctx.tokenizer,
            [prompts[i] for i in idx],
            cfg.max_new_tokens,
            ctx.device,
            stop_ids=stop_ids,
            stop_strings=cfg.stop,
            autocast=ctx.autocast,
        )
        for i, g in zip(idx, gens, strict=True):
            score = scorer(g.text, golds[i])
            correct += score.correct
            new_tokens += len(g.tokens)
            ctx.items[i].update(
                prediction=g.text,
                extracted=score.extracted,
                gold=score.gold,
                correct=score.correct,
                new_tokens=len(g.tokens),
                finish=g.finish,
            )
        ctx.report("generate", end, len(order))
    n = len(prompts)
    return {
        "accuracy": correct / n if n else math.nan,
        "correct": correct,
        "scored": n,
        "scorer": cfg.scorer,
        "max_new_tokens": cfg.max_new_tokens,
        "new_tokens": new_tokens,
    }
