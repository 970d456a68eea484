"""The host's single-pass native AdamW gives torch's fused AdamW to the bit, and falls back cleanly."""

from __future__ import annotations

import logging
import subprocess

import pytest
import torch

from homestar.optim import OptimConfig
from homestar.runtime import adam_math, native
from homestar.runtime.adam_math import Span, fused_adamw, host_adamw, sliced_adamw

needs_compiler = pytest.mark.skipif(native.compiler() is None,
                                    reason="no C compiler (cc, gcc or $CC) to build the kernel")


@pytest.fixture(scope="module")
def build_home(tmp_path_factory):
    """One private HOMESTAR_HOME for the module: the kernel is compiled once into it."""
    home = tmp_path_factory.mktemp("native-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOMESTAR_HOME", str(home))
        patch.delenv(native.ENV, raising=False)
        yield home


@pytest.fixture
def kernel(build_home, monkeypatch):
    monkeypatch.setenv("HOMESTAR_HOME", str(build_home))
    monkeypatch.delenv(native.ENV, raising=False)
    native.forget()
    found = native.kernel()
    assert found is not None, "the kernel did not build (see the log)"
    yield found
    native.forget()


# spans of odd lengths (none a multiple of a vector), with gaps between, each its own step count
SIZES = [1, 7, 17, 100, 257, 1003, 4099, 20001]
STEPS = [1.0, 4.0, 2.0, 9.0, 1.0, 3.0, 6.0, 2.0]


def _layout():
    offsets, at = [], 0
    for size in SIZES:
        at += 13  # padding the update must leave alone
        offsets.append(at)
        at += size
    return offsets, at + 5


def _state(seed: int):
    gen = torch.Generator().manual_seed(seed)
    offsets, numel = _layout()
    master = torch.randn(numel, generator=gen)
    state = [master, torch.randn(numel, generator=gen) * 0.01, torch.rand(numel, generator=gen) * 1e-4]
    grads = [(torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen) * 4).bfloat16() for _ in range(3)]
    grads[1][offsets[3] : offsets[3] + 20] = 0  # zero grads too
    return offsets, state, grads


def _spans(offsets, decays):
    return [Span(offset=o, numel=n, step=torch.tensor(s - 1), decay=d)
            for o, n, s, d in zip(offsets, SIZES, STEPS, decays)]


def _reference(offsets, state, grads, decays, coef, config, lr):
    """Plain torch: grads widened to fp32 and scaled, one fused call per decay class per step,
    then the param cast from the master."""
    state = [t.clone() for t in state]
    spans = _spans(offsets, decays)
    for grad in grads:
        wide = grad.float()
        if coef is not None:
            wide.mul_(coef)
        for span in spans:
            span.step.add_(1)
        for decay in (True, False):
            chosen = [s for s in spans if s.decay is decay]
            if chosen:
                cut = lambda t: [t[s.offset : s.offset + s.numel] for s in chosen]  # noqa: E731
                fused_adamw(cut(state[0]), cut(wide), cut(state[1]), cut(state[2]), [s.step for s in chosen],
                            lr=lr, config=config, decay=decay)
    return state


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("with_param", [True, False])
@pytest.mark.parametrize("decay", ["mixed", "none"])
@pytest.mark.parametrize("clip", [None, 0.37])
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.3, 0.999)])  # both of torch's lerp branches
def test_native_adamw_is_torch_fused_adamw_to_the_bit(kernel, monkeypatch, threads, with_param, decay, clip, betas):
    """Several steps over many spans of odd lengths with their own step counts, split over threads
    (pieces cut inside spans): master and moments are bit for bit torch's, the bf16 param is the
    master's cast, and nothing outside the spans is touched."""
    monkeypatch.setattr(native.run, "MIN_PIECE", 64)  # small spans still spread over the threads
    config = OptimConfig(lr=1e-3, weight_decay=0.1, betas=betas)
    lr = 2e-3
    decays = [i % 2 == 0 for i in range(len(SIZES))] if decay == "mixed" else [False] * len(SIZES)
    coef = None if clip is None else torch.tensor(clip)
    offsets, state, grads = _state(seed=1)
    expected = _reference(offsets, state, grads, decays, coef, config, lr)

    got = [t.clone() for t in state]
    param = torch.full((got[0].numel(),), 7.0, dtype=torch.bfloat16) if with_param else None
    spans = _spans(offsets, decays)
    for grad in grads:
        for span in spans:
            span.step.add_(1)  # as the optimizer advances them before the update
        native.adamw_spans(kernel, spans, grad, *got, param, coef=coef, lr=lr, config=config, threads=threads)

    assert kernel.exact, f"no form of the kernel matched torch here (best: {kernel.max_ulps} ulps)"
    for name, a, b in zip(("master", "exp_avg", "exp_avg_sq"), got, expected):
        assert _ulps(a, b) == 0, f"{name} differs by {_ulps(a, b)} ulps"
    inside = torch.zeros(got[0].numel(), dtype=torch.bool)
    for o, n in zip(offsets, SIZES):
        inside[o : o + n] = True
    assert torch.equal(got[0][~inside], state[0][~inside])
    assert not torch.equal(got[0][inside], state[0][inside])
    if param is not None:
        assert torch.equal(param[inside], got[0][inside].bfloat16())
        assert bool((param[~inside] == 7.0).all())


@needs_compiler
def test_the_bf16_cast_rounds_to_nearest_even_and_keeps_nan(kernel):
    """With nothing to update (lr 0, zero grads and moments) the param is the master's cast:
    ties to even, overflow to infinity, NaN stays NaN."""
    tie_up, tie_down = 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-8  # halfway: round to the even neighbour
    values = [0.0, -0.0, 1.0, tie_up, tie_down, -tie_up, 3.4028234663852886e38, float("inf"), float("-inf"),
              1e-40, -1e-42, float("nan")]
    master = torch.cat([torch.tensor(values), torch.randn(1000) * 1e3])
    master[-7:] = torch.tensor([float("nan")] * 7)
    master.view(torch.int32)[-1] = 0x7F800001  # a NaN whose rounding would carry into infinity
    n = master.numel()
    before = master.clone()
    moments = [torch.zeros(n), torch.zeros(n)]
    param = torch.empty(n, dtype=torch.bfloat16)
    spans = [Span(offset=0, numel=n, step=torch.tensor(1.0), decay=False)]
    native.adamw_spans(kernel, spans, torch.zeros(n, dtype=torch.bfloat16), master, *moments, param,
                       coef=None, lr=0.0, config=OptimConfig(), threads=2)
    nan = before.isnan()
    assert torch.equal(master[~nan], before[~nan]) and bool(master[nan].isnan().all())
    assert torch.equal(param[~nan].view(torch.int16), before[~nan].bfloat16().view(torch.int16))
    assert bool(param[nan].isnan().all())


def _host_case():
    offsets, state, grads = _state(seed=5)
    spans = _spans(offsets, [True, False] * 4)
    for span in spans:
        span.step.add_(1)
    return spans, grads[0], state


def _sliced(spans, grad, state, coef):
    got = [t.clone() for t in state]
    param = got[0].bfloat16()
    sliced_adamw(spans, grad, *got, param, torch.empty(adam_math.SLICE_ELEMS), coef=coef, lr=1e-3,
                 config=OptimConfig())
    return got, param


def _host(spans, grad, state, coef):
    got = [t.clone() for t in state]
    param = got[0].bfloat16()
    host_adamw(spans, grad, *got, param, lambda: torch.empty(adam_math.SLICE_ELEMS), coef=coef, lr=1e-3,
               config=OptimConfig(), threads=2)
    return got, param


def _assert_same(a, b):
    for x, y in zip([*a[0], a[1]], [*b[0], b[1]]):
        assert torch.equal(x, y)


@needs_compiler
def test_host_adamw_runs_the_native_kernel_when_it_is_there(kernel, monkeypatch):
    calls = []
    original = native.adamw_spans
    monkeypatch.setattr(native, "adamw_spans", lambda *a, **k: calls.append(1) or original(*a, **k))
    spans, grad, state = _host_case()
    coef = torch.tensor(0.5)
    _assert_same(_host(spans, grad, state, coef), _sliced(spans, grad, state, coef))
    assert calls


def _no_native_calls(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the native kernel ran")
    monkeypatch.setattr(native, "adamw_spans", refuse)


def test_disabled_by_the_environment_the_torch_path_runs(monkeypatch, caplog):
    monkeypatch.setenv(native.ENV, "0")
    native.forget()
    _no_native_calls(monkeypatch)
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert native.kernel() is None
        spans, grad, state = _host_case()
        _assert_same(_host(spans, grad, state, None), _sliced(spans, grad, state, None))
    assert len(caplog.records) == 1 and f"{native.ENV}=0" in caplog.records[0].getMessage()
    native.forget()


@pytest.mark.parametrize("broken", ["missing", "failing"])
def test_without_a_working_compiler_the_torch_path_runs(monkeypatch, tmp_path, caplog, broken):
    """No compiler found, or one whose build fails: one warning line (no traceback), no library
    left behind, and the host's AdamW gives the torch path's results."""
    monkeypatch.setenv("HOMESTAR_HOME", str(tmp_path))  # no cached build to fall back on
    monkeypatch.delenv(native.ENV, raising=False)
    if broken == "missing":
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setattr(native.build.shutil, "which", lambda name: None)
    else:
        monkeypatch.setenv("CC", "false")  # runs, fails every build
    native.forget()
    _no_native_calls(monkeypatch)
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert native.kernel() is None
        assert native.kernel() is None  # asked again: not tried (or logged) again
        spans, grad, state = _host_case()
        _assert_same(_host(spans, grad, state, torch.tensor(0.25)), _sliced(spans, grad, state, torch.tensor(0.25)))
    assert len(caplog.records) == 1
    assert caplog.records[0].levelno == logging.WARNING and caplog.records[0].exc_info is None
    assert "\n" not in caplog.records[0].getMessage()
    folder = tmp_path / "cache" / "native"
    assert not folder.exists() or not any(folder.iterdir())
    native.forget()


@needs_compiler
def test_a_cached_build_is_reused(kernel, monkeypatch):
    """A second process (here: the loaded kernel forgotten) loads the cached library without
    compiling; the build left no temporary files."""
    compiled = []
    run = subprocess.run

    def watch(args, *rest, **kwargs):
        if "-o" in args:
            compiled.append(args)
        return run(args, *rest, **kwargs)

    monkeypatch.setattr(native.build.subprocess, "run", watch)
    native.forget()
    again = native.kernel()
    assert again is not None and again.path == kernel.path and not compiled
    assert [p.name for p in kernel.path.parent.iterdir()] == [kernel.path.name]
    assert (again.vector, again.body_form, again.tail_form) == (kernel.vector, kernel.body_form, kernel.tail_form)


@needs_compiler
def test_bad_buffers_are_refused_with_a_clear_message(kernel):
    n = 64
    spans = [Span(offset=0, numel=n, step=torch.tensor(1.0), decay=True)]
    good = dict(grad=torch.zeros(n, dtype=torch.bfloat16), master=torch.zeros(n), exp_avg=torch.zeros(n),
                exp_avg_sq=torch.zeros(n), param=torch.zeros(n, dtype=torch.bfloat16))
    cases = {
        "grad must be torch.bfloat16": dict(grad=torch.zeros(n)),
        "exp_avg must be torch.float32": dict(exp_avg=torch.zeros(n, dtype=torch.bfloat16)),
        "master must be contiguous": dict(master=torch.zeros(2 * n)[::2]),
        "param holds 32 elements": dict(param=torch.zeros(32, dtype=torch.bfloat16)),
        "coef must be a CPU scalar": dict(coef=torch.ones(2)),
        "threads must be >= 1": dict(threads=0),
    }
    for message, change in cases.items():
        args = {**good, "coef": None, "threads": 1, **change}
        with pytest.raises(ValueError, match=message):
            native.adamw_spans(kernel, spans, args["grad"], args["master"], args["exp_avg"], args["exp_avg_sq"],
                               args["param"], coef=args["coef"], lr=1e-3, config=OptimConfig(),
                               threads=args["threads"])
