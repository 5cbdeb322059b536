#!/usr/bin/env bash
# Compare the fingerprints of every OS with the reference OS, shard by shard.
#
#   ci/github/compare.sh BIN DIR [REFERENCE [OTHER...]]
#
# DIR holds one folder per artifact, `fingerprint-<OS>-<SHARD>/fingerprint.json`
# (what actions/download-artifact writes). REFERENCE defaults to Linux, OTHER to every
# other OS found. Prints each comparison (and appends it to $GITHUB_STEP_SUMMARY when
# set); exits 0 when all are equivalent, 1 when one differs or a file is missing.
set -uo pipefail

bin=${1:?usage: compare.sh BIN DIR [REFERENCE [OTHER...]]}
dir=${2:?dir}
ref=${3:-Linux}
shift $(( $# < 3 ? $# : 3 ))
others=("$@")
if [ ${#others[@]} -eq 0 ]; then
    for d in "$dir"/fingerprint-*-*; do
        name=${d##*/fingerprint-}
        os=${name%-*}
        [ "$os" = "$ref" ] && continue
        case " ${others[*]:-} " in
            *" $os "*) ;;
            *) others+=("$os") ;;
        esac
    done
fi

rc=0
found=0
for refdir in "$dir"/fingerprint-"$ref"-*; do
    [ -f "$refdir/fingerprint.json" ] || continue
    found=1
    shard=${refdir##*-}
    for os in "${others[@]}"; do
        other="$dir/fingerprint-$os-$shard/fingerprint.json"
        title="shard $shard: $ref vs $os"
        echo "=== $title"
        if [ ! -f "$other" ]; then
            echo "missing: $other (did the $os job run?)"
            rc=1
            continue
        fi
        text=$("$bin" compare "$refdir/fingerprint.json" "$other")
        code=$?
        echo "$text"
        if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
            # shellcheck disable=SC2016 # the backticks are Markdown, not a command
            printf '### %s\n\n```\n%s\n```\n\n' "$title" "$text" >> "$GITHUB_STEP_SUMMARY"
        fi
        [ "$code" -eq 0 ] || rc=1
    done
done
if [ "$found" -eq 0 ]; then
    echo "no $ref fingerprints under $dir" >&2
    exit 1
fi
exit "$rc"
