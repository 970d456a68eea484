"""attach(): models built on the meta device, chunk-size choice, bad configurations."""

from __future__ import annotations

import pytest
import torch

from homestar.errors import ConfigError
from homestar.model import GPT, GPTConfig
from homestar.optim import OptimConfig
from homestar.runtime import RuntimeConfig, attach
from runtime_helpers import VOCAB, SEQ, batches, one_thread  # noqa: F401

CFG = GPTConfig(vocab_size=VOCAB, seq_len=SEQ, d_model=64, n_layer=2, n_head=4)


def init_param(name: str, tensor: torch.Tensor) -> None:
    """A per-parameter GPT-2-like init, enough to check the meta path."""
    if name.endswith("bias"):
        tensor.zero_()
    elif tensor.ndim == 1:
        tensor.fill_(1.0)
    else:
        tensor.normal_(0.0, 0.02)


def test_meta_model_is_initialised_one_parameter_at_a_time():
    with torch.device("meta"):
        meta_model = GPT(CFG)
    torch.manual_seed(5)
    engine = attach(meta_model, RuntimeConfig(chunk_elems=20_000, gpu_budget_bytes=400_000), OptimConfig(), init_fn=init_param)

    cpu_model = GPT(CFG)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in cpu_model.named_parameters():
            init_param(name, param)
    weights = engine.state_dict()["weights"]
    for name, param in cpu_model.named_parameters():
        assert torch.equal(weights[name], param.detach()), name

    assert meta_model.lm_head.weight is meta_model.wte.weight  # the tie survived
    assert not any(p.is_meta for p in meta_model.parameters())
    (idx, targets), = batches(1, 1)[0]
    assert torch.isfinite(engine.forward_backward(idx, targets, 1.0))
    assert not engine.step(1e-3).skipped


def test_meta_model_without_init_fn_is_a_config_error():
    with torch.device("meta"):
        model = GPT(CFG)
    with pytest.raises(ConfigError, match="init_fn"):
        attach(model, RuntimeConfig(), OptimConfig())


def test_default_chunk_size_fits_the_largest_parameter():
    engine = attach(GPT(CFG), RuntimeConfig(), OptimConfig())
    assert engine.groups[0].param.numel >= VOCAB * 64
    (idx, targets), = batches(1, 1)[0]
    engine.forward_backward(idx, targets, 1.0)
    engine.step(1e-3)


@pytest.mark.parametrize(
    "bad",
    [{"device": "tpu"}, {"precision": "fp8"}, {"gpu_budget_bytes": 0}, {"optimizer_placement": "gpu"}, {"prefetch_depth": -1}],
)
def test_bad_runtime_config_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        RuntimeConfig(**bad)


@pytest.mark.parametrize("world, expected", [(1, torch.bfloat16), (2, torch.float32)])
def test_bf16_grad_chunks_on_one_process_fp32_across_several(world, expected):
    from homestar.runtime.collectives import Collective

    config = RuntimeConfig(device="cpu", precision="bf16", chunk_elems=1 << 14)
    model = GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=2, n_head=2, d_model=32))
    engine = attach(model, config, OptimConfig(lr=1e-3), collective=Collective(rank=0, world=world))
    assert {g.grad.dtype for g in engine.groups} == {expected}
    assert {g.param.dtype for g in engine.groups} == {torch.bfloat16}
    host_grad_bytes = sum(g.grad.nbytes for g in engine.groups)
    assert host_grad_bytes == expected.itemsize * sum(g.grad.numel for g in engine.groups)
    engine.close()


def test_chunk_groups_are_owned_by_size_not_by_index():
    from homestar.runtime.collectives import Collective

    comm = Collective(rank=0, world=2)
    comm.balance([10, 4, 4, 4, 4, 4])  # each to the rank owning fewer elements so far
    assert [comm.owner(i) for i in range(6)] == [0, 1, 1, 1, 0, 1]
    # chunks that alternate small and large (a layer's attention, then its MLP weight): by index
    # one rank would own every large one
    sizes = [26, 105] * 20
    comm.balance(sizes)
    loads = [sum(s for i, s in enumerate(sizes) if comm.owner(i) == r) for r in range(2)]
    assert max(loads) <= 1.05 * min(loads)
    assert [i % 2 for i in range(len(sizes))] != [comm.owner(i) for i in range(len(sizes))]


def test_every_rank_derives_the_same_owners_from_the_layout():
    from homestar.runtime.collectives import Collective

    config = RuntimeConfig(device="cpu", precision="fp32", chunk_elems=1 << 12)
    engines = []
    for rank in range(2):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=2, n_head=2, d_model=32))
        engines.append(attach(model, config, OptimConfig(lr=1e-3), collective=Collective(rank=rank, world=2)))
    owners = [e.collective.owners for e in engines]
    assert owners[0] == owners[1] and set(owners[0]) == {0, 1}
    for rank, engine in enumerate(engines):  # moments exist exactly for the groups this rank owns
        assert [g.has_state for g in engine.groups] == [o == rank for o in owners[0]]
        engine.close()
