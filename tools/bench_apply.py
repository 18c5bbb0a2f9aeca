"""Benchmark `sftdiff apply` against copying the base (the I/O floor) and mergekit task arithmetic.

Builds (once, cached under --dir) a synthetic ~1B-parameter bfloat16 Llama checkpoint sharded like
save_pretrained, two 1%-dense diffs of it, and — for mergekit — the two equivalent dense
fine-tunes (base + diff, baked by sftdiff). Then times, as separate processes with the median of
--reps runs each: `cp -r` of the base folder, `cp -r` + `sync` of the copy (the fair floor:
sftdiff fsyncs its output before renaming it into place), `sftdiff apply base a.sft b.sft`, and
`mergekit-yaml` task_arithmetic of the two fine-tunes (from the venv given by --mergekit-venv;
skipped if missing). Repetitions go round-robin over the commands, so load from other processes
drifts over all of them alike, and each starts after a `sync` (untimed) so no run pays for the
previous one's dirty pages. Peak RSS and CPU seconds (user + system) are the finished child's
(getrusage). The page cache is warm (the base is read once before timing; with 24 GB RAM every
run reads from memory); `--cold` drops the page cache before every run instead (needs root).

    python tools/bench_apply.py --reps 3

mergekit is a benchmark-only dependency, kept out of sftdiff's own environment (it pins its own
versions of several packages); set it up once with
    python3 -m venv /work/venv-bench && /work/venv-bench/bin/pip install torch==2.13.0 mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sftdiff.diff import DiffMeta, SparseDiff, SparseEntry
from sftdiff.dtypes import from_float32
from sftdiff.fingerprint import checkpoint_digests, model_fingerprint

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
              intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
              max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16",
              hidden_act="silu", rope_theta=10000.0)
SHARD = "500MB"


def llama_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, m, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (m, h)), (p + "mlp.up_proj.weight", (m, h)),
                (p + "mlp.down_proj.weight", (h, m))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_base(folder: Path, seed: int = 0) -> None:
    """Random bf16 weights, sharded and indexed the way save_pretrained does."""
    from sftdiff.bake import OutputTensor, parse_size, plan_shards, shard_names
    from sftdiff.safetensors_io import StreamingWriter

    rng = np.random.default_rng(seed)
    plan = [OutputTensor(n, "BF16", s, n, ()) for n, s in llama_tensors(CONFIG)]
    shards = plan_shards(plan, parse_size(SHARD))
    names = shard_names(len(shards))
    folder.mkdir(parents=True)
    weight_map = {}
    for shard_name, shard in zip(names, shards):
        with open(folder / shard_name, "wb") as f:
            writer = StreamingWriter(f, [(t.name, t.dtype, t.shape) for t in shard], {"format": "pt"})
            for t in shard:
                values = rng.standard_normal(t.shape, dtype=np.float32) * np.float32(0.02)
                writer.write(t.name, from_float32(values, "BF16"))
                weight_map[t.name] = shard_name
            writer.close()
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))


def write_diff(base_dir: Path, path: Path, seed: int, density: float = 0.01) -> None:
    from sftdiff.checkpoint import Checkpoint

    base = Checkpoint.open(base_dir)
    rng = np.random.default_rng(seed)
    entries = {}
    for name, t in base.tensors.items():
        k = max(1, int(t.numel * density))
        idx = np.unique(rng.integers(0, t.numel, size=k, dtype=np.int64))
        values = rng.standard_normal(len(idx), dtype=np.float32) * np.float32(0.01)
        entries[name] = SparseEntry.from_float(t.shape, idx, values, "F32", t.dtype)
    digests = checkpoint_digests(base)
    meta = DiffMeta(base={"hint": str(base_dir), "fingerprint": model_fingerprint(digests),
                          "tensors": {n: digests[n] for n in entries}},
                    origin={"tool": "tools/bench_apply.py", "method": "random", "density": density})
    SparseDiff(entries, meta).save(path)


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB, CPU seconds) of `cmd`, run in a fresh measuring process."""
    probe = ("import resource, subprocess, sys, time\n"
             "t = time.perf_counter()\n"
             "rc = subprocess.run(sys.argv[1:]).returncode\n"
             "dt = time.perf_counter() - t\n"
             "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
             "print(dt, r.ru_maxrss / 1024, r.ru_utime + r.ru_stime, rc)\n")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env)
    fields = out.stdout.strip().splitlines()[-1].split() if out.stdout.strip() else []
    if len(fields) != 4 or fields[3] != "0":
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(fields[0]), float(fields[1]), float(fields[2])


def settle(out: Path, cold: bool) -> None:
    """Remove the last output and write back everything dirty (untimed), optionally emptying the
    page cache, so each run starts from the same state."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def bench(runs: list[tuple[str, list[str], dict | None]], out: Path, reps: int, cold: bool) -> list[dict]:
    """Median wall time, CPU time and peak RSS of each command over `reps` round-robin runs."""
    samples: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in runs}
    for _ in range(reps):
        for label, cmd, env in runs:
            settle(out, cold)
            seconds, peak, cpu = run(cmd, env)
            samples[label].append((seconds, peak, cpu))
            print(f"  {label}: {seconds:.2f} s, {cpu:.2f} s CPU, {peak:.0f} MB", file=sys.stderr)
    settle(out, False)
    return [{"label": label, "median_s": statistics.median(s[0] for s in got), "times": [s[0] for s in got],
             "cpu_s": statistics.median(s[2] for s in got), "peak_rss_mb": max(s[1] for s in got)}
            for label, got in samples.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/work/bench-tmp/apply")  # a folder of our own: others bench there too
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mergekit-reps", type=int, default=None, help="default: --reps")
    parser.add_argument("--mergekit-venv", default="/work/venv-bench")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every run (root only)")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--baseline-src", metavar="DIR", help="also time `sftdiff apply` imported from the source "
                        "tree DIR (e.g. a `git worktree` of an earlier commit), for before/after tables")
    args = parser.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    base, a, b = root / "base", root / "a.sft", root / "b.sft"
    t0 = time.perf_counter()
    if not base.exists():
        write_base(base)
    for path, seed in ((a, 1), (b, 2)):
        if not path.exists():
            write_diff(base, path, seed)
    sftdiff = str(Path(sys.executable).with_name("sftdiff"))
    for ft, diff in (("ft_a", a), ("ft_b", b)):
        if not (root / ft).exists():
            subprocess.run([sftdiff, "apply", str(base), str(diff), "-o", str(root / ft), "-q",
                            "--shard-size", SHARD], check=True)
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    numel = sum(int(np.prod(s)) for _, s in llama_tensors(CONFIG))
    subprocess.run(["cat", *map(str, base.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)

    out = root / "out"
    runs = [
        ("cp -r", ["cp", "-r", str(base), str(out)], None),
        ("cp -r + sync", ["sh", "-c", f'cp -r "{base}" "{out}" && sync "{out}"/*'], None),
        ("sftdiff apply", [sftdiff, "apply", str(base), str(a), str(b), "-o", str(out), "-q",
                           "--shard-size", SHARD], None),
    ]
    if args.baseline_src:
        env = dict(os.environ, PYTHONPATH=str(Path(args.baseline_src).resolve()))  # -P: not the cwd's copy
        runs.append((f"sftdiff apply ({args.baseline_src})", [sys.executable, "-P", "-m", "sftdiff", *runs[2][1][1:]], env))
    results = bench(runs, out, args.reps, args.cold)
    mergekit = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    if mergekit.exists() and not args.skip_mergekit:
        config = root / "task_arithmetic.yml"
        config.write_text(
            f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: bfloat16\nmodels:\n"
            f"  - model: {root / 'ft_a'}\n    parameters:\n      weight: 1.0\n"
            f"  - model: {root / 'ft_b'}\n    parameters:\n      weight: 1.0\n")
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        results += bench([("mergekit-yaml task_arithmetic",
                           [str(mergekit), str(config), str(out), "--quiet", "--out-shard-size", "250M"], env)],
                         out, args.mergekit_reps or args.reps, args.cold)
    else:
        print(f"mergekit skipped (--skip-mergekit, or not found at {mergekit})", file=sys.stderr)

    cp, cp_sync = results[0]["median_s"], results[1]["median_s"]
    print(f"\nbase: {numel / 1e9:.2f} B parameters, bfloat16, {len(list(base.glob('*.safetensors')))} shards; "
          f"diffs: 2 x 1% ({a.stat().st_size / 1e6:.0f} + {b.stat().st_size / 1e6:.0f} MB); reps: {args.reps}; "
          f"page cache: {'cold' if args.cold else 'warm'}\n")
    print("| run | median s | x cp + sync | x cp | CPU s | peak RSS MB |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['label']} | {r['median_s']:.2f} | {r['median_s'] / cp_sync:.2f} | {r['median_s'] / cp:.2f} "
              f"| {r['cpu_s']:.2f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
