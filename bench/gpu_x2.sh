#!/usr/bin/env bash
# Measurements on a machine with two GPUs, in parts that each fit one 10-minute call (run from the
# repository root; logs and JSON go under ${OUT:-/tmp/gpu_x2}, short summary lines on stdout):
#   bash bench/gpu_x2.sh plans          # planner vs measured, 8 GiB on GPU 0 and 24 GiB on GPU 1 at once (~8.5 min)
#   bash bench/gpu_x2.sh dist           # 2.7b at 8 GiB: 1 process (16 cores), 2 processes (16 each), 1 process (all cores) (~5 min, 8.5 at most)
#   bash bench/gpu_x2.sh dist-largest   # 6.7b on two processes at 8 GiB each, 3 steps; 4b if 6.7b fails (9.5 min at most)
# Training runs: micro-batch 2 per process, no accumulation (the presets default to 32), no
# eval, no samples, and no checkpoint, not even the one a run writes when it ends (~40 GB at 2.7b).
# Every item has its own timeout so a slow one cannot take the call with it. Overrides, for a dry
# run of the command lines on a CPU (gloo instead of NCCL):
#   DEVICE=cpu PRESET=debug GPU_GIB=0.05 CPU_GIB=4 bash bench/gpu_x2.sh dist
#   DEVICE=cpu PLAN_BUDGETS="0.05 0.1" PLAN_PRESETS=debug CPU_GIB=8 bash bench/gpu_x2.sh plans
# Host memory is given explicitly (CPU_GIB, default 120: what a 125 GiB single-GPU machine offers)
# wherever something would size itself from the detected RAM, which a machine may misreport.
set -u
USAGE="usage: bash bench/gpu_x2.sh plans|plan-one|dist|dist-quick|dist-largest"
case "${1:-}" in plans|plan-one|dist|dist-quick|dist-largest) ;; *) echo "$USAGE" >&2; exit 2 ;; esac
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/gpu_x2}; mkdir -p "$OUT"
export HOMESTAR_HOME=${HOMESTAR_HOME:-/tmp/hs} PYTHONUNBUFFERED=1
# the repository itself, importable from wherever the launcher runs (homestar need not be installed)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the pause-while-memory-is-short guard reads the detected RAM: off, the budgets below are explicit
export HOMESTAR_MIN_AVAILABLE_GIB=${HOMESTAR_MIN_AVAILABLE_GIB:-0}
DEVICE=${DEVICE:-cuda} PRESET=${PRESET:-2.7b} GPU_GIB=${GPU_GIB:-8} CPU_GIB=${CPU_GIB:-120}
# training runs: STEPS in all, the first WARMUP untimed (8: until the automatic AdamW split settles)
STEPS=${STEPS:-12} WARMUP=${WARMUP:-8} ACCUM=${ACCUM:-1} LARGEST=${LARGEST:-6.7b 4b}
PLAN_BUDGETS=${PLAN_BUDGETS:-8 24} PLAN_PRESETS=${PLAN_PRESETS:-} PLAN_LIMIT=${PLAN_LIMIT:-470}
if [ "$DEVICE" = cuda ]; then PRECISION=${PRECISION:-bf16}; else PRECISION=${PRECISION:-auto}; fi
T0=$(date +%s)
say() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
command -v taskset > /dev/null || { echo "taskset (util-linux) is needed to share the cores out" >&2; exit 2; }

HELPER=$OUT/x2_helper.py
cat > "$HELPER" <<'PY'
"""Helpers of bench/gpu_x2.sh: share the cores out, launch homestar without its final checkpoint,
sample memory peaks, summarise a run's metrics.jsonl. Subcommand first: split | launch | peaks |
reap | summary | ratio."""
import json, os, signal, statistics, subprocess, sys, time

GIB = 2**30


def cpu_list(text):
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def split():
    """Two halves of the usable CPUs, whole physical cores in each (hyperthread siblings stay
    together), then the whole list: `A nA B nB ALL nALL`."""
    cpus = sorted(os.sched_getaffinity(0))
    def core(c):
        base = f"/sys/devices/system/cpu/cpu{c}/topology"
        try:
            return tuple(int(open(f"{base}/{f}").read()) for f in ("physical_package_id", "core_id"))
        except OSError:
            return (0, c)
    cores = sorted({core(c) for c in cpus})
    first = set(cores[: max(1, len(cores) // 2)])
    a = [c for c in cpus if core(c) in first]
    b = [c for c in cpus if core(c) not in first] or a
    fmt = lambda cs: ",".join(map(str, cs))
    print(fmt(a), len(a), fmt(b), len(b), fmt(cpus), len(cpus))


def launch(argv):
    """`homestar ARGV` with the end-of-run checkpoint skipped (a 2.7b one is ~40 GB and minutes of
    writing); under torchrun, this rank pinned to its list of HS_RANK_CORES ("A;B", by LOCAL_RANK)
    before torch loads, so its OpenMP threads see only those CPUs."""
    lists = [s for s in os.environ.get("HS_RANK_CORES", "").split(";") if s]
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if lists:
        os.sched_setaffinity(0, cpu_list(lists[rank % len(lists)]))
    mine = sorted(os.sched_getaffinity(0))
    print(f"x2: local rank {rank}: {len(mine)} cpus {mine[0]}-{mine[-1]}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}",
          file=sys.stderr, flush=True)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI sets it
    from homestar.train.trainer import Trainer
    Trainer.save = lambda self, final=False: None
    from homestar.cli import main
    sys.exit(main(argv))


def gpu_used():
    """MiB in use per GPU index, from nvidia-smi ({} without one). Cost: one process per call."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {int(i): float(m) for i, m in (line.split(",") for line in out.strip().splitlines() if "," in line)}


def peaks(pid, path):
    """Sample a process tree every 0.5 s until its root ends: summed and largest RSS, the
    machine's used memory, each GPU's used memory; keep every pid seen (for `reap`)."""
    import psutil
    seen, peak = {}, {"tree_rss_gib": 0.0, "proc_rss_gib": 0.0, "sys_used_gib": 0.0, "gpu_used_gib": {}}
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        root = None
    while root is not None:
        try:
            if root.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.Error:
            break
        rss = []
        for p in [root, *root.children(recursive=True)]:
            try:
                seen[p.pid] = p.create_time()
                rss.append(p.memory_info().rss)
            except psutil.Error:
                pass
        peak["tree_rss_gib"] = max(peak["tree_rss_gib"], sum(rss) / GIB)
        peak["proc_rss_gib"] = max(peak["proc_rss_gib"], max(rss, default=0) / GIB)
        peak["sys_used_gib"] = max(peak["sys_used_gib"], psutil.virtual_memory().used / GIB)
        for i, mib in gpu_used().items():
            peak["gpu_used_gib"][str(i)] = max(peak["gpu_used_gib"].get(str(i), 0.0), mib / 1024)
        time.sleep(0.5)
    json.dump({**peak, "pids": seen}, open(path, "w"))


def reap(path):
    """SIGKILL what is left of a timed-out run's tree (torchrun's workers live in their own sessions)."""
    import psutil
    for pid, created in json.load(open(path)).get("pids", {}).items():
        try:
            p = psutil.Process(int(pid))
            if abs(p.create_time() - created) < 1e-3:
                os.kill(int(pid), signal.SIGKILL)
                print(f"  killed leftover process {pid} ({' '.join(p.cmdline()[:3])})")
        except (psutil.Error, OSError):
            pass


def summary(name, run_dir, warmup, steps, rc, peaks_path, out_path):
    """One line per run: median tok/s over the steps after warm-up, peaks; exit 1 unless every step ran."""
    events = []
    try:
        events = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl") if line.strip()]
    except (OSError, ValueError):
        pass
    step = [e for e in events if e.get("event") == "step"]
    timed = [e for e in step if e["step"] > warmup] or step[-1:]
    end = next((e["status"] for e in events if e.get("event") == "end"), "none")
    start = next((e for e in events if e.get("event") == "start"), {})
    try:
        pk = json.load(open(peaks_path))
    except (OSError, ValueError):
        pk = {}
    med = lambda key: statistics.median(e[key] for e in timed) if timed else 0.0
    keys = sorted({k for e in timed for k in e.get("timings", {})})
    r = {"name": name, "ok": rc == 0 and len(step) >= steps, "exit": rc, "end": end, "steps": len(step),
         "tokens_per_step": start.get("tokens_per_step"), "params": start.get("params"),
         "tok_s": med("tok_s"), "tflops": med("tflops"), "step_s": med("step_s"),
         "tok_s_each": [round(e["tok_s"]) for e in step], "loss": [round(e["loss"], 4) for e in step],
         "gpu_books_peak_gib": max((e["gpu_mem"] for e in step), default=0) / GIB,
         "rank0_rss_peak_gib": max((e["cpu_mem"] for e in step), default=0) / GIB,
         "timings": {k: statistics.median(e["timings"].get(k, 0.0) for e in timed) for k in keys},
         **{k: v for k, v in pk.items() if k != "pids"}}
    json.dump(r, open(out_path, "w"), indent=1)
    gpus = " ".join(f"{i}:{v:.2f}" for i, v in sorted(r.get("gpu_used_gib", {}).items())) or "-"
    print(f"  {name:12} {'ok' if r['ok'] else 'FAILED':6} exit {rc} end {end}, {len(step)}/{steps} steps, "
          f"{r['tok_s']:8,.0f} tok/s ({r['tok_s_each']}) {r['step_s']:.2f} s/step {r['tflops']:.1f} TFLOP/s")
    print(f"  {'':12} GPU GiB: runtime books (rank 0) {r['gpu_books_peak_gib']:.2f}, nvidia-smi {gpus}; "
          f"host GiB: rank-0 RSS {r['rank0_rss_peak_gib']:.2f}, largest process "
          f"{r.get('proc_rss_gib', 0):.2f}, tree {r.get('tree_rss_gib', 0):.2f}, machine used {r.get('sys_used_gib', 0):.2f}")
    if r["timings"]:
        print(f"  {'':12} median timings s: " + " ".join(f"{k} {v:.3f}" for k, v in r["timings"].items()))
    sys.exit(0 if r["ok"] else 1)


def ratio(out, two, *ones):
    """tok/s of the two-process run over each one-process run."""
    load = lambda n: json.load(open(f"{out}/{n}.json")) if os.path.exists(f"{out}/{n}.json") else {}
    t = load(two)
    for one in ones:
        o = load(one)
        if t.get("ok") and o.get("ok") and o["tok_s"] > 0:
            print(f"  {two} / {one}: {t['tok_s']:,.0f} / {o['tok_s']:,.0f} tok/s = {t['tok_s'] / o['tok_s']:.3f}")
        else:
            print(f"  {two} / {one}: no ratio (a run failed)")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "split":
        split()
    elif cmd == "launch":
        launch(args)
    elif cmd == "peaks":
        peaks(int(args[0]), args[1])
    elif cmd == "reap":
        reap(args[0])
    elif cmd == "summary":
        summary(args[0], args[1], int(args[2]), int(args[3]), int(args[4]), args[5], args[6])
    elif cmd == "ratio":
        ratio(*args)
PY
read -r CORES_A N_A CORES_B N_B CORES_ALL N_ALL < <(python "$HELPER" split)

train_run() {  # train_run NAME TIMEOUT NPROC PRESET STEPS WARMUP: one `homestar train`, summarised
  local name=$1 limit=$2 nproc=$3 preset=$4 steps=$5 warmup=$6 run=$OUT/runs/$1 pid spid rc
  local flags=(train --preset "$preset" --device "$DEVICE" --gpu-mem-gib "$GPU_GIB" --cpu-mem-gib "$CPU_GIB"
               --micro-batch 2 --accum "$ACCUM" --precision "$PRECISION" --steps "$steps" --save-every 0 --eval-every 0
               --sample-every 0 --headless --run-dir "$run")
  rm -rf "$run"; mkdir -p "$OUT/runs"
  case $nproc in
    1-half) say "train $name: 1 process on GPU 0, $N_A cpus ($CORES_A), $preset, $steps steps"
      CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=$N_A timeout -k 20 "$limit" \
        taskset -c "$CORES_A" python "$HELPER" launch "${flags[@]}" > "$OUT/$name.log" 2>&1 & ;;
    1-all) say "train $name: 1 process on GPU 0, all $N_ALL cpus, $preset, $steps steps"
      CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=$N_ALL timeout -k 20 "$limit" \
        taskset -c "$CORES_ALL" python "$HELPER" launch "${flags[@]}" > "$OUT/$name.log" 2>&1 & ;;
    2) say "train $name: 2 processes (torchrun) on GPUs 0 and 1, $N_A + $N_B cpus, $preset, $steps steps"
      # no OMP_NUM_THREADS: homestar gives each pinned rank its own cores (train.distributed)
      CUDA_VISIBLE_DEVICES=0,1 HS_RANK_CORES="$CORES_A;$CORES_B" timeout -k 45 "$limit" \
        torchrun --standalone --nproc-per-node 2 "$HELPER" launch "${flags[@]}" > "$OUT/$name.log" 2>&1 & ;;
  esac
  pid=$!
  python "$HELPER" peaks "$pid" "$OUT/$name.peaks.json" & spid=$!
  wait "$pid"; rc=$?; wait "$spid"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && { echo "  timed out after ${limit}s: $(tail -1 "$OUT/$name.log")"; python "$HELPER" reap "$OUT/$name.peaks.json"; }
  [ "$rc" = 0 ] || grep -E "homestar: error|^[A-Za-z_.]+(Error|Exception): " "$OUT/$name.log" \
    | grep -vE "ChildFailedError|SignalException" | awk '!seen[$0]++' | tail -2 | sed 's/^/  log: /'
  python "$HELPER" summary "$name" "$run" "$warmup" "$steps" "$rc" "$OUT/$name.peaks.json" "$OUT/$name.json"
  local ok=$?
  rm -rf "$run/checkpoints"  # only a run stopped by its timeout can have started one
  return $ok
}

sweep() {  # sweep GPU CPUS NCPUS BUDGET: plan_vs_measured.py on one GPU, its own cores
  CUDA_VISIBLE_DEVICES=$1 OMP_NUM_THREADS=$3 timeout -k 10 "$PLAN_LIMIT" taskset -c "$2" \
    python bench/plan_vs_measured.py --device "$DEVICE" --budgets "$4" --steps 2 --cpu-mem-gib "$CPU_GIB" \
    ${PLAN_PRESETS:+--presets $PLAN_PRESETS} > "$OUT/plan$4.txt" 2> "$OUT/plan$4.err"
  echo "exit $?" >> "$OUT/plan$4.err"
}

say "cpus: $N_A ($CORES_A) | $N_B ($CORES_B); $(lscpu 2>/dev/null | grep -E '^(Thread|Core|Socket|NUMA node\(s\))' | tr -s ' ' | paste -sd';')"
case "${1:-}" in
  plans)
    read -r B0 B1 <<< "$PLAN_BUDGETS"
    say "plans: $B0 GiB on GPU 0 and $B1 GiB on GPU 1 at once, planned for $CPU_GIB GiB of host memory, ${PLAN_LIMIT}s each at most"
    sweep 0 "$CORES_A" "$N_A" "$B0" & p0=$!
    sweep 1 "$CORES_B" "$N_B" "$B1" & p1=$!
    wait $p0 $p1
    for b in $B0 $B1; do
      say "plan vs measured at $b GiB ($(tail -1 "$OUT/plan$b.err"); 124 = timed out, rows after it missing)"
      cat "$OUT/plan$b.txt"
    done ;;
  dist)
    train_run 1proc-half 150 1-half "$PRESET" "$STEPS" "$WARMUP"
    train_run 2proc 180 2 "$PRESET" "$STEPS" "$WARMUP"
    train_run 1proc-all 150 1-all "$PRESET" "$STEPS" "$WARMUP"
    say "tok/s, two processes over one (median of steps after $WARMUP warm-up steps)"
    python "$HELPER" ratio "$OUT" 2proc 1proc-half 1proc-all ;;
  plan-one)  # the first of PLAN_BUDGETS alone, on GPU 0 and half the cores (like the one-GPU machine)
    B0=${PLAN_BUDGETS%% *}; say "plan vs measured at $B0 GiB on GPU 0 alone"
    sweep 0 "$CORES_A" "$N_A" "$B0"; tail -1 "$OUT/plan$B0.err"; cat "$OUT/plan$B0.txt" ;;
  dist-quick)  # two processes, then one on half the cores (the share each of the two had)
    train_run 2proc "${DIST_LIMIT:-150}" 2 "$PRESET" "$STEPS" "$WARMUP"
    train_run 1proc-half "${DIST_LIMIT:-150}" 1-half "$PRESET" "$STEPS" "$WARMUP"
    python "$HELPER" ratio "$OUT" 2proc 1proc-half ;;
  dist-largest)
    for preset in $LARGEST; do
      left=$(( ${LARGEST_BUDGET:-540} - ($(date +%s) - T0) ))  # a timed-out torchrun takes up to 45 s more to stop
      [ "$left" -lt 120 ] && { say "no time left for $preset"; break; }
      limit=$(( left < 360 ? left : 360 ))
      train_run "2proc-$preset" "$limit" 2 "$preset" 3 1 && break
    done ;;
esac
say done
