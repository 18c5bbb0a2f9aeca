"""Benchmark `sftdiff apply` against copying the base (`cp -r` + sync) on issue 14's two workloads, side by side.

Not part of CI. Uses the synthetic checkpoints of tools/bench_models.py under --dir (shared with
bench_create.py: 1.1B bf16 Llama shape in 3 shards, 110M fp32 BERT-base shape in one file) and, per
workload, a real 1% diff of its perturbed fine-tune made once with `sftdiff create`. Then times, as
separate processes, round-robin over --reps repetitions (medians), each run starting after the previous
output is removed and everything dirty is written back (`sync`, untimed):

  cp -r + sync   `cp -r base out && sync out/*` (the floor: sftdiff fsyncs its output before renaming it)
  apply          `sftdiff apply base diff.sft -o out -q` (includes its fsyncs)

with each child's CPU seconds (user+sys) and peak anonymous RSS (sampled from /proc every 10 ms). The
`sftdiff` children run with their bytecode cached, as an installed package's is (pip compiles it at
install): under PYTHONDONTWRITEBYTECODE=1 an editable install recompiles every sftdiff module it imports
on each run (~0.07 s of CPU, a tenth of a 110M apply), so that variable is dropped for them and the
bytecode goes to --dir/pycache (PYTHONPYCACHEPREFIX, nothing is written into the source tree), filled
by one untimed apply per workload. Targets
(issue 14): apply <= 1.1x cp + sync (1.1B) and <= 1.3x (110M). With --mergekit-venv pointing at a venv
with mergekit, also times `mergekit-yaml` task_arithmetic of the equivalent dense fine-tune (Llama only).
`--baseline-src DIR` also times `sftdiff apply` imported from another source tree (before/after tables).
The data is deleted at the end unless --keep.

    python tools/bench_apply.py [--workloads llama bert] [--reps 3] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench_create import timed
from bench_models import WORKLOADS, cached_bytecode_env, ensure_pair, load_average, numel, warm, weight_files


def settle(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/bench-sftdiff")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--mergekit-venv", default=None, help="venv with mergekit-yaml installed (optional)")
    ap.add_argument("--baseline-src", metavar="DIR", help="also time `sftdiff apply` imported from the source tree DIR")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the synthetic checkpoints and diffs")
    args = ap.parse_args()

    root = Path(args.dir)
    sftdiff = [sys.executable, "-m", "sftdiff"]
    load_before = load_average()
    table = []
    for workload in args.workloads:
        base, ft = ensure_pair(root, workload)
        diff = root / workload / f"diff-{args.density}.sft"
        if not diff.exists():
            subprocess.run([*sftdiff, "create", str(base), str(ft), "--density", str(args.density), "-q", "-o",
                            str(diff)], check=True)
        out = root / workload / "applied"
        runs = [("cp -r + sync", ["sh", "-c", f'cp -r "{base}" "{out}" && sync "{out}"/*'], None),
                ("apply", [*sftdiff, "apply", str(base), str(diff), "-o", str(out), "-q"], cached_bytecode_env(root))]
        if args.baseline_src:
            env = cached_bytecode_env(root, dict(os.environ, PYTHONPATH=str(Path(args.baseline_src).resolve())))
            runs.append((f"apply ({args.baseline_src})", [sys.executable, "-P", *runs[1][1][1:]], env))
        mergekit = Path(args.mergekit_venv or "/nonexistent") / "bin" / "mergekit-yaml"
        if mergekit.exists() and workload == "llama":
            dense = root / workload / "ft-dense"
            if not dense.exists():
                subprocess.run([*sftdiff, "apply", str(base), str(diff), "-o", str(dense), "-q"], check=True)
            config = root / workload / "task_arithmetic.yml"
            config.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: bfloat16\nmodels:\n"
                              f"  - model: {dense}\n    parameters:\n      weight: 1.0\n")
            runs.append(("mergekit task_arithmetic", [str(mergekit), str(config), str(out), "--quiet"],
                         dict(os.environ, HF_HUB_OFFLINE="1")))
        warm(weight_files(base) + [diff])
        for label, cmd, env in runs:  # untimed: fills the bytecode cache (and the page cache)
            if label.startswith("apply"):
                settle(out)
                subprocess.run(cmd, env=env, check=True)
        samples: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in runs}
        for _ in range(args.reps):
            for label, cmd, env in runs:
                settle(out)
                samples[label].append(timed(cmd, env))
        settle(out)
        table.append((workload, samples, diff.stat().st_size))

    print(f"load average {load_before} before, {load_average()} after; {args.reps} repetitions, warm page cache; "
          f"nproc {os.cpu_count()}")
    print("| workload | apply + sync | `cp -r base` + sync | ratio | target | CPU s apply / cp | peak anon RSS MiB "
          "| other runs |")
    print("|---|---|---|---|---|---|---|---|")
    for workload, samples, diff_size in table:
        med = {label: statistics.median(w for w, _, _ in got) for label, got in samples.items()}
        cpu = {label: statistics.median(c for _, c, _ in got) for label, got in samples.items()}
        peak = max(r for _, _, r in samples["apply"])
        target = 1.1 if workload == "llama" else 1.3
        ratio = med["apply"] / med["cp -r + sync"]
        others = "; ".join(f"{label} {med[label]:.2f} s ({med[label] / med['cp -r + sync']:.2f}x)"
                           for label in med if label not in ("apply", "cp -r + sync")) or "-"
        print(f"| {WORKLOADS[workload]['label']}, {args.density:.0%} ({numel(workload) / 1e6:,.0f}M values, diff "
              f"{diff_size / 1e6:.0f} MB) | {med['apply']:.2f} s | {med['cp -r + sync']:.2f} s | {ratio:.2f}x | "
              f"<= {target}x: {'ok' if ratio <= target else 'MISSED'} | {cpu['apply']:.2f} / {cpu['cp -r + sync']:.2f} "
              f"| {peak:.0f} | {others} |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
