#!/usr/bin/env bash
# Benchmark of issue 9: the harness against PEFT + transformers + PyTorch on this machine,
# in one invocation, each side RUNS times (default 3), alternating; prints medians and
# the ratios (per run and median).
#
#   ci/bench/run.sh                 # M1 and M2
#   ci/bench/run.sh m1              # only M1 (or: m2, m3)
#   RUNS=1 ci/bench/run.sh m3       # M3 (issue 18): Qwen2.5-0.5B geometry, minutes a run
#   PYTHON=/tmp/peftenv/bin/python RUNS=5 ci/bench/run.sh
#
# Needs GNU time (/usr/bin/time -v) and a Python with the pinned reference stack
# (ci/peft/requirements.txt). Whole-process wall time and peak RSS come from
# /usr/bin/time -v; user+sys CPU seconds are printed too (less sensitive to a loaded
# machine than wall time). The load average is printed before and after.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-/tmp/peftenv/bin/python}
RUNS=${RUNS:-3}
WHAT=${1:-all}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/prefix-bench.XXXXXX")

case $WHAT in
  m1) cargo build --release --quiet --bin prefix-harness ;;
  m2) cargo build --release --quiet --example bench_m2 ;;
  m3) cargo build --release --quiet --example bench_m3 ;;
  *) cargo build --release --quiet --bin prefix-harness --example bench_m2 ;;
esac
BIN=target/release/prefix-harness
M2BIN=target/release/examples/bench_m2
M3BIN=target/release/examples/bench_m3

echo "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# $("$PYTHON" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
echo "# load before: $(uptime)"

timed() { # timed NAME CMD... : /usr/bin/time -v into $OUT/NAME.time, stdout into $OUT/NAME.out
  local name=$1; shift
  /usr/bin/time -v -o "$OUT/$name.time" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err" || {
    echo "$name failed:"; tail -20 "$OUT/$name.err"; exit 1; }
}

if [[ $WHAT == all || $WHAT == m1 ]]; then
  for i in $(seq 1 "$RUNS"); do
    timed "m1-ours-$i" "$BIN" run ci/bench/m1 --jobs 2
    timed "m1-peft-$i" "$PYTHON" ci/bench/peft_m1.py
    echo "# M1 run $i done, load: $(cut -d' ' -f1-3 /proc/loadavg)"
  done
fi
if [[ $WHAT == all || $WHAT == m2 ]]; then
  for i in $(seq 1 "$RUNS"); do
    timed "m2-ours-$i" "$M2BIN"
    timed "m2-peft-$i" "$PYTHON" ci/bench/peft_m2.py
    echo "# M2 run $i done, load: $(cut -d' ' -f1-3 /proc/loadavg)"
  done
fi
if [[ $WHAT == m3 ]]; then
  for i in $(seq 1 "$RUNS"); do
    timed "m3-ours-$i" "$M3BIN"
    timed "m3-peft-$i" "$PYTHON" ci/bench/peft_m3.py
    echo "# M3 run $i done, load: $(cut -d' ' -f1-3 /proc/loadavg)"
  done
fi
echo "# load after: $(uptime)"

python3 - "$OUT" "$RUNS" "$WHAT" <<'PY'
import re, statistics, sys
from pathlib import Path
out, runs, what = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

def gnu_time(name):
    t = (out / f"{name}.time").read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", t).group(1)
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    user = float(re.search(r"User time \(seconds\): (.*)", t).group(1))
    sys_ = float(re.search(r"System time \(seconds\): (.*)", t).group(1))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (.*)", t).group(1)) / 1024
    return dict(wall=secs, cpu=user + sys_, rss=rss)

def keys(name):
    d = {}
    for line in (out / f"{name}.out").read_text().splitlines():
        m = re.match(r"^(\w+)=([-0-9.eE]+)$", line)
        if m:
            d[m.group(1)] = float(m.group(2))
    return d

med = statistics.median
if what in ("all", "m1"):
    ours = [gnu_time(f"m1-ours-{i}") for i in range(1, runs + 1)]
    peft = [gnu_time(f"m1-peft-{i}") for i in range(1, runs + 1)]
    print("\n## M1, tiny matrix (24 cases), whole process")
    print("| run | ours wall s | PEFT wall s | wall ratio | ours CPU s | PEFT CPU s | ours RSS MiB | PEFT RSS MiB | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (o, p) in enumerate(zip(ours, peft), 1):
        print(f"| {i} | {o['wall']:.2f} | {p['wall']:.2f} | {p['wall']/o['wall']:.1f}x | {o['cpu']:.2f} | {p['cpu']:.2f} | {o['rss']:.1f} | {p['rss']:.1f} | {p['rss']/o['rss']:.1f}x |")
    mo = {k: med([r[k] for r in ours]) for k in ours[0]}
    mp = {k: med([r[k] for r in peft]) for k in peft[0]}
    print(f"| median | {mo['wall']:.2f} | {mp['wall']:.2f} | {med([p['wall']/o['wall'] for o, p in zip(ours, peft)]):.1f}x | {mo['cpu']:.2f} | {mp['cpu']:.2f} | {mo['rss']:.1f} | {mp['rss']:.1f} | {med([p['rss']/o['rss'] for o, p in zip(ours, peft)]):.1f}x |")
if what in ("all", "m2"):
    ours = [keys(f"m2-ours-{i}") for i in range(1, runs + 1)]
    peft = [keys(f"m2-peft-{i}") for i in range(1, runs + 1)]
    print("\n## M2, compute-bound llama (B 8, S 128, P 32): medians over runs (ratio = ours / PyTorch, < 1 is faster)")
    print("| metric | ours | PyTorch | ratio (median of per-run ratios) |")
    print("|---|---|---|---|")
    for k in ["matmul_peak_gflops", "train_step_s", "train_forward_s", "train_backward_s", "train_gflops",
              "gen_prefill_s", "gen_per_token_s", "gen_decode_per_token_s", "gen_gflops"]:
        o = [r[k] for r in ours if k in r]
        p = [r[k] for r in peft if k in r]
        if o and p:
            ratio = med([a / b for a, b in zip(o, p)])
            print(f"| {k} | {med(o):.4g} | {med(p):.4g} | {ratio:.2f} |")
    for side, rs in (("ours", ours), ("PyTorch", peft)):
        pk = med([r["matmul_peak_gflops"] for r in rs])
        tg = med([r["train_gflops"] for r in rs])
        print(f"# {side}: training at {tg:.1f} GFLOP/s = {100*tg/pk:.0f}% of its measured 1024^3 matmul peak ({pk:.1f} GFLOP/s)")
if what == "m3":
    print("\n## M3, Qwen2.5-0.5B geometry (B 4, S 128, P 32, 10 AdamW steps, 32 greedy tokens)")
    print("| run | metric | ours | PEFT | ratio ours / PEFT |")
    print("|---|---|---|---|---|")
    for i in range(1, runs + 1):
        o, p = gnu_time(f"m3-ours-{i}"), gnu_time(f"m3-peft-{i}")
        ko, kp = keys(f"m3-ours-{i}"), keys(f"m3-peft-{i}")
        rows = [("whole-process wall, s", o["wall"], p["wall"]), ("CPU (user+sys), s", o["cpu"], p["cpu"]),
                ("peak RSS, MiB", o["rss"], p["rss"])]
        rows += [(k, ko[k], kp[k]) for k in ["load_s", "first_step_s", "step_median_s", "train_s", "gen_s", "work_s"]
                 if k in ko and k in kp]
        if "import_s" in kp:
            rows.append(("import_s (Python only)", 0.0, kp["import_s"]))
        for name, a, b in rows:
            print(f"| {i} | {name} | {a:.3f} | {b:.3f} | {a / b if b else float('nan'):.2f} |")
print(f"\n# raw outputs: {out}")
PY
