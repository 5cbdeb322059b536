#!/usr/bin/env bash
# Mutation testing with cargo-mutants (`cargo install cargo-mutants --locked`) on the code
# that decides verdicts and shapes. Not part of .ci/run: a sitting takes from minutes to
# an hour. Results go to target/mutants-<set>/ (outcomes.json, caught.txt, missed.txt,
# unviable.txt); write the counts into ci/mutants.md.
#
#   ci/mutants.sh judge            every mutant of the judge and the diagnosis code
#   ci/mutants.sh sample K         shard K/20 (round-robin) of the core modules
#   ci/mutants.sh diff [BASE]      the mutants in lines changed since BASE (default main)
#   ci/mutants.sh semantics FILE.. the cache-semantics code (ring, merge, cache file,
#                                  divergence, batching), judged by the tests that
#                                  exercise it (unit tests, properties, snapshots)
#
# Mutants are built in place (`--in-place`: the warm target/ is reused; the tree is
# restored after each mutant) and judged by `cargo test --lib --test it` over the unit
# tests and the integration-test modules that exercise these modules (AREAS below: a
# libtest name filter; set MUTANTS_TESTS=all for every test).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null 2>&1 || {
    echo "ci/mutants.sh: cargo-mutants is not installed: cargo install cargo-mutants --locked" >&2
    exit 2
}
# The integration tests are one binary, `tests/it/` (a module per area). Its modules are
# chosen by libtest name filters, which apply to the unit tests too: `tests::` keeps
# every unit test (they all live in `mod tests`) and matches no `it` module.
AREAS=(engine_diagnoses:: stack:: cli:: repro:: generate:: train:: reference_math::
       fingerprint:: engine_matrix:: bad_inputs:: kernels:: quantized:: snapshots::
       properties::hostile::)
tests() { TESTS=(--lib --test it -- tests:: "$@"); }
tests "${AREAS[@]}"
mkdir -p target
common=(--in-place --no-shuffle --timeout-multiplier 3 --baseline skip)
run() {
    local out="$1"; shift
    if [ "${MUTANTS_TESTS:-}" = all ]; then TESTS=(); fi
    cargo mutants "${common[@]}" --output "target/$out" "$@" -- "${TESTS[@]}" || true
    local m="target/$out/mutants.out"
    for k in caught missed unviable timeout; do
        printf '%-9s %s\n' "$k" "$( [ -f "$m/$k.txt" ] && wc -l < "$m/$k.txt" || echo 0)"
    done
}
case "${1:-}" in
    semantics)
        shift
        files=("$@")
        [ ${#files[@]} -gt 0 ] || files=(src/engine/cache/ring.rs src/engine/cache/merge.rs src/engine/cache/file/mod.rs
                                         src/engine/divergence.rs src/engine/batching.rs)
        args=()
        for f in "${files[@]}"; do args+=(-f "$f"); done
        tests properties:: snapshots:: quantized::
        run mutants-semantics "${args[@]}"
        ;;
    judge)
        # The diagnosis classes and places, the stack's verdict and expectations.
        run mutants-judge -f src/engine/diagnosis.rs -f src/harness/stack/verdict.rs -f src/harness/stack/expect.rs
        # The judge itself lives in run.rs: only its functions.
        run mutants-judge-run -f src/harness/run.rs --re 'judge|extra_checks'
        ;;
    sample)
        k="${2:?usage: ci/mutants.sh sample K (1..20)}"
        run "mutants-sample-$k" --shard "$((k - 1))/20" --sharding round-robin \
            -f src/harness/scenario/mod.rs -f src/harness/scenario/schema.rs -f src/harness/scenario/matrix.rs -f src/harness/scenario/validate.rs -f src/harness/scenario/paths.rs -f src/harness/scenario/errors.rs -f src/engine/diagnosis.rs -f src/engine/cache/mod.rs -f src/engine/cache/update.rs -f src/engine/cache/ring.rs -f src/engine/cache/file/mod.rs -f src/engine/cache/merge.rs -f src/engine/divergence.rs -f src/engine/prefix.rs \
            -f src/engine/generate/mod.rs -f src/engine/generate/choose.rs -f src/engine/generate/prefill.rs -f src/engine/train/mod.rs -f src/engine/train/batch.rs -f src/engine/train/checks.rs -f src/harness/fingerprint/mod.rs -f src/harness/fingerprint/compare.rs \
            -f src/engine/model/attention.rs -f src/harness/run.rs -f src/harness/stack/verdict.rs
        ;;
    diff)
        base="${2:-main}"
        git diff "$base" > target/mutants.diff
        run mutants-diff --in-diff target/mutants.diff
        ;;
    *)
        sed -n '2,18p' "$0" >&2
        exit 2
        ;;
esac
