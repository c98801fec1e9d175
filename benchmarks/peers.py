"""Ours against what users would run instead, side by side: HF Trainer, HF Trainer + LISA, peft.

    python benchmarks/peers.py                  # 7 trainings, ~25 minutes on a 2-core CPU
    python benchmarks/peers.py --steps 12       # a quick look

The peers, written by us from their public behaviour (no code of theirs):
- `hf-full`: transformers' Trainer, full fine-tuning, AdamW;
- `hf-lisa`: the same Trainer with a callback that, every `--switch` steps, freezes
  every decoder block and unfreezes `--gamma` random ones (embeddings and LM head
  always train), which is how LMFlow and axolotl run LISA;
- `peft-lora`: the Trainer on a peft LoRA model (r 16 on the attention and MLP
  projections, as our recipes/bench/lora.yaml);
- `hf-grass`: the same Trainer with our plug-in, `GrassCallback(...).attach(trainer)`
  (grass_cli.integrations.hf), set as our `grass` run: what a Trainer user gets.
Ours: `full`, `lisa` (keep, embeddings and head trained, as the peer), `lora`,
`grass` (offload to disk, streamed per step; embeddings and head frozen).

Every run trains SmolLM2-135M-Instruct in fp32 on the same rows of the quickstart
data, tokenized once by grass (so the same tokens and labels), in the same batches
and order (the peers read the rows in grass's seeded batch order through a
sequential sampler, so no run is faster merely for having drawn shorter batches),
with the same max_length, steps, AdamW (fused, HF Trainer's default; no weight
decay), gradient clipping at 1.0, constant learning rate and seed, each in its own
child process, one after the other. Same weights and same batches give the same
losses: the first step's loss of every run, and every step's loss of full against
hf-full, are compared (`max |loss - peer|`). Reported per run: trained (non-pad)
tokens per second over the steps after `--warmup`, the process's peak RSS, the
last step's loss; and each of ours as a ratio to the peer of the same method
(GRASS against hf-lisa, the layer-wise peer users pick today; hf-grass against
hf-lisa too, and below the table our engine against hf-grass: what the plug-in
costs or saves against `grass train` on the same Trainer batches).

GRASS offloads the state of frozen blocks to disk and brings a block's state back
once per switch (residency `interval`), its default; `--grass-residency step`
streams it parameter by parameter at every step (least memory, slowest).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runstats import run_children  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("hf-full", "hf-lisa", "peft-lora", "hf-grass")
OURS = {
    "full": [
        "sampler.strategy=full",
        "sampler.train_embeddings=true",
        "sampler.train_head=true",
        "optimizer.state_policy=keep",
    ],
    "lisa": [
        "sampler.strategy=lisa",
        "sampler.train_embeddings=true",
        "sampler.train_head=true",
        "optimizer.state_policy=keep",
    ],
    "lora": ["sampler.strategy=lora", "optimizer.state_policy=keep"],
    "grass": [
        "sampler.strategy=grass",
        "optimizer.state_policy=offload",
        "optimizer.offload.target=disk",
    ],
}
PEER_OF = {
    "full": "hf-full",
    "lisa": "hf-lisa",
    "lora": "peft-lora",
    "grass": "hf-lisa",
    "hf-grass": "hf-lisa",
}


def reset_peak() -> None:
    """Restart the kernel's RSS high-water mark (Linux: clear_refs 5), so the peak read
    at the end is the training's own, not the model load's: both sides load the model
    the same way, and that transient is what the process peak shows for LISA."""
    Path("/proc/self/clear_refs").write_text("5")


def training_peak() -> int:
    """VmHWM since `reset_peak`, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def settings_overrides(a: dict[str, Any]) -> list[str]:
    return [
        "model.dtype=float32",
        "model.gradient_checkpointing=false",
        f"data.train={a['data']}",
        f"data.limit={a['rows']}",
        "data.eval=null",
        f"data.max_length={a['max_length']}",
        f"training.micro_batch_size={a['batch']}",
        "training.grad_accum_steps=1",
        f"training.max_steps={a['steps']}",
        f"training.seed={a['seed']}",
        "training.lr_scheduler=constant",
        "training.warmup_steps=0",
        f"optimizer.lr={a['lr']}",
        "optimizer.weight_decay=0.0",
        "optimizer.fused=true",
        "training.grad_clip=1.0",
        f"sampler.gamma={a['gamma']}",
        f"sampler.switch_interval={a['switch']}",
        "checkpoint.at_end=false",
        "checkpoint.interval=null",
        "output.save_model=false",
        f"output.dir={a['out']}",
    ]


def ours_child(a: dict[str, Any]) -> dict[str, Any]:
    from runstats import read_events

    from grass_cli.engine import run_training
    from grass_cli.recipe import load_recipe
    from grass_cli.telemetry import Telemetry

    class PeakReset:
        """Restarts the RSS peak at `start` (model loaded, data built)."""

        def emit(self, event: dict[str, Any]) -> None:
            if event["event"] == "start":
                reset_peak()

        def close(self) -> None:
            pass

    extra = []
    if a["method"] == "grass":
        extra = [f"optimizer.offload.residency={a['grass_residency']}"]
    overrides = settings_overrides(a) + OURS[a["method"]] + extra
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", overrides)
    result = run_training(recipe, Telemetry([PeakReset()]), overwrite=True)
    _, steps = read_events(result.run_dir)
    # wall time between consecutive step events: the whole iteration, telemetry included
    timed = steps[max(a["warmup"], 1) :]
    wall = steps[-1]["elapsed_s"] - steps[max(a["warmup"], 1) - 1]["elapsed_s"]
    return {
        "tokens_per_s": sum(e["tokens"] for e in timed) / wall,
        "last_loss": steps[-1]["loss"],
        "losses": [e["loss"] for e in steps],
    }


def _rows(a: dict[str, Any]) -> tuple[Any, list[dict[str, list[int]]]]:
    """grass's own tokenization of the rows, in the order grass's seeded batches visit
    them, so every run sees the same tokens in the same batches."""
    from grass_cli.data import BatchIterator, build_dataset
    from grass_cli.models import load_model_and_tokenizer
    from grass_cli.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", settings_overrides(a))
    model, tok, _ = load_model_and_tokenizer(recipe.model)
    data = build_dataset(recipe.data, tok, "train")
    batches = BatchIterator(data, a["batch"], tok.pad_token_id, seed=a["seed"], shuffle=True)
    order = [batches.next_indices() for _ in range(a["steps"])]
    if any(len(b) != a["batch"] for b in order):
        raise SystemExit("--rows must be a multiple of --batch (a partial batch would shift")
    rows = [{"input_ids": data.input_ids[i], "labels": data.labels[i]} for b in order for i in b]
    return (model, tok), rows


def peer_child(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    (model, tok), rows = _rows(a)
    pad = tok.pad_token_id
    times: list[tuple[float, int]] = []
    losses: list[float] = []
    seen = {"tokens": 0}

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), n), pad)
        labels = torch.full((len(batch), n), -100)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        seen["tokens"] = int(mask.sum())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    class Clock(TrainerCallback):
        """Wall time from one step's end to the next (data, forward, backward, step,
        callbacks: what a user waits for), as our step_time measures it."""

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            self.t0 = time.perf_counter()
            reset_peak()  # model loaded, data built: the training's own peak from here

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            now = time.perf_counter()
            times.append((now - self.t0, seen["tokens"]))
            self.t0 = now

    callbacks: list[TrainerCallback] = [Clock()]
    if a["method"] == "hf-lisa":
        callbacks.append(_lisa_callback(model, a["gamma"], a["switch"], a["seed"]))
    if a["method"] == "peft-lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    args = TrainingArguments(
        output_dir=a["out"],
        per_device_train_batch_size=a["batch"],
        max_steps=a["steps"],
        learning_rate=a["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch_fused",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=a["seed"],
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )

    class InOrder(Trainer):
        """The Trainer reading the rows in grass's batch order (they arrive ordered)."""

        def _get_train_sampler(self, train_dataset=None):  # noqa: ANN001, ANN202
            return SequentialSampler(train_dataset if train_dataset is not None else rows)

        def compute_loss(self, model, inputs, *args, **kw):  # noqa: ANN001, ANN201
            # the step's loss unrounded (the Trainer's log rounds it to 4 places)
            out = super().compute_loss(model, inputs, *args, **kw)
            loss = out[0] if isinstance(out, tuple) else out
            losses.append(float(loss.detach()))
            return out

    trainer = InOrder(
        model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=callbacks
    )
    if a["method"] == "hf-grass":  # our plug-in, set as our `grass` run
        from grass_cli.integrations.hf import GrassCallback

        sampler = {"strategy": "grass", "gamma": a["gamma"], "switch_interval": a["switch"]}
        optimizer = {
            "state_policy": "offload", "weight_decay": 0.0, "fused": True,
            "offload": {"target": "disk", "residency": a["grass_residency"]},
        }  # fmt: skip
        GrassCallback(sampler, optimizer, state_dir=a["out"]).attach(trainer)
    trainer.train()
    timed = times[a["warmup"] :]
    return {
        "tokens_per_s": sum(n for _, n in timed) / sum(t for t, _ in timed),
        "last_loss": losses[-1] if losses else float("nan"),
        "losses": losses,
    }


def _lisa_callback(model: Any, gamma: int, every: int, seed: int) -> Any:
    """LISA as LMFlow / axolotl run it: flip requires_grad every `every` steps."""
    import numpy as np
    from transformers import TrainerCallback

    layers = model.model.layers
    rng = np.random.default_rng(seed)

    def switch() -> None:
        chosen = set(rng.choice(len(layers), size=gamma, replace=False).tolist())
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                p.requires_grad_(i in chosen)

    class Lisa(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            switch()

        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
            if state.global_step and state.global_step % every == 0:
                switch()

    return Lisa()


def child(argv: list[str]) -> None:
    a = json.loads(argv[0])
    out = peer_child(a) if a["method"] in PEERS else ours_child(a)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["train_peak_rss"] = training_peak()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--switch", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grass-residency", choices=["interval", "step"], default="interval")
    ap.add_argument("--methods", nargs="+", default=[*PEERS, *OURS])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peers.json")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="only re-render --out's results")
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.render:
        saved = json.loads(args.out.read_text())
        sys.argv = saved["command"].split()[1:]  # the settings line of the measured run
        text = render(saved["runs"], ap.parse_args())
        args.out.with_suffix(".md").write_text(text)
        print(text)
        return
    with tempfile.TemporaryDirectory() as tmp:
        payloads = {
            method: {
                "method": method,
                "data": str(ROOT / "data/quickstart/train.jsonl"),
                "out": f"{tmp}/{method}",
                **{k: getattr(args, k) for k in ("steps", "warmup", "batch", "rows", "lr")},
                **{k: getattr(args, k) for k in ("gamma", "switch", "seed", "grass_residency")},
                "max_length": args.max_length,
            }
            for method in args.methods
        }
        results = run_children(__file__, payloads, "running")
    text = render(results, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command(), "runs": results}, indent=2))
    args.out.with_suffix(".md").write_text(text)


def command() -> str:
    return "python benchmarks/peers.py " + " ".join(sys.argv[1:])


def render(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        "| run | tokens/s | peak RSS in training (GiB) | process peak RSS (GiB) | first loss "
        "| last loss | peer | x peer tokens/s | x peer training memory "
        "| max abs loss diff to peer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        peer = PEER_OF.get(name)
        p = results.get(peer) if peer else None
        ratio = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}" if p else "-"
        mem = f"{r['train_peak_rss'] / p['train_peak_rss']:.2f}" if p else "-"
        diff = "-"
        if p and r["losses"] and p["losses"] and name not in ("grass", "hf-grass"):
            # every step of full fine-tuning; LISA's blocks are drawn by another RNG
            # and LoRA's adapters start from other random values, so only their first
            # step (same weights, same batch) compares. GRASS's probing steps read
            # the first batches, so its first step trains on another batch.
            n = min(len(r["losses"]), len(p["losses"])) if name == "full" else 1
            worst = max(abs(x - y) for x, y in zip(r["losses"][:n], p["losses"][:n], strict=True))
            diff = f"{worst:.1e} ({n} step{'s' if n > 1 else ''})"
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['train_peak_rss'] / 2**30:.2f} | "
            f"{r['peak_rss'] / 2**30:.2f} | "
            f"{r['losses'][0]:.4f} | {r['last_loss']:.4f} | {peer or '-'} | {ratio} | {mem} "
            f"| {diff} |"
        )
    if "grass" in results and "hf-grass" in results:
        ours, plug = results["grass"], results["hf-grass"]
        lines.append(
            f"\nOur engine against the Trainer with our plug-in (GRASS both): "
            f"{ours['tokens_per_s'] / plug['tokens_per_s']:.2f}x its tokens/s at "
            f"{ours['train_peak_rss'] / plug['train_peak_rss']:.2f}x its training memory."
        )
    from compare import machine as describe_machine

    machine = describe_machine(False)
    settings = (
        f"{args.steps} steps ({args.warmup} warm-up steps not timed), batch {args.batch}, "
        f"max_length {args.max_length}, lr {args.lr} constant, gamma {args.gamma}, switch "
        f"every {args.switch}, seed {args.seed}, SmolLM2-135M fp32, {args.rows} rows, "
        f"GRASS residency {args.grass_residency}"
    )
    return "\n".join(lines) + (
        f"\n\nsettings: {settings}\n\ncommand: `{command()}`\n\nmachine: {machine}\n"
    )


if __name__ == "__main__":
    main()
