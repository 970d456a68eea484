"""Group-owner ZeRO memory: across 2 gloo ranks each rank allocates fp32 master and Adam moment
chunks only for the chunk groups it owns, and training still matches one process.

Each rank attaches the same small GPT with its `Collective`, trains on its half of every batch
(loss divided by 2, so the summed grads are the full batch's mean) and reports its stats, host
bytes and state-dict shard; the test compares them with one process on the whole batch.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from homestar.runtime import RuntimeConfig, attach
from homestar.runtime.collectives import Collective
from runtime_helpers import CHUNK, Setup, batches, lr_at, make_model, one_thread, optim_config  # noqa: F401

WORLD = 2
STEPS = 2


def _config(precision: str, stream_share: float | None = None, budget_chunks: int | None = None) -> RuntimeConfig:
    # every group homed on the host, so host bytes are every chunk's home
    budget = None if budget_chunks is None else budget_chunks * CHUNK * 4
    return RuntimeConfig(device="cpu", chunk_elems=CHUNK, precision=precision, optimizer_placement="host",
                         optimizer_stream_share=stream_share, gpu_budget_bytes=budget)


def _train(engine, data, rank: int | None) -> None:
    for step, micro in enumerate(data):
        for idx, targets in micro:
            if rank is not None:  # this rank's half of the batch; the reduce sums the halves
                half = idx.shape[0] // WORLD
                idx, targets = idx[rank * half:(rank + 1) * half], targets[rank * half:(rank + 1) * half]
                engine.forward_backward(idx, targets, WORLD * len(micro))
            else:
                engine.forward_backward(idx, targets, len(micro))
        engine.step(lr_at(step))


def _report(engine) -> dict:
    stats = engine.stats()
    state = engine.state_dict()
    return {"state_groups": stats["state_groups"], "state_bytes": stats["optimizer_state_bytes"],
            "cpu_mem": engine.memory()["cpu_mem"], "weights": state["weights"],
            "moments": sorted(state["optimizer"]["exp_avg"]), "streamed": stats["streamed_groups"],
            "reduced_in_backward": stats["reduced_in_backward"], "evictions": stats["evictions"],
            "shared_on_device": stats["shared_on_device"], "updated_on_device": stats["params_updated_on_device"]}


def _rank(rank: int, init: str, precision: str, share: float | None, accum: int, budget: int | None,
          out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        setup = Setup()
        comm = Collective(rank=rank, world=WORLD)
        engine = attach(make_model(setup), _config(precision, share, budget), optim_config(setup), collective=comm)
        _train(engine, batches(STEPS, accum), rank)
        # what attach agrees on when each rank's GPU found its own free memory
        out[rank] = {**_report(engine), "least": comm.least(1000 - rank)}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("precision, share, accum, budget", [
    ("fp32", None, 1, None), ("bf16", None, 1, None), ("bf16", 0.6, 1, None),
    ("fp32", None, 2, 6),  # accumulation, and a device budget that evicts grad chunks mid-backward
])
def test_each_rank_allocates_only_its_groups_optimizer_state(tmp_path, precision, share, accum, budget):
    """`share`: the fraction of each rank's own host-homed groups whose AdamW streams through the
    (simulated) device, beside its CPU's. Every grad chunk is summed onto its owner as the step's
    last backward completes it, not in the step."""
    setup = Setup()
    # ranks keep fp32 grads whatever the precision (their reduce sums in the grads' dtype):
    # the one-process reference does the same, so the two differ in optimizer state alone
    config = dataclasses.replace(_config(precision), grad_precision="fp32")
    single = attach(copy.deepcopy(make_model(setup)), config, optim_config(setup))
    _train(single, batches(STEPS, accum), None)
    whole = _report(single)
    n_groups = len(single.groups)
    assert n_groups >= 4 and whole["state_groups"] == list(range(n_groups))

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(f"file://{tmp_path / 'store'}", precision, share, accum, budget, out),
                 nprocs=WORLD, join=True)
        ranks = [out[r] for r in range(WORLD)]

    per_elem = 12 if precision == "bf16" else 8  # fp32 master (when separate) + two fp32 moments
    assert whole["state_bytes"] == per_elem * sum(g.param.numel for g in single.groups)
    for rank, report in enumerate(ranks):
        assert report["least"] == 1000 - (WORLD - 1)  # every rank gets the smallest
        assert report["state_groups"] == list(range(rank, n_groups, WORLD))
        assert report["reduced_in_backward"] == n_groups * STEPS  # once per step, in the last backward
        if share:  # some of its own groups, not all
            assert report["streamed"] and set(report["streamed"]) < set(report["state_groups"])
        else:
            assert report["streamed"] == []
        if budget is None:  # every param chunk stays cached on the (simulated) device: the share
            # broadcasts from and into those copies, and streamed AdamW updates bf16 ones there
            assert report["shared_on_device"] > 0
            assert (report["updated_on_device"] > 0) == bool(share and precision == "bf16")
        owned = sum(single.groups[g].param.numel for g in report["state_groups"])
        assert report["state_bytes"] == per_elem * owned
        # host memory: every param and grad chunk, optimizer state for owned groups alone
        assert whole["cpu_mem"] - report["cpu_mem"] == whole["state_bytes"] - report["state_bytes"]
        assert 0.25 < report["state_bytes"] / whole["state_bytes"] < 0.75
    assert sum(r["state_bytes"] for r in ranks) == whole["state_bytes"]

    # the shards hold disjoint parameters whose union is the model, trained as one process trained it
    merged = {name: t for r in ranks for name, t in r["weights"].items()}
    assert sum(len(r["weights"]) for r in ranks) == len(merged) == len(whole["weights"])
    assert sorted(m for r in ranks for m in r["moments"]) == whole["moments"]
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    for name, tensor in whole["weights"].items():
        torch.testing.assert_close(merged[name], tensor, **tol, msg=name)


def test_host_budget_counts_only_owned_groups_state():
    """A host budget that holds one rank's share but not the whole optimizer state: attach fails
    on one process and fits on rank 0 of 2, with every group homed on the host."""
    from homestar.errors import BudgetError
    from homestar.runtime.attach import plan_chunks

    setup = Setup()
    model = make_model(setup)
    sizes = [(name, p.numel()) for name, p in model.named_parameters()]
    comm = Collective(rank=0, world=WORLD)
    _, mine = plan_chunks(sizes, _config("fp32"), None, comm)
    _, whole = plan_chunks(sizes, _config("fp32"), None)
    need = sum(g.total for g in mine)
    assert need < sum(g.total for g in whole)
    config = RuntimeConfig(device="cpu", chunk_elems=CHUNK, cpu_budget_bytes=need, gpu_budget_bytes=need // 4,
                           optimizer_placement="host")
    with pytest.raises(BudgetError):
        attach(copy.deepcopy(model), config, optim_config(setup))
    engine = attach(copy.deepcopy(model), config, optim_config(setup), collective=comm)
    assert engine.stats()["device_groups"] == [] and engine.memory()["cpu_mem"] == need
    with pytest.raises(ValueError):  # its state is rank 0's of 2: it cannot serve one process
        engine.distribute(Collective())
    engine.close()


class _SometimesModel(torch.nn.Module):
    """A tiny language model with a layer the last micro-batch of each step does not use: its
    grad chunk then misses gradients in the step's last backward and is handed over (summed onto
    its owner) only when that backward ends."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(256, 64)
        self.extra = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 256)
        self.use_extra = True

    def forward(self, idx, targets):
        x = self.embed(idx)
        if self.use_extra:
            x = x + torch.tanh(self.extra(x))
        logits = self.head(x)
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


_SOMETIMES_CONFIG = dataclasses.replace(_config("fp32"), chunk_elems=24_000)
"""The embedding and `extra` share a chunk: it gets some gradients in the last backward, not all."""


def _train_sometimes(engine, model, rank: int | None) -> list[float]:
    losses = []
    for step, micro in enumerate(batches(3, 2)):
        for k, (idx, targets) in enumerate(micro):
            model.use_extra = k == 0  # the last micro-batch leaves `extra` without a gradient
            if rank is not None:
                half = idx.shape[0] // WORLD
                idx, targets = idx[rank * half:(rank + 1) * half], targets[rank * half:(rank + 1) * half]
            losses.append(float(engine.forward_backward(idx, targets, len(micro) * (WORLD if rank is not None else 1))))
        engine.step(lr_at(step))
    return losses


def _rank_sometimes(rank: int, init: str, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model = _SometimesModel()
        engine = attach(model, _SOMETIMES_CONFIG, optim_config(Setup()), collective=Collective(rank=rank, world=WORLD))
        _train_sometimes(engine, model, rank)
        out[rank] = {"weights": engine.state_dict()["weights"], "reduced": engine.stats()["reduced_in_backward"]}
    finally:
        dist.destroy_process_group()


def test_a_chunk_without_gradients_in_the_last_backward_is_summed_when_backward_ends(tmp_path):
    model = _SometimesModel()
    single = attach(copy.deepcopy(model), _SOMETIMES_CONFIG, optim_config(Setup()))
    assert single.table.infos[1].group is single.table.infos[0].group  # `extra` shares the embedding's chunk
    _train_sometimes(single, single.model, None)
    whole = single.state_dict()["weights"]
    n_groups = len(single.groups)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_sometimes, args=(f"file://{tmp_path / 'store'}", out), nprocs=WORLD, join=True)
        ranks = [out[r] for r in range(WORLD)]
    merged = {name: t for r in ranks for name, t in r["weights"].items()}
    assert sorted(merged) == sorted(whole)
    for name, tensor in whole.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for report in ranks:
        assert report["reduced"] == n_groups * 3  # every group once a step, `extra`'s at the end
