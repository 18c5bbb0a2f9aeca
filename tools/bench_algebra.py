"""Benchmark: diff algebra on two 1%-dense diffs of a ~1.2B-parameter (Llama-3.2-1B-shaped) model.

Writes two synthetic diffs under /work/bench-tmp (not the repo), then times, median of --runs
runs with a warm page cache:
- read:     load both files and check all their data (what any operation must at least do)
- add:      add(A, B) computed entry by entry, results discarded (no output file)
- add+save: `sftdiff add` end to end: content fingerprints, compute, atomic write, re-check
- prune, subtract+save, overlap for comparison.

    python tools/bench_algebra.py [--density 0.01] [--runs 3] [--dir /work/bench-tmp]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sftdiff.algebra import add, prune, subtract
from sftdiff.diff import DiffMeta, SparseDiff, SparseEntry
from sftdiff.overlap import overlap

HIDDEN, FFN, KV, VOCAB, LAYERS = 2048, 8192, 512, 128256, 16


def llama_1b_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    return shapes


def synthetic_diff(seed: int, density: float) -> SparseDiff:
    """Random indices (about `density` of each tensor) with normal values; built lazily per entry."""
    shapes = llama_1b_shapes()

    class Entries(dict):
        def __getitem__(self, name: str) -> SparseEntry:
            shape = shapes[name]
            numel = int(np.prod(shape))
            rng = np.random.default_rng([seed, len(name), sum(map(ord, name))])
            idx = np.unique(rng.integers(0, numel, size=max(1, int(density * numel))))
            return SparseEntry.from_float(shape, idx, rng.normal(0, 1e-3, size=len(idx)).astype(np.float32))

    entries = Entries.fromkeys(shapes)
    return SparseDiff(entries, DiffMeta(base={"fingerprint": "sfp1:" + "ab" * 16, "numel": sum(
        int(np.prod(s)) for s in shapes.values())}))


def median_time(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def consume(diff: SparseDiff) -> int:
    """Compute every entry of a (lazy) result once, keeping none; returns the nonzeros seen."""
    return sum(diff.entries[name].nnz for name in diff.entries)


def read_all(*paths: Path) -> None:
    for p in paths:
        SparseDiff.load(p).validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/work/bench-tmp")
    args = parser.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    pa, pb, out = work / "a.sft", work / "b.sft", work / "out.sft"
    for path, seed in ((pa, 1), (pb, 2)):
        if not path.exists():
            synthetic_diff(seed, args.density).save(path)
    a, b = SparseDiff.load(pa), SparseDiff.load(pb)
    params = a.meta.base["numel"]
    print(f"model: {params / 1e9:.2f}B parameters, {len(a.entries)} tensors; "
          f"A: {a.nnz:,} nonzeros ({os.path.getsize(pa) / 2**20:.0f} MiB), B: {b.nnz:,} nonzeros")

    def save(result: SparseDiff) -> None:
        result.save(out, overwrite=True)

    rows = [
        ("read A and B (load + check data)", median_time(lambda: read_all(pa, pb), args.runs)),
        ("add, computed entry by entry", median_time(
            lambda: consume(add(SparseDiff.load(pa), SparseDiff.load(pb))), args.runs)),
        ("add + save (end to end)", median_time(lambda: save(add(SparseDiff.load(pa), SparseDiff.load(pb))), args.runs)),
        ("subtract + save", median_time(lambda: save(subtract(SparseDiff.load(pa), SparseDiff.load(pb))), args.runs)),
        ("prune to half, global + save", median_time(lambda: save(prune(SparseDiff.load(pa), k=a.nnz // 2)), args.runs)),
        ("overlap", median_time(lambda: overlap(SparseDiff.load(pa), SparseDiff.load(pb)), args.runs)),
    ]
    base = rows[0][1]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'operation'.ljust(width)}  median s  × read   (runs={args.runs}, warm cache)")
    for label, seconds in rows:
        print(f"{label.ljust(width)}  {seconds:8.2f}  {seconds / base:6.2f}")
    print(f"\nresult: {SparseDiff.load(out).nnz:,} nonzeros; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    if os.environ.get("BENCH_KEEP") != "1":
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
