"""Generate task data with gold answers from reasoning-gym, as prompt/completion JSONL.

    python scripts/make_data.py                     # the committed quickstart data
    python scripts/make_data.py --task basic_arithmetic --out data/arith --train 2000
    python scripts/make_data.py --task word_sequence_reversal --out data/reversal
    python scripts/make_data.py --task family_relationships --out data/family --train 1000

reasoning-gym derives item i from seed + i, so splits made from nearby seeds
overlap. Each split here gets its own seed, a million apart, and the script
checks that no question appears in two splits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import reasoning_gym

SPLIT_SEEDS = {"train": 1_000_000, "eval": 5_000_000, "test": 9_000_000}

# Task settings a 135M model can learn in a CPU budget.
TASK_CONFIG = {
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
    "basic_arithmetic": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
    # string manipulation (copying words in reverse order), unlike the arithmetic ones
    "word_sequence_reversal": dict(min_words=3, max_words=5),
}


def make_split(task: str, size: int, seed: int) -> list[dict]:
    ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **TASK_CONFIG.get(task, {}))
    rows = []
    for i, item in enumerate(ds):
        rows.append(
            {
                "prompt": item["question"],
                "completion": str(item["answer"]),
                "answer": str(item["answer"]),
                "task": task,
                "seed": seed,
                "index": i,
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="chain_sum")
    ap.add_argument("--out", default="data/quickstart")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--test", type=int, default=400)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": args.train, "eval": args.eval, "test": args.test}
    splits = {name: make_split(args.task, n, SPLIT_SEEDS[name]) for name, n in sizes.items()}
    seen: dict[str, str] = {}
    for name, rows in splits.items():
        for row in rows:
            other = seen.setdefault(row["prompt"], name)
            if other != name:
                # Short tasks repeat questions by chance; keep held-out splits clean.
                row["duplicate_of"] = other
        kept = [r for r in rows if "duplicate_of" not in r]
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        print(
            f"{out / (name + '.jsonl')}: {len(kept)} rows ({len(rows) - len(kept)} duplicates "
            "of an earlier split removed)"
        )


if __name__ == "__main__":
    main()
