"""Benchmark hot-swapping a diff in and out of a loaded model (`apply_to_model` / `revert_from_model`).

Not part of CI. Writes (once, reused with --keep) a TinyLlama-1.1B-shaped bfloat16 checkpoint and a
random 1%-dense diff of it (float32 values, like `sftdiff create`'s default) into --dir, loads the
model with transformers, and times in one process, side by side:

  load          `LlamaForCausalLM.from_pretrained(base, dtype=bfloat16)` from the page cache
  first apply   `apply_to_model` of a freshly loaded `SparseDiff` (its entries not yet read)
  first revert  `revert_from_model` with the record of that apply
  apply/revert  later swaps of the same diff object (what a training loop switching diffs pays)

Medians over --reps loads / fresh diffs and --swaps later swaps. After every revert the model is
checked bit for bit against the checkpoint on disk (revert must be exact). Targets (issue 14): a
swap <= 0.5 s each way and the first apply <= 1.5 s. The load average is printed: wall times on a
shared machine are noisy. The data is deleted at the end unless --keep.

    python tools/bench_swap.py [--reps 3] [--swaps 5] [--density 0.01] [--keep]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench_models import llama_shapes  # tools/ is on sys.path when run as a script

CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
              intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
              max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16",
              torch_dtype="bfloat16", hidden_act="silu", rope_theta=10000.0)  # TinyLlama-1.1B
SHARD = "1GB"


def write_base(folder: Path, seed: int = 0) -> None:
    """Random bf16 weights N(0, 0.02), sharded and indexed the way save_pretrained does."""
    from sftdiff.bake import OutputTensor, parse_size, plan_shards, shard_names
    from sftdiff.dtypes import from_float32
    from sftdiff.safetensors_io import StreamingWriter

    rng = np.random.default_rng(seed)
    plan = [OutputTensor(n, "BF16", s, n, ()) for n, s in llama_shapes(CONFIG)]
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


def write_diff(path: Path, density: float, seed: int = 1) -> None:
    """A random `density` of every parameter, float32 deltas N(0, 0.01)."""
    from sftdiff.diff import DiffMeta, SparseDiff, SparseEntry

    rng = np.random.default_rng(seed)
    entries = {}
    for name, shape in llama_shapes(CONFIG):
        numel = int(np.prod(shape))
        idx = np.unique(rng.integers(0, numel, size=max(1, int(numel * density)), dtype=np.int64))
        values = rng.standard_normal(len(idx), dtype=np.float32) * np.float32(0.01)
        entries[name] = SparseEntry.from_float(shape, idx, values, "F32", "BF16")
    SparseDiff(entries, DiffMeta(origin={"tool": "tools/bench_swap.py", "method": "random",
                                         "density": density})).save(path, overwrite=True)


def load_model(base: Path) -> object:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)


def materialize(model: object) -> None:
    """Read every weight into the process's own memory (what a load without memory maps does)."""
    for p in model.parameters():
        p.data = p.data.clone()


def matches_checkpoint(model: object, base: Path) -> bool:
    """Whether every parameter equals the checkpoint's bit for bit."""
    import torch

    from sftdiff.checkpoint import Checkpoint

    ckpt = Checkpoint.open(base)
    state = model.state_dict()
    for name in ckpt.tensors:
        if not np.array_equal(state[name].view(torch.int16).numpy(), ckpt.array(name).view(np.int16)):
            return False
        ckpt.release(name)
    return True


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/bench-swap")
    ap.add_argument("--reps", type=int, default=3, help="model loads and fresh diffs timed (median)")
    ap.add_argument("--swaps", type=int, default=5, help="later apply/revert pairs per fresh diff")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the checkpoint and the diff")
    args = ap.parse_args()

    from sftdiff import SparseDiff, apply_to_model, revert_from_model

    root = Path(args.dir)
    base, diff_path = root / "base", root / f"diff-{args.density}.sft"
    t0 = time.perf_counter()
    if not base.exists():
        shutil.rmtree(root, ignore_errors=True)
        write_base(base)
    if not diff_path.exists():
        write_diff(diff_path, args.density)
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for f in sorted(base.glob("*.safetensors")) + [diff_path]:  # warm the page cache
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass

    load_before = load_average()
    rows: dict[str, list[tuple[float, float]]] = {}

    def timed(label: str, fn: object, *a: object) -> object:
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn(*a)
        rows.setdefault(label, []).append((time.perf_counter() - wall, time.process_time() - cpu))
        return out

    exact = True
    model = None
    for rep in range(args.reps + 1):
        model = None
        gc.collect()
        model = timed("load (from_pretrained)" if rep else "load, not timed", load_model, base)
        if rep == 0:  # transformers maps the weights copy-on-write: the first write copies every page
            diff = SparseDiff.load(diff_path)
            record = timed("first apply, weights mapped", apply_to_model, model, diff)
            revert_from_model(model, record)
            continue
        timed("load + materialize", materialize, model)
        diff = SparseDiff.load(diff_path)  # fresh: no entry read yet
        record = timed("first apply (fresh diff)", apply_to_model, model, diff)
        timed("first revert", revert_from_model, model, record)
        for _ in range(args.swaps):
            record = timed("apply (later swaps)", apply_to_model, model, diff)
            timed("revert (later swaps)", revert_from_model, model, record)
        del record
        if rep == 1:  # one bit-for-bit check (it reads the whole checkpoint again)
            exact = matches_checkpoint(model, base)
    rows.pop("load, not timed")
    load_s = rows["load (from_pretrained)"]
    rows["load + materialize"] = [(w + lw, c + lc) for (w, c), (lw, lc) in zip(rows["load + materialize"], load_s)]

    nnz = SparseDiff.load(diff_path).nnz
    numel = sum(p.numel() for p in model.state_dict().values())
    med = statistics.median
    reference = med(w for w, _ in rows["load + materialize"])
    print(f"model: {numel / 1e9:.2f} B bfloat16 parameters (TinyLlama shape); diff: {nnz:,} values "
          f"({nnz / numel:.2%}, float32), {diff_path.stat().st_size / 1e6:.0f} MB; {args.reps} loads, "
          f"{args.reps * args.swaps} later swaps; load average {load_before} before, {load_average()} after")
    print(f"{'run':<30}{'median s':>10}{'min s':>8}{'max s':>8}{'CPU s':>8}{'x load':>8}  target (wall)")
    targets = {"first apply (fresh diff)": 1.5, "first revert": 0.5, "apply (later swaps)": 0.5,
               "revert (later swaps)": 0.5}
    for label in ("load (from_pretrained)", "load + materialize", "first apply, weights mapped",
                  "first apply (fresh diff)", "first revert", "apply (later swaps)", "revert (later swaps)"):
        walls, cpus = [w for w, _ in rows[label]], [c for _, c in rows[label]]
        target = targets.get(label)
        verdict = "" if target is None else f"<= {target} s: {'ok' if med(walls) <= target else 'MISSED'}"
        print(f"{label:<30}{med(walls):>10.3f}{min(walls):>8.3f}{max(walls):>8.3f}{med(cpus):>8.3f}"
              f"{med(walls) / reference:>8.2f}  {verdict}")
    print("x load: against load + materialize (from_pretrained only maps the file; the weights are read "
          "when first touched). CPU s: this process's, which other load on the machine disturbs less.")
    print(f"revert exact (bit for bit against the checkpoint): {'yes' if exact else 'NO'}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
