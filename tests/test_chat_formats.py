"""Chat templates by name or file, and ShareGPT conversations: the SmolLM2 tokenizer,
no model (the eval side of both is in test_evaluate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grass_cli.data import IGNORE_INDEX, TokenizedData, build_dataset, load_rows
from grass_cli.data.templates import is_template_file, resolve_template
from grass_cli.errors import DataError, RecipeError
from grass_cli.eval_config import EvalConfig
from grass_cli.evaluate import PromptRenderer, eval_data_config, plan_eval, stop_token_ids
from grass_cli.recipe import DataConfig, validate_dict

# A second template for the same tokenizer: ChatML without SmolLM2's default system turn.
PLAIN_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template file of another style, ending turns with <|endoftext|>.
TAGGED = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "and 4 + 4?"},
    {"role": "assistant", "content": "8"},
]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def build(tmp_path: Path, tokenizer, rows: list[dict], **cfg) -> TokenizedData:
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    return build_dataset(DataConfig(train=path, **cfg), tokenizer, "train")


def sharegpt(messages: list[dict], names: dict[str, str] = SHAREGPT_NAMES) -> list[dict]:
    return [{"from": names[m["role"]], "value": m["content"]} for m in messages]


def assistant_runs(tokenizer, data: TokenizedData) -> list[str]:
    """The trained text of the first row, one string per maximal run of labels."""
    runs, cur = [], []
    for lab in data.labels[0] + [IGNORE_INDEX]:
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(tokenizer.decode(cur))
            cur = []
        else:
            cur.append(lab)
    return runs


@pytest.fixture
def two_templates(tokenizer, monkeypatch):
    """The tokenizer carrying a dict of named templates, as transformers loads them."""
    named = {"default": tokenizer.chat_template, "plain": PLAIN_CHATML}
    monkeypatch.setattr(tokenizer, "chat_template", named)
    return tokenizer


# ------------------------------------------------------------------ named templates


def test_a_named_template_is_rendered_instead_of_the_default(tmp_path, two_templates):
    tok = two_templates
    rows = [{"messages": CHAT[1:3]}]
    data = build(tmp_path, tok, rows, format="chat", chat_template="plain")
    want = tok.apply_chat_template(CHAT[1:3], chat_template=PLAIN_CHATML, tokenize=False)
    assert data.input_ids[0] == tok(want, add_special_tokens=False)["input_ids"]
    assert "SmolLM" not in tok.decode(data.input_ids[0])  # not the default's system turn
    # auto still means the tokenizer's default template, with a dict as with a string.
    default = build(tmp_path, tok, rows, format="chat")
    text = tok.apply_chat_template(
        CHAT[1:3], chat_template=tok.chat_template["default"], tokenize=False
    )
    assert default.input_ids[0] == tok(text, add_special_tokens=False)["input_ids"]


def test_an_unknown_name_lists_the_available_ones(tmp_path, two_templates):
    with pytest.raises(DataError, match="no chat template named 'tool_use'") as e:
        build(
            tmp_path, two_templates, [{"prompt": "a", "completion": "b"}], chat_template="tool_use"
        )
    assert "it has: default, plain" in str(e.value)
    assert str(e.value).startswith("data.chat_template:")


def test_a_single_template_answers_to_default_only(tokenizer):
    assert resolve_template("chat", "default", tokenizer) == tokenizer.chat_template
    with pytest.raises(DataError, match="it has: default"):
        resolve_template("chat", "tool_use", tokenizer)


def test_several_templates_and_no_default_ask_for_a_name(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", {"plain": PLAIN_CHATML, "rag": "x"})
    with pytest.raises(DataError, match="none is the default") as e:
        resolve_template("prompt-completion", "auto", tokenizer)
    assert "plain, rag" in str(e.value) and "data.chat_template: plain" in str(e.value)
    assert resolve_template("chat", "rag", tokenizer) == "x"


def test_a_name_for_a_tokenizer_without_templates_points_to_a_file(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(DataError, match="no chat template") as e:
        resolve_template("chat", "plain", tokenizer)
    assert ".jinja" in str(e.value)


def test_the_text_format_refuses_names_and_files(tokenizer):
    for choice in ("plain", "t.jinja"):
        with pytest.raises(DataError, match="text format has no roles"):
            resolve_template("text", choice, tokenizer)


# -------------------------------------------------------------------- template files


def test_a_jinja_file_template_renders_and_trains_the_assistant_turns(tmp_path, tokenizer):
    path = tmp_path / "tagged.jinja"
    path.write_text(TAGGED, encoding="utf-8")
    data = build(tmp_path, tokenizer, [{"messages": CHAT}], format="chat", chat_template=str(path))
    text = tokenizer.apply_chat_template(CHAT, chat_template=TAGGED, tokenize=False)
    assert tokenizer.decode(data.input_ids[0]) == text
    # Each assistant turn with its end-of-turn token and newline is trained, nothing else.
    assert assistant_runs(tokenizer, data) == ["5<|endoftext|>\n", "8<|endoftext|>\n"]
    # The file's end-of-turn token ends a generated answer.
    stops = stop_token_ids(object(), tokenizer, TAGGED)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in stops


def test_a_file_template_works_for_a_tokenizer_without_one(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "t.j2"
    path.write_text(TAGGED, encoding="utf-8")
    monkeypatch.setattr(tokenizer, "chat_template", None)
    data = build(tmp_path, tokenizer, [{"prompt": "a", "completion": "b"}], chat_template=str(path))
    assert tokenizer.decode(data.input_ids[0]) == "[user] a\n[assistant] b<|endoftext|>\n"


def test_template_file_errors_name_the_file(tmp_path, tokenizer):
    missing = tmp_path / "nope.jinja"
    with pytest.raises(DataError, match="does not exist") as e:
        build(tmp_path, tokenizer, [{"prompt": "a", "completion": "b"}], chat_template=str(missing))
    assert str(missing) in str(e.value)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }", encoding="utf-8")
    with pytest.raises(DataError, match="is not valid Jinja") as e:
        build(tmp_path, tokenizer, [{"prompt": "a", "completion": "b"}], chat_template=str(bad))
    assert str(e.value).startswith("data.chat_template:") and "bad.jinja" in str(e.value)
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        build(tmp_path, tokenizer, [{"prompt": "a", "completion": "b"}], chat_template=str(empty))


def test_names_and_files_are_told_apart_without_the_disk():
    assert is_template_file("templates/chatml.jinja") and is_template_file("x.j2")
    assert is_template_file("./chatml") and is_template_file("~/t.jinja")
    assert not is_template_file("tool_use") and not is_template_file("default")


def test_the_recipe_takes_names_files_and_roles():
    base = {"train": "t.jsonl"}
    assert DataConfig(**base, chat_template="tool_use").chat_template == "tool_use"
    for bad in ({"chat_template": ""}, {"roles": {"bot": "robot"}}, {"roles": {"": "user"}}):
        with pytest.raises(RecipeError, match=r"data\.(chat_template|roles)"):
            validate_dict({"data": {**base, **bad}}, "r.yaml")
    cfg = DataConfig(**base, format="sharegpt", roles={"bot": "assistant"})
    assert cfg.roles == {"bot": "assistant"}


# ------------------------------------------------------------------------- ShareGPT


@pytest.mark.parametrize("train_on_prompt", [False, True])
@pytest.mark.parametrize("system_prompt", [None, "Answer in one word."])
def test_sharegpt_rows_tokenize_exactly_as_the_same_messages(
    tmp_path, tokenizer, train_on_prompt, system_prompt
):
    conversations = [CHAT, CHAT[1:], CHAT[1:4]]  # with / without system; ends on a user turn
    chat = build(
        tmp_path,
        tokenizer,
        [{"messages": m} for m in conversations],
        format="chat",
        train_on_prompt=train_on_prompt,
        system_prompt=system_prompt,
    )
    share = build(
        tmp_path,
        tokenizer,
        [{"conversations": sharegpt(m)} for m in conversations],
        format="sharegpt",
        train_on_prompt=train_on_prompt,
        system_prompt=system_prompt,
    )
    assert share.input_ids == chat.input_ids and share.labels == chat.labels
    assert share.trainable_tokens == chat.trainable_tokens > 0


def test_sharegpt_roles_columns_and_the_system_column(tmp_path, tokenizer):
    chat = build(tmp_path, tokenizer, [{"messages": CHAT}], format="chat")
    # Another column name, other role names through data.roles, a system column.
    names = {"system": "system", "user": "person", "assistant": "bot"}
    row = {"turns": sharegpt(CHAT[1:], names), "system": "Be brief."}
    share = build(
        tmp_path,
        tokenizer,
        [row],
        format="sharegpt",
        fields={"conversations": "turns"},
        roles={"person": "user", "bot": "assistant"},
    )
    assert share.input_ids == chat.input_ids and share.labels == chat.labels
    # from: user / assistant (axolotl's names) work without a role map.
    plain = build(tmp_path, tokenizer, [{"conversations": sharegpt(CHAT, {r: r for r in names})}],
                  format="sharegpt")  # fmt: skip
    assert plain.input_ids == chat.input_ids
    # A conversation's own system turn wins over the system column.
    own = {"conversations": sharegpt(CHAT), "system": "ignored"}
    assert build(tmp_path, tokenizer, [own], format="sharegpt").input_ids == chat.input_ids


def test_an_unknown_sharegpt_role_names_the_row_and_the_role(tmp_path, tokenizer):
    good = {"conversations": sharegpt(CHAT)}
    bad = {"conversations": sharegpt(CHAT[:3]) + [{"from": "observation", "value": "{}"}]}
    with pytest.raises(DataError, match="message 4 has an unknown role 'observation'") as e:
        build(tmp_path, tokenizer, [good, bad], format="sharegpt")
    assert f"{tmp_path / 'd.jsonl'}:row 2:" in str(e.value)
    assert "data.roles: {observation: user}" in str(e.value)
    assert "gpt" in str(e.value) and "human" in str(e.value)  # the roles it does know
    # Mapped, the row trains.
    build(tmp_path, tokenizer, [good, bad], format="sharegpt", roles={"observation": "user"})


@pytest.mark.parametrize(
    ("conversations", "match"),
    [
        (None, "'conversations' must be a non-empty list"),
        ([{"role": "user", "content": "hi"}], "no 'from' key"),
        (
            [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}],
            r"\(human, user\) value",
        ),
        ([{"from": "human", "value": "hi"}], r"(?s)no assistant message.*\{from: gpt\|assistant\}"),
    ],
)
def test_bad_sharegpt_rows_name_the_row(tmp_path, tokenizer, conversations, match):
    rows = [{"conversations": sharegpt(CHAT)}, {"conversations": conversations}]
    with pytest.raises(DataError, match=match) as e:
        build(tmp_path, tokenizer, rows, format="sharegpt")
    assert ":row 2:" in str(e.value)


def test_sharegpt_rows_in_the_chat_format_point_to_the_sharegpt_format(tmp_path, tokenizer):
    with pytest.raises(DataError, match="use data.format: sharegpt"):
        build(tmp_path, tokenizer, [{"messages": sharegpt(CHAT)}], format="chat")


def test_data_roles_also_map_chat_role_names(tmp_path, tokenizer):
    chat = build(tmp_path, tokenizer, [{"messages": CHAT}], format="chat")
    renamed = [dict(m, role={"user": "human"}.get(m["role"], m["role"])) for m in CHAT]
    with pytest.raises(DataError, match="bad role 'human'"):
        build(tmp_path, tokenizer, [{"messages": renamed}], format="chat")
    mapped = build(
        tmp_path, tokenizer, [{"messages": renamed}], format="chat", roles={"human": "user"}
    )
    assert mapped.input_ids == chat.input_ids


def test_sharegpt_eval_prompt_is_the_training_prefix(tmp_path, tokenizer):
    """Generation from a ShareGPT row starts from the tokens its training row has
    before the last answer, with the row's system column as in training."""
    rows = [{"conversations": sharegpt(CHAT[1:]), "system": "Be brief.", "answer": "8"}]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    dc = DataConfig(train=path, format="sharegpt")
    data = build_dataset(dc, tokenizer, "train")
    renderer = PromptRenderer(dc, tokenizer)
    prompt = renderer.ids([renderer.text(rows[0], "t")[0]])[0]
    last = max(i for i, lab in enumerate(data.labels[0]) if lab == IGNORE_INDEX)
    assert data.input_ids[0][: last + 1] == prompt
    assert renderer.text(rows[0], "t")[1:] == ("and 4 + 4?", "8")
    plan = plan_eval(
        load_rows(path), EvalConfig(data=path), eval_data_config(dc, EvalConfig(), path), path
    )
    assert plan.kinds == ["loss", "generate"]
