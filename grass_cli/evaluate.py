"""Evaluation: loss / perplexity, generation accuracy, multiple-choice accuracy.

Everything here renders rows exactly as training does (grass_cli.data): the loss
uses the same tokens and masks, and a generation prompt is the exact token
prefix a training row has before its answer, so an evaluated model sees what it
was trained on. `run_eval` is the one entry point for `grass eval` and for the
recipe's `eval:` section during training; it returns one flat dict (a telemetry
event's payload) and, given a folder, writes predictions.jsonl and result.json.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from grass_cli.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    FORMAT_FIELDS,
    IGNORE_INDEX,
    OPTIONAL_FIELDS,
    ROLES,
    _Renderer,
    collate,
    eval_batches,
    load_rows,
    tokenize_rows,
)
from grass_cli.errors import DataError
from grass_cli.eval_config import EVAL_FIELDS, EvalConfig, EvalKind
from grass_cli.models import resolve_device
from grass_cli.recipe import DataConfig
from grass_cli.scoring import Scorer, cut_at_stop

# Called as progress(phase, done, total) while evaluating; the library never prints.
Progress = Callable[[str, int, int], None]

# End-of-turn tokens of common chat templates. A template that writes one of them
# ends the assistant turn with it, so greedy generation stops there too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def autocast_ctx(device: torch.device, autocast: str) -> contextlib.AbstractContextManager:
    if autocast == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's trainable (label != -100) tokens.

    Summing (not averaging) per micro-batch lets gradient accumulation divide by
    the step's total token count, so every token weighs the same however the
    rows fall into micro-batches.
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits  # (B, T, V)
    shift_logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
    shift_labels = batch["labels"][:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    autocast: str = "none",
) -> tuple[float, int]:
    """Token-weighted mean loss over all batches, and the number of target tokens."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for batch in batches:
        n += count_targets(batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_ctx(device, autocast):
            total += loss_sum(model, batch).double()
    model.train(was_training)
    return (float(total) / n if n else math.nan), n


def row_loss_sums(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed cross-entropy (float64) and target-token counts, shapes (B,), (B,).

    The same shift and masking as `loss_sum`, kept per row so eval can report each
    item's loss and multiple choice can compare continuations.
    """
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits  # (B, T, V)
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = batch["labels"][:, 1:]  # (B, T-1)
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)  # (B, T-1); 0 where ignored
    return ce.double().sum(-1), (shift_labels != IGNORE_INDEX).sum(-1)


def perplexity(mean_loss: float) -> float:
    """exp(mean token loss); capped at exp(700) so a diverged model stays JSON-able."""
    return math.exp(min(mean_loss, 700.0)) if not math.isnan(mean_loss) else math.nan


def pick_device(name: str) -> torch.device:
    """The `--device` option of `grass eval` / `inspect-importance`."""
    return resolve_device(name, where="--device")


# --------------------------------------------------------------------- generation


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
    width = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("greedy_generate needs non-empty prompts")
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
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
        if all(done):
            break
        feed = [pad_id if done[i] else tok for i, tok in enumerate(nxt)]
        step_ids = torch.tensor(feed, dtype=torch.long, device=device).unsqueeze(1)  # (B, 1)
        mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
        step_pos = step_pos[:, -1:] + 1
    for g in out:
        g.text = cut_at_stop(tokenizer.decode(g.tokens, skip_special_tokens=True), stops)[0]
    return out


# ------------------------------------------------------------------ rows -> prompts


@dataclass
class EvalPlan:
    """What one evaluation measures, resolved against the file's columns."""

    path: str
    data_cfg: DataConfig  # formatting as training renders it, with eval's format/fields
    kinds: list[EvalKind]
    answer_col: str
    choices_col: str
    columns: list[str] = field(default_factory=list)


def eval_data_config(data_cfg: DataConfig | None, cfg: EvalConfig, path: str) -> DataConfig:
    """Training's formatting with the eval file's format and field mapping on top.

    The recipe's field mapping carries over only when the format does, since a
    mapping for one format's fields means nothing for another's.
    """
    base = data_cfg if data_cfg is not None else DataConfig(train=path)
    fmt = cfg.format or base.format
    fields = dict(base.fields) if fmt == base.format else {}
    fields.update({k: v for k, v in cfg.fields.items() if k not in EVAL_FIELDS})
    return base.model_copy(
        update={
            "format": fmt,
            "fields": fields,
            "train": path,
            "eval": path,
            "limit": None,
            "eval_limit": None,
        }
    )


def _prompt_fields(fmt: str) -> tuple[str, ...]:
    """The canonical fields a prompt is rendered from (no answer side)."""
    return {
        "prompt-completion": ("prompt",),
        "alpaca": ("instruction", "input"),
        "chat": ("messages",),
        "text": (),
    }[fmt]


def _missing(
    fmt: str, fields: dict[str, str], names: Iterable[str], columns: list[str]
) -> list[str]:
    return [
        n
        for n in names
        if fields.get(n, n) not in columns and not (n in OPTIONAL_FIELDS and n not in fields)
    ]


def _field_error(name: str, col: str, why: str, columns: list[str], path: str) -> DataError:
    return DataError(
        f"column {col!r} for the field {name!r} ({why}) not found; "
        f"the file has columns: {', '.join(columns) or '(none)'}",
        where=path,
        hint=f"map it with --field {name}=COLUMN (eval.fields in a recipe)",
    )


def plan_eval(
    rows: list[dict[str, Any]], cfg: EvalConfig, data_cfg: DataConfig, path: str
) -> EvalPlan:
    """Decide the kinds to run (auto when `cfg.kind` is null) and check their fields."""
    columns = list(rows[0].keys())
    fmt, fields = data_cfg.format, dict(data_cfg.fields)
    known = set(FORMAT_FIELDS[fmt]) | set(EVAL_FIELDS)
    for name in cfg.fields:
        if name not in known:
            raise DataError(
                f"--field maps {name!r}, which is neither a field of the {fmt} format "
                "nor answer / choices",
                where="eval.fields",
                hint="fields: " + ", ".join(sorted(known)),
            )
        if cfg.fields[name] not in columns:  # an explicit mapping must point somewhere
            raise _field_error(
                name, cfg.fields[name], "mapped with --field / eval.fields", columns, path
            )
    answer_col = cfg.fields.get("answer", "answer")
    choices_col = cfg.fields.get("choices", "choices")
    has_format = not _missing(fmt, fields, FORMAT_FIELDS[fmt], columns)
    has_prompt = fmt != "text" and not _missing(fmt, fields, _prompt_fields(fmt), columns)
    has_answer = answer_col in columns
    has_choices = choices_col in columns

    if cfg.kind is None:
        kinds: list[EvalKind] = []
        if has_format:
            kinds.append("loss")
        if has_prompt and has_choices and has_answer:
            kinds.append("choice")
        elif has_prompt and has_answer:
            kinds.append("generate")
        if not kinds:
            raise DataError(
                f"nothing to evaluate with the {fmt} format: loss needs the fields "
                f"{', '.join(FORMAT_FIELDS[fmt])}; generation needs a prompt and 'answer'; "
                f"multiple choice needs a prompt, 'choices' and 'answer'. "
                f"The file has columns: {', '.join(columns)}",
                where=path,
                hint="map your columns with --field, e.g. --field prompt=question "
                "--field answer=label, or set --format",
            )
    else:
        kinds = list(cfg.kind)

    for kind in kinds:
        if kind == "loss":
            for name in _missing(fmt, fields, FORMAT_FIELDS[fmt], columns):
                raise _field_error(name, fields.get(name, name), f"{fmt} format", columns, path)
            continue
        if fmt == "text":
            raise DataError(
                f"--kind {kind} needs a prompt, and the text format has none",
                where=path,
                hint="use the prompt-completion, alpaca or chat format",
            )
        for name in _missing(fmt, fields, _prompt_fields(fmt), columns):
            raise _field_error(name, fields.get(name, name), "the prompt", columns, path)
        if kind == "choice":
            if not has_choices:
                raise _field_error("choices", choices_col, "multiple choice", columns, path)
            if not has_answer:
                raise _field_error("answer", answer_col, "the gold choice", columns, path)
        elif kind == "generate" and not has_answer:
            # The reference completion is the gold answer when there is no answer column.
            gold = {"prompt-completion": "completion", "alpaca": "output"}.get(fmt)
            if gold is not None and fields.get(gold, gold) not in columns:
                raise _field_error("answer", answer_col, "the gold answer", columns, path)
    return EvalPlan(path, data_cfg, kinds, answer_col, choices_col, columns)


def _chat_messages(row: dict[str, Any], col: str, where: str) -> list[dict[str, str]]:
    value = row.get(col)
    if not isinstance(value, list) or not value:
        raise DataError("'messages' must be a non-empty list", where=where)
    out: list[dict[str, str]] = []
    for j, m in enumerate(value, 1):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise DataError(
                f"message {j} needs a role ({', '.join(ROLES)}) and string content",
                where=where,
            )
        out.append({"role": role, "content": content})
    return out


def _text(row: dict[str, Any], name: str, col: str, where: str, optional: bool = False) -> str:
    value = row.get(col)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"field {name!r} (column {col!r}) must be a string, got {value!r:.60}", where=where
        )
    return value


class PromptRenderer:
    """A row's prompt as the exact tokens a training row has before its answer.

    With a chat template: the conversation up to the answer, rendered with
    `add_generation_prompt=True` (system prompt inserted as in training). Without:
    the tokenizer's BOS prefix, then the prompt text, no separator (the user
    controls spacing, as in training).
    """

    def __init__(self, data_cfg: DataConfig, tokenizer: Any):
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        self.renderer = _Renderer(data_cfg, tokenizer)  # decides template use as training does

    @property
    def use_template(self) -> bool:
        return self.renderer.use_template

    def text(self, row: dict[str, Any], where: str) -> tuple[str, str, str | None]:
        """(prompt text fed to the tokenizer, the user-visible prompt, the reference answer)."""
        cfg, f = self.cfg, self.cfg.fields
        if cfg.format == "chat":
            messages = _chat_messages(row, f.get("messages", "messages"), where)
            last = max(
                (i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None
            )
            reference = messages[last]["content"] if last is not None else None
            context = messages[:last] if last is not None else messages
            if cfg.system_prompt is not None and context and context[0]["role"] != "system":
                context = [{"role": "system", "content": cfg.system_prompt}, *context]
            user = next((m["content"] for m in reversed(context) if m["role"] == "user"), "")
            return self.renderer._apply(context, True, where), user, reference
        if cfg.format == "alpaca":
            instruction = _text(row, "instruction", f.get("instruction", "instruction"), where)
            extra = _text(row, "input", f.get("input", "input"), where, optional=True)
            user = instruction + ("\n\n" + extra if extra else "")
            prompt = (
                ALPACA_PROMPT.format(instruction=instruction, input=extra)
                if extra
                else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
            )
            ref_col = f.get("output", "output")
        else:
            user = prompt = _text(row, "prompt", f.get("prompt", "prompt"), where)
            ref_col = f.get("completion", "completion")
        reference = row.get(ref_col) if isinstance(row.get(ref_col), str) else None
        if self.use_template:
            messages = [{"role": "user", "content": user}]
            if cfg.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": cfg.system_prompt})
            return self.renderer._apply(messages, True, where), user, reference
        return prompt, user, reference

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of rendered prompts (no special tokens added; BOS prefix as training)."""
        if not texts:
            return []
        prefix = [] if self.use_template else list(self.renderer.prefix)
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [prefix + list(e) for e in enc]


def _gold_choice(value: Any, choices: list[str], where: str) -> int:
    """Gold index from an index, a letter (A, B, ...) or the choice's text."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and 0 <= value < len(choices):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text in choices:
            return choices.index(text)
        if len(text) == 1 and text.isalpha() and ord(text.upper()) - 65 < len(choices):
            return ord(text.upper()) - 65
        if text.isdigit() and int(text) < len(choices):
            return int(text)
    raise DataError(
        f"answer {value!r} is not a choice index (0-{len(choices) - 1}), a letter "
        f"(A-{chr(64 + len(choices))}) or the text of one of the {len(choices)} choices",
        where=where,
    )


# ------------------------------------------------------------------------- running


def _batched(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _write_outputs(out_dir: Path, result: dict[str, Any], items: list[dict[str, Any]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "predictions.jsonl").open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


@torch.no_grad()
def run_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: EvalConfig,
    data_cfg: DataConfig | None,
    device: torch.device,
    out_dir: Path | None = None,
    *,
    autocast: str = "none",
    step: int | None = None,
    model_name: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate `model` (already on `device`) on `cfg.data` (or `data_cfg.eval`).

    `data_cfg` is the recipe's data section (None for a bare model: the defaults of
    `DataConfig`); rows are formatted and masked exactly as training does. Returns
    a flat, JSON-able dict: `rows`, `kinds`, and per kind `loss`/`ppl`/`loss_tokens`,
    `accuracy`/`correct`/`scored`, `choice_accuracy`/`choice_correct`; `step` and
    `model` when given. With `out_dir`, writes predictions.jsonl (one line per
    row) and result.json (the returned dict). The model's train/eval mode is
    restored on return; `progress(phase, done, total)` is called as work is done.
    """
    t0 = time.perf_counter()
    path = cfg.data or (data_cfg.eval if data_cfg is not None else None)
    if path is None:
        raise DataError(
            "no evaluation data: eval.data and data.eval are both unset",
            where="eval.data",
            hint="pass --data FILE (or set eval.data in the recipe)",
        )
    dc = eval_data_config(data_cfg, cfg, path)
    rows = load_rows(path, cfg.limit)
    plan = plan_eval(rows, cfg, dc, path)
    items: list[dict[str, Any]] = [{"index": i} for i in range(len(rows))]
    result: dict[str, Any] = {"data": path, "rows": len(rows), "kinds": plan.kinds}
    if model_name is not None:
        result["model"] = model_name
    if step is not None:
        result["step"] = step
    was_training = model.training
    model.eval()
    try:
        if "loss" in plan.kinds:
            result.update(_loss(model, tokenizer, rows, dc, cfg, device, autocast, items, progress))
        if "generate" in plan.kinds or "choice" in plan.kinds:
            renderer = PromptRenderer(dc, tokenizer)
            rendered = [renderer.text(r, f"{path}:row {i + 1}") for i, r in enumerate(rows)]
            prompts = renderer.ids([t for t, _, _ in rendered])
            # Keep the end of an over-long prompt: that is where the question and the
            # generation prompt are.
            prompts = [p[-dc.max_length :] for p in prompts]
            empty = [i + 1 for i, p in enumerate(prompts) if not p]
            if empty:
                raise DataError(
                    f"the prompt of row {empty[0]} renders to no tokens, so there is "
                    "nothing to generate from",
                    where=f"{path}:row {empty[0]}",
                    hint="give every row a non-empty prompt",
                )
            for item, (_, user, _) in zip(items, rendered, strict=True):
                item["prompt"] = user
            if "generate" in plan.kinds:
                golds = [
                    r.get(plan.answer_col) if plan.answer_col in r else ref
                    for r, (_, _, ref) in zip(rows, rendered, strict=True)
                ]
                result.update(
                    _generate(
                        model, tokenizer, prompts, golds, cfg, device, autocast, items, progress
                    )
                )
            if "choice" in plan.kinds:
                result.update(
                    _choices(
                        model,
                        tokenizer,
                        renderer,
                        rows,
                        prompts,
                        plan,
                        cfg,
                        device,
                        autocast,
                        items,
                        progress,
                    )
                )
    finally:
        model.train(was_training)
    result["elapsed_s"] = round(time.perf_counter() - t0, 3)
    if out_dir is not None:
        result["predictions"] = str(Path(out_dir) / "predictions.jsonl")
        _write_outputs(Path(out_dir), result, items)
    return result


def _loss(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    dc: DataConfig,
    cfg: EvalConfig,
    device: torch.device,
    autocast: str,
    items: list[dict[str, Any]],
    progress: Progress | None,
) -> dict[str, Any]:
    """Token-weighted mean loss and perplexity, with training's tokens and masks."""
    data = tokenize_rows(rows, dc, tokenizer, dc.train)
    per_row = len(data) == len(rows)  # `truncation: drop` loses the row <-> item mapping
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, n_tokens, done = 0.0, 0, 0
    for batch in eval_batches(data, cfg.batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_ctx(device, autocast):
            sums, counts = row_loss_sums(model, batch)
        for s, c in zip(sums.tolist(), counts.tolist(), strict=True):
            if per_row:
                items[done]["loss"] = s / c
                items[done]["loss_tokens"] = c
            total += s
            n_tokens += c
            done += 1
        if progress:
            progress("loss", done, len(data))
    loss = total / n_tokens if n_tokens else math.nan
    out: dict[str, Any] = {"loss": loss, "ppl": perplexity(loss), "loss_tokens": n_tokens}
    if data.dropped:
        out["loss_rows_dropped"] = data.dropped
    return out


def _generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    golds: list[Any],
    cfg: EvalConfig,
    device: torch.device,
    autocast: str,
    items: list[dict[str, Any]],
    progress: Progress | None,
) -> dict[str, Any]:
    """Batched greedy generation, then answer extraction and scoring."""
    scorer = Scorer(cfg.scorer, cfg.regex)
    stop_ids = stop_token_ids(model, tokenizer)
    # Sorting by length keeps padding (wasted compute) small; results go back by index.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    correct = new_tokens = 0
    for start, end in _batched(len(order), cfg.batch_size):
        idx = order[start:end]
        gens = greedy_generate(
            model,
            tokenizer,
            [prompts[i] for i in idx],
            cfg.max_new_tokens,
            device,
            stop_ids=stop_ids,
            stop_strings=cfg.stop,
            autocast=autocast,
        )
        for i, g in zip(idx, gens, strict=True):
            score = scorer(g.text, golds[i])
            correct += score.correct
            new_tokens += len(g.tokens)
            items[i].update(
                prediction=g.text,
                extracted=score.extracted,
                gold=score.gold,
                correct=score.correct,
                new_tokens=len(g.tokens),
                finish=g.finish,
            )
        if progress:
            progress("generate", end, len(order))
    n = len(prompts)
    return {
        "accuracy": correct / n if n else math.nan,
        "correct": correct,
        "scored": n,
        "scorer": cfg.scorer,
        "max_new_tokens": cfg.max_new_tokens,
        "new_tokens": new_tokens,
    }


def choice_logprobs(
    model: torch.nn.Module,
    sequences: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: str = "none",
) -> list[tuple[float, int]]:
    """(sum of log p(continuation | prompt), continuation tokens) per (prompt, continuation)."""
    out: list[tuple[float, int]] = []
    for start, end in _batched(len(sequences), batch_size):
        chunk = sequences[start:end]
        batch = collate(
            [p + c for p, c in chunk],
            [[IGNORE_INDEX] * len(p) + list(c) for p, c in chunk],
            pad_id,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_ctx(device, autocast):
            sums, counts = row_loss_sums(model, batch)
        out.extend((-s, c) for s, c in zip(sums.tolist(), counts.tolist(), strict=True))
    return out


def _choices(
    model: torch.nn.Module,
    tokenizer: Any,
    renderer: PromptRenderer,
    rows: list[dict[str, Any]],
    prompts: list[list[int]],
    plan: EvalPlan,
    cfg: EvalConfig,
    device: torch.device,
    autocast: str,
    items: list[dict[str, Any]],
    progress: Progress | None,
) -> dict[str, Any]:
    """Multiple choice: the choice whose tokens the model finds most likely wins.

    Each choice is the answer a training row would have after the prompt (the
    assistant content with a chat template, the completion without), tokenized on
    its own as training tokenizes answers; end-of-turn tokens are not scored.
    """
    sequences: list[tuple[list[int], list[int]]] = []
    spans: list[tuple[int, int]] = []
    golds: list[int] = []
    for i, row in enumerate(rows):
        where = f"{plan.path}:row {i + 1}"
        choices = row.get(plan.choices_col)
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(
                f"field 'choices' (column {plan.choices_col!r}) must be a list of at least "
                f"two strings, got {choices!r:.60}",
                where=where,
            )
        choices = [str(c) for c in choices]
        golds.append(_gold_choice(row.get(plan.answer_col), choices, where))
        enc = tokenizer(choices, add_special_tokens=False)["input_ids"]
        for j, ids in enumerate(enc):
            if not ids:
                raise DataError(f"choice {j} is empty", where=where)
        start = len(sequences)
        limit = renderer.cfg.max_length
        for ids in enc:
            keep = max(1, limit - len(ids))
            sequences.append((prompts[i][-keep:], list(ids)))
        spans.append((start, len(sequences)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[tuple[float, int]] = []
    for start, end in _batched(len(sequences), cfg.batch_size * 4):
        scores.extend(
            choice_logprobs(model, sequences[start:end], pad_id, cfg.batch_size, device, autocast)
        )
        if progress:
            progress("choice", end, len(sequences))
    correct = 0
    for i, (a, b) in enumerate(spans):
        logps = [s for s, _ in scores[a:b]]
        ranked = logps if cfg.choice_score == "sum" else [s / c for s, c in scores[a:b]]
        pick = max(range(len(ranked)), key=lambda j: ranked[j])
        correct += pick == golds[i]
        items[i].update(
            choice_logprobs=logps,
            choice_tokens=[c for _, c in scores[a:b]],
            choice=pick,
            gold_choice=golds[i],
            choice_correct=pick == golds[i],
        )
    n = len(rows)
    return {
        "choice_accuracy": correct / n if n else math.nan,
        "choice_correct": correct,
        "choice_score": cfg.choice_score,
    }
