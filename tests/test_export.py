"""`grass export --format gguf`: files that read back as the same model (logit for logit
in f32, the same greedy answers in f16 on the real SmolLM2, close log-likelihoods
quantized), the tokenizer intact, and the user's files safe (an existing file is never
replaced, a real write limit leaves no half file)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import grass
from transformers import AutoModelForCausalLM

from grass_cli.export import export_gguf, interleave_rotary
from grass_cli.models import load_tokenizer, resolve_model_path

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
TEXTS = [
    "Hello world, 12345 apples!",
    "<|im_start|>user\nWhat is 7 + 8?<|im_end|>\n<|im_start|>assistant\n",
    "  spaces\tand tabs\nnewlines, ünïcödé and 漢字",
]


def read_back(gguf_file: Path):
    """The GGUF as grass reads any model path: converted into an HF folder."""
    folder = Path(resolve_model_path(str(gguf_file)))
    return AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(str(folder))


def read_weights(gguf_file: Path):
    """Only the model (transformers dequantizing the file), for tests that need no
    tokenizer: rebuilding 49k tokens from the file is most of a read's time."""
    return AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype="float32"
    ).eval()


def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.float(), -1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_f32_reads_back_logit_for_logit_with_the_same_tokenizer(arch, tiny_factory, tmp_path):
    """Names, shapes, the q/k reordering (llama, mistral), biases (qwen2), tied and
    untied heads: transformers reading the file back computes the same logits."""
    src = tiny_factory(arch, 2)
    result = export_gguf(src, tmp_path / "m.gguf", "f32")
    assert result.architecture == ("qwen2" if arch == "qwen2" else "llama")
    assert result.pre_tokenizer == "gpt2" and result.notes == []
    model, tok = read_back(tmp_path / "m.gguf")
    base, base_tok = AutoModelForCausalLM.from_pretrained(src).eval(), load_tokenizer(str(src))
    for text in TEXTS:
        assert tok(text)["input_ids"] == base_tok(text)["input_ids"]
    ids = torch.tensor([base_tok(" ".join(TEXTS))["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    assert tok.chat_template == base_tok.chat_template
    assert (tok.eos_token_id, tok.bos_token_id) == (base_tok.eos_token_id, base_tok.bos_token_id)


def test_interleave_rotary_pairs_each_heads_halves():
    # one head of 4 dimensions: HF rotates (0, 2) and (1, 3); llama.cpp (0, 1), (2, 3)
    w = torch.arange(8.0).reshape(4, 2).numpy()
    assert interleave_rotary(w, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    bias = torch.arange(8.0).numpy()  # two heads
    assert interleave_rotary(bias, 2).tolist() == [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]


def test_quantized_files_are_smaller_and_close_in_log_likelihood(tiny_factory, tmp_path):
    src = tiny_factory("llama", 2)
    base, tok = AutoModelForCausalLM.from_pretrained(src).eval(), load_tokenizer(str(src))
    ids = torch.tensor([tok(" ".join(TEXTS))["input_ids"]])
    want = logprobs(base, ids)
    sizes, errors = {}, {}
    for quant in ("f32", "f16", "q8_0", "q4_0"):
        r = export_gguf(src, tmp_path / f"{quant}.gguf", quant)
        sizes[quant] = r.bytes
        model = read_weights(r.path)
        errors[quant] = float((logprobs(model, ids) - want).abs().mean())
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    assert errors["f32"] == 0.0
    assert errors["f16"] < 1e-3 < errors["q4_0"]
    assert errors["q8_0"] < 2e-2 and errors["q8_0"] < errors["q4_0"]


def test_a_matrix_whose_rows_do_not_fill_blocks_is_written_f16(tokenizer, tmp_path):
    import gguf
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    src = tmp_path / "odd"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    tokenizer.save_pretrained(src)
    r = export_gguf(src, tmp_path / "odd.gguf", "q8_0")
    assert r.notes == ["1 matrices have rows that do not divide into q8_0 blocks; written f16"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(r.path).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 48
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.slow
def test_real_smollm2_in_f16_gives_the_same_greedy_answers_on_20_prompts(smollm2_dir, tmp_path):
    """The real model through the command a user types, read back as `grass chat` and
    `grass eval` read a .gguf: 20 chat prompts, 24 greedy tokens each, all equal."""
    from grass_cli.chat import ChatSession
    from grass_cli.evaluate.generation import greedy_generate

    out = tmp_path / "smol-f16.gguf"
    res = grass("export", str(smollm2_dir), "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["quant"] == "f16" and info["params"] == 134_515_008
    model, tok = read_back(out)
    base, base_tok = (
        AutoModelForCausalLM.from_pretrained(smollm2_dir).eval(),
        load_tokenizer(str(smollm2_dir)),
    )
    rows = [f"What is {a} + {b}?" for a, b in ((7, 8), (12, 30), (99, 1), (45, 45))]
    rows += [f"Reverse the word '{w}'." for w in ("grass", "layer", "memory", "sample")]
    rows += [f"What is the capital of {c}?" for c in ("France", "Japan", "Kenya", "Peru")]
    rows += [f"Name three {x}." for x in ("colours", "fruits", "planets", "rivers")]
    rows += [f"Write one sentence about {x}." for x in ("the sea", "trees", "rain", "bread")]

    def answers(m, t) -> list[str]:  # as `grass chat` asks: its template, its stops
        session = ChatSession(m, t, CPU)
        prompts = [session.prompt_ids(q) for q in rows]
        return [g.text for g in greedy_generate(m, t, prompts, 24, CPU, session.stop_ids)]

    got, want = answers(model, tok), answers(base, base_tok)
    assert got == want
    assert len(set(want)) > 5  # real answers, not one repeated string


def test_an_existing_file_is_never_replaced(tiny_factory, tmp_path):
    src = tiny_factory("llama", 2)
    out = tmp_path / "mine.gguf"
    out.write_bytes(b"the user's file")
    res = grass("export", str(src), "--out", str(out))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "the output file exists and is not replaced" in res.stderr
    assert out.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.gguf"]


def test_models_and_tokenizers_it_cannot_write_get_one_message(tiny_factory, tmp_path):
    res = grass("export", str(tiny_factory("gpt2", 2)), "--out", str(tmp_path / "g.gguf"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "GGUF export knows the llama family" in res.stderr and "GPT2LMHeadModel" in res.stderr
    assert "convert_hf_to_gguf.py" in res.stderr
    src = tmp_path / "wordpiece"
    shutil.copytree(tiny_factory("llama", 2), src)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["model"]["type"], tj["pre_tokenizer"], tj["decoder"] = "WordPiece", None, None
    (src / "tokenizer.json").write_text(json.dumps(tj))
    res = grass("export", str(src), "--out", str(tmp_path / "w.gguf"))
    assert res.returncode == 2 and "byte-level BPE" in res.stderr, res.stderr
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


FSIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from grass_cli.cli import main
sys.argv = ["grass", "export", *sys.argv[2:]]
main()
"""


def test_a_real_write_limit_leaves_no_half_file(tiny_factory, tmp_path):
    src = tiny_factory("llama", 2)
    full = export_gguf(src, tmp_path / "full.gguf", "f32").bytes
    out = tmp_path / "cut" / "m.gguf"
    out.parent.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", FSIZE_LIMITED, str(full // 2), str(src), "--out", str(out),
         "--quant", "f32"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "file size limit reached" in res.stderr
    assert list(out.parent.iterdir()) == []


def test_a_run_dir_exports_its_final_model_beside_it(tiny_factory, tmp_path):
    run = tmp_path / "myrun"
    shutil.copytree(tiny_factory("llama", 2), run / "final")
    (run / "recipe.yaml").write_text(
        f"model: {{path: {run / 'final'}}}\ndata: {{train: none.jsonl}}\n"
    )
    res = grass("export", str(run), "--quant", "q8_0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"wrote {run / 'myrun-q8_0.gguf'} (gguf, q8_0, llama")
    import gguf

    fields = gguf.GGUFReader(run / "myrun-q8_0.gguf").fields
    assert fields["general.name"].contents() == "myrun"
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    # a checkpoint's file goes into the run dir, not among the checkpoints (which
    # --overwrite and keep_last clear)
    ckpt = run / "checkpoints" / "step-0000004"
    shutil.copytree(run / "final", ckpt)
    res = grass("export", str(ckpt), "--quant", "q8_0")
    assert res.returncode == 0, res.stderr
    assert (run / "myrun-step-0000004-q8_0.gguf").is_file()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["step-0000004"]
