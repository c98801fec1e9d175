"""`grass eval --harness TASKS`: EleutherAI's lm-evaluation-harness on the model grass
loaded, so its standard tasks (hellaswag, arc, mmlu, gsm8k, ...) and any task a user
writes as a harness YAML score a run, a checkpoint or a model like any other eval.

The harness is an extra (`pip install 'grass-cli[harness]'`, lm-eval on PyPI): it
brings a few dozen packages a training box does not need. grass hands it the model
and tokenizer it loaded itself (run dirs, checkpoints, .gguf files and embedded
models all work as in `grass eval`), and the harness's own `HFLM` scores them, so the
numbers are the harness's, comparable with the leaderboards that quote them.

Results go next to grass's own scores: OUT/harness.json (every task's metrics with
their standard errors, the harness and task versions, the settings) and one
OUT/harness-samples/TASK.jsonl per task (each item, its choices' log-likelihoods
or its generation, and whether it was right). Both are written atomically.
"""

from __future__ import annotations

import contextlib
import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grass_cli.atomic import write_atomic_json, write_atomic_text
from grass_cli.errors import GrassError

INSTALL = "pip install 'grass-cli[harness]'  (or: pip install lm-eval)"
RESULTS = "harness.json"
SAMPLES = "harness-samples"


def harness_version() -> str:
    """lm-eval's version; one message when it is not installed."""
    try:
        import lm_eval
    except ImportError:
        raise GrassError(
            "--harness needs EleutherAI's lm-evaluation-harness, which is not installed",
            hint=INSTALL,
        ) from None
    return str(getattr(lm_eval, "__version__", "?"))


def check_tasks(tasks: list[str], include: Path | None) -> Any:
    """The harness's TaskManager, once every name in `tasks` is a task or group it
    knows (its own, or a YAML under `include`): a typo fails before the model loads."""
    harness_version()
    import logging

    from lm_eval.tasks import TaskManager

    if include is not None and not include.is_dir():
        raise GrassError("not a folder of task YAML files", where=f"--harness-include {include}")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # the library never prints
    manager = TaskManager(include_path=str(include) if include else None)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            raise GrassError(
                f"lm-evaluation-harness has no task {name!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else ""),
                where="--harness",
                hint="`lm-eval ls tasks` lists them; a task of your own is a YAML file "
                "in a folder given with --harness-include",
            )
    return manager


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    manager: Any,
    out_dir: Path,
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    chat_template: bool = False,
    model_name: str = "model",
) -> dict[str, Any]:
    """Score `model` on the harness `tasks`; write OUT/harness.json and the samples,
    and return {"model", "tasks": {task: {metric: value, ...}}, "n_samples"}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        with _silenced():
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=True,
                apply_chat_template=chat_template,
                bootstrap_iters=1000,
                verbosity="ERROR",
            )
    except (ConnectionError, OSError) as e:  # a missing file; a hub dataset offline
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        local = isinstance(e, FileNotFoundError)
        raise GrassError(
            f"a harness task could not load its data: {first}",
            where="--harness " + ",".join(tasks),
            hint="the harness reads a task's data_files relative to the current folder, "
            "not to its YAML: give an absolute path or run from the YAML's folder"
            if local
            else "the standard tasks download their datasets from the Hugging Face Hub; "
            "run with network once (they are cached), or write a local task YAML",
        ) from None
    assert out is not None  # (None only on ranks other than 0)
    metrics = {
        task: {
            k.removesuffix(",none"): v
            for k, v in values.items()
            if k not in ("alias", "sample_len")  # (a count, not a score: n_samples has it)
        }
        for task, values in out["results"].items()
    }
    result = {
        "model": model_name,
        "harness": harness_version(),
        "tasks": metrics,
        "n_samples": {t: n.get("effective") for t, n in out.get("n-samples", {}).items()},
        "versions": out.get("versions", {}),
        "num_fewshot": out.get("n-shot", {}),
        "limit": limit,
        "chat_template": chat_template,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic_json(out_dir / RESULTS, result)
    (out_dir / SAMPLES).mkdir(exist_ok=True)
    for task, items in (out.get("samples") or {}).items():
        lines = "".join(
            json.dumps(_sample(s), ensure_ascii=False, default=str) + "\n" for s in items
        )
        write_atomic_text(out_dir / SAMPLES / f"{task}.jsonl", lines)
    return {"model": model_name, "tasks": metrics, "n_samples": result["n_samples"]}


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """The harness's progress bars and warnings, and what the `git` it runs to record
    a commit writes to the terminal, kept off stderr (file descriptor 2 included):
    the library never prints. Errors still arrive as exceptions."""
    import os
    import sys

    from grass_cli.models import quiet_stderr

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, quiet_stderr():
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _sample(s: dict[str, Any]) -> dict[str, Any]:
    """One scored item, without the harness's repeated argument tuples."""
    keep = ("doc_id", "doc", "target", "filtered_resps", "acc", "acc_norm", "exact_match")
    return {k: s[k] for k in keep if k in s}
