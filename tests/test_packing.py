"""Sample packing (data.packing): rows packed into one sequence train exactly as alone.

Per-row losses and gradients of a packed batch equal those of the same rows
unpacked, a row never sees another row (attention or positions), the model check
refuses a model that would leak, and an interrupted packed run resumes exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grass_cli.data import IGNORE_INDEX, BatchIterator, TokenizedData, collate, tokenize_rows
from grass_cli.data.packing import (
    check_model_packs,
    collate_packed,
    count_micro_batches,
    model_inputs,
    pack_next,
)
from grass_cli.engine import Interrupted, StopRequest, setup, train
from grass_cli.errors import DataError, ModelError
from grass_cli.evaluate.loss import count_targets, loss_sum, row_loss_sums
from grass_cli.recipe import DataConfig, validate_dict
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
M = IGNORE_INDEX


def lengths_data(lengths: list[int]) -> TokenizedData:
    ids = [[i + 1] * n for i, n in enumerate(lengths)]
    return TokenizedData(input_ids=ids, labels=[list(r) for r in ids], source="x")


@pytest.fixture(scope="module")
def rows(tokenizer) -> TokenizedData:
    """24 quickstart rows (49 to 58 tokens), every label trained (first ones too)."""
    from grass_cli.data import load_rows

    cfg = DataConfig(train=TRAIN, max_length=128, train_on_prompt=True)
    return tokenize_rows(load_rows(TRAIN, 24), cfg, tokenizer, TRAIN)


def load(path: Path, impl: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()


# ------------------------------------------------------------------ the packer


def test_pack_next_first_fit_stops_at_the_first_row_that_fits_nowhere():
    lengths = [5, 4, 3, 6, 2, 9]
    packed, pos = pack_next(lengths, range(6), 0, bins=2, capacity=10)
    # 5 -> bin 0; 4 -> bin 0 (9); 3 -> bin 1; 6 -> bin 1 (9); 2 fits nowhere: stop
    assert packed == [[0, 1], [2, 3]] and pos == 4
    packed, pos = pack_next(lengths, range(6), pos, bins=2, capacity=10)
    assert packed == [[4], [5]] and pos == 6
    with pytest.raises(ValueError, match="more than the capacity"):
        pack_next([11], [0], 0, bins=1, capacity=10)


def test_packed_epochs_see_every_row_once_and_fit_the_length():
    lengths = [3, 9, 1, 7, 4, 4, 8, 2, 6, 5, 10, 1, 3]
    it = BatchIterator(lengths_data(lengths), 2, 0, seed=3, packing=True, max_length=10)
    for epoch in range(3):
        seen: list[int] = []
        for _ in range(it.batches_per_epoch):
            seqs = it.next_sequences()
            assert 1 <= len(seqs) <= 2
            assert all(sum(lengths[i] for i in s) <= 10 for s in seqs)
            seen += [i for s in seqs for i in s]
        assert sorted(seen) == list(range(13)) and it.epoch == epoch + 1 and it.position == 0


def test_collate_packed_positions_labels_and_padding():
    batch = collate_packed([[([5, 6, 7], [M, 6, 7]), ([8, 9], [8, 9])], [([4, 3], [4, 3])]], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # each row's first label masked: the last token of a row never predicts the next row
    assert batch["labels"].tolist() == [[M, 6, 7, M, 9], [M, 3, M, M, M]]
    assert set(model_inputs(batch)) == {"input_ids", "position_ids"}
    plain = collate([[5, 6]], [[5, 6]], 0)
    assert set(model_inputs(plain)) == {"input_ids", "attention_mask"}


def test_steps_for_epochs_counts_packed_batches_exactly():
    lengths = [(7 * i) % 10 + 1 for i in range(40)]
    it = BatchIterator(lengths_data(lengths), 3, 0, seed=5, packing=True, max_length=12)
    per = [count_micro_batches(lengths, it.order(e), 3, 12) for e in range(3)]
    produced = 0
    while it.epoch == 0:
        it.next_sequences()
        produced += 1
    assert produced == per[0]
    assert it.steps_for_epochs(1, 1) == per[0]
    assert it.steps_for_epochs(2.5, 2) == -(-(per[0] + per[1] + -(-per[2] // 2)) // 2)
    plain = BatchIterator(lengths_data(lengths), 3, 0, seed=5)
    assert plain.steps_for_epochs(1.5, 2) == 11  # ceil(1.5 * ceil(40 / 6)), as always


def test_packed_shards_are_disjoint_and_cover_the_global_batch():
    lengths = [(5 * i) % 7 + 2 for i in range(23)]
    data = lengths_data(lengths)
    one = BatchIterator(data, 4, 0, seed=9, packing=True, max_length=9)
    ranks = [
        BatchIterator(data, 2, 0, seed=9, rank=r, world=2, packing=True, max_length=9)
        for r in range(2)
    ]
    for _ in range(9):  # across epoch boundaries
        glob = one.next_sequences()
        shards = [it.next_sequences() for it in ranks]
        assert sorted(shards[0] + shards[1]) == sorted(glob)
        assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    empty = ranks[1].packed_batch([])  # an empty share: one row with no loss
    assert count_targets(empty) == 0


def test_packing_state_resumes_and_refuses_a_change_of_packing():
    data = lengths_data([(3 * i) % 8 + 1 for i in range(30)])
    it = BatchIterator(data, 2, 0, seed=4, packing=True, max_length=10)
    for _ in range(7):
        it.next_sequences()
    state = json.loads(json.dumps(it.state_dict()))
    expected = [it.next_sequences() for _ in range(9)]
    fresh = BatchIterator(data, 2, 0, seed=0, packing=True, max_length=10)
    fresh.load_state_dict(state)
    assert [fresh.next_sequences() for _ in range(9)] == expected
    plain = BatchIterator(data, 2, 0)
    assert "packing" not in plain.state_dict()  # an unpacked state is what it always was
    with pytest.raises(DataError, match="data.packing on, but it is now off"):
        plain.load_state_dict(state)
    with pytest.raises(DataError, match="data.packing off, but it is now on"):
        fresh.load_state_dict(plain.state_dict())


# ------------------------------------------------------- the model's side of it


def packed_row_losses(model, batch, sequences) -> dict[int, float]:
    """Each packed row's summed loss, from one forward of the packed batch."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none"
    ).view(labels.shape)
    segment = (batch["position_ids"] == 0).cumsum(-1)[:, 1:] - 1  # row of each target
    out = {}
    for i, seq in enumerate(sequences):
        for k, row in enumerate(seq):
            out[row] = float(ce[i][(segment[i] == k) & (labels[i] != M)].double().sum())
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_losses_and_gradients_equal_unpacked(arch, impl, rows, tiny_factory, tokenizer):
    model = load(tiny_factory(arch, 2), impl)
    it = BatchIterator(rows, 3, tokenizer.pad_token_id, seed=1, packing=True, max_length=128)
    sequences = it.next_sequences()
    assert max(len(s) for s in sequences) >= 2  # rows really share sequences
    packed = it.packed_batch(sequences)
    order = [i for s in sequences for i in s]
    plain = collate([rows.input_ids[i] for i in order], [rows.labels[i] for i in order], 0)
    assert count_targets(packed) == count_targets(plain)

    with torch.no_grad():
        per_row = packed_row_losses(model, packed, sequences)
        sums, _ = row_loss_sums(model, plain)
    for row, expected in zip(order, sums.tolist(), strict=True):
        assert per_row[row] == pytest.approx(expected, rel=1e-5, abs=1e-4)

    grads = []
    for batch in (packed, plain):
        model.zero_grad()
        (loss_sum(model, batch) / count_targets(batch)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_row_never_sees_the_row_before_it(impl, rows, tiny_llama):
    model = load(tiny_llama, impl)
    a, b = rows.input_ids[0], rows.input_ids[1]
    other_b = [(t * 7 + 3) % 40000 for t in b]  # same length, other tokens
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([a])).logits[0]
        got = []
        for first in (b, other_b):
            batch = collate_packed([[(first, first), (a, a)]], 0)
            got.append(model(**model_inputs(batch), use_cache=False).logits[0, len(b) :])
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=1e-6)  # B changes, A does not
    torch.testing.assert_close(got[0], alone, rtol=1e-5, atol=1e-5)  # positions restart


class _Wrapped(torch.nn.Module):
    """A model whose forward drops position ids (as code unaware of packing would)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=False)


class _NoPositions(_Wrapped):
    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=False)


def test_model_check_passes_real_models_and_refuses_leaky_ones(tiny_factory):
    cpu = torch.device("cpu")
    for arch in ("llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox"):
        for impl in ("sdpa", "eager"):
            model = load(tiny_factory(arch, 2), impl).train()
            check_model_packs(model, cpu)
            assert model.training  # the check restores the mode
    inner = load(tiny_factory("llama", 2), "sdpa")
    with pytest.raises(ModelError, match="does not keep packed rows apart") as exc:
        check_model_packs(_Wrapped(inner), cpu)
    assert exc.value.where == "data.packing" and "data.packing: false" in exc.value.hint
    with pytest.raises(ModelError, match="does not take position_ids"):
        check_model_packs(_NoPositions(inner), cpu)


# ------------------------------------------------------------- a packed run


def packed_recipe(model_dir: Path, out: Path):
    return validate_dict(
        {
            "model": {"path": str(model_dir)},
            "data": {"train": TRAIN, "max_length": 128, "limit": 40, "packing": True},
            "sampler": {"strategy": "grass", "gamma": 2, "switch_interval": 2, "probe_steps": 2},
            "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
            "training": {"max_steps": 7, "micro_batch_size": 3, "seed": 5},
            "output": {"dir": str(out), "save_model": False},
        },
        "test.yaml",
    )


class _StopAfter:
    def __init__(self, k: int, stop: StopRequest):
        self.k, self.stop = k, stop

    def emit(self, event):
        if event["event"] == "step" and event["step"] + 1 == self.k:
            self.stop.requested = "SIGINT"

    def close(self):
        pass


def test_packed_run_resumes_exactly(tiny_factory, tmp_path):
    model_dir = tiny_factory("gpt2", 4)  # dropout: the RNG state must resume too
    a = setup(packed_recipe(model_dir, tmp_path / "a"), Telemetry([]), overwrite=True)
    ra = train(a)
    # 40 rows, 2 per sequence, 3 sequences a step: 7 steps cross an epoch (with probing)
    assert a.batches.epoch >= 1
    stop = StopRequest()
    recipe_b = packed_recipe(model_dir, tmp_path / "b")
    b = setup(recipe_b, Telemetry([_StopAfter(3, stop)]), overwrite=True)
    with pytest.raises(Interrupted):
        train(b, stop)
    b2 = setup(recipe_b, Telemetry([]), resume="auto")
    rb = train(b2)
    assert rb.losses == ra.losses and len(ra.losses) == 7
    pa = dict(a.model.named_parameters())
    for name, p in b2.model.named_parameters():
        assert torch.equal(p, pa[name]), name
    steps = [
        json.loads(x)
        for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()
        if json.loads(x)["event"] == "step"
    ]
    assert [e["step"] for e in steps] == list(range(7))
    assert max(e["tokens"] for e in steps) > 3 * 128 * 0.6  # packed: sequences mostly full
