"""Helpers shared by the benchmark references (train_step.py, prefill.py, and model.py for `fail`) and by
the comparison steps of bench/compare.sh and bench/compare-prefill.sh.

No torch here: the comparison steps only read and write JSON, and need not pay for importing it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import NoReturn


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)  # never leave a half-written report behind
    print(f"\nwrote {path}")


def load_compared(rust_path: str, torch_path: str) -> tuple[dict, dict]:
    """The tokenfold report and the PyTorch reference's, for a comparison: refused when their parameter
    counts differ (not the same model), with a note when they ran on different thread counts."""
    rust, torch_ = read_json(rust_path), read_json(torch_path)
    if rust["parameters"] != torch_["parameters"]:
        fail(f"parameter counts differ ({rust['parameters']} vs {torch_['parameters']})")
    if rust["threads"] != torch_["threads"]:
        print(f"note: tokenfold ran on {rust['threads']} threads, PyTorch on {torch_['threads']}")
    return rust, torch_
