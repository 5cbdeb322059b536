#!/usr/bin/env bash
# Run one shard of the scenario suite the way CI does, and check on this machine that
# the fingerprint does not depend on the thread count.
#
#   ci/github/suite.sh BIN SHARD SHARDS OUT_DIR
#
# Writes OUT_DIR/{junit.xml, report.json, fingerprint.json, summary.txt,
# fingerprint-threads2.json, threads-compare.txt}. Exit status: the suite's (0 every
# case met its expectation, 1 some did not, 2 invalid input), else 1 when the
# thread-count comparison differs.
set -uo pipefail

bin=${1:?usage: suite.sh BIN SHARD SHARDS OUT_DIR}
shard=${2:?shard}
shards=${3:?shards}
out=${4:?out dir}
mkdir -p "$out"

# The suite: cases in parallel (candle then runs one thread per case).
"$bin" run scenarios --shard "$shard/$shards" --jobs 2 \
    --junit "$out/junit.xml" --report "$out/report.json" \
    --fingerprint "$out/fingerprint.json" | tee "$out/summary.txt"
status=${PIPESTATUS[0]}
if [ "$status" -eq 2 ] || [ ! -f "$out/fingerprint.json" ]; then
    echo "the suite did not run (exit $status)" >&2
    exit 2
fi

# Thread independence on this OS: one case at a time, candle with 2 threads.
RAYON_NUM_THREADS=2 "$bin" run scenarios --shard "$shard/$shards" --jobs 1 \
    --fingerprint "$out/fingerprint-threads2.json" > "$out/threads2.txt"
"$bin" compare "$out/fingerprint.json" "$out/fingerprint-threads2.json" \
    | tee "$out/threads-compare.txt"
threads=${PIPESTATUS[0]}

if [ "$status" -ne 0 ]; then
    exit "$status"
fi
if [ "$threads" -ne 0 ]; then
    echo "the fingerprint depends on the thread count (compare exit $threads)" >&2
    exit 1
fi
