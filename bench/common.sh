# Shared by bench/compare.sh and bench/compare-prefill.sh, which source it (after `set -euo pipefail`,
# before their `cd "$root"`): the repository root, argument checks, and finding both sides (the PyTorch
# venv and the tokenfold binary). Each check exits as the scripts always have: 2 for a bad argument, 1 for
# a missing tool.

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# caller_path VAR TEST: paths given relative to where the script was called from keep working after the
# cd to the root: VAR becomes absolute when, from the caller's folder, it names something `test TEST` accepts.
caller_path() {
    local value="${!1}"
    if [[ -n "$value" && "$value" != /* && "$PWD" != "$root" ]] && test "$2" "$value"; then
        printf -v "$1" '%s' "$PWD/$value"
    fi
}

# tokenfold_from_env: a TOKENFOLD (a name on PATH or a path from the caller's folder) as an absolute
# $tokenfold; call it before the cd. Without TOKENFOLD, find_sides picks the default later.
tokenfold_from_env() {
    if [[ -n "${TOKENFOLD:-}" ]]; then
        if ! tokenfold="$(command -v "$TOKENFOLD")"; then
            echo "error: TOKENFOLD=$TOKENFOLD is not an executable" >&2
            exit 1
        fi
        [[ "$tokenfold" == /* ]] || tokenfold="$PWD/$tokenfold"
    fi
}

# require_positive NAME VALUE
require_positive() {
    if ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: $1 must be a positive integer, got '$2'" >&2
        exit 2
    fi
}

# require_path TEST WHAT PATH: PATH (relative to the root, where the scripts run) must pass `test TEST`.
require_path() {
    if ! test "$1" "$3"; then
        echo "error: no $2 at $3 (paths are relative to $root)" >&2
        exit 2
    fi
}

# find_sides: $python, the venv's interpreter (with torch), and $tokenfold, from TOKENFOLD
# (tokenfold_from_env) or target/release/tokenfold, built if missing. Check the PyTorch side first: it is
# the part most likely missing, and it is cheap to check.
find_sides() {
    python="$root/bench/reference/.venv/bin/python"
    if [[ ! -x "$python" ]] || ! "$python" -c 'import torch' 2>/dev/null; then
        echo "error: no PyTorch in bench/reference/.venv: run bench/reference/setup.sh first" >&2
        exit 1
    fi

    if [[ -z "${TOKENFOLD:-}" ]]; then
        tokenfold="$root/target/release/tokenfold"
        if [[ ! -x "$tokenfold" ]]; then
            echo "building tokenfold (release)..." >&2
            cargo build --release -p tokenfold-cli
        fi
    fi
    if [[ ! -x "$tokenfold" ]]; then
        echo "error: $tokenfold is not an executable" >&2
        exit 1
    fi
}

# set_threads_args: $threads_args, the reference scripts' --threads from THREADS; none without it (the
# reference then takes the tokenfold report's).
set_threads_args() {
    threads_args=()
    if [[ -n "${THREADS:-}" ]]; then
        threads_args=(--threads "$THREADS")
    fi
}

# compare_reports TOKENFOLD_JSON PYTORCH_JSON [more pairs, one per round] OUT_JSON <<'EOF' ... EOF: runs the
# Python program on stdin with those arguments and bench/reference/common.py importable. Ratio arithmetic in Python (the venv
# is there anyway); bash has no floating point.
compare_reports() {
    PYTHONPATH="$root/bench/reference${PYTHONPATH:+:$PYTHONPATH}" "$python" - "$@"
}
