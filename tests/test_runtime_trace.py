"""Warm-up traces, Belady eviction, and re-tracing when the shape of work changes."""

from __future__ import annotations

import pytest
import torch

from homestar.runtime.chunk import Chunk, Kind
from homestar.runtime.eviction import choose_victims
from homestar.runtime.trace import INF, Tracer
from runtime_helpers import SEQ, Setup, attach_copy, batches, make_model, one_thread  # noqa: F401


def chunk(chunk_id: int, dirty: bool = False, last: int = 0) -> Chunk:
    out = Chunk(id=chunk_id, kind=Kind.PARAM, group=chunk_id, numel=10, dtype=torch.float32, slots=())
    out.device_dirty, out.last_access = dirty, last
    return out


def test_tracer_records_then_replays_distances_and_lookahead():
    tracer = Tracer()
    tracer.begin("train")
    for chunk_id in [0, 1, 2, 1, 0]:
        tracer.access(chunk_id, nonmodel=chunk_id * 100)
    assert tracer.distance(0) == INF  # no distances while recording
    assert tracer.end() is not None
    tracer.begin("train")
    tracer.access(0, nonmodel=0)
    assert tracer.replaying
    assert tracer.distance(1) == 0 and tracer.distance(2) == 1 and tracer.distance(0) == 3
    assert tracer.upcoming(2) == [1, 2]
    assert tracer.upcoming(3) == [1, 2, 0]  # distinct chunks, in order of next use
    assert tracer.reserve() == 200  # the largest non-model memory of the coming moments
    tracer.access(1, 0)
    tracer.access(2, 0)
    assert tracer.distance(2) == INF  # not used again in this run
    assert tracer.end() is None  # a replay records nothing new


def test_a_run_that_strays_from_its_trace_is_traced_again():
    tracer = Tracer()
    tracer.begin("k")
    tracer.access(0, 0)
    tracer.end()
    tracer.begin("k")
    tracer.access(5, 0)  # never seen in this trace
    assert not tracer.replaying and "k" not in tracer.traces
    tracer.end()
    tracer.begin("k")
    assert tracer.recording


def test_belady_evicts_the_farthest_next_use_first():
    chunks = [chunk(0), chunk(1), chunk(2), chunk(3)]  # 40 bytes each
    distance = {0: 5, 1: INF, 2: 1, 3: 9}
    pick = choose_victims(chunks, need=60, room=0, distance=lambda c: distance[c.id])
    assert [c.id for c in pick] == [1, 3]
    assert choose_victims(chunks, need=60, room=65, distance=lambda c: distance[c.id]) == []
    assert choose_victims(chunks, need=200, room=0, distance=lambda c: distance[c.id]) is None
    # prefetch for a chunk needed in 6 moments may only evict chunks needed later than that
    assert [c.id for c in choose_victims(chunks, 60, 0, lambda c: distance[c.id], farther_than=6)] == [1, 3]
    assert choose_victims(chunks, 100, 0, lambda c: distance[c.id], farther_than=6) is None


def test_without_a_trace_clean_then_least_recently_used_go_first():
    chunks = [chunk(0, dirty=True, last=1), chunk(1, last=5), chunk(2, last=2)]
    pick = choose_victims(chunks, need=10, room=0, distance=lambda c: INF)
    assert [c.id for c in pick] == [2]


def test_engine_traces_each_shape_of_work_once():
    setup = Setup()
    engine = attach_copy(make_model(setup), setup, budget_chunks=4)
    (idx, targets), = batches(1, 1)[0]
    for _ in range(2):
        engine.forward_backward(idx, targets, 1.0)
        engine.step(1e-3)
        engine.eval_loss(idx, targets)
    keys = set(engine.tracer.traces)
    assert {("train", (4, SEQ), (4, SEQ)), ("eval", (4, SEQ), (4, SEQ)), ("step",)} == keys
    engine.forward_backward(idx[:2, :8], targets[:2, :8], 1.0)
    assert ("train", (2, 8), (2, 8)) in engine.tracer.traces
    prefetched = engine.stats()["prefetches"]
    engine.forward_backward(idx, targets, 1.0)  # replayed: prefetch follows the trace
    assert engine.stats()["prefetches"] > prefetched


def test_eval_loss_equals_the_plain_model():
    setup = Setup()
    ref = make_model(setup)
    engine = attach_copy(ref, setup, budget_chunks=4)
    (idx, targets), = batches(1, 1)[0]
    with torch.no_grad():
        _, expected = ref(idx, targets)
    assert engine.eval_loss(idx, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    assert engine.eval_loss(idx, targets).item() == pytest.approx(expected.item(), rel=1e-6)
