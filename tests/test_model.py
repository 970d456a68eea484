"""The GPT model: shapes, loss, causality, tying, activation checkpointing, generation, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from homestar.model import GPT, GPTConfig, cross_entropy
from homestar.model import gpt as gpt_module

SMALL = GPTConfig(vocab_size=97, seq_len=16, d_model=32, n_layer=2, n_head=4)


def make(config: GPTConfig = SMALL, seed: int = 0, **kwargs) -> GPT:
    torch.manual_seed(seed)
    return GPT(config, **kwargs)


def tokens(batch: int, time: int, vocab: int = SMALL.vocab_size, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, time), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "bad",
    [dict(vocab_size=0), dict(seq_len=-1), dict(d_model=30), dict(n_layer=0), dict(n_head=3),
     dict(d_model=32.0), dict(n_layer=True), dict(tie_embeddings=1)],
)
def test_config_rejects_bad_shapes(bad):
    fields = dict(vocab_size=97, seq_len=16, d_model=32, n_layer=2, n_head=4) | bad
    with pytest.raises(ValueError):
        GPTConfig(**fields)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("shape", [(97, 16, 32, 2, 4), (50304, 1024, 768, 12, 12), (4096, 128, 256, 4, 4)])
def test_num_params_is_exact(shape, tie):
    vocab, seq, d, layers, heads = shape
    config = GPTConfig(vocab_size=vocab, seq_len=seq, d_model=d, n_layer=layers, n_head=heads, tie_embeddings=tie)
    with torch.device("meta"):
        model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    assert config.flops_per_token() == 6 * config.num_params() + 12 * layers * seq * d


def test_forward_shapes_and_initial_loss():
    model = make()
    idx = tokens(3, 16)
    logits, loss = model(idx)
    assert logits.shape == (3, 16, SMALL.vocab_size) and loss is None
    logits, loss = model(idx, tokens(3, 16, seed=2))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - math.log(SMALL.vocab_size)) < 0.1
    shorter, _ = model(idx[:, :5])
    assert shorter.shape == (3, 5, SMALL.vocab_size)


def test_loss_is_mean_cross_entropy_of_logits():
    model = make()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=3)
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise():
    model = make()
    with pytest.raises(ValueError, match="longer than seq_len"):
        model(tokens(1, 17))
    with pytest.raises(ValueError, match="targets shape"):
        model(tokens(1, 8), tokens(1, 7))
    with pytest.raises(ValueError):
        model(tokens(1, 8)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_cross_entropy_matches_torch(monkeypatch, dtype):
    monkeypatch.setattr(gpt_module, "CE_SLICE_ELEMS", 3 * 50)  # 3 rows a slice: 14 rows -> 5 slices
    logits32 = torch.randn(2, 7, 50, generator=torch.Generator().manual_seed(0)) * 3
    targets = tokens(2, 7, vocab=50)
    mine_in = logits32.to(dtype).requires_grad_()
    ref_in = logits32.to(dtype).requires_grad_()
    mine = cross_entropy(mine_in, targets)
    ref = F.cross_entropy(ref_in.float().flatten(0, 1), targets.flatten())
    (mine * 2.5).backward()
    (ref * 2.5).backward()
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    assert mine_in.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(mine_in.grad, ref_in.grad, rtol=tol, atol=tol)


def test_causal_future_tokens_do_not_change_past_logits():
    model = make()
    idx = tokens(2, 16)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % SMALL.vocab_size
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_tied_weights_are_one_parameter():
    model = make()
    assert model.lm_head.weight is model.wte.weight
    names = [name for name, _ in model.named_parameters()]
    assert "wte.weight" in names and "lm_head.weight" not in names
    _, loss = model(tokens(2, 8), tokens(2, 8, seed=4))
    loss.backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0
    untied = make(GPTConfig(vocab_size=97, seq_len=16, d_model=32, n_layer=2, n_head=4, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert "lm_head.weight" in dict(untied.named_parameters())


def test_hf_gpt2_names():
    names = set(dict(make().named_parameters()))
    for i in range(SMALL.n_layer):
        for sub in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            assert {f"h.{i}.{sub}.weight", f"h.{i}.{sub}.bias"} <= names
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} <= names
    assert len(names) == 4 + 12 * SMALL.n_layer


def test_meta_then_to_empty_and_init_weights():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=512, seq_len=64, d_model=128, n_layer=4, n_head=2))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.wte.weight  # tie survives the conversion
    model.init_weights(generator=torch.Generator().manual_seed(0))
    proj = torch.cat([model.h[i].mlp.c_proj.weight.flatten() for i in range(4)])
    assert abs(proj.std().item() - 0.02 / math.sqrt(8)) < 5e-4
    assert abs(model.h[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3
    assert abs(model.wte.weight.std().item() - 0.02) < 1e-3
    assert torch.all(model.h[1].ln_2.weight == 1) and torch.all(model.h[1].ln_2.bias == 0)
    assert torch.all(model.h[2].attn.c_attn.bias == 0)
    _, loss = model(tokens(8, 64, vocab=512), tokens(8, 64, vocab=512, seed=2))
    assert abs(loss.item() - math.log(512)) < 0.1


def test_init_is_one_draw_per_seed_whatever_the_threads(monkeypatch):
    """Each slice of each weight has its own generator seeded from one draw of the global one:
    the same seed gives the same weights on 1 or 2 threads, slices differ from each other, and
    torch.nn's own init (which would draw every weight a second time) runs on meta weights only."""
    monkeypatch.setattr(gpt_module, "INIT_SLICE_ELEMS", 1000)  # weights of several slices
    config = GPTConfig(vocab_size=512, seq_len=64, d_model=64, n_layer=2, n_head=2)
    real_reset = torch.nn.Linear.reset_parameters

    def reset(self):  # runs at construction: on meta weights it draws nothing
        assert self.weight.is_meta, "torch.nn's init drew real weights"
        real_reset(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", reset)
    built = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        torch.manual_seed(3)
        built.append(GPT(config))
        torch.set_num_threads(previous)
    for a, b in zip(built[0].parameters(), built[1].parameters()):
        assert torch.equal(a, b)
    wte = built[0].wte.weight.view(-1)
    assert not torch.equal(wte[:1000], wte[1000:2000])  # slices draw different numbers
    torch.manual_seed(4)
    assert not torch.equal(GPT(config).wte.weight, built[0].wte.weight)


def _count_pre_hooks(model: GPT) -> dict[str, int]:
    counts: dict[str, int] = {}

    def hook(name):
        def fn(module, args):
            counts[name] = counts.get(name, 0) + 1
        return fn

    for name, module in model.h.named_modules():
        if name:
            module.register_forward_pre_hook(hook(name))
    return counts


def test_checkpointing_same_loss_and_grads_and_hooks_fire_again():
    plain, ckpt = make(seed=5), make(seed=5, checkpoint_activations=True)
    counts_plain, counts_ckpt = _count_pre_hooks(plain), _count_pre_hooks(ckpt)
    idx, targets = tokens(2, 16), tokens(2, 16, seed=6)
    losses = []
    for model in (plain, ckpt):
        _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    grads = dict(ckpt.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-6, atol=1e-7)
    assert counts_plain["0.attn.c_attn"] == 1
    assert counts_ckpt["0.attn.c_attn"] == 2  # the recompute in backward ran the hooks again
    assert counts_ckpt["1.mlp.c_proj"] == 2
    ckpt.eval()
    with torch.no_grad():
        ckpt(idx, targets)
    assert counts_ckpt["0.attn.c_attn"] == 3  # no recompute outside training


def test_recompute_runs_under_the_forwards_autocast_and_trains_blocks_behind_frozen_inputs():
    """Backward recomputes a block under the autocast state its forward had (backward itself
    runs outside the autocast context): gradients match the kept activations' bit for bit. A
    block whose input needs no gradient (frozen embeddings) still gets its parameters' gradients."""
    plain, ckpt = make(seed=9), make(seed=9, checkpoint_activations=True)
    idx, targets = tokens(2, 16), tokens(2, 16, seed=10)
    for model in (plain, ckpt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
    grads = dict(ckpt.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=0, atol=0, msg=name)

    frozen = make(seed=9, checkpoint_activations=True)
    frozen.wte.weight.requires_grad_(False)
    frozen.wpe.weight.requires_grad_(False)
    _, loss = frozen(idx, targets)
    loss.backward()
    assert frozen.wpe.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in frozen.h.parameters())


def test_autocast_bf16_keeps_fp32_loss():
    model = make()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=7)
    _, reference = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert abs(loss.item() - reference.item()) < 0.05
    loss.backward()
    assert model.wte.weight.grad.dtype == torch.float32


def test_generate_greedy_is_deterministic_and_argmax():
    model = make(seed=8)
    prompt = tokens(2, 4)
    first = model.generate(prompt, 20, temperature=0)
    second = model.generate(prompt, 20, temperature=0)
    assert first.shape == (2, 24) and torch.equal(first, second)
    assert torch.equal(first[:, :4], prompt)
    logits, _ = model(prompt)
    assert torch.equal(first[:, 4], logits[:, -1].argmax(-1))
    top1 = model.generate(prompt, 20, temperature=1.0, top_k=1)
    assert torch.equal(top1, first)


def test_generate_sampling_reproducible_with_generator():
    model = make(seed=9)
    prompt = tokens(1, 3)
    a = model.generate(prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1, 13)
    with pytest.raises(ValueError):
        model.generate(prompt, 1, temperature=-1)
    with pytest.raises(ValueError):
        model.generate(prompt, 1, top_k=0)
