#!/usr/bin/env python3
"""Start-up time of the CLI, side by side with a bare interpreter and with `import torch`.

Prints median wall times over several runs and their ratio to a bare `python -c pass`, so the
figures are comparable across machines. Usage: python tools/bench_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def median_seconds(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    from sftdiff.diff import SparseDiff, SparseEntry

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small.sft"
        rng = np.random.default_rng(0)
        entries = {f"encoder.layer.{i}.weight": SparseEntry.from_float(
            (384, 384), np.sort(rng.choice(384 * 384, 1500, replace=False)), rng.standard_normal(1500))
            for i in range(12)}
        SparseDiff(entries).save(path)
        py = sys.executable
        cases = [
            ("python -c pass", [py, "-c", "pass"]),
            ("sftdiff --help", [py, "-m", "sftdiff", "--help"]),
            ("sftdiff inspect small.sft", [py, "-m", "sftdiff", "inspect", str(path)]),
            ("sftdiff inspect --json small.sft", [py, "-m", "sftdiff", "inspect", "--json", str(path)]),
            ("python -c 'import torch'", [py, "-c", "import torch"]),
        ]
        results = [(name, median_seconds(cmd, args.runs)) for name, cmd in cases]
    floor = results[0][1]
    print(f"{'command':36} {'median s':>9} {'x bare python':>14}   ({args.runs} runs each)")
    for name, seconds in results:
        print(f"{name:36} {seconds:9.3f} {seconds / floor:14.1f}")


if __name__ == "__main__":
    main()
