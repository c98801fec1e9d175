"""The token cache and the time to first step: the quickstart with the cache off, cold, warm.

    python benchmarks/token_cache.py               # 3 rounds of the three starts
    python benchmarks/token_cache.py --rounds 5
    python benchmarks/token_cache.py --data-only --repeat 20   # the data alone, 40k rows

Each start is `grass train recipes/quickstart.yaml` in its own fresh process
(imports, model load, data, the eval before training, probing, one step), timed
from the process's first line to the end of its first optimizer step. Only the
data differs: `data.cache: false` reads and tokenizes every time; a cold cache
(emptied first) tokenizes and stores; a warm cache (the same recipe again) reads
the stored tokens. The three run one after the other in each round, so the
machine's load is shared alike. A private GRASS_CACHE is used (the converted
SmolLM2 is linked into it), so the user's own token cache is never touched.

`--data-only` times building the training data alone, in this process (the
tokenizer loaded once), on the quickstart rows repeated `--repeat` times: the
part of a start the cache saves, without the model's load and steps around it.
Beside the three, `data.streaming: true` (no cache: it never tokenizes ahead) is
timed to its first micro batch, which needs only the first shuffle block
(`data.shuffle_block`, 10000 rows) read and tokenized, whatever the data's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

T0 = time.perf_counter()  # before any import of grass, torch or transformers

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/quickstart.yaml"
OVERRIDES = [
    "training.max_steps=1",
    "sampler.probe_steps=1",
    "data.eval_limit=16",
    "output.save_model=false",
]


def child(out: str, cache: str) -> None:
    """Train to the first step; print seconds from process start, and in building data."""
    import grass_cli.engine.build as engine_build
    from grass_cli.engine import setup, train
    from grass_cli.recipe import load_recipe
    from grass_cli.telemetry import Telemetry

    seconds = {"data": 0.0}

    def timed(fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds["data"] += time.perf_counter() - t

        return wrapper

    for name in ("build_dataset", "build_splits"):  # whichever the engine calls
        if hasattr(engine_build, name):
            setattr(engine_build, name, timed(getattr(engine_build, name)))

    class FirstStep:
        def emit(self, event):
            if event["event"] == "step" and "first" not in seconds:
                seconds["first"] = time.perf_counter() - T0

        def close(self):
            pass

    overrides = [*OVERRIDES, f"output.dir={out}", f"data.cache={cache}", "checkpoint.at_end=false"]
    train(setup(load_recipe(RECIPE, overrides), Telemetry([FirstStep()]), overwrite=True))
    print(json.dumps(seconds))


def data_only(root: Path, rounds: int, repeat: int) -> None:
    """Build the training data with the cache off, cold and warm, in this process."""
    from grass_cli.data import build_dataset
    from grass_cli.data.stream import StreamBatches, build_stream
    from grass_cli.models import load_tokenizer, resolve_model_path
    from grass_cli.recipe import EMBEDDED_SMOLLM2, load_recipe

    os.environ["GRASS_CACHE"] = str(root)
    tokenizer = load_tokenizer(resolve_model_path(EMBEDDED_SMOLLM2))
    lines = (ROOT / "data/quickstart/train.jsonl").read_text().splitlines(keepends=True)
    data = root / "train.jsonl"
    data.write_text("".join(lines * repeat))
    cfg = load_recipe(RECIPE, [f"data.train={data}"]).data
    times: dict[str, list[float]] = {"false": [], "true, cold": [], "true, warm": []}
    times["streaming, to the first batch"] = []
    for _ in range(rounds):
        for name, cache in (("false", False), ("true, cold", True), ("true, warm", True)):
            if name == "true, cold":
                shutil.rmtree(root / "tokens", ignore_errors=True)
            t = time.perf_counter()
            rows = len(build_dataset(cfg.model_copy(update={"cache": cache}), tokenizer, "train"))
            times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        streamed = cfg.model_copy(update={"streaming": True, "eval": None})
        stream, _ = build_stream(streamed, tokenizer, seed=0)
        next(StreamBatches(stream, 8, tokenizer.pad_token_id))
        times["streaming, to the first batch"].append(time.perf_counter() - t)
    print(f"| data.cache | building {rows} rows (s) |")
    print("|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} |")
    print(f"median of {rounds} rounds; shuffle_block {cfg.shuffle_block}")


def start(cache_root: Path, out: Path, cache: str) -> dict[str, float]:
    env = {**os.environ, "GRASS_CACHE": str(cache_root)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(out), cache],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cache_dir_gguf() -> Path:
    """The converted SmolLM2's folder in the user's cache (converted now if need be)."""
    from grass_cli.models import cache_dir, resolve_model_path
    from grass_cli.recipe import EMBEDDED_SMOLLM2

    resolve_model_path(EMBEDDED_SMOLLM2)  # converted once, outside the timing
    return cache_dir() / "gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-only", action="store_true", help="time building the data alone")
    ap.add_argument("--repeat", type=int, default=1, help="--data-only: copies of the rows")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.data_only:
        with tempfile.TemporaryDirectory(prefix="grass-bench-") as tmp:
            root = Path(tmp)
            (root / "gguf").symlink_to(cache_dir_gguf())
            data_only(root, args.rounds, args.repeat)
        return
    times: dict[str, list[dict[str, float]]] = {"off": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="grass-bench-") as tmp:
        root = Path(tmp) / "cache"
        root.mkdir()
        (root / "gguf").symlink_to(cache_dir_gguf())
        for _ in range(args.rounds):
            times["off"].append(start(root, Path(tmp) / "run", "false"))
            shutil.rmtree(root / "tokens", ignore_errors=True)
            times["cold"].append(start(root, Path(tmp) / "run", "true"))
            times["warm"].append(start(root, Path(tmp) / "run", "true"))
    print("| data.cache | time to first step (s) | building the data (s) |")
    print("|---|---|---|")
    for name, label in (("off", "false"), ("cold", "true, cold"), ("warm", "true, warm")):
        first = statistics.median(t["first"] for t in times[name])
        data = statistics.median(t["data"] for t in times[name])
        print(f"| {label} | {first:.2f} | {data:.2f} |")
    print(f"median of {args.rounds} rounds; overrides: {' '.join(OVERRIDES)}")


if __name__ == "__main__":
    main()
