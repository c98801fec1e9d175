"""`grass chat`: a conversation rendered with the chat template, greedy answers equal to
`grass eval`'s for the same prompt, history, /reset and /system, sampling by seed, a
prompt from stdin for scripts, and the interactive loop on a real terminal (a pty)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from grass_cli.chat import ChatSession, Sampling
from grass_cli.evaluate.generation import greedy_generate
from grass_cli.models import load_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    folder = tiny_factory("llama", 4)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return folder, model, load_tokenizer(str(folder))


def text_of(session: ChatSession, user: str) -> str:
    return "".join(session.reply(user))


def test_a_greedy_answer_is_grass_evals_answer(tiny):
    _, model, tok = tiny
    session = ChatSession(model, tok, CPU, sampling=Sampling(max_new_tokens=12))
    prompt = session.prompt_ids("What is 2 + 2?")
    assert tok.decode(prompt).rstrip().endswith("assistant")  # the template's assistant turn
    [want] = greedy_generate(model, tok, [prompt], 12, CPU, stop_ids=session.stop_ids)
    assert text_of(session, "What is 2 + 2?") == want.text


def test_history_reset_and_system_turn(tiny):
    _, model, tok = tiny
    session = ChatSession(model, tok, CPU, sampling=Sampling(max_new_tokens=6))
    first = text_of(session, "hello there")
    assert session.history == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": first},
    ]
    second = tok.decode(session.prompt_ids("and again?"))
    assert "hello there" in second and second.index("hello there") < second.index("and again?")
    session.reset()
    assert session.history == [] and "hello there" not in tok.decode(session.prompt_ids("x"))
    session.set_system("You answer in one word.")
    assert "You answer in one word." in tok.decode(session.prompt_ids("x"))
    session.set_system(None)
    assert "You answer in one word." not in tok.decode(session.prompt_ids("x"))


def test_sampling_is_seeded_and_a_tiny_nucleus_is_greedy(tiny):
    _, model, tok = tiny

    def answer(**kw) -> str:
        return text_of(
            ChatSession(model, tok, CPU, sampling=Sampling(max_new_tokens=10, **kw)), "hi"
        )

    hot = {"temperature": 5.0, "seed": 1}
    assert answer(**hot) == answer(**hot)
    assert answer(**hot) != answer(temperature=5.0, seed=2)  # (10 tokens from 49k at T=5)
    assert answer(temperature=1.0, top_p=1e-9) == answer()  # one token in the nucleus: argmax
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


def grass(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grass_cli", *args],
        input=stdin, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_prompt_on_stdin_is_answered_on_stdout_alone(tiny):
    folder, model, tok = tiny
    res = grass("chat", str(folder), "--max-new-tokens", "8", stdin="What is 2 + 2?\n")
    assert res.returncode == 0, res.stderr
    want = text_of(
        ChatSession(model, tok, CPU, sampling=Sampling(max_new_tokens=8)), "What is 2 + 2?"
    )
    assert res.stdout == want + "\n"


def test_what_a_user_gets_wrong_is_one_message(tiny, tmp_path):
    folder, _, _ = tiny
    res = grass("chat", str(folder), stdin="")
    assert res.returncode == 2 and "no prompt on stdin" in res.stderr
    res = grass("chat", str(tmp_path / "nope"), stdin="hi")
    assert res.returncode == 2 and "model not found" in res.stderr
    assert "Traceback" not in res.stderr


def read_until(
    fd: int, marker: bytes, seen: bytearray, start: int = 0, timeout: float = 120
) -> int:
    """Read the pty into `seen` until `marker` appears after `start`; where it ends."""
    end = time.monotonic() + timeout
    while marker not in seen[start:]:
        left = end - time.monotonic()
        assert left > 0, f"no {marker!r} in {bytes(seen)[-400:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen.index(marker, start) + len(marker)


def test_the_interactive_loop_on_a_terminal(tiny):
    """On a pty, as a user at a terminal: the help line, a prompt per turn, an answer,
    /system and /reset acknowledged, an unknown command explained, /exit ends (rc 0)."""
    folder, _, _ = tiny
    pid, fd = pty.fork()
    if pid == 0:  # the child: grass chat on the pty
        os.execv(sys.executable, [sys.executable, "-m", "grass_cli", "chat", str(folder),
                                  "--max-new-tokens", "4"])  # fmt: skip
    seen = bytearray()
    try:
        read_until(fd, b"> ", seen)
        assert b"/reset forgets the conversation" in seen
        for line, marker in [
            (b"hello\n", b"> "),
            (b"/system be brief\n", b"(system turn set; conversation reset)"),
            (b"/reset\n", b"(conversation reset)"),
            (b"/what\n", b"unknown command /what"),
        ]:
            start = len(seen)
            os.write(fd, line)
            after = read_until(fd, marker, seen, start)
            if marker != b"> ":
                read_until(fd, b"> ", seen, after)
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.WEXITSTATUS(status) == 0, bytes(seen)[-600:]


def test_a_run_dir_chats_with_its_final_model(tiny_factory, tmp_path):
    """A run folder: its final model and its recipe's system prompt."""
    from grass_cli.chat import ChatSession as Session
    from grass_cli.eval_target import resolve_target

    folder = tiny_factory("llama", 4)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in Path(folder).iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    train = Path(__file__).resolve().parent.parent / "data/quickstart/train.jsonl"
    (run / "recipe.yaml").write_text(
        f"model:\n  path: {folder}\ndata:\n  train: {train}\n  system_prompt: Be terse.\n"
    )
    tgt = resolve_target(str(run))
    model = AutoModelForCausalLM.from_pretrained(tgt.model.path)
    session = Session(model, load_tokenizer(tgt.model.path), CPU, tgt.recipe.data)
    assert "Be terse." in session.tokenizer.decode(session.prompt_ids("hi"))
    res = grass("chat", str(run), "--max-new-tokens", "4", stdin="hi")
    assert res.returncode == 0, res.stderr
