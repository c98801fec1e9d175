"""Generation: batched greedy decoding and the accuracy of generated answers.

A prompt is the exact token prefix a training row has before its answer
(`PromptRenderer`), and decoding stops where training taught the model to stop:
at eos or the chat template's end-of-turn token.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from grass_cli.evaluate.common import EvalContext, batched
from grass_cli.evaluate.loss import autocast_ctx
from grass_cli.scoring import Scorer, cut_at_stop

# End-of-turn tokens of common chat templates. A template that writes one of them
# ends the assistant turn with it, so greedy generation stops there too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end a generated answer: eos, the generation config's eos ids,
    and the end-of-turn token the chat template writes after an assistant turn."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
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


def _take(
    out: list[Generation],
    done: list[bool],
    nxt: list[int],
    stop_ids: set[int],
    stops: list[str],
    tokenizer: Any,
) -> None:
    """Append each unfinished row's next token, or finish it at a stop token or string."""
    for i, tok in enumerate(nxt):
        if done[i]:
            continue
        if tok in stop_ids:
            out[i].finish, done[i] = "eos", True
            continue
        out[i].tokens.append(tok)
        if stops:
            text = tokenizer.decode(out[i].tokens, skip_special_tokens=True)
            if cut_at_stop(text, stops)[1]:
                out[i].finish, done[i] = "stop", True


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
    """Greedy decoding of a batch of token prompts, left padded, with a KV cache.

    Left padding keeps every row's last prompt token in the last column, so one
    argmax per step serves the whole batch. Position ids come from the attention
    mask, so a padded row sees the positions it would see alone: batched output
    equals unbatched output token for token (tested in float32). A row stops at a
    stop token (not included) or when its decoded text contains a stop string (the
    text is cut before it); finished rows are fed pad tokens until all are done.
    """
    stop_ids = stop_token_ids(model, tokenizer) if stop_ids is None else stop_ids
    stops = [s for s in (stop_strings or []) if s]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(prompts)
    ids, mask = (t.to(device) for t in _left_pad(prompts, pad_id))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at each row's first real token
    use_pos = _accepts(model, "position_ids")
    keep_last = _accepts(model, "logits_to_keep")
    # transformers 5.x renamed `past_key_values` to `cache`; accept both.
    cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"

    out = [Generation(tokens=[], finish="length") for _ in range(n)]
    done = [False] * n
    step_ids, step_pos, past = ids, positions, None
    for _ in range(max_new_tokens):
        kwargs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask, "use_cache": True}
        if use_pos:
            kwargs["position_ids"] = step_pos
        if keep_last:
            kwargs["logits_to_keep"] = 1  # the prompt's full (T, V) logits are never needed
        if past is not None:
            kwargs[cache_kw] = past
        with autocast_ctx(device, autocast):
            result = model(**kwargs)
        past = getattr(result, "cache", None)
        if past is None:
            past = result.past_key_values
        nxt = result.logits[:, -1, :].argmax(-1).tolist()  # (B,)
        _take(out, done, nxt, stop_ids, stops, tokenizer)
        if all(done):
            break
        feed = [pad_id if done[i] else tok for i, tok in enumerate(nxt)]
        step_ids = torch.tensor(feed, dtype=torch.long, device=device).unsqueeze(1)  # (B, 1)
        mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
        step_pos = step_pos[:, -1:] + 1
    for g in out:
        g.text = cut_at_stop(tokenizer.decode(g.tokens, skip_special_tokens=True), stops)[0]
    return out


def generate_metrics(
    ctx: EvalContext, prompts: list[list[int]], golds: list[Any]
) -> dict[str, Any]:
    """Batched greedy generation, then answer extraction and scoring."""
    cfg = ctx.cfg
    scorer = Scorer(cfg.scorer, cfg.regex)
    stop_ids = stop_token_ids(ctx.model, ctx.tokenizer)
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
