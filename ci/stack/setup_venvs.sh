#!/usr/bin/env bash
# Builds the two Python stacks the stack driver (src/harness/stack/driver.py) is tested on:
#   VENVS/cur   from ci/stack/requirements-current.txt  (transformers 5.x, PEFT 0.21)
#   VENVS/2192  from ci/stack/requirements-2192.txt     (transformers 4.46, PEFT 0.12)
# VENVS is $1, else $STACK_VENVS, else ~/.cache/prefix-harness/venvs.
# Idempotent: a venv whose requirement file has not changed (sha256 recorded in
# VENV/.requirements.sha256 after a successful install) is kept as is.
# Interpreter: $PYTHON (default python3.11 if present, else python3).
# Exits non-zero with a message when a venv cannot be built. Prints the interpreters.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${1:-${STACK_VENVS:-$HOME/.cache/prefix-harness/venvs}}"
py="${PYTHON:-}"
if [ -z "$py" ]; then
    if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
fi
command -v "$py" >/dev/null 2>&1 || { echo "setup_venvs: no Python interpreter '$py' found" >&2; exit 1; }
mkdir -p "$root"

build() {
    local name="$1" req="$here/$2" dir="$root/$1"
    local want stamp="$dir/.requirements.sha256"
    want="$(sha256sum "$req" | cut -d' ' -f1)"
    if [ -x "$dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        echo "setup_venvs: $name is up to date ($dir)" >&2
        return 0
    fi
    echo "setup_venvs: building $name from $(basename "$req") in $dir" >&2
    rm -rf "$dir"
    if ! "$py" -m venv "$dir"; then
        echo "setup_venvs: ERROR: cannot create the venv $dir with $py (python3-venv missing?)" >&2
        return 1
    fi
    if ! "$dir/bin/python" -m pip install --quiet -r "$req"; then
        echo "setup_venvs: ERROR: pip could not install $(basename "$req") into $dir" >&2
        return 1
    fi
    if ! "$dir/bin/python" -c "import torch, transformers, peft, safetensors" ; then
        echo "setup_venvs: ERROR: $name installed but torch/transformers/peft/safetensors do not import" >&2
        return 1
    fi
    echo "$want" > "$stamp"
}

status=0
build cur requirements-current.txt || status=1
build 2192 requirements-2192.txt || status=1
if [ "$status" -ne 0 ]; then
    echo "setup_venvs: FAILED: at least one stack could not be built (see above)" >&2
    exit 1
fi
echo "$root/cur/bin/python"
echo "$root/2192/bin/python"
