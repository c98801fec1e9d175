"""data.streaming: rows read and tokenized as training takes them, resumable exactly.

Offline, on local files and folders saved by datasets (read through datasets'
streaming readers, as a hub dataset is): the recipe's refusals, tokens equal to the
in-memory path's, mixture shares, passes, held-out rows never trained on, a
resume from a JSON state that continues with the same batches, and a streamed
training run interrupted and resumed bit-identically.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_checkpoint import run_interrupted, run_straight
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.data import tokenize_rows
from grass_cli.data.stream import StreamBatches, build_stream
from grass_cli.errors import DataError, GrassError, RecipeError
from grass_cli.recipe import DataConfig, validate_dict

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def rows_of(n: int, tag: str = "a") -> list[dict]:
    return [{"prompt": f"{tag}: what is {i} + {i}?", "completion": str(2 * i)} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def save_folder(path: Path, rows: list[dict]) -> str:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(path))
    return str(path)


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"max_length": 64, "streaming": True, **kw})


def drain(rows, n: int) -> list[tuple[int, ...]]:
    out = []
    for _ in range(n):
        out.append(tuple(int(x) for x in rows.peek()[0]))
        rows.advance()
    return out


# ----------------------------------------------------------------- the recipe's refusals


@pytest.mark.parametrize(
    "data, training, says",
    [
        ({"eval": 0.1}, {}, "a share of the training rows, but a stream's length is unknown"),
        ({"train": [{"path": "a.jsonl", "rows": 5}]}, {}, "asks for rows: 5"),
        ({"train": {"path": "a.jsonl", "split": "train[:50%]"}}, {}, "takes a whole split"),
        ({}, {"epochs": 1, "max_steps": None}, "set training.max_steps instead"),
    ],
)
def test_recipe_refuses_what_a_stream_cannot_do(data, training, says):
    raw = {
        "data": {"train": "a.jsonl", "streaming": True, **data},
        "training": training,
    }
    with pytest.raises(RecipeError) as e:
        validate_dict(raw, "r.yaml")
    assert says in str(e.value)


# ----------------------------------------------------------------- the row stream


def test_stream_tokens_equal_in_memory_and_passes_repeat(tmp_path, tokenizer):
    rows = rows_of(30)
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    c = cfg(train=path, shuffle_block=30)
    stream, ev = build_stream(c, tokenizer, seed=0)
    assert ev is None
    first = drain(stream, 30)  # block 0: the whole first pass, in a seeded order
    ref = tokenize_rows(rows, c, tokenizer, "x")
    assert sorted(first) == sorted(tuple(r) for r in ref.input_ids)
    assert first != [tuple(r) for r in ref.input_ids]  # shuffled
    again = drain(stream, 60)  # two more passes: every row twice more
    assert Counter(again) == Counter({r: 2 for r in first})
    assert stream.streams[0].passes == 2
    same, _ = build_stream(c, tokenizer, seed=0)
    assert drain(same, 90) == first + again  # deterministic
    other, _ = build_stream(c, tokenizer, seed=1)
    assert drain(other, 30) != first


def test_mixture_shares_follow_the_weights(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(50, "a"))
    b = save_folder(tmp_path / "b", rows_of(50, "b"))
    c = cfg(train=[{"path": a, "weight": 3}, {"path": b, "weight": 1}], shuffle_block=400)
    stream, _ = build_stream(c, tokenizer, seed=3)
    tag_a = tuple(tokenizer("a:", add_special_tokens=False)["input_ids"])
    got = drain(stream, 400)
    share_a = sum(1 for r in got if _has(r, tag_a)) / 400
    assert 0.68 < share_a < 0.82  # 3:1 -> 0.75 (a binomial draw of 400)
    # no weights: the sources take turns, exactly half each
    turns, _ = build_stream(cfg(train=[a, b], shuffle_block=40), tokenizer, seed=3)
    got = drain(turns, 40)
    assert sum(1 for r in got if _has(r, tag_a)) == 20


def _has(row: tuple[int, ...], part: tuple[int, ...]) -> bool:
    return any(row[i : i + len(part)] == part for i in range(len(row) - len(part) + 1))


def test_held_out_rows_are_the_heads_and_never_trained(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(20, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", rows_of(20, "b"))
    c = cfg(train=[a, b], eval=6, shuffle_block=16)
    stream, ev = build_stream(c, tokenizer, seed=0)
    heads = rows_of(20, "a")[:3] + rows_of(20, "b")[:3]
    assert [tuple(r) for r in ev.input_ids] == [
        tuple(r) for r in tokenize_rows(heads, c, tokenizer, "x").input_ids
    ]
    trained = set(drain(stream, 34 * 3))  # three passes of the 34 rows left
    assert len(trained) == 34
    assert not trained & {tuple(r) for r in ev.input_ids}
    with pytest.raises(DataError, match="nothing would be left to train on"):
        build_stream(cfg(train=a, eval=20, limit=20), tokenizer, seed=0)


def test_a_bad_row_names_its_row_in_the_source(tmp_path, tokenizer):
    rows = rows_of(30)
    rows[24] = {"prompt": "no completion", "completion": None}
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    stream, _ = build_stream(cfg(train=path, shuffle_block=10), tokenizer, seed=0)
    drain(stream, 20)  # blocks 0 and 1 are rows 1-20
    with pytest.raises(DataError) as e:
        drain(stream, 10)
    assert "a.jsonl:row 25" in str(e.value)


@pytest.mark.parametrize("packing", [False, True])
def test_batches_resume_from_a_json_state(tmp_path, tokenizer, packing):
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(37, "a"))
    b = save_folder(tmp_path / "b", rows_of(23, "b"))
    c = cfg(train=[{"path": a, "weight": 2}, {"path": b, "weight": 1}], eval=3, shuffle_block=16)

    def batches() -> StreamBatches:
        stream, _ = build_stream(c, tokenizer, seed=7)
        return StreamBatches(stream, 3, tokenizer.pad_token_id, packing=packing, max_length=64)

    first = batches()
    for _ in range(7):  # into the middle of a block, past a pass of b
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["offset"] > 0 and state["block"] >= 1
    want = [next(first) for _ in range(12)]
    resumed = batches()
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(12)]
    for w, g in zip(want, got, strict=True):
        assert w.keys() == g.keys() and all(torch.equal(w[k], g[k]) for k in w)
    assert resumed.state_dict() == first.state_dict()  # so a second resume is exact too
    if packing:
        assert "position_ids" in want[0] and want[0]["input_ids"].shape[0] == 3


def test_state_is_exact_in_a_resumed_block_and_for_an_undrawn_source(tmp_path, tokenizer):
    """datasets reports a reader's start until it yields a row, even after loading a
    state: the stream must report the loaded position for a source that a resumed
    block has not drawn from yet, or a second resume would restart that source."""
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(30, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", rows_of(30, "b"))
    c = cfg(train=[{"path": a, "weight": 1}, {"path": b, "weight": 0.05}], shuffle_block=8)

    def stream():
        return build_stream(c, tokenizer, seed=11)[0]

    first = stream()
    drain(first, 8 * 6 + 3)  # block 6, b read a few times by now
    state = json.loads(json.dumps(first.state_dict()))
    assert state["sources"][1]["index"] > 0
    resumed = stream()
    resumed.load_state_dict(state)
    for _ in range(30):  # through blocks where b is never drawn
        assert resumed.state_dict() == first.state_dict()
        assert drain(resumed, 1) == drain(first, 1)


@pytest.mark.parametrize("packing", [False, True])
def test_data_parallel_ranks_share_each_global_batch(tmp_path, tokenizer, packing):
    """Rank r of 2 takes every 2nd row (or packed sequence) of the global micro batch:
    together the ranks train exactly what one process with twice the batch trains."""
    path = write_jsonl(tmp_path / "a.jsonl", rows_of(25))
    c = cfg(train=path, shuffle_block=10)

    def seqs(micro: int, rank: int, world: int) -> list[list[tuple[int, ...]]]:
        stream, _ = build_stream(c, tokenizer, seed=2)
        sb = StreamBatches(stream, micro, 0, rank, world, packing=packing, max_length=64)
        out = []
        for _ in range(6):
            b = next(sb)
            ids, mask = b["input_ids"], b["attention_mask"].bool()
            out.append([tuple(r[m].tolist()) for r, m in zip(ids, mask, strict=True)])
        return out

    whole = seqs(4, 0, 1)
    r0, r1 = seqs(2, 0, 2), seqs(2, 1, 2)
    for w, a, b in zip(whole, r0, r1, strict=True):
        assert a == w[0::2] and b == w[1::2]


def test_state_of_another_kind_is_refused(tmp_path, tokenizer):
    from grass_cli.data import BatchIterator

    path = write_jsonl(tmp_path / "a.jsonl", rows_of(10))
    stream, _ = build_stream(cfg(train=path, shuffle_block=4), tokenizer, seed=0)
    sb = StreamBatches(stream, 2, tokenizer.pad_token_id)
    with pytest.raises(DataError, match="data.streaming off, but it is now on"):
        sb.load_state_dict({"epoch": 0, "position": 2, "seed": 0, "shuffle": True, "n_rows": 10})
    data = tokenize_rows(rows_of(10), cfg(train=path), tokenizer, "x")
    with pytest.raises(DataError, match="data.streaming on, but it is now off"):
        BatchIterator(data, 2, 0).load_state_dict(sb.state_dict())


def test_hub_stream_offline_is_one_clear_error(tmp_path, tokenizer, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        build_stream(cfg(train="someorg/some-data"), tokenizer, seed=0)
    assert "cannot stream this hub dataset: offline mode is set" in str(e.value)
    assert "turn it off to train from the datasets cache" in e.value.hint


# ----------------------------------------------------------------- training


def stream_recipe(model_dir: Path, out: Path, train: list, **data):
    return validate_dict(
        {
            "model": {"path": str(model_dir)},
            "data": {
                "train": train,
                "max_length": 64,
                "streaming": True,
                "shuffle_block": 8,
                "eval": 4,
                **data,
            },
            "sampler": {"strategy": "grass", "gamma": 2, "switch_interval": 2, "probe_steps": 2},
            "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
            "training": {"max_steps": 7, "micro_batch_size": 2, "seed": 5, "eval_interval": 3},
            "output": {"dir": str(out), "save_model": False},
        },
        "test.yaml",
    )


@pytest.mark.parametrize("packing", [False, True])
def test_streamed_run_resumes_bit_identically(tiny_factory, tmp_path, packing):
    model_dir = tiny_factory("gpt2", 4)  # dropout: the RNG state must resume too
    a = write_jsonl(tmp_path / "a.jsonl", rows_of(15, "a"))
    b = save_folder(tmp_path / "b", rows_of(9, "b"))
    train = [{"path": a, "weight": 2}, {"path": b, "weight": 1}]
    ra, res_a = run_straight(stream_recipe(model_dir, tmp_path / "run_a", train, packing=packing))
    assert ra.train_data is None and ra.batches.rows.block >= 2
    recipe_b = stream_recipe(model_dir, tmp_path / "run_b", train, packing=packing)
    rb, res_b = run_interrupted(recipe_b, 4)
    assert res_b.losses == res_a.losses and len(res_a.losses) == 7
    pa = dict(ra.model.named_parameters())
    for name, p in rb.model.named_parameters():
        assert torch.equal(p, pa[name]), name
    start = json.loads((tmp_path / "run_a/metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["train_rows"] is None and start["eval_rows"] == 4
    # resuming with streaming turned off is refused before anything trains
    plain = stream_recipe(model_dir, tmp_path / "run_b", train, packing=packing)
    plain.data.streaming = False
    from grass_cli.engine import setup
    from grass_cli.telemetry import Telemetry

    with pytest.raises(GrassError, match="data.streaming"):
        setup(plain, Telemetry([]), resume="auto")


def test_validate_says_streamed(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", rows_of(10))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{train: {path}, streaming: true, eval: 3}}\noutput: {{dir: {tmp_path / 'out'}}}\n"
    )
    res = runner.invoke(app, ["validate", str(recipe)])
    assert res.exit_code == 0, res.output
    assert "data.train streamed, data.eval 3 rows" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: {{train: {tmp_path / 'nope.jsonl'}, streaming: true}}\n")
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code != 0 and "data file not found" in res.output


def test_a_process_left_mid_stream_exits_quietly(tmp_path, smollm2_dir):
    """A parquet stream left open at exit (a run that stops mid-stream) used to have
    datasets print an "Exception ignored ... ArrowInvalid" traceback on the way out."""
    import subprocess
    import sys

    import pandas as pd

    pd.DataFrame(rows_of(30)).to_parquet(tmp_path / "p.parquet")
    code = (
        "from grass_cli.models import load_tokenizer\n"
        "from grass_cli.recipe import DataConfig\n"
        "from grass_cli.data.stream import build_stream\n"
        f"tok = load_tokenizer({str(smollm2_dir)!r})\n"
        f"c = DataConfig(train={str(tmp_path / 'p.parquet')!r}, streaming=True, shuffle_block=8)\n"
        "s, _ = build_stream(c, tok, 0)\n"
        "for _ in range(12):\n"
        "    s.peek(); s.advance()\n"
        "print('read', len(s.peek()[0]) > 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "read True"
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("suffix", [".json", ".csv", ".tsv", ".parquet"])
def test_every_file_type_streams_the_tokens_it_gives_in_memory(tmp_path, tokenizer, suffix):
    import csv

    import pandas as pd

    rows = rows_of(20)
    path = tmp_path / f"d{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(
                f, ["prompt", "completion"], delimiter="\t" if suffix == ".tsv" else ","
            )
            w.writeheader()
            w.writerows(rows)
    stream, _ = build_stream(cfg(train=str(path), shuffle_block=20), tokenizer, seed=0)
    ref = tokenize_rows(rows, cfg(train=str(path)), tokenizer, "x")
    assert sorted(drain(stream, 20)) == sorted(tuple(r) for r in ref.input_ids)
