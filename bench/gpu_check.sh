#!/usr/bin/env bash
# GPU checks of the chunk runtime (run from the repository root on a CUDA machine):
# 1. bf16 parity with plain PyTorch: the 125m preset, 50 steps, same seed and data, both runtimes;
# 2. the 2.7b preset under --gpu-mem-gib 8 for 20 steps (killed once step 20 is logged, so the
#    32 GB final checkpoint is not written).
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export HOMESTAR_HOME=${HOMESTAR_HOME:-/tmp/hs} PYTHONUNBUFFERED=1
common=(--steps 50 --device cuda --micro-batch 8 --accum 1 --save-every 0 --eval-every 0 --sample-every 0 --headless --seed 7)
for rt in torch chunked; do
  rm -rf /tmp/r_$rt
  python -m homestar train --preset 125m --runtime $rt --run-dir /tmp/r_$rt "${common[@]}" > "$OUT/125m_$rt.log" 2>&1
  cp /tmp/r_$rt/metrics.jsonl "$OUT/125m_$rt.jsonl"
done
python - "$OUT" <<'PY' | tee "$OUT/parity.txt"
import json, sys
def losses(p):
    return {r["step"]: r["loss"] for r in map(json.loads, open(p)) if r["event"] == "step"}
a, b = losses(f"{sys.argv[1]}/125m_torch.jsonl"), losses(f"{sys.argv[1]}/125m_chunked.jsonl")
rel = [abs(a[k] - b[k]) / abs(a[k]) for k in sorted(a) if k in b]
print(f"steps compared {len(rel)}; max rel diff {max(rel):.2e}; mean {sum(rel)/len(rel):.2e}")
print("torch   first/last", a[min(a)], a[max(a)]); print("chunked first/last", b[min(b)], b[max(b)])
tok = lambda p: [r["tok_s"] for r in map(json.loads, open(p)) if r["event"] == "step"][5:]
print("median tok/s torch %.0f chunked %.0f" % (sorted(tok(f"{sys.argv[1]}/125m_torch.jsonl"))[22], sorted(tok(f"{sys.argv[1]}/125m_chunked.jsonl"))[22]))
PY
rm -rf /tmp/r_big
python -m homestar train --preset 2.7b --steps 20 --gpu-mem-gib 8 --micro-batch 2 --accum 1 --device cuda --save-every 0 \
  --eval-every 0 --sample-every 0 --headless --run-dir /tmp/r_big > "$OUT/2.7b.log" 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  grep -q '"step":20,' /tmp/r_big/metrics.jsonl 2>/dev/null && { kill -9 $pid; break; }
  sleep 1
done
cp /tmp/r_big/metrics.jsonl "$OUT/2.7b.jsonl" 2>/dev/null
tail -5 "$OUT/2.7b.log"
