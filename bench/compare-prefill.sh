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
# With RUNS=n, steps 1 and 2 alternate n times (tokenfold, then PyTorch) and step 3 prints each round's
# figures and the median ratio: a single ratio on a noisy machine can be off by ±30% or more, and
# alternating the sides spreads slow spells over both. Rounds 1..n-1 keep their reports as
# results/bench-prefill-<i>.json and results/bench-prefill-torch-<i>.json; the last round writes the
# un-suffixed names, so RUNS=1 (the default) behaves as before.
#
# Runs from the repository root (the data folder defaults to ./data; paths are relative to the root).
# Environment: TOKENFOLD = the tokenfold binary [default: target/release/tokenfold, built if missing];
# REPEATS = timed prefills per measurement, fastest reported [default: 10]; THREADS = PyTorch threads
# [default: the tokenfold report's]; RUNS = rounds of both sides [default: 1]. Run nothing else heavy meanwhile (a build skews both sides).
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
runs="${RUNS:-1}"
require_positive RUNS "$runs"
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
set_threads_args
reports=()  # tokenfold and PyTorch report of each round, in order, for the comparison
for ((round = 1; round <= runs; round++)); do
    suffix=""
    if ((round < runs)); then
        suffix="-$round"
    fi
    round_rust="${rust_json%.json}$suffix.json"
    round_torch="${torch_json%.json}$suffix.json"
    if ((runs > 1)); then
        echo "== round $round of $runs"
    fi
    echo "== tokenfold: $tokenfold bench prefill --model $model${plan:+ --plan $plan} --repeats $repeats"
    "$tokenfold" bench prefill --model "$model" ${plan_args[@]+"${plan_args[@]}"} --repeats "$repeats" \
        --out "$round_rust"

    echo
    echo "== PyTorch reference"
    "$python" bench/reference/prefill.py --report "$round_rust" --repeats "$repeats" --out "$round_torch" \
        ${threads_args[@]+"${threads_args[@]}"}
    echo
    reports+=("$round_rust" "$round_torch")
done

echo "== tokenfold / PyTorch (full prefill)"
compare_reports "${reports[@]}" "$compare_json" <<'EOF'
import sys
from statistics import median

from common import fail, load_compared, write_json

# Arguments: a tokenfold report and a PyTorch report per round, then the output path.
*paths, out_path = sys.argv[1:]
pairs = list(zip(paths[0::2], paths[1::2]))
rounds = [load_compared(rust_path, torch_path) for rust_path, torch_path in pairs]
rust, torch_ = rounds[-1]  # the last round's reports describe the run (model, threads, revision)
plan = rust.get("plan") or {}
with_plan = bool(plan.get("stages"))

# Per batch size, each round's figures; every round must have timed the same layouts, or the median
# would mix different work.
rows = []
for r in rust["rows"]:
    figures = []
    for round_rust, round_torch in rounds:
        rr = {row["batch"]: row for row in round_rust["rows"]}.get(r["batch"])
        t = {row["batch"]: row for row in round_torch["rows"]}.get(r["batch"])
        if len(round_rust["rows"]) != len(rust["rows"]) or len(round_torch["rows"]) != len(rust["rows"]) \
                or rr is None or t is None:
            fail("the reports time different batch sizes")
        if (rr["lengths"], rr["image_starts"]) != (r["lengths"], r["image_starts"]):
            fail(f"the rounds time different prompt layouts at batch {r['batch']}")
        fig = {"tokenfold_ms": rr["full_ms"], "pytorch_ms": t["full_ms"], "ratio": rr["full_ms"] / t["full_ms"]}
        if with_plan:
            # For reference only: tokenfold with its reduction plan, against the full PyTorch prefill.
            fig["tokenfold_plan_ms"] = rr["plan_ms"]
            fig["plan_ratio"] = rr["plan_ms"] / t["full_ms"]
        figures.append(fig)
    # The medians; with one round, that round's figures, as the report always held ("ratio" is kept
    # for its readers and equals "median_ratio").
    row = {"batch": r["batch"], **{key: median(fig[key] for fig in figures) for key in figures[0]},
           "lengths": r["lengths"], "image_starts": r["image_starts"]}
    row["median_ratio"] = row["ratio"]
    row["rounds"] = figures
    rows.append(row)

several = len(rounds) > 1
header = "| batch |" + (" round |" if several else "") + " tokenfold ms | PyTorch ms | tokenfold / PyTorch |"
rule = "|---:|" + ("---:|" if several else "") + "---:|---:|---:|"
if with_plan:
    header += f" tokenfold ms, plan '{plan.get('name')}' | plan / PyTorch |"
    rule += "---:|---:|"
print(header + "\n" + rule)


def line(batch, label, fig):
    text = f"| {batch} |" + (f" {label} |" if several else "")
    text += f" {fig['tokenfold_ms']:.2f} | {fig['pytorch_ms']:.2f} | {fig['ratio']:.2f} |"
    if with_plan:
        text += f" {fig['tokenfold_plan_ms']:.2f} | {fig['plan_ratio']:.2f} |"
    return text


for row in rows:
    if several:
        for i, fig in enumerate(row["rounds"], 1):
            print(line(row["batch"], i, fig))
    print(line(row["batch"], "**median**", row))
print("\nFull prefill on both sides; a ratio > 1 means tokenfold is slower.")
if several:
    print(f"Median of {len(rounds)} rounds per column; the median ratio is that of the rounds' ratios, "
          "not the ratio of the median times.")
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
    "runs": len(rounds),
    "rows": rows,
    "reports": {"tokenfold": pairs[-1][0], "pytorch": pairs[-1][1]},
    "round_reports": [{"tokenfold": rust_path, "pytorch": torch_path} for rust_path, torch_path in pairs],
}
write_json(out_path, result)
EOF
