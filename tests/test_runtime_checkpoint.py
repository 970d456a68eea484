"""Canonical state: save -> load -> continue, and exchange with plain torch AdamW both ways."""

from __future__ import annotations

import pytest
import torch

from homestar.errors import CheckpointError
from runtime_helpers import (
    Setup,
    assert_weights_close,
    attach_copy,
    batches,
    make_model,
    one_thread,  # noqa: F401
    optim_config,
    torch_adamw,
    train_engine,
    train_reference,
)

SETUP = Setup(tie=True, accum=2)


def canonical_from_torch(model, opt) -> dict:
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    by_param = {id(p): n for n, p in model.named_parameters()}
    exp_avg, exp_avg_sq, steps = {}, {}, set()
    for p, state in opt.state.items():
        exp_avg[by_param[id(p)]] = state["exp_avg"].clone()
        exp_avg_sq[by_param[id(p)]] = state["exp_avg_sq"].clone()
        steps.add(int(state["step"]))
    return {"weights": weights, "optimizer": {"step": steps.pop(), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}}


def torch_from_canonical(state: dict, setup: Setup):
    model = make_model(setup, seed=123)  # different init: everything must come from the state
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state["weights"][name])
    opt = torch_adamw(model, optim_config(setup))
    optimizer = state["optimizer"]
    for name, param in model.named_parameters():
        if name in optimizer["exp_avg"]:
            opt.state[param] = {
                "step": torch.tensor(float(optimizer["step"])),
                "exp_avg": optimizer["exp_avg"][name].clone(),
                "exp_avg_sq": optimizer["exp_avg_sq"][name].clone(),
            }
    return model, opt


def test_save_load_continue_matches_the_uninterrupted_run():
    data = batches(12, SETUP.accum)
    whole = attach_copy(make_model(SETUP), SETUP)
    whole_losses, _ = train_engine(whole, data)

    first = attach_copy(make_model(SETUP), SETUP)
    train_engine(first, data[:6])
    state = first.state_dict()
    first.close()
    resumed = attach_copy(make_model(SETUP, seed=99), SETUP)
    resumed.load_state_dict(state)
    later_losses, _ = train_engine(resumed, data[6:], first_step=6)

    assert later_losses == whole_losses[-len(later_losses) :]  # bit-identical
    final, expected = resumed.state_dict(), whole.state_dict()
    assert final["optimizer"]["step"] == expected["optimizer"]["step"] == 12
    for name, value in expected["weights"].items():
        assert torch.equal(final["weights"][name], value), name
    for key in ("exp_avg", "exp_avg_sq"):
        for name, value in expected["optimizer"][key].items():
            assert torch.equal(final["optimizer"][key][name], value), name


def test_torch_adamw_state_loads_into_the_runtime():
    data = batches(10, 1)
    setup = Setup()
    ref = make_model(setup)
    _, _, opt = train_reference(ref, optim_config(setup), data[:5])
    engine = attach_copy(make_model(setup, seed=7), setup)
    engine.load_state_dict(canonical_from_torch(ref, opt))
    ref_losses, _, _ = train_reference(ref, optim_config(setup), data[5:], opt=opt, first_step=5)
    losses, _ = train_engine(engine, data[5:], first_step=5)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_weights_close(engine.state_dict()["weights"], ref)


def test_runtime_state_loads_into_torch_adamw():
    data = batches(10, 1)
    setup = Setup()
    engine = attach_copy(make_model(setup), setup)
    train_engine(engine, data[:5])
    model, opt = torch_from_canonical(engine.state_dict(), setup)
    losses, _ = train_engine(engine, data[5:], first_step=5)
    ref_losses, _, _ = train_reference(model, optim_config(setup), data[5:], opt=opt, first_step=5)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_weights_close(engine.state_dict()["weights"], model)


def test_a_state_for_another_model_is_a_checkpoint_error():
    setup = Setup()
    engine = attach_copy(make_model(setup), setup)
    state = engine.state_dict()
    state["weights"].pop("wpe.weight")
    with pytest.raises(CheckpointError, match="wpe.weight"):
        engine.load_state_dict(state)
    other = attach_copy(make_model(Setup(tie=False)), Setup(tie=False)).state_dict()
    with pytest.raises(CheckpointError):
        engine.load_state_dict(other)
