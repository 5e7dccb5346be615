#!/usr/bin/env bash
# tokenfold against a PyTorch reference on the same prefills (issue 7).
#
#   bench/compare-prefill.sh [model] [plan]        (defaults: reference/nmm-s, no plan)
#
# 1. `tokenfold bench prefill` times the model's prefill (forward pass filling a KV cache, logits at each
#    sample's last prompt token) at batch 1 and 16 and writes results/bench-prefill.json, which also
#    records each batch's prompt lengths and image spans; with a plan, it also times the reduced prefill;
# 2. bench/reference/prefill.py rebuilds the same model in PyTorch and times full prefills of the same
#    layouts (results/bench-prefill-torch.json);
# 3. prints tokenfold / PyTorch full-prefill time per batch size (> 1 means tokenfold is slower), and
#    writes results/bench-compare-prefill.json.
#
# Runs from the repository root (the data folder defaults to ./data; paths are relative to the root).
# Environment: TOKENFOLD = the tokenfold binary [default: target/release/tokenfold, built if missing];
# REPEATS = timed prefills per measurement, fastest reported [default: 10]; THREADS = PyTorch threads
# [default: the tokenfold report's]. Run nothing else heavy meanwhile (a build skews both sides).
set -euo pipefail
# shellcheck source=bench/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

model="${1:-reference/nmm-s}"
plan="${2:-}"
caller_path model -e
caller_path plan -f
tokenfold_from_env
cd "$root"

repeats="${REPEATS:-10}"
require_positive REPEATS "$repeats"
if [[ -n "${THREADS:-}" ]]; then
    require_positive THREADS "$THREADS"
fi
require_path -d "model directory" "$model"
if [[ -n "$plan" ]]; then
    require_path -f plan "$plan"
fi

find_sides

mkdir -p results
rust_json=results/bench-prefill.json
torch_json=results/bench-prefill-torch.json
compare_json=results/bench-compare-prefill.json

plan_args=()
if [[ -n "$plan" ]]; then
    plan_args=(--plan "$plan")
fi
echo "== tokenfold: $tokenfold bench prefill --model $model${plan:+ --plan $plan} --repeats $repeats"
"$tokenfold" bench prefill --model "$model" ${plan_args[@]+"${plan_args[@]}"} --repeats "$repeats" \
    --out "$rust_json"

echo
echo "== PyTorch reference"
set_threads_args
"$python" bench/reference/prefill.py --report "$rust_json" --repeats "$repeats" --out "$torch_json" \
    ${threads_args[@]+"${threads_args[@]}"}

echo
echo "== tokenfold / PyTorch (full prefill)"
compare_reports "$rust_json" "$torch_json" "$compare_json" <<'EOF'
import sys

from common import fail, load_compared, write_json

rust_path, torch_path, out_path = sys.argv[1:4]
rust, torch_ = load_compared(rust_path, torch_path)
torch_rows = {row["batch"]: row for row in torch_["rows"]}
if sorted(torch_rows) != sorted(row["batch"] for row in rust["rows"]):
    fail("the two reports time different batch sizes")
plan = rust.get("plan") or {}
with_plan = bool(plan.get("stages"))

rows = []
for r in rust["rows"]:
    t = torch_rows[r["batch"]]
    row = {"batch": r["batch"], "tokenfold_ms": r["full_ms"], "pytorch_ms": t["full_ms"],
           "ratio": r["full_ms"] / t["full_ms"], "lengths": r["lengths"], "image_starts": r["image_starts"]}
    if with_plan:
        # For reference only: tokenfold with its reduction plan, against the full PyTorch prefill.
        row["tokenfold_plan_ms"] = r["plan_ms"]
        row["plan_ratio"] = r["plan_ms"] / t["full_ms"]
    rows.append(row)

header = "| batch | tokenfold ms | PyTorch ms | tokenfold / PyTorch |"
rule = "|---:|---:|---:|---:|"
if with_plan:
    header += f" tokenfold ms, plan '{plan.get('name')}' | plan / PyTorch |"
    rule += "---:|---:|"
print(header + "\n" + rule)
for row in rows:
    line = f"| {row['batch']} | {row['tokenfold_ms']:.2f} | {row['pytorch_ms']:.2f} | {row['ratio']:.2f} |"
    if with_plan:
        line += f" {row['tokenfold_plan_ms']:.2f} | {row['plan_ratio']:.2f} |"
    print(line)
print("\nFull prefill on both sides; a ratio > 1 means tokenfold is slower.")
if with_plan:
    print("The plan columns set tokenfold's reduced prefill against PyTorch's full one (no plan there).")

result = {
    "model": rust.get("model"),
    "config": rust.get("config"),
    "plan": rust.get("plan"),
    "git_revision": rust.get("git_revision"),
    "torch_version": torch_.get("torch_version"),
    "threads": {"tokenfold": rust["threads"], "pytorch": torch_["threads"]},
    "parameters": rust["parameters"],
    "repeats": {"tokenfold": rust.get("repeats"), "pytorch": torch_.get("repeats")},
    "rows": rows,
    "reports": {"tokenfold": rust_path, "pytorch": torch_path},
}
write_json(out_path, result)
EOF
