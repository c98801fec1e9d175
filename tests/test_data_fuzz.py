"""Property test: loading and tokenizing any data file ends in rows or one GrassError.

Random JSONL / JSON / CSV / TSV files (random text and bytes, cut lines, wrong
types, missing or extra columns, empty or huge values, nested objects) are fed to
`load_rows` and `tokenize_rows` with the SmolLM2 tokenizer under every format: the
answer is tokenized data or a GrassError (naming the file when loading fails),
never another exception, which the CLI would show as a traceback. Rows are mostly
plausible for the drawn format, so that most examples get past the loader.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grass_cli.data import FORMAT_FIELDS, load_rows, tokenize_rows
from grass_cli.errors import GrassError
from grass_cli.recipe import DataConfig

FORMATS = list(FORMAT_FIELDS)
NAMES = [name for fields in FORMAT_FIELDS.values() for name in fields]
ROLES = ["system", "user", "assistant", "tool", ""]

# Text with the characters that break parsers: quotes, separators, newlines, NUL,
# escapes, a BOM, a chat template's own tokens; and text longer than max_length.
texts = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.sampled_from(['"', ",", "\t", "\n", "\r", "\\", "\x00", "{", "a", " "])),
    st.sampled_from(["", "None", "NA", "null", "\\ud800", "\ufeff", "é", "<|im_end|>"]),
    st.integers(100, 3000).map(lambda n: "word " * n),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=6))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(keys, children, max_size=3)
    ),
    max_leaves=8,
)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES[:3]), "content": texts}),
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": scalars}),
    st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), values, max_size=3),
    values,
)
conversations = st.one_of(
    st.lists(message, max_size=4),
    st.lists(st.sampled_from(ROLES[:3]), min_size=1, max_size=4).map(
        lambda roles: [{"role": r, "content": f"turn {i}"} for i, r in enumerate(roles)]
    ),
)


@st.composite
def rows(draw, fmt: str) -> dict:
    """A row of `fmt`, sometimes with a field missing, mistyped, or extra columns."""
    row: dict = {}
    for name in FORMAT_FIELDS[fmt]:
        if draw(st.integers(0, 9)) == 0:
            continue
        good = conversations if name == "messages" else texts
        row[name] = draw(good if draw(st.integers(0, 4)) else st.one_of(values, conversations))
    if draw(st.integers(0, 3)) == 0:
        row.update(draw(st.dictionaries(keys, values, max_size=2)))
    return row


@st.composite
def jsonl_file(draw, fmt: str) -> bytes:
    """Lines of rows, a few cut short, other JSON values, random text or bytes."""
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["row"] * 12 + ["cut", "value", "text", "bytes"]))
        if kind in ("row", "cut"):
            line = json.dumps(draw(rows(fmt)), ensure_ascii=draw(st.booleans()))
            if kind == "cut":
                line = line[: draw(st.integers(0, len(line)))]
            lines.append(line.encode("utf-8", "surrogatepass"))
        elif kind == "value":
            lines.append(json.dumps(draw(values)).encode())
        elif kind == "text":
            lines.append(draw(texts).encode("utf-8", "surrogatepass"))
        else:
            lines.append(draw(st.binary(max_size=20)))
    newline = draw(st.sampled_from([b"\n", b"\r\n", b"\n\n"]))
    bom = draw(st.sampled_from([b"", b"", b"\xef\xbb\xbf"]))
    return bom + newline.join(lines) + draw(st.sampled_from([b"", newline]))


@st.composite
def json_file(draw, fmt: str) -> bytes:
    """A .json list of rows (or of anything, or one value), a few cut short."""
    doc = draw(
        st.one_of(
            st.lists(rows(fmt), max_size=4),
            st.lists(st.one_of(rows(fmt), values), max_size=4),
            values,
        )
    )
    text = json.dumps(doc, indent=draw(st.sampled_from([None, 1])))
    if draw(st.integers(0, 3)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode("utf-8", "surrogatepass")


@st.composite
def csv_file(draw, fmt: str, sep: str) -> bytes:
    """A header (the format's columns, or others), rows with too few or too many cells."""
    header = draw(
        st.one_of(
            st.just(list(FORMAT_FIELDS[fmt])),
            st.lists(keys, max_size=4),
        )
    )
    cells = st.one_of(texts, texts, st.builds(str, scalars))
    wide = len(header) + (1 if draw(st.integers(0, 4)) == 0 else 0)
    table = [header] + draw(st.lists(st.lists(cells, max_size=wide), max_size=4))
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=sep, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerows(table)
    data = buf.getvalue().encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.integers(0, 9)) == 0:
        data += draw(st.binary(max_size=20))
    return data


@st.composite
def configs(draw, fmt: str) -> dict:
    return {
        "format": fmt,
        "chat_template": draw(st.sampled_from(["auto", "auto", "never", "always"])),
        "train_on_prompt": draw(st.booleans()),
        "max_length": draw(st.sampled_from([8, 32, 512])),
        "truncation": draw(st.sampled_from(["right", "left", "drop"])),
    }


def check(path: Path, content: bytes, cfg: dict, tokenizer, limit: int | None = None) -> None:
    """Load and tokenize: data, or a GrassError (one naming the file while loading)."""
    path.write_bytes(content)
    try:
        loaded = load_rows(str(path), limit)
    except GrassError as e:
        assert path.name in str(e), str(e)
        return
    assert loaded and all(isinstance(r, dict) for r in loaded)
    assert limit is None or len(loaded) <= limit
    try:
        data = tokenize_rows(loaded, DataConfig(train=str(path), **cfg), tokenizer, str(path))
    except GrassError as e:
        assert str(e).strip()
        return
    assert data.rows == len(data.input_ids) == len(data.labels) > 0
    for ids, labels in zip(data.input_ids, data.labels, strict=True):
        assert len(ids) == len(labels) <= cfg["max_length"]


FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(FORMATS))
def test_jsonl_files(tmp_path, tokenizer, data, fmt):
    limit = data.draw(st.one_of(st.none(), st.integers(1, 3)))
    content = data.draw(jsonl_file(fmt))
    check(tmp_path / "d.jsonl", content, data.draw(configs(fmt)), tokenizer, limit)


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(FORMATS))
def test_json_files(tmp_path, tokenizer, data, fmt):
    check(tmp_path / "d.json", data.draw(json_file(fmt)), data.draw(configs(fmt)), tokenizer)


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(FORMATS), tsv=st.booleans())
def test_csv_and_tsv_files(tmp_path, tokenizer, data, fmt, tsv):
    content = data.draw(csv_file(fmt, "\t" if tsv else ","))
    path = tmp_path / ("d.tsv" if tsv else "d.csv")
    check(path, content, data.draw(configs(fmt)), tokenizer)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv"]))
def test_random_bytes(tmp_path, tokenizer, content, suffix):
    cfg = {"max_length": 512}
    check(tmp_path / f"d{suffix}", content, cfg, tokenizer)
