#!/usr/bin/env python3
"""PyTorch reference for `tokenfold bench train` (issue 7).

Reads the JSON report that `tokenfold bench train --out` writes, rebuilds the same model in plain eager
PyTorch and times the same training steps (forward/loss, backward, gradient clipping + AdamW) on inputs of
exactly the shapes the Rust command timed. The point is a fair yardstick: "how fast would a competent
PyTorch user's version of this step run on this machine", so the model is written the way such a user
would write it (nn.Module, nn.Linear, nn.RMSNorm, F.scaled_dot_product_attention, torch.optim.AdamW),
not hand-tuned.

The model (model.py, shared with prefill.py; its docstring describes the architecture) and the optimizer
mirror crates/tokenfold-model/src/model.rs, ops.rs and optim.rs. On top of model.py's layers:

- final RMSNorm applied to the rows j-1 of each target token j only, cross entropy per row, mean per
  sample over its targets, mean over samples;
- AdamW (decoupled decay on parameters of rank >= 2 only), global-norm clipping.

Token values do not change the work, so token ids and patches are random; the loss is therefore only a
wiring check (about ln(vocab_size) at initialisation), not comparable with the Rust loss on real data.

Usage: train_step.py --report results/bench-train.json [--threads N] [--out results/bench-train-torch.json]
                     [--compile no|yes] [--warmup N] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn as nn

# common.py and model.py sit next to this script (the script's folder is on sys.path when it is run).
from common import fail, read_json, write_json
from model import build_model, check_config, init_torch, random_batch


# ---------------------------------------------------------------------------------------------------------
# Inputs, optimizer, timing
# ---------------------------------------------------------------------------------------------------------


def make_batch(step: dict, cfg: dict, generator: torch.Generator) -> dict:
    """Random inputs with exactly the layout of one step of the Rust report. Built before timing starts,
    as the Rust command draws its batches before timing."""
    lengths = step["lengths"]
    b, t = len(lengths), step["seq_len"]
    n_patches, patch_dim = step["n_patches"], step["patch_dim"]
    if n_patches != cfg["image_grid"] ** 2 or patch_dim != cfg["patch_dim"]:
        fail(f"step has {n_patches} patches of {patch_dim} values; the model expects "
             f"{cfg['image_grid'] ** 2} of {cfg['patch_dim']}")
    starts = [-1 if s is None else s for s in step["image_starts"]]
    for s, start in enumerate(starts):
        if start >= 0 and start + n_patches > t:
            fail(f"sample {s}: image span {start}..{start + n_patches} exceeds seq_len {t}")
    batch = random_batch(cfg, lengths, starts, t, generator)
    rows, row_sample, row_weight = [], [], []
    for s, targets in enumerate(step["targets"]):
        for j in targets:
            if not 1 <= j < t:
                fail(f"sample {s}: target position {j} outside 1..{t}")
            rows.append(s * t + j - 1)
            row_sample.append(s)
            row_weight.append(1.0 / len(targets))
    if not rows:
        fail("a step of the report has no target tokens")
    flat = batch["tokens"].reshape(-1)
    return {
        **batch,
        "rows": torch.tensor(rows),
        "target_ids": flat[torch.tensor(rows) + 1],  # the token at position j of row j-1
        "row_sample": torch.tensor(row_sample),
        "row_weight": torch.tensor(row_weight),
        "real_tokens": sum(lengths),
        "padded_tokens": b * t,
    }


def make_optimizer(model: nn.Module, report: dict) -> torch.optim.Optimizer:
    """AdamW with decoupled decay on matrices only, as optim.rs (`var.rank() >= 2`): embeddings, projections
    and 2-D positions decay; RMSNorm gains and the patch bias do not. torch's AdamW update
    (p *= 1 - lr wd; p -= lr m_hat / (sqrt(v_hat) + eps)) is the same arithmetic as optim.rs."""
    adamw = report["adamw"]
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": adamw["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=report["learning_rate"],
        betas=(adamw["beta1"], adamw["beta2"]),
        eps=adamw["eps"],
    )


def train_step(loss_fn, model, optimizer, batch, grad_clip) -> dict:
    """One timed step, split into the same three phases as bench_train.rs."""
    started = time.perf_counter()
    loss = loss_fn(batch)
    loss_value = loss.item()  # the Rust forward phase also reads the loss back (to_scalar)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6) when norm > max_norm: the rule of optim.rs.
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    # Part of a PyTorch step (candle hands back fresh gradients each backward, so Rust has no equivalent).
    optimizer.zero_grad(set_to_none=True)
    done = time.perf_counter()
    return {
        "forward_ms": 1e3 * (forward - started),
        "backward_ms": 1e3 * (backward - forward),
        "optimizer_ms": 1e3 * (done - backward),
        "step_ms": 1e3 * (done - started),
        "loss": loss_value,
    }


def gemm_peak() -> list[dict]:
    """Square f32 matmuls, each size repeated for 0.5 s; FLOP/s of the fastest call (as gemm_peak in
    bench_train.rs), so each implementation's utilisation is measured against its own GEMM."""
    rows = []
    for n in (128, 256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # first call: allocation and thread-pool start-up, not timed
        best = math.inf
        started = time.perf_counter()
        while time.perf_counter() - started < 0.5:
            call = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - call)
        rows.append({"n": n, "flops_per_s": 2.0 * n**3 / best})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", required=True, help="JSON written by `tokenfold bench train --out`")
    parser.add_argument("--threads", type=int, help="intra-op threads [default: the report's threads]")
    parser.add_argument("--out", help="write the PyTorch figures as JSON here")
    parser.add_argument("--compile", choices=("no", "yes"), default="no",
                        help="torch.compile the loss (dynamic shapes); default plain eager")
    parser.add_argument("--warmup", type=int,
                        help="untimed steps first, on the report's first shapes [default: the report's warmup]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    report = read_json(args.report)
    cfg = report["model"]
    check_config(cfg)
    steps = report["steps"]
    if not steps:
        fail(f"{args.report} holds no timed steps")
    threads = args.threads or report["threads"]
    generator = init_torch(threads, args.seed)

    model, n_params = build_model(cfg, report["parameters"])
    optimizer = make_optimizer(model, report)
    loss_fn = torch.compile(model, dynamic=True) if args.compile == "yes" else model

    # The Rust command also warms up on batches it does not time; here on the report's first shapes
    # (at least one step, so that lazy AdamW state allocation is never timed), which also runs the same
    # number of updates before the first timed step.
    warmup = report.get("warmup", 2) if args.warmup is None else args.warmup
    warm_steps = [steps[i % len(steps)] for i in range(max(warmup, 1))]
    batches = [make_batch(s, cfg, generator) for s in steps]
    warm_batches = [make_batch(s, cfg, generator) for s in warm_steps]

    print(f"{args.report}: d_model {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, "
          f"d_ff {cfg['d_ff']}, batch {len(steps[0]['lengths'])}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, compile {args.compile}\n")

    gemm = gemm_peak()
    peak = max(g["flops_per_s"] for g in gemm)
    print("GEMM microbenchmark (square f32 matmul, best of repeated calls)\n")
    print("| n | GFLOP/s |\n|---:|---:|")
    for g in gemm:
        print(f"| {g['n']} | {g['flops_per_s'] / 1e9:.1f} |")

    init_loss = None
    for batch in warm_batches:
        result = train_step(loss_fn, model, optimizer, batch, report["grad_clip"])
        init_loss = result["loss"] if init_loss is None else init_loss
    timed = []
    for batch in batches:
        timed.append(train_step(loss_fn, model, optimizer, batch, report["grad_clip"]))

    total_s = sum(s["step_ms"] for s in timed) / 1e3
    tokens = sum(b["real_tokens"] for b in batches)
    padded = sum(b["padded_tokens"] for b in batches)
    median_ms = {phase: statistics.median(s[f"{phase}_ms"] for s in timed)
                 for phase in ("forward", "backward", "optimizer", "step")}
    tokens_per_s = tokens / total_s
    # Utilisation from the Rust report's FLOP counts (same batch shapes), against torch's own GEMM peak.
    mfu = hfu = None
    if "model_flops_per_step" in report:
        mfu = report["model_flops_per_step"] * len(timed) / total_s / peak
        hfu = report["executed_flops_per_step"] * len(timed) / total_s / peak

    print(f"\n{len(timed)} timed steps after {len(warm_batches)} warm-up steps (median per step)\n")
    print("| forward ms | backward ms | optimizer ms | step ms | tokens/s | padding | MFU | HFU |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|")
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    print(f"| {median_ms['forward']:.1f} | {median_ms['backward']:.1f} | {median_ms['optimizer']:.1f} | "
          f"{median_ms['step']:.1f} | {tokens_per_s:.0f} | {100 * (1 - tokens / padded):.1f}% | "
          f"{pct(mfu)} | {pct(hfu)} |")

    # Wiring check: with std-0.02 embeddings and unit-RMS normed rows, logits are ~N(0, 0.3²) at init, so
    # the first loss must sit just above ln(vocab). The Rust loss is on real data after its warm-up
    # updates, so the two are not expected to match; both should be near (Rust below) ln(vocab).
    ln_vocab = math.log(cfg["vocab_size"])
    rust_first = steps[0].get("loss")
    print(f"\nfirst-step loss: PyTorch {init_loss:.3f} at init (random tokens), {timed[0]['loss']:.3f} at "
          f"the first timed step; tokenfold {rust_first if rust_first is None else f'{rust_first:.3f}'} "
          f"at its first timed step (real data, after {report.get('warmup', '?')} warm-up updates); "
          f"ln(vocab_size) = {ln_vocab:.3f}")
    if not abs(init_loss - ln_vocab) < 0.5:
        print("warning: the initial PyTorch loss is far from ln(vocab_size): check the model wiring",
              file=sys.stderr)

    result = {
        "command": "bench train (PyTorch reference)",
        "report": args.report,
        "torch_version": torch.__version__,
        "compile": args.compile == "yes",
        "threads": torch.get_num_threads(),
        "model": cfg,
        "parameters": n_params,
        "gemm": gemm,
        "peak_flops_per_s": peak,
        "warmup": len(warm_batches),
        "median_ms": median_ms,
        "tokens_per_s": tokens_per_s,
        "padded_tokens_per_s": padded / total_s,
        "mfu": mfu,
        "hfu": hfu,
        "initial_loss": init_loss,
        "steps": timed,
        "learning_rate": report["learning_rate"],
        "grad_clip": report["grad_clip"],
        "adamw": report["adamw"],
        "optimizer": {k: optimizer.defaults.get(k) for k in ("foreach", "fused")},
    }
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
