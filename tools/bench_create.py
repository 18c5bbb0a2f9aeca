"""Benchmark `sftdiff create` against the read floor on issue 14's two workloads, side by side in one run.

Not part of CI. Generates (once; kept with --keep) under --dir a base and a perturbed full fine-tune
for each workload (tools/bench_models.py: 1.1B bf16 Llama shape in 3 shards, 110M fp32 BERT-base
shape in one file), warms the page cache, then times in fresh processes, round-robin over --reps
repetitions (medians):

  floor           `cat` of every weight file of both checkpoints (the read floor)
  create          `sftdiff create BASE FT -o OUT --density D --quiet` (the compiled scan, sftdiff._kernels,
                  when it is built)
  create (numpy)  the same with SFTDIFF_COMPILED=0 (the numpy scan), and a byte comparison of both outputs

`--baseline-src DIR` also times `create` imported from another source tree (a checkout of an
earlier commit) in the same rounds, and compares its output byte for byte: before/after figures
measured side by side, which this VM's drifting speed makes the only comparable ones. Reported
with each child's CPU seconds (user+sys, less disturbed by other load than wall time) and its peak
anonymous RSS (sampled from /proc every 10 ms; mapped file pages are not counted). Targets (issue 14):
create <= 2.5x floor (1.1B) and <= 4x (110M), peak anonymous RSS <= 1 GB. The load average is printed:
the machine is shared. The data is deleted at the end unless --keep.

    python tools/bench_create.py [--workloads llama bert] [--reps 3] [--density 0.01] [--cold] [--keep]
                                  [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_models import WORKLOADS, cached_bytecode_env, ensure_pair, load_average, numel, warm, weight_files


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds user+sys, peak anonymous RSS in MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = 0
    status_file = Path(f"/proc/{proc.pid}/status")
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            line = next(x for x in status_file.read_text().splitlines() if x.startswith("RssAnon:"))
            peak = max(peak, int(line.split()[1]))
        except (OSError, StopIteration):
            pass
        time.sleep(0.01)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{cmd} failed: {proc.stderr.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime, peak / 1024


def evict(files: list[Path]) -> None:
    """Drop the files from the page cache (only this benchmark's: other users' cache is left alone)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/bench-sftdiff")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--no-numpy", action="store_true", help="skip the SFTDIFF_COMPILED=0 runs")
    ap.add_argument("--cold", action="store_true", help="evict the benchmark's files from the page cache "
                    "(fsync + posix_fadvise DONTNEED) before every run instead of warming it")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the synthetic checkpoints")
    ap.add_argument("--baseline-src", metavar="DIR", help="also time `sftdiff create` imported from the source tree DIR")
    args = ap.parse_args()

    root = Path(args.dir)
    sftdiff = [sys.executable, "-m", "sftdiff"]
    plain_env = cached_bytecode_env(root)
    numpy_env = dict(plain_env, SFTDIFF_COMPILED="0")
    load_before = load_average()
    table = []
    for workload in args.workloads:
        base, ft = ensure_pair(root, workload)
        files = weight_files(base) + weight_files(ft)
        out, out_numpy = root / workload / "out.sft", root / workload / "out-numpy.sft"
        create = [*sftdiff, "create", str(base), str(ft), "--density", str(args.density), "--quiet", "--force", "-o"]
        runs = [("floor", ["cat", *map(str, files)], None), ("create", [*create, str(out)], plain_env)]
        if not args.no_numpy:
            runs.append(("create (numpy)", [*create, str(out_numpy)], numpy_env))
        out_baseline = root / workload / "out-baseline.sft"
        if args.baseline_src:
            env = dict(plain_env, PYTHONPATH=str(Path(args.baseline_src).resolve()))
            runs.append(("baseline", [sys.executable, "-P", *create[1:], str(out_baseline)], env))
        warm(files)
        for _, cmd, env in runs[1:]:  # untimed first runs: fill the bytecode cache
            timed(cmd, env)
        samples: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in runs}
        for _ in range(args.reps):
            for label, cmd, env in runs:
                if args.cold:
                    evict(files)
                samples[label].append(timed(cmd, env))
        med = {label: statistics.median(w for w, _, _ in got) for label, got in samples.items()}
        cpu = {label: statistics.median(c for _, c, _ in got) for label, got in samples.items()}
        peak = {label: max(r for _, _, r in got) for label, got in samples.items()}
        same = None if args.no_numpy else out.read_bytes() == out_numpy.read_bytes()
        if args.baseline_src:
            same = (same is not False) and out.read_bytes() == out_baseline.read_bytes()
        table.append((workload, med, cpu, peak, same, sum(f.stat().st_size for f in files)))

    print(f"load average {load_before} before, {load_average()} after; {args.reps} repetitions, "
          f"{'cold (files evicted before each run)' if args.cold else 'warm'} page cache, "
          f"density {args.density}; nproc {os.cpu_count()}")
    print("| workload | create | read floor (`cat base ft`) | ratio | target | create, numpy scan | ratio "
          "| CPU s create / numpy | peak anon RSS MiB | outputs identical | baseline (CPU s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for workload, med, cpu, peak, same, size in table:
        target = 2.5 if workload == "llama" else 4.0
        ratio = med["create"] / med["floor"]
        numpy_cells = ("-", "-") if "create (numpy)" not in med else \
            (f"{med['create (numpy)']:.2f} s", f"{med['create (numpy)'] / med['floor']:.1f}x")
        numpy_cpu = f"{cpu['create (numpy)']:.2f}" if "create (numpy)" in cpu else "-"
        baseline = "-" if "baseline" not in med else \
            f"{med['baseline']:.2f} s, {med['baseline'] / med['floor']:.1f}x ({cpu['baseline']:.2f})"
        print(f"| {WORKLOADS[workload]['label']}, {args.density:.0%} ({numel(workload) / 1e6:,.0f}M values, "
              f"{size / 1e9:.2f} GB read) | {med['create']:.2f} s | {med['floor']:.2f} s | {ratio:.1f}x | "
              f"<= {target}x: {'ok' if ratio <= target else 'MISSED'} | {numpy_cells[0]} | {numpy_cells[1]} | "
              f"{cpu['create']:.2f} / {numpy_cpu} | {peak['create']:.0f} | {'-' if same is None else same} | {baseline} |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
