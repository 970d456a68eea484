"""`homestar bench` on the CPU: both systems in child processes, figures and a step breakdown."""

from __future__ import annotations

import json

from homestar.cli import main


def test_bench_baseline_reports_both_systems_and_where_the_time_went(capsys):
    code = main(["bench", "--preset", "debug", "--device", "cpu", "--gpu-mem-gib", "0.02", "--seq-len", "64",
                 "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--baseline", "--json"])
    assert code == 0
    results = {r["system"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert set(results) == {"torch", "chunked"}
    for r in results.values():
        assert r["status"] == "ok" and r["tok_s"] > 0 and r["step_s"] > 0 and r["cpu_peak_gib"] > 0
        assert r["params"] > 1_000_000 and (r["micro_batch"], r["seq_len"]) == (2, 64)
        assert r["checkpointing"] is False  # the CPU's default
    phases = results["chunked"]["breakdown"]
    # a 0.02 GiB simulated device streams chunks: both copy directions ran, forward and backward timed
    for key in ("forward", "backward", "forward_backward", "h2d", "d2h", "optimizer"):
        assert phases[key] > 0, key
    assert phases["forward"] + phases["backward"] <= phases["forward_backward"] * 1.05
    for r in results.values():  # each timed step's own span, beside their mean
        b = r["breakdown"]
        assert 0 < b["step_min"] <= b["step_median"] <= b["step_max"] and b["step_min"] <= r["step_s"]


def test_bench_can_recompute_activations_or_keep_them(capsys):
    """Recompute follows the request (the GPU's default is on); `--no-checkpointing` turns it off."""
    from homestar.bench import BenchRequest, run_bench

    shape = dict(preset="debug", device="cpu", seq_len=32, micro_batch=1, steps=1, warmup=0)
    recomputed, = run_bench(BenchRequest(**shape, activation_checkpointing=True), baseline=False)
    assert recomputed.status == "ok" and recomputed.checkpointing is True
    assert main(["bench", "--preset", "debug", "--device", "cpu", "--seq-len", "32", "--micro-batch", "1",
                 "--steps", "1", "--warmup", "0", "--json", "--no-checkpointing"]) == 0
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert kept["status"] == "ok" and kept["checkpointing"] is False


def test_bench_with_an_unknown_preset_fails_in_one_line(capsys):
    assert main(["bench", "--preset", "nope", "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_the_default_warm_up_lasts_until_an_automatic_adamw_split_settles():
    from types import SimpleNamespace

    from homestar.bench import _settling_steps
    from homestar.runtime.adam_split import AUTO_SHARE_STEPS, AdamSplit

    def chunked(on_gpu: bool):
        return SimpleNamespace(adamw=SimpleNamespace(split=AdamSplit.configured(None, on_gpu=on_gpu)))

    assert _settling_steps(chunked(on_gpu=True)) == AUTO_SHARE_STEPS == 8  # it follows measured rates
    assert _settling_steps(chunked(on_gpu=False)) == 2  # nothing streams on the CPU
    assert _settling_steps(SimpleNamespace()) == 2  # plain PyTorch


def test_bench_rounds_alternate_the_systems_and_compare_their_medians():
    """`--rounds N` runs each system N times, alternating, so a host whose speed drifts weighs on
    both alike; the printed ratio is of the medians."""
    from homestar.bench import BenchRequest, BenchResult, format_results, run_bench

    request = BenchRequest(preset="debug", device="cpu", seq_len=32, micro_batch=1, steps=1, warmup=0)
    results = run_bench(request, baseline=True, rounds=2)
    assert [r.system for r in results] == ["torch", "chunked", "torch", "chunked"]
    assert all(r.status == "ok" and r.tok_s > 0 for r in results)

    def ran(system, tok_s):
        return BenchResult(system=system, preset="debug", params=1, status="ok", tok_s=tok_s)

    # medians, not the last runs: a slow torch run and a fast chunked one are outvoted
    made_up = [ran("torch", 100.0), ran("chunked", 90.0), ran("torch", 50.0), ran("chunked", 300.0),
               ran("torch", 110.0), ran("chunked", 95.0)]
    assert format_results(made_up).splitlines()[-1] == \
        "chunked / torch tok/s: 0.950 (medians of 6 alternated runs: 95 and 100)"
    assert format_results(made_up[:2]).splitlines()[-1] == "chunked / torch tok/s: 0.900"
