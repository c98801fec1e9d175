"""Data pipeline: loading, rendering, exact loss masks, truncation, errors, batching.

Uses the real SmolLM2 tokenizer and chat template (ChatML; eos is <|im_end|> = 2,
pad is <|endoftext|> = 0), so the masks asserted here are the ones training uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from grass_cli.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    BatchIterator,
    TokenizedData,
    build_dataset,
    collate,
    eval_batches,
    load_rows,
    steps_per_epoch,
    tokenize_rows,
)
from grass_cli.errors import DataError
from grass_cli.recipe import DataConfig

M = IGNORE_INDEX
IM_START, IM_END, NL = 1, 2, 198
ASSISTANT_HEADER = [IM_START, 520, 9531, NL]  # "<|im_start|>assistant\n"
DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n"
)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build(tmp_path, tokenizer, rows, name="d.jsonl", **cfg) -> TokenizedData:
    path = write_jsonl(tmp_path / name, rows)
    return build_dataset(DataConfig(train=path, **cfg), tokenizer, "train")


def trained_runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of non-masked labels."""
    runs: list[list[int]] = []
    current: list[int] = []
    for lab in labels:
        if lab == M:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(lab)
    if current:
        runs.append(current)
    return runs


# ------------------------------------------------------------------ exact labels


def test_tokenizer_facts(tokenizer):
    assert tokenizer.eos_token_id == IM_END
    assert tokenizer.pad_token_id == 0
    assert enc(tokenizer, "<|im_start|>assistant\n") == ASSISTANT_HEADER


def test_prompt_completion_chat_template(tmp_path, tokenizer):
    data = build(tmp_path, tokenizer, [{"prompt": "What is 2+2?", "completion": "4"}])
    prompt = enc(tokenizer, DEFAULT_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
    prompt += ASSISTANT_HEADER
    answer = enc(tokenizer, "4") + [IM_END, NL]
    assert data.input_ids == [prompt + answer]
    assert data.labels == [[M] * len(prompt) + answer]
    assert (data.rows, data.dropped, data.truncated) == (1, 0, 0)
    assert data.tokens == len(prompt) + len(answer)
    assert data.trainable_tokens == len(answer)
    assert data.source == str(tmp_path / "d.jsonl")
    # Same ids as tokenizing the whole rendered conversation at once.
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        tokenize=False,
    )
    assert data.input_ids[0] == enc(tokenizer, text)


def test_prompt_completion_without_template(tmp_path, tokenizer):
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
    data = build(tmp_path, tokenizer, rows, chat_template="never")
    p, c = enc(tokenizer, "Q: 2+2?\nA:"), enc(tokenizer, " 4")
    assert data.input_ids == [p + c + [IM_END]]
    assert data.labels == [[M] * len(p) + c + [IM_END]]


def test_train_on_prompt(tmp_path, tokenizer):
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
    data = build(tmp_path, tokenizer, rows, train_on_prompt=True)
    assert data.labels == data.input_ids
    data = build(tmp_path, tokenizer, rows, chat_template="never", train_on_prompt=True)
    assert data.labels == data.input_ids
    assert data.labels[0][-1] == IM_END


def test_alpaca_chat_template(tmp_path, tokenizer):
    rows = [
        {"instruction": "Translate.", "input": "Hallo", "output": "Hello"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    data = build(tmp_path, tokenizer, rows, format="alpaca")
    first = enc(tokenizer, DEFAULT_SYSTEM + "<|im_start|>user\nTranslate.\n\nHallo<|im_end|>\n")
    first += ASSISTANT_HEADER
    second = enc(tokenizer, DEFAULT_SYSTEM + "<|im_start|>user\nSay hi.<|im_end|>\n")
    second += ASSISTANT_HEADER
    a1, a2 = enc(tokenizer, "Hello") + [IM_END, NL], enc(tokenizer, "hi") + [IM_END, NL]
    assert data.input_ids == [first + a1, second + a2]
    assert data.labels == [[M] * len(first) + a1, [M] * len(second) + a2]


def test_alpaca_missing_input_column_and_null_input(tmp_path, tokenizer):
    data = build(tmp_path, tokenizer, [{"instruction": "Say hi.", "output": "hi"}], format="alpaca")
    assert tokenizer.decode(data.input_ids[0]).count("Say hi.<|im_end|>") == 1
    rows = [{"instruction": "A", "input": None, "output": "b"}, {"instruction": "C", "output": "d"}]
    assert build(tmp_path, tokenizer, rows, format="alpaca").rows == 2


def test_alpaca_without_template(tmp_path, tokenizer):
    rows = [
        {"instruction": "Translate.", "input": "Hallo", "output": "Hello"},
        {"instruction": "Say hi.", "output": "hi"},
    ]
    data = build(tmp_path, tokenizer, rows, format="alpaca", chat_template="never")
    p1 = enc(tokenizer, ALPACA_PROMPT.format(instruction="Translate.", input="Hallo"))
    p2 = enc(tokenizer, ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."))
    a1, a2 = enc(tokenizer, "Hello") + [IM_END], enc(tokenizer, "hi") + [IM_END]
    assert data.input_ids == [p1 + a1, p2 + a2]
    assert data.labels == [[M] * len(p1) + a1, [M] * len(p2) + a2]
    assert tokenizer.decode(p1).startswith("Below is an instruction that describes a task")
    assert tokenizer.decode(p1).endswith("### Input:\nHallo\n\n### Response:\n")


def test_text_trains_everything(tmp_path, tokenizer):
    data = build(tmp_path, tokenizer, [{"text": "Hello world."}], format="text")
    ids = enc(tokenizer, "Hello world.") + [IM_END]
    assert data.input_ids == [ids]
    assert data.labels == [ids]
    assert data.trainable_tokens == len(ids) - 1  # position 0 is never a target


def test_text_with_always_template_is_refused(tmp_path, tokenizer):
    with pytest.raises(DataError, match="text format has no roles"):
        build(tmp_path, tokenizer, [{"text": "x"}], format="text", chat_template="always")


def test_multi_turn_chat_masks_user_and_trains_every_assistant_turn(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    data = build(tmp_path, tokenizer, [{"messages": messages}], format="chat")
    ids, labels = data.input_ids[0], data.labels[0]
    assert ids == enc(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    assert trained_runs(labels) == [
        enc(tokenizer, "Hello.") + [IM_END, NL],
        enc(tokenizer, "Goodbye.") + [IM_END, NL],
    ]
    assert labels[-2:] == [IM_END, NL]  # the model learns to stop
    # Every masked position is a system/user/header token; every trained one equals its id.
    assert all(lab in (M, i) for lab, i in zip(labels, ids, strict=True))
    assert tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab == M]) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_trailing_user_turn_is_context_only(tmp_path, tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Thanks"},
    ]
    data = build(tmp_path, tokenizer, [{"messages": messages}], format="chat")
    assert data.input_ids[0] == enc(
        tokenizer, tokenizer.apply_chat_template(messages, tokenize=False)
    )
    assert trained_runs(data.labels[0]) == [enc(tokenizer, "Hello.") + [IM_END, NL]]


def test_system_prompt(tmp_path, tokenizer):
    rows = [{"prompt": "Hi", "completion": "Hello"}]
    data = build(tmp_path, tokenizer, rows, system_prompt="Be brief.")
    text = tokenizer.decode(data.input_ids[0])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert "SmolLM" not in text
    assert trained_runs(data.labels[0]) == [enc(tokenizer, "Hello") + [IM_END, NL]]
    # A conversation's own system message wins over data.system_prompt.
    own = [
        {"role": "system", "content": "Own."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
    ]
    text = tokenizer.decode(
        build(
            tmp_path, tokenizer, [{"messages": own}], format="chat", system_prompt="X."
        ).input_ids[0]
    )
    assert text.startswith("<|im_start|>system\nOwn.<|im_end|>") and "X." not in text
    no_system = own[1:]
    text = tokenizer.decode(
        build(
            tmp_path, tokenizer, [{"messages": no_system}], format="chat", system_prompt="X."
        ).input_ids[0]
    )
    assert text.startswith("<|im_start|>system\nX.<|im_end|>")


def test_field_mapping(tmp_path, tokenizer):
    rows = [{"question": "Q: 1+1?", "answer": " 2", "id": 7}]
    data = build(
        tmp_path,
        tokenizer,
        rows,
        fields={"prompt": "question", "completion": "answer"},
        chat_template="never",
    )
    p, c = enc(tokenizer, "Q: 1+1?"), enc(tokenizer, " 2")
    assert data.labels == [[M] * len(p) + c + [IM_END]]


# -------------------------------------------------------------------- truncation


def long_row(tokenizer) -> tuple[dict, list[int], list[int]]:
    prompt, completion = "one two three four five six", " seven eight nine ten"
    return (
        {"prompt": prompt, "completion": completion},
        enc(tokenizer, prompt),
        enc(tokenizer, completion) + [IM_END],
    )


def test_truncation_right(tmp_path, tokenizer):
    row, p, c = long_row(tokenizer)
    assert len(p) == 6 and len(c) == 5
    data = build(
        tmp_path,
        tokenizer,
        [row, {"prompt": "a", "completion": "b"}],
        chat_template="never",
        max_length=8,
        truncation="right",
    )
    assert data.input_ids[0] == (p + c)[:8]
    assert data.labels[0] == ([M] * 6 + c)[:8]
    assert [len(r) for r in data.input_ids] == [8, 3]
    assert (data.rows, data.truncated, data.dropped) == (2, 1, 0)


def test_truncation_left_keeps_the_answer(tmp_path, tokenizer):
    row, p, c = long_row(tokenizer)
    data = build(tmp_path, tokenizer, [row], chat_template="never", max_length=8, truncation="left")
    assert data.input_ids[0] == (p + c)[-8:]
    assert data.labels[0] == [M] * 3 + c
    assert data.truncated == 1


def test_truncation_drop(tmp_path, tokenizer):
    row, _, _ = long_row(tokenizer)
    short = {"prompt": "a", "completion": "b"}
    data = build(
        tmp_path,
        tokenizer,
        [row, short, row],
        chat_template="never",
        max_length=8,
        truncation="drop",
    )
    assert (data.rows, data.dropped, data.truncated) == (1, 2, 0)
    assert data.input_ids == [enc(tokenizer, "a") + enc(tokenizer, "b") + [IM_END]]


def test_right_truncation_leaving_nothing_to_train_names_rows(tmp_path, tokenizer):
    long_prompt = {"prompt": " ".join(["word"] * 20), "completion": "x"}
    ok = {"prompt": "a", "completion": "b"}
    with pytest.raises(DataError) as e:
        build(
            tmp_path,
            tokenizer,
            [ok, long_prompt, ok, long_prompt],
            max_length=8,
            chat_template="never",
        )
    msg = str(e.value)
    assert "d.jsonl" in msg and "rows 2, 4" in msg and "no trainable tokens" in msg
    assert "data.max_length" in msg and "truncation: left" in msg


def test_drop_everything_is_an_error(tmp_path, tokenizer):
    row, _, _ = long_row(tokenizer)
    with pytest.raises(DataError, match="no rows left") as e:
        build(
            tmp_path, tokenizer, [row, row], chat_template="never", max_length=8, truncation="drop"
        )
    assert "d.jsonl" in str(e.value)


# ------------------------------------------------------------------------ errors


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found") as e:
        load_rows(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(e.value)
    assert "relative path" not in e.value.hint


def test_missing_relative_file_says_where_it_looked(tmp_path, monkeypatch):
    """A relative path is read from the working folder; the hint names that folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="not found") as e:
        load_rows("data/nope.jsonl")
    assert e.value.hint.endswith(f"read from the current folder, {tmp_path}")


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match="unknown data file type '.xlsx'") as e:
        load_rows(str(path))
    assert "data.xlsx" in str(e.value) and ".jsonl" in str(e.value)


def test_unparseable_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"\nnot json at all\n')
    with pytest.raises(DataError, match="cannot parse this json file") as e:
        load_rows(str(path))
    assert "bad.jsonl" in str(e.value) and "hint" in str(e.value)
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match="cannot parse this parquet file"):
        load_rows(str(bad_parquet))


def test_parse_errors_do_not_print(tmp_path, capfd):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    with pytest.raises(DataError):
        load_rows(str(path))
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""


GOOD_LINE = '{"prompt": "a", "completion": "b"}\n'


@pytest.mark.parametrize(
    ("lines", "where", "what"),
    [
        # A missing comma: the parser said "Trailing data at position 104".
        (
            [GOOD_LINE] * 3 + ['{"prompt": "a" "completion": "b"}\n'],
            ":4:",
            "not valid JSON (Expecting ',' delimiter at column 16)",
        ),
        # A line cut short runs into the next one: the parser said "Column(/completion)
        # changed from string to object in row 3".
        (
            [GOOD_LINE] * 3 + ['{"prompt": "a", "completion": \n'] + [GOOD_LINE],
            ":4:",
            "not valid JSON (Expecting value at column 31)",
        ),
        ([GOOD_LINE, '{"prompt": "a", "comp\n'], ":2:", "Unterminated string starting at"),
        ([GOOD_LINE, GOOD_LINE + "x\n"], ":3:", "not valid JSON (Expecting value at column 1)"),
        ([GOOD_LINE, '["a", "b"]\n'], ":2:", "expected a JSON object {...}, got a list"),
        # A null line made the JSON reader crash the process (segmentation fault).
        (["null\n", GOOD_LINE], ":1:", "expected a JSON object {...}, got null"),
        (
            [GOOD_LINE, "\n", '{"prompt": "a", "completion": {"x": 1}}\n'],
            ":3:",
            "'completion' is an object, expected text as in line 1",
        ),
    ],
)
def test_bad_jsonl_lines_name_the_line_and_the_problem(tmp_path, lines, where, what):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_rows(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}{where} cannot parse this json file: "), message
    assert what in message and "one complete JSON object per line" in message
    assert "position" not in message and "Column(" not in message


def test_invalid_utf8_line_is_a_data_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD_LINE.encode() + b'{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*not UTF-8 text \(byte 0xff"):
        load_rows(str(path))


def test_bad_json_document_names_the_line_or_item(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": "a"\n]\n')
    with pytest.raises(DataError, match=r"d\.json:3: .*not valid JSON \(Expecting ','"):
        load_rows(str(path))
    path.write_text('[{"prompt": "a", "completion": "b"}, null]')
    with pytest.raises(DataError, match=r"d\.json:row 2: .*got null"):
        load_rows(str(path))


def test_csv_row_with_too_many_fields_is_refused(tmp_path):
    # pandas took the first of three fields as an index and shifted the others.
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"d\.csv:3: this row has 3 fields but the header names 2"):
        load_rows(str(path))


def test_blank_file_with_a_byte_order_mark_is_empty(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(path))


@pytest.mark.parametrize(
    ("name", "content"),
    [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "prompt,completion\n")],
)
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="no rows") as e:
        load_rows(str(path))
    assert path.name in str(e.value)


def test_missing_column_names_file_column_and_fields_hint(tmp_path, tokenizer):
    rows = [{"question": "q", "answer": "a"}]
    with pytest.raises(DataError) as e:
        build(tmp_path, tokenizer, rows)
    msg = str(e.value)
    assert "d.jsonl" in msg and "'prompt'" in msg and "question, answer" in msg
    assert "data.fields" in msg
    with pytest.raises(DataError, match=r"'query'.*data.fields maps prompt to it"):
        build(tmp_path, tokenizer, rows, fields={"prompt": "query", "completion": "answer"})


def test_unknown_field_name_in_mapping(tmp_path, tokenizer):
    with pytest.raises(DataError, match="'promt'.*not a field") as e:
        build(tmp_path, tokenizer, [{"prompt": "a", "completion": "b"}], fields={"promt": "a"})
    assert "data.fields" in str(e.value)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "'completion'.*missing or null"),
        ([{"prompt": "a", "completion": "b"}, {"prompt": None, "completion": "b"}], "'prompt'"),
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 4}],
            "must be a string",
        ),
    ],
)
def test_bad_rows_name_the_row(tmp_path, tokenizer, rows, match):
    with pytest.raises(DataError, match=match) as e:
        build(tmp_path, tokenizer, rows)
    assert f"{tmp_path / 'd.jsonl'}:row 2:" in str(e.value)


def test_mapped_column_null_names_both(tmp_path, tokenizer):
    rows = [{"q": "a", "completion": "b"}, {"q": None, "completion": "b"}]
    with pytest.raises(DataError, match=r"field 'prompt' \(column 'q'\)") as e:
        build(tmp_path, tokenizer, rows, fields={"prompt": "q"})
    assert "d.jsonl:row 2" in str(e.value)


GOOD_CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "must be a non-empty list"),
        ([], "must be a non-empty list"),
        ([{"role": "human", "content": "hi"}] + GOOD_CHAT[1:], "bad role 'human'"),
        ([{"role": "user", "content": None}] + GOOD_CHAT[1:], "content must be a string"),
        ([{"role": "user", "content": "hi"}], "no assistant message"),
    ],
)
def test_bad_messages_name_the_row(tmp_path, tokenizer, messages, match):
    rows = [{"messages": GOOD_CHAT}, {"messages": GOOD_CHAT}, {"messages": messages}]
    with pytest.raises(DataError, match=match) as e:
        build(tmp_path, tokenizer, rows, format="chat")
    assert f"{tmp_path / 'd.jsonl'}:row 3:" in str(e.value)


def test_sharegpt_rows_get_a_conversion_hint(tmp_path, tokenizer):
    rows = [{"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    with pytest.raises(DataError, match="ShareGPT"):
        build(tmp_path, tokenizer, rows, format="chat")


def test_template_required_but_missing(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    rows = [{"prompt": "a", "completion": "b"}]
    with pytest.raises(DataError, match="no chat template"):
        build(tmp_path, tokenizer, rows, chat_template="always")
    with pytest.raises(DataError, match="chat format needs a chat template"):
        build(tmp_path, tokenizer, [{"messages": GOOD_CHAT}], format="chat")
    # auto falls back to plain prompt + completion + eos.
    data = build(tmp_path, tokenizer, rows)
    assert data.input_ids == [enc(tokenizer, "a") + enc(tokenizer, "b") + [IM_END]]


def test_chat_with_never_is_refused(tmp_path, tokenizer):
    with pytest.raises(DataError, match="chat_template is never"):
        build(tmp_path, tokenizer, [{"messages": GOOD_CHAT}], format="chat", chat_template="never")


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path, tokenizer, monkeypatch):
    # Like templates that drop past reasoning: earlier assistant turns render differently.
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[old]\n"
        "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    monkeypatch.setattr(tokenizer, "chat_template", template)
    messages = GOOD_CHAT + [
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "yo"},
    ]
    with pytest.raises(DataError, match="extension of the conversation") as e:
        build(tmp_path, tokenizer, [{"messages": messages}], format="chat")
    assert "d.jsonl:row 1" in str(e.value) and "message 4" in str(e.value)


def test_template_exception_becomes_a_row_error(tmp_path, tokenizer, monkeypatch):
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    monkeypatch.setattr(tokenizer, "chat_template", template)
    with pytest.raises(DataError, match="System role not supported") as e:
        build(tmp_path, tokenizer, [{"prompt": "a", "completion": "b"}], system_prompt="S")
    assert "d.jsonl:row 1" in str(e.value)


def test_eval_split(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}] * 5)
    ev = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "c", "completion": "d"}] * 4)
    with pytest.raises(DataError, match="data.eval is not set"):
        build_dataset(DataConfig(train=train), tokenizer, "eval")
    cfg = DataConfig(train=train, eval=ev, limit=3, eval_limit=2)
    assert build_dataset(cfg, tokenizer, "train").rows == 3
    data = build_dataset(cfg, tokenizer, "eval")
    assert data.rows == 2 and data.source == ev


# ----------------------------------------------------------------------- loading


def test_load_formats(tmp_path, tokenizer):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(4)]
    paths = {
        "jsonl": write_jsonl(tmp_path / "r.jsonl", rows),
        "json": str(tmp_path / "r.json"),
        "csv": str(tmp_path / "r.csv"),
        "tsv": str(tmp_path / "r.tsv"),
        "parquet": str(tmp_path / "r.parquet"),
    }
    Path(paths["json"]).write_text(json.dumps(rows))
    Path(paths["csv"]).write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(4)))
    Path(paths["tsv"]).write_text(
        "prompt\tcompletion\n" + "".join(f"p{i}\tc{i}\n" for i in range(4))
    )
    datasets.Dataset.from_list(rows).to_parquet(paths["parquet"])
    for kind, path in paths.items():
        assert load_rows(path) == rows, kind
        assert load_rows(path, limit=2) == rows[:2], kind
        cfg = DataConfig(train=path, chat_template="never")
        assert build_dataset(cfg, tokenizer, "train").rows == 4


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text('prompt,completion\n2+2=,4\nIs it?,NA\n"a, b",\n')
    assert load_rows(str(path)) == [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": "Is it?", "completion": "NA"},
        {"prompt": "a, b", "completion": ""},
    ]


def test_parquet_chat(tmp_path, tokenizer):
    import datasets

    path = str(tmp_path / "c.parquet")
    datasets.Dataset.from_list([{"messages": GOOD_CHAT}]).to_parquet(path)
    data = build_dataset(DataConfig(train=path, format="chat"), tokenizer, "train")
    assert trained_runs(data.labels[0]) == [enc(tokenizer, "yo") + [IM_END, NL]]


def test_tokenize_rows_in_memory(tokenizer):
    cfg = DataConfig(train="mem", chat_template="never")
    data = tokenize_rows([{"prompt": "a", "completion": "b"}], cfg, tokenizer, "mem")
    assert data.rows == 1 and len(data) == 1


# ----------------------------------------------------------------------- collate


def test_collate_pads_by_position_and_keeps_pad_valued_targets():
    pad = 0
    # Row 0 ends with an end-of-turn token whose id equals the pad id: it is trained.
    ids = [[5, 6, 0], [7]]
    labels = [[M, 6, 0], [7]]
    batch = collate(ids, labels, pad)
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[M, 6, 0], [7, M, M]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_rejects_mismatched_rows():
    with pytest.raises(ValueError):
        collate([[1, 2]], [[1]], 0)
    with pytest.raises(ValueError):
        collate([], [], 0)


def test_eval_batches_in_order():
    data = TokenizedData(
        input_ids=[[i] * (i + 1) for i in range(5)], labels=[[i] * (i + 1) for i in range(5)]
    )
    batches = list(eval_batches(data, 2, pad_id=0))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["input_ids"].tolist() == [[0, 0], [1, 1]]
    assert batches[2]["labels"].tolist() == [[4] * 5]


# --------------------------------------------------------------------- batching


def fake_data(n: int) -> TokenizedData:
    return TokenizedData(input_ids=[[i + 1] for i in range(n)], labels=[[i + 1] for i in range(n)])


def take(it: BatchIterator, k: int) -> list[list[int]]:
    return [it.next_indices() for _ in range(k)]


def test_batch_iterator_order_is_seeded():
    a = take(BatchIterator(fake_data(10), 3, 0, seed=1), 8)
    b = take(BatchIterator(fake_data(10), 3, 0, seed=1), 8)
    c = take(BatchIterator(fake_data(10), 3, 0, seed=2), 8)
    assert a == b and a != c


def test_batch_iterator_epochs():
    it = BatchIterator(fake_data(10), 3, 0, seed=1)
    epochs = []
    for _ in range(3):
        batches = take(it, 4)
        assert [len(b) for b in batches] == [3, 3, 3, 1]  # last partial batch kept
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(10))  # every row exactly once
        epochs.append(flat)
    assert it.epoch == 3 and it.position == 0
    assert epochs[0] != epochs[1] != epochs[2]
    assert it.batches_per_epoch == 4


def test_batch_iterator_without_shuffle():
    it = BatchIterator(fake_data(5), 2, 0, shuffle=False)
    assert take(it, 4) == [[0, 1], [2, 3], [4], [0, 1]]


def test_batch_iterator_resume_is_exact():
    it = BatchIterator(fake_data(10), 3, 0, seed=7)
    take(it, 5)  # into epoch 1
    state = it.state_dict()
    assert (state["epoch"], state["position"]) == (1, 3)
    expected = take(it, 9)
    fresh = BatchIterator(fake_data(10), 3, 0, seed=999)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert take(fresh, 9) == expected
    with pytest.raises(DataError, match="10 training rows"):
        BatchIterator(fake_data(9), 3, 0).load_state_dict(state)


def test_batch_iterator_yields_collated_batches():
    data = TokenizedData(input_ids=[[1, 2], [3]], labels=[[M, 2], [3]])
    it = BatchIterator(data, 2, pad_id=0, shuffle=False)
    batch = next(iter(it))
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0]]
    assert batch["labels"].tolist() == [[M, 2], [3, M]]


def test_steps_per_epoch():
    assert steps_per_epoch(10, 3, 1) == 4
    assert steps_per_epoch(10, 3, 2) == 2
    assert steps_per_epoch(12, 3, 2) == 2
    assert steps_per_epoch(13, 3, 2) == 3
    for n in range(1, 30):
        for micro in range(1, 5):
            for accum in range(1, 4):
                micro_batches = -(-n // micro)
                assert steps_per_epoch(n, micro, accum) == -(-micro_batches // accum)


class BosTokenizer:
    """The real tokenizer, but adding a BOS like Llama's when asked for special tokens."""

    chat_template = None
    bos = 99

    def __init__(self, inner):
        self.inner = inner
        self.eos_token_id = inner.eos_token_id

    def __call__(self, text, add_special_tokens=True):
        out = self.inner(text, add_special_tokens=False)
        if add_special_tokens:
            ids = out["input_ids"]
            out["input_ids"] = [self.bos, *ids] if isinstance(text, str) else ids
        return out


def test_template_free_rendering_keeps_the_models_bos(tokenizer):
    cfg = DataConfig(train="mem", format="text")
    data = tokenize_rows([{"text": "Hello"}], cfg, BosTokenizer(tokenizer), "mem")
    ids = enc(tokenizer, "Hello")
    assert data.input_ids == [[99, *ids, IM_END]]
    assert data.labels == [[M, *ids, IM_END]]
