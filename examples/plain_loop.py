"""GRASS in a plain PyTorch loop: about ten lines of GRASS around your own training.

    python examples/plain_loop.py MODEL [--steps 40]

MODEL is a Hugging Face causal LM (a hub id or a folder). The task: the model learns
to add small numbers. Everything but the `grass.` lines is an ordinary loop; each
step prints one JSON line (step, loss, the blocks trained).
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grass_cli import Grass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    texts = [f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)]

    def batch(i: int) -> dict[str, torch.Tensor]:
        enc = tok(texts[8 * i % len(texts) :][:8], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {**enc, "labels": labels}

    grass = Grass(
        model,
        sampler={"strategy": "grass", "gamma": 2, "switch_interval": 5},
        optimizer={"state_policy": "offload"},  # AdamW state of resting blocks off device
    )
    grass.probe(batch(i) for i in range(4))  # first importance estimate (no update)
    for step in range(args.steps):
        grass.begin_step(step)  # draw blocks by importance; their optimizer state follows
        loss = model(**batch(step)).loss
        grass.backward(loss)  # backward, reading each block's gradient norm
        torch.nn.utils.clip_grad_norm_(grass.trainable_params(), 1.0)
        grass.step(lr=args.lr)  # AdamW on the active blocks only
        grass.zero_grad()
        print(json.dumps({"step": step, "loss": loss.item(), "active": grass.active}))
    grass.close()


if __name__ == "__main__":
    main()
