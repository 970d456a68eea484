"""bf16 and fp16 compute against fp32 master weights; fp16 dynamic loss scaling."""

from __future__ import annotations

import copy

import pytest
import torch

from homestar.runtime import RuntimeConfig, attach
from homestar.runtime.scaler import LossScaler
from runtime_helpers import (
    CHUNK,
    FP32_CHUNK_BYTES,
    Setup,
    batches,
    make_model,
    one_thread,  # noqa: F401
    optim_config,
    train_engine,
    train_reference,
)


def attach_precision(model, setup, precision: str, **extra):
    config = RuntimeConfig(chunk_elems=CHUNK, gpu_budget_bytes=6 * FP32_CHUNK_BYTES, precision=precision, **extra)
    return attach(copy.deepcopy(model), config, optim_config(setup))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_tracks_fp32_training(precision):
    setup = Setup()
    data = batches(12, 1)
    ref = make_model(setup)
    engine = attach_precision(ref, setup, precision)
    ref_losses, _, _ = train_reference(ref, optim_config(setup), data)
    losses, _ = train_engine(engine, data)
    tolerance = 2e-2 if precision == "bf16" else 5e-3
    assert losses == pytest.approx(ref_losses, rel=tolerance)
    group = engine.groups[0]
    assert group.param.dtype == engine.config.compute_dtype and group.master.dtype == torch.float32
    assert engine.table.infos[0].param.dtype == engine.config.compute_dtype
    weights = engine.state_dict()["weights"]
    for name, param in ref.named_parameters():
        assert weights[name].dtype == torch.float32
        torch.testing.assert_close(weights[name], param.detach(), rtol=0, atol=2e-2)
    assert {row["kind"] for row in engine.chunk_snapshot()} == {"param", "grad", "master", "moments"}


def test_streamed_params_cached_on_the_device_are_updated_there():
    """bf16 with half the host-homed groups' AdamW streamed: a streamed group whose param chunk
    is still cached on the (simulated) device after backward gets its new params written there,
    not back to the host and up again. Training equals the run whose every group updates on the
    CPU, to the bit (the simulated device runs the CPU's kernel); the host buffer of such a chunk,
    once read (written back first), holds its master's cast."""
    setup = Setup()
    data = batches(6, 1)
    model = make_model(setup)
    cpu = attach_precision(model, setup, "bf16", optimizer_placement="host", optimizer_stream_share=0.0)
    cpu_losses, cpu_norms = train_engine(cpu, data)
    kept = attach_precision(model, setup, "bf16", optimizer_placement="host", optimizer_stream_share=0.5)
    losses, norms = train_engine(kept, data)
    # several groups a step, every step: holding cached chunks for the update leaves the step's
    # trace alone (recorded once, replayed since; re-recording would evict the cache each time)
    assert kept.stats()["params_updated_on_device"] > len(data) and cpu.stats()["params_updated_on_device"] == 0
    assert kept.tracer.traces[("step",)].replays == len(data) - 1
    assert losses == cpu_losses and norms == cpu_norms
    dirty = [g.param for g in kept.groups if g.param.device_dirty]
    assert dirty  # the last step left new params on the device only
    weights, reference = kept.state_dict()["weights"], cpu.state_dict()["weights"]
    for name, value in weights.items():
        assert torch.equal(value, reference[name]), name
    for group in kept.groups:
        host = kept.placement.read(group.param)  # writes a newer device copy back first
        assert torch.equal(host, kept.placement.read(group.master).to(host.dtype))
    assert not any(g.param.device_dirty for g in kept.groups)
    cpu.close()
    kept.close()


def test_fp16_overflow_skips_the_step_and_backs_off():
    setup = Setup()
    engine = attach_precision(make_model(setup), setup, "fp16", loss_scale_init=2.0**40)
    before = copy.deepcopy(engine.state_dict())  # the state shares the chunks' memory
    (idx, targets), = batches(1, 1)[0]
    engine.forward_backward(idx, targets, 1.0)
    report = engine.step(1e-3)
    assert report.skipped and not torch.isfinite(torch.tensor(report.grad_norm))
    after = engine.state_dict()
    assert after["optimizer"]["step"] == 0 and after["optimizer"]["exp_avg"] == {}
    assert all(torch.equal(after["weights"][n], w) for n, w in before["weights"].items())
    assert after["optimizer"]["loss_scale"] == 2.0**39
    for _ in range(40):
        engine.forward_backward(idx, targets, 1.0)
        if not engine.step(1e-3).skipped:
            break
    state = engine.state_dict()
    assert state["optimizer"]["step"] == 1 and state["optimizer"]["loss_scale"] < 2.0**39
    assert not torch.equal(state["weights"]["wte.weight"], before["weights"]["wte.weight"])


def test_loss_scaler_follows_torch_grad_scaler_rules():
    ours = LossScaler(scale=2.0**16, growth_interval=3)
    scale, tracker = torch.tensor([2.0**16]), torch.tensor([0], dtype=torch.int32)
    for found in [0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]:
        ours.update(found_inf=bool(found))
        torch._amp_update_scale_(scale, tracker, torch.tensor([float(found)]), 2.0, 0.5, 3)
        assert ours.scale == scale.item() and ours.growth_tracker == tracker.item()
    assert ours.inv_scale == (1.0 / scale.double()).float().item()
