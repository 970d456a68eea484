#!/usr/bin/env bash
# The GPU measurements BENCHMARKS.md needs, in parts that each fit one 10-minute call on the H200
# machine (run from the repository root; logs and JSON go under ${OUT:-/tmp/gpu_session}):
#   bash bench/gpu_session.sh checks   # CUDA tests, bf16 parity + 2.7b at 8 GiB, a real OOM recovered (~4 min)
#   bash bench/gpu_session.sh small    # 350m (vs plain PyTorch), 0.7b, 1.3b, 2.7b at 8 GiB; 0.7b at 24 GiB vs PyTorch (~6 min)
#   bash bench/gpu_session.sh large    # 4b and 6.7b at 8 GiB; 2.7b with 32k tokens per step (~8 min)
#   bash bench/gpu_session.sh plan8    # planner prediction vs measurement, every preset, 8 GiB (~9 min)
#   bash bench/gpu_session.sh plan24   # the same at 24 GiB
#   bash bench/gpu_session.sh plan8big # 8 GiB, 2.7b 4b 6.7b only (~6 min)
#   bash bench/gpu_session.sh stream   # CUDA tests; 1.3b with AdamW split CPU/GPU vs CPU alone; 2.7b split (~6 min)
#   bash bench/gpu_session.sh fits     # 350m at 8 GiB (3 rounds) and 0.7b at 24 GiB (5) against plain PyTorch, alternated (~5 min)
#   bash bench/gpu_session.sh waits    # CUDA tests; 1.3b with the host's waits spinning vs sleeping, alternating (~3 min)
#   bash bench/gpu_session.sh table8   # every preset at the plan's settings, 8 GiB, against the floors (~6 min); table24 likewise
#   bash bench/gpu_session.sh speed    # both AdamW engines sharing the host; 1.3b, 2.7b, 4b at 2048 tokens, 8 GiB (~9 min)
#   bash bench/gpu_session.sh profile  # 1.3b's step taken apart (bench/profile_step.py); 1.3b, 2.7b, 4b at 2048 tokens (~9 min)
#   bash bench/gpu_session.sh overlap  # CUDA and overlap tests; 1.3b, 2.7b with the update beside the forward vs waited for (~6 min)
#   bash bench/gpu_session.sh slices   # 1.3b with CPU AdamW slices of 1 M vs 4 M elements, alternating (~4 min)
#   bash bench/gpu_session.sh native   # 1.3b and 2.7b with the native host AdamW vs torch's kernels, alternating (~7 min)
#   bash bench/gpu_session.sh timeline # when each part of a 2048-token step runs, every thread and the device: 1.3b, 2.7b (~2 min)
# Timings are estimates from one day's runs; every command has its own timeout so one slow item
# cannot take the rest of the call with it.
set -u
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
export HOMESTAR_HOME=${HOMESTAR_HOME:-/tmp/hs} PYTHONUNBUFFERED=1
T0=$(date +%s)
say() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
bench() {  # bench NAME TIMEOUT ARGS...: one `homestar bench` line, its JSON kept under $OUT
  local name=$1 limit=$2; shift 2
  say "bench $name"
  timeout "$limit" python -m homestar bench --device cuda "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.err" \
    || echo "  (exit $?: $(tail -1 "$OUT/$name.err"))"
  python - "$OUT/$name.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    parts = " ".join(f"{k} {v:.3f}" for k, v in r["breakdown"].items())
    print(f"  {r['system']:8} {r['preset']:5} {r['status']:5} {r['tok_s']:9,.0f} tok/s {r['tflops']:6.1f} TFLOP/s"
          f"  gpu {r['gpu_peak_gib']:.2f}  host {r['cpu_peak_gib']:.2f} GiB  {parts} {r['message']}")
PY
}
cuda_tests() {  # cuda_tests TIMEOUT FILES...: the GPU tests and the native AdamW's (pyproject's -q: one summary line)
  local limit=$1; shift
  say "CUDA tests"; timeout "$limit" python -m pytest -p no:cacheprovider "$@" tests/test_runtime_native_adam.py 2>&1 \
    | grep -E "passed|failed|error" | tail -3
}
B8=(--gpu-mem-gib 8 --micro-batch 2)
# without --warmup, bench warms up until the automatic CPU/GPU AdamW split has settled
case "${1:-}" in
  checks)
    cuda_tests 120 tests/test_runtime_cuda.py
    say "gpu_check"; OUT=$OUT/check timeout 300 bash bench/gpu_check.sh 2>&1 | grep -v "^step " | tail -6
    say "gpu_oom"; OUT=$OUT/oom timeout 200 bash bench/gpu_oom.sh 2>&1 | tail -14 ;;
  small)
    bench 350m_8 90 --preset 350m "${B8[@]}" --steps 4 --warmup 2 --baseline
    bench 0.7b_8 90 --preset 0.7b "${B8[@]}" --steps 3 --warmup 2
    bench 1.3b_8 90 --preset 1.3b "${B8[@]}" --steps 3
    bench 2.7b_8 150 --preset 2.7b "${B8[@]}" --steps 3
    bench 0.7b_24 90 --preset 0.7b --gpu-mem-gib 24 --micro-batch 2 --steps 4 --warmup 2 --baseline ;;
  native)  # the host's AdamW: the native one-pass kernel (now) against torch's sliced kernels, alternating
    for i in 1 2; do
      bench "1.3b_native$i" 100 --preset 1.3b "${B8[@]}" --steps 4
      HOMESTAR_NATIVE_ADAM=0 bench "1.3b_torch$i" 100 --preset 1.3b "${B8[@]}" --steps 4
    done
    bench 2.7b_native 130 --preset 2.7b "${B8[@]}" --steps 3
    HOMESTAR_NATIVE_ADAM=0 bench 2.7b_torch 130 --preset 2.7b "${B8[@]}" --steps 3 ;;
  timeline)  # bench/step_timeline.py: the critical path of steps taken back to back
    for p in 1.3b 2.7b; do
      say "timeline $p"
      timeout 200 env PYTHONPATH=. python bench/step_timeline.py --preset "$p" --gpu-mem-gib 8 --steps 3 \
        > "$OUT/timeline_$p.txt" 2>&1; sed -n '/medians/,$p' "$OUT/timeline_$p.txt"
    done ;;
  large)
    bench 4b_8 180 --preset 4b "${B8[@]}" --steps 2
    bench 6.7b_8 240 --preset 6.7b "${B8[@]}" --steps 2
    bench 2.7b_8_32k 200 --preset 2.7b --gpu-mem-gib 8 --micro-batch 4 --accum 8 --steps 2 ;;
  plan8big)  # the presets whose first step ran out of memory before the activation forecast
    say "plan vs measured at 8 GiB, 2.7b 4b 6.7b"
    timeout 560 python bench/plan_vs_measured.py --budgets 8 --presets 2.7b 4b 6.7b --steps 2 2>&1 | tee "$OUT/plan8big.txt" ;;
  plan8|plan24)
    budget=${1#plan}; say "plan vs measured at $budget GiB"
    timeout 560 python bench/plan_vs_measured.py --budgets "$budget" --steps 2 2>&1 | tee "$OUT/plan$budget.txt" ;;
  stream)  # AdamW split between the CPU and the GPU by measured rates (the default) vs CPU alone
    cuda_tests 150 tests/test_runtime_cuda.py
    bench 1.3b_auto 120 --preset 1.3b "${B8[@]}" --steps 3
    bench 1.3b_cpu 100 --preset 1.3b "${B8[@]}" --steps 3 --warmup 2 --stream-share 0
    bench 2.7b_auto 150 --preset 2.7b "${B8[@]}" --steps 3
    bench 1.3b_nockpt 120 --preset 1.3b "${B8[@]}" --steps 3 --no-checkpointing ;;
  fits)  # where the model fits: against plain PyTorch in the same invocation, alternated (the host's speed drifts)
    bench 350m_8 200 --preset 350m "${B8[@]}" --steps 8 --warmup 3 --baseline --rounds 3
    bench 0.7b_24 300 --preset 0.7b --gpu-mem-gib 24 --micro-batch 2 --steps 16 --warmup 3 --baseline --rounds 5 ;;
  waits)  # the host's waits spinning (before) against sleeping (now), alternating
    cuda_tests 150 tests/test_runtime_cuda.py
    mkdir -p "$OUT/spin"
    cat > "$OUT/spin/sitecustomize.py" <<'PY'
from homestar.runtime import cuda
_init = cuda.CudaDevice.__init__
def spinning(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.blocking_waits = False
cuda.CudaDevice.__init__ = spinning
PY
    for i in 1 2; do
      PYTHONPATH="$OUT/spin:$PWD" bench "1.3b_spin$i" 120 --preset 1.3b "${B8[@]}" --steps 4
      bench "1.3b_sleep$i" 120 --preset 1.3b "${B8[@]}" --steps 4
    done ;;
  overlap)  # the step's AdamW beside the next forward (now) against waited for in the step, alternating
    cuda_tests 150 tests/test_runtime_cuda.py tests/test_runtime_overlap.py
    mkdir -p "$OUT/waited"
    cat > "$OUT/waited/sitecustomize.py" <<'PY'
from homestar.runtime import optimizer
optimizer.ChunkAdamW._may_defer = lambda self: False
PY
    for p in 1.3b 2.7b; do
      bench "${p}_beside" 150 --preset $p "${B8[@]}" --steps 6
      PYTHONPATH="$OUT/waited:$PWD" bench "${p}_waited" 150 --preset $p "${B8[@]}" --steps 6
    done ;;
  slices)  # the CPU AdamW's slice size: 1 M elements (now) against 4 M, alternating, 1.3b
    mkdir -p "$OUT/slice4m"
    cat > "$OUT/slice4m/sitecustomize.py" <<'PY'
from homestar.runtime import adam_math, optimizer
adam_math.SLICE_ELEMS = optimizer.SLICE_ELEMS = 1 << 22
PY
    for i in 1 2 3; do
      bench "1.3b_slice1m_$i" 100 --preset 1.3b "${B8[@]}" --steps 6
      PYTHONPATH="$OUT/slice4m:$PWD" bench "1.3b_slice4m_$i" 100 --preset 1.3b "${B8[@]}" --steps 6
    done ;;
  table8|table24)  # what --preset P trains at: the plan's micro-batch, accumulation and chunk size
    budget=${1#table}; say "speed table at $budget GiB"
    PYTHONPATH=. timeout "${TABLE_LIMIT:-570}" python bench/speed_table.py --budgets "$budget" --cpu-mem-gib 120 --warmup 3 --steps 2 2>&1 \
      | grep -v Warning | tee "$OUT/table$budget.txt" ;;
  speed)  # the targets at 2048 tokens per step, split settled (bench's default warm-up)
    say "host contention"; PYTHONPATH=. timeout 100 python bench/host_contention.py 2>&1 | tail -12
    bench 1.3b_8 120 --preset 1.3b "${B8[@]}" --steps 3
    bench 2.7b_8 150 --preset 2.7b "${B8[@]}" --steps 3
    bench 4b_8 190 --preset 4b "${B8[@]}" --steps 3 ;;
  profile)  # where 1.3b's step goes, then the targets at 2048 tokens per step
    say "profile 1.3b"; PYTHONPATH=. timeout 150 python bench/profile_step.py --preset 1.3b --gpu-mem-gib 8 --trace "$OUT" 2>&1 \
      | grep -v Warning | tee "$OUT/profile_1.3b.txt"
    bench 1.3b_8 120 --preset 1.3b "${B8[@]}" --steps 3
    bench 2.7b_8 150 --preset 2.7b "${B8[@]}" --steps 3
    bench 4b_8 190 --preset 4b "${B8[@]}" --steps 3 ;;
  *) echo "usage: bash bench/gpu_session.sh checks|small|large|plan8|plan8big|plan24|stream|fits|waits|table8|table24|speed|profile|overlap|slices|native|timeline" >&2; exit 2 ;;
esac
say done
