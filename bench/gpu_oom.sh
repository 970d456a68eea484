#!/usr/bin/env bash
# A real GPU out-of-memory mid-run, recovered (run from the repository root on a CUDA machine):
# the 125m preset at micro-batch 16 under --gpu-mem-gib 12, first with plain PyTorch, then with
# the chunk runtime. At the start of step 6 HOMESTAR_TEST_SQUEEZE_AT_STEP takes GPU memory away
# (half of what steps 1-5 needed above their resting memory stays allocatable), so step 6's
# forward/backward really fails to allocate; the run must split the micro-batch (same global
# batch), redo step 6 and reach step 12 with every step logged once. Logs go under $OUT.
set -u
OUT=${OUT:-/tmp/gpu_oom}; mkdir -p "$OUT"
export HOMESTAR_HOME=${HOMESTAR_HOME:-/tmp/hs} PYTHONUNBUFFERED=1
common=(--preset 125m --device cuda --gpu-mem-gib 12 --micro-batch 16 --accum 1 --steps 12 --save-every 0
        --eval-every 0 --sample-every 0 --headless --seed 7)
for rt in torch chunked; do
  rm -rf "/tmp/oom_$rt"
  HOMESTAR_TEST_SQUEEZE_AT_STEP=6 timeout 300 python -m homestar train --runtime "$rt" --run-dir "/tmp/oom_$rt" \
    "${common[@]}" > "$OUT/$rt.log" 2>&1
  echo $? > "$OUT/$rt.rc"
  cp "/tmp/oom_$rt/metrics.jsonl" "$OUT/$rt.jsonl" 2>/dev/null
done
python - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
for rt in ("torch", "chunked"):
    print(f"== {rt}: exit status {open(f'{out}/{rt}.rc').read().strip()}")
    log = open(f"{out}/{rt}.log", errors="replace").read().splitlines()
    print("  squeeze:", next((l for l in log if "HOMESTAR_TEST_SQUEEZE_AT_STEP" in l), "(no squeeze line in the log)"))
    path = f"{out}/{rt}.jsonl"
    events = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    for e in events:
        if e["event"] == "status" and e.get("state") == "oom-recovered":
            print(f"  recovered in step {e['step'] + 1}: {e['message']}")
        elif e["event"] in ("error", "end"):
            print(f"  {e['event']}: {e.get('message', e.get('status'))}")
    steps = [e for e in events if e["event"] == "step"]
    numbers = [e["step"] for e in steps]
    print(f"  steps reached {max(numbers, default=0)} (must be 12); each once: {numbers == list(range(1, 13))}")
    print("  losses", " ".join(f"{e['step']}:{e['loss']:.4f}" for e in steps))
    if not steps or numbers[-1] != 12:
        print("  log tail:", *log[-8:], sep="\n    ")
PY
