"""benchmarks/study.py's screen, with the training replaced by a known loss surface:
the lr grid is extended until its best value is interior, every axis is tried
around the chosen lr, and the results are saved after every run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks/study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_screen_extends_the_lr_grid_until_interior_and_saves_every_run(monkeypatch, tmp_path):
    study = load_study()
    trained: list[tuple[float, tuple[str, ...]]] = []

    def fake_train_one(work, task, method, lr, seed, mode, log):
        trained.append((lr, tuple(mode.overrides)))
        # validation loss: a bowl in log(lr) with its bottom at 8e-4; gamma 8 helps
        loss = 0.02 + (math.log2(lr / 8e-4)) ** 2 * 1e-3
        if "sampler.gamma=8" in mode.overrides:
            loss -= 5e-3
        return {"val_loss": loss, "tokens_per_s": 100.0, "train_peak_rss": 2**30, "train_s": 1.0}

    monkeypatch.setattr(study.compare, "train_one", fake_train_one)
    args = argparse.Namespace(
        axes=["lr", "gamma"], steps=10, batch=2, val_limit=5, lr=1e-4, work=tmp_path
    )
    saved: list[int] = []
    res = study.screen(args, lambda msg: None, lambda r: saved.append(len(r["axes"])))

    lrs = [r["lr"] for r in res["axes"]["lr"]]
    assert [round(x, 8) for x in lrs] == [5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]
    assert res["lr"] == 8e-4  # interior: 1.6e-3 is worse
    gamma = {r["value"]: r["val_loss"] for r in res["axes"]["gamma"]}
    assert set(gamma) == {2, 4, 8} and min(gamma, key=gamma.get) == 8
    # the gamma runs were made at the chosen lr, with only their own override added
    assert {o for lr, o in trained if o != ("output.save_model=false",)} == {
        ("output.save_model=false", "sampler.gamma=2"),
        ("output.save_model=false", "sampler.gamma=8"),
    }
    assert all(lr == 8e-4 for lr, o in trained if len(o) > 1)
    # after every run trained, then after the base and each gamma variant's row
    assert len(saved) == len(trained) + 1 + 2
    text = study.render(res, "python benchmarks/study.py screen")
    assert "| gamma | 8 | **0.0150** |" in text


def test_an_axis_the_bench_recipe_leaves_at_its_default():
    """sampler.lr_correction is not in recipes/bench/grass.yaml: its base value is the
    recipe default."""
    study = load_study()
    recipe = study.compare._recipe("grass")
    assert "lr_correction" not in recipe["sampler"]
    assert study._base_value(recipe, "sampler.lr_correction") == "none"
    assert study._base_value(recipe, "sampler.gamma") == recipe["sampler"]["gamma"]


def test_seeds_give_each_variant_its_mean_and_spread_and_combo_joins_overrides(
    monkeypatch, tmp_path
):
    study = load_study()
    trained: list[tuple[int, tuple[str, ...]]] = []

    def fake_train_one(work, task, method, lr, seed, mode, log):
        trained.append((seed, tuple(mode.overrides)))
        loss = 0.02 + 1e-3 * seed  # seeds 0, 1, 2: mean 0.021, sd 0.001
        if "sampler.gamma=8" in mode.overrides:
            loss -= 5e-3
        if "sampler.lr_correction=inverse_probability" in mode.overrides:
            loss -= 1e-3
        return {"val_loss": loss, "tokens_per_s": 100.0, "train_peak_rss": 2**30, "train_s": 1.0}

    monkeypatch.setattr(study.compare, "train_one", fake_train_one)
    args = argparse.Namespace(
        axes=["combo"], steps=10, batch=2, val_limit=5, lr=8e-4, work=tmp_path, seeds=[0, 1, 2]
    )
    res = study.screen(args, lambda msg: None)

    assert res["base"]["val_losses"] == [0.02, 0.021, 0.022]
    assert math.isclose(res["base"]["val_loss"], 0.021)
    assert math.isclose(res["base"]["val_loss_sd"], 0.001)
    base, combo = res["axes"]["combo"]
    assert base["value"] == "base"
    assert combo["value"] == "gamma 8 + lr_correction inverse_probability"
    assert math.isclose(combo["val_loss"], 0.015)
    # every seed of the combo ran with both overrides at once
    both = ("sampler.gamma=8", "sampler.lr_correction=inverse_probability")
    assert sorted(s for s, o in trained if o[1:] == both) == [0, 1, 2]
    assert len(trained) == 6
    text = study.render(res, "python benchmarks/study.py screen --seeds 0 1 2")
    assert (
        "| combo | gamma 8 + lr_correction inverse_probability | **0.0150 ± 0.0010** | "
        "-0.0060 ± 0.0000 |" in text
    )  # the seed-by-seed differences are all -0.006: no spread in the effect itself
    assert "0.0140, 0.0150, 0.0160 |" in text


def test_compare_tunes_every_method_then_matches_steps_memory_and_time(tmp_path):
    """Stage 3 on known surfaces: lr grids extended until interior, GRASS-static on
    GRASS's lr, the largest gamma whose probe peak fits LoRA's, and the steps each
    method gets in GRASS's seconds."""
    load_study()  # puts benchmarks/ on the path
    import study_compare

    best_lr = {"full": 1e-4, "lora": 2e-3, "lisa": 4e-4, "grass": 8e-4, "grass-static": 8e-4}
    s_per_step = {"full": 2.0, "lora": 1.0, "lisa": 1.25, "grass": 100 / 150, "grass-static": 0.7}
    accuracy = {"full": 0.64, "lora": 0.55, "lisa": 0.50, "grass": 0.60, "grass-static": 0.58}
    calls: dict[tuple, dict] = {}

    def gamma_of(mode):
        over = [o for o in mode.extra_by_method.get("grass", ()) if o.startswith("sampler.gamma=")]
        return int(over[-1].split("=")[1]) if over else 4

    def fake_train(work, task, method, lr, seed, mode, log):
        gamma = gamma_of(mode) if method == "grass" else None
        key = (str(work), task, method, round(lr, 10), seed, mode.steps, gamma)
        if key not in calls:  # train_one reuses a finished run
            # LoRA's peak is a block's worth higher on family: its gamma is 10
            lora = 2.55 + (0.1 if task == "family" else 0)
            peak = {"lora": lora, "full": 3.3, "lisa": 2.6, "grass-static": 2.0}.get(method)
            calls[key] = {
                "task": task, "method": method, "lr": lr, "seed": seed,
                "run_dir": f"{work}/run{len(calls)}",
                # GRASS's best lr at more blocks than the base's 4 is 8x lower
                "val_loss": 0.02 + math.log2(lr / best_lr[method] * (8 if gamma not in (None, 4)
                                                                     else 1)) ** 2 * 1e-3,
                # GRASS: +0.1 GiB per block; a 30-step probe stops 0.15 GiB short
                "train_peak_rss": (
                    peak or 2.0 + 0.1 * (gamma - 4) - (0.15 if mode.steps == 30 else 0)
                ) * 2**30,
                "train_s": s_per_step[method] * mode.steps, "tokens_per_s": 100.0,
                "peak_rss": 3 * 2**30, "state_bytes_device": 0, "trainable_params": 1e7,
                "wall_s": 1.0, "tokens": 1000, "losses": [1.0], "key": {},
            }  # fmt: skip
        return calls[key]

    def fake_held_out(result, mode, log):
        acc = accuracy[result["method"]] + (0.03 if "equal-memory" in result["run_dir"] else 0)
        return {"accuracy": acc, "correct": int(200 * acc), "scored": 200}

    saved: list[int] = []
    study = study_compare.Study(
        tmp_path, ("sampler.lr_correction=inverse_probability",), lambda m: None,
        lambda res: saved.append(1), fake_train, fake_held_out,
    )  # fmt: skip
    res = study_compare.run_stages(study)

    chosen = {m: round(lr, 10) for m, lr in res["chosen_lr"].items()}
    assert chosen == {m: round(best_lr[m], 10) for m in study_compare.METHODS}
    assert sorted(float(x) for x in res["lr"]["full"]) == [5e-5, 1e-4, 2e-4, 4e-4]  # extended
    assert len(res["lr"]["lora"]) == 3  # interior at once
    # GRASS-static shares GRASS's configuration, our lr correction included
    assert study.mode.extra_by_method["grass-static"] == (
        "sampler.lr_correction=inverse_probability",
    )

    steps = res["equal_steps"]
    assert len(steps) == 5 * 2 * 3 and {r["steps"] for r in steps} == {150}
    # the tuning runs at the chosen lr were reused as seed 0's runs, not trained again
    at_150 = [k for k in calls if k[5] == 150 and "equal-memory" not in k[0]]
    assert len(at_150) == 4 + 3 + 3 + 3 + 5 * 2 * 3 - 4

    mem = res["equal_memory"]
    # the probes, by bisection from gamma 4; each must fit LoRA's 2.55 GiB less the
    # base probe's 0.15 GiB shortfall against the base's full runs: 9 (probe 2.35,
    # full run 2.5), where the uncalibrated probes would have chosen 11 (full run 2.7)
    assert mem["gamma"] == {"reversal": 9, "family": 10}
    assert round(mem["shortfall"]["reversal"] / 2**30, 2) == 0.15
    probes = {g: round(p / 2**30, 2) for g, p in mem["probes"]["reversal"].items()}
    assert probes == {"4": 1.85, "17": 3.15, "10": 2.45, "7": 2.15, "8": 2.25, "9": 2.35}
    gammas = {(r["task"], r["gamma"]) for r in mem["runs"]}
    assert len(mem["runs"]) == 6 and gammas == {("reversal", 9), ("family", 10)}
    # GRASS's lr re-tuned once, at reversal's gamma 9 on its validation: from 8e-4 / 4,
    # extended down once until interior; every task and seed trains at it, and the
    # tuning run at the chosen lr is reversal seed 0's run, not trained again
    assert mem["lr"]["gamma"] == 9 and mem["lr"]["chosen"] == 1e-4
    assert sorted(float(x) for x in mem["lr"]["grid"]) == [5e-5, 1e-4, 2e-4, 4e-4]
    assert {r["lr"] for r in mem["runs"]} == {1e-4}
    assert len([k for k in calls if k[6] == 9 and k[5] == 150]) == 4 + 3 - 1
    assert len([k for k in calls if k[6] == 10 and k[5] == 150]) == 3  # no grid at 10
    assert all(r["train_peak_rss"] <= 2.55 * 2**30 for r in mem["runs"] if r["task"] == "reversal")

    tm = res["equal_time"]
    assert tm["budget_s"]["reversal"] == 100.0
    assert tm["steps"]["reversal"] == {
        "full": 50, "lora": 100, "lisa": 80, "grass-static": 143, "grass": 150
    }  # fmt: skip
    assert {(r["method"], r["steps"]) for r in tm["runs"]} == {
        ("full", 50), ("lora", 100), ("lisa", 80), ("grass-static", 143)
    }  # fmt: skip
    assert len(saved) > len(steps)  # saved after every run

    text = study_compare.render(res, "python benchmarks/study.py compare")
    for heading in ("## Equal steps", "## Equal peak memory", "## Equal wall-clock"):
        assert heading in text
    assert (
        "tuned at reversal's gamma 9 (reversal validation loss, seed 0) and used for every "
        "task: 5.00e-05 0.0210, " in text
    )
    assert "4.00e-04 0.0240 (chosen 1.00e-04)." in text
    goals = study_compare.goals(res)
    assert "- [x] equal steps: GRASS at least 5 points above LISA: 60.0 vs 50.0" in goals
    assert "- [x] equal steps: GRASS at least GRASS-static: 60.0 vs 58.0" in goals
    assert "- [ ] equal steps: GRASS within 2 points of full FT: 60.0 vs 64.0" in goals
    assert "- [ ] equal steps: GRASS's peak at most 0.6x full FT's: 0.61x" in goals
    assert "- [x] equal wall-clock: GRASS at least LoRA's accuracy: 60.0 vs 55.0" in goals
    assert "- [x] equal memory: GRASS at least LoRA's accuracy: 63.0 vs 55.0" in goals
    # the memory goal judged again by tensor bytes, when memory.py --model study has run
    peaks = {"full, checkpointing off": {"measured": 100}, "grass, checkpointing off":
             {"measured": 52}, "grass, checkpointing on": {"measured": 10}}  # fmt: skip
    judged = study_compare.goals(res, peaks)
    assert [g for g in judged if g not in goals] == [
        "- [x] GRASS's peak tensor memory (benchmarks/memory.py --model study) at most 0.6x "
        "full FT's: 0.52x"
    ]
    assert len(judged) == len(goals) + 1
    del peaks["full, checkpointing off"]  # no full FT row: nothing to judge
    assert study_compare.goals(res, peaks) == goals

    # a later run of some methods and comparisons adds to the results file: what it
    # leaves alone is carried, what it touches is rebuilt from the (reused) runs
    import copy

    res["commands"] = ["python benchmarks/study.py compare"]
    before, n_calls = copy.deepcopy(res), len(calls)

    def rerun(methods: tuple[str, ...], only: tuple[str, ...]) -> dict:
        again = study_compare.Study(
            tmp_path, ("sampler.lr_correction=inverse_probability",), lambda m: None,
            train=fake_train, held_out=fake_held_out, methods=methods, earlier=before,
            only=only,
        )  # fmt: skip
        return study_compare.run_stages(again, only)

    res2 = rerun(("lisa",), ("steps",))
    assert len(calls) == n_calls  # nothing trained again
    assert res2["equal_steps"] == [r for r in steps if r["method"] != "lisa"] + [
        r for r in steps if r["method"] == "lisa"
    ]
    assert res2["equal_memory"] == mem and res2["equal_time"] == tm
    assert res2["chosen_lr"] == res["chosen_lr"]
    assert res2["carried"] == ["chosen_lr", "equal_memory", "equal_steps", "equal_time", "lr"]
    text = study_compare.render(res2, "python benchmarks/study.py compare --methods lisa")
    assert "kept from earlier commands (chosen_lr, equal_memory, " in text
    assert "`python benchmarks/study.py compare`" in text
    # equal time for LoRA alone: the others' runs carried, LoRA's rebuilt
    res3 = rerun(("lora",), ("time",))
    assert "equal_memory" in res3["carried"] and res3["equal_memory"] == mem
    assert sorted(map(str, res3["equal_steps"])) == sorted(map(str, steps))
    assert sorted(map(str, res3["equal_time"]["runs"])) == sorted(map(str, tm["runs"]))
    assert res3["equal_time"]["steps"] == tm["steps"]

    # on a fresh machine (no run folders), `--only time --methods lisa` reads LISA's lr
    # and equal-steps rows from the file and trains its time-matched runs only; `--only
    # steps` redoes its equal-steps rows (and what depends on them), never its lr grid
    def fresh(only: tuple[str, ...]) -> list[tuple]:
        n = len(calls)
        again = study_compare.Study(
            tmp_path / "fresh", ("sampler.lr_correction=inverse_probability",),
            lambda m: None, train=fake_train, held_out=fake_held_out, methods=("lisa",),
            earlier=before, only=only,
        )  # fmt: skip
        got = study_compare.run_stages(again, only)
        assert got["chosen_lr"] == res["chosen_lr"] and got["lr"] == res["lr"]
        return list(calls)[n:]

    trained = fresh(("time",))
    assert len(trained) == 6 and {(k[2], k[5]) for k in trained} == {("lisa", 80)}
    trained = fresh(("steps",))
    assert len(trained) == 6 and {(k[2], k[5]) for k in trained} == {("lisa", 150)}
    # an earlier file of another GRASS configuration is not carried
    other = study_compare.Study(
        tmp_path, (), lambda m: None, train=fake_train, methods=("lisa",), earlier=before
    )
    assert "equal_steps" not in other.res and "carried" not in other.res


def test_a_partial_comparison_is_not_judged():
    """One memory-matched GRASS run against LoRA's six: no goal line claims a result."""
    load_study()
    import study_compare

    def row(method, task, seed, acc):
        return {
            "method": method, "task": task, "seed": seed, "accuracy": acc,
            "correct": int(200 * acc), "scored": 200, "val_loss": 0.1,
            "train_peak_rss": 2**30, "tokens_per_s": 1.0, "train_s": 1.0, "steps": 150,
            "wall_s": 1.0, "lr": 1e-3, "trainable_params": 1, "state_bytes_device": 0,
            "peak_rss": 2**30, "cuda_peak": 0, "tokens": 1,
        }  # fmt: skip

    lora = [row("lora", t, s, 0.8) for t in ("family", "reversal") for s in (0, 1, 2)]
    res = {"equal_steps": lora, "equal_memory": {"runs": [row("grass", "family", 0, 0.2)]}}
    assert study_compare.goals(res) == [
        "- [ ] equal memory: not judged yet: GRASS has 1 of LoRA's 6 task-seed runs"
    ]
    res["equal_memory"]["runs"] = [
        row("grass", t, s, 0.9) for t in ("family", "reversal") for s in (0, 1, 2)
    ]
    assert study_compare.goals(res) == [
        "- [x] equal memory: GRASS at least LoRA's accuracy: 90.0 vs 80.0"
    ]
    # the same at equal steps: one LISA run against GRASS's six claims nothing
    grass = [row("grass", t, s, 0.7) for t in ("family", "reversal") for s in (0, 1, 2)]
    full = [row("full", "family", 0, 0.5)]
    res = {"equal_steps": grass + [row("lisa", "family", 0, 0.6)] + full}
    assert study_compare.goals(res) == [
        "- [ ] equal steps: not judged yet: LISA has 1 of GRASS's 6 task-seed runs",
        "- [ ] equal steps: not judged yet: full FT has 1 of GRASS's 6 task-seed runs",
    ]


def test_largest_fitting_gamma_by_bisection():
    load_study()
    import study_compare

    for limit in range(0, 32):
        tried: list[int] = []

        def fits(g: int, limit: int = limit, tried: list[int] = tried) -> bool:
            tried.append(g)
            return g <= limit

        for start in (1, 4, 8, 30):
            tried.clear()
            got = study_compare.largest_fitting(fits, start, 30)
            assert got == max(1, min(limit, 30)), (limit, start)
            assert len(tried) <= 6  # bisection: log2(30) + the start, not one per value


def test_compare_for_some_methods_only_trains_those(tmp_path):
    load_study()
    import study_compare

    trained: list[str] = []

    def fake_train(work, task, method, lr, seed, mode, log):
        trained.append(method)
        return {"val_loss": abs(math.log2(lr / 2e-3)), "run_dir": str(tmp_path)}

    study = study_compare.Study(tmp_path, (), lambda m: None, train=fake_train, methods=("lora",))
    res = study_compare.run_stages(study, ("lr",))
    assert res["chosen_lr"] == {"lora": 2e-3}
    assert set(trained) == {"lora"} and len(trained) == 3


def test_compare_reuses_the_screens_equal_grass_runs_for_its_lr_grid(monkeypatch, tmp_path):
    """The screen's GRASS runs at the lrs of compare's grid trained the same models
    (same recipe and overrides but for the folder and whether the model was kept):
    compare reads their validation loss instead of training them again; a screen run
    with other overrides (another recipe hash here) is not reused."""
    study = load_study()
    import json

    import study_compare

    def write_run(work, task, method, lr, seed, mode, log):
        out, _, _, key = study.compare.run_key(work, task, method, lr, seed, mode)
        out.mkdir(parents=True, exist_ok=True)
        r = {"val_loss": abs(math.log2(lr / 8e-4)) + 0.01, "tokens_per_s": 1.0,
             "train_peak_rss": 1, "train_s": 1.0, "run_dir": str(out), "key": key}  # fmt: skip
        (out / "result.json").write_text(json.dumps(r))
        return r

    monkeypatch.setattr(study.compare, "train_one", write_run)
    screen_work = tmp_path / "screen"
    args = argparse.Namespace(
        axes=["lr"], steps=150, batch=8, val_limit=100, lr=8e-4, work=screen_work
    )
    study.screen(args, lambda msg: None)  # writes lrs 4e-4, 8e-4, 1.6e-3 at seed 0
    stale = (
        study.compare.run_dir_for(
            screen_work / "base", "reversal", "grass", 1.6e-3, 0, study_compare.MODE
        )
        / "result.json"
    )
    r = json.loads(stale.read_text())
    r["key"]["training_sha256"] = "another recipe"
    stale.write_text(json.dumps(r))

    trained: list[float] = []

    def fake_train(work, task, method, lr, seed, mode, log):
        trained.append(lr)
        return {"val_loss": 1.0, "run_dir": str(work)}

    s = study_compare.Study(
        tmp_path / "compare", (), lambda m: None, train=fake_train, methods=("grass",),
        prior=study.screened(screen_work),
    )  # fmt: skip
    res = study_compare.run_stages(s, ("lr",))
    assert trained == [1.6e-3]  # the only screen run whose training differs
    assert res["lr"]["grass"] == {"4.00e-04": 1.01, "8.00e-04": 0.01, "1.60e-03": 1.0}
    assert res["chosen_lr"]["grass"] == 8e-4
    assert len(res["reused"]["grass"]) == 2
    text = study_compare.render(res, "python benchmarks/study.py compare --only lr")
    assert "GRASS's lr runs: the screen's, which trained the same models (variant base" in text


def test_a_seeded_screen_reuses_the_comparisons_equal_runs_and_adds_to_earlier_axes(
    monkeypatch, tmp_path
):
    """The comparison's GRASS runs at equal steps trained the screen's base on three
    seeds (same recipe and overrides but for the folder and the kept model): a seeded
    screen reads them instead of training again, and says so. A later screen of other
    axes keeps the earlier screen's axes when task, budget, seeds and lr agree, and
    starts afresh when they do not."""
    study = load_study()
    import json

    import study_compare

    def write_run(work, task, method, lr, seed, mode, log):
        out, _, _, key = study.compare.run_key(work, task, method, lr, seed, mode)
        out.mkdir(parents=True, exist_ok=True)
        r = {"val_loss": 0.2 + 0.01 * seed, "tokens_per_s": 1.0, "train_peak_rss": 1,
             "train_s": 1.0, "run_dir": str(out), "key": key}  # fmt: skip
        (out / "result.json").write_text(json.dumps(r))
        return r

    compare_work = tmp_path / "compare"
    mode = dataclasses_replace(study_compare.MODE, tune_task="family")
    for seed in (0, 1, 2):  # the comparison's equal-steps runs of the base
        write_run(compare_work, "family", "grass", 8e-4, seed, mode, None)
    write_run(compare_work, "family", "grass", 8e-4, 3, mode, None)  # a seed not asked for

    trained: list[tuple[int, tuple[str, ...]]] = []

    def fake_train_one(work, task, method, lr, seed, mode, log):
        trained.append((seed, tuple(mode.overrides)))
        return write_run(work, task, method, lr, seed, mode, log)

    monkeypatch.setattr(study.compare, "train_one", fake_train_one)

    def args(axes, seeds=(0, 1, 2)):
        return argparse.Namespace(
            axes=axes, steps=150, batch=8, val_limit=100, lr=8e-4, task="family",
            work=tmp_path / "screen", seeds=list(seeds), compare_work=compare_work,
        )  # fmt: skip

    first = study.screen(args(["tau"]), lambda m: None)
    first["commands"] = ["python benchmarks/study.py screen --axes tau"]
    # only the variant trained: the base's three seeds were the comparison's
    assert sorted(trained) == sorted(
        (s, ("output.save_model=false", f"sampler.tau={tau}"))
        for tau in (0.25, 1.0, 2.0)
        for s in (0, 1, 2)
    )
    assert first["base"]["val_losses"] == [0.2 + 0.01 * s for s in (0, 1, 2)]
    assert len(first["base"]["reused"]) == 3
    assert all(d.startswith(str(compare_work)) for d in first["base"]["reused"])
    text = study.render(first, "python benchmarks/study.py screen --axes tau")
    assert "Runs of the comparison that trained the same models, reused:" in text

    trained.clear()
    second = study.screen(args(["eps"]), lambda m: None, earlier=first)
    assert list(second["axes"]) == ["tau", "eps"]  # kept, then added
    assert second["axes"]["tau"] == first["axes"]["tau"]
    assert len(trained) == 2 * 3  # eps 0.0 and 0.3 on three seeds; tau not again
    text = study.render(second, "python benchmarks/study.py screen --axes eps")
    assert "kept from earlier commands: `python benchmarks/study.py screen --axes tau`" in text

    other = study.screen(args(["eps"], seeds=(0, 1)), lambda m: None, earlier=first)
    assert list(other["axes"]) == ["eps"]  # other seeds: nothing of the first kept


def test_values_screen_only_the_values_asked_for(monkeypatch, tmp_path):
    study = load_study()
    trained: list[tuple[str, ...]] = []

    def fake_train_one(work, task, method, lr, seed, mode, log):
        trained.append(tuple(mode.overrides[1:]))
        loss = 0.02 - (1e-3 if "sampler.tau=1.0" in mode.overrides else 0)
        return {"val_loss": loss, "tokens_per_s": 1.0, "train_peak_rss": 1, "train_s": 1.0}

    monkeypatch.setattr(study.compare, "train_one", fake_train_one)
    args = argparse.Namespace(
        axes=["tau"], values=[1.0], steps=10, batch=2, val_limit=5, lr=8e-4, work=tmp_path
    )
    res = study.screen(args, lambda m: None)
    assert trained == [(), ("sampler.tau=1.0",)]  # the base, then tau 1.0 alone
    assert [r["value"] for r in res["axes"]["tau"]] == [0.5, 1.0]


def test_an_interrupted_lr_grid_resumes_from_the_results_file(monkeypatch, tmp_path):
    """A grid cut off after two runs, resumed where its run folders are gone (another
    machine): the two finished runs are read from the results file, only the third is
    trained; a stored run whose training differs (another recipe) is trained again."""
    study = load_study()
    import study_compare

    class Cut(Exception):
        pass

    trained: list[float] = []

    def fake_train(work, task, method, lr, seed, mode, log):
        if len(trained) == 2 and cut:
            raise Cut
        trained.append(lr)
        _, _, _, key = study.compare.run_key(work, task, method, lr, seed, mode)
        return {"val_loss": abs(math.log2(lr / 2e-4)) + 0.01, "run_dir": str(work),
                "key": key, "losses": [1.0]}  # fmt: skip

    saved: list[dict] = []
    cut = True
    first = study_compare.Study(
        tmp_path / "a", (), lambda m: None, lambda res: saved.append(json_copy(res)),
        train=fake_train, methods=("full",),
    )  # fmt: skip
    with pytest.raises(Cut):
        study_compare.run_stages(first, ("lr",))
    earlier = saved[-1]
    assert sorted(earlier["lr_runs"]["full"]) == ["1.00e-04", "2.00e-04"]
    assert "losses" not in earlier["lr_runs"]["full"]["1.00e-04"]

    cut, trained[:] = False, []
    stale = json_copy(earlier)
    stale["lr_runs"]["full"]["1.00e-04"]["key"]["training_sha256"] = "another recipe"
    again = study_compare.Study(
        tmp_path / "b", (), lambda m: None, train=fake_train, methods=("full",),
        earlier=stale, only=("lr",),
    )  # fmt: skip
    res = study_compare.run_stages(again, ("lr",))
    assert trained == [1e-4, 4e-4]  # the stale run, and the one never run
    assert res["chosen_lr"]["full"] == 2e-4
    assert res["lr"]["full"] == {"1.00e-04": 1.01, "2.00e-04": 0.01, "4.00e-04": 1.01}
    assert "lr_runs" not in res  # the finished grid's table replaces its runs


def json_copy(x):
    import json

    return json.loads(json.dumps(x))


def test_a_screen_cut_off_mid_axis_resumes_on_a_fresh_machine(monkeypatch, tmp_path):
    """The results file keeps every run with its key: a screen cut off after the base
    and one seed of a variant, resumed where no run folder is left, trains only the
    two missing seeds; the base is the comparison's rows (read from its results file,
    with their keys), and a row of another recipe is trained again."""
    study = load_study()
    import study_compare

    class Cut(Exception):
        pass

    trained: list[tuple[int, tuple[str, ...]]] = []
    limit = [10**9]

    def fake_train_one(work, task, method, lr, seed, mode, log):
        if len(trained) == limit[0]:
            raise Cut
        trained.append((seed, tuple(mode.overrides[1:])))
        _, _, _, key = study.compare.run_key(work, task, method, lr, seed, mode)
        return {"val_loss": 0.2 + 0.01 * seed, "tokens_per_s": 1.0, "train_peak_rss": 1,
                "train_s": 1.0, "run_dir": str(work), "key": key, "losses": [1.0]}  # fmt: skip

    monkeypatch.setattr(study.compare, "train_one", fake_train_one)
    mode = dataclasses_replace(study_compare.MODE, tune_task="family")
    made = []
    for seed in (0, 1, 2):  # the comparison's equal-steps rows of the base, keys kept
        made.append({**fake_train_one(tmp_path / "c", "family", "grass", 8e-4, seed, mode, None),
                     "task": "family", "method": "grass", "lr": 8e-4, "seed": seed})  # fmt: skip
    made[2]["key"] = {"training_sha256": "another recipe"}
    trained.clear()

    def args(work):
        return argparse.Namespace(
            axes=["tau"], values=[1.0], steps=150, batch=8, val_limit=100, lr=8e-4,
            task="family", work=work, seeds=[0, 1, 2], compare_work=tmp_path / "gone",
        )  # fmt: skip

    saved: list[dict] = []
    limit[0] = 2  # the base's seed 2 (another recipe), then tau 1.0's seed 0; cut
    with pytest.raises(Cut):
        study.screen(args(tmp_path / "a"), lambda m: None, lambda r: saved.append(json_copy(r)),
                     made=made)  # fmt: skip
    assert trained == [(2, ()), (0, ("sampler.tau=1.0",))]
    earlier = saved[-1]
    assert [(r["seed"], r["val_loss"]) for r in earlier["runs"]] == [(2, 0.22), (0, 0.2)]

    trained.clear()
    limit[0] = 10**9
    res = study.screen(args(tmp_path / "b"), lambda m: None, earlier=earlier, made=made)
    assert trained == [(1, ("sampler.tau=1.0",)), (2, ("sampler.tau=1.0",))]
    assert res["base"]["val_losses"] == [0.2 + 0.01 * s for s in (0, 1, 2)]
    assert res["axes"]["tau"][1]["val_losses"] == [0.2 + 0.01 * s for s in (0, 1, 2)]
    assert len(res["runs"]) == 4  # the screen's own: base seed 2, tau 1.0 seeds 0-2
    assert len(res["base"]["reused"]) == 2  # the comparison's seeds 0 and 1


def test_results_names_the_screens_file_and_leaves_the_default_alone(monkeypatch, tmp_path):
    """A screen at another lr would replace the task's file's axes; `--results` gives it
    a file of its own, and compare refuses the flag (its file is fixed)."""
    study = load_study()

    def fake_train_one(work, task, method, lr, seed, mode, log):
        loss = 0.03 - (1e-3 if "sampler.gamma=30" in mode.overrides else 0)
        return {"val_loss": loss, "tokens_per_s": 1.0, "train_peak_rss": 1, "train_s": 1.0}

    monkeypatch.setattr(study.compare, "train_one", fake_train_one)
    monkeypatch.setattr(study, "ROOT", tmp_path)
    (tmp_path / "benchmarks/results").mkdir(parents=True)
    default = tmp_path / "benchmarks/results/study-seeds-family.json"
    default.write_text('{"kept": true}')
    argv = ["study.py", "screen", "--task", "family", "--lr", "2e-4", "--seeds", "0", "1",
            "--axes", "gamma", "--values", "30", "--work", str(tmp_path / "runs"),
            "--compare-work", str(tmp_path / "none"), "--results", "diag-family"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    study.main()
    out = json.loads((tmp_path / "benchmarks/results/diag-family.json").read_text())
    assert out["lr"] == 2e-4 and out["seeds"] == [0, 1]
    assert [r["value"] for r in out["axes"]["gamma"]] == [4, 30]
    assert out["axes"]["gamma"][1]["val_losses"] == pytest.approx([0.029, 0.029])
    assert "| gamma | 30 |" in (tmp_path / "benchmarks/results/diag-family.md").read_text()
    assert default.read_text() == '{"kept": true}'  # the task's own file untouched
    monkeypatch.setattr(sys, "argv", ["study.py", "compare", "--results", "x"])
    with pytest.raises(SystemExit) as exc:
        study.main()
    assert exc.value.code == 2
