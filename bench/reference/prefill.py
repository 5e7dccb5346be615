#!/usr/bin/env python3
"""PyTorch reference for `tokenfold bench prefill` (issue 7).

Reads the JSON report that `tokenfold bench prefill --out` writes, rebuilds the same model (model.py, the
model train_step.py times) from the report's "config" in plain eager PyTorch, and times a prefill for
each row of the report on inputs of exactly that row's layout: the same batch size, the same per-sample
prompt lengths (right-padded to the longest) and the same image spans. Token ids and patches are random
(values do not change the work); the weights are random too, which times the same as trained ones.

A prefill is what model.rs `prefill` computes with no reduction plan: the embedding (tokens, and patch
projection + 2-D positions over each image span), every layer keeping each layer's rotated keys and values
(the KV cache, returned to the caller), the attention mask built from the layout (causal except
bidirectional inside an image, padding keys masked), then the final RMSNorm and the tied head at each
sample's last real token only: logits (b, vocab). It runs after model.eval() under torch.inference_mode(),
as a PyTorch user would serve it. Like tokenfold, each row is timed as the fastest of `repeats` calls after
one untimed call, with the inputs built before timing.

Usage: prefill.py --report results/bench-prefill.json [--threads N] [--repeats R]
                  [--out results/bench-prefill-torch.json] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

# common.py and model.py sit next to this script (the script's folder is on sys.path when it is run).
from common import fail, read_json, write_json
from model import NativeModel, build_model, check_config, init_torch, random_batch


def make_prefill_batch(row: dict, cfg: dict, generator: torch.Generator) -> dict:
    """Random prompts with exactly the layout of one row of the Rust report: as eval.rs `prompt_inputs`
    builds them, right-padded to the longest prompt, zero patches for a sample without an image."""
    lengths = row["lengths"]
    starts = [-1 if s is None else s for s in row["image_starts"]]
    b = len(lengths)
    if b == 0 or len(starts) != b or row.get("batch", b) != b:
        fail(f"row of batch {row.get('batch')} has {b} lengths and {len(starts)} image starts")
    if min(lengths) < 1:
        fail(f"row of batch {b}: a prompt is empty")
    t = max(lengths)
    if t > cfg["max_positions"]:
        fail(f"row of batch {b}: prompt of {t} tokens exceeds model.max_positions {cfg['max_positions']}")
    n_patches = cfg["image_grid"] ** 2
    for s, start in enumerate(starts):
        if start >= 0 and start + n_patches > lengths[s]:
            fail(f"row of batch {b}, sample {s}: image span {start}..{start + n_patches} exceeds its "
                 f"{lengths[s]} tokens")
    return {
        **random_batch(cfg, lengths, starts, t, generator),
        # The last real token of each sample (positions are sequence indices), flat in (b * t).
        "rows": torch.tensor([s * t + n - 1 for s, n in enumerate(lengths)]),
        "seq_len": t,
        "real_tokens": sum(lengths),
    }


def time_prefill(model: NativeModel, batch: dict, repeats: int) -> float:
    """Fastest of `repeats` prefills after one untimed one, in ms (the rule of report.rs
    `measure_latency`). The result (logits and cache) is dropped inside the timed call, as the Rust
    closure drops its KvCache."""
    logits, cache = model.prefill(batch)  # warm-up, and a shape check outside the timed calls
    b, t = batch["tokens"].shape
    cfg = model.cfg
    if logits.shape != (b, cfg["vocab_size"]) or not torch.isfinite(logits).all():
        fail(f"prefill gave logits of shape {tuple(logits.shape)} (or non-finite values)")
    head_dim = cfg["d_model"] // cfg["n_heads"]
    if len(cache) != cfg["n_layers"] or any(k.shape != (b, cfg["n_heads"], t, head_dim) or k.shape != v.shape
                                            for k, v in cache):
        fail("prefill did not return one (k, v) pair of shape (b, heads, t, head_dim) per layer")
    del logits, cache
    best = math.inf
    for _ in range(max(repeats, 1)):
        started = time.perf_counter()
        model.prefill(batch)
        best = min(best, time.perf_counter() - started)
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", required=True, help="JSON written by `tokenfold bench prefill --out`")
    parser.add_argument("--threads", type=int, help="intra-op threads [default: the report's threads]")
    parser.add_argument("--repeats", type=int, help="timed prefills per row [default: the report's repeats]")
    parser.add_argument("--out", help="write the PyTorch figures as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    report = read_json(args.report)
    if report.get("command") != "bench prefill" or "config" not in report:
        fail(f"{args.report} is not a report of `tokenfold bench prefill`")
    cfg = report["config"]
    check_config(cfg)
    rows = report.get("rows") or fail(f"{args.report} holds no rows")
    threads = args.threads or report["threads"]
    repeats = args.repeats or report.get("repeats", 10)
    if threads < 1 or repeats < 1:
        fail("--threads and --repeats must be positive")
    generator = init_torch(threads, args.seed)

    model, n_params = build_model(cfg, report["parameters"])
    model.eval()
    batches = [make_prefill_batch(row, cfg, generator) for row in rows]

    print(f"{args.report}: d_model {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
          f"d_ff {cfg['d_ff']}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"fastest of {repeats} after one warm-up\n")
    print("| batch | padded length | prompt tokens | PyTorch ms |\n|---:|---:|---:|---:|")
    results = []
    with torch.inference_mode():
        for batch in batches:
            ms = time_prefill(model, batch, repeats)
            b = batch["tokens"].shape[0]
            print(f"| {b} | {batch['seq_len']} | {batch['real_tokens']} | {ms:.2f} |")
            results.append({"batch": b, "full_ms": ms, "seq_len": batch["seq_len"],
                            "prompt_tokens": batch["real_tokens"]})

    result = {
        "command": "bench prefill (PyTorch reference)",
        "report": args.report,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "repeats": repeats,
        "rows": results,
    }
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
