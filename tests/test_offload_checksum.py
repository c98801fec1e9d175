"""Offloaded optimizer state is verified on every read (DiskStore's CRC-32 per tensor):
real offload files bit-flipped, zeroed or truncated between steps stop the run with one
message naming the file, the damaged state is never trained on, and the last
checkpoint resumes to the losses of a run that was never damaged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint import make_recipe, run_straight

from grass_cli.engine import setup, train
from grass_cli.offload.store import DiskStore, OffloadError
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
DISK = {"state_policy": "offload", "offload": {"target": "disk", "residency": "interval"}}


def damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "flip":
        with open(path, "r+b") as f:
            f.seek(size // 2)
            byte = f.read(1)
            f.seek(size // 2)
            f.write(bytes([byte[0] ^ 0x10]))
    elif how == "zero":
        path.write_bytes(b"\0" * size)
    else:
        os.truncate(path, size // 2)


class DamageAfter:
    """A sink that damages every offload file once step `k` is done (between steps:
    the store's writes have settled)."""

    def __init__(self, folder: Path, k: int, how: str):
        self.folder, self.k, self.how, self.hit = folder, k, how, []

    def emit(self, event):
        if event["event"] == "step" and event["step"] + 1 == self.k:
            for f in sorted(self.folder.glob("*.bin")):
                damage(f, self.how)
                self.hit.append(f)

    def close(self):
        pass


@pytest.mark.parametrize("how", ["flip", "zero", "truncate"])
def test_a_damaged_offload_file_stops_the_run_and_the_checkpoint_resumes(how, tiny_llama, tmp_path):
    def recipe(out):
        return make_recipe(
            tiny_llama, out, optimizer=DISK, training={"max_steps": 16},
            checkpoint={"interval": 4},
        )  # fmt: skip

    _, straight = run_straight(recipe(tmp_path / "straight"))
    rec = recipe(tmp_path / "run")
    sink = DamageAfter(tmp_path / "run" / "offload", 6, how)
    run = setup(rec, Telemetry([sink]))
    with pytest.raises(OffloadError) as caught:
        train(run)
    run.optimizer.store.close()
    assert sink.hit, "no offload file existed to damage"
    err = caught.value
    assert Path(err.where) in sink.hit  # the message names the file
    why = {"flip": "fails its CRC-32", "zero": "fails its CRC-32", "truncate": "bytes of the"}
    assert why[how] in err.what and "--resume auto" in err.hint
    # never trained on: the run stopped before any step after the damage finished
    resumed = train(setup(rec, Telemetry([]), resume="auto"))
    assert resumed.losses == straight.losses


def test_the_cli_says_it_in_one_message_and_exits_1(tiny_llama, tmp_path):
    """Through `grass train`: the damage done by another process between two steps."""
    rec = make_recipe(tiny_llama, tmp_path / "run", optimizer=DISK, training={"max_steps": 16})
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(rec.to_yaml())
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from grass_cli.engine import loop\n"
        "folder = Path(sys.argv[2])\n"
        "real = loop.record_step\n"
        "def record_step(run, res, out):\n"
        "    real(run, res, out)\n"
        "    if res.progress.step == 6:\n"
        "        for f in sorted(folder.glob('*.bin')):\n"
        "            f.write_bytes(bytes(f.stat().st_size))\n"
        "loop.record_step = record_step\n"
        "from grass_cli.cli import main\n"
        "sys.argv = ['grass', 'train', sys.argv[1], '--no-live', '--quiet']\n"
        "main()\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(recipe_file), str(tmp_path / "run" / "offload")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "offloaded optimizer state changed on disk after it was written" in res.stderr
    assert str(tmp_path / "run" / "offload") in res.stderr


def test_the_store_round_trips_and_catches_a_flip_in_any_tensor(tmp_path):
    store = DiskStore(tmp_path / "s", torch.device("cpu"), overlap=True)
    a, b = torch.randn(1000), torch.arange(64, dtype=torch.int32)
    store.put("g", [a, b])
    store.settle()
    got = store.get("g", torch.device("cpu"))
    assert torch.equal(got[0], a) and torch.equal(got[1], b)
    raw = bytearray((tmp_path / "s" / "g.bin").read_bytes())
    raw[4000 + 7] ^= 1  # a bit in the second tensor (after 1000 float32)
    (tmp_path / "s" / "g.bin").write_bytes(bytes(raw))
    with pytest.raises(OffloadError, match="tensor 1 of 2 fails its CRC-32"):
        store.get("g", torch.device("cpu"))
    store.put("g", [a, b])  # written again: whole again
    assert torch.equal(store.get("g", torch.device("cpu"))[1], b)
    store.close()


SMALL_FS = 'mkdir -p "$1" && mount -t tmpfs -o size=4m tmpfs "$1"'


def test_a_disk_that_fills_during_write_back_is_one_message_and_the_run_resumes(
    tiny_llama, tmp_path
):
    """A real 4 MB filesystem (tmpfs; needs mount rights) holds the offload folder;
    after step 5 another file fills it, as another process would. The next write-back
    fails in the kernel (ENOSPC): one message naming the file, nothing trained on
    state that was not written, and once space is freed the last checkpoint resumes
    to the losses of a run that never ran out."""
    small = tmp_path / "small"
    mounted = subprocess.run(["sh", "-c", SMALL_FS, "sh", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small filesystem here")
    try:

        def recipe(out, where):
            offload = {**DISK["offload"], "path": str(where)}
            return make_recipe(
                tiny_llama, out, optimizer={**DISK, "offload": offload},
                training={"max_steps": 16}, checkpoint={"interval": 4},
            )  # fmt: skip

        _, straight = run_straight(recipe(tmp_path / "straight", tmp_path / "off-straight"))
        rec = recipe(tmp_path / "run", small / "offload")
        filler = small / "filler"

        class FillAfter:
            def emit(self, event):
                if event["event"] == "step" and event["step"] + 1 == 5:
                    with open(filler, "wb") as f:  # every free block, to ENOSPC
                        try:
                            while True:
                                f.write(b"\1" * 65536)
                                f.flush()
                        except OSError:
                            pass

            def close(self):
                pass

        run = setup(rec, Telemetry([FillAfter()]))
        with pytest.raises(OffloadError) as caught:
            train(run)
        run.optimizer.store.close(keep=True)
        err = caught.value
        assert "cannot write offloaded optimizer state (disk full)" in err.what
        assert Path(err.where).parent == small / "offload"
        filler.unlink()
        resumed = train(setup(rec, Telemetry([]), resume="auto"))
        assert resumed.losses == straight.losses
    finally:
        subprocess.run(["umount", str(small)], check=False)
