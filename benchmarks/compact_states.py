"""Compact AdamW moments (optimizer.state_dtype), measured: the libraries side by side,
and held-out accuracy of bf16 / 8-bit moments against fp32.

    python benchmarks/compact_states.py library             # the libraries, one process
    python benchmarks/compact_states.py library --device cuda
    python benchmarks/compact_states.py accuracy            # 2 tasks x 3 seeds x 3 dtypes
    python benchmarks/compact_states.py accuracy --steps 10 --seeds 0 --test-limit 20

`library` times one AdamW step over the weight matrices of a Llama-3.2-1B block
(60.8M parameters) for each implementation, after a first step that is timed on its
own (torchao compiles there), and measures how far each one's weights drift from
fp32 AdamW's after 50 steps on the same gradients (a SmolLM2-135M block, 3.5M
parameters, gradients of a fixed seed): the drift over the distance fp32 AdamW
moved the weights. Implementations: torch's fused AdamW (fp32 moments, the
default), ours with bf16 moments (offload/compact.py, on torch's fused kernel),
bitsandbytes' AdamW8bit, and torchao's AdamW8bit when torchao is installed (it is
not a dependency: `pip install torchao` to include it). State bytes are counted
from the tensors each one keeps (torchao's 8-bit state is a tensor subclass: its
codes and scales are counted). Results: benchmarks/results/compact-library[-cuda].{json,md}.

`accuracy` trains GRASS from recipes/bench/grass.yaml (SmolLM2-135M, batch 8) on
the two bench tasks (reversal, family), at three seeds, 150 steps and the study's
lr (8e-4), once per state_dtype, with the offloaded store (target cpu), and scores
each model on 200 held-out items (`grass eval --kind generate`, greedy), through
benchmarks/compare.py's runner (a child process per run; runs in --work are reused
when their recipe and overrides are unchanged). The table gives, per dtype and
task, the mean and spread of held-out accuracy, the difference from fp32 seed by
seed (the same seed gives the same data order), the validation loss, peak RSS and
time. Goal (issue 36): bf16 or 8-bit moments lose at most 1 point against fp32.
Results: benchmarks/results/compact-accuracy.{json,md}. This is about 18 runs of
5 minutes on a 2-core CPU: give it a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks/results"
# One Llama-3.2-1B block's weight matrices (hidden 2048, 8 kv heads of 64, MLP 8192).
BLOCK_1B = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048),
            (8192, 2048), (8192, 2048), (2048, 8192)]  # fmt: skip
# One SmolLM2-135M block's (hidden 576, 3 kv heads of 64, MLP 1536).
BLOCK_135M = [(576, 576), (192, 576), (192, 576), (576, 576),
              (1536, 576), (1536, 576), (576, 1536)]  # fmt: skip
DTYPES = ("fp32", "bf16", "8bit")


# ------------------------------------------------------------------ libraries


def _makers() -> dict[str, Any]:
    """name -> (function making the optimizer over params at lr, lr as a tensor?)."""
    import torch

    from grass_cli.offload.compact import BF16MomentsAdamW, eight_bit_adamw

    makers: dict[str, Any] = {
        "torch AdamW, fp32 moments (fused)": lambda ps, lr: torch.optim.AdamW(
            ps, lr=lr, fused=True
        ),
        "grass bf16 moments (torch fused kernel)": lambda ps, lr: BF16MomentsAdamW(
            ps, lr=lr, fused=True
        ),
        "bitsandbytes AdamW8bit": lambda ps, lr: eight_bit_adamw([{"params": ps}], {"lr": lr}),
    }
    try:
        import logging

        logging.getLogger("torchao").setLevel(logging.ERROR)
        from torchao.optim import AdamW8bit

        makers["torchao AdamW8bit"] = lambda ps, lr: AdamW8bit(ps, lr=torch.tensor(lr))
    except ImportError:
        pass
    return makers


def _state_bytes(opt: Any) -> int:
    import torch

    total = 0
    for st in opt.state.values():
        for v in st.values():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            inner = [getattr(v, a) for a in ("codes", "scale") if hasattr(v, a)]
            parts = inner or [v]  # torchao's subclass: its codes and scales
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


def _params(shapes: list[tuple[int, int]], seed: int, device: str) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device)) for s in shapes]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def library(steps: int, drift_steps: int, device: str = "cpu") -> dict[str, Any]:
    """Step time and state bytes on a 1B block, drift from fp32 on a 135M block."""
    import torch

    rows = []
    n_big = sum(a * b for a, b in BLOCK_1B)
    reference: list[Any] | None = None
    start = [p.detach().clone() for p in _params(BLOCK_135M, 1, device)]
    g = torch.Generator().manual_seed(2)
    grads = [
        [(torch.randn(s, generator=g) * 1e-3).to(device) for s in BLOCK_135M]
        for _ in range(drift_steps)
    ]
    for name, make in _makers().items():
        ps = _params(BLOCK_1B, 0, device)
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make(ps, 1e-4)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        first = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        state = _state_bytes(opt)
        del opt, ps
        small = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make(small, 1e-3)
        for step_grads in grads:
            for p, gr in zip(small, step_grads, strict=True):
                p.grad = gr.clone()
            opt.step()
        final = [p.detach().clone() for p in small]
        if reference is None:
            reference = final  # the first maker is fp32 AdamW
        moved = sum(((r - s) ** 2).sum() for r, s in zip(reference, start, strict=True)) ** 0.5
        gap = sum(((f - r) ** 2).sum() for f, r in zip(final, reference, strict=True)) ** 0.5
        rows.append(
            {
                "implementation": name,
                "step_s": statistics.median(times),
                "first_step_s": first,
                "state_bytes_per_param": state / n_big,
                "drift": float(gap / moved),
            }
        )
    base = rows[0]["step_s"]
    for r in rows:
        r["x_fp32"] = r["step_s"] / base
    return {
        "command": "python benchmarks/compact_states.py " + " ".join(sys.argv[1:]),
        "device": device,
        "machine": (
            torch.cuda.get_device_name()
            if device == "cuda"
            else f"{platform.machine()}, {torch.get_num_threads()} threads"
        )
        + f", torch {torch.__version__}",
        "block_params": n_big,
        "drift_steps": drift_steps,
        "rows": rows,
    }


def library_md(res: dict[str, Any]) -> str:
    lines = [
        f"AdamW step over one Llama-3.2-1B block ({res['block_params'] / 1e6:.1f}M "
        f"parameters), {res['device']} ({res['machine']}); drift: weights after "
        f"{res['drift_steps']} steps on a SmolLM2-135M block against fp32 AdamW's, over "
        "the distance fp32 AdamW moved them.",
        "",
        "| implementation | step (s) | x fp32 | first step (s) | state bytes / param | drift |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['implementation']} | {r['step_s']:.3f} | {r['x_fp32']:.1f} | "
            f"{r['first_step_s']:.2f} | {r['state_bytes_per_param']:.3f} | {r['drift']:.4f} |"
        )
    lines += ["", f"command: `{res['command']}`"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- accuracy


def accuracy(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    """Every (seed, task, dtype) run and its held-out score, through compare.py; the
    results are saved after each run (`save`), so a stopped benchmark leaves the
    seeds it finished, and a rerun reuses every run already done."""
    import compare

    work = Path(args.work)
    res: dict[str, Any] = {
        "command": "python benchmarks/compact_states.py accuracy " + " ".join(sys.argv[2:]),
        "steps": args.steps,
        "lr": args.lr,
        "test_limit": args.test_limit,
        "runs": [],
    }
    for seed in args.seeds:  # seed-major: a stopped run still compares every dtype
        for task in args.tasks:
            for dtype in args.dtypes:
                # fp32 is the default: no override, so its runs are the plain bench runs
                extra = () if dtype == "fp32" else (f"optimizer.state_dtype={dtype}",)
                mode = compare.Mode(
                    steps=args.steps,
                    micro_batch=8,
                    seeds=tuple(args.seeds),
                    lr_grid=(1.0,),
                    val_limit=args.val_limit,
                    test_limit=args.test_limit,
                    overrides=("optimizer.offload.target=cpu", *extra),
                )
                run = compare.train_one(work / dtype, task, "grass", args.lr, seed, mode, _log)
                held = compare.held_out(run, mode, _log)
                res["runs"].append(
                    {
                        "task": task,
                        "dtype": dtype,
                        "seed": seed,
                        "accuracy": held["accuracy"],
                        "val_loss": run["val_loss"],
                        "train_peak_rss": run["train_peak_rss"],
                        "wall_s": run.get("wall_s"),
                    }
                )
                save(res)
    return res


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def accuracy_md(res: dict[str, Any]) -> str:
    runs = res["runs"]
    lines = [
        f"GRASS on SmolLM2-135M, {res['steps']} steps x batch 8, lr {res['lr']}, "
        f"offloaded state; held-out exact match on {res['test_limit']} items; the seeds "
        "every dtype of a task has finished, paired by seed.",
        "",
        "| task | state_dtype | accuracy (mean +- sd) | vs fp32, by seed (points) | "
        "val loss | peak RSS (GB) | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    extra = []
    for task in dict.fromkeys(r["task"] for r in runs):
        mine = [r for r in runs if r["task"] == task]
        dtypes = list(dict.fromkeys(r["dtype"] for r in mine))
        # paired: only the seeds every dtype of this task has finished
        common = set.intersection(*({r["seed"] for r in mine if r["dtype"] == d} for d in dtypes))
        extra += [r for r in mine if r["seed"] not in common]
        base = {r["seed"]: r for r in mine if r["dtype"] == "fp32" and r["seed"] in common}
        for dtype in dtypes:
            rs = [r for r in mine if r["dtype"] == dtype and r["seed"] in common]
            if not rs:
                continue
            acc = [100 * r["accuracy"] for r in rs]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            diffs = [
                f"{100 * (r['accuracy'] - base[r['seed']]['accuracy']):+.1f}"
                for r in rs
                if r["seed"] in base
            ]
            wall = [r["wall_s"] for r in rs if r.get("wall_s")]
            lines.append(
                f"| {task} | {dtype} | {statistics.mean(acc):.1f} +- {sd:.1f} | "
                f"{', '.join(diffs) if dtype != 'fp32' else '-'} | "
                f"{statistics.mean(r['val_loss'] for r in rs):.4f} | "
                f"{max(r['train_peak_rss'] for r in rs) / 1e9:.2f} | "
                f"{statistics.mean(wall) if wall else float('nan'):.0f} |"
            )
    if extra:  # a stopped benchmark: runs of seeds not every dtype has yet
        lines += ["", "Not yet paired (left out of the table above):"]
        lines += [
            f"- {r['task']} {r['dtype']} seed {r['seed']}: {100 * r['accuracy']:.1f}" for r in extra
        ]
    lines += ["", f"command: `{res['command']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    lib = sub.add_parser("library", help="the libraries side by side")
    lib.add_argument("--steps", type=int, default=5)
    lib.add_argument("--drift-steps", type=int, default=50)
    lib.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    acc = sub.add_parser("accuracy", help="held-out accuracy by state_dtype")
    acc.add_argument("--tasks", nargs="+", default=["reversal", "family"])
    acc.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    acc.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    acc.add_argument("--steps", type=int, default=150)
    acc.add_argument("--lr", type=float, default=8e-4)
    acc.add_argument("--val-limit", type=int, default=200)
    acc.add_argument("--test-limit", type=int, default=200)
    acc.add_argument("--work", default="runs/compact")
    acc.add_argument("--results", default="compact-accuracy")
    args = ap.parse_args()
    from grass_cli.atomic import write_atomic_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.what == "library":
        res = library(args.steps, args.drift_steps, args.device)
        stem = "compact-library" + ("" if args.device == "cpu" else f"-{args.device}")
        md = library_md(res)
    else:

        def save(partial: dict[str, Any]) -> None:
            write_atomic_text(RESULTS / f"{args.results}.json", json.dumps(partial, indent=2))
            write_atomic_text(RESULTS / f"{args.results}.md", accuracy_md(partial))

        res = accuracy(args, save)
        stem, md = args.results, accuracy_md(res)
    write_atomic_text(RESULTS / f"{stem}.json", json.dumps(res, indent=2) + "\n")
    write_atomic_text(RESULTS / f"{stem}.md", md)
    print(md)


if __name__ == "__main__":
    main()
