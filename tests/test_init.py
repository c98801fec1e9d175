"""`grass init`: from a model, a data file and a GPU size to a complete recipe that
validates and that the planner says fits; or one message saying why none fits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.init.choose import DEVICE_SLACK
from grass_cli.presets import get_preset
from grass_cli.recipe import validate_dict

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture
def chats(tmp_path, monkeypatch) -> Path:
    """A chat jsonl (the quickstart's questions as conversations), in a fresh folder;
    no hub: a preset plans from its shipped shape."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "chats.jsonl"
    with open(ROOT / "data/quickstart/train.jsonl") as f, open(path, "w") as out:
        for line in f:
            row = json.loads(line)
            turns = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]},
            ]
            out.write(json.dumps({"messages": turns}) + "\n")
    return path


def init(*args: str):
    return runner.invoke(app, ["init", *args])


def init_8b_on_24(chats: Path, ram: str, disk: str):
    """Llama-3.1-8B on a 24 GB card into r.yaml, for this RAM and a given disk (so the
    test does not depend on this machine's free space)."""
    return init(
        "llama-3.1-8b", str(chats), "--gpu", "24", "--host-memory", ram, "--disk", disk,
        "-o", "r.yaml",
    )  # fmt: skip


def own_plan(path: Path):
    from grass_cli.planner.memory import plan_recipe

    r = validate_dict(yaml.safe_load(path.read_text()), str(path))
    lay, (p,) = plan_recipe(r, all_scenarios=False)
    return r, lay, p


def test_an_8b_preset_on_a_24_gb_gpu_validates_and_fits(chats):
    """The issue's path: Llama-3.1-8B, a chat jsonl, --gpu 24 -> a recipe that `grass
    validate` accepts with no weights loaded, whose plan fits the card with its slack."""
    res = init("llama-3.1-8b", str(chats), "--gpu", "24")
    assert res.exit_code == 0, res.output
    path = chats.parent / "llama-3.1-8b-grass.yaml"
    assert f"wrote {path.name}: grass on a 24 GB GPU (given)" in res.stderr
    text = path.read_text()
    assert text.startswith("# Written by `grass init llama-3.1-8b")
    assert "# detected from the columns (messages)" in text
    r, lay, p = own_plan(path)
    assert r.model.path == "llama-3.1-8b" and r.model.dtype == "bfloat16"
    assert r.data.format == "chat" and r.data.eval == 100  # 5% of 2000 rows held out
    assert r.optimizer.lr == get_preset("llama-3.1-8b", "t").lr["grass"]
    assert r.training.device == "cuda" and r.sampler.strategy == "grass"
    assert p.device_peak_bytes <= 24e9 * (1 - DEVICE_SLACK)
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert "8030M parameters" in res.stderr


def test_16_gb_is_one_message_saying_what_would_fit(chats):
    res = init("llama-3.1-8b", str(chats), "--gpu", "16")
    assert res.exit_code == 2
    assert "no configuration fits a 16 GB GPU (given): the leanest (" in res.stderr
    assert "the weights are 16.1 GB" in res.stderr
    assert "hint: a GPU of at least 21 GB (--gpu 21), or a smaller model: " in res.stderr
    assert "Traceback" not in res.output and not list(chats.parent.glob("*.yaml"))


def test_the_choice_is_the_largest_that_fits(chats):
    """A 3B on 16 GB: one more block, or the next micro-batch, would not fit (the
    search fills the memory it is given, it does not stop at the first fit)."""
    from grass_cli.planner.memory import plan, recipe_scenario

    res = init("llama-3.2-3b", str(chats), "--gpu", "16", "-o", "r.yaml")
    assert res.exit_code == 0, res.output
    r, lay, p = own_plan(chats.parent / "r.yaml")
    budget = 16e9 * (1 - DEVICE_SLACK)
    assert p.device_peak_bytes <= budget
    if r.sampler.gamma < len(lay.blocks) // 2:
        more = r.model_copy(
            update={"sampler": r.sampler.model_copy(update={"gamma": r.sampler.gamma + 1})}
        )
        assert plan(more, lay, recipe_scenario(more)).device_peak_bytes > budget
    batch = r.training.micro_batch_size * r.training.grad_accum_steps
    assert batch == 32


def test_plenty_of_ram_keeps_the_state_in_pinned_memory(chats):
    res = init_8b_on_24(chats, ram="1000", disk="1000")
    assert res.exit_code == 0, res.output
    r, _, p = own_plan(chats.parent / "r.yaml")
    assert (r.optimizer.state_policy, r.optimizer.offload.target) == ("offload", "cpu")
    assert r.optimizer.offload.residency == "step"  # gamma blocks' state is 10 GB at 8B
    assert p.host_kinds["store_pinned"] > 80e9
    assert "pinned host RAM" in (chats.parent / "r.yaml").read_text()


def test_short_ram_pins_what_it_can_and_spills_the_rest_to_disk(chats):
    """32 GB of RAM cannot pin an 8B's 84 GB of state: the two-tier store pins what
    the RAM leaves and the rest goes to disk; the host need stays within the RAM."""
    res = init_8b_on_24(chats, ram="32", disk="500")
    assert res.exit_code == 0, res.output
    r, lay, p = own_plan(chats.parent / "r.yaml")
    assert (r.optimizer.state_policy, r.optimizer.offload.target) == ("offload", "cpu")
    assert r.optimizer.offload.host_budget == "auto"
    from grass_cli.planner.machine import host_memory
    from grass_cli.planner.tiers import resolve_budget

    budgeted = resolve_budget(r, lay, "cuda", host_memory(32), 0, 0)
    assert budgeted._host_budget == 28.8e9  # (no data nor runtime counted here)
    assert p.disk_bytes == 0  # (own_plan resolves no budget: the whole store is counted)
    text = re.sub(r"\n\s*# ", " ", (chats.parent / "r.yaml").read_text())  # comments unwrapped
    assert "GB in files on disk: optimizer.offload.host_budget: auto sizes" in text


def test_a_small_disk_gives_up_the_spill_then_says_the_disk_is_short(chats):
    """The disk decides between the two-tier store and dropping state: with room for
    the spill (500 GB) the state is offloaded; with 30 GB only dropping fits, with
    no checkpoints; with 5 GB not even the final model fits, and the one message says
    the disk, not the GPU, is short."""
    base = ("llama-3.1-8b", str(chats), "--gpu", "24", "--host-memory", "32")
    res = init(*base, "--disk", "30", "-o", "small.yaml")
    assert res.exit_code == 0, res.output
    r, _, _ = own_plan(chats.parent / "small.yaml")
    assert r.optimizer.state_policy == "drop"
    assert (r.checkpoint.interval, r.checkpoint.at_end) == (None, False)
    res = init(*base, "--disk", "5", "-o", "tiny.yaml")
    assert res.exit_code == 2
    assert "the disk has 5.0 GB free (the final model alone is 16.1 GB)" in res.output
    assert "a 24 GB GPU (given) holds the fastest" in res.output
    assert not (chats.parent / "tiny.yaml").exists()


def test_short_ram_names_the_ram_not_the_gpu(chats):
    res = init("llama-3.1-8b", str(chats), "--gpu", "80", "--host-memory", "8", "-o", "r.yaml")
    assert res.exit_code == 2
    assert "--host-memory's usable share is 7.2 GB" in res.output
    assert "Traceback" not in res.output


def test_formats_are_detected_and_mapped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(60)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = init("smollm2-360m", "qa.jsonl", "--gpu", "8", "-o", "qa.yaml")
    assert res.exit_code == 0, res.output
    d = yaml.safe_load((tmp_path / "qa.yaml").read_text())["data"]
    assert d["format"] == "prompt-completion"
    assert d["fields"] == {"prompt": "question", "completion": "answer"}
    assert d["eval"] == 10  # at least 10 held out
    bad = [{"foo": "x", "bar": "y"}] * 50
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    res = init("smollm2-360m", "bad.jsonl", "--gpu", "8", "-o", "bad.yaml")
    assert res.exit_code == 2
    assert "cannot tell the data's format from its columns (foo, bar)" in res.stderr
    assert "--format" in res.stderr and not (tmp_path / "bad.yaml").exists()


def test_a_preset_hub_id_plans_offline_and_the_cpu_gets_a_cpu_recipe(chats):
    import torch

    if torch.cuda.is_available():
        pytest.skip("without --gpu a CUDA machine plans for its GPU")
    res = init("Qwen/Qwen2.5-0.5B-Instruct", str(chats), "-o", "r.yaml", "--steps", "50")
    assert res.exit_code == 0, res.output
    r, _, p = own_plan(chats.parent / "r.yaml")
    assert r.model.path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (r.training.device, r.model.dtype, r.training.max_steps) == ("cpu", "float32", 50)
    assert "(no GPU)" in res.stderr


def test_an_existing_file_is_never_overwritten(chats):
    target = chats.parent / "mine.yaml"
    target.write_text("my own recipe\n")
    res = init("llama-3.2-1b", str(chats), "--gpu", "24", "-o", str(target))
    assert res.exit_code == 2 and "never overwrites" in res.stderr
    assert target.read_text() == "my own recipe\n"


def test_user_errors_are_one_message(chats):
    res = init("llama-3.1-9b", str(chats), "--gpu", "24")
    assert res.exit_code == 2 and "did you mean llama-3.1-8b" in res.stderr
    res = init("llama-3.1-8b", str(chats), "--gpu", "24", "--strategy", "sgd")
    assert res.exit_code == 2 and "unknown strategy 'sgd'" in res.stderr
    res = init("llama-3.1-8b", str(chats), "--steps", "5", "--epochs", "2")
    assert res.exit_code == 2 and "--steps or --epochs" in res.stderr
    res = init()
    assert res.exit_code == 2 and "give a MODEL and the training DATA" in res.stderr


def test_list_presets():
    res = runner.invoke(app, ["init", "--list-presets"])
    assert res.exit_code == 0
    assert "llama-3.1-8b" in res.stdout and "meta-llama/Llama-3.1-8B-Instruct" in res.stdout


def test_a_saved_datasets_folder_is_read_like_a_file(chats):
    """DATA may be a folder saved by datasets' save_to_disk: the same format, rows and
    held-out count as the jsonl it was made from."""
    from datasets import load_dataset

    folder = chats.parent / "saved"
    load_dataset("json", data_files=str(chats), split="train").save_to_disk(str(folder))
    res = init("llama-3.2-1b", str(folder), "--gpu", "24", "-o", "r.yaml")
    assert res.exit_code == 0, res.output
    d = yaml.safe_load((chats.parent / "r.yaml").read_text())["data"]
    assert (d["train"], d["format"], d["eval"]) == (str(folder), "chat", 100)


def test_the_gpu_recipes_header_command_validates(chats):
    """recipes/gpu-grass.yaml's header names every key a user must override; its own
    command (train swapped for validate, the data file made here) is accepted."""
    import shlex

    text = (ROOT / "recipes/gpu-grass.yaml").read_text()
    lines = [ln.removeprefix("#").strip() for ln in text.splitlines() if ln.startswith("#")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("grass train "))
    command = lines[start]
    while command.endswith("\\"):
        start += 1
        command = command[:-1] + " " + lines[start]
    args = shlex.split(command)[2:]  # after `grass train`
    for key in ("model.path=", "data.train=", "data.format=", "data.eval=", "output.dir="):
        assert any(a.startswith(key) for a in args), key
    args = [str(ROOT / a) if a.endswith(".yaml") else a for a in args]
    args = [a.replace("my-chats.jsonl", str(chats)) for a in args]
    res = runner.invoke(app, ["validate", *args])
    assert res.exit_code == 0, res.output
    assert "data.eval 100 rows" in res.stderr  # 5% of the 2000 rows held out
