#!/usr/bin/env python3
"""Start-up time of the CLI, side by side with a bare interpreter, `import numpy` and `import torch`.

Prints, over several runs each, the median wall time, the median CPU time of the child (user+sys:
steadier than wall time on a busy machine) and the wall time's ratio to a bare `python -c pass`,
so the figures are comparable across machines. `create tiny pair` is a whole `sftdiff create` of
two 2-tensor checkpoints: start-up and every import of create's path, with next to no work.

The `sftdiff` children run with their bytecode cached, as an installed package's is (bench_apply.py's
`cached_bytecode_env`: PYTHONDONTWRITEBYTECODE dropped, bytecode in a temporary PYTHONPYCACHEPREFIX;
every command has one untimed run first); `--as-is` keeps this environment's setting instead (with
PYTHONDONTWRITEBYTECODE=1 every sftdiff module is compiled again on each run). The other rows run
as they are: their packages' bytecode was written at install.

Usage: python tools/bench_startup.py [--runs 15] [--as-is]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_models import cached_bytecode_env


def run_once(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (the child's user+sys) of one run of `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def medians(cmd: list[str], runs: int, env: dict[str, str]) -> tuple[float, float]:
    run_once(cmd, env)  # untimed: fills the bytecode cache (and the page cache)
    samples = [run_once(cmd, env) for _ in range(runs)]
    return statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples)


def write_pair(root: Path) -> tuple[Path, Path]:
    """A tiny base and fine-tune checkpoint folder (two float32 tensors each)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base = {"encoder.weight": rng.standard_normal((64, 32)).astype(np.float32),
            "encoder.bias": rng.standard_normal(32).astype(np.float32)}
    ft = {n: v + rng.standard_normal(v.shape).astype(np.float32) * np.float32(0.01) for n, v in base.items()}
    for name, tensors in (("base", base), ("ft", ft)):
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps({"model_type": "bert"}), encoding="utf-8")
    return root / "base", root / "ft"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--as-is", action="store_true",
                    help="keep this environment's PYTHONDONTWRITEBYTECODE instead of caching bytecode")
    args = ap.parse_args()
    from sftdiff.diff import SparseDiff, SparseEntry

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain = dict(os.environ)
        env = plain if args.as_is else cached_bytecode_env(root)
        path = root / "small.sft"
        rng = np.random.default_rng(0)
        entries = {f"encoder.layer.{i}.weight": SparseEntry.from_float(
            (384, 384), np.sort(rng.choice(384 * 384, 1500, replace=False)), rng.standard_normal(1500))
            for i in range(12)}
        SparseDiff(entries).save(path)
        base, ft = write_pair(root)
        py = sys.executable
        sftdiff = [py, "-m", "sftdiff"]
        cases = [
            ("python -c pass", [py, "-c", "pass"], plain),
            ("sftdiff --help", [*sftdiff, "--help"], env),
            ("sftdiff create --help", [*sftdiff, "create", "--help"], env),
            ("sftdiff create tiny pair", [*sftdiff, "create", str(base), str(ft), "--density", "0.1", "--force",
                                          "--output", str(root / "tiny.sft")], env),
            ("sftdiff inspect small.sft", [*sftdiff, "inspect", str(path)], env),
            ("sftdiff inspect --json small.sft", [*sftdiff, "inspect", "--json", str(path)], env),
            ("python -c 'import numpy'", [py, "-c", "import numpy"], plain),
            ("python -c 'import torch'", [py, "-c", "import torch"], plain),
        ]
        results = [(name, *medians(cmd, args.runs, case_env)) for name, cmd, case_env in cases]
    floor = results[0][1]
    bytecode = "as this environment has it" if args.as_is else "cached"
    print(f"{'command':36} {'wall s':>7} {'CPU s':>7} {'wall x bare python':>19}   "
          f"(medians of {args.runs} runs; bytecode {bytecode})")
    for name, wall, cpu in results:
        print(f"{name:36} {wall:7.3f} {cpu:7.3f} {wall / floor:19.1f}")


if __name__ == "__main__":
    main()
