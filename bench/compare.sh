#!/usr/bin/env bash
# tokenfold against a PyTorch reference on the same training steps (issue 7).
#
#   bench/compare.sh [config] [steps]        (defaults: configs/bench.toml, 10 timed steps)
#
# 1. `tokenfold bench train` times real training steps and writes results/bench-train.json, which also
#    records the shape of every timed batch;
# 2. bench/reference/train_step.py rebuilds the same model in PyTorch and times the same shapes
#    (results/bench-train-torch.json);
# 3. prints tokenfold / PyTorch for each phase (time ratio: > 1 means tokenfold is slower) and for
#    tokens/s (< 1 means tokenfold is slower), and writes results/bench-compare.json.
#
# Runs from the repository root (the data folder defaults to ./data; paths are relative to the root).
# Environment: TOKENFOLD = the tokenfold binary [default: target/release/tokenfold, built if missing];
# WARMUP = untimed steps before the timed ones [default: 2]; THREADS = PyTorch threads [default: the
# tokenfold report's]. Run nothing else heavy meanwhile (a build skews both sides).
set -euo pipefail
# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

config="${1:-configs/bench.toml}"
caller_path config -f
tokenfold_from_env
cd "$root"

steps="${2:-10}"
warmup="${WARMUP:-2}"
require_positive steps "$steps"
if ! [[ "$warmup" =~ ^[0-9]+$ ]]; then
    echo "error: WARMUP must be a non-negative integer, got '$warmup'" >&2
    exit 2
fi
require_path -f configuration "$config"

find_sides

mkdir -p results
rust_json=results/bench-train.json
torch_json=results/bench-train-torch.json
compare_json=results/bench-compare.json

echo "== tokenfold: $tokenfold bench train --config $config --steps $steps --warmup $warmup"
"$tokenfold" bench train --config "$config" --steps "$steps" --warmup "$warmup" --out "$rust_json"

echo
echo "== PyTorch reference"
set_threads_args
"$python" bench/reference/train_step.py --report "$rust_json" --out "$torch_json" ${threads_args[@]+"${threads_args[@]}"}

echo
echo "== tokenfold / PyTorch"
compare_reports "$rust_json" "$torch_json" "$compare_json" <<'EOF'
import sys

from common import load_compared, write_json

rust_path, torch_path, out_path = sys.argv[1:4]
rust, torch_ = load_compared(rust_path, torch_path)

rows = []
for phase in ("forward", "backward", "optimizer", "step"):
    r, t = rust["median_ms"][phase], torch_["median_ms"][phase]
    rows.append((f"{phase} ms (median)", r, t, r / t))
r, t = rust["tokens_per_s"], torch_["tokens_per_s"]
rows.append(("tokens/s", r, t, r / t))
r, t = rust["peak_flops_per_s"], torch_["peak_flops_per_s"]
rows.append(("GEMM peak GFLOP/s", r / 1e9, t / 1e9, r / t))

print("| figure | tokenfold | PyTorch | tokenfold / PyTorch |\n|---|---:|---:|---:|")
for name, r, t, ratio in rows:
    print(f"| {name} | {r:.1f} | {t:.1f} | {ratio:.2f} |")
print("\nTime ratios > 1 mean tokenfold is slower; a tokens/s ratio < 1 means tokenfold is slower.")

result = {
    "config": rust.get("config"),
    "git_revision": rust.get("git_revision"),
    "torch_version": torch_.get("torch_version"),
    "threads": {"tokenfold": rust["threads"], "pytorch": torch_["threads"]},
    "parameters": rust["parameters"],
    "steps": len(rust["steps"]),
    "warmup": rust.get("warmup"),
    "median_ms": {"tokenfold": rust["median_ms"], "pytorch": torch_["median_ms"]},
    "time_ratio": {p: rust["median_ms"][p] / torch_["median_ms"][p]
                   for p in ("forward", "backward", "optimizer", "step")},
    "tokens_per_s": {"tokenfold": rust["tokens_per_s"], "pytorch": torch_["tokens_per_s"]},
    "tokens_per_s_ratio": rust["tokens_per_s"] / torch_["tokens_per_s"],
    "peak_flops_per_s": {"tokenfold": rust["peak_flops_per_s"], "pytorch": torch_["peak_flops_per_s"]},
    "mfu": {"tokenfold": rust.get("mfu"), "pytorch": torch_.get("mfu")},
    "reports": {"tokenfold": rust_path, "pytorch": torch_path},
}
write_json(out_path, result)
EOF
