#!/usr/bin/env python3
"""The grid-search baseline for `tokenfold search`: hand-designed pruning over its own parameters.

A two-stage pruning plan (layer 0 keeps k0 tokens, a later layer l1 keeps as many as the budget allows) for
each ranking signal of the hand-designed methods (FastV/PDrop's last-token attention, SparseVLM's raters,
the summary token's attention, DART's duplication), every combination evaluated on the validation split,
the best then evaluated on the test split. It prints the number of evaluations, their wall time, and the
best plan's validation and test accuracy, so the search's cost can be set against it.

Usage: scripts/grid-baseline.py --model reference/nmm-s --budget 0.111 --out results/grid-11.1
         [--tasks locate,count] [-n 200] [--tokenfold target/release/tokenfold]

Only the standard library; it drives the tokenfold binary.
"""
import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time


def plan(signal, stages, name):
    return {
        "name": name,
        "proportional_attention": False,
        "stages": [
            {
                "layer": layer,
                "method": "unified",
                "keep": keep,
                "operator": {"signals": {signal: 1.0}, "source": "current" if layer == 0 else "previous"},
            }
            for layer, keep in stages
        ],
    }


def evaluate(args, path, split, n):
    out = path.replace(".json", f".{split}.json")
    subprocess.run(
        [args.tokenfold, "fold", "eval", "--model", args.model, "--plan", path, "--tasks", args.tasks,
         "--split", split, "-n", str(n), "--json", out],
        check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)["mean_accuracy"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default="locate,count")
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--test-n", type=int, default=500)
    p.add_argument("--tokenfold", default="target/release/tokenfold")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    L, n0 = args.layers, args.tokens
    limit = args.budget * L * n0  # token-layers the plan may use
    grid = []
    for signal in ["last", "raters", "summary", "duplication"]:
        top = min(n0 - 1, math.floor(limit))
        for k0 in sorted({round(2 + (top - 2) * i / 14) for i in range(15)}):
            for l1 in range(1, L):
                # Layers before l1 carry k0 tokens; the rest as many as fit.
                rest = (limit - l1 * k0) / (L - l1)
                k1 = min(k0 - 1, math.floor(rest + 1e-9))
                if k1 < 1:
                    continue
                grid.append((signal, [(0, k0 / n0), (l1, k1 / n0)], f"{signal}-{k0}-{l1}-{k1}"))
    started = time.time()
    results = []
    for signal, stages, name in grid:
        path = os.path.join(args.out, name + ".json")
        with open(path, "w") as f:
            json.dump(plan(signal, stages, name), f)
        acc = evaluate(args, path, "val", args.n)
        results.append((acc, name, path))
        print(f"{name}: val {100 * acc:.1f}%", file=sys.stderr)
    grid_s = time.time() - started
    results.sort(reverse=True)
    best_acc, best_name, best_path = results[0]
    test = evaluate(args, best_path, "test", args.test_n)
    summary = {
        "budget": args.budget, "evaluations": len(results), "grid_seconds": grid_s,
        "best": best_name, "best_val": best_acc, "best_test": test,
        "val_samples_per_task": args.n,
        "ranking": [{"plan": n, "val": a} for a, n, _ in results[:10]],
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
