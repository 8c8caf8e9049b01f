"""DecomposeSchedule under DistributedDataParallel: 2 CPU processes, gloo, file:// rendezvous."""
from __future__ import annotations

import gc
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

WORLD = 2
DEADLINE_S = 90


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _steps(model, optimizer, x, y, rank, n, batch=32):
    for step in range(n):
        start = (step * WORLD + rank) * batch % (len(y) - batch)
        optimizer.zero_grad()
        F.cross_entropy(model(x[start:start + batch]), y[start:start + batch]).backward()
        optimizer.step()


def _skewed_tucker(skew: bool, budget):
    """A Tucker pass whose Budget candidates look different on one rank (as latency timings of a
    noisy machine may): there the cheapest candidate's error reads 1000× smaller."""
    from fxshift import TuckerDecomposePass

    class Skewed(TuckerDecomposePass):
        def budget_candidates(self, name, module, fractions):
            found = super().budget_candidates(name, module, fractions)
            if isinstance(found, str) or not skew:
                return found
            return [(r, e * (1e-3 if i == 0 else 1.0)) for i, (r, e) in enumerate(found)]

    return Skewed(rank=budget)


def _planned_ranks(gm) -> list:
    from fxshift import report

    return [[r["layer"], r["rank"]] for r in report(gm).to_dicts()]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _run(rank, out_dir)
    finally:
        # Free every DDP wrapper (they hold the process group, some in reference cycles) before the
        # group is destroyed: a gloo group still alive at interpreter exit can abort the process
        # (its worker thread frees a finished collective's tensors and needs the GIL while Python
        # finalizes: "terminate called without an active exception", 1 run in ~10 here).
        gc.collect()
        dist.destroy_process_group()


def _run(rank: int, out_dir: str) -> None:
    from fxshift import FxshiftError, TuckerDecomposePass, apply
    from fxshift.data import digits
    from fxshift.nn.tucker import TuckerConv2d
    from fxshift.train import DecomposeSchedule, apply_synced, max_state_difference

    x, y = digits(train=True).tensors
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must make them agree
    model = DDP(Net(), find_unused_parameters=False, bucket_cap_mb=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.7)
    sched = DecomposeSchedule(1, TuckerDecomposePass(rank=0.5), recompose_at_end=True,
                              example_inputs=torch.zeros(1, 1, 8, 8))
    result = {"rank": rank}
    for epoch in range(3):
        model, optimizer = sched.on_epoch_start(epoch, model, optimizer, lr_scheduler=scheduler)
        if epoch == 1:
            inner = model.module
            result["wrapped"] = isinstance(model, DDP)
            result["decomposed"] = isinstance(inner.get_submodule("conv2"), TuckerConv2d)
            result["bucket_mb"] = model.bucket_bytes_cap / 2 ** 20
            result["after_switch"] = max_state_difference(inner)
            result["opt_covers"] = ({id(p) for g in optimizer.param_groups for p in g["params"]}
                                    == {id(p) for p in model.parameters()})
            # determinism evidence: the pipeline on each rank's (identical) weights, no broadcast
            plain = apply(TuckerDecomposePass(rank=0.5), inner.eval(), torch.zeros(1, 1, 8, 8))
            inner.train()
            result["without_broadcast"] = max_state_difference(plain)
        _steps(model, optimizer, x, y, rank, 6)
        scheduler.step()
    result["after_steps"] = max_state_difference(model.module, buffers=False)
    result["lr"] = optimizer.param_groups[0]["lr"]
    model, optimizer = sched.on_train_end(model, optimizer, lr_scheduler=scheduler)
    result["recomposed_wrapped"] = isinstance(model, DDP)
    result["after_recompose"] = max_state_difference(model.module)
    _steps(model, optimizer, x, y, rank, 2)
    result["after_recompose_steps"] = max_state_difference(model.module, buffers=False)
    fresh = Net()
    fresh.load_state_dict(model.module.state_dict())
    result["loads_into_original"] = True
    # apply_synced on its own: different weights per rank end equal (broadcast from rank 0) ...
    torch.manual_seed(7 + rank)
    own = Net()
    synced = apply_synced(TuckerDecomposePass(rank=0.5), own, torch.zeros(1, 1, 8, 8))
    result["synced_from_different_weights"] = max_state_difference(synced)
    result["source_kept"] = (rank != 0) or torch.equal(synced.fc.second.bias, own.fc.bias)
    # ... and different structures are an error on every rank
    try:
        apply_synced(TuckerDecomposePass(rank=0.5 if rank == 0 else 0.25), own, torch.zeros(1, 1, 8, 8))
        result["mismatch_error"] = ""
    except FxshiftError as exc:
        result["mismatch_error"] = str(exc)
    # A Budget is planned on rank 0 and broadcast: a rank whose measurements differ still
    # builds rank 0's structure (plain apply on each rank would not).
    from fxshift import Budget

    budget = Budget(params=0.75)
    result["budget_plain"] = _planned_ranks(apply(_skewed_tucker(rank == 1, budget), own, torch.zeros(1, 1, 8, 8)))
    result["budget_synced"] = _planned_ranks(apply_synced(_skewed_tucker(rank == 1, budget), own,
                                                          torch.zeros(1, 1, 8, 8)))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_ddp_ranks_agree_after_the_switch_and_after_more_steps(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init_file = tmp_path / "rendezvous"
    context = mp.start_processes(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} DDP processes did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in results:
        assert r["wrapped"] and r["decomposed"] and r["opt_covers"], r
        assert r["bucket_mb"] == 4  # the wrapper's options were kept
        assert r["after_switch"] == 0.0  # parameters and buffers bitwise equal on both ranks
        assert r["without_broadcast"] == 0.0  # the pipeline is deterministic on identical weights here
        assert r["after_steps"] == 0.0
        assert r["recomposed_wrapped"] and r["after_recompose"] == 0.0 and r["after_recompose_steps"] == 0.0
        assert r["loads_into_original"]
        assert r["synced_from_different_weights"] == 0.0 and r["source_kept"]
        assert "different structures on ranks 0 and 1" in r["mismatch_error"], r["mismatch_error"]
    assert results[0]["lr"] == results[1]["lr"] == pytest.approx(0.05 * 0.7 ** 3)
    assert results[0]["budget_plain"] != results[1]["budget_plain"]  # the skew changes the plan...
    assert results[0]["budget_synced"] == results[1]["budget_synced"] == results[0]["budget_plain"]  # ...not here
