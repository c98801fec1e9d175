"""The accuracy study of GRASS's settings (issue 18): which axes matter, on validation only.

    python benchmarks/study.py screen                  # GRASS's axes, one at a time
    python benchmarks/study.py screen --steps 300      # the study's full budget
    python benchmarks/study.py screen --axes lr gamma  # some axes only
    python benchmarks/study.py screen --axes gamma --seeds 0 1 2   # their spread
    python benchmarks/study.py screen --task family --seeds 0 1 2 --axes tau --values 1.0
    python benchmarks/study.py compare --grass sampler.gamma=8    # against the others

`screen` trains GRASS on the reversal task (`--task family`: the other; seed 0) at
a budget where the sampler switches many times (default 150 steps x batch 8: 15
switches of 4 blocks of 30, so every block is drawn about twice; `--steps 300`
doubles that), changing one axis at a time around a base configuration. With
`--seeds`, every variant but the lr grid trains once per seed and the table gives
the mean and spread of its validation loss, and its difference from the base seed
by seed (the same seed gives both the same data order), in
benchmarks/results/study-seeds.*: whether an axis's effect is larger than what a
different seed does by itself.

1. `lr`: a x2 grid from the bench recipe's lr, extended on the side of the best
   value until it is interior (a best value at the edge of a grid is no optimum);
   the winner becomes the base lr for the other axes.
2. the other axes (each a few values around the base): `gamma` (blocks trained
   at once), `switch` (T_s, steps between re-samplings), `tau` and `eps` (the
   sampling temperature and exploration floor), `head` (embeddings and LM head
   trained or frozen), `probe` (probing steps T_p, the importance's first
   estimate), `update` (T_u, steps between EMA refreshes of the trained blocks'
   importance), `alpha` (the EMA's weight on the new window), `correction`
   (our idea: each drawn block's lr scaled by its inverse inclusion
   probability, `sampler.lr_correction`), `draw` (ours too: `sampler.draw:
   balanced`, the draws' counts without their luck).
3. `combo`: the single-axis winners together (stage 2: does what helped alone
   add up?).

`compare` (stage 3, benchmarks/study_compare.py) sets the chosen configuration
against full fine-tuning, LoRA, LISA and GRASS-static at equal steps, equal
wall-clock and equal peak memory, with held-out accuracy over three seeds.

Every choice is made on the validation split's loss (eval.jsonl): the held-out
split is never read here. Runs are kept in `--work` (default runs/study) and
reused when their recipe and overrides are unchanged (benchmarks/compare.py's
train_one), so an interrupted study continues where it stopped; a run the
comparison made (`--compare-work`, default runs/study-compare) that trained the
same model is read instead of trained again (its equal-steps GRASS runs are the
base on three seeds). Results go to benchmarks/results/study-screen.{json,md}
(study-seeds with `--seeds`, `-TASK` for a task other than reversal); a screen of
some axes adds them to that file when it screened the same task, budget, seeds
and lr, so the axes can be run a few at a time; a screen at another lr would replace
its axes, so it names a file of its own (`--results NAME`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402  (the bench's run/reuse machinery)
import study_compare  # noqa: E402  (stage 3)

from grass_cli.atomic import write_atomic_text  # noqa: E402

TASK = "reversal"
# Axis -> (recipe key, values tried besides the base). The base is the bench
# recipe's value (recipes/bench/grass.yaml), with the lr the `lr` axis chose.
AXES: dict[str, tuple[str, tuple[Any, ...]]] = {
    "gamma": ("sampler.gamma", (2, 8)),
    "switch": ("sampler.switch_interval", (5, 25, 50)),
    "tau": ("sampler.tau", (0.25, 1.0, 2.0)),
    "eps": ("sampler.eps", (0.0, 0.3)),
    "head": ("sampler.train_head", (True,)),
    "probe": ("sampler.probe_steps", (16,)),
    "update": ("sampler.update_interval", (5, 25)),
    "alpha": ("sampler.alpha", (0.2, 0.8)),
    # our idea (not in the paper): lr x (gamma / L) / inclusion probability
    "correction": ("sampler.lr_correction", ("inverse_probability",)),
    # ours too: each block trained as often as random draws would, without their luck
    "draw": ("sampler.draw", ("balanced",)),
    # stage 2: the single-axis winners together (a value here is a set of overrides)
    "combo": ("", ({"sampler.gamma": 8, "sampler.lr_correction": "inverse_probability"},)),
}
EXTRA = {"head": ("sampler.train_embeddings=true",)}  # tied in SmolLM2: one matrix


def variant_mode(base: compare.Mode, overrides: tuple[str, ...]) -> compare.Mode:
    return dataclasses.replace(base, overrides=base.overrides + overrides)


def slug(overrides: tuple[str, ...]) -> str:
    """A folder name for a variant: its overrides, readable."""
    if not overrides:
        return "base"
    return "+".join(o.split(".", 1)[1].replace("=", "-") for o in overrides)


class Records:
    """The runs a results file keeps, each with its key (compare._key): `own`, the
    screen's, to which every run trained is added (and the file saved at once), and
    `made`, the comparison's equal-steps rows. Where the run folders are gone (a fresh
    machine) a run they hold is read instead of trained again, if it trained the same
    model: an interrupted screen resumes where it stopped."""

    def __init__(
        self, own: list[dict] | None = None, made: list[dict] | None = None,
        save: Callable[[], None] = lambda: None,
    ) -> None:  # fmt: skip
        # (a plain class: the tests load this file as a module that is not registered,
        # which dataclasses cannot inspect)
        self.own = own if own is not None else []
        self.made, self.save = made or [], save

    def find(self, here: Path, task: str, lr: float, seed: int, mode: compare.Mode):
        """(the run, [where it was made] if the comparison made it) or (None, [])."""
        for rec, theirs in [*((r, False) for r in self.own), *((r, True) for r in self.made)]:
            if (rec.get("task"), rec.get("lr"), rec.get("seed")) != (task, lr, seed):
                continue
            r = compare.same_training(rec, here, task, "grass", lr, seed, mode)
            if r is not None:
                return r, [r["run_dir"]] if theirs else []
        return None, []

    def add(self, task: str, lr: float, seed: int, r: dict) -> None:
        keep = ("val_loss", "tokens_per_s", "train_peak_rss", "train_s", "run_dir", "key")
        self.own.append({"task": task, "lr": lr, "seed": seed, **{k: r[k] for k in keep if k in r}})
        self.save()


def run(
    work: Path,
    mode: compare.Mode,
    overrides: tuple[str, ...],
    lr: float,
    log,
    seed: int = 0,
    elsewhere: Path | None = None,
    records: Records | None = None,
) -> dict:
    """One GRASS training of the variant `overrides` at `lr` (reused when done, or
    when `elsewhere`, the comparison's runs, holds one that trained the same model).
    `records`: runs that results files keep (each with its key), read instead of
    training again where the run folders are gone (a fresh machine); each run made
    here is added to it."""
    task = mode.tune_task or TASK
    vmode = variant_mode(mode, overrides)
    here = work / slug(overrides)
    records = records or Records()
    # the comparison's equal-steps GRASS runs are the screen's base on three seeds
    made = compare.result_in(elsewhere, task, "grass", lr, seed, vmode) if elsewhere else None
    r = compare.same_training(made, here, task, "grass", lr, seed, vmode)
    reused = [r["run_dir"]] if r is not None else []
    if r is None:
        r, reused = records.find(here, task, lr, seed, vmode)
    if r is None:
        r = compare.train_one(here, task, "grass", lr, seed, vmode, log)
        records.add(task, lr, seed, r)
    return {
        "overrides": list(overrides),
        "lr": lr,
        "seed": seed,
        "val_loss": r["val_loss"],
        "tokens_per_s": r["tokens_per_s"],
        "train_peak_rss": r["train_peak_rss"],
        "train_s": r["train_s"],
        "run_dir": r.get("run_dir"),
        "reused": reused,
    }


def variant(
    work: Path,
    mode: compare.Mode,
    overrides: tuple[str, ...],
    lr: float,
    seeds,
    log,
    elsewhere: Path | None = None,
    records: Records | None = None,
) -> dict:
    """The variant over `seeds`: mean validation loss, its spread, and each seed's."""
    runs = [run(work, mode, overrides, lr, log, s, elsewhere, records) for s in seeds]
    mean, sd = compare.mean_sd([r["val_loss"] for r in runs])
    return {
        **runs[0],
        "seed": None,
        "seeds": list(seeds),
        "val_loss": mean,
        "val_loss_sd": sd,
        "val_losses": [r["val_loss"] for r in runs],
        "reused": [d for r in runs for d in r["reused"]],
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
        "train_peak_rss": max(r["train_peak_rss"] for r in runs),
        "train_s": statistics.mean(r["train_s"] for r in runs),
    }


def tune_lr(
    work: Path, mode: compare.Mode, start: float, log, max_extend: int = 3,
    records: Records | None = None,
) -> list[dict]:  # fmt: skip
    """GRASS's base configuration over an extended x2 grid around `start` (seed 0)."""
    rows = study_compare.extend_grid(
        lambda lr: run(work, mode, (), lr, log, records=records), start, max_extend
    )
    return list(rows.values())


def screen(
    args: argparse.Namespace, log, save=lambda res: None, earlier: dict | None = None,
    made: list[dict] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Stage 1; `save(results)` is called after every run, so an interrupted
    screen leaves the table of what it finished. `earlier`: the results file of an
    earlier screen; where it screened the same task, budget, seeds and lr, the axes
    it has and this one does not run are kept (a screen of one axis adds to it).
    Every run's result is kept in the file (`runs`, with its key), and a run that the
    file, or `made` (the comparison's rows), holds is read instead of trained again
    when it trained the same model, so a screen cut off mid-axis resumes on a fresh
    machine."""
    mode = compare.Mode(
        steps=args.steps,
        micro_batch=args.batch,
        seeds=(0,),
        lr_grid=(1.0,),
        val_limit=args.val_limit,
        test_limit=0,
        overrides=("output.save_model=false",),  # validation loss is all a screen reads
        tune_task=getattr(args, "task", TASK),  # the task every variant trains on
    )
    recipe = compare._recipe("grass")
    seeds = list(getattr(args, "seeds", None) or [0])
    out: dict[str, Any] = {
        "task": mode.tune_task,
        "steps": args.steps,
        "batch": args.batch,
        "seeds": seeds,
        "axes": {},
    }
    lr = float(args.lr or recipe["optimizer"]["lr"])
    out["runs"] = list((earlier or {}).get("runs", []))
    records = Records(out["runs"], made or [], lambda: save(out))
    if "lr" in args.axes:
        out["axes"]["lr"] = tune_lr(args.work, mode, lr, log, records=records)
        lr = min(out["axes"]["lr"], key=lambda r: r["val_loss"])["lr"]
    out["lr"] = lr
    elsewhere = getattr(args, "compare_work", None)
    base = variant(args.work, mode, (), lr, seeds, log, elsewhere, records)
    out["base"] = base
    same = ("task", "steps", "batch", "seeds", "lr")
    if earlier and all(earlier.get(k) == out[k] for k in same):
        kept = {a: rows for a, rows in earlier["axes"].items() if a not in args.axes}
        out["axes"] = {**kept, **out["axes"]}
        out["commands"] = list(earlier.get("commands", [earlier.get("command")]))
    save(out)
    for axis in args.axes:
        if axis == "lr":
            continue
        key, values = AXES[axis]
        values = tuple(getattr(args, "values", None) or values)  # --values: these only
        base_value = _base_value(recipe, key) if key else "base"
        rows = out["axes"][axis] = [{**base, "value": base_value}]
        for v in values:
            pairs = v.items() if isinstance(v, dict) else [(key, v)]
            ov = (*(f"{k}={_text(x)}" for k, x in pairs), *EXTRA.get(axis, ()))
            label = " + ".join(f"{k.split('.')[1]} {x}" for k, x in pairs) if key == "" else v
            row = variant(args.work, mode, ov, lr, seeds, log, elsewhere, records)
            rows.append({**row, "value": label})
            save(out)
    return out


def screened(screen_work: Path):
    """Where the screen left a GRASS run that `compare` would make again: the variant
    of GRASS's --grass overrides (study_compare.Study checks that the keys agree)."""

    def look(task: str, method: str, lr: float, seed: int, mode: compare.Mode) -> dict | None:
        if method != "grass":
            return None
        work = screen_work / slug(tuple(mode.extra_by_method.get("grass", ())))
        return compare.result_in(work, task, method, lr, seed, mode)

    return look


def _versus(row: dict[str, Any], base: dict[str, Any]) -> str:
    """Paired difference from the base over the seeds both ran: mean ± sd."""
    pairs = dict(zip(base["seeds"], base["val_losses"], strict=True))
    diffs = [x - pairs[s] for s, x in zip(row["seeds"], row["val_losses"], strict=True)]
    mean, sd = compare.mean_sd(diffs)
    return f"{mean:+.4f} ± {sd:.4f}"


def _text(v: Any) -> str:
    """A value as a recipe override writes it (YAML booleans in lower case)."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def _base_value(recipe: dict[str, Any], key: str) -> Any:
    """The bench recipe's value of `key`, or the recipe default it leaves in place."""
    from grass_cli.recipe.sections import Recipe

    section, name = key.split(".")
    if name in recipe.get(section, {}):
        return recipe[section][name]
    return Recipe.model_fields[section].annotation.model_fields[name].default


def _rel(path: str) -> str:
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def render(res: dict[str, Any], command: str) -> str:
    seeds = res.get("seeds", [0])
    spread = len(seeds) > 1
    lines = [
        f"# GRASS study, stage 1: one axis at a time (validation loss, "
        f"{res.get('task', TASK)}, "
        f"seed{'s' if spread else ''} {', '.join(map(str, seeds))})",
        "",
        f"{res['steps']} steps x batch {res['batch']}; base: recipes/bench/grass.yaml at lr "
        f"{res['lr']:.1e} (validation loss {res['base']['val_loss']:.4f}"
        + (f" ± {res['base']['val_loss_sd']:.4f}" if spread else "")
        + "). Lower is better; the held-out split is not read."
        + (
            " Loss: mean ± sd over the seeds, each seed's in the last column; vs base: the"
            " mean ± sd of the seed-by-seed differences (the same seed gives both runs the"
            " same data order, so the pair's difference is the variant's own effect)."
            if spread
            else ""
        ),
        "",
        "| axis | value | validation loss | vs base | tokens/s | peak RSS (GiB) |"
        + (" per seed |" if spread else ""),
        "|---|---|---|---|---|---|" + ("---|" if spread else ""),
    ]
    b = res["base"]["val_loss"]
    for axis, rows in res["axes"].items():
        best = min(r["val_loss"] for r in rows)
        for r in rows:
            value = f"{r['lr']:.1e}" if axis == "lr" else str(r["value"])
            mark = "**" if r["val_loss"] == best else ""
            many = spread and len(r.get("val_losses", [])) > 1  # the lr axis: seed 0 only
            loss = f"{r['val_loss']:.4f}" + (f" ± {r['val_loss_sd']:.4f}" if many else "")
            cells = [
                axis,
                value,
                f"{mark}{loss}{mark}",
                _versus(r, res["base"]) if many else f"{r['val_loss'] - b:+.4f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['train_peak_rss'] / 2**30:.2f}",
            ]
            if spread:
                cells.append(", ".join(f"{x:.4f}" for x in r.get("val_losses", [r["val_loss"]])))
            lines.append("| " + " | ".join(cells) + " |")
    reused = {d for rows in [[res["base"]], *res["axes"].values()] for r in rows
              for d in r.get("reused", [])}  # fmt: skip
    if reused:
        lines += ["", "Runs of the comparison that trained the same models, reused: "
                  + ", ".join(f"`{_rel(d)}`" for d in sorted(reused))]  # fmt: skip
    earlier = [c for c in res.get("commands", []) if c and c != command]
    lines += ["", f"command: `{command}`"]
    if earlier:
        lines += ["", "kept from earlier commands: " + "; ".join(f"`{c}`" for c in earlier)]
    lines += ["", f"machine: {compare.machine(False)}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["screen", "compare"])
    ap.add_argument("--axes", nargs="+", default=["lr", *AXES], choices=["lr", *AXES])
    ap.add_argument(
        "--values", nargs="+", default=None, metavar="VALUE",
        help="screen: try these values of the one axis in --axes instead of its defaults",
    )  # fmt: skip
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--val-limit", type=int, default=100)
    ap.add_argument("--task", default=TASK, choices=list(compare.TASKS), help="screen: the task")
    ap.add_argument("--lr", type=float, default=None, help="start (or, without lr, fix) the lr")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="seeds per variant (lr: first only)"
    )
    ap.add_argument("--work", type=Path, default=None, help="default runs/study(-compare)")
    ap.add_argument(
        "--results", default=None, metavar="NAME",
        help="screen: benchmarks/results/NAME.{json,md} instead of the file its task and "
        "seeds name (a screen at another lr replaces that file's axes)",
    )  # fmt: skip
    ap.add_argument(
        "--grass", nargs="*", default=[], metavar="KEY=VALUE",
        help="compare: GRASS's configuration (recipe overrides), for GRASS-static too",
    )  # fmt: skip
    ap.add_argument(
        "--screen-work", type=Path, default=ROOT / "runs/study",
        help="compare: the screen's runs, whose equal GRASS lr runs tuning reuses",
    )  # fmt: skip
    ap.add_argument(
        "--compare-work", type=Path, default=ROOT / "runs/study-compare",
        help="screen: the comparison's runs, whose equal GRASS runs the screen reuses",
    )  # fmt: skip
    ap.add_argument(
        "--only", nargs="+", default=list(study_compare.STAGES), choices=study_compare.STAGES,
        help="compare: these comparisons only (the ones they need run first)",
    )  # fmt: skip
    ap.add_argument(
        "--methods", nargs="+", default=list(study_compare.METHODS),
        choices=study_compare.METHODS, help="compare: these methods only",
    )  # fmt: skip
    args = ap.parse_args()
    if args.results and args.stage != "screen":
        ap.error("--results names a screen's file (compare writes study-compare)")
    if args.values:
        screened_axes = [a for a in args.axes if a != "lr"]
        if args.stage != "screen" or len(screened_axes) != 1 or screened_axes == ["combo"]:
            ap.error("--values needs `screen` and exactly one axis (not combo) in --axes")
        from grass_cli.recipe.loading import parse_yaml  # as an override reads a value

        args.values = [parse_yaml(v) for v in args.values]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.0f}s] {msg}", file=sys.stderr, flush=True)

    command = "python benchmarks/study.py " + " ".join(sys.argv[1:])
    if args.stage == "compare":
        name, render = "study-compare", study_compare.render
    else:
        # one seed: the screen; more: the seed check of chosen axes, in a file of its own
        name = "study-screen" if args.seeds == [0] else "study-seeds"
        name += "" if args.task == TASK else f"-{args.task}"
        name = args.results or name
        render = globals()["render"]
    path = ROOT / f"benchmarks/results/{name}"

    def save(res: dict[str, Any]) -> None:
        res["command"] = command
        if command not in res.setdefault("commands", []):
            res["commands"].append(command)
        # atomic: the study writes these after every run, and may be killed at any time
        write_atomic_text(path.with_suffix(".json"), json.dumps(res, indent=2))
        if args.stage == "compare" or "base" in res:  # (a screen's table needs its base)
            write_atomic_text(path.with_suffix(".md"), render(res, command))

    done = path.with_suffix(".json")  # what earlier commands found: added to, not replaced
    earlier = json.loads(done.read_text()) if done.exists() else None
    if args.stage == "compare":
        work = args.work or ROOT / "runs/study-compare"
        study = study_compare.Study(
            work, tuple(args.grass), log, save, grass_lr=args.lr, methods=tuple(args.methods),
            prior=screened(args.screen_work),
            earlier=earlier,
            only=tuple(args.only),
        )  # fmt: skip
        res = study_compare.run_stages(study, tuple(args.only))
    else:
        args.work = args.work or ROOT / "runs/study"
        made = ROOT / "benchmarks/results/study-compare.json"  # its GRASS rows, with keys
        rows = json.loads(made.read_text()).get("equal_steps", []) if made.exists() else []
        res = screen(args, log, save, earlier, [r for r in rows if r["method"] == "grass"])
    save(res)
    print(render(res, command))


if __name__ == "__main__":
    main()
