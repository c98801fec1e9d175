"""Generate task data with gold answers from reasoning-gym, as prompt/completion JSONL.

    python scripts/make_data.py                     # the committed quickstart data
    python scripts/make_data.py --task basic_arithmetic --out data/arith --train 2000
    python scripts/make_data.py --task word_sequence_reversal --out data/reversal
    python scripts/make_data.py --task family_relationships --out data/family --train 1000
    python scripts/make_data.py --suite             # the accuracy suite's 12 tasks, data/suite/
    python scripts/make_data.py --suite gcd caesar   # some of them

reasoning-gym derives item i from seed + i, so splits made from nearby seeds
overlap. Each split here gets its own seed, a million apart, and the script
checks that no question appears in two splits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import reasoning_gym

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from grass_cli.atomic import write_atomic_text  # noqa: E402

SPLIT_SEEDS = {"train": 1_000_000, "eval": 5_000_000, "test": 9_000_000}

# Task settings a 135M model can learn in a CPU budget.
TASK_CONFIG = {
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
    "basic_arithmetic": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
    # string manipulation (copying words in reverse order), unlike the arithmetic ones
    "word_sequence_reversal": dict(min_words=3, max_words=5),
}

# The accuracy suite (benchmarks/suite.py): name -> (reasoning-gym task, settings).
# Sized for SmolLM2-135M at 300-1000 steps x batch 8: harder than reasoning-gym's
# smallest settings, so that no task starts near 100%, and small enough that 2400
# examples can teach something (few animals, two-digit numbers, short strings, small
# rotations, two or three variables). The three tasks the GRASS study tuned on keep
# their settings.
SUITE = {
    "chain_sum": ("chain_sum", TASK_CONFIG["chain_sum"]),
    "family": ("family_relationships", {}),
    "reversal": ("word_sequence_reversal", TASK_CONFIG["word_sequence_reversal"]),
    "leg_counting": ("leg_counting", dict(min_animals=2, max_animals=3, max_instances=5)),
    "gcd": ("gcd", dict(max_value=300)),
    "number_sorting": (
        "number_sorting",
        dict(min_numbers=3, max_numbers=5, max_decimals=0, min_value=-50, max_value=50),
    ),
    # reasoning-gym draws its plaintexts from a small pool of sentences (93 distinct
    # ones in 3000 rows at these settings): the questions differ across splits, their
    # answers repeat, so this task also measures recall of the plaintexts.
    "caesar_cipher": ("caesar_cipher", dict(min_words=3, max_words=6, max_rotation=25)),
    "string_insertion": ("string_insertion", dict(min_string_length=5, max_string_length=10)),
    "count_bits": ("count_bits", dict(max_n=65535)),
    "base_conversion": ("base_conversion", dict(max_base=10, max_value=400)),
    "basic_arithmetic": ("basic_arithmetic", TASK_CONFIG["basic_arithmetic"]),
    "propositional_logic": ("propositional_logic", {}),
}
HELD_OUT_DRAWS = 5
SUITE_SIZES = {"train": 3000, "eval": 200, "test": 300}


def gold(item: dict) -> str:
    """The answer to train on. propositional_logic has no single answer (any valid
    conclusion counts, which its verifier checks): it trains on its example conclusion."""
    if item["answer"] is None and "example_answer" in item["metadata"]:
        return str(item["metadata"]["example_answer"])
    return str(item["answer"])


def make_split(task: str, size: int, seed: int, config: dict | None = None) -> list[dict]:
    config = TASK_CONFIG.get(task, {}) if config is None else config
    ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **config)
    rows = []
    for i, item in enumerate(ds):
        answer = gold(item)
        rows.append(
            {
                "prompt": item["question"],
                "completion": answer,
                "answer": answer,
                "task": task,
                "seed": seed,
                "index": i,
            }
        )
    return rows


def write_splits(
    out: Path, sizes: dict[str, int], task: str, config: dict | None, fill: bool = False
) -> None:
    """Every split in `out`, each from its own seed, no question in two splits. With
    `fill`, a held-out split draws up to HELD_OUT_DRAWS times its size to reach it with
    new questions (the suite's); without, it keeps what is left of its size (the
    committed data, made that way)."""
    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, str] = {}
    for name, size in sizes.items():
        # Short tasks repeat questions by chance; keep held-out splits clean.
        drawn = size * HELD_OUT_DRAWS if fill and name != "train" else size
        kept: list[dict] = []
        for row in make_split(task, drawn, SPLIT_SEEDS[name], config):
            if len(kept) == size:
                break
            if seen.setdefault(row["prompt"], name) == name:
                kept.append(row)
        text = "".join(json.dumps(r) + "\n" for r in kept)
        write_atomic_text(out / f"{name}.jsonl", text)
        print(f"{out / (name + '.jsonl')}: {len(kept)} rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="chain_sum")
    ap.add_argument("--out", default="data/quickstart")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument(
        "--suite", nargs="*", metavar="NAME",
        help="make the accuracy suite's tasks (all, or these) in data/suite/NAME, "
        "skipping those already there",
    )  # fmt: skip
    args = ap.parse_args()
    if args.suite is not None:
        unknown = sorted(set(args.suite) - set(SUITE))
        if unknown:
            sys.exit(f"unknown suite task(s) {unknown}; choices: {', '.join(SUITE)}")
        for name in args.suite or list(SUITE):
            out = ROOT / "data" / "suite" / name
            if all((out / f"{n}.jsonl").exists() for n in SUITE_SIZES):
                continue
            task, config = SUITE[name]
            write_splits(out, SUITE_SIZES, task, config, fill=True)
        return
    sizes = {"train": args.train, "eval": args.eval, "test": args.test}
    write_splits(Path(args.out), sizes, args.task, None)


if __name__ == "__main__":
    main()
