"""Evaluation on tiny random models: loss / perplexity by hand, generation, multiple
choice, and `grass eval` end to end (SmolLM2, marked slow, for the real model)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.data import eval_batches, load_rows, tokenize_rows
from grass_cli.errors import DataError
from grass_cli.eval_config import EvalConfig
from grass_cli.evaluate import (
    PromptRenderer,
    eval_data_config,
    eval_loss,
    greedy_generate,
    plan_eval,
    run_eval,
    stop_token_ids,
)
from grass_cli.recipe import DataConfig, validate_dict

ROOT = Path(__file__).resolve().parent.parent
TEST = str(ROOT / "data/quickstart/test.jsonl")
CHOICE = str(ROOT / "data/quickstart/test-choice.jsonl")
CPU = torch.device("cpu")


def load(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------ loss / ppl


def test_perplexity_is_exp_of_the_mean_token_loss_by_hand(tiny_factory, tokenizer, tmp_path):
    model = load(tiny_factory("llama", 4))
    dc = DataConfig(train=TEST, max_length=64)
    cfg = EvalConfig(data=TEST, kind="loss", limit=6, batch_size=4)
    result = run_eval(model, tokenizer, cfg, dc, CPU, tmp_path)

    # By hand: every row alone, log-softmax, the masked answer tokens only.
    data = tokenize_rows(load_rows(TEST, 6), dc, tokenizer, TEST)
    nll, n = 0.0, 0
    per_row = []
    with torch.no_grad():
        for ids, labels in zip(data.input_ids, data.labels, strict=True):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            row = [-float(logp[t - 1, labels[t]]) for t in range(1, len(ids)) if labels[t] != -100]
            per_row.append(sum(row) / len(row))
            nll += sum(row)
            n += len(row)
    mean = nll / n
    assert result["loss_tokens"] == n == data.trainable_tokens
    assert result["loss"] == pytest.approx(mean, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(mean), rel=1e-6)
    # Training's own loss function gives the same number on the same batches.
    train_loss, train_n = eval_loss(model, eval_batches(data, 4, tokenizer.pad_token_id), CPU)
    assert train_n == n and result["loss"] == pytest.approx(train_loss, rel=1e-6)
    items = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [i["index"] for i in items] == list(range(6))
    assert [i["loss"] for i in items] == pytest.approx(per_row, rel=1e-6)


def test_eval_restores_training_mode(tiny_factory, tokenizer):
    model = load(tiny_factory("llama", 4)).train()
    run_eval(model, tokenizer, EvalConfig(data=TEST, kind="loss", limit=2), None, CPU)
    assert model.training


# ------------------------------------------------------------------------ generation


def _prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    renderer = PromptRenderer(DataConfig(train=TEST), tokenizer)
    return renderer.ids([renderer.text({"prompt": t}, "test")[0] for t in texts])


PROMPTS = [
    "Hi",
    "State the final answer to the following arithmetic problem: 74 + 49 =",
    "A much longer prompt, with many more words in it, so that the others need padding.",
]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_generation_equals_unbatched_token_for_token(arch, tiny_factory, tokenizer):
    model = load(tiny_factory(arch, 2))
    prompts = _prompts(tokenizer, PROMPTS)
    assert len({len(p) for p in prompts}) == 3  # padding is really exercised
    batched = greedy_generate(model, tokenizer, prompts, 10, CPU)
    alone = [greedy_generate(model, tokenizer, [p], 10, CPU)[0] for p in prompts]
    for b, a in zip(batched, alone, strict=True):
        assert b.tokens == a.tokens and b.finish == a.finish
        assert b.text == a.text
    assert all(len(b.tokens) > 0 for b in batched)


def test_greedy_generation_matches_transformers_generate(tiny_factory, tokenizer):
    model = load(tiny_factory("llama", 2))
    prompt = _prompts(tokenizer, PROMPTS[1:2])[0]
    ours = greedy_generate(model, tokenizer, [prompt], 12, CPU)[0]
    ref = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=sorted(stop_token_ids(model, tokenizer)),
    )[0, len(prompt) :].tolist()
    stops = stop_token_ids(model, tokenizer)
    assert ours.tokens == [t for t in ref if t not in stops]


def test_stop_strings_cut_the_text_and_end_the_row(tiny_factory, tokenizer):
    model = load(tiny_factory("llama", 2))
    prompt = _prompts(tokenizer, PROMPTS[:1])
    full = greedy_generate(model, tokenizer, prompt, 12, CPU)[0]
    assert full.finish == "length" and len(full.text) > 4
    # A stop string from the middle of the free-running output.
    k = len(full.text) // 2
    stop = full.text[k : k + 2]
    cut = greedy_generate(model, tokenizer, prompt, 12, CPU, stop_strings=[stop])[0]
    assert cut.finish == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert len(cut.tokens) < len(full.tokens)
    assert cut.tokens == full.tokens[: len(cut.tokens)]


def test_end_of_turn_token_stops_generation(tiny_factory, tokenizer):
    model = load(tiny_factory("llama", 2))
    prompt = _prompts(tokenizer, PROMPTS[:1])
    free = greedy_generate(model, tokenizer, prompt, 6, CPU)[0]
    # Declaring the third generated token a stop token ends the row right before it.
    stop_at = free.tokens[2]
    first = free.tokens.index(stop_at)
    out = greedy_generate(model, tokenizer, prompt, 6, CPU, stop_ids={stop_at})[0]
    assert out.finish == "eos" and out.tokens == free.tokens[:first]


def test_stop_ids_include_the_chat_templates_end_of_turn(tiny_factory, tokenizer):
    model = load(tiny_factory("llama", 2))
    ids = stop_token_ids(model, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert tokenizer.eos_token_id in ids


def test_generation_prompt_is_the_training_prefix_of_the_row(tokenizer):
    """The tokens generation starts from are exactly those a training row has
    before its answer: the model sees at eval what it was trained on."""
    rows = load_rows(TEST, 3)
    for template in ("auto", "never"):
        dc = DataConfig(train=TEST, chat_template=template, system_prompt="Be brief.")
        data = tokenize_rows(rows, dc, tokenizer, TEST)
        renderer = PromptRenderer(dc, tokenizer)
        prompts = renderer.ids([renderer.text(r, "t")[0] for r in rows])
        for ids, labels, prompt in zip(data.input_ids, data.labels, prompts, strict=True):
            start = next(i for i, lab in enumerate(labels) if lab != -100)
            assert ids[:start] == prompt


def test_generation_scoring_and_predictions_file(tiny_factory, tokenizer, tmp_path):
    model = load(tiny_factory("llama", 2))
    cfg = EvalConfig(data=TEST, limit=5, max_new_tokens=3, scorer="numeric", batch_size=2)
    result = run_eval(model, tokenizer, cfg, None, CPU, tmp_path / "out", model_name="tiny")
    assert result["kinds"] == ["loss", "generate"]  # the file has completion and answer
    items = [json.loads(x) for x in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    assert len(items) == 5 and [i["index"] for i in items] == list(range(5))
    rows = load_rows(TEST, 5)
    assert [i["gold"] for i in items] == [r["answer"] for r in rows]
    assert [i["prompt"] for i in items] == [r["prompt"] for r in rows]
    assert result["correct"] == sum(i["correct"] for i in items)
    assert result["accuracy"] == result["correct"] / 5
    assert result["new_tokens"] == sum(i["new_tokens"] for i in items)
    assert json.loads((tmp_path / "out/result.json").read_text()) == result


# ---------------------------------------------------------------------- multiple choice


def test_multiple_choice_picks_the_highest_log_likelihood(tiny_factory, tokenizer, tmp_path):
    model = load(tiny_factory("llama", 2))
    rows = [
        {"prompt": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0},
        {"prompt": "Capital of France?", "choices": ["Paris", "Rome"], "answer": "B"},
        {"prompt": "Pick one", "choices": ["yes", "no", "maybe so"], "answer": "maybe so"},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    dc = DataConfig(train=path)
    result = run_eval(model, tokenizer, EvalConfig(data=path), dc, CPU, tmp_path / "o")
    assert result["kinds"] == ["choice"]  # no completion column: no loss
    items = [json.loads(x) for x in (tmp_path / "o/predictions.jsonl").read_text().splitlines()]
    renderer = PromptRenderer(dc, tokenizer)
    golds = [0, 1, 2]
    with torch.no_grad():
        for row, item, gold in zip(rows, items, golds, strict=True):
            prompt = renderer.ids([renderer.text(row, "t")[0]])[0]
            by_hand = []
            for choice in row["choices"]:
                cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([prompt + cont])
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
                by_hand.append(sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(cont)))
            assert item["choice_logprobs"] == pytest.approx(by_hand, rel=1e-5)
            assert item["choice"] == max(range(len(by_hand)), key=by_hand.__getitem__)
            assert item["gold_choice"] == gold
    assert result["choice_correct"] == sum(
        i["choice"] == g for i, g in zip(items, golds, strict=True)
    )

    # Length-normalised scoring ranks by the mean log-likelihood per token instead.
    mean = run_eval(model, tokenizer, EvalConfig(data=path, choice_score="mean"), dc, CPU)
    assert mean["choice_score"] == "mean"


def test_multiple_choice_with_mean_score_uses_per_token_means(tiny_factory, tokenizer, tmp_path):
    model = load(tiny_factory("llama", 2))
    rows = [{"prompt": "Say", "choices": ["a", "a long long long answer"], "answer": 1}]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    out = tmp_path / "o"
    run_eval(model, tokenizer, EvalConfig(data=path, choice_score="mean"), None, CPU, out)
    item = json.loads((out / "predictions.jsonl").read_text())
    means = [s / c for s, c in zip(item["choice_logprobs"], item["choice_tokens"], strict=True)]
    assert item["choice"] == max(range(2), key=means.__getitem__)
    assert item["choice_tokens"][1] > item["choice_tokens"][0]


def test_bad_gold_choice_names_the_row(tiny_factory, tokenizer, tmp_path):
    model = load(tiny_factory("llama", 2))
    path = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"prompt": "p", "choices": ["x", "y"], "answer": 0},
            {"prompt": "p", "choices": ["x", "y"], "answer": "Z"},
        ],  # fmt: skip
    )
    with pytest.raises(DataError, match=r"mc.jsonl:row 2.*'Z'"):
        run_eval(model, tokenizer, EvalConfig(data=path), None, CPU)


# ------------------------------------------------------------------ planning / fields


def _plan(rows, **cfg):
    c = EvalConfig(data="f.jsonl", **cfg)
    return plan_eval(rows, c, eval_data_config(None, c, "f.jsonl"), "f.jsonl")


def test_kinds_are_chosen_from_the_columns():
    assert _plan([{"prompt": "a", "completion": "b"}]).kinds == ["loss"]
    assert _plan([{"prompt": "a", "completion": "b", "answer": "c"}]).kinds == [
        "loss",
        "generate",
    ]
    assert _plan([{"prompt": "a", "answer": "c"}]).kinds == ["generate"]
    assert _plan([{"prompt": "a", "choices": ["x"], "answer": 0}]).kinds == ["choice"]
    plan = _plan(
        [{"question": "a", "label": "c"}], fields={"prompt": "question", "answer": "label"}
    )
    assert plan.kinds == ["generate"] and plan.answer_col == "label"


def test_missing_fields_name_the_column_and_the_fix():
    with pytest.raises(DataError, match=r"'question' for the field 'prompt'.*columns: q, a"):
        _plan([{"q": "x", "a": "y"}], fields={"prompt": "question"}, kind="generate")
    with pytest.raises(DataError, match="(?s)'choices'.*--field choices=COLUMN"):
        _plan([{"prompt": "x", "answer": "y"}], kind="choice")
    with pytest.raises(DataError, match="nothing to evaluate"):
        _plan([{"x": 1}])
    with pytest.raises(DataError, match="'completion'"):
        _plan([{"prompt": "x"}], kind="loss")
    with pytest.raises(DataError, match="neither a field"):
        _plan([{"prompt": "x"}], fields={"bogus": "x"})


def test_recipe_formatting_carries_over_to_eval():
    dc = DataConfig(train="t.jsonl", fields={"prompt": "q"}, max_length=99, system_prompt="S")
    merged = eval_data_config(dc, EvalConfig(fields={"completion": "c", "answer": "a"}), "e.jsonl")
    assert merged.fields == {"prompt": "q", "completion": "c"}
    assert (merged.max_length, merged.system_prompt, merged.train) == (99, "S", "e.jsonl")
    # Another format drops the recipe's mapping, which belongs to the old format.
    other = eval_data_config(dc, EvalConfig(format="alpaca"), "e.jsonl")
    assert other.format == "alpaca" and other.fields == {}


# ---------------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_json_matches_result_json_and_predictions_has_one_row_per_item(tiny_factory, tmp_path):
    out = tmp_path / "ev"
    res = runner.invoke(
        app,
        [
            "eval",
            str(tiny_factory("llama", 2)),
            "--data",
            TEST,
            "--limit",
            "4",
            "--max-new-tokens",
            "2",
            "--scorer",
            "numeric",
            "--json",
            "--out",
            str(out),
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert printed == json.loads((out / "result.json").read_text())
    assert printed["rows"] == 4 and printed["kinds"] == ["loss", "generate"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4


def test_cli_table_output(tiny_factory, tmp_path):
    res = runner.invoke(
        app,
        [
            "eval",
            str(tiny_factory("llama", 2)),
            "--data",
            CHOICE,
            "--limit",
            "3",
            "--out",
            str(tmp_path / "ev"),
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "ev/result.json").read_text())
    assert "choice accuracy (sum log-lik)" in res.stdout
    assert f"({result['choice_correct']}/3)" in res.stdout


def test_cli_missing_file_is_a_clear_error(tiny_factory, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    res = runner.invoke(app, ["eval", str(tiny_factory("llama", 2)), "--data", missing])
    assert res.exit_code == 2
    assert "nope.jsonl" in res.stderr and "not found" in res.stderr


def test_cli_missing_field_is_a_clear_error(tiny_factory):
    res = runner.invoke(
        app,
        ["eval", str(tiny_factory("llama", 2)), "--data", TEST, "--field", "prompt=question"],
    )
    assert res.exit_code == 2
    assert "'question'" in res.stderr and "prompt" in res.stderr


def test_cli_bad_options_are_clear_errors(tiny_factory):
    model = str(tiny_factory("llama", 2))
    res = runner.invoke(app, ["eval", model, "--data", TEST, "--scorer", "regex"])
    assert res.exit_code == 2 and "regex" in res.stderr
    res = runner.invoke(app, ["eval", model, "--data", TEST, "--field", "prompt"])
    assert res.exit_code == 2 and "FIELD=COLUMN" in res.stderr
    res = runner.invoke(app, ["eval", model])
    assert res.exit_code == 2 and "--data" in res.stderr


def test_cli_run_dir_uses_final_model_and_recipe_eval_data(tiny_factory, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_factory("llama", 2), run_dir / "final")
    recipe = validate_dict(
        {
            "model": {"path": "unused"},
            "data": {"train": TEST, "eval": TEST, "max_length": 96},
            "output": {"dir": str(run_dir)},
        },
        "r.yaml",
    )
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    res = runner.invoke(app, ["eval", str(run_dir), "--limit", "2", "--kind", "loss", "--json"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert printed["data"] == TEST and printed["model"] == str(run_dir)
    assert (run_dir / "eval/result.json").exists()
    # Without final/, a run dir is refused with a message saying so.
    shutil.rmtree(run_dir / "final")
    res = runner.invoke(app, ["eval", str(run_dir), "--limit", "2"])
    assert res.exit_code == 2 and "final" in res.stderr


def test_cli_data_may_be_a_saved_folder_split_and_equals_the_file(tiny_factory, tmp_path):
    """A split of a folder saved by datasets evaluates exactly as the same rows in a
    file; a slice takes its rows; a hub dataset that is not there fails in one line."""
    from datasets import Dataset, DatasetDict

    rows = load_rows(TEST, 6)
    splits = {"train": Dataset.from_list(rows[:2]), "test": Dataset.from_list(rows)}
    DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    model = str(tiny_factory("llama", 2))
    common = ["--kind", "loss", "--json"]
    res = runner.invoke(app, ["eval", model, "--data", TEST, "--limit", "6", *common])
    assert res.exit_code == 0, res.output
    from_file = json.loads(res.stdout)
    out = ["--out", str(tmp_path / "ev")]
    args = ["eval", model, "--data", str(tmp_path / "saved"), "--split", "test", *common, *out]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    from_folder = json.loads(res.stdout)
    assert from_folder["data"] == f"{tmp_path / 'saved'} [test]" and from_folder["rows"] == 6
    assert from_folder["loss"] == from_file["loss"]
    args = ["eval", model, "--data", str(tmp_path / "saved"), "--split", "test[:3]", *common, *out]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"] == 3
    res = runner.invoke(app, ["eval", model, "--data", str(tmp_path / "saved"), "--split", "dev"])
    assert res.exit_code == 2 and "dev" in res.stderr and "Traceback" not in res.output


def test_cli_hub_dataset_through_the_datasets_cache(tiny_factory, tmp_path, monkeypatch):
    """A hub dataset evaluates from the datasets cache offline, split and config as
    asked, exactly as its rows in a file; one not cached is one error naming it."""
    import datasets
    from test_data_sources import cache_hub_dataset

    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    rows = load_rows(TEST, 5)
    cache_hub_dataset(cache, "someorg/bench", {"train": rows[:2], "test": rows}, config="main")
    model = str(tiny_factory("llama", 2))
    common = ["--kind", "loss", "--json", "--out", str(tmp_path / "ev")]
    res = runner.invoke(app, ["eval", model, "--data", TEST, "--limit", "5", *common])
    from_file = json.loads(res.stdout)
    args = ["eval", model, "--data", "someorg/bench", "--config", "main", "--split", "test"]
    res = runner.invoke(app, [*args, *common])
    assert res.exit_code == 0, res.output
    from_hub = json.loads(res.stdout)
    assert from_hub["data"] == "someorg/bench (main) [test]" and from_hub["rows"] == 5
    assert from_hub["loss"] == from_file["loss"]
    res = runner.invoke(app, ["eval", model, "--data", "someorg/other", "--split", "test"])
    assert res.exit_code == 2
    assert "eval.data: someorg/other" in res.stderr and "not in the datasets cache" in res.stderr


def test_recipe_task_eval_reads_a_data_eval_source(tiny_factory, tmp_path):
    """data.eval given as a source {path, split} is the task eval's default data too."""
    from datasets import Dataset, DatasetDict

    from grass_cli.evaluate.source import describe, require_source

    DatasetDict({"test": Dataset.from_list(load_rows(TEST, 5))}).save_to_disk(str(tmp_path / "s"))
    recipe = validate_dict(
        {
            "data": {"train": TEST, "eval": {"path": str(tmp_path / "s"), "split": "test"}},
            "eval": {"kind": ["loss"]},
        },
        "r.yaml",
    )
    src = require_source(recipe.eval, recipe.data)
    assert describe(src) == f"{tmp_path / 's'} [test]"
    model = load(tiny_factory("llama", 2))
    from grass_cli.models import load_tokenizer

    tok = load_tokenizer(str(tiny_factory("llama", 2)))
    result = run_eval(model, tok, recipe.eval, recipe.data, CPU)
    assert result["rows"] == 5 and result["data"] == describe(src)
    held = validate_dict({"data": {"train": TEST, "eval": 0.1}, "eval": {}}, "r.yaml")
    with pytest.raises(DataError, match="data.eval holds rows out of training"):
        require_source(held.eval, held.data)


# ------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
def test_smollm2_generation_path_on_held_out_items(smollm2_dir, tmp_path):
    """The real model through the whole CLI: chat template, end-of-turn stop, numeric
    scoring. A handful of items only; docs/eval.md has the full figures."""
    out = tmp_path / "ev"
    res = runner.invoke(
        app,
        [
            "eval",
            str(smollm2_dir),
            "--data",
            TEST,
            "--limit",
            "4",
            "--scorer",
            "numeric",
            "--max-new-tokens",
            "48",
            "--json",
            "--out",
            str(out),
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert 1.0 < result["ppl"] < 30.0  # a real model, not a random one
    items = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert any(i["finish"] == "eos" for i in items)  # it ends its turn by itself
    assert all("<|im_end|>" not in i["prediction"] for i in items)


# ------------------------------------------- generate() against the hand-written loop


def reference_greedy(model, tokenizer, prompts, max_new_tokens, stop_ids, stops):
    """The KV-cache loop grass used before `model.generate`, kept as the reference:
    left padding, positions from the mask, argmax, stop ids and stop strings."""
    import inspect

    from grass_cli.scoring import cut_at_stop

    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out, done, past = [[] for _ in prompts], [None] * len(prompts), None
    for _ in range(max_new_tokens):
        kw = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        if "position_ids" in params:
            kw["position_ids"] = pos
        if past is not None:
            kw[cache_kw] = past
        result = model(**kw)
        past = getattr(result, "cache", None) or result.past_key_values
        nxt = result.logits[:, -1, :].argmax(-1).tolist()
        for i, tok in enumerate(nxt):
            if done[i]:
                continue
            if tok in stop_ids:
                done[i] = "eos"
                continue
            out[i].append(tok)
            text = tokenizer.decode(out[i], skip_special_tokens=True)
            if stops and cut_at_stop(text, stops)[1]:
                done[i] = "stop"
        if all(done):
            break
        ids = torch.tensor([[pad if done[i] else t] for i, t in enumerate(nxt)])
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
        pos = pos[:, -1:] + 1
    texts = [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stops)[0] for t in out]
    return [(t, d or "length", x) for t, d, x in zip(out, done, texts, strict=True)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_generate_equals_the_hand_written_loop(arch, tiny_factory, tokenizer):
    """model.generate replaced the hand-written loop: the same tokens, the same
    finish, the same text, batched, with stop tokens and with stop strings."""
    model = load(tiny_factory(arch, 2))
    prompts = _prompts(tokenizer, PROMPTS)
    free = greedy_generate(model, tokenizer, prompts, 10, CPU)
    cases = [
        (set(stop_token_ids(model, tokenizer)), []),
        ({free[0].tokens[3], free[1].tokens[5]}, []),  # rows end at different steps
        (set(), [free[2].text[4:6], free[0].text[2:4]]),
    ]
    with torch.no_grad():
        for stop_ids, stops in cases:
            ours = greedy_generate(model, tokenizer, prompts, 10, CPU, stop_ids, stops)
            ref = reference_greedy(model, tokenizer, prompts, 10, stop_ids, stops)
            assert [(g.tokens, g.finish, g.text) for g in ours] == ref


def test_generation_ignores_the_models_sampling_defaults(tiny_factory, tokenizer):
    """A model's generation_config (sampling, repetition penalty) does not change
    greedy evaluation, and is left as it was."""
    model = load(tiny_factory("llama", 2))
    prompts = _prompts(tokenizer, PROMPTS)
    plain = greedy_generate(model, tokenizer, prompts, 8, CPU)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 5.0
    model.generation_config.repetition_penalty = 3.0
    again = greedy_generate(model, tokenizer, prompts, 8, CPU)
    assert [g.tokens for g in again] == [g.tokens for g in plain]
    assert model.generation_config.repetition_penalty == 3.0
