"""The accuracy suite: every method on twelve reasoning-gym tasks, run as a user would.

    python benchmarks/suite.py tune                    # one lr per method, on validation
    python benchmarks/suite.py run --steps 300         # every task x method, seed 0
    python benchmarks/suite.py run --steps 1000        # the long budget (+ equal wall-clock)
    python benchmarks/suite.py run --steps 300 --tasks gcd count_bits --methods grass lora
    python benchmarks/suite.py table                   # the tables from the runs done so far
    python benchmarks/suite.py diagnose --steps 300    # why GRASS wins or loses, per task
    python benchmarks/suite.py plan                    # what is done, what is left, the time

What a user does with a new task: take a method's recipe and its usual lr, train, and
score the held-out questions. So:

- Tasks: the study's three (chain_sum, family, reversal) and nine more, made by
  `scripts/make_data.py --suite` into data/suite/ (train 3000 / validation 200 / test
  300 rows, each split from its own seed, no test question in train; made here when
  missing). `data.max_length` is each task's longest row plus the chat template, as
  `grass init` sizes it from the rows; no row is truncated (checked).
- Methods (SmolLM2-135M-Instruct, recipes/bench/, batch 8, cosine schedule, bf16
  autocast as on a GPU):
  `full` (full fine-tuning), `lora` (r 16, alpha 32, every linear layer), `lisa`,
  `grass` (the sampler defaults, gamma 4 of 30) and `grass-auto` (gamma: auto with
  memory_budget: lora: GRASS at LoRA's memory, one key). At 1000 steps
  `grass-wall` is GRASS trained for as long as LoRA took on the same task: its steps
  are LoRA's training seconds over GRASS's seconds per step, both measured on that
  task at 1000 steps.
- One lr per method, never per task: `tune` trains every lr of the method's grid on
  the tuning tasks (TUNE_TASKS, 300 steps, seed 0) and keeps the lr with the lowest
  geometric mean of their validation losses (eval.jsonl). Test rows are read only by
  the held-out scoring.
- Seeds: 0 everywhere; where two methods of a goal (GOAL_PAIRS) end within
  CLOSE_POINTS of each other on a task, both get seeds 1 and 2 (`--no-extra-seeds`
  leaves them out).
- Held out: `grass eval RUN --kind generate --scorer exact` (greedy) on the test
  split; propositional_logic has no single right answer (any valid conclusion is
  right), so its predictions are scored again with reasoning-gym's own verifier.

Every training runs alone in a child process (benchmarks/compare.py's train_one) and
is kept in --work (default runs/suite): a run whose recipe and overrides are unchanged
is reused, so the suite resumes where it stopped, a run at a time. Results:
benchmarks/results/suite-lr.{json,md}, suite-STEPS.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402  (the bench's run/reuse machinery)

from grass_cli.atomic import write_atomic_text  # noqa: E402

# name -> (what it exercises, tokens the answer may need)
TASKS: dict[str, tuple[str, int]] = {
    "chain_sum": ("arithmetic", 8),
    "family": ("relational reasoning", 8),
    "reversal": ("string manipulation", 32),
    "leg_counting": ("arithmetic word problem", 8),
    "gcd": ("number theory", 8),
    "number_sorting": ("ordering", 48),
    "caesar_cipher": ("string manipulation", 32),
    "string_insertion": ("rule following", 16),
    "count_bits": ("binary", 8),
    "base_conversion": ("number bases", 16),
    "basic_arithmetic": ("arithmetic", 12),
    "propositional_logic": ("logic", 24),
}
METHODS = ("full", "lora", "lisa", "grass", "grass-auto")
LABELS = {
    "full": "full FT",
    "lora": "LoRA r16",
    "lisa": "LISA",
    "grass": "GRASS (gamma 4)",
    "grass-auto": "GRASS auto @ LoRA mem",
    "grass-wall": "GRASS @ LoRA's time",
}
RECIPE = {"grass-wall": "grass"}  # methods that train another method's recipe
# Each grid is x0.5, x1, x2 around the lr the GRASS study chose for the method on
# reversal (docs/benchmarks.md). grass-auto's lr is the lr for 4 blocks, which
# sampler.auto_lr scales by sqrt(4 / gamma): the same grid as GRASS's, so that the two
# choosing the same value says the rule carries GRASS's lr to the gamma auto picks.
LR_GRID: dict[str, tuple[float, ...]] = {
    "full": (1e-4, 2e-4, 4e-4),
    "lora": (1e-3, 2e-3, 4e-3),
    "lisa": (2e-4, 4e-4, 8e-4),
    "grass": (4e-4, 8e-4, 1.6e-3),
    "grass-auto": (4e-4, 8e-4, 1.6e-3),
}
TUNE_TASKS = ("reversal", "family")
EXTEND = 2  # grid steps tune() may add past an edge that holds the best lr
TUNE_STEPS = 300
EXTRA = {"lora": ("lora.r=16", "lora.alpha=32")}
# (a, b): a is held against b in a goal; close pairs get two more seeds
GOAL_PAIRS = (("grass-auto", "lora"), ("grass", "lora"), ("grass", "lisa"))
CLOSE_POINTS = 3.0
DATA = ROOT / "data/suite"  # scripts/make_data.py --suite writes here
TEMPLATE_TOKENS = 48  # the chat template's markup and system prompt, with room
LENGTH_STEP = 32


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ------------------------------------------------------------------- tasks, modes


def ensure_data(tasks: list[str]) -> None:
    """data/suite/TASK from scripts/make_data.py, made where missing."""
    missing = [t for t in tasks if not (DATA / t / "test.jsonl").exists()]
    if missing:
        log(f"making data for {', '.join(missing)}")
        subprocess.run(
            [sys.executable, str(ROOT / "scripts/make_data.py"), "--suite", *missing],
            check=True, cwd=ROOT, capture_output=True,
        )  # fmt: skip


def register(tasks: list[str]) -> None:
    """The suite's tasks are compare.py's tasks in this process (its runs read them)."""
    compare.TASKS.clear()
    for t in tasks:
        kind, new_tokens = TASKS[t]
        # relative to the checkout, as the runs' keys name it: a run made in another
        # checkout of the same commit is the same run
        data = DATA.relative_to(ROOT) if DATA.is_relative_to(ROOT) else DATA
        compare.TASKS[t] = compare.Task(str(data / t), kind, "exact", new_tokens)


_lengths: dict[str, int] = {}


def max_length(task: str) -> int:
    """The task's longest row in tokens (prompt and answer, every split) plus the chat
    template, rounded up to LENGTH_STEP: no row is cut, and batches pad to their
    longest row, so a generous value costs nothing."""
    if task not in _lengths:
        from transformers import AutoTokenizer

        from grass_cli.models import resolve_model_path

        tok = AutoTokenizer.from_pretrained(
            resolve_model_path(compare._recipe("grass")["model"]["path"])
        )
        longest = 0
        for split in ("train", "eval", "test"):
            for line in (DATA / task / f"{split}.jsonl").open(encoding="utf-8"):
                row = json.loads(line)
                longest = max(longest, len(tok(row["prompt"] + row["completion"])["input_ids"]))
        _lengths[task] = -(-(longest + TEMPLATE_TOKENS) // LENGTH_STEP) * LENGTH_STEP
    return _lengths[task]


def mode(task: str, steps: int, seed: int) -> compare.Mode:
    return compare.Mode(
        steps=steps, micro_batch=8, seeds=(seed,), lr_grid=(1.0,), val_limit=200,
        test_limit=300, max_length=max_length(task), extra_by_method=EXTRA,
        # a row longer than max_length is dropped, not cut: `train` checks none was.
        # bf16 autocast, as users train on GPUs: 1.4x the tokens/s of fp32 here
        overrides=("data.truncation=drop", "training.autocast=bf16"),
    )  # fmt: skip


def train(work: Path, task: str, method: str, lr: float, seed: int, steps: int) -> dict[str, Any]:
    """One run (reused when done), with its held-out accuracy."""
    recipe = RECIPE.get(method, method)
    m = mode(task, steps, seed)
    result = compare.train_one(work, task, recipe, lr, seed, m, log)
    start = check_rows(task, Path(result["run_dir"]), m.max_length)
    moves = block_moves(Path(result["run_dir"]))  # before held_out frees the model
    held = compare.held_out(result, m, log)
    acc = held["accuracy"]
    if task == "propositional_logic":
        acc = verified_accuracy(task, Path(result["run_dir"]) / f"held-out-{m.test_limit}")
    keep = ("val_loss", "train_peak_rss", "train_s", "wall_s", "tokens_per_s", "run_dir")
    return {
        "task": task, "method": method, "lr": lr, "seed": seed, "steps": steps,
        "gamma": start["gamma"], "accuracy": acc, "moves": moves,
        **{k: result[k] for k in keep},
    }  # fmt: skip


def block_moves(run_dir: Path, base_dir: Path | None = None) -> dict[str, float] | None:
    """How far training moved each block: ||W - W0|| / ||W0|| over the block's weights
    (every matrix and norm of `model.layers.N.`), and the same for the embeddings; the
    saved model against the base. LoRA saves its adapters merged, so this is one
    measure for every method (a LoRA block's move is its low-rank update's norm).
    Kept in the run's moves.json with the key of the training that made the model
    (result.json's), so a run trained again over an older one is measured again; None
    once the model is gone and nothing was kept."""
    import re

    done = run_dir / "moves.json"
    result = run_dir / "result.json"
    trained = json.loads(result.read_text()).get("key") if result.exists() else None
    if done.exists():
        kept = json.loads(done.read_text())
        if kept.get("trained") == trained:
            return kept["moves"]
    final = run_dir / "final"
    if not final.is_dir():
        return None
    from safetensors import safe_open

    from grass_cli.models import resolve_model_path

    if base_dir is None:
        base_dir = Path(resolve_model_path(compare._recipe("grass")["model"]["path"]))
    sq: dict[str, list[float]] = {}  # group -> [sum of squared change, of squared base]
    bases = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        h = safe_open(f, "pt")
        bases.update({k: h for k in h.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    for f in sorted(final.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for key in h.keys():  # noqa: SIM118
                m = re.search(r"\.layers\.(\d+)\.", key)
                group = f"block.{m.group(1)}" if m else ("embed" if "embed" in key else None)
                if group is None or key not in bases:
                    continue
                w, w0 = h.get_tensor(key).double(), bases[key].get_tensor(key).double()
                acc = sq.setdefault(group, [0.0, 0.0])
                acc[0] += float((w - w0).pow(2).sum())
                acc[1] += float(w0.pow(2).sum())
    moves = {g: (a / b) ** 0.5 for g, (a, b) in sq.items() if b > 0}
    write_atomic_text(done, json.dumps({"trained": trained, "moves": moves}))
    return moves


def check_rows(task: str, run_dir: Path, length: int) -> dict[str, Any]:
    """Every training row was trained on (none dropped for length); the run's start
    event."""
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as f:
        start = json.loads(f.readline())
    rows = sum(1 for _ in (DATA / task / "train.jsonl").open(encoding="utf-8"))
    if start["train_rows"] != rows:
        sys.exit(f"{task}: {rows - start['train_rows']} rows longer than max_length {length}")
    return start


def verified_accuracy(task: str, held_dir: Path) -> float:
    """Held-out accuracy by reasoning-gym's verifier (score 1.0 counts): for tasks whose
    gold answer is one example of many right ones. Each item is rebuilt from the seed
    and index its row records, and checked to be the question that was asked."""
    import reasoning_gym

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_data

    name, config = make_data.SUITE[task]
    rows = [json.loads(x) for x in (DATA / task / "test.jsonl").open()]
    preds = [json.loads(x) for x in (held_dir / "predictions.jsonl").open()]
    right = 0
    for p in preds:
        row = rows[p["index"]]
        ds = reasoning_gym.create_dataset(name, size=row["index"] + 1, seed=row["seed"], **config)
        item = ds[row["index"]]
        if item["question"] != row["prompt"]:
            sys.exit(f"{task}: test row {p['index']} is not the item its seed and index make")
        right += ds.score_answer(p["prediction"].strip(), item) == 1.0
    return right / len(preds)


# ------------------------------------------------------------------------- tuning


def tune(work: Path, methods: list[str], results: Path) -> dict[str, float]:
    """Each method's lr: the grid value with the lowest geometric mean of validation
    losses over TUNE_TASKS (seed 0, TUNE_STEPS). The middle value trains first, so an
    interrupted tuning has the runs the suite needs most. A best value at the grid's
    edge is not taken on trust: the grid grows by its own x2 step past that edge (up
    to EXTEND times) until the best lies inside it, so no method, LoRA least of all,
    is held to an lr the grid merely failed to reach."""
    path = results / "suite-lr.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = json.loads(path.read_text()) if path.exists() else {"chosen": {}, "losses": {}}
    for method in methods:
        grid = list(LR_GRID[method])
        losses: dict[str, dict[str, float]] = {}

        def train_lr(lr: float, method: str = method, losses: dict = losses) -> None:
            for task in TUNE_TASKS:
                r = compare.train_one(work, task, method, lr, 0, mode(task, TUNE_STEPS, 0), log)
                losses.setdefault(f"{lr:g}", {})[task] = r["val_loss"]

        for lr in [grid[1], grid[0], *grid[2:]]:
            train_lr(lr)
        for _ in range(EXTEND + 1):
            score = {
                lr: math.exp(statistics.mean(math.log(v) for v in d.values()))
                for lr, d in losses.items()
            }
            best = min(score, key=score.get)
            lo, hi = min(grid), max(grid)
            edge = float(best) in (lo, hi)
            if not edge or len(grid) >= len(LR_GRID[method]) + EXTEND:
                break
            grid.append(lo / 2 if float(best) == lo else hi * 2)
            log(f"{method}: lr {best} is at the grid's edge; trying {grid[-1]:g}")
            train_lr(grid[-1])
        log(f"{method}: lr {best} (geometric mean validation loss {score[best]:.4f})"
            + (" - still at the grid's edge" if edge else ""))  # fmt: skip
        for lr in grid:  # the models of the lrs not chosen are not needed
            for task in TUNE_TASKS:
                if f"{lr:g}" != best:
                    run = compare.run_dir_for(work, task, method, lr, 0, mode(task, TUNE_STEPS, 0))
                    shutil.rmtree(run / "final", ignore_errors=True)
        done["chosen"][method] = float(best)
        done["losses"][method] = losses
        write_atomic_text(path, json.dumps(done, indent=1))
    write_atomic_text(results / "suite-lr.md", lr_table(done))
    return {m: done["chosen"][m] for m in methods}


def lr_table(done: dict[str, Any]) -> str:
    lines = [
        f"# Suite lrs: validation loss on {', '.join(TUNE_TASKS)} "
        f"({TUNE_STEPS} steps x batch 8, seed 0)",
        "",
        "| method | lr | " + " | ".join(TUNE_TASKS) + " | geometric mean | chosen |",
        "|---|---|" + "---|" * len(TUNE_TASKS) + "---|---|",
    ]
    for method, losses in done["losses"].items():
        for lr, by_task in sorted(losses.items(), key=lambda kv: float(kv[0])):
            gm = math.exp(statistics.mean(math.log(v) for v in by_task.values()))
            mark = "**yes**" if float(lr) == done["chosen"].get(method) else ""
            cells = " | ".join(f"{by_task[t]:.4f}" if t in by_task else "-" for t in TUNE_TASKS)
            lines.append(f"| {method} | {float(lr):.1e} | {cells} | {gm:.4f} | {mark} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the suite


def chosen_lrs(work: Path, methods: list[str], results: Path) -> dict[str, float]:
    """The tuned lr of each method (tuning the ones not tuned yet first)."""
    path = results / "suite-lr.json"
    chosen = json.loads(path.read_text())["chosen"] if path.exists() else {}
    todo = [m for m in methods if m not in chosen]
    if todo:
        chosen.update(tune(work, todo, results))
    return {m: chosen[m] for m in methods}


def wall_steps(lora: dict[str, Any], grass: dict[str, Any]) -> int:
    """GRASS's steps in the seconds LoRA trained for on the same task and budget."""
    return round(lora["train_s"] / (grass["train_s"] / grass["steps"]))


def close_pairs(rows: list[dict[str, Any]], task: str) -> set[str]:
    """Methods of a goal pair within CLOSE_POINTS of each other on `task` (seed 0)."""
    acc = {r["method"]: r["accuracy"] for r in rows if r["task"] == task and r["seed"] == 0}
    out: set[str] = set()
    for a, b in GOAL_PAIRS:
        if a in acc and b in acc and abs(acc[a] - acc[b]) * 100 < CLOSE_POINTS:
            out |= {a, b}
    return out


def run(work: Path, steps: int, tasks: list[str], methods: list[str], extra_seeds: bool,
        results: Path) -> list[dict[str, Any]]:  # fmt: skip
    """Every task x method at this budget, a task at a time (its table row complete
    before the next task starts); the results file is written after every run."""
    lrs = chosen_lrs(work, methods, results)
    path = results / f"suite-{steps}.json"
    rows: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        rows[:] = [
            r
            for r in rows
            if (r["task"], r["method"], r["seed"]) != (row["task"], row["method"], row["seed"])
        ]
        rows.append(row)
        write_atomic_text(path, json.dumps({"steps": steps, "lrs": lrs, "rows": rows}, indent=1))
        write_atomic_text(path.with_suffix(".md"), table(steps, lrs, rows))

    for task in tasks:
        for method in methods:
            keep(train(work, task, method, lrs[method], 0, steps))
        by = {r["method"]: r for r in rows if r["task"] == task and r["seed"] == 0}
        wall = steps >= 1000 and "lora" in by and "grass" in by
        if wall:
            n = wall_steps(by["lora"], by["grass"])
            keep(train(work, task, "grass-wall", lrs["grass"], 0, n))
        if extra_seeds:
            for method in sorted(close_pairs(rows, task)):
                for seed in (1, 2):
                    keep(train(work, task, method, lrs[method], seed, steps))
    return rows


def cell(accs: list[float]) -> str:
    if not accs:
        return "-"
    m = 100 * statistics.mean(accs)
    if len(accs) == 1:
        return f"{m:.1f}"
    return f"{m:.1f} ± {100 * statistics.stdev(accs):.1f}"


def table(steps: int, lrs: dict[str, float], rows: list[dict[str, Any]]) -> str:
    """Held-out accuracy per task and method (mean ± sd over seeds where there are
    several), the mean over the tasks every method has, and each method's costs."""
    methods = [m for m in (*METHODS, "grass-wall") if any(r["method"] == m for r in rows)]
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    acc = {
        (t, m): [r["accuracy"] for r in rows if r["task"] == t and r["method"] == m]
        for t in tasks for m in methods
    }  # fmt: skip
    complete = [t for t in tasks if all(acc[t, m] for m in methods)]
    lines = [
        f"# Accuracy suite, {steps} steps x batch 8 (SmolLM2-135M-Instruct)",
        "",
        "Held-out exact match % on up to 300 test questions per task (propositional_logic: "
        "reasoning-gym's verifier); mean ± sd over seeds where a cell has several. "
        "lrs (one per method, tuned on validation): "
        + ", ".join(f"{LABELS[m]} {lrs[m]:.0e}" for m in lrs)
        + ".",
        "",
        "| task | kind | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for t in tasks:
        cells = " | ".join(cell(acc[t, m]) for m in methods)
        lines.append(f"| {t} | {TASKS[t][0]} | {cells} |")
    if complete:
        means = " | ".join(
            f"**{statistics.mean(100 * statistics.mean(acc[t, m]) for t in complete):.1f}**"
            for m in methods
        )
        lines.append(f"| **mean** ({len(complete)} tasks) | | {means} |")
    lines += ["", "| method | peak RSS in training (GiB) | x LoRA | training s | x LoRA | "
              "validation loss | gamma | steps |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    first = [r for r in rows if r["seed"] == 0 and r["task"] in complete]

    def avg(m: str, key: str) -> float | None:
        xs = [r[key] for r in first if r["method"] == m]
        return statistics.mean(xs) if xs else None

    for m in methods:
        rss, secs, loss = avg(m, "train_peak_rss"), avg(m, "train_s"), avg(m, "val_loss")
        if rss is None:
            continue
        lr_rss, lr_s = avg("lora", "train_peak_rss"), avg("lora", "train_s")
        gammas = sorted({r["gamma"] for r in first if r["method"] == m})
        st = sorted({r["steps"] for r in first if r["method"] == m})
        lines.append(
            f"| {LABELS[m]} | {rss / 2**30:.2f} | {rss / lr_rss:.2f} | {secs:.0f} | "
            f"{secs / lr_s:.2f} | {loss:.3f} | {'/'.join(map(str, gammas))} | "
            f"{st[0] if len(st) == 1 else f'{st[0]}-{st[-1]}'} |"
            if lr_rss and lr_s
            else f"| {LABELS[m]} | {rss / 2**30:.2f} | - | {secs:.0f} | - | "
            f"{loss:.3f} | {'/'.join(map(str, gammas))} | - |"
        )
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- diagnostics


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation: 1 when both order the blocks alike."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def steps_trained(run_dir: Path) -> tuple[list[int], list[float]]:
    """Per block, the optimizer steps it was trained in, and the importance (MGN) the
    sampler held for it at the last step; from the run's metrics.jsonl."""
    counts: list[int] = []
    importance: list[float] = []
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as f:
        for line in f:
            e = json.loads(line)
            if e.get("event") != "step" or "active" not in e:
                continue
            if not counts:
                counts = [0] * len(e["importance"])
            for b in e["active"]:
                counts[b] += 1
            importance = e["importance"]
    return counts, importance


def diagnose(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task (seed 0): how evenly GRASS trained its blocks (the spread of the
    per-block step counts, as a share of the steps), how far each method moved the
    blocks (the mean relative distance, and GRASS's over LoRA's), and whether GRASS's
    importance ranks the blocks as LoRA's own updates do (Spearman's rank
    correlation of GRASS's last MGN with LoRA's per-block move)."""
    out: dict[str, dict[str, Any]] = {}
    for task in TASKS:
        by = {r["method"]: r for r in rows if r["task"] == task and r["seed"] == 0}
        if "grass" not in by:
            continue
        d: dict[str, Any] = {}
        counts, importance = steps_trained(Path(by["grass"]["run_dir"]))
        if counts:
            steps = by["grass"]["steps"]
            d["grass_share_min"] = min(counts) / steps
            d["grass_share_max"] = max(counts) / steps
            d["grass_share_cv"] = statistics.pstdev(counts) / statistics.mean(counts)
        for m, r in by.items():
            moves = r.get("moves") or {}
            blocks = [v for k, v in moves.items() if k.startswith("block.")]
            if blocks:
                d[f"move_{m}"] = statistics.mean(blocks)
        if d.get("move_lora"):
            for m in ("grass", "grass-auto", "full", "lisa"):
                if f"move_{m}" in d:
                    d[f"move_{m}_over_lora"] = d[f"move_{m}"] / d["move_lora"]
        lora_moves = (by.get("lora") or {}).get("moves") or {}
        lora_blocks = [lora_moves.get(f"block.{i}") for i in range(len(importance))]
        if importance and all(v is not None for v in lora_blocks):
            d["mgn_vs_lora_spearman"] = spearman(importance, lora_blocks)
        out[task] = d
    return out


def diagnose_table(steps: int, diag: dict[str, dict[str, Any]]) -> str:
    cols = [
        ("grass_share_min", "GRASS: fewest steps a block trained (share)", "{:.3f}"),
        ("grass_share_max", "most", "{:.3f}"),
        ("grass_share_cv", "spread (cv)", "{:.2f}"),
        ("move_lora", "LoRA: mean block move", "{:.4f}"),
        ("move_grass_over_lora", "GRASS / LoRA move", "{:.2f}"),
        ("move_grass-auto_over_lora", "GRASS auto / LoRA", "{:.2f}"),
        ("move_full_over_lora", "full / LoRA", "{:.2f}"),
        ("mgn_vs_lora_spearman", "MGN rank vs LoRA's move (Spearman)", "{:+.2f}"),
    ]
    lines = [
        f"# Suite diagnostics, {steps} steps x batch 8 (seed 0)",
        "",
        "Move: ||W - W0|| / ||W0|| of a block's weights after training, averaged over the "
        "blocks (LoRA's adapters merged). A block's share: the steps it was trained in, "
        "over all steps (gamma 4 of 30 gives 0.133 on average).",
        "",
        "| task | " + " | ".join(c[1] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for task, d in diag.items():
        cells = " | ".join(f.format(d[k]) if k in d else "-" for k, _, f in cols)
        lines.append(f"| {task} | {cells} |")
    return "\n".join(lines) + "\n"


def plan(work: Path, steps: int, tasks: list[str], methods: list[str], results: Path) -> str:
    """What is done and a rough time for the rest: each method's tuning (its lr, or
    the grid values trained so far), then this budget's cells. A cell counts as done
    only at its method's chosen lr (a tuning run at another lr is not the suite's)."""
    path = results / "suite-lr.json"
    chosen = json.loads(path.read_text())["chosen"] if path.exists() else {}
    lines, secs, todo, done = [], [], 0, 0
    for method in methods:
        runs = [work.glob(f"{t}/{method}/lr*-seed0-steps{TUNE_STEPS}-*/result.json")
                for t in TUNE_TASKS]  # fmt: skip
        per_task = [{re.sub(r"^lr(.+?)-seed0-.*$", r"\1", r.parent.name) for r in g} for g in runs]
        tried = sorted(set.intersection(*per_task), key=float)  # (on every tuning task)
        state = f"lr {chosen[method]:g}" if method in chosen else "not tuned yet"
        lines.append(f"tuning {method}: {state} ({len(tried)} lrs trained: {', '.join(tried)})")
    for task in tasks:
        for method in methods:
            lr = chosen.get(method)
            found = (
                lr is not None
                and (
                    (d := compare.run_dir_for(work, task, method, lr, 0, mode(task, steps, 0)))
                    / "result.json"
                ).exists()
            )
            if found:
                done += 1
                secs.append(json.loads((d / "result.json").read_text())["wall_s"])
            else:
                todo += 1
    per = statistics.mean(secs) if secs else 666.0  # (a quiet 300-step run here)
    lines.append(
        f"{steps} steps: {done} cells done, {todo} to go (seed 0), about "
        f"{todo * per * steps / 300 / 3600:.1f} h at {per * steps / 300:.0f} s a run "
        "(extra seeds and held-out scoring not counted)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("tune", "run", "table", "diagnose", "plan"))
    ap.add_argument("--steps", type=int, default=300, help="the budget, x batch 8")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--no-extra-seeds", action="store_true", help="seed 0 only")
    ap.add_argument("--work", type=Path, default=ROOT / "runs/suite")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    ensure_data(sorted(set(args.tasks) | set(TUNE_TASKS)))
    register(list(TASKS))
    if args.command == "tune":
        tune(args.work, args.methods, args.results)
    elif args.command == "run":
        run(args.work, args.steps, args.tasks, args.methods, not args.no_extra_seeds, args.results)
    elif args.command == "table":
        path = args.results / f"suite-{args.steps}.json"
        data = json.loads(path.read_text())
        write_atomic_text(path.with_suffix(".md"), table(data["steps"], data["lrs"], data["rows"]))
        print(path.with_suffix(".md").read_text())
    elif args.command == "diagnose":
        data = json.loads((args.results / f"suite-{args.steps}.json").read_text())
        diag = diagnose(data["rows"])
        out = args.results / f"suite-diag-{args.steps}"
        write_atomic_text(out.with_suffix(".json"), json.dumps(diag, indent=1))
        write_atomic_text(out.with_suffix(".md"), diagnose_table(args.steps, diag))
        print(out.with_suffix(".md").read_text())
    else:
        print(plan(args.work, args.steps, args.tasks, args.methods, args.results))


if __name__ == "__main__":
    main()
