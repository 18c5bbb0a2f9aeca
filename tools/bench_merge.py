"""Benchmark and equivalence check: `sftdiff merge --method ties` + `sftdiff apply` against mergekit TIES.

Builds (once, cached under --dir) a Llama-shaped float32 base (~56M parameters by default), N sparse
diffs that each store exactly 1% of every tensor (so both density definitions can be made to
coincide), and the N fine-tunes as mergekit needs them: `sftdiff apply base diffᵢ` (dense task
vectors made from the same diffs). Then, in one run:

- equivalence: `merge --method ties` baked onto the base equals mergekit's `ties` output within
  float tolerance, (a) with no trim (mergekit density 1) and (b) with trim: mergekit's density is a
  fraction of the whole tensor, ours of the stored values, so mergekit 0.005 = ours 0.5 here;
- cost, median of --repeats: wall time, peak RSS and bytes read from disk of `sftdiff merge` then
  `sftdiff apply`, and of `mergekit-yaml`, each run as a child process with the inputs evicted from
  the page cache first (posix_fadvise DONTNEED), so "read" is what the pipeline really pulls from disk
  (rusage ru_inblock); input bytes are the sizes of the files each pipeline must open.

mergekit is not a dependency: install it in its own venv and point --mergekit at its script:
    python -m venv /tmp/mk && /tmp/mk/bin/pip install torch==2.13.0 && /tmp/mk/bin/pip install mergekit
    python tools/bench_merge.py [--mergekit /tmp/mk/bin/mergekit-yaml] [--models 3] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def shapes(layers: int, hidden: int, ffn: int, vocab: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                                       "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{m}.weight"] = (hidden, hidden)
        out.update({p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                    p + "mlp.down_proj.weight": (hidden, ffn), p + "input_layernorm.weight": (hidden,),
                    p + "post_attention_layernorm.weight": (hidden,)})
    return out


def llama_config(layers: int, hidden: int, ffn: int, vocab: int) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": vocab, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
            "hidden_act": "silu", "rope_theta": 10000.0}


FIELDS = ("seconds", "cpu_seconds", "peak_rss", "disk_read")


def sftdiff_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sftdiff", *args]


def setup(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Base, diffs and fine-tunes under `work` (reused when the parameters match)."""
    from safetensors.numpy import save_file

    from sftdiff.checkpoint import Checkpoint
    from sftdiff.diff import DiffMeta, SparseDiff, SparseEntry
    from sftdiff.fingerprint import base_record

    key = json.dumps([args.layers, args.hidden, args.ffn, args.vocab, args.models, args.stored])
    stamp = work / "setup.json"
    layout = {"base": work / "base", "diffs": [work / f"d{i}.sft" for i in range(args.models)],
              "tuned": [work / f"ft{i}" for i in range(args.models)]}
    if stamp.exists() and stamp.read_text() == key:
        return layout
    if work.exists() and any(work.iterdir()) and not stamp.exists():
        raise SystemExit(f"{work} holds other files; give --dir a new or empty folder")
    shutil.rmtree(work, ignore_errors=True)  # only ever a folder this script made (it has setup.json)
    work.mkdir(parents=True)
    sh = shapes(args.layers, args.hidden, args.ffn, args.vocab)
    unit = round(2 / args.stored)  # the trim keeps half of the stored values: whole counts in both definitions
    for name, shape in sh.items():
        if int(np.prod(shape)) % unit != 0:
            raise SystemExit(f"{name}: numel {int(np.prod(shape))} is not a multiple of {unit}; "
                             f"pick sizes for which both densities give whole counts")
    rng = np.random.default_rng(0)
    base = {n: (rng.standard_normal(s, dtype=np.float32) * 0.02 if len(s) > 1 else np.ones(s, np.float32))
            for n, s in sh.items()}
    layout["base"].mkdir()
    save_file(base, str(layout["base"] / "model.safetensors"))
    config = llama_config(args.layers, args.hidden, args.ffn, args.vocab)
    (layout["base"] / "config.json").write_text(json.dumps(config))
    del base
    ckpt = Checkpoint.open(layout["base"])
    record = base_record(ckpt, list(sh), hint=str(layout["base"]))
    for i, path in enumerate(layout["diffs"]):
        rng = np.random.default_rng(100 + i)
        entries = {}
        for name, shape in sh.items():
            numel = int(np.prod(shape))
            idx = np.sort(rng.choice(numel, size=round(numel * args.stored), replace=False))
            values = rng.standard_normal(len(idx)).astype(np.float32) * 0.002
            values[values == 0] = 0.001
            entries[name] = SparseEntry.from_float(shape, idx, values, "F32", "F32")
        SparseDiff(entries, DiffMeta(base=dict(record), origin={"tool": "bench_merge", "method": "random"})).save(path)
        subprocess.run(sftdiff_cmd("apply", str(layout["base"]), str(path), "-o", str(layout["tuned"][i]), "-q",
                                   "--force"), check=True)
    stamp.write_text(key)
    return layout


def files_of(*paths: Path) -> list[Path]:
    out = []
    for p in paths:
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the next run reads them from disk."""
    for f in paths:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(cmd: list[str], inputs: list[Path]) -> dict[str, float]:
    """Wall seconds, peak RSS (bytes) and bytes read from disk of one child process, cold cache."""
    evict(inputs)
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        # ru_maxrss of a child counts the forked copy of this process before exec; VmHWM is per
        # address space, so it is the command's own peak. Sampled until the process exits.
        peak = 0
        while True:
            try:
                status_text = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            if "\nState:\tZ" in status_text:
                break
            for line in status_text.splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
            time.sleep(0.01)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = status
        if status != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed ({status}):\n{err.read().decode(errors='replace')[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss": peak,
            "disk_read": usage.ru_inblock * 512}


def read_folder(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def mergekit_config(layout: dict[str, Any], weights: list[float], density: float, lam: float) -> str:
    models = "".join(f"  - model: {t}\n    parameters:\n      weight: {w}\n      density: {density}\n"
                     for t, w in zip(layout["tuned"], weights))
    return (f"models:\n{models}merge_method: ties\nbase_model: {layout['base']}\n"
            f"parameters:\n  normalize: true\n  lambda: {lam}\ndtype: float32\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/bench-tmp/merge", help="Where inputs and outputs go (not the repo).")
    ap.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=400)
    ap.add_argument("--ffn", type=int, default=1600)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--stored", type=float, default=0.01, help="Fraction of each tensor each diff stores.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # mergekit and transformers: local folders only, no network
    work = Path(args.dir)
    layout = setup(work, args)
    weights = [round(1.0 - 0.3 * i, 2) for i in range(args.models)]
    lam = 0.9
    ours_density, mk_density = 0.5, args.stored * 0.5
    out = work / "out"
    out.mkdir(exist_ok=True)
    w = ",".join(map(str, weights))

    def ours(trim: bool) -> list[list[str]]:
        merged = str(out / f"merged{'-trim' if trim else ''}.sft")
        merge = sftdiff_cmd("merge", *map(str, layout["diffs"]), "-o", merged, "--method", "ties", "--weights", w,
                            "--scale", str(lam), "--force", "-q", *(["--density", str(ours_density)] if trim else []))
        apply = sftdiff_cmd("apply", str(layout["base"]), merged, "-o", str(out / f"sft{'-trim' if trim else ''}"),
                            "--force", "-q")
        return [merge, apply]

    def theirs(trim: bool) -> list[str]:
        cfg = out / f"ties{'-trim' if trim else ''}.yml"
        cfg.write_text(mergekit_config(layout, weights, mk_density if trim else 1.0, lam))
        target = out / f"mk{'-trim' if trim else ''}"
        shutil.rmtree(target, ignore_errors=True)
        return [args.mergekit, str(cfg), str(target), "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                "--random-seed", "0"]

    # -- equivalence (untimed) --
    equivalence = {}
    for trim in (False, True):
        for cmd in ours(trim):
            subprocess.run(cmd, check=True)
        subprocess.run(theirs(trim), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        a = read_folder(out / f"sft{'-trim' if trim else ''}")
        b = read_folder(out / f"mk{'-trim' if trim else ''}")
        base = read_folder(layout["base"])
        assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys())[:5])
        worst = max(float(np.max(np.abs(a[n].astype(np.float64) - b[n]))) for n in a)
        scale = max(float(np.max(np.abs(b[n] - base[n]))) for n in a)
        unequal = sum(int((a[n] != b[n]).sum()) for n in a)
        changed = sum(int((b[n] != base[n]).sum()) for n in a)
        close = all(np.allclose(a[n], b[n], rtol=1e-6, atol=1e-7) for n in a)
        equivalence["density 1 (no trim)" if not trim else f"mergekit {mk_density} = ours {ours_density}"] = {
            "allclose(rtol=1e-6, atol=1e-7)": close, "max_abs_diff": worst, "max_abs_delta": scale,
            "values_not_bit_equal": unequal, "values_changed_from_base": changed,
            "numel": sum(x.size for x in a.values())}

    # -- cost, cold cache, median of repeats (with trim) --
    diffs, base_files = files_of(*layout["diffs"]), files_of(layout["base"])
    tuned = files_of(*layout["tuned"])
    merged = out / "merged-trim.sft"
    runs: dict[str, list[dict[str, float]]] = {"sftdiff merge": [], "sftdiff apply": [], "sftdiff merge+apply": [],
                                                "mergekit ties": []}
    for _ in range(args.repeats):
        merge_cmd, apply_cmd = ours(True)
        m = measure(merge_cmd, diffs)
        a = measure(apply_cmd, base_files + [merged])
        runs["sftdiff merge"].append(m)
        runs["sftdiff apply"].append(a)
        runs["sftdiff merge+apply"].append({"seconds": m["seconds"] + a["seconds"],
                                            "cpu_seconds": m["cpu_seconds"] + a["cpu_seconds"],
                                            "peak_rss": max(m["peak_rss"], a["peak_rss"]),
                                            "disk_read": m["disk_read"] + a["disk_read"]})
        runs["mergekit ties"].append(measure(theirs(True), base_files + tuned))
    med = {k: {f: statistics.median(r[f] for r in v) for f in FIELDS}
           for k, v in runs.items()}
    sizes = lambda fs: sum(f.stat().st_size for f in fs)  # noqa: E731
    inputs = {"sftdiff merge": sizes(diffs), "sftdiff apply": sizes(base_files) + merged.stat().st_size,
              "mergekit ties": sizes(base_files) + sizes(tuned)}
    inputs["sftdiff merge+apply"] = inputs["sftdiff merge"] + inputs["sftdiff apply"]
    params = sum(int(np.prod(s)) for s in shapes(args.layers, args.hidden, args.ffn, args.vocab).values())
    result = {"params": params, "models": args.models, "stored_fraction": args.stored, "repeats": args.repeats,
              "equivalence": equivalence, "median": med, "input_bytes": inputs,
              "ratio_mergekit_over_sftdiff": {f: med["mergekit ties"][f] / med["sftdiff merge+apply"][f]
                                              if med["sftdiff merge+apply"][f] else None
                                              for f in FIELDS}}
    result["ratio_mergekit_over_sftdiff"]["input_bytes"] = inputs["mergekit ties"] / inputs["sftdiff merge+apply"]
    (out / "result.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{params / 1e6:.1f}M-parameter Llama-shaped f32 model, {args.models} diffs storing {args.stored:.0%} "
          f"of each tensor, TIES, median of {args.repeats} cold-cache runs")
    for name, e in equivalence.items():
        print(f"  equivalence, {name}: allclose={e['allclose(rtol=1e-6, atol=1e-7)']}, max |diff| "
              f"{e['max_abs_diff']:.2e} (largest delta {e['max_abs_delta']:.2e}), {e['values_not_bit_equal']:,} of "
              f"{e['numel']:,} values not bit-equal, {e['values_changed_from_base']:,} changed from base")
    print(f"  {'':22}{'time':>9}{'CPU time':>10}{'peak RSS':>11}{'disk read':>11}{'input bytes':>13}")
    for name in ("sftdiff merge", "sftdiff apply", "sftdiff merge+apply", "mergekit ties"):
        r = med[name]
        print(f"  {name:22}{r['seconds']:8.2f}s{r['cpu_seconds']:9.2f}s{r['peak_rss'] / 1e6:9.0f}MB"
              f"{r['disk_read'] / 1e6:9.0f}MB{inputs[name] / 1e6:11.0f}MB")
    ratio = result["ratio_mergekit_over_sftdiff"]
    print(f"  {'mergekit / sftdiff':22}{ratio['seconds']:8.2f}x{ratio['cpu_seconds']:9.2f}x{ratio['peak_rss']:9.2f}x"
          f"{(ratio['disk_read'] or float('nan')):9.2f}x{ratio['input_bytes']:11.2f}x")


if __name__ == "__main__":
    main()
