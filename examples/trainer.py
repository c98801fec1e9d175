"""GRASS in a Hugging Face Trainer: one line added to an ordinary Trainer script.

    python examples/trainer.py MODEL [--steps 30] [--lisa]

MODEL is a Hugging Face causal LM (a hub id or a folder). The task: adding small
numbers. `--lisa` switches the method with one argument.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from grass_cli.integrations.hf import GrassCallback


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="runs/example-trainer")
    ap.add_argument("--lisa", action="store_true", help="LISA instead of GRASS")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    rows = [{"text": f"{a} + {b} = {a + b}"} for a in range(30) for b in range(30)]
    data = Dataset.from_list(rows).map(lambda r: tok(r["text"]), remove_columns=["text"])
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            logging_steps=5,
            save_steps=10,
            report_to="none",
        ),  # fmt: skip
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    sampler = {"strategy": "lisa" if args.lisa else "grass", "gamma": 2, "switch_interval": 5}
    GrassCallback(sampler, {"state_policy": "offload"}).attach(trainer)  # the added line
    trainer.train()


if __name__ == "__main__":
    main()
