"""`grass chat TARGET`: talk to a trained model in the terminal, or answer one prompt
from stdin in a script.

On a terminal: a prompt per turn, the answer streamed as it is generated, the
history kept; `/reset` forgets it, `/system TEXT` sets a system turn (and starts
over), `/exit` or Ctrl-D ends, Ctrl-C stops an answer. Not on a terminal: stdin is
one prompt, the answer goes to stdout, nothing else does. The conversation is
rendered with the run's chat template and system prompt, and answers end where
`grass eval` ends them (grass_cli/chat.py).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from grass_cli.commands.options import Device, DeviceOption, target_argument

TargetArg = Annotated[
    str,
    target_argument(
        "A run dir (RUN_DIR/final with its recipe's chat template), a model folder or "
        "checkpoint, a .gguf file, a hub id, or embedded:smollm2-135m-instruct."
    ),
]
SystemOpt = Annotated[
    str | None,
    typer.Option("--system", help="A system turn. Default: the recipe's data.system_prompt."),
]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", min=0.0, help="0: greedy (as grass eval); above: sampled.")
]
TopPOpt = Annotated[
    float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temperature).")
]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the sampling.")]

HELP_LINE = "/reset forgets the conversation, /system TEXT sets a system turn, /exit ends"
EPILOG = (
    "Examples: grass chat runs/quickstart | "
    "echo 'What is 12 + 7?' | grass chat runs/quickstart | "
    "grass chat runs/quickstart --temperature 0.7 --top-p 0.9"
)


def chat(
    target: TargetArg,
    system: SystemOpt = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxNewOpt = 256,
    seed: SeedOpt = 0,
    device: DeviceOption = Device.auto,
) -> None:
    """Chat with a model: interactive on a terminal, one answer for a prompt on stdin."""
    from grass_cli.cli import _fail, _guard

    if top_p == 0:
        raise _fail("--top-p must be above 0 (1 keeps every token)", 2)
    prompt = None
    if not sys.stdin.isatty():  # a script: read the prompt before the model loads
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise _fail("no prompt on stdin: pipe one in, or run on a terminal", 2)
    session = _guard(
        lambda: _session(target, system, temperature, top_p, max_new_tokens, seed, device)
    )
    if prompt is not None:
        _answer(session, prompt)
        return
    label = "greedy" if temperature == 0 else f"temperature {temperature:g}, top-p {top_p:g}"
    sys.stderr.write(f"Chatting with {target} ({label}). {HELP_LINE}; Ctrl-D ends.\n")
    if not session.keeps_history:
        sys.stderr.write("This model has no chat template: each message is answered on its own.\n")
    _loop(session)


def _session(target, system, temperature, top_p, max_new_tokens, seed, device):  # noqa: ANN001, ANN202
    from grass_cli.chat import ChatSession, Sampling
    from grass_cli.eval_target import resolve_target
    from grass_cli.evaluate import pick_device
    from grass_cli.models import load_model_and_tokenizer

    sampling = Sampling(temperature, top_p, max_new_tokens, seed)
    tgt = resolve_target(target)
    dev = pick_device(device.value)
    model, tokenizer, _ = load_model_and_tokenizer(tgt.model)
    model.to(dev).eval()
    data = tgt.recipe.data if tgt.recipe is not None else None
    return ChatSession(model, tokenizer, dev, data, sampling, system)


def _answer(session, text: str) -> None:  # noqa: ANN001
    """Stream one answer to stdout, then a newline."""
    from grass_cli.cli import _guard

    def body() -> None:
        for piece in session.reply(text):
            sys.stdout.write(piece)
            sys.stdout.flush()

    _guard(body)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _loop(session) -> None:  # noqa: ANN001
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            sys.stderr.write("(conversation reset)\n")
            continue
        if line == "/system" or line.startswith("/system "):
            session.set_system(line.removeprefix("/system").strip() or None)
            sys.stderr.write(
                f"(system turn {'set' if session.system else 'removed'}; conversation reset)\n"
            )
            continue
        if line.startswith("/"):
            sys.stderr.write(f"unknown command {line.split()[0]}: {HELP_LINE}\n")
            continue
        try:
            _answer(session, line)
        except KeyboardInterrupt:  # stops this answer; the conversation goes on without it
            sys.stdout.write("\n(stopped)\n")


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(chat)
