"""Crash consistency by fault injection: kill real `grass train` runs at random moments,
resume each with --resume auto until it finishes, and compare with a run never killed.

    python benchmarks/chaos.py --kills 100            # the published run (about 25 min here)
    python benchmarks/chaos.py --kills 15 --seed 3    # the CI form (tests/test_chaos.py)

Three recipes on a tiny random-weight Llama (4 blocks, the SmolLM2 vocabulary), each
with checkpoints every 3 steps, an eval every 4 and TensorBoard on:
`grass-disk` (GRASS, optimizer state offloaded to disk and streamed per step),
`lisa-keep` (LISA, state kept) and `lora` (peft's LoRA). The kills are shared out
over them, a third each.

Kills cycle through SIGKILL x3, SIGTERM and SIGINT (which must checkpoint and exit
143 / 130), at a seeded random moment of the run. A watcher polls the run folder
every half millisecond; for three kills in five it waits, after that moment, for a
checkpoint being written (`.tmp-step-*`), an offload file being rewritten, or the
final model being saved (`.final.tmp`), and kills right then: those moments are hit
on purpose, not by luck. After each
kill the run resumes with `--resume auto` (or starts over with --overwrite when it
died before its first checkpoint, as a user would).

Checked at the end of every recipe, against its uninterrupted twin:
- every step's loss in metrics.jsonl bit-identical, each step once, every line JSON;
- the final weights bit-identical (every tensor of model.safetensors);
- no temporary folder or file left (`.tmp-*`, `.final.tmp`, `*.tmp`);
- the run folder's size never above what `grass validate` predicted it would write
  (sampled at every poll).
Results: benchmarks/results/chaos.md (and .json): kills by signal and by the moment
they hit, resumes, checks. Exit 1 if any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grass_cli.atomic import write_atomic_text  # noqa: E402

STEPS = 24
RECIPES: dict[str, dict[str, Any]] = {
    "grass-disk": {
        "sampler": {"strategy": "grass", "gamma": 2, "switch_interval": 2, "probe_steps": 2,
                    "update_interval": 2},
        "optimizer": {"state_policy": "offload",
                      "offload": {"target": "disk", "residency": "step"}},
    },
    "lisa-keep": {
        "sampler": {"strategy": "lisa", "gamma": 2, "switch_interval": 2},
        "optimizer": {"state_policy": "keep"},
    },
    "lora": {"sampler": {"strategy": "lora"}, "optimizer": {"state_policy": "keep"},
             "lora": {"r": 4, "alpha": 8}},
}  # fmt: skip


def tiny_model(folder: Path) -> Path:
    """A 4-block random-weight Llama with the SmolLM2 tokenizer (fixed seed)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from grass_cli.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("embedded:smollm2-135m-instruct"))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def recipe(model: Path, out: Path, name: str) -> dict[str, Any]:
    data = ROOT / "data/quickstart"
    r: dict[str, Any] = {
        "model": {"path": str(model)},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"),
                 "max_length": 64, "limit": 96, "eval_limit": 16},
        "optimizer": {"lr": 1e-3},
        "training": {"max_steps": STEPS, "micro_batch_size": 4, "seed": 11,
                     "eval_interval": 4},
        "checkpoint": {"interval": 3, "keep_last": 2, "at_end": True},
        "output": {"dir": str(out), "save_model": True, "tensorboard": True},
    }  # fmt: skip
    for key, value in RECIPES[name].items():
        r.setdefault(key, {}).update(value)
    return r


def write_recipe(path: Path, r: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(r))
    return path


def grass_train(recipe_file: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grass_cli", "train", str(recipe_file), "--no-live", "--quiet",
         *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):  # (removed while walking)
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def moment(run: Path) -> str:
    """What the run is doing, as far as its folder shows."""
    ck = run / "checkpoints"
    if (run / ".final.tmp").exists():
        return "final save"
    if ck.is_dir() and any(p.name.startswith(".tmp-step-") for p in ck.iterdir()):
        return "checkpoint write"
    off = run / "offload"
    if off.is_dir():
        now = time.time()
        for p in off.glob("*.bin"):
            try:
                if now - p.stat().st_mtime < 0.005:
                    return "offload write-back"
            except OSError:
                pass
    return "training step / eval / metrics append"


def predicted_bytes(recipe_file: Path) -> int:
    from grass_cli.preflight import preflight
    from grass_cli.recipe import load_recipe

    found = preflight(load_recipe(recipe_file), run_dir=False, training=False)
    return sum(found.disk_needed.values())


SIGNALS = ("SIGKILL", "SIGKILL", "SIGKILL", "SIGTERM", "SIGINT")  # cycled: kill i uses i % 5
TARGETS = ("any", "checkpoint write", "offload write-back", "final save", "any")
OTHER = "training step / eval / metrics append"


def one_life(recipe_file: Path, run: Path, rng: random.Random, kill: int | None,
             log: dict[str, Any]) -> int | None:  # fmt: skip
    """Start (or resume) the run; with `kill` (the kill's number), kill it at a seeded
    random moment, or at the first moment of the kind TARGETS names after it. Returns
    the exit code, or None when SIGKILL ended it."""
    args = ["--resume", "auto"]
    if run.is_dir() and any(run.iterdir()) and not (run / "checkpoints" / "latest").exists():
        args = ["--overwrite"]  # died before its first checkpoint: start over
    proc = grass_train(recipe_file, *args)
    deadline = time.time() + rng.uniform(0.5, 10.0)
    sig = signal.Signals[SIGNALS[kill % 5]] if kill is not None else None
    target = TARGETS[kill % 5] if kill is not None else None
    if target == "offload write-back" and not (run / "offload").exists() and "disk" not in run.name:
        target = "any"
    polls = 0
    while proc.poll() is None:
        polls += 1
        if polls % 20 == 1:  # (walking the folder is slow; sizes every 20th poll)
            log["max_bytes"] = max(log["max_bytes"], folder_bytes(run) if run.is_dir() else 0)
        if sig is not None and time.time() >= deadline:
            now = moment(run) if run.is_dir() else "start"
            if target == "any" or now == target:
                proc.send_signal(sig)
                log["kills"].append({"signal": sig.name, "moment": now})
                code = proc.wait(timeout=300)
                stderr = proc.stderr.read() if proc.stderr else ""
                if "Traceback" in stderr:
                    log["failures"].append(f"traceback after {sig.name}: {stderr[-500:]}")
                if sig != signal.SIGKILL:
                    want = 143 if sig == signal.SIGTERM else 130
                    # -N: the signal arrived while Python was still starting, before any
                    # handler could exist (nothing to save yet); 0: it had just finished
                    if code not in (want, -sig.value, 0):
                        log["failures"].append(f"{sig.name}: exit {code}, want {want}: "
                                               f"{stderr[-300:]}")  # fmt: skip
                    if code == -sig.value:
                        log["kills"][-1]["moment"] = "start"
                return code if sig != signal.SIGKILL else None
        time.sleep(0.0005)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        log["failures"].append(f"exit {proc.returncode} on its own: {stderr[-500:]}")
    return proc.returncode


def step_losses(run: Path, log: dict[str, Any]) -> dict[int, float]:
    losses: dict[int, float] = {}
    for i, line in enumerate((run / "metrics.jsonl").read_text().splitlines(), 1):
        try:
            e = json.loads(line)
        except ValueError:
            log["failures"].append(f"metrics.jsonl line {i} is not JSON: {line[:80]}")
            continue
        if e.get("event") == "step":
            if e["step"] in losses:
                log["failures"].append(f"step {e['step']} appears twice in metrics.jsonl")
            losses[e["step"]] = e["loss"]
    return losses


def weights(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted((run / "final").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def check(name: str, run: Path, twin: Path, predicted: int, log: dict[str, Any]) -> None:
    import torch

    mine, theirs = step_losses(run, log), step_losses(twin, log)
    if sorted(mine) != list(range(STEPS)):
        log["failures"].append(f"{name}: steps in metrics.jsonl {sorted(mine)}")
    if mine != theirs:
        bad = [s for s in theirs if mine.get(s) != theirs[s]]
        log["failures"].append(f"{name}: losses differ from the uninterrupted run at {bad[:5]}")
    a, b = weights(run), weights(twin)
    if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
        log["failures"].append(f"{name}: final weights differ from the uninterrupted run")
    left = [str(p.relative_to(run)) for p in run.rglob("*")
            if p.name.startswith(".tmp-") or p.name.endswith((".tmp", ".final.tmp"))]  # fmt: skip
    if left:
        log["failures"].append(f"{name}: temporary files left: {left[:5]}")
    if log["max_bytes"] > predicted:
        log["failures"].append(
            f"{name}: the run folder reached {log['max_bytes']} bytes, over the "
            f"{predicted} pre-flight predicted"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/chaos")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    report: dict[str, Any] = {"kills": args.kills, "seed": args.seed, "recipes": {}}
    failures: list[str] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="grass-chaos-") as tmp:
        work = Path(tmp)
        model = tiny_model(work / "model")
        share = [args.kills // len(args.recipes)] * len(args.recipes)
        for i in range(args.kills % len(args.recipes)):
            share[i] += 1
        for name, kills in zip(args.recipes, share, strict=True):
            twin_file = write_recipe(
                work / f"{name}-twin.yaml", recipe(model, work / f"{name}-twin", name)
            )
            run_dir = work / name
            run_file = write_recipe(work / f"{name}.yaml", recipe(model, run_dir, name))
            twin_log: dict[str, Any] = {"max_bytes": 0, "kills": [], "failures": []}
            one_life(twin_file, work / f"{name}-twin", rng, None, twin_log)
            predicted = predicted_bytes(run_file)
            log: dict[str, Any] = {"max_bytes": 0, "kills": [], "failures": [], "lives": 0}
            while True:
                log["lives"] += 1
                done = len(log["kills"])
                code = one_life(run_file, run_dir, rng, done if done < kills else None, log)
                if code == 0 and done >= kills:
                    break
                if code == 0 and len(log["kills"]) == done:  # finished before its kill
                    shutil.rmtree(run_dir)  # (a new run takes the remaining kills)
                if log["lives"] > 10 * kills + 10:
                    log["failures"].append("the run never finished")
                    break
            check(name, run_dir, work / f"{name}-twin", predicted, log)
            failures += log["failures"] + twin_log["failures"]
            report["recipes"][name] = {
                "kills": len(log["kills"]),
                "lives": log["lives"],
                "by_signal": _count(k["signal"] for k in log["kills"]),
                "by_moment": _count(k["moment"] for k in log["kills"]),
                "max_folder_bytes": log["max_bytes"],
                "predicted_bytes": predicted,
                "failures": log["failures"] + twin_log["failures"],
            }
    report["seconds"] = round(time.time() - t0)
    report["passed"] = not failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(args.out.with_suffix(".json"), json.dumps(report, indent=1))
    write_atomic_text(args.out.with_suffix(".md"), table(report, args))
    print(args.out.with_suffix(".md").read_text())
    sys.exit(0 if not failures else 1)


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def table(report: dict[str, Any], args: argparse.Namespace) -> str:
    moments = sorted({m for r in report["recipes"].values() for m in r["by_moment"]})
    lines = [
        f"# Fault injection: {report['kills']} kills (seed {report['seed']})",
        "",
        f"`python benchmarks/chaos.py --kills {args.kills} --seed {args.seed}` on this "
        f"machine: {report['seconds']} s. Result: "
        + ("**passed**: every check held." if report["passed"] else "**FAILED**."),
        "",
        "| recipe | kills | SIGKILL / SIGTERM / SIGINT | "
        + " | ".join(moments)
        + " | lives | folder peak / predicted (MB) | failures |",
        "|---|---|---|" + "---|" * len(moments) + "---|---|---|",
    ]
    for name, r in report["recipes"].items():
        sig = r["by_signal"]
        lines.append(
            f"| {name} | {r['kills']} | {sig.get('SIGKILL', 0)} / {sig.get('SIGTERM', 0)} / "
            f"{sig.get('SIGINT', 0)} | "
            + " | ".join(str(r["by_moment"].get(m, 0)) for m in moments)
            + f" | {r['lives']} | {r['max_folder_bytes'] / 1e6:.1f} / "
            f"{r['predicted_bytes'] / 1e6:.1f} | {len(r['failures'])} |"
        )
    lines += ["", "Checked per recipe against its uninterrupted twin: each step's loss "
              "bit-identical and present once, every metrics line JSON, the final weights "
              "bit-identical, no temporary file left, the folder never above pre-flight's "
              "prediction."]  # fmt: skip
    fails = [f for r in report["recipes"].values() for f in r["failures"]]
    if fails:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in fails]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
