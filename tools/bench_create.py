"""Benchmark `sftdiff create` against the I/O floor on a synthetic ~1B-parameter bfloat16 checkpoint.

Not part of CI. Writes a Llama-shaped sharded base and a perturbed "fine-tune" (numpy only) into
--dir (default /work/bench-tmp-create, since other benchmarks clear /work/bench-tmp), then times, in
fresh subprocesses and several repetitions:

  floor   reading every tensor of both checkpoints through the same memory map (xor of the bytes)
  create  `sftdiff create BASE FT -o OUT --density D --quiet`

each twice over: warm (files in the page cache, after a warm-up read) and cold (the benchmark's own
files evicted from the page cache before every run). Reports medians with min/max, the CPU time
(user+sys, which other load on the machine disturbs less than wall time), each child's peak RSS
(wait4), both create/floor ratios, the disk's read speed as the cold floor sees it, and the load
average, since a shared machine makes wall times noisy. Targets: ratio <= 1.5, peak RSS <= 2 GB.
The data is deleted at the end unless --keep.

Cold runs evict only this benchmark's files (fsync + posix_fadvise(DONTNEED) on each), so other
users' page cache is left alone; --drop-caches uses `echo 3 > /proc/sys/vm/drop_caches` instead
(root, whole machine). Either way an eviction check times a read of one shard before and after.

    python tools/bench_create.py [--layers 22] [--reps 3] [--density 0.01] [--no-cold] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from sftdiff.dtypes import from_float32
from sftdiff.safetensors_io import StreamingWriter

HIDDEN, INTERMEDIATE, KV, VOCAB = 2048, 5632, 256, 32000  # TinyLlama-1.1B shapes

FLOOR = """
import sys, numpy as np
from sftdiff.checkpoint import Checkpoint
total = 0
for path in sys.argv[1:]:
    ckpt = Checkpoint.open(path)
    for name in ckpt.tensors:
        raw = ckpt.array(name).reshape(-1)
        words = raw[: raw.size - raw.size % 4].view(np.uint64)  # every byte, 8 at a time
        total += int(np.bitwise_xor.reduce(words)) if words.size else 0
print(total % 7)
"""


def llama_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("lm_head.weight", (VOCAB, HIDDEN)),
              ("model.norm.weight", (HIDDEN,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
                   (p + "self_attn.v_proj.weight", (KV, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                   (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
                   (p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
    return sorted(shapes)


def split_shards(shapes: list[tuple[str, tuple[int, ...]]], count: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    total = sum(int(np.prod(s)) for _, s in shapes)
    shards: list[list] = [[]]
    filled = 0
    for name, shape in shapes:
        if filled >= total * len(shards) / count and len(shards) < count:
            shards.append([])
        shards[-1].append((name, shape))
        filled += int(np.prod(shape))
    return shards


def generate(folder: Path, shapes: list, shards: int, seed: int, perturb: float) -> None:
    """Base weights N(0, 0.02) (norms 1.0); with `perturb`, each value moved by N(0, perturb)
    from the same base (seeded), i.e. a full fine-tune that changes nearly every value."""
    folder.mkdir(parents=True)
    parts = split_shards(shapes, shards)
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        with open(folder / file, "wb") as f:
            writer = StreamingWriter(f, [(n, "BF16", s) for n, s in part])
            for name, shape in part:
                rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
                if len(shape) == 1:
                    values = np.ones(shape, np.float32)
                else:
                    values = rng.standard_normal(shape, dtype=np.float32)
                    values *= 0.02
                if perturb:
                    noise = np.random.default_rng([seed + 1, zlib.crc32(name.encode())])
                    values += noise.standard_normal(shape, dtype=np.float32) * perturb
                writer.write(name, from_float32(values, "BF16"))
                weight_map[name] = file
            writer.close()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds user+sys, peak RSS in MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{cmd} failed: {proc.stderr.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def evict(files: list[Path], global_drop: bool) -> None:
    """Make the next read of `files` come from the disk."""
    if global_drop:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_speed(file: Path, limit: int = 256 << 20) -> float:
    """GB/s of reading the first `limit` bytes of `file` with plain reads."""
    start, done = time.perf_counter(), 0
    with open(file, "rb", buffering=0) as f:
        while done < limit and (chunk := f.read(16 << 20)):
            done += len(chunk)
    return done / (time.perf_counter() - start) / 1e9


def check_eviction(files: list[Path], global_drop: bool) -> tuple[float, float]:
    """(cold GB/s, warm GB/s) of one shard: cold must be clearly slower, or 'cold' runs are warm."""
    evict(files, global_drop)
    cold = read_speed(files[0])
    return cold, read_speed(files[0])


def machine() -> str:
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"nproc {os.cpu_count()}, RAM {int(mem) / 2**20:.1f} GiB, CPU {cpu}"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/bench-tmp-create")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--no-cold", action="store_true", help="Skip the cold-cache runs.")
    ap.add_argument("--drop-caches", action="store_true",
                    help="Cold runs drop the whole page cache (root) instead of evicting only this benchmark's files.")
    ap.add_argument("--keep", action="store_true", help="Keep the synthetic checkpoints (reused if present).")
    args = ap.parse_args()

    root = Path(args.dir)
    base, ft, out = root / "base", root / "ft", root / "out.sft"
    shapes = llama_shapes(args.layers)
    numel = sum(int(np.prod(s)) for _, s in shapes)
    if not (base.exists() and ft.exists()):
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        generate(base, shapes, args.shards, seed=0, perturb=0.0)
        generate(ft, shapes, args.shards, seed=0, perturb=0.002)
        print(f"generated 2 x {numel / 1e9:.2f}B BF16 parameters in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    files = sorted(base.glob("*.safetensors")) + sorted(ft.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in files)
    disk = shutil.disk_usage(root)

    floor_cmd = [sys.executable, "-c", FLOOR, str(base), str(ft)]
    create_cmd = [sys.executable, "-m", "sftdiff", "create", str(base), str(ft), "-o", str(out),
                  "--density", str(args.density), "--quiet", "--force"]
    load_before = load()
    modes = ["warm"] + ([] if args.no_cold else ["cold"])
    runs: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    eviction = None
    if not args.no_cold:
        eviction = check_eviction(files, args.drop_caches)
    for mode in modes:
        if mode == "warm":
            timed(floor_cmd)  # the warm-up read: both then measure reading from memory
        for _ in range(args.reps):
            for name, cmd in (("floor", floor_cmd), ("create", create_cmd)):
                if mode == "cold":
                    if out.exists():
                        out.unlink()  # nothing of the previous run's output stays dirty in memory
                    evict(files, args.drop_caches)
                runs.setdefault((mode, name), []).append(timed(cmd))

    largest = max(int(np.prod(s)) for _, s in shapes)
    print(f"machine: {machine()}; disk {root}: {disk.free / 2**30:.0f} GiB free of {disk.total / 2**30:.0f} GiB; "
          f"load average {load_before} before, {load()} after")
    print(f"model: {numel:,} BF16 parameters, {len(shapes)} tensors in {args.shards} shards, "
          f"{size / 2 / 2**30:.2f} GiB per checkpoint; largest tensor {largest:,} values; density {args.density}; "
          f"{args.reps} repetitions per mode")
    if eviction is not None:
        how = "drop_caches" if args.drop_caches else "posix_fadvise(DONTNEED) on the benchmark's files"
        print(f"eviction ({how}) check, one shard: {eviction[0]:.2f} GB/s cold, {eviction[1]:.2f} GB/s warm"
              f"{'' if eviction[0] < 0.7 * eviction[1] else '  (WARNING: cold is not slower: eviction may not work)'}")
    print(f"{'mode':<6}{'run':<8}{'median s':>10}{'min s':>8}{'max s':>8}{'CPU s':>8}{'peak RSS MiB':>14}")
    medians, cpu = {}, {}
    for (mode, name), rows in runs.items():
        walls = [w for w, _, _ in rows]
        medians[mode, name] = statistics.median(walls)
        cpu[mode, name] = statistics.median(c for _, c, _ in rows)
        print(f"{mode:<6}{name:<8}{medians[mode, name]:>10.2f}{min(walls):>8.2f}{max(walls):>8.2f}"
              f"{cpu[mode, name]:>8.2f}{max(r for _, _, r in rows):>14.0f}")
    peak = max(r for (_, name), rows in runs.items() if name == "create" for _, _, r in rows)
    for mode in modes:
        ratio = medians[mode, "create"] / medians[mode, "floor"]
        extra = ""
        if mode == "cold":
            extra = f"; disk read speed (cold floor) {size / medians[mode, 'floor'] / 1e9:.2f} GB/s"
        else:
            extra = f"; page-cache read speed (warm floor) {size / medians[mode, 'floor'] / 1e9:.2f} GB/s"
        print(f"{mode}: ratio create/floor {ratio:.2f} (target <= 1.5): {'ok' if ratio <= 1.5 else 'MISSED'}{extra}")
    print(f"create peak RSS {peak:.0f} MiB (target <= 2048): {'ok' if peak <= 2048 else 'MISSED'}; "
          f"output {out.stat().st_size / 2**20:.1f} MiB")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
