"""Side by side: full fine-tuning, LoRA, LISA, GRASS, GRASS-static and cyclic.

    python benchmarks/compare.py --quick      # reduced: under 30 minutes on a 2-core CPU
    python benchmarks/compare.py              # full: lr tuned on validation, 3 seeds
    python benchmarks/compare.py --gpu        # CUDA: bf16, larger batch and sequence

Every method trains SmolLM2-135M-Instruct from its recipe in recipes/bench/ on the
same task data, steps, batch (so the same token budget), schedule and seeds; only
what is trained differs. For each task and method:

1. Learning rate: one run per value of the method's grid (its recipe lr times
   1, 2 and 4 in the full CPU mode, 0.5, 1 and 2 with --gpu; only the recipe lr
   in --quick) with the first seed; the value with the lowest loss on the
   *validation* split (eval.jsonl) wins. The held-out split is not looked at.
   The full CPU mode tunes on one task (reversal, where the methods differ most)
   and uses that lr for both, which keeps it to about 2.5 hours on a 2-core CPU;
   --gpu tunes on each task. GRASS-static and cyclic are ablations of GRASS's
   sampler, so they take GRASS's lr: only the sampler differs between the three.
2. Seeds: the chosen lr trains with every seed (a tuning run at that lr is reused
   as the first seed's run).
3. Held-out accuracy: `grass eval RUN_DIR --data test.jsonl --kind generate`
   (greedy, the task's scorer) on the first --test-limit items of the test split.

Each training runs in its own child process, so peak RSS is that run's own
high-water mark, read at its last training step (model load, the first validation
pass, at the training micro-batch so that it stays below the training steps' peak,
probing and training; the final evaluation and model save come after and are
the same for every method, so the whole run's peak is kept in the JSON only; CUDA
peak, with --gpu, is also over the training steps). Per method the table gives
accuracy (mean and spread over seeds), final validation loss, that peak, optimizer
state on the device, tokens/s, wall time, and ratios against LISA and full FT. Runs
already done in --work with the same recipe and overrides are reused, so an
interrupted benchmark continues where it stopped (a run redone over one made with
other settings keeps its held-out score only if its training losses are bitwise the
same); results and plots go to benchmarks/results/ and docs/img/.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # runstats, also when loaded by the tests
import runstats  # noqa: E402  (light: grass_cli is imported inside train_child)

from grass_cli.atomic import write_atomic_text  # noqa: E402  (light: no torch)

METHODS = ("full", "lora", "lisa", "grass", "grass-static", "cyclic")
LABELS = {
    "full": "full FT",
    "lora": "LoRA",
    "lisa": "LISA",
    "grass": "GRASS",
    "grass-static": "GRASS-static",
    "cyclic": "cyclic",
}
# Ablations of GRASS's sampler use GRASS's tuned lr, so only the sampler differs.
LR_FROM = {"grass-static": "grass", "cyclic": "grass"}


@dataclass(frozen=True)
class Task:
    data: str  # folder with train.jsonl, eval.jsonl (validation), test.jsonl (held out)
    kind: str
    scorer: str
    max_new_tokens: int


# Two reasoning-gym tasks of different kinds, generated with fixed seeds by
# scripts/make_data.py (train, validation and test from seeds a million apart,
# cross-split duplicates removed).
TASKS = {
    "family": Task("data/family", "relational reasoning", "exact", 8),
    "reversal": Task("data/reversal", "string manipulation", "exact", 32),
}


@dataclass(frozen=True)
class Mode:
    steps: int
    micro_batch: int
    seeds: tuple[int, ...]
    lr_grid: tuple[float, ...]  # multipliers of each recipe's lr
    val_limit: int
    test_limit: int
    max_length: int = 96
    cuda: bool = False  # train and evaluate on CUDA; memory is the CUDA peak
    tune_task: str | None = None  # tune each method's lr on this task only (None: each task)
    overrides: tuple[str, ...] = ()
    extra_by_method: dict[str, tuple[str, ...]] = field(default_factory=dict)


MODES = {
    "quick": Mode(
        steps=30, micro_batch=4, seeds=(0,), lr_grid=(1.0,), val_limit=50, test_limit=100
    ),
    # sized to finish in about 2.5 hours on a 2-core CPU: 44 trainings, 36 evaluations.
    # At 60 steps every method's best lr sat at 2x its recipe lr (a x0.5-2 grid put
    # all four at the top edge), so the grid reaches up to 4x; LoRA and LISA now pick
    # inside it, full FT and GRASS still at 4x (see docs/benchmarks.md).
    "full": Mode(
        steps=60,
        micro_batch=4,
        seeds=(0, 1, 2),
        lr_grid=(1.0, 2.0, 4.0),
        val_limit=100,
        test_limit=200,
        tune_task="reversal",
    ),
    "gpu": Mode(
        steps=300,
        micro_batch=32,
        seeds=(0, 1, 2),
        lr_grid=(0.5, 1.0, 2.0),
        val_limit=300,
        test_limit=300,
        max_length=256,
        cuda=True,
        overrides=("training.autocast=bf16",),
        # on a GPU the device is GPU memory: offload to host memory, not disk
        extra_by_method={
            m: ("optimizer.offload.target=cpu",) for m in ("grass", "grass-static", "cyclic")
        },
    ),
}


# ----------------------------------------------------------------------- one run


def child(recipe_path: str, overrides: list[str]) -> None:
    """Train once in this process; print one JSON line of what the parent needs."""
    sys.path.insert(0, str(ROOT))
    events, steps = runstats.train_child(Path(recipe_path), overrides)
    end = next(e for e in events if e["event"] == "end")
    print(
        json.dumps(
            {
                **runstats.common_stats(steps),
                "cuda_peak": max((e.get("cuda_peak") or 0) for e in steps),
                "train_peak_rss": runstats.training_peak_rss(steps),
                "state_bytes_device": max(
                    e["optimizer_state_bytes"] + e.get("master_weight_bytes", 0) for e in steps
                ),
                "trainable_params": max(e["trainable_params"] for e in steps),
                "train_s": sum(e["step_time"] for e in steps),
                "wall_s": end["elapsed_s"],
                "first_eval_loss": end["first_eval_loss"],
                "val_loss": end["final_eval_loss"],
                "losses": [e["loss"] for e in steps],
            }
        )
    )


def run_dir_for(work: Path, task: str, method: str, lr: float, seed: int, mode: Mode) -> Path:
    """Named by everything that shapes the run, so a reused folder is the same run."""
    shape = f"steps{mode.steps}-b{mode.micro_batch}-len{mode.max_length}"
    return work / task / method / f"lr{lr:.2e}-seed{seed}-{shape}"


def run_key(
    work: Path, task: str, method: str, lr: float, seed: int, mode: Mode
) -> tuple[Path, Path, list[str], dict[str, Any]]:
    """A run's folder, recipe, overrides and key (the recipe's hash and the overrides:
    what result.json must carry for the run to be reused)."""
    out = run_dir_for(work, task, method, lr, seed, mode)
    t = TASKS[task]
    recipe = ROOT / f"recipes/bench/{method}.yaml"
    overrides = [
        f"data.train={t.data}/train.jsonl",
        f"data.eval={t.data}/eval.jsonl",
        f"data.eval_limit={mode.val_limit}",
        # validate at the training micro-batch: a wider validation batch would set the
        # process's RSS high-water mark before step 1 and hide the smaller methods'
        # training peaks under it
        f"training.eval_batch_size={mode.micro_batch}",
        f"data.max_length={mode.max_length}",
        f"training.max_steps={mode.steps}",
        f"training.micro_batch_size={mode.micro_batch}",
        f"training.seed={seed}",
        f"optimizer.lr={lr}",
        "checkpoint.at_end=false",
        "output.save_model=true",
        f"output.dir={out}",
        *(["training.device=cuda"] if mode.cuda else []),
        *mode.overrides,
        *mode.extra_by_method.get(method, ()),
    ]
    return out, recipe, overrides, _key(recipe, overrides)


# Overrides that change where a run is written and what it keeps, not what it trains.
PLACE = ("output.dir=", "output.save_model=")


def _key(recipe: Path, overrides: list[str]) -> dict[str, str]:
    """What a run's result.json must carry for the run to be reused: hashes of the
    recipe as the run reads it (the YAML parsed, the overrides applied), so editing a
    comment, or a value every run overrides (the lr), keeps the cached runs.
    `training`: the same without the overrides in PLACE, equal for two runs that
    trained the same model in different folders."""
    from grass_cli.recipe.loading import apply_overrides, load_yaml

    read = load_yaml(recipe)

    def sha(kept: list[str]) -> str:
        data = copy.deepcopy(read)
        apply_overrides(data, kept)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    return {
        "effective_sha256": sha(overrides),
        "training_sha256": sha([o for o in overrides if not o.startswith(PLACE)]),
    }


def stored_key(result: dict[str, Any], recipe: Path) -> dict[str, Any]:
    """A result's key, as `_key` makes it: a key of the older form (the recipe file's
    bytes hashed, the overrides listed) is read as the recipe it names, while that
    file is unchanged; after a change it matches nothing, as before."""
    key = result.get("key") or {}
    if "recipe_sha256" not in key:
        return key
    if key["recipe_sha256"] != hashlib.sha256(recipe.read_bytes()).hexdigest():
        return {}
    return _key(recipe, key["overrides"])


def result_in(
    work: Path, task: str, method: str, lr: float, seed: int, mode: Mode
) -> dict[str, Any] | None:
    """The result.json of the run that `work` holds for these settings, if finished."""
    done = run_dir_for(work, task, method, lr, seed, mode) / "result.json"
    return json.loads(done.read_text()) if done.exists() else None


def same_training(
    result: dict[str, Any] | None,
    work: Path, task: str, method: str, lr: float, seed: int, mode: Mode,
) -> dict[str, Any] | None:  # fmt: skip
    """`result`, a run written elsewhere (another folder, its model kept or not), if it
    trained the model that this run in `work` would train: read instead of trained."""
    if result is None:
        return None
    _, recipe, _, want = run_key(work, task, method, lr, seed, mode)
    have = stored_key(result, recipe).get("training_sha256")
    return result if have is not None and have == want["training_sha256"] else None


def train_one(
    work: Path, task: str, method: str, lr: float, seed: int, mode: Mode, log
) -> dict[str, Any]:
    """One training run, reused when its result.json was made with the same recipe and
    overrides (the recipe as read: comments and overridden values aside, `_key`). A
    run redone over an older one keeps the older held-out score only if every
    training loss is bitwise the same: then it trained the same model."""
    out, recipe, overrides, key = run_key(work, task, method, lr, seed, mode)
    done = out / "result.json"
    before = json.loads(done.read_text()) if done.exists() else None
    if before is not None and stored_key(before, recipe) == key:
        if before.get("key") != key:  # the older form: written again in this one
            before["key"] = key
            write_atomic_text(done, json.dumps(before))
        return before
    log(f"train {task:<9} {method:<12} lr={lr:.2e} seed={seed}")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(recipe), *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        sys.exit(f"{task}/{method} lr={lr} seed={seed} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(task=task, method=method, lr=lr, seed=seed, run_dir=str(out))
    log(
        f"      val loss {result['val_loss']:.4f}, {result['tokens_per_s']:.0f} tok/s, "
        f"peak RSS {result['train_peak_rss'] / 2**30:.2f} GiB in training, "
        f"{result['peak_rss'] / 2**30:.2f} GiB in all ({time.perf_counter() - t0:.0f} s)"
    )
    if before is not None and before.get("losses") != result["losses"]:
        for stale in out.glob("held*out-*"):  # scores of the model this run replaced
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
    result["key"] = key
    write_atomic_text(done, json.dumps(result))
    return result


def _recipe(method: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ROOT / f"recipes/bench/{method}.yaml").read_text())


def _held_out_file(out: Path, mode: Mode) -> Path:
    return out / f"held_out-{mode.test_limit}.json"


def _held_out_eval(model: str, task: str, mode: Mode, out: Path, log) -> dict[str, Any]:
    """`grass eval MODEL` on the first test_limit held-out items of `task`, greedy;
    the result is kept in OUT and reused."""
    done = _held_out_file(out, mode)
    if done.exists():
        return json.loads(done.read_text())
    t = TASKS[task]
    cmd = [
        sys.executable, "-m", "grass_cli", "eval", model,
        "--data", f"{t.data}/test.jsonl", "--kind", "generate", "--scorer", t.scorer,
        "--max-new-tokens", str(t.max_new_tokens), "--limit", str(mode.test_limit),
        "--batch-size", "16", "--json", "--out", str(out / f"held-out-{mode.test_limit}"),
    ]  # fmt: skip
    if mode.cuda:
        cmd += ["--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"grass eval of {model} on {task} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout)
    log(f"      held-out accuracy {res['accuracy']:.3f} ({res['correct']}/{res['scored']})")
    done.write_text(json.dumps(res))
    return res


def held_out(result: dict[str, Any], mode: Mode, log) -> dict[str, Any]:
    """Accuracy of a trained run on the test split, through `grass eval`."""
    out = Path(result["run_dir"])
    res = _held_out_eval(str(out), result["task"], mode, out, log)
    # the model has served its purpose: keep the run's metrics, free the disk
    shutil.rmtree(out / "final", ignore_errors=True)
    return res


def base_accuracy(work: Path, task: str, mode: Mode, log) -> dict[str, Any]:
    """The untrained model on the same held-out items: what training has to beat."""
    model = _recipe("full")["model"]["path"]
    out = work / task / "base"
    if not _held_out_file(out, mode).exists():
        log(f"eval  {task:<9} base model ({model})")
    return _held_out_eval(model, task, mode, out, log)


class LrTuner:
    """Picks each method's lr on validation loss, once per (task, method).

    `lr_for(task, method)` answers from the mode's tuning task (or `task` itself),
    and for the ablations in LR_FROM from GRASS's tuning, so every run it asks for
    was either a tuning run (reused) or is a new seed at the chosen lr.
    """

    def __init__(self, work: Path, mode: Mode, log, train=None) -> None:
        self.work, self.mode, self.log = work, mode, log
        self.train = train or train_one
        self.best: dict[tuple[str, str], float] = {}
        self.tuning: dict[str, dict[str, dict[float, float]]] = {}  # task -> method -> lr -> loss

    def grid(self, method: str) -> list[float]:
        return [_recipe(method)["optimizer"]["lr"] * m for m in self.mode.lr_grid]

    def lr_for(self, task: str, method: str) -> float:
        return self.tune(self.mode.tune_task or task, LR_FROM.get(method, method))

    def tune(self, task: str, method: str) -> float:
        """The grid's lr with the lowest validation loss on `task` (first seed)."""
        if (task, method) in self.best:
            return self.best[task, method]
        first, grid = self.mode.seeds[0], self.grid(method)
        tried = {
            lr: self.train(self.work, task, method, lr, first, self.mode, self.log) for lr in grid
        }
        best = min(grid, key=lambda lr: (tried[lr]["val_loss"], lr))
        self.tuning.setdefault(task, {})[method] = {lr: r["val_loss"] for lr, r in tried.items()}
        if len(grid) > 1:
            self.log(f"      {task}/{method}: lr {best:.2e} chosen on validation loss")
        for lr in grid:  # models of the lrs not chosen are not needed
            if lr != best:
                run = run_dir_for(self.work, task, method, lr, first, self.mode)
                shutil.rmtree(run / "final", ignore_errors=True)
        self.best[task, method] = best
        return best


# ---------------------------------------------------------------------- the table


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(rows: list[dict[str, Any]], use_cuda: bool) -> dict[str, dict[str, Any]]:
    """Per method: accuracy per task (mean, sd over seeds) and the cost figures."""
    out: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        per_task = {}
        for task in TASKS:
            accs = [r["accuracy"] for r in mine if r["task"] == task]
            if accs:
                per_task[task] = mean_sd([100 * a for a in accs])
        seeds_mean = [
            statistics.mean(100 * r["accuracy"] for r in mine if r["seed"] == s)
            for s in sorted({r["seed"] for r in mine})
        ]
        out[method] = {
            "accuracy": per_task,
            "mean_accuracy": mean_sd(seeds_mean),
            "val_loss": statistics.mean(r["val_loss"] for r in mine),
            "memory": statistics.mean(
                r["cuda_peak" if use_cuda else "train_peak_rss"] for r in mine
            ),
            "run_peak_rss": statistics.mean(r["peak_rss"] for r in mine),
            "state_bytes_device": statistics.mean(r["state_bytes_device"] for r in mine),
            "trainable_params": statistics.mean(r["trainable_params"] for r in mine),
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in mine),
            "wall_s": statistics.mean(r["wall_s"] for r in mine),
            "tokens": statistics.mean(r["tokens"] for r in mine),
            "lr": {t: r["lr"] for t in TASKS for r in mine if r["task"] == t},
            "runs": len(mine),
        }
    return out


def table(
    agg: dict[str, dict[str, Any]], use_cuda: bool, base: dict[str, float] | None = None
) -> str:
    """The Markdown table; `base` (task -> accuracy 0..1) adds the untrained model's row."""
    mem = "CUDA peak (GiB)" if use_cuda else "peak RSS in training (GiB)"
    head = (
        ["method", "trained params (M)"]
        + [f"{t} acc. %" for t in TASKS]
        + ["mean acc. %", "vs LISA (pts)", "vs full (pts)", "val. loss", mem, "x LISA", "x full"]
        + ["opt. state on device (MiB)", "tokens/s", "x LISA", "x full", "wall (s)", "lr"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lisa, full = agg.get("lisa"), agg.get("full")

    def ratio(a: float, b: dict | None, key: str) -> str:
        return f"{a / b[key]:.2f}" if b else "-"

    for method, a in agg.items():
        acc = a["mean_accuracy"][0]
        cells = [LABELS[method], f"{a['trainable_params'] / 1e6:.1f}"]
        cells += [
            f"{a['accuracy'][t][0]:.1f} ± {a['accuracy'][t][1]:.1f}" if t in a["accuracy"] else "-"
            for t in TASKS
        ]
        cells += [
            f"{acc:.1f} ± {a['mean_accuracy'][1]:.1f}",
            f"{acc - lisa['mean_accuracy'][0]:+.1f}" if lisa else "-",
            f"{acc - full['mean_accuracy'][0]:+.1f}" if full else "-",
            f"{a['val_loss']:.4f}",
            f"{a['memory'] / 2**30:.2f}",
            ratio(a["memory"], lisa, "memory"),
            ratio(a["memory"], full, "memory"),
            f"{a['state_bytes_device'] / 2**20:.0f}",
            f"{a['tokens_per_s']:.0f}",
            ratio(a["tokens_per_s"], lisa, "tokens_per_s"),
            ratio(a["tokens_per_s"], full, "tokens_per_s"),
            f"{a['wall_s']:.0f}",
            ", ".join(f"{lr:.0e}" for lr in a["lr"].values()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if base:
        accs = [100 * base[t] if t in base else None for t in TASKS]
        known = [a for a in accs if a is not None]
        acc = statistics.mean(known)
        cells = ["base model (no training)", "0.0"]
        cells += [f"{a:.1f}" if a is not None else "-" for a in accs]
        cells += [
            f"{acc:.1f}",
            f"{acc - lisa['mean_accuracy'][0]:+.1f}" if lisa else "-",
            f"{acc - full['mean_accuracy'][0]:+.1f}" if full else "-",
        ]
        cells += ["-"] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_table(tuning: dict[str, dict[str, dict[float, float]]]) -> str:
    """Validation loss of every lr tried, the chosen one in bold; a choice at the edge
    of the grid is flagged, since a wider grid might have done better."""
    if not any(len(by_lr) > 1 for per in tuning.values() for by_lr in per.values()):
        return ""
    lines = ["| task | method | validation loss by lr | chosen |", "|---|---|---|---|"]
    for task, per in tuning.items():
        for method, by_lr in per.items():
            best = min(by_lr, key=lambda lr: (by_lr[lr], lr))
            cells = [
                f"**{lr:.1e}: {loss:.4f}**" if lr == best else f"{lr:.1e}: {loss:.4f}"
                for lr, loss in sorted(by_lr.items())
            ]
            edge = " (edge of the grid)" if best in (min(by_lr), max(by_lr)) else ""
            lines.append(f"| {task} | {LABELS[method]} | {', '.join(cells)} | {best:.1e}{edge} |")
    return "\n".join(lines)


def goals(agg: dict[str, dict[str, Any]]) -> list[str]:
    """The project's goal, judged by the numbers (GRASS vs LISA, LoRA and full)."""
    g = agg.get("grass")
    if g is None:
        return []
    acc = g["mean_accuracy"][0]
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- [{'x' if ok else ' '}] {text}")

    for other, name in (("lisa", "LISA"), ("lora", "LoRA")):
        if other in agg:
            o = agg[other]["mean_accuracy"][0]
            check(acc >= o, f"GRASS at least as accurate as {name}: {acc:.1f} vs {o:.1f}")
    if "full" in agg:
        f = agg["full"]["mean_accuracy"][0]
        check(acc >= f - 1.0, f"GRASS within 1 point of full FT: {acc:.1f} vs {f:.1f}")
    if "lisa" in agg:
        m = g["memory"] / agg["lisa"]["memory"]
        check(m <= 0.80, f"GRASS peak memory at most 0.80x LISA-keep: {m:.2f}x")
        t = g["tokens_per_s"] / agg["lisa"]["tokens_per_s"]
        check(t >= 0.90, f"GRASS throughput at least 0.90x LISA: {t:.2f}x")
    return out


def plots(
    rows: list[dict[str, Any]],
    agg: dict,
    use_cuda: bool,
    stem: Path,
    base: dict[str, float] | None = None,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(METHODS, plt.get_cmap("tab10").colors, strict=False))
    paths = []
    # accuracy vs memory, one panel per task
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5.5 * len(TASKS), 4.2), squeeze=False)
    for ax, task in zip(axes[0], TASKS, strict=True):
        for method, a in agg.items():
            if task not in a["accuracy"]:
                continue
            m, sd = a["accuracy"][task]
            ax.errorbar(
                a["memory"] / 2**30, m, yerr=sd, fmt="o", color=colors[method],
                label=LABELS[method], capsize=3, markersize=7,
            )  # fmt: skip
        if base and task in base:
            ax.axhline(100 * base[task], color="gray", ls="--", lw=1, label="base model")
        ax.set_xlabel(("CUDA peak" if use_cuda else "peak RSS in training") + " (GiB)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_title(f"{task} ({TASKS[task].kind})")
        ax.grid(alpha=0.3)
    _legend(axes[0])
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "-accuracy-memory.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # training loss curves, mean over seeds at the chosen lr
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5.5 * len(TASKS), 4.2), squeeze=False)
    for ax, task in zip(axes[0], TASKS, strict=True):
        for method in agg:
            curves = [r["losses"] for r in rows if r["method"] == method and r["task"] == task]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
            k = max(1, n // 30)  # light smoothing: running mean over k steps
            smooth = [statistics.mean(mean[max(0, i - k + 1) : i + 1]) for i in range(n)]
            ax.plot(range(1, n + 1), smooth, color=colors[method], label=LABELS[method])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    _legend(axes[0])
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "-loss.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _legend(axes) -> None:
    """One legend, on the first panel that has something to label."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
            return


def machine(use_cuda: bool) -> str:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name()}" if use_cuda else ", no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM{gpu}; Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}"
    )


# ----------------------------------------------------------------------------- main


def describe(mode: Mode) -> str:
    """The mode's settings in one line, for the results Markdown and JSON."""
    lr = (
        f"lr grid x{list(mode.lr_grid)} of each recipe's lr (tuned on "
        f"{mode.tune_task or 'each task'}'s validation loss; GRASS-static and cyclic use "
        "GRASS's)"
        if len(mode.lr_grid) > 1
        else "each recipe's lr (no tuning)"
    )
    return (
        f"{mode.steps} steps x batch {mode.micro_batch} (max_length {mode.max_length}), "
        f"seeds {list(mode.seeds)}, {lr}, validation: first {mode.val_limit} rows of "
        f"eval.jsonl, held out: first {mode.test_limit} rows of test.jsonl"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced: 1 seed, no lr grid, 30 steps")
    ap.add_argument("--gpu", action="store_true", help="CUDA variant: bf16, batch 32, seq 256")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--work", type=Path, help="run folder (default runs/compare-MODE)")
    ap.add_argument("--steps", type=int, help="override the mode's steps (smoke tests)")
    ap.add_argument("--test-limit", type=int, help="override the mode's held-out items")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1:])
        return
    if args.quick and args.gpu:
        ap.error("--quick and --gpu are separate modes; pick one")
    name = "quick" if args.quick else "gpu" if args.gpu else "full"
    mode = MODES[name]
    if args.steps or args.test_limit:
        from dataclasses import replace

        mode = replace(
            mode, steps=args.steps or mode.steps, test_limit=args.test_limit or mode.test_limit
        )
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device; this machine has none")
    work = args.work or ROOT / f"runs/compare-{name}"
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "log.txt", "a", encoding="utf-8")  # noqa: SIM115

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    t_start = time.perf_counter()
    chosen: list[dict[str, Any]] = []
    tuner = LrTuner(work, mode, log)
    for task in args.tasks:
        for method in args.methods:
            lr = tuner.lr_for(task, method)
            for seed in mode.seeds:
                r = train_one(work, task, method, lr, seed, mode, log)
                chosen.append({**r, **held_out(r, mode, log)})
    tuning = tuner.tuning
    base = {t: base_accuracy(work, t, mode, log)["accuracy"] for t in args.tasks}

    use_cuda = mode.cuda
    agg = aggregate(chosen, use_cuda)
    text = table(agg, use_cuda, base)
    checks = goals(agg)
    cmd = shlex.join(["python", "benchmarks/compare.py", *sys.argv[1:]])
    desc = machine(use_cuda)
    elapsed = time.perf_counter() - t_start
    # a partial or overridden run must not overwrite the mode's published results
    subset = set(args.methods) != set(METHODS) or set(args.tasks) != set(TASKS)
    if subset or args.steps or args.test_limit:
        name += "-partial"
    stem = ROOT / f"docs/img/compare-{name}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    images = plots(chosen, agg, use_cuda, stem, base)
    settings = describe(mode)
    tuned = tuning_table(tuning)
    md = (
        f"{text}\n\n{chr(10).join(checks)}\n\ncommand: `{cmd}`\n\nsettings: {settings}\n\n"
        + (f"lr tuning:\n\n{tuned}\n\n" if tuned else "")
        + f"machine: {desc}\n\nbenchmark wall time: {elapsed / 60:.1f} min (runs reused from "
        f"{work} not counted)\n"
    )
    results = ROOT / "benchmarks/results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"compare-{name}.md").write_text(md)
    (results / f"compare-{name}.json").write_text(
        json.dumps(
            {
                "command": cmd,
                "machine": desc,
                "settings": settings,
                "aggregate": agg,
                "tuning": tuning,
                "base_accuracy": base,
                "runs": [{k: v for k, v in r.items() if k != "losses"} for r in chosen],
            },
            indent=1,
        )
    )
    print()
    print(md)
    print("plots: " + ", ".join(str(p.relative_to(ROOT)) for p in images))


if __name__ == "__main__":
    main()
