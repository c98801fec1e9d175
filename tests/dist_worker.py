"""Worker for tests/test_distributed.py, run under torchrun with 2 gloo processes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py MODE OUT

MODE reducer: a small model's gradients reduced through GradReducer equal the sum
of every rank's gradients (checked against all_gather), only the trainable
parameters are reduced, and the byte count equals their size.
MODE disagree: the ranks pass different values to check_same; each must raise
RankDisagreement naming both ranks' values.
Each rank writes OUT/rank-N.json with what it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from grass_cli import distributed
from grass_cli.distributed import GradReducer, RankDisagreement, check_same


def reducer_mode(rank: int) -> dict:
    torch.manual_seed(0)  # same weights on both ranks
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
    )
    params = list(model.parameters())
    observed: dict[int, float] = {}
    # 600-byte buckets: several buckets, so the in-order launch is exercised
    reducer = GradReducer(
        params, 600, observe=lambda p, g: observed.__setitem__(id(p), float(g.sum()))
    )
    frozen = model[0]
    for p in frozen.parameters():
        p.requires_grad_(False)
    trainable = [p for p in params if p.requires_grad]
    reducer.prepare(trainable)
    torch.manual_seed(100 + rank)  # different data per rank
    x = torch.randn(5, 8)
    # two micro-batches: the first accumulates locally, the second is reduced
    model(x[:2]).pow(2).sum().backward()
    local_first = [p.grad.clone() for p in trainable]
    reducer.arm()
    model(x[2:]).pow(2).sum().backward()
    reducer.finish()
    reduced = [p.grad.clone() for p in trainable]
    # reference: recompute this rank's local gradient and sum it over ranks by hand
    for p in trainable:
        p.grad = None
    model(x).pow(2).sum().backward()
    local = [p.grad.clone() for p in trainable]
    gathered = distributed.gather_objects([t.tolist() for t in local])
    expected = [sum(torch.tensor(g[i]) for g in gathered) for i in range(len(local))]
    return {
        "max_err": max(float((r - e).abs().max()) for r, e in zip(reduced, expected, strict=True)),
        "bytes": reducer.take_bytes(),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "frozen_has_grad": any(p.grad is not None for p in frozen.parameters()),
        "buckets": len(reducer.buckets),
        "observed_all": len(observed) == len(trainable),
        "first_nonzero": bool(sum(float(t.abs().sum()) for t in local_first) > 0),
    }


def disagree_mode(rank: int) -> dict:
    try:
        check_same("the active blocks", [1, 2 + rank], torch.device("cpu"), step=7)
    except RankDisagreement as e:
        return {"raised": True, "message": str(e), "exit_code": e.exit_code}
    return {"raised": False}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    info = distributed.from_env()
    distributed.init(info, torch.device("cpu"))
    result = reducer_mode(info.rank) if mode == "reducer" else disagree_mode(info.rank)
    result["world"] = dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{info.rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    main()
