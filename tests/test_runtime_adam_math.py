"""The host's slice-by-slice AdamW for bf16 grads gives exactly the whole-chunk result."""

from __future__ import annotations

import pytest
import torch

from homestar.optim import OptimConfig
from homestar.runtime import adam_math
from homestar.runtime.adam_math import Span, fused_adamw, sliced_adamw


@pytest.mark.parametrize("clip", [None, 0.37])
def test_sliced_adamw_equals_widening_the_whole_chunk(monkeypatch, clip):
    monkeypatch.setattr(adam_math, "SLICE_ELEMS", 64)  # parameters span several slices
    gen = torch.Generator().manual_seed(0)
    sizes, decays = [100, 64, 257, 3], [True, False, True, False]
    offsets = [0, 128, 192, 512]  # aligned starts with padding between, as in a chunk
    numel = 576
    config = OptimConfig(lr=1e-3, weight_decay=0.1)
    master = torch.randn(numel, generator=gen)
    grad = torch.randn(numel, generator=gen).bfloat16()
    moments = [torch.rand(numel, generator=gen) for _ in range(2)]
    coef = None if clip is None else torch.tensor(clip)

    # the reference: widen the whole chunk, clip, one fused call per decay class, cast the chunk
    ref = [master.clone(), moments[0].clone(), moments[1].clone()]
    wide = grad.float()
    if coef is not None:
        wide.mul_(coef)
    ref_steps = [torch.tensor(3.0) for _ in sizes]
    for decay in (True, False):
        pick = [i for i, d in enumerate(decays) if d is decay]
        cut = lambda t: [t[offsets[i] : offsets[i] + sizes[i]] for i in pick]  # noqa: E731
        fused_adamw(cut(ref[0]), cut(wide), cut(ref[1]), cut(ref[2]), [ref_steps[i] for i in pick],
                    lr=2e-3, config=config, decay=decay)
    ref_param = ref[0].bfloat16()

    got = [master.clone(), moments[0].clone(), moments[1].clone()]
    param = master.bfloat16()
    spans = [Span(offset=o, numel=n, step=torch.tensor(3.0), decay=d) for o, n, d in zip(offsets, sizes, decays)]
    sliced_adamw(spans, grad, *got, param, torch.empty(64), coef=coef, lr=2e-3, config=config)

    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    for o, n in zip(offsets, sizes):
        assert torch.equal(param[o : o + n], ref_param[o : o + n])
    assert not torch.equal(got[0], master)  # the update really happened


@pytest.mark.parametrize("clip", [None, 0.37])
@pytest.mark.parametrize("param_on_device", [False, True])
def test_streamed_adamw_equals_the_host_update(monkeypatch, clip, param_on_device):
    """AdamW streamed through the (simulated) device in small slices, through a ring of staging
    buffers, writes back exactly the host's result; the param chunk (its host buffer, or its
    device copy when cached there) equals its master's cast everywhere, padding included; every
    staging buffer goes back to the device's books."""
    from homestar.runtime import stream_adam
    from homestar.runtime.memory import SimulatedDevice
    from homestar.runtime.stream_adam import StagingRing, StreamJob, stream_adamw

    monkeypatch.setattr(stream_adam, "STREAM_SLICE_ELEMS", 48)  # parameters span several slices
    gen = torch.Generator().manual_seed(1)
    sizes, decays, offsets, numel = [100, 64, 257, 3], [True, False, True, False], [0, 128, 192, 512], 576
    config = OptimConfig(lr=1e-3, weight_decay=0.1)
    master = torch.randn(numel, generator=gen)
    grad = torch.randn(numel, generator=gen).bfloat16()
    moments = [torch.rand(numel, generator=gen) for _ in range(2)]
    coef = None if clip is None else torch.tensor(clip)

    def spans():
        return [Span(offset=o, numel=n, step=torch.tensor(3.0), decay=d) for o, n, d in zip(offsets, sizes, decays)]

    ref = [master.clone(), moments[0].clone(), moments[1].clone()]
    ref_param = master.bfloat16()
    sliced_adamw(spans(), grad, *ref, ref_param, torch.empty(numel), coef=coef, lr=2e-3, config=config)

    got = [master.clone(), moments[0].clone(), moments[1].clone()]
    param = master.bfloat16()
    device = SimulatedDevice(budget=None)
    jobs = [StreamJob(spans=spans(), grad=grad, master=got[0], exp_avg=got[1], exp_avg_sq=got[2], param=param,
                      param_on_device=param_on_device)]
    ring = StagingRing(device.alloc, device.free, numel, grad.dtype, param.dtype)
    stream_adamw(jobs, ring, device, coef=coef, lr=2e-3, config=config)
    ring.close()

    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(param, got[0].bfloat16())  # padding too: the invariant the cast relies on
    assert torch.equal(param, ref_param)
    assert device.used == 0 and device.peak > 0
    assert not torch.equal(got[0], master)


def test_a_queued_streamed_job_keeps_none_of_its_buffers():
    """Once a job's update is queued, the streamed AdamW holds nothing of it: a device param
    chunk it updated in place is freed as soon as its other owners let go (the update runs
    beside the next forward, which may evict that chunk while later jobs are still queuing)."""
    import weakref

    from homestar.runtime.memory import SimulatedDevice
    from homestar.runtime.stream_adam import StagingRing, StreamJob, stream_adamw

    numel, config = 64, OptimConfig(lr=1e-3)
    device = SimulatedDevice(budget=None)
    alive = []

    def job() -> StreamJob:
        param = torch.zeros(numel, dtype=torch.bfloat16)  # the job's reference is its only one
        alive.append(weakref.ref(param))
        state = [torch.rand(numel) for _ in range(3)]
        return StreamJob(spans=[Span(offset=0, numel=numel, step=torch.tensor(1.0), decay=True)],
                         grad=torch.randn(numel).bfloat16(), master=state[0], exp_avg=state[1], exp_avg_sq=state[2],
                         param=param, param_on_device=True)

    seen = []
    jobs = [job(), job(), job()]
    ring = StagingRing(device.alloc, device.free, numel, torch.bfloat16, torch.bfloat16)
    done = stream_adamw(jobs, ring, device, coef=None, lr=1e-3, config=config,
                        queued=lambda i, event: seen.append([ref() is None for ref in alive]))
    ring.close()
    assert jobs == [None, None, None] and len(done) == 3
    assert seen == [[True, False, False], [True, True, False], [True, True, True]]


def test_the_automatic_split_settles_and_travels_with_the_state():
    """The CPU/GPU split follows measured rates for AUTO_SHARE_STEPS steps, then stays; its state
    goes into the canonical optimizer extras and comes back on load; a fixed split is the
    configuration's."""
    from homestar.runtime.adam_split import AUTO_SHARE_STEPS, AdamSplit

    split = AdamSplit.configured(None, on_gpu=True)
    assert (split.share, split.auto) == (0.5, True) and not AdamSplit.configured(None, on_gpu=False).active
    for _ in range(AUTO_SHARE_STEPS + 3):  # the device twice as fast per element
        split.follow(cpu_elems=100, cpu_s=1.0, dev_elems=200, dev_s=1.0)
    settled = split.share
    assert split.steps == AUTO_SHARE_STEPS and abs(settled - 2 / 3) < 0.01
    split.follow(cpu_elems=100, cpu_s=1.0, dev_elems=1, dev_s=1.0)
    assert split.share == settled  # settled: no longer moves
    resumed = AdamSplit.configured(None, on_gpu=True)
    resumed.load_state_dict(split.state_dict())
    assert (resumed.share, resumed.steps) == (settled, AUTO_SHARE_STEPS)
    fixed = AdamSplit.configured(0.3, on_gpu=True)
    assert fixed.state_dict() == {}
    fixed.load_state_dict(split.state_dict())
    assert fixed.share == 0.3
    # which groups stream: the first ones up to the share, a group counting when half of it fits
    assert [AdamSplit(share=s).streamed([10, 10, 10, 10]) for s in (0.0, 0.1, 0.2, 0.5, 1.0)] == [0, 0, 1, 2, 4]
    # an automatic split keeps a group on each engine (both stay measured), where there are two
    assert [AdamSplit(share=s, auto=True).streamed([10, 10, 10, 10]) for s in (0.05, 0.5, 0.9, 0.95)] == [1, 2, 3, 3]
    assert AdamSplit(share=0.95, auto=True).streamed([10]) == 1
