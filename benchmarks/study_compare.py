"""Stage 3 of the GRASS study (issue 18): GRASS against the methods a user would pick
instead, at equal steps, equal wall-clock and equal peak memory.

    python benchmarks/study.py compare --grass sampler.gamma=8 sampler.tau=1.0
    python benchmarks/study.py compare --only lr steps    # some comparisons only
    python benchmarks/study.py compare --only lr --methods lora full   # some methods only

Budget: the screen's (150 steps x batch 8, max_length 96), seeds 0, 1, 2, both tasks;
validation on the first 100 rows of eval.jsonl, held-out accuracy on the first 200
of test.jsonl through `grass eval` (greedy, the task's scorer). `--grass` is the
configuration stages 1 and 2 chose, applied to GRASS and GRASS-static alike, so that
the two differ only in whether the importance is refreshed.

1. `lr`: every method's lr on reversal's validation loss (seed 0), over a x2 grid
   around START_LR (the full comparison's choices), extended until the chosen
   value is interior; GRASS-static takes GRASS's lr.
2. `steps` (equal steps): every method, task and seed at the tuned lr.
3. `memory` (equal peak memory): LoRA's training peak on a task (mean over its
   seeds) is the budget; the largest gamma whose short probe run (PROBE_STEPS
   steps: probing and two switches) stays within it, found by bisection, trains on
   every seed. A probe can stop short of a full run's peak: the shortfall of the
   base gamma's probe against the base's full runs (equal steps) is taken off the
   budget. The probe of the chosen gamma is set beside that gamma's full runs, so
   the probe's fidelity is in the results. GRASS's lr is tuned again at the tuning
   task's chosen gamma (its validation loss, seed 0, a grid from a quarter of stage
   1's lr) and used at every task's gamma: an lr right for a few blocks at once is
   too high for most of them.
4. `time` (equal wall-clock): GRASS's training seconds on a task (mean over its
   seeds at equal steps) is the budget; every other method trains for as many
   steps as fit in it at its own seconds per step (mean over its equal-steps runs)
   at its tuned lr. Seconds are only comparable when nothing else runs on the
   machine: run the study alone.

Runs live in --work (default runs/study-compare) and are reused when their recipe and
overrides are unchanged (compare.train_one); results are saved after every run to
benchmarks/results/study-compare.{json,md}, and a later command continues from that file
even where the run folders are gone (a fresh machine): finished rows are kept, and an
unfinished lr grid's runs are read back when they trained the same model.
Nothing is chosen on the held-out split.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import compare

METHODS = ("full", "lora", "lisa", "grass-static", "grass")
# live tensor bytes of the study's configuration (benchmarks/memory.py --model study)
TENSOR_PEAKS = Path(__file__).resolve().parent / "results/memory-study.json"
MODE = compare.Mode(
    steps=150,
    micro_batch=8,
    seeds=(0, 1, 2),
    lr_grid=(1.0,),
    val_limit=100,
    test_limit=200,
    tune_task="reversal",
)
# centres of the lr grids: what the full comparison (60 steps x batch 4) chose
START_LR = {"full": 2e-4, "lora": 2e-3, "lisa": 4e-4, "grass": 8e-4}
PROBE_STEPS = 30
BLOCKS = 30  # SmolLM2-135M's decoder layers: the most gamma can be
STAGES = ("lr", "steps", "memory", "time")


def extend_grid(train: Callable[[float], dict], start: float, max_extend: int = 3) -> dict:
    """x2 grid around `start`, extended on the side of its best value until that value
    is interior (a best value at the edge of a grid is no optimum): lr -> result."""
    rows = {lr: train(lr) for lr in (start / 2, start, start * 2)}
    for _ in range(max_extend):
        best = min(rows, key=lambda lr: rows[lr]["val_loss"])
        lo, hi = min(rows), max(rows)
        if best not in (lo, hi):
            break
        nxt = lo / 2 if best == lo else hi * 2
        if nxt > 1e-2:  # beyond any sane AdamW lr for fine-tuning
            break
        rows[nxt] = train(nxt)
    return dict(sorted(rows.items()))


class Study:
    """The comparison's state: every result so far, saved after every run."""

    def __init__(
        self,
        work: Path,
        grass: tuple[str, ...],
        log: Callable[[str], None],
        save: Callable[[dict], None] = lambda res: None,
        train: Callable[..., dict] | None = None,
        held_out: Callable[..., dict] | None = None,
        mode: compare.Mode = MODE,
        grass_lr: float | None = None,
        methods: tuple[str, ...] = METHODS,
        prior: Callable[..., dict | None] | None = None,
        earlier: dict[str, Any] | None = None,
        only: tuple[str, ...] = STAGES,
    ) -> None:
        self.work, self.log, self._save = work, log, save
        # where an equal earlier run may be (the screen's): (task, method, lr, seed, mode)
        self.prior = prior or (lambda *a: None)
        self.methods = methods
        self.train = train or compare.train_one
        self.held = held_out or compare.held_out
        self.mode = dataclasses.replace(
            mode, extra_by_method={"grass": grass, "grass-static": grass}
        )
        self.start = {**START_LR, **({"grass": grass_lr} if grass_lr else {})}
        self.res: dict[str, Any] = {"grass_overrides": list(grass), "lr": {}, "chosen_lr": {}}
        if earlier and earlier.get("grass_overrides") == list(grass):
            self.res.update(carry_over(earlier, methods, only))

    def save(self) -> None:
        self._save(self.res)

    def _run(
        self, task: str, method: str, lr: float, seed: int, mode: compare.Mode, work=None
    ) -> dict:
        """One training (reused when done) and its held-out score, as a table row."""
        r = self.train(work or self.work, task, method, lr, seed, mode, self.log)
        # (the key stays: a screen on a fresh machine reads a row with it as its run)
        out = {k: v for k, v in r.items() if k != "losses"}
        return {**out, "steps": mode.steps, **self.held(r, mode, self.log)}

    def _tuning_run(self, task: str, method: str, lr: float, seed: int) -> dict:
        """A tuning run, or an earlier one (the screen's) that trained the same model:
        the same recipe and overrides but for where it was written and whether the
        model was kept. A tuning run is read for its validation loss only, and the
        chosen lr's model is trained again in `equal_steps` where it is needed."""
        earlier = self.prior(task, method, lr, seed, self.mode)
        r = compare.same_training(earlier, self.work, task, method, lr, seed, self.mode)
        if r is not None:
            self.res.setdefault("reused", {}).setdefault(method, []).append(r["run_dir"])
            return r
        # a run of a grid an earlier, interrupted command did not finish: its result
        # is in the results file even where its folder is gone (another machine)
        done = self.res.setdefault("lr_runs", {}).setdefault(method, {})
        r = compare.same_training(done.get(f"{lr:.2e}"), self.work, task, method, lr, seed,
                                  self.mode)  # fmt: skip
        if r is not None:
            return r
        r = self.train(self.work, task, method, lr, seed, self.mode, self.log)
        done[f"{lr:.2e}"] = {k: v for k, v in r.items() if k != "losses"}
        self.save()
        return r

    # ------------------------------------------------------------------ stages
    def _choose(self, rows: dict[float, dict], run_dir: Callable[[float], Path]) -> float:
        """The lr of least validation loss (the smaller on a tie); the models of the
        others are deleted: a tuning run is read for its validation loss only."""
        best = min(rows, key=lambda lr: (rows[lr]["val_loss"], lr))
        for lr in rows:
            if lr != best:
                shutil.rmtree(run_dir(lr) / "final", ignore_errors=True)
        return best

    def tune(self) -> dict[str, float]:
        """Stage 1: each method's lr on the tuning task's validation loss (seed 0)."""
        task, seed = self.mode.tune_task, self.mode.seeds[0]
        for method in ("grass", "lora", "full", "lisa"):
            if method in self.res["chosen_lr"] or method not in self.methods:
                continue
            rows = extend_grid(
                lambda lr, m=method: self._tuning_run(task, m, lr, seed),
                self.start[method],
            )
            self.res["lr"][method] = {f"{lr:.2e}": r["val_loss"] for lr, r in rows.items()}
            self.res["chosen_lr"][method] = self._choose(
                rows,
                lambda lr, m=method: compare.run_dir_for(self.work, task, m, lr, seed, self.mode),
            )
            runs = self.res.pop("lr_runs", {})  # the grid is done: its table says it all
            runs.pop(method, None)
            if runs:
                self.res["lr_runs"] = runs
            self.save()
        if "grass" in self.res["chosen_lr"]:
            self.res["chosen_lr"]["grass-static"] = self.res["chosen_lr"]["grass"]
        return self.res["chosen_lr"]

    def equal_steps(self) -> list[dict]:
        """Stage 2: every method, task and seed at its tuned lr and the same steps."""
        rows = self.res.setdefault("equal_steps", [])
        # GRASS and LoRA first: the memory and time comparisons need them
        for method in ("grass", "lora", "full", "lisa", "grass-static"):
            if method not in self.methods:
                continue
            for task in compare.TASKS:
                for seed in self.mode.seeds:
                    if _has(rows, task, method, seed):
                        continue
                    lr = self.res["chosen_lr"][method]
                    rows.append(self._run(task, method, lr, seed, self.mode))
                    self.save()
        return rows

    def equal_memory(self) -> dict[str, Any]:
        """Stage 3: GRASS with the largest gamma whose peak stays within LoRA's, at an
        lr tuned for the tuning task's gamma."""
        mem = self.res.setdefault("equal_memory", {"budget": {}, "probes": {}, "gamma": {}})
        base_gamma = _gamma(self.mode.extra_by_method["grass"])
        probe_mode = dataclasses.replace(self.mode, steps=PROBE_STEPS)
        lr = self.res["chosen_lr"]["grass"]
        for task in compare.TASKS:
            lora = [
                r for r in self.res["equal_steps"] if r["method"] == "lora" and r["task"] == task
            ]
            mem["budget"][task] = statistics.mean(r["train_peak_rss"] for r in lora)
            probes = mem["probes"].setdefault(task, {})
            # a probe is short, so it can miss the peak a full run reaches later: the
            # base gamma's probe is calibrated against the base's full runs, and every
            # probe must fit the budget less that shortfall
            base_full = statistics.mean(
                r["train_peak_rss"]
                for r in self.res["equal_steps"]
                if r["method"] == "grass" and r["task"] == task
            )

            def probe(gamma: int, task: str = task, probes: dict = probes) -> float:
                if str(gamma) not in probes:
                    r = self.train(
                        self.work / "memory-probe" / f"gamma-{gamma}", task, "grass", lr,
                        self.mode.seeds[0], _with_gamma(probe_mode, gamma), self.log,
                    )  # fmt: skip
                    probes[str(gamma)] = r["train_peak_rss"]
                    # a probe's model is never evaluated
                    shutil.rmtree(Path(r["run_dir"]) / "final", ignore_errors=True)
                    self.save()
                return probes[str(gamma)]

            shortfall = max(0.0, base_full - probe(base_gamma))
            mem.setdefault("shortfall", {})[task] = shortfall
            limit = mem["budget"][task] - shortfall
            chosen = largest_fitting(lambda g, m=limit: probe(g) <= m, base_gamma, BLOCKS)
            mem["gamma"][task] = chosen
        tuned = self._tune_at_gamma(mem, lr)
        runs = mem["runs"] = []  # rebuilt from the finished runs, which are reused
        for task in compare.TASKS:
            gamma = mem["gamma"][task]
            mode, work = self._at_gamma(gamma)
            for seed in self.mode.seeds:
                runs.append({**self._run(task, "grass", tuned, seed, mode, work), "gamma": gamma})
                self.save()
        return mem

    def _at_gamma(self, gamma: int) -> tuple[compare.Mode, Path]:
        """The mode and folder of a memory-matched run at `gamma`: one place, so that the
        lr grid's run at the chosen lr is the seeds' run at that gamma, reused."""
        return _with_gamma(self.mode, gamma), self.work / "equal-memory" / f"gamma-{gamma}"

    def _tune_at_gamma(self, mem: dict[str, Any], start: float) -> float:
        """GRASS's lr at the tuning task's chosen gamma, on its validation loss (seed
        0), like stage 1's: an lr tuned for a few blocks at once can be far too high for
        most of them (gamma 23 at gamma 4's lr collapsed on family, 19.5% held out). The
        grid starts 4x below `start` (with most blocks trained GRASS is near full
        fine-tuning, whose lr the 60-step comparison put 4x below GRASS's) and extends
        itself until its choice is interior, as stage 1's do. One grid serves every
        task: the tasks share the model and max_length, so their gammas differ by a
        probe's noise (family 23, reversal 24), and a grid per gamma would double the
        stage's cost for no information."""
        task, seed = self.mode.tune_task, self.mode.seeds[0]
        gamma = mem["gamma"][task]
        tuned = mem.get("lr")
        if tuned and tuned["gamma"] == gamma:
            return tuned["chosen"]
        mode, work = self._at_gamma(gamma)
        rows = extend_grid(
            lambda lr: self.train(work, task, "grass", lr, seed, mode, self.log), start / 4
        )
        chosen = self._choose(
            rows, lambda lr: compare.run_dir_for(work, task, "grass", lr, seed, mode)
        )
        mem["lr"] = {
            "gamma": gamma,
            "grid": {f"{lr:.2e}": r["val_loss"] for lr, r in rows.items()},
            "chosen": chosen,
        }
        self.save()
        return chosen

    def equal_time(self) -> dict[str, Any]:
        """Stage 4: every method trains for the seconds GRASS trains at equal steps."""
        tm = self.res.setdefault("equal_time", {"budget_s": {}, "steps": {}})
        runs = tm.setdefault("runs", [])
        steps_rows = self.res["equal_steps"]
        for task in compare.TASKS:
            mine = [r for r in steps_rows if r["task"] == task]
            grass = [r for r in mine if r["method"] == "grass"]
            budget = tm["budget_s"][task] = statistics.mean(r["train_s"] for r in grass)
            per = tm["steps"].setdefault(task, {})
            per["grass"] = self.mode.steps  # the budget's own steps
            for method in self.methods:
                if method == "grass":
                    continue
                own = [r for r in mine if r["method"] == method]
                if not own:
                    continue
                s_per_step = statistics.mean(r["train_s"] / r["steps"] for r in own)
                per[method] = max(1, round(budget / s_per_step))
                mode = dataclasses.replace(self.mode, steps=per[method])
                for seed in self.mode.seeds:
                    if _has(runs, task, method, seed):
                        continue
                    lr = self.res["chosen_lr"][method]
                    runs.append(self._run(task, method, lr, seed, mode))
                    self.save()
        return tm


def carry_over(earlier: dict[str, Any], methods: tuple[str, ...], only: tuple[str, ...]) -> dict:
    """What a results file holds for the methods and comparisons a run leaves alone, so
    that `--only steps --methods lisa` adds LISA's rows to the file instead of writing
    a file of LISA alone. What the run does touch (a method in `methods`, in a stage
    in `only`) is rebuilt from the finished runs (reused), never carried: a method
    redone in it shows its new rows only. A stage the run needs but was not asked to
    redo is carried for its methods too: `--only time --methods lisa` on a fresh
    machine reads LISA's lr and equal-steps rows from the file instead of training
    them again (an hour here). An earlier file of another GRASS configuration is not
    carried at all (the caller checks)."""

    def redone(stage: str) -> bool:
        # a new lr changes the equal-steps rows; the time comparison's rows are only
        # filtered when it runs (a comparison not run is carried whole, below)
        return stage in only or (stage == "steps" and "lr" in only)

    def keep(method: str, stage: str) -> bool:
        if method == "grass-static" and "grass" in methods and "lr" in only:
            return False  # GRASS-static takes GRASS's lr: re-tuning GRASS re-decides it
        return method not in methods or not redone(stage)

    out: dict[str, Any] = {}
    for key in ("lr", "chosen_lr", "reused"):
        kept = {m: v for m, v in earlier.get(key, {}).items() if keep(m, "lr")}
        if kept:
            out[key] = kept
    rows = [r for r in earlier.get("equal_steps", []) if keep(r["method"], "steps")]
    if rows:
        out["equal_steps"] = rows
    if "memory" not in only and "equal_memory" in earlier:
        out["equal_memory"] = earlier["equal_memory"]
    tm = earlier.get("equal_time")
    if tm is not None:
        if "time" not in only:
            out["equal_time"] = tm
        else:
            steps = {t: {m: n for m, n in by.items() if keep(m, "time")}
                     for t, by in tm.get("steps", {}).items()}  # fmt: skip
            runs = [r for r in tm.get("runs", []) if keep(r["method"], "time")]
            out["equal_time"] = {"budget_s": {}, "steps": steps, "runs": runs}
    out["carried"] = sorted(out)
    if out["carried"]:  # the commands that made what is carried
        made = [earlier["command"]] if "command" in earlier else []
        out["commands"] = earlier.get("commands", made)
    if earlier.get("lr_runs"):  # unfinished grids: each run reused only if it trained
        out["lr_runs"] = earlier["lr_runs"]  # the model the grid would train now
    return out


def largest_fitting(fits: Callable[[int], bool], start: int, most: int) -> int:
    """The largest gamma in [1, most] that fits, by bisection from `start` (peak memory
    grows with the blocks trained at once, so what fits is a prefix): about log2(most)
    probes where stepping would take one per value. Never below 1."""
    lo, hi = (start, most + 1) if fits(start) else (0, start)  # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return max(lo, 1)


def _cells(rows: list[dict], method: str) -> set[tuple[str, int]]:
    """The (task, seed) pairs `method` has finished runs for."""
    return {(r["task"], r["seed"]) for r in rows if r["method"] == method}


def _has(rows: list[dict], task: str, method: str, seed: int) -> bool:
    return (task, seed) in _cells(rows, method)


def _gamma(overrides: tuple[str, ...]) -> int:
    """GRASS's gamma: the --grass override's, else the bench recipe's."""
    for o in overrides:
        if o.startswith("sampler.gamma="):
            return int(o.split("=", 1)[1])
    return int(compare._recipe("grass")["sampler"]["gamma"])


def _with_gamma(mode: compare.Mode, gamma: int) -> compare.Mode:
    grass = tuple(o for o in mode.extra_by_method["grass"] if not o.startswith("sampler.gamma="))
    extra = {**mode.extra_by_method, "grass": (*grass, f"sampler.gamma={gamma}")}
    return dataclasses.replace(mode, extra_by_method=extra)


def run_stages(study: Study, only: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """The stages in order; a later one needs the earlier ones' results (reused)."""
    study.tune()
    if set(only) & {"steps", "memory", "time"}:
        study.equal_steps()
    if "memory" in only:
        study.equal_memory()
    if "time" in only:
        study.equal_time()
    study.save()
    return study.res


# ----------------------------------------------------------------------- report


def goals(res: dict[str, Any], tensor: dict[str, Any] | None = None) -> list[str]:
    """Issue 18's goals, judged by the numbers (held-out accuracy, mean over the tasks).

    The memory goal is judged twice: by the runs' process RSS (what this CPU's runs
    hold, the runtime and allocator slack included), and, given `tensor` (the rows of
    benchmarks/memory.py --model study), by live tensor bytes, what a GPU's
    max_memory_allocated would count. The two differ by what every method holds alike.
    """
    out: list[str] = []

    def acc(rows: list[dict], method: str) -> float | None:
        agg = compare.aggregate([r for r in rows if r["method"] == method], False)
        return agg[method]["mean_accuracy"][0] if method in agg else None

    def check(ok: bool, text: str) -> None:
        out.append(f"- [{'x' if ok else ' '}] {text}")

    def complete(name: str, rows: list[dict], method: str, like: list[dict], ref: str) -> bool:
        """Whether `method` has run every task and seed `ref` has: a mean over other
        tasks and seeds is no comparison, so a partial one is reported, not judged."""
        want = _cells(like, ref)
        done = len(_cells(rows, method) & want)
        if done < len(want):
            check(False, f"{name}: not judged yet: {compare.LABELS[method]} has {done} of "
                         f"{compare.LABELS[ref]}'s {len(want)} task-seed runs")  # fmt: skip
        return done == len(want)

    steps = res.get("equal_steps", [])
    g = acc(steps, "grass")
    if g is not None:
        for other, margin, text in (("lisa", 5.0, "at least 5 points above LISA"),
                                    ("grass-static", 0.0, "at least GRASS-static"),
                                    ("full", -2.0, "within 2 points of full FT")):  # fmt: skip
            o = acc(steps, other)
            if o is not None and complete("equal steps", steps, other, steps, "grass"):
                check(g >= o + margin, f"equal steps: GRASS {text}: {g:.1f} vs {o:.1f}")
        full = [r for r in steps if r["method"] == "full"]
        if full and _cells(steps, "full") >= _cells(steps, "grass"):
            m = statistics.mean(r["train_peak_rss"] for r in steps if r["method"] == "grass")
            ratio = m / statistics.mean(r["train_peak_rss"] for r in full)
            check(ratio <= 0.6, f"equal steps: GRASS's peak at most 0.6x full FT's: {ratio:.2f}x")
    peaks = {k: r["measured"] for k, r in (tensor or {}).items()}
    if {"full, checkpointing off", "grass, checkpointing off"} <= peaks.keys():
        ratio = peaks["grass, checkpointing off"] / peaks["full, checkpointing off"]
        check(ratio <= 0.6, "GRASS's peak tensor memory (benchmarks/memory.py --model study) "
                            f"at most 0.6x full FT's: {ratio:.2f}x")  # fmt: skip
    for name, key in (("equal wall-clock", "equal_time"), ("equal memory", "equal_memory")):
        runs = res.get(key, {}).get("runs", [])
        lora_rows = runs if key == "equal_time" else steps
        grass_rows = steps if key == "equal_time" else runs
        g, lo = acc(grass_rows, "grass"), acc(lora_rows, "lora")
        if (
            g is not None
            and lo is not None
            and complete(name, grass_rows, "grass", lora_rows, "lora")
        ):
            check(g >= lo, f"{name}: GRASS at least LoRA's accuracy: {g:.1f} vs {lo:.1f}")
    return out


def render(res: dict[str, Any], command: str) -> str:
    """The comparison's Markdown: one table per comparison, then the goals."""
    grass = " ".join(res["grass_overrides"]) or "the bench recipe's"
    m = MODE
    lines = [
        "# GRASS study, stage 3: GRASS against the other methods (held-out accuracy)",
        "",
        f"{m.steps} steps x batch {m.micro_batch}, seeds {list(m.seeds)}, validation: first "
        f"{m.val_limit} rows of eval.jsonl (lr choice), held out: first {m.test_limit} rows "
        f"of test.jsonl. GRASS and GRASS-static configuration: {grass}.",
        "",
    ]
    if res.get("lr"):
        tuning = {k: {float(lr): v for lr, v in by.items()} for k, by in res["lr"].items()}
        lines += ["## lr (reversal, validation loss, seed 0)", "",
                  compare.tuning_table({"reversal": tuning}), ""]  # fmt: skip
        for method, dirs in res.get("reused", {}).items():
            where = sorted({Path(d).parent.parent.parent.name for d in dirs})
            lines += [f"{compare.LABELS[method]}'s lr runs: the screen's, which trained the "
                      f"same models (variant {', '.join(where)} in runs/study).", ""]  # fmt: skip
    steps = res.get("equal_steps", [])
    if steps:
        lines += ["## Equal steps", "", compare.table(compare.aggregate(steps, False), False), ""]
    mem = res.get("equal_memory", {})
    if mem.get("runs"):
        rows = [r for r in steps if r["method"] == "lora"] + mem["runs"]
        budget = ", ".join(f"{t} {b / 2**30:.2f} GiB" for t, b in mem["budget"].items())
        gammas = ", ".join(f"{t} {g}" for t, g in mem["gamma"].items())
        probes = "; ".join(
            f"{t}: " + ", ".join(f"gamma {g} {p / 2**30:.2f}" for g, p in by.items())
            for t, by in mem["probes"].items()
        )
        tuned = mem["lr"]
        lrs = ", ".join(f"{lr} {v:.4f}" for lr, v in tuned["grid"].items())
        lines += ["## Equal peak memory", "",
                  f"LoRA's peak (the budget): {budget}. GRASS's gamma: {gammas}. "
                  f"Probe peaks ({PROBE_STEPS} steps, GiB): {probes}. GRASS's lr, tuned at "
                  f"{MODE.tune_task}'s gamma {tuned['gamma']} ({MODE.tune_task} validation "
                  f"loss, seed 0) and used for every task: {lrs} (chosen "
                  f"{tuned['chosen']:.2e}).", "",
                  compare.table(compare.aggregate(rows, False), False), ""]  # fmt: skip
    tm = res.get("equal_time", {})
    if tm.get("runs"):
        rows = [r for r in steps if r["method"] == "grass"] + tm["runs"]
        budget = ", ".join(f"{t} {s:.0f} s" for t, s in tm["budget_s"].items())
        per = "; ".join(
            f"{t}: " + ", ".join(f"{compare.LABELS[m]} {n}" for m, n in by.items())
            for t, by in tm["steps"].items()
        )
        lines += ["## Equal wall-clock", "",
                  f"GRASS's training seconds (the budget): {budget}. Steps: {per}.", "",
                  compare.table(compare.aggregate(rows, False), False), ""]  # fmt: skip
    tensor = json.loads(TENSOR_PEAKS.read_text())["rows"] if TENSOR_PEAKS.exists() else None
    checks = goals(res, tensor)
    if checks:
        lines += ["## Goals (issue 18)", "", *checks, ""]
    lines += [f"command: `{command}`", ""]
    before = [c for c in res.get("commands", []) if c != command]
    if before:
        lines += ["kept from earlier commands (" + ", ".join(res.get("carried", [])) + "): "
                  + "; ".join(f"`{c}`" for c in before), ""]  # fmt: skip
    lines += [f"machine: {compare.machine(False)}", ""]
    return "\n".join(lines)
