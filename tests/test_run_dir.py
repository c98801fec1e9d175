"""The run folder's guarantees: user files survive, nothing unpickles, resume into a new folder.

Every test uses real files: a user's own files beside a run, a checkpoint whose
pickle would run a command, a run continued in another folder.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
from helpers import grass
from test_checkpoint import make_recipe, run_straight

from grass_cli.checkpoint import find_latest
from grass_cli.engine import setup, train
from grass_cli.engine.run_dir import MARKER
from grass_cli.errors import GrassError
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent


def test_overwrite_removes_only_what_grass_wrote(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    rec = make_recipe(
        tiny_llama,
        run_dir,
        training={"max_steps": 2},
        checkpoint={"interval": 1},
        output={"save_model": True},
    )
    run_straight(rec)
    assert (run_dir / MARKER).is_file() and (run_dir / "final/model.safetensors").is_file()
    mine = {
        "eval/results.csv": "a,b\n",
        "plots/fig.png": "png",
        "checkpoints/notes.txt": "mine",
        "notes.md": "# my notes\n",
    }
    for rel, text in mine.items():
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text(text)
    r = setup(rec, Telemetry([]), overwrite=True)
    for rel, text in mine.items():  # every user file survives --overwrite
        assert (run_dir / rel).read_text() == text, rel
    assert not (run_dir / "final").exists()  # grass's own files are gone
    assert not list((run_dir / "checkpoints").glob("step-*"))
    train(r)
    assert (run_dir / "final/model.safetensors").is_file()
    assert (run_dir / "notes.md").read_text() == "# my notes\n"


def test_a_user_file_in_final_stops_the_run_before_it_starts(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    rec = make_recipe(tiny_llama, run_dir, training={"max_steps": 1}, output={"save_model": True})
    run_straight(rec)
    (run_dir / "final/my_model.bin").write_bytes(b"weights")
    with pytest.raises(GrassError, match=r"final/ holds files grass did not write \(final/my_m"):
        setup(rec, Telemetry([]), overwrite=True)
    assert (run_dir / "final/my_model.bin").read_bytes() == b"weights"
    assert (run_dir / "final/model.safetensors").is_file()  # nothing was removed


def test_a_folder_of_someone_elses_files_is_refused(tiny_llama, tmp_path):
    run_dir = tmp_path / "theirs"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"mine": true}')
    rec = make_recipe(tiny_llama, run_dir, training={"max_steps": 1})
    for overwrite in (False, True):
        with pytest.raises(GrassError, match="the run dir holds files that grass did not write"):
            setup(rec, Telemetry([]), overwrite=overwrite)
    assert (run_dir / "summary.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in run_dir.iterdir()) == ["summary.json"]


def test_resume_into_a_new_folder_keeps_metrics_parseable(tiny_llama, tmp_path):
    rec = make_recipe(tiny_llama, tmp_path / "a", training={"max_steps": 4})
    rec.checkpoint.interval = 2
    run_straight(rec)
    ckpt = find_latest(tmp_path / "a")
    assert ckpt is not None and ckpt.name == "step-0000004"
    ckpt = ckpt.parent / "step-0000002"
    moved = make_recipe(tiny_llama, tmp_path / "b", training={"max_steps": 4})
    r = setup(moved, Telemetry([]), resume=str(ckpt))
    train(r)
    lines = (tmp_path / "b/metrics.jsonl").read_bytes().splitlines()
    events = [json.loads(x) for x in lines]  # no NUL padding: every line parses
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == [0, 1, 2, 3]  # the first two copied from a/, then the resumed ones


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _rehash(ckpt: Path, manifest: dict) -> None:
    manifest["files"] = {
        str(p.relative_to(ckpt)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_a_malicious_pickle_never_runs(tiny_llama, tmp_path):
    """A checkpoint edited to carry a pickle that would run code, with its manifest's
    checksums updated (a checksum is not a signature): resuming refuses it and the
    code never runs, whether it poses as the old format or hides in the new one."""
    rec = make_recipe(tiny_llama, tmp_path / "run", training={"max_steps": 2})
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(rec.to_yaml())
    run_straight(rec)
    ckpt = find_latest(tmp_path / "run")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    ran = tmp_path / "code-ran"
    payload = pickle.dumps(_RunsCode(ran))

    # 1) posing as format 1, whose trainer.pt was a pickle
    (ckpt / "trainer.pt").write_bytes(payload)
    _rehash(ckpt, {**manifest, "format": 1})
    res = grass("train", str(recipe_file), "--no-live", "--resume", str(ckpt))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "checkpoint format 1 is not supported" in res.stderr
    assert not ran.exists()

    # 2) in the current format, in place of the state's tensors
    (ckpt / "trainer.pt").unlink()
    (ckpt / "state.safetensors").write_bytes(payload)
    _rehash(ckpt, manifest)
    res = grass("train", str(recipe_file), "--no-live", "--resume", str(ckpt))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "damaged checkpoint: state cannot be read" in res.stderr
    assert not ran.exists()
