"""Hints for mistakes users bring from elsewhere: other tools' keys, max_steps vs epochs
on the command line, a file in another data format, a data.eval left from another task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from grass_cli.data.rows import FormatGuess, detect_format, resolve_columns
from grass_cli.errors import DataError, RecipeError
from grass_cli.preflight import Preflight, check_data
from grass_cli.recipe import all_keys, did_you_mean, load_recipe, suggest_key, validate_dict
from grass_cli.recipe.foreign_keys import FOREIGN_KEYS

# ------------------------------------------------------------------ foreign keys


def recipe_error(data: dict) -> str:
    with pytest.raises(RecipeError) as exc:
        validate_dict(data, "r.yaml")
    return str(exc.value)


@pytest.mark.parametrize("key", sorted(FOREIGN_KEYS))
def test_each_foreign_key_names_our_key(key):
    msg = recipe_error({"data": {"train": "x.jsonl"}, key: True})
    assert "invalid recipe (1 error):" in msg
    assert f"\n  - {key}: unknown key ('{key}' is " in msg
    assert f" key; ours is '{FOREIGN_KEYS[key].ours}'" in msg


def test_every_foreign_target_is_a_key():
    keys = set(all_keys())
    assert {k: e.ours for k, e in FOREIGN_KEYS.items() if e.ours not in keys} == {}


def test_no_foreign_key_is_one_of_ours():
    # A name we use too is found by the leaf match, in its right section.
    ours = {k.rsplit(".", 1)[-1] for k in all_keys()}
    assert sorted(set(FOREIGN_KEYS) & ours) == []


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("base_model", "'base_model' is axolotl's key; ours is 'model.path'"),
        ("datasets", "'datasets' is axolotl's key; ours is 'data.train'"),
        (
            "learning_rate",
            "'learning_rate' is the HF TrainingArguments / LLaMA-Factory / axolotl key; "
            "ours is 'optimizer.lr'",
        ),
        (
            "training.learning_rate",
            "'learning_rate' is the HF TrainingArguments / LLaMA-Factory / axolotl key; "
            "ours is 'optimizer.lr'",
        ),
        (
            "warmup_ratio",
            "'warmup_ratio' is the HF TrainingArguments / LLaMA-Factory / axolotl key; "
            "ours is 'training.warmup_steps' (a step count, not a ratio)",
        ),
        (
            "num_train_epochs",
            "'num_train_epochs' is the HF TrainingArguments / LLaMA-Factory key; "
            "ours is 'training.epochs'",
        ),
        ("num_epochs", "'num_epochs' is axolotl's key; ours is 'training.epochs'"),
        (
            "val_set_size",
            "'val_set_size' is axolotl's key; ours is 'data.eval' (a share of data.train "
            "such as 0.05, a row count, or an eval file)",
        ),
        (
            "lisa_activated_layers",
            "'lisa_activated_layers' is LMFlow's key; ours is 'sampler.gamma' "
            "(with sampler.strategy: lisa)",
        ),
        (
            "sampler.lisa_n_layers",
            "'lisa_n_layers' is axolotl's key; ours is 'sampler.gamma' "
            "(with sampler.strategy: lisa)",
        ),
        (
            "badam_switch_interval",
            "'badam_switch_interval' is LLaMA-Factory's key; ours is 'sampler.switch_interval'",
        ),
        ("cutoff_len", "'cutoff_len' is LLaMA-Factory's key; ours is 'data.max_length'"),
        (
            "bf16",
            "'bf16' is the HF TrainingArguments / LLaMA-Factory / axolotl key; ours is "
            "'model.dtype' (bf16: true is model.dtype: bfloat16, or training.autocast: "
            "bf16 with float32 weights)",
        ),
        ("lora.lora_r", "'lora_r' is axolotl's key; ours is 'lora.r'"),
    ],
)
def test_foreign_key_hint_wording(key, hint):
    assert did_you_mean(key) == hint


def test_foreign_key_in_a_recipe_error():
    msg = recipe_error({"data": {"train": "x.jsonl"}, "base_model": "HuggingFaceTB/SmolLM2"})
    assert msg == (
        "r.yaml: invalid recipe (1 error):\n"
        "  - base_model: unknown key ('base_model' is axolotl's key; ours is 'model.path')\n"
        "  hint: `grass validate RECIPE` checks a recipe; docs/recipes.md lists every key"
    )


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("micro_batch_size", "did you mean 'training.micro_batch_size'?"),
        ("max_length", "did you mean 'data.max_length'?"),
        ("training.weight_decay", "did you mean 'optimizer.weight_decay'?"),
        ("sampler.gama", "did you mean 'sampler.gamma'?"),
        ("zzzz.qqqq", None),
    ],
)
def test_our_own_names_keep_the_leaf_and_spelling_matches(key, hint):
    assert did_you_mean(key) == hint


def test_suggest_key_answers_a_foreign_key_first():
    assert suggest_key("base_model") == "model.path"
    assert suggest_key("training.learning_rate") == "optimizer.lr"


# ------------------------------------------------------- epochs vs max_steps overrides


def write_recipe(tmp_path: Path, training: dict) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"data": {"train": "t.jsonl"}, "training": training}))
    return p


def test_epochs_override_replaces_the_files_max_steps(tmp_path):
    r = load_recipe(write_recipe(tmp_path, {"max_steps": 500}), ["training.epochs=2"])
    assert (r.training.epochs, r.training.max_steps) == (2, None)


def test_max_steps_override_replaces_the_files_epochs(tmp_path):
    r = load_recipe(write_recipe(tmp_path, {"epochs": 3}), ["training.max_steps=50"])
    assert (r.training.epochs, r.training.max_steps) == (None, 50)


def test_null_override_drops_nothing(tmp_path):
    r = load_recipe(write_recipe(tmp_path, {"max_steps": 500}), ["training.epochs=null"])
    assert (r.training.epochs, r.training.max_steps) == (None, 500)


BOTH = (
    "  - training: set either max_steps or epochs, not both (max_steps=null clears it); "
    "got a section with keys ['epochs', 'max_steps']"
)


def test_both_overridden_is_still_refused(tmp_path):
    p = write_recipe(tmp_path, {"max_steps": 500})
    with pytest.raises(RecipeError) as exc:
        load_recipe(p, ["training.epochs=2", "training.max_steps=10"])
    assert BOTH in str(exc.value)


def test_both_in_the_file_is_still_refused(tmp_path):
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(tmp_path, {"max_steps": 500, "epochs": 2}))
    assert BOTH in str(exc.value)


# ------------------------------------------------------------------ data formats


@pytest.mark.parametrize(
    ("columns", "guess"),
    [
        (["messages"], FormatGuess("chat")),
        (["id", "conversations", "system"], FormatGuess("sharegpt")),
        (["instruction", "input", "output"], FormatGuess("alpaca")),
        (["instruction", "output"], FormatGuess("alpaca")),
        (["prompt", "completion"], FormatGuess("prompt-completion")),
        (["text", "source"], FormatGuess("text")),
        (
            ["question", "answer"],
            FormatGuess("prompt-completion", {"prompt": "question", "completion": "answer"}),
        ),
        (
            ["input", "output"],
            FormatGuess("prompt-completion", {"prompt": "input", "completion": "output"}),
        ),
        (["prompt", "response"], FormatGuess("prompt-completion", {"completion": "response"})),
        (["foo", "bar"], None),
        ([], None),
    ],
)
def test_detect_format(columns, guess):
    assert detect_format(columns) == guess


def test_detect_format_returns_a_copy_the_caller_may_change():
    detect_format(["question", "answer"]).fields["prompt"] = "x"  # type: ignore[union-attr]
    assert detect_format(["question", "answer"]).fields["prompt"] == "question"  # type: ignore[union-attr]


def columns_error(fmt: str, available: list[str], fields: dict | None = None) -> DataError:
    with pytest.raises(DataError) as exc:
        resolve_columns(fmt, fields or {}, available, "d.jsonl")
    return exc.value


@pytest.mark.parametrize(
    ("fmt", "available", "what", "hint"),
    [
        (
            "prompt-completion",
            ["messages"],
            "column 'prompt' for the prompt-completion field 'prompt' not found; "
            "the file has columns: messages",
            "this file looks like the chat format: set data.format: chat",
        ),
        (
            "chat",
            ["conversations"],
            "column 'messages' for the chat field 'messages' not found; "
            "the file has columns: conversations",
            "this file looks like the sharegpt format: set data.format: sharegpt",
        ),
        (
            "chat",
            ["instruction", "input", "output"],
            "column 'messages' for the chat field 'messages' not found; "
            "the file has columns: instruction, input, output",
            "this file looks like the alpaca format: set data.format: alpaca",
        ),
        (
            "alpaca",
            ["prompt", "completion"],
            "column 'instruction' for the alpaca field 'instruction' not found; "
            "the file has columns: prompt, completion",
            "this file looks like the prompt-completion format: set data.format: prompt-completion",
        ),
        (
            "prompt-completion",
            ["text"],
            "column 'prompt' for the prompt-completion field 'prompt' not found; "
            "the file has columns: text",
            "this file looks like the text format: set data.format: text",
        ),
        (
            "chat",
            ["question", "answer"],
            "column 'messages' for the chat field 'messages' not found; "
            "the file has columns: question, answer",
            "this file looks like the prompt-completion format: set data.format: "
            "prompt-completion and data.fields: {prompt: question, completion: answer}",
        ),
        (
            "prompt-completion",
            ["question", "answer"],
            "column 'prompt' for the prompt-completion field 'prompt' not found; "
            "the file has columns: question, answer",
            "map your columns with data.fields: {prompt: question, completion: answer}",
        ),
        (
            "prompt-completion",
            ["query", "reply"],
            "column 'prompt' for the prompt-completion field 'prompt' not found; "
            "the file has columns: query, reply",
            "map your columns with data.fields, e.g. data.fields: {prompt: query}",
        ),
    ],
)
def test_missing_column_hint_names_the_format_the_file_fits(fmt, available, what, hint):
    err = columns_error(fmt, available)
    assert (err.what, err.where, err.hint) == (what, "d.jsonl", hint)


# ------------------------------------------------------- data.eval from another task


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CHAT_ROW = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
}


def data_check(train: str, eval_: object, **data: object) -> None:
    recipe = validate_dict({"data": {"train": train, "eval": eval_, **data}}, "r.yaml")
    check_data(recipe, Preflight())


def test_eval_file_of_another_task_says_data_eval_still_points_there(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [CHAT_ROW] * 3)
    ev = jsonl(tmp_path / "eval.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError) as exc:
        data_check(train, ev, format="chat")
    err = exc.value
    assert err.where == ev
    assert err.what == (
        "column 'messages' for the chat field 'messages' not found; "
        "the file has columns: prompt, completion"
    )
    assert err.hint == (
        f"data.eval still points at {ev}: set data.eval to your own eval file, or to a "
        "share of data.train such as data.eval: 0.05 (if it is an eval file in the "
        f"prompt-completion format, give it as a source: data.eval: {{path: {ev}, "
        "format: prompt-completion})"
    )
    # Both ways out the hint names pass the same check.
    data_check(train, 0.05, format="chat")
    data_check(train, {"path": ev, "format": "prompt-completion"}, format="chat")


def test_eval_file_fitting_no_format_gets_the_eval_hint_alone(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [CHAT_ROW])
    ev = jsonl(tmp_path / "eval.jsonl", [{"foo": "x"}])
    with pytest.raises(DataError) as exc:
        data_check(train, ev, format="chat")
    assert exc.value.hint == (
        f"data.eval still points at {ev}: set data.eval to your own eval file, or to a "
        "share of data.train such as data.eval: 0.05"
    )


def test_train_file_of_another_format_keeps_the_format_hint(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", [CHAT_ROW])
    ev = jsonl(tmp_path / "eval.jsonl", [CHAT_ROW])
    with pytest.raises(DataError) as exc:
        data_check(train, ev)
    assert (exc.value.where, exc.value.hint) == (
        train,
        "this file looks like the chat format: set data.format: chat",
    )
