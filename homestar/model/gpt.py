"""A GPT-2-style decoder in plain torch.nn, and its memory-frugal cross-entropy.

Module and parameter names follow Hugging Face GPT2LMHeadModel's `transformer.` sub-modules
(`wte`, `wpe`, `h.{i}.attn.c_attn`, ..., `ln_f`, `lm_head`), so exporting is a rename and a
transpose. Every weight is used through a call of the module that owns it, never read directly in
a parent's forward, so code outside can fetch weights in module hooks.

Knows nothing of chunks, devices, precision policy or training: the caller picks the device and
wraps forward in `torch.autocast` when it wants bf16/fp16 compute; the loss is always fp32.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from homestar.model.config import GPTConfig
from homestar.model.recompute import recompute as recompute_block

LN_EPS = 1e-5
_INIT_STD = 0.02
CE_SLICE_ELEMS = 1 << 25
"""Logit elements upcast to fp32 at once by the loss: 32 M elements, a 128 MiB transient."""
INIT_SLICE_ELEMS = 1 << 20
"""Elements drawn by one generator at init: every 1 M-element piece of a weight has its own seed,
so the pieces are drawn on all cores at once (also when the chunk runtime makes one parameter at
a time: a 4096 x 16384 weight is 64 pieces) and the draw does not depend on their number."""


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that accepts weights stored in a lower precision than its input.

    Whoever holds the weights (a memory runtime may keep them in bf16) the normalisation runs in
    the input's dtype, as autocast does on CUDA; CPU autocast would otherwise refuse the mix.
    The casts are no-ops when the dtypes already agree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection (SDPA kernel)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=True)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        # [B, T, D] -> [B, H, T, hd]: views, the copy happens inside SDPA if its kernel needs one.
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))  # reshape copies: [B,T,D] activation


class MLP(nn.Module):
    """Position-wise feed-forward: d -> 4d, GELU (tanh approximation, as GPT-2), 4d -> d."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model, bias=True)
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.d_model, eps=LN_EPS)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.d_model, eps=LN_EPS)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, `n_layer` blocks, final LayerNorm, linear head (tied by default).

    With `checkpoint_activations`, each block's activations are recomputed in backward instead of
    kept (training mode with grad enabled only): about one extra forward of compute for a memory
    cost of one [B, T, d_model] tensor per block.
    """

    def __init__(self, config: GPTConfig, *, checkpoint_activations: bool = False) -> None:
        super().__init__()
        self.config = config
        self.checkpoint_activations = checkpoint_activations
        target = torch.get_default_device()
        with torch.device("meta"):  # shapes first: torch.nn's own init would draw every weight once more
            self.wte = nn.Embedding(config.vocab_size, config.d_model)
            self.wpe = nn.Embedding(config.seq_len, config.d_model)
            self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.ln_f = LayerNorm(config.d_model, eps=LN_EPS)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._tie()
        if target.type != "meta":  # built under `with torch.device("meta")`: shapes were all it wanted
            self.to_empty(device=target)
            self.init_weights()

    def _tie(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's own signature
        # Module conversions that build new Parameters (to_empty() off the meta device, for one)
        # would leave lm_head holding a separate copy; tie again so the head stays the embedding.
        result = super()._apply(fn, recurse)
        self._tie()
        return result

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """GPT-2 init: N(0, 0.02) weights and embeddings, residual projections N(0, 0.02/sqrt(2L)),
        zero biases, LayerNorm weight 1 and bias 0. Works after `to_empty()`; a no-op on meta.

        One number drawn from `generator` (default: torch's global one) seeds everything: each
        slice of `INIT_SLICE_ELEMS` elements of each weight gets its own generator from it, and
        the slices are drawn by a pool of threads (the CPU's normal_ is serial per generator;
        the GIL is released while it runs). Same seed, same weights, on any number of cores."""
        if self.wte.weight.is_meta:
            return
        plan = _InitPlan(self, generator)
        pieces = [piece for name, param in self.named_parameters() for piece in plan.fill(name, param)]
        _draw(pieces)

    def initializer(self, *, generator: torch.Generator | None = None) -> Callable[[str, torch.Tensor], None]:
        """`init(name, tensor)`: fills one parameter's tensor (fp32, its shape) with exactly what
        `init_weights` would put there with the same generator state (its one number is drawn
        now). For a model built on the meta device whose parameters are made one at a time
        elsewhere (the chunk runtime packs them): the whole fp32 model never exists at once."""
        plan = _InitPlan(self, generator)

        @torch.no_grad()
        def init(name: str, tensor: torch.Tensor) -> None:
            _draw(plan.fill(name, tensor))

        return init

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final-LayerNorm output [B, T, d_model] for token ids [B, T] (T <= seq_len)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time], got shape {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.config.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len {self.config.seq_len}")
        pos = torch.arange(t, device=idx.device)  # small allocation per call
        # The residual stream is fp32 even when the weights are stored in bf16 (as the chunk
        # runtime stores them): autocast then matches plain fp32-weight autocast numerics.
        x = (self.wte(idx) + self.wpe(pos)).float()
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for block in self.h:
            x = recompute_block(block, x) if recompute else block(x)  # hooks fire again in backward
        return self.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B, T, vocab], mean fp32 cross-entropy over all B*T targets or None)."""
        logits = self.lm_head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx {tuple(idx.shape)}")
        return logits, cross_entropy(logits, targets)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx [B, T] by max_new_tokens sampled tokens; returns [B, T + max_new_tokens].

        temperature 0 picks the most likely token (greedy, deterministic); top_k keeps only the k
        most likely tokens. The context is cropped to the last seq_len tokens; no KV cache, so each
        new token costs one forward over the context.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.seq_len :]
            last = self.hidden_states(context)[:, -1, :]
            logits = self.lm_head(last).float()
            idx = torch.cat((idx, _pick(logits, temperature, top_k, generator)), dim=1)
        return idx


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token ids [B, 1] from last-position logits [B, vocab]."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        # A generator of another device (a CPU one for a CUDA model) samples there: a copy and a
        # sync per token, acceptable for sampling, and reproducible across devices.
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean fp32 cross-entropy of logits [..., V] against targets [...], the same value and grad as
    `F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())`, without ever holding the
    fp32 logits (or their log-softmax) of the whole batch: rows are upcast a slice at a time."""
    flat = logits.reshape(-1, logits.shape[-1])  # a view for contiguous logits
    if flat.numel() <= CE_SLICE_ELEMS:  # one slice anyway: torch's fused kernel is faster
        return F.cross_entropy(flat.float(), targets.reshape(-1))
    return _ChunkedCrossEntropy.apply(flat, targets.reshape(-1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy over row slices. Saves the logits in their own dtype plus one fp32 log-sum-exp
    per row; backward recomputes softmax slice by slice into a grad of the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        n, vocab = logits.shape
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for rows in _row_slices(n, vocab):
            part = logits[rows].float()  # fp32 copy of one slice (no copy when logits are fp32)
            lse[rows] = torch.logsumexp(part, dim=-1)
            picked = part.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
            total += (lse[rows] - picked).sum()
        ctx.save_for_backward(logits, targets, lse)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        logits, targets, lse = ctx.saved_tensors
        n, vocab = logits.shape
        grad = torch.empty_like(logits)  # the one full-size allocation: the head's input grad
        scale = grad_out.float() / n
        for rows in _row_slices(n, vocab):
            probs = torch.exp(logits[rows].float() - lse[rows].unsqueeze(1))
            probs.scatter_add_(1, targets[rows].unsqueeze(1), probs.new_full((probs.shape[0], 1), -1.0))
            grad[rows] = probs * scale
        return grad, None


def _row_slices(n: int, vocab: int) -> list[slice]:
    step = max(1, CE_SLICE_ELEMS // vocab)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


class _InitPlan:
    """Which init each parameter gets, and the seeds of its slices (from one drawn number)."""

    def __init__(self, model: GPT, generator: torch.Generator | None) -> None:
        self.base = int(torch.randint(0, 1 << 62, (1,), generator=generator))
        proj_std = _INIT_STD / math.sqrt(2 * model.config.n_layer)
        self.rules: dict[str, tuple[str, float]] = {}
        for name, module in model.named_modules():
            if module is model.lm_head and model.config.tie_embeddings:
                continue  # its weight is wte.weight, initialised as an embedding
            at = f"{name}." if name else ""
            if isinstance(module, nn.Linear):
                self.rules[at + "weight"] = ("normal", proj_std if name.endswith("c_proj") else _INIT_STD)
                if module.bias is not None:
                    self.rules[at + "bias"] = ("fill", 0.0)
            elif isinstance(module, nn.Embedding):
                self.rules[at + "weight"] = ("normal", _INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                self.rules[at + "weight"], self.rules[at + "bias"] = ("fill", 1.0), ("fill", 0.0)
        self.first_seed: dict[str, int] = {}
        seeds = 0
        for name, (kind, _) in self.rules.items():  # module order: the same on every build
            if kind == "normal":
                self.first_seed[name] = seeds
                seeds += -(-model.get_parameter(name).numel() // INIT_SLICE_ELEMS)

    def fill(self, name: str, tensor: torch.Tensor) -> list[tuple[int, torch.Tensor, float]]:
        """Fill `tensor` now if its init is a constant; else its slices to draw, with seeds."""
        if name not in self.rules:
            raise KeyError(f"no init rule for parameter {name!r}")
        kind, value = self.rules[name]
        if kind == "fill":
            tensor.fill_(value)
            return []
        flat, first = tensor.view(-1), self.base + self.first_seed[name]
        return [(first + j, flat[start:start + INIT_SLICE_ELEMS], value)
                for j, start in enumerate(range(0, flat.numel(), INIT_SLICE_ELEMS))]


def _draw(pieces: list[tuple[int, torch.Tensor, float]]) -> None:
    """Draw each (seed, slice, std) from N(0, std), on a pool of threads when there are several."""

    def one(seed: int, piece: torch.Tensor, std: float) -> None:
        gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on any device
        with torch.no_grad():  # grad mode is per thread
            if piece.device.type == "cpu":
                piece.normal_(0.0, std, generator=gen)
            else:  # a model built under another default device: draw here, copy there
                piece.copy_(torch.empty(piece.shape).normal_(0.0, std, generator=gen))

    if len(pieces) <= 1:
        for piece in pieces:
            one(*piece)
        return
    with ThreadPoolExecutor(min(len(pieces), torch.get_num_threads()), thread_name_prefix="homestar-init") as pool:
        list(pool.map(one, *zip(*pieces)))  # re-raises a worker's error
