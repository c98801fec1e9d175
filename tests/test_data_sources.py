"""Data sources beyond one file: datasets folders, hub datasets through the datasets
cache, mixtures, rows held out for eval, and the token cache. All offline: hub
datasets are put in a temporary datasets cache the way a download leaves them."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from test_checkpoint import run_interrupted, run_straight
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.data import build as data_build
from grass_cli.data import build_dataset, build_splits, tokenize_rows
from grass_cli.data.mixture import shares
from grass_cli.errors import DataError, RecipeError
from grass_cli.recipe import DataConfig, validate_dict

runner = CliRunner()
ROWS = [{"prompt": f"What is {i} + {i}?", "completion": str(2 * i)} for i in range(30)]


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own token cache (GRASS_CACHE is read at each use)."""
    root = tmp_path / "grass-cache"
    monkeypatch.setenv("GRASS_CACHE", str(root))
    return root / "tokens"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def ids_of(data) -> list[tuple[int, ...]]:
    return [tuple(r) for r in data.input_ids]


def reference(rows: list[dict], tokenizer, **cfg) -> list[tuple[int, ...]]:
    return ids_of(tokenize_rows(rows, DataConfig(train="x", **cfg), tokenizer, "x"))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty datasets cache, offline (datasets reads its config at each load)."""
    import datasets

    cache = tmp_path / "hf-datasets"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return cache


def cache_hub_dataset(cache: Path, repo_id: str, splits: dict, config: str = "default") -> None:
    """Leave `repo_id` in the datasets cache as `load_dataset` does after a download:
    CACHE/org___name/CONFIG/VERSION/HASH/{dataset_info.json, name-SPLIT.arrow}."""
    from datasets.packaged_modules.json.json import Json

    org, name = repo_id.split("/")
    work = cache.parent / f"build-{org}-{name}-{config}"
    work.mkdir()
    files = {s: write_jsonl(work / f"{s}.jsonl", rows) for s, rows in splits.items()}
    builder = Json(
        cache_dir=str(work / "out"),
        dataset_name=name,
        config_name=config,
        data_files=files,
        hash="0123abcd",
    )
    builder.download_and_prepare()
    target = cache / f"{org}___{name}" / config
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(Path(builder.cache_dir).parents[1]), str(target))  # drop the config id
    shutil.rmtree(work)


# -------------------------------------------------------------------- sources


def test_datasets_folder_source(tmp_path, tokenizer):
    import datasets

    folder, single = tmp_path / "saved", tmp_path / "single"
    d = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS[:20]), test=datasets.Dataset.from_list(ROWS[20:])
    )
    d.save_to_disk(str(folder))
    datasets.Dataset.from_list(ROWS[:10]).save_to_disk(str(single))
    from_file = build_dataset(
        DataConfig(train=write_jsonl(tmp_path / "t.jsonl", ROWS[:20])), tokenizer, "train"
    )
    data = build_dataset(DataConfig(train=str(folder)), tokenizer, "train")
    assert data.input_ids == from_file.input_ids and data.labels == from_file.labels
    assert data.source == str(folder)
    sliced = DataConfig(
        train={"path": str(folder), "split": "train[:50%]"},
        eval={"path": str(folder), "split": "test"},
    )
    train, ev = build_splits(sliced, tokenizer)
    assert ids_of(train) == reference(ROWS[:10], tokenizer)
    assert ids_of(ev) == reference(ROWS[20:], tokenizer)
    # A single Dataset is the split `train`.
    assert ids_of(build_dataset(DataConfig(train=str(single)), tokenizer, "train")) == reference(
        ROWS[:10], tokenizer
    )
    with pytest.raises(DataError, match="cannot take split 'validation'") as e:
        build_dataset(
            DataConfig(train={"path": str(folder), "split": "validation"}), tokenizer, "train"
        )
    assert "splits here: train, test" in str(e.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one saved by datasets"):
        build_dataset(DataConfig(train=str(tmp_path / "plain")), tokenizer, "train")
    with pytest.raises(DataError, match="config and revision are for hub datasets"):
        build_dataset(DataConfig(train={"path": str(folder), "config": "x"}), tokenizer, "train")


def test_file_split_slice(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS[:20])
    data = build_dataset(
        DataConfig(train={"path": path, "split": "train[-5:]"}), tokenizer, "train"
    )
    assert ids_of(data) == reference(ROWS[15:20], tokenizer)
    with pytest.raises(DataError, match="has no rows"):
        build_dataset(DataConfig(train={"path": path, "split": "train[20:]"}), tokenizer, "train")


def test_hub_source_from_the_datasets_cache(hub_cache, tokenizer):
    cache_hub_dataset(hub_cache, "myorg/tiny", {"train": ROWS[:20], "test": ROWS[20:25]})
    cache_hub_dataset(hub_cache, "myorg/other", {"train": ROWS[:4]}, config="small")
    cfg = DataConfig(
        train={"path": "myorg/tiny", "split": "train[:50%]"},
        eval={"path": "myorg/tiny", "split": "test"},
    )
    train, ev = build_splits(cfg, tokenizer)
    assert ids_of(train) == reference(ROWS[:10], tokenizer)
    assert ids_of(ev) == reference(ROWS[20:25], tokenizer)
    plain = build_dataset(DataConfig(train="myorg/tiny"), tokenizer, "train")  # a bare id
    assert ids_of(plain) == reference(ROWS[:20], tokenizer)
    small = DataConfig(train={"path": "myorg/other", "config": "small"})
    assert ids_of(build_dataset(small, tokenizer, "train")) == reference(ROWS[:4], tokenizer)
    with pytest.raises(DataError, match="config 'big' is not in the datasets cache") as e:
        build_dataset(
            DataConfig(train={"path": "myorg/other", "config": "big"}), tokenizer, "train"
        )
    assert "small" in str(e.value)


def test_unknown_hub_id_offline_fails_at_once(hub_cache, tokenizer):
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        build_dataset(DataConfig(train="nobody-xyz/no-such-data"), tokenizer, "train")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert msg.startswith("data.train: nobody-xyz/no-such-data: cannot load this hub dataset")
    assert "offline mode is set" in msg and "not in the datasets cache" in msg


@pytest.fixture
def no_network(monkeypatch, hub_cache) -> list[str]:
    """Online mode with a hub that refuses connections; returns the URLs asked."""
    import datasets
    import huggingface_hub
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    asked: list[str] = []
    real = huggingface_hub.get_hf_file_metadata

    def counted(url, **kwargs):
        asked.append(url)
        return real(url, **kwargs)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", counted)
    return asked


def test_unreachable_hub_one_request_then_the_cache(no_network, hub_cache, tokenizer):
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        build_dataset(DataConfig(train="nobody-xyz/no-such-data"), tokenizer, "train")
    assert time.perf_counter() - t0 < 15
    assert len(no_network) == 1  # one request, no retries
    assert "the hub is unreachable" in str(e.value) and "not in the datasets cache" in str(e.value)
    cache_hub_dataset(hub_cache, "myorg/tiny", {"train": ROWS[:6]})
    data = build_dataset(DataConfig(train="myorg/tiny"), tokenizer, "train")
    assert ids_of(data) == reference(ROWS[:6], tokenizer) and len(no_network) == 2


# -------------------------------------------------------------------- mixtures


def two_files(tmp_path) -> tuple[str, str]:
    alpaca = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in "abcde"]
    return write_jsonl(tmp_path / "a.jsonl", ROWS[:20]), write_jsonl(tmp_path / "b.jsonl", alpaca)


def test_mixture_rows_weights_formats_and_seed(tmp_path, tokenizer):
    a, b = two_files(tmp_path)
    a_ids = reference(ROWS[:20], tokenizer)
    b_ids = ids_of(build_dataset(DataConfig(train=b, format="alpaca"), tokenizer, "train"))
    b_src = {"path": b, "format": "alpaca"}

    def mixed(sources, seed=3):
        return build_dataset(DataConfig(train=sources), tokenizer, "train", seed=seed)

    m = mixed([{"path": a, "rows": 8}, {**b_src, "rows": 12}])
    got = ids_of(m)
    assert len(got) == 20 and m.rows == 20 and m.source == f"{a} + {b}"
    part_a, part_b = got[:8], got[8:]
    assert len(set(part_a)) == 8 and set(part_a) <= set(a_ids)
    assert part_a == sorted(part_a, key=a_ids.index)  # file order kept
    assert part_b[:10] == b_ids + b_ids and set(part_b[10:]) <= set(b_ids)  # 12 = 2 x 5 + 2
    assert m.tokens == sum(len(r) for r in m.input_ids)
    assert ids_of(mixed([{"path": a, "rows": 8}, {**b_src, "rows": 12}])) == got  # seeded
    others = {
        tuple(ids_of(mixed([{"path": a, "rows": 8}, {**b_src, "rows": 12}], s))) for s in range(4)
    }
    assert len(others) > 1
    w = mixed([{"path": a, "weight": 1}, {**b_src, "weight": 1}])  # 25 rows, half each
    assert shares(25, [1.0, 1.0]) == [13, 12] and len(w) == 25
    assert set(ids_of(w)[:13]) <= set(a_ids) and ids_of(w)[13:23] == b_ids + b_ids
    w3 = mixed([{"path": a, "weight": 3}, {**b_src, "weight": 2}])
    assert len(w3) == 25 and len(set(ids_of(w3)[:15])) == 15  # 15 of a's 20, no repeats
    assert ids_of(mixed([a, b_src])) == a_ids + b_ids  # no weights, no rows: everything once


def test_single_source_rows_and_limit(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:20])
    five = build_dataset(DataConfig(train={"path": a, "rows": 5}), tokenizer, "train", seed=1)
    assert len(five) == 5 and set(ids_of(five)) <= set(reference(ROWS[:20], tokenizer))
    limited = build_dataset(DataConfig(train=[a, a], limit=3), tokenizer, "train")
    assert ids_of(limited) == 2 * reference(ROWS[:3], tokenizer)  # limit: per source


def test_eval_held_out_is_disjoint_and_seeded(tmp_path, tokenizer):
    a, b = two_files(tmp_path)
    every = reference(ROWS[:20], tokenizer)
    train, ev = build_splits(DataConfig(train=a, eval=0.2), tokenizer, seed=7)
    assert len(ev) == 4 and len(train) == 16
    assert set(ids_of(ev)).isdisjoint(ids_of(train))
    assert sorted(ids_of(ev) + ids_of(train)) == sorted(every)
    assert ids_of(train) == [r for r in every if r in set(ids_of(train))]  # file order
    again = build_dataset(DataConfig(train=a, eval=0.2), tokenizer, "eval", seed=7)
    assert ids_of(again) == ids_of(ev)
    assert ids_of(
        build_dataset(DataConfig(train=a, eval=0.2), tokenizer, "eval", seed=8)
    ) != ids_of(ev)
    _, five = build_splits(DataConfig(train=a, eval=5, eval_limit=3), tokenizer)
    assert len(five) == 3
    # A mixture: each source gives its share (20:5 -> 4 + 1), never a row trained on,
    # even when the source is repeated to fill its rows.
    cfg = DataConfig(train=[a, {"path": b, "format": "alpaca", "rows": 12}], eval=5)
    train, ev = build_splits(cfg, tokenizer, seed=1)
    assert len(ev) == 5 and len(train) == 16 + 12
    assert set(ids_of(ev)).isdisjoint(ids_of(train))
    with pytest.raises(DataError, match="holds out 20 rows, but the training data has 20"):
        build_splits(DataConfig(train=a, eval=20), tokenizer)


# -------------------------------------------------------------------- token cache


def counting(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = data_build.tokenize_rows

    def counted(rows, cfg, tokenizer, source):
        calls.append(source)
        return real(rows, cfg, tokenizer, source)

    monkeypatch.setattr(data_build, "tokenize_rows", counted)
    return calls


def test_cache_hit_skips_tokenizing_and_keys_miss(tmp_path, tokenizer, monkeypatch, token_cache):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS[:12])
    calls = counting(monkeypatch)
    base = {"train": path, "max_length": 96}
    first = build_dataset(DataConfig(**base), tokenizer, "train")
    hit = build_dataset(DataConfig(**base), tokenizer, "train")
    assert calls == [path] and not first.from_cache and hit.from_cache
    for k in (
        "input_ids",
        "labels",
        "source",
        "rows",
        "dropped",
        "truncated",
        "tokens",
        "trainable_tokens",
    ):
        assert getattr(hit, k) == getattr(first, k), k
    files = list(token_cache.rglob("*.safetensors"))
    assert len(files) == 1 and b"pickle" not in files[0].read_bytes()[:200]
    changes = [
        {"max_length": 90},
        {"truncation": "left"},
        {"train_on_prompt": True},
        {"chat_template": "never"},
        {"system_prompt": "Be brief."},
        {"limit": 5},
        {"fields": {"prompt": "prompt", "completion": "prompt"}},
        {"format": "text", "fields": {"text": "prompt"}},
    ]
    for n, change in enumerate(changes, start=2):
        build_dataset(DataConfig(**{**base, **change}), tokenizer, "train")
        assert len(calls) == n, change
    with monkeypatch.context() as m:  # (the session's tokenizer: restored after)
        m.setattr(tokenizer, "chat_template", "{# changed #}" + tokenizer.chat_template)
        build_dataset(DataConfig(**base), tokenizer, "train")
    assert len(calls) == len(changes) + 2  # another tokenizer: a miss
    build_dataset(DataConfig(**base), tokenizer, "train")
    assert len(calls) == len(changes) + 2  # the tokenizer as it was: a hit again
    write_jsonl(tmp_path / "t.jsonl", ROWS[1:13])  # the same file, new content
    build_dataset(DataConfig(**base), tokenizer, "train")
    assert len(calls) == len(changes) + 3


def test_cache_off_damaged_and_unwritable(tmp_path, tokenizer, monkeypatch, token_cache):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS[:6])
    calls = counting(monkeypatch)
    build_dataset(DataConfig(train=path, cache=False), tokenizer, "train")
    assert not token_cache.exists()
    first = build_dataset(DataConfig(train=path), tokenizer, "train")
    (cached,) = token_cache.rglob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:50])  # damaged: a miss, not an error
    again = build_dataset(DataConfig(train=path), tokenizer, "train")
    assert len(calls) == 3 and again.input_ids == first.input_ids
    shutil.rmtree(token_cache)
    token_cache.parent.mkdir(exist_ok=True)
    token_cache.write_text("not a folder")  # the cache cannot be written: the run goes on
    assert build_dataset(DataConfig(train=path), tokenizer, "train").input_ids == first.input_ids


def test_mixture_and_held_out_from_the_cache_are_identical(tmp_path, tokenizer, monkeypatch):
    a, b = two_files(tmp_path)
    cfg = DataConfig(
        train=[{"path": a, "weight": 2}, {"path": b, "format": "alpaca", "weight": 1}], eval=0.1
    )
    calls = counting(monkeypatch)
    first = build_splits(cfg, tokenizer, seed=4)
    second = build_splits(cfg, tokenizer, seed=4)
    assert len(calls) == 2 and second[0].from_cache
    assert [ids_of(d) for d in first] == [ids_of(d) for d in second]
    assert [d.labels for d in first] == [d.labels for d in second]


# -------------------------------------------------------------------- recipe, validate, resume


def test_recipe_errors_name_the_source():
    def error(data: dict) -> str:
        with pytest.raises(RecipeError) as e:
            validate_dict({"data": data}, "r.yaml")
        return str(e.value)

    assert "data.train: wieght: unknown key (did you mean 'weight'?)" in error(
        {"train": {"path": "a", "wieght": 1}}
    )
    assert "data.train: source 2: split: must be a split name" in error(
        {"train": ["a", {"path": "b", "split": "train[:x]"}]}
    )
    assert "every source of a weighted mixture needs a weight" in error(
        {"train": [{"path": "a", "weight": 1}, "b"]}
    )
    assert "give weight or rows, not both" in error(
        {"train": [{"path": "a", "weight": 1, "rows": 2}]}
    )
    assert "weight shares a mixture out" in error({"train": {"path": "a", "weight": 1}})
    assert "format must be one of" in error({"train": [{"path": "a", "format": "csv"}]})
    assert "data.eval: a share of the training rows must be between 0 and 1" in error(
        {"train": "a", "eval": 1.5}
    )
    assert "write 100, not 100.0" in error({"train": "a", "eval": 100.0})
    assert "data.eval: weight and rows are for the sources of data.train" in error(
        {"train": "a", "eval": {"path": "e", "rows": 3}}
    )
    r = validate_dict({"data": {"train": "t.jsonl", "eval": 0.05}}, "r.yaml")
    assert r.data.train == "t.jsonl" and r.data.eval == 0.05
    again = validate_dict(yaml.safe_load(r.to_yaml()), "r.yaml")  # recipe.yaml round trip
    assert again.data == r.data


def test_validate_checks_every_source(tmp_path, tiny_llama, hub_cache):
    import datasets

    a, b = two_files(tmp_path)
    datasets.Dataset.from_list(ROWS[:7]).save_to_disk(str(tmp_path / "saved"))

    def validate(data: dict):
        rec = {
            "model": {"path": str(tiny_llama)},
            "data": {"max_length": 64, **data},
            "output": {"dir": str(tmp_path / "run")},
        }
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
        return runner.invoke(app, ["validate", str(tmp_path / "r.yaml")])

    res = validate({"train": [a, str(tmp_path / "saved")], "eval": 0.1})
    assert res.exit_code == 0, res.output
    assert "data.train source 1 20 rows, data.train source 2 7 rows, data.eval 3 rows" in res.stderr
    res = validate({"train": [a, b]})  # b is alpaca, the recipe's format is not
    assert res.exit_code == 2 and "b.jsonl" in res.stderr and "'prompt'" in res.stderr
    t0 = time.perf_counter()
    res = validate({"train": "nobody-xyz/no-such-data"})
    assert res.exit_code == 2 and "not in the datasets cache" in res.stderr
    assert time.perf_counter() - t0 < 10 and "Traceback" not in res.output
    res = validate({"train": a, "eval": 25})
    assert res.exit_code == 2 and "holds out 25 rows, but the training data has 20" in res.stderr
    assert not (tmp_path / "run").exists()


def test_mixture_resume_continues_the_same_order(tiny_llama, tmp_path):
    a, b = two_files(tmp_path)
    data = {
        "train": [{"path": a, "weight": 2}, {"path": b, "format": "alpaca", "weight": 1}],
        "eval": 0.2,
        "max_length": 64,
    }

    def recipe(out: Path):
        return validate_dict(
            {
                "model": {"path": str(tiny_llama)},
                "data": data,
                "sampler": {"strategy": "lisa", "gamma": 2, "switch_interval": 2},
                "optimizer": {"lr": 1e-3},
                "training": {"max_steps": 6, "micro_batch_size": 4, "seed": 5, "eval_interval": 3},
                "checkpoint": {"interval": 3},
                "output": {"dir": str(out), "save_model": False},
            },
            "test.yaml",
        )

    _, straight = run_straight(recipe(tmp_path / "a"))
    _, resumed = run_interrupted(recipe(tmp_path / "b"), k=3)
    assert resumed.losses == straight.losses and len(straight.losses) == 6
    assert resumed.eval_losses == straight.eval_losses
