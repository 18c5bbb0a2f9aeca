"""`sftdiff retrain` and `sftdiff train`: language SFTs (masked or causal LM) from a text corpus, and task
SFTs (token or sequence classification) from labelled data, optionally on top of language SFTs (`--on`,
multi-source `--source`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from .common import (budget, budget_options, force_option, json_option, open_diff, quiet_option, report, say,
                     user_field_options, user_fields)
from ..train import DEFAULT_RESET_DENSE, DEFAULT_SCHEDULE, SCHEDULES

if TYPE_CHECKING:
    from ..diff import SparseDiff

DEFAULT_SEQ_LEN = 256
# sftdiff.labelled.TASK_OBJECTIVES, spelled out so that --help does not import transformers
TASKS = ("token-classification", "sequence-classification")


def _lm_options(f: Callable) -> Callable:
    """Options shared by both commands (applied in reverse so --help lists them in this order)."""
    options = [
        click.option("--objective", type=click.Choice(["mlm", "clm", *TASKS]), required=True,
                     help="mlm: masked LM (encoders); clm: causal LM (decoders); token-/sequence-classification: "
                          "a task head on labelled --data."),
        click.option("--text", "text", default=None, type=click.Path(dir_okay=False),
                     help="Training corpus for mlm/clm: a plain UTF-8 text file."),
        click.option("--data", "data", default=None, type=click.Path(dir_okay=False),
                     help="Labelled training data for a task objective (CoNLL-U, CoNLL/IOB2, JSONL, CSV/TSV)."),
        click.option("--source", "sources", multiple=True, nargs=2, metavar="DATA DIFF",
                     type=click.Path(dir_okay=False),
                     help="Multi-source training (instead of --data, repeatable): labelled DATA trained with "
                          "the language diff DIFF applied; batches are taken from each source in turn."),
        click.option("--on", "on", multiple=True, metavar="DIFF", type=click.Path(dir_okay=False),
                     help="Train on top of this diff (a language SFT; repeatable): applied without its dense "
                          "entries while training and not part of the result."),
        click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
                     help="The .sft file to write."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-5, show_default=True, help="Peak AdamW learning rate."),
        click.option("--schedule", type=click.Choice(SCHEDULES), default=DEFAULT_SCHEDULE, show_default=True,
                     help="Learning rate over each phase: linear decay to 0, or constant (after any warmup)."),
        click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Steps of linear warmup at the start of each phase."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--seq-len", type=click.IntRange(min=2), default=DEFAULT_SEQ_LEN, show_default=True,
                     help="Tokens per training block or input (at most the model's positions)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seeds head initialization, shuffling, masking and dropout (reapplied each phase)."),
        click.option("--eval-text", type=click.Path(dir_okay=False), default=None,
                     help="Held-out text (mlm/clm): its loss is reported before and after training."),
        click.option("--eval-data", type=click.Path(dir_okay=False), default=None,
                     help="Held-out labelled data (task objectives): accuracy before and after training."),
        click.option("--format", "data_format", type=click.Choice(["auto", "conllu", "conll", "jsonl", "csv", "tsv"]),
                     default="auto", show_default=True,
                     help="Format of --data/--eval-data (auto: from the extension)."),
        click.option("--label-column", default=None,
                     help="CoNLL-U column or JSONL tags key (token classification; default UPOS / tags), or the "
                          "label column/key (sequence classification; default label)."),
        click.option("--text-column", default="text", show_default=True,
                     help="Text column/key (sequence classification)."),
        click.option("--pair-column", default="text_pair", show_default=True,
                     help="Second-text column/key, when present (sequence classification of pairs)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _check_inputs(objective: str, text: str | None, eval_text: str | None, data: str | None,
                  eval_data: str | None, sources: tuple[tuple[str, str], ...]) -> None:
    """The data options that go with the objective (usage errors, before anything is read)."""
    from ..errors import UsageError

    if objective in TASKS:
        wrong = "--text" if text else "--eval-text" if eval_text else None
        if wrong:
            raise UsageError(f"{wrong} is for --objective mlm/clm; give labelled data with --data (and --eval-data)")
        if (data is None) == (not sources):
            raise UsageError(f"--objective {objective} needs labelled data: give --data FILE, or --source DATA DIFF "
                             f"(repeatable) for multi-source training, not both")
        return
    wrong = "--data" if data else "--eval-data" if eval_data else "--source" if sources else None
    if wrong:
        raise UsageError(f"{wrong} is for the task objectives ({', '.join(TASKS)}); give --objective {objective} "
                         f"a text corpus with --text")
    if text is None:
        raise UsageError(f"--objective {objective} needs a text corpus: give --text FILE")


class _Run:
    """Checks, model, tokenizer, base checkpoint, diffs to train on and batches for one command,
    and the shared reporting. Everything that can be refused without loading the model is refused first."""

    def __init__(self, base: str, objective: str, out: str, force: bool, batch_size: int, seq_len: int, seed: int,
                 device: str, quiet: bool, *, text: str | None, eval_text: str | None, data: str | None,
                 eval_data: str | None, sources: tuple[tuple[str, str], ...], on: tuple[str, ...],
                 data_options: dict[str, Any], verify: bool = True):
        from ..atomic import check_can_create, check_not_input
        from ..checkpoint import Checkpoint
        from ..labelled import read_task_data
        from ..text import check_objective, check_text_file, max_block_length, read_config
        from ..train import verify_on

        inputs = [base, *(p for p in (text, eval_text, data, eval_data) if p), *(p for pair in sources for p in pair), *on]
        check_not_input(out, inputs)  # inputs are never modified, not even with --force
        check_can_create(Path(out), force)  # fail before training, not after
        _check_inputs(objective, text, eval_text, data, eval_data, sources)
        self.task = objective in TASKS
        config = read_config(base)
        self.notes = []  # said once the inputs are known to be usable
        self.data = [data] if data is not None else [path for path, _ in sources]
        self.data_options = data_options
        if self.task:  # a bad file fails here, before any model loads
            self.task_data = read_task_data(objective, self.data, eval_data=eval_data, **data_options)
        else:
            for path in (text, eval_text):
                if path is not None:
                    check_text_file(path)
            check_objective(config, objective, base)
            limit = max_block_length(config)
            if limit is not None and seq_len > limit:
                self.notes.append(f"--seq-len {seq_len} is longer than the model's {limit} positions; using {limit}")
                seq_len = limit
        self.ckpt = Checkpoint.open(base)
        self.warnings: list[str] = []
        paths = [*on, *(path for _, path in sources)]
        diffs = [open_diff(path, base=self.ckpt) for path in paths]
        verify_on(self.ckpt, diffs, verify=verify, warn=self.warnings.append, labels=paths)  # as apply checks them
        self.on, self.source_diffs = diffs[:len(on)], diffs[len(on):]
        self.base, self.text, self.eval_text, self.eval_data = base, text, eval_text, eval_data
        self.objective = objective
        self.batch_size, self.seq_len, self.seed, self.device, self.quiet = batch_size, seq_len, seed, device, quiet

    def load(self) -> None:
        """The model (its load report summed up in one line) and the batches."""
        import torch

        from ..text import pick_device

        for note in self.notes:
            say(f"sftdiff: {note}", self.quiet)
        for warning in self.warnings:
            say(f"sftdiff: warning: {warning}", self.quiet)
        device = pick_device(self.device)
        torch.manual_seed(self.seed)  # a new head's initialization
        if self.task:
            self._load_task()
        else:
            self._load_lm()
        self.model.to(device)
        new, unused = self.new_parameters(), self.unused_parameters()
        parts = []  # transformers' load report, in one line
        if new:
            parts.append(f"new in the {self.objective} model: {_names(new)}, initialized from seed {self.seed} "
                         f"and trained densely")
        if unused:
            parts.append(f"unused by it: {_names(unused)}")
        if parts:
            say("sftdiff: " + "; ".join(parts), self.quiet)
        self._say_what_on_leaves_out()

    def _load_lm(self) -> None:
        from ..text import lm_batches, load_language_model, read_blocks

        self.model, tokenizer = load_language_model(self.base, self.objective)
        blocks = read_blocks(self.text, tokenizer, self.seq_len, self.objective)
        self.batches = lm_batches(blocks, self.batch_size, self.objective, tokenizer, self.seed)
        self.eval_batches = None
        if self.eval_text is not None:
            held_out = read_blocks(self.eval_text, tokenizer, self.seq_len, self.objective)
            self.eval_batches = lm_batches(held_out, self.batch_size, self.objective, tokenizer, self.seed,
                                           shuffle=False)
        self.settings = {"objective": self.objective, "batch_size": self.batch_size, "seq_len": self.seq_len,
                         "seed": self.seed, "corpus": Path(self.text).name, "blocks": len(self.batches.blocks)}
        self.config_patch, self.labels = None, None

    def _load_task(self) -> None:
        from ..labelled import prepare_task
        from ..train import Sources

        task = prepare_task(self.base, self.objective, self.data, eval_data=self.eval_data,
                            batch_size=self.batch_size, seq_len=self.seq_len, seed=self.seed, **self.data_options,
                            read=self.task_data)  # read once, in __init__
        if task.seq_len < self.seq_len:
            say(f"sftdiff: --seq-len {self.seq_len} is longer than the model takes; using {task.seq_len}", self.quiet)
        self.model, self.eval_batches, self.settings = task.model, task.eval_batches, task.settings
        self.config_patch, self.labels = task.config_patch, list(task.labels.labels)
        self.batches = task.batches
        if self.source_diffs:  # multi-source: one batch from each source in turn, its language diff applied
            self.batches = Sources([(b, [d]) for b, d in zip(task.source_batches, self.source_diffs)])

    def _say_what_on_leaves_out(self) -> None:
        """--on/--source diffs go on without their dense entries (an MLM head is no part of a task
        model), and entries for parameters this model lacks are skipped: say so once per diff."""
        from ..inplace import apply_to_model, revert_from_model

        for diff in self.on + self.source_diffs:
            record = apply_to_model(self.model, diff, with_dense=False, strict=False)  # also checks the shapes
            revert_from_model(self.model, record)
            left = _left_out(diff, record.skipped, self.objective)
            if left:
                say(f"sftdiff: {diff.path}: trained on top of without {left}", self.quiet)

    @property
    def eval_on(self) -> list["SparseDiff"]:
        """The diffs held-out data is evaluated on top of: --on, and the first --source's diff."""
        return self.on + self.source_diffs[:1]

    def _spelling(self) -> dict[str, str]:
        from ..train import base_spelling

        return base_spelling(dict(self.model.named_parameters()), self.ckpt.tensors)

    def new_parameters(self) -> list[str]:
        """Model parameters the base lacks (an MLM or task head on a bare encoder): trained densely."""
        return sorted(b for b in self._spelling().values() if b not in self.ckpt.tensors)

    def unused_parameters(self) -> list[str]:
        """Base parameters the model does not have (a pooler under an MLM head): left as they are."""
        used = set(self._spelling().values())
        return sorted(n for n in self.ckpt.float_names() if n not in used and n not in self.ckpt.aliases)

    def held_out(self) -> float | None:
        """Held-out loss (mlm/clm) or accuracy (task objectives), with the --on diffs applied."""
        from ..train import applied_on, evaluate

        if self.eval_batches is None:
            return None
        if not self.task:
            return evaluate(self.model, self.eval_batches, on=self.eval_on)
        from ..evaluate import accuracy

        with applied_on(self.model, self.eval_on):
            return accuracy(self.model, self.eval_batches)

    def finish(self, command: str, diff: "SparseDiff", out: str, force: bool, before: float | None,
               as_json: bool, warnings: list[str]) -> None:
        """Record the run in the diff, save it, and report."""
        after = self.held_out()
        metric = "held_out_accuracy" if self.task else "held_out_loss"
        diff.meta.origin.update(self.settings, **{metric: after})
        if self.config_patch is not None:
            diff.meta.config_patch = self.config_patch  # the label set: a baked model loads with its head
        diff.save(out, overwrite=force)
        infos = diff.infos()
        sparse = sum(1 for e in infos if e.kind == "sparse")
        dense = sum(1 for e in infos if e.kind == "dense")
        dropped = diff.meta.origin.get("unchanged_dropped", 0)
        lines = [f"wrote {out}: {diff.nnz} values in {sparse} tensors, {dense} dense tensors"
                 + (f" ({dropped} trained values dropped: too small to change their weight)" if dropped else "")]
        if self.on or self.source_diffs:
            lines.append("trained on top of " + ", ".join(str(d.path) for d in self.on + self.source_diffs)
                         + " (not included in the result)")
        if after is not None:
            what = "accuracy" if self.task else "loss"
            lines.append(f"held-out {what}: {before:.4f} (base) -> {after:.4f} (trained)")
        summary = {"command": command, "output": out, "nnz": diff.nnz, "sparse_tensors": sparse,
                   "dense_tensors": dense, "unchanged_dropped": dropped, "warnings": self.warnings + warnings,
                   "held_out_loss": None, "origin": diff.meta.origin}
        summary[metric] = None if after is None else {"base": before, "trained": after}
        if self.task:
            summary["labels"] = self.labels
        report(summary, "\n".join(lines), as_json=as_json, quiet=self.quiet)


def _names(names: list[str]) -> str:
    """A short description of parameter names: their common dotted prefix, or the first few."""
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    listed = ".".join(common) + ".*" if common else ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{listed} ({len(names)} tensors)"


def _data_options(data_format: str, label_column: str | None, text_column: str, pair_column: str) -> dict[str, Any]:
    return {"format": data_format, "label_column": label_column, "text_column": text_column,
            "pair_column": pair_column}


@click.command("retrain")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("diff")
@_lm_options
@click.option("--steps", type=click.IntRange(min=0), default=1000, show_default=True, help="Training steps.")
@click.option("--l1-reg", type=float, default=0.0, show_default=True, help="L1 pull of the values towards the base.")
@click.option("--no-verify", is_flag=True, help="Skip the base fingerprint check (shapes and bounds are always checked).")
@user_field_options
@force_option
@json_option
@quiet_option
def retrain_cmd(base: str, diff: str, objective: str, text: str | None, data: str | None,
                sources: tuple[tuple[str, str], ...], on: tuple[str, ...], out: str, lr: float, schedule: str,
                warmup_steps: int, batch_size: int, seq_len: int, seed: int, eval_text: str | None,
                eval_data: str | None, data_format: str, label_column: str | None, text_column: str, pair_column: str,
                device: str, steps: int, l1_reg: float, no_verify: bool, description: str | None, kind: str | None,
                language: str | None, task: str | None, force: bool, as_json: bool, quiet: bool) -> None:
    """Retrain exactly DIFF's entries from BASE (an HF model folder) on a text corpus or labelled data."""
    from ..atomic import check_not_input
    from ..train import base_info, sparse_retrain
    from ..verify import verify_against_base

    check_not_input(out, [diff])
    run = _Run(base, objective, out, force, batch_size, seq_len, seed, device, quiet, text=text, eval_text=eval_text,
               data=data, eval_data=eval_data, sources=sources, on=on, verify=not no_verify,
               data_options=_data_options(data_format, label_column, text_column, pair_column))
    source = open_diff(diff, base=run.ckpt)
    match = verify_against_base(source, run.ckpt, label=diff, fingerprint=not no_verify)  # as apply does
    for warning in match.warnings:
        say(f"sftdiff: warning: {warning}", quiet)
    run.load()
    mask = source if not run.task else _task_mask(run, source, diff)
    before = run.held_out()
    trained, _ = sparse_retrain(run.model, mask, run.batches, steps=steps, lr=lr, schedule=schedule,
                                warmup_steps=warmup_steps, seed=seed, dense=run.new_parameters(), l1_reg=l1_reg,
                                base_names=run.ckpt.tensors, keep_trained=True, progress=not quiet, on=run.on)
    trained.meta.origin.update(source=Path(diff).name)
    trained.meta.base = base_info(run.ckpt, trained)
    trained.meta.user = {**source.meta.user, **user_fields(description=description, kind=kind, language=language,
                                                           task=task)}
    run.finish("retrain", trained, out, force, before, as_json, match.warnings)


def _task_mask(run: _Run, source: "SparseDiff", label: str) -> dict[str, Any]:
    """The sparse entries of DIFF that the task model has, as a mask (its dense entries, e.g. a
    language SFT's MLM head, are no part of a task model: the new head is trained densely). A
    DIFF with a label set must have the data's."""
    from ..errors import UsageError

    patch = source.meta.config_patch or {}
    if "id2label" in patch and patch.get("num_labels", len(patch["id2label"])) != len(run.labels):
        raise UsageError(f"{label} was trained for {len(patch['id2label'])} labels but the data has "
                         f"{len(run.labels)}; retrain on data with the same label set")
    present = set(run._spelling().values())
    mask = {n: e.indices for n, e in source.entries.items() if source.info(n).kind == "sparse" and n in present}
    lacking = [n for n in source.entries if n not in mask and source.info(n).kind == "sparse"]
    left = _left_out(source, lacking, run.objective)
    if left:
        say(f"sftdiff: {label}: retraining without {left}", run.quiet)
    return mask


def _left_out(diff: "SparseDiff", lacking: list[str], objective: str) -> str:
    """What of a diff a task model cannot take, in words ("" when nothing)."""
    dense = sorted(n for n in diff.entries if diff.info(n).kind == "dense")
    parts = []
    if dense:
        parts.append(f"its dense entries {_names(dense)} (dense entries are not applied: a language SFT's MLM "
                     f"head is no part of a task model)")
    if lacking:
        parts.append(f"its entries for parameters the {objective} model lacks: {_names(sorted(lacking))}")
    return " and ".join(parts)


@click.command("train")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@_lm_options
@budget_options
@click.option("--full-steps", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Steps of full fine-tuning (phase 1).")
@click.option("--sparse-steps", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Steps of sparse retraining (phase 2).")
@click.option("--sparse-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate of phase 2 (default: --lr); training only k values often wants a larger one.")
@click.option("--reset-dense/--keep-dense", default=DEFAULT_RESET_DENSE, show_default=True,
              help="Reset the densely trained parameters (a new head) to their initial values before phase 2, "
                   "as the paper does, or keep training them from phase 1 (docs/train.md: Two procedures).")
@click.option("--full-l1-reg", type=float, default=0.0, show_default=True, help="L1 pull towards the base, phase 1.")
@click.option("--sparse-l1-reg", type=float, default=0.0, show_default=True, help="L1 pull towards the base, phase 2.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Never train these parameters (repeatable).")
@click.option("--dense", multiple=True, metavar="GLOB", help="Train these densely, as dense entries (repeatable).")
@click.option("--no-verify", is_flag=True, help="Skip the base fingerprint check of --on/--source diffs.")
@user_field_options
@force_option
@json_option
@quiet_option
def train_cmd(base: str, objective: str, text: str | None, data: str | None, sources: tuple[tuple[str, str], ...],
              on: tuple[str, ...], out: str, lr: float, schedule: str, warmup_steps: int, batch_size: int,
              seq_len: int, seed: int, eval_text: str | None, eval_data: str | None, data_format: str,
              label_column: str | None, text_column: str, pair_column: str, device: str, k: int | None,
              density: float | None, full_steps: int, sparse_steps: int, sparse_lr: float | None, reset_dense: bool,
              full_l1_reg: float, sparse_l1_reg: float, exclude: tuple[str, ...], dense: tuple[str, ...],
              no_verify: bool, description: str | None, kind: str | None, language: str | None, task: str | None,
              force: bool, as_json: bool, quiet: bool) -> None:
    """Run LT-SFT on BASE (an HF model folder): full fine-tuning, top-k, reset, sparse retraining."""
    from ..train import lottery_ticket_sft

    k, density = budget(k, density)
    run = _Run(base, objective, out, force, batch_size, seq_len, seed, device, quiet, text=text, eval_text=eval_text,
               data=data, eval_data=eval_data, sources=sources, on=on, verify=not no_verify,
               data_options=_data_options(data_format, label_column, text_column, pair_column))
    run.load()
    before = run.held_out()
    diff = lottery_ticket_sft(run.model, run.batches, k=k, density=density, full_steps=full_steps,
                              sparse_steps=sparse_steps, lr=lr, sparse_lr=sparse_lr, schedule=schedule,
                              warmup_steps=warmup_steps, reset_dense=reset_dense, seed=seed, dense_globs=dense,
                              exclude_globs=exclude, full_l1_reg=full_l1_reg, sparse_l1_reg=sparse_l1_reg,
                              base=run.ckpt, keep_trained=True, progress=not quiet, on=run.on,
                              verify=False)  # the digests were checked (or --no-verify) before the model loaded
    diff.meta.user = user_fields(description=description, kind=kind, language=language, task=task)
    warning = concentration_warning(diff)
    if warning:
        say(f"sftdiff: warning: {warning}", quiet)
    run.finish("train", diff, out, force, before, as_json, [warning] if warning else [])


def concentration_warning(diff: "SparseDiff", share: float = 0.9) -> str | None:
    """A warning when one tensor took most of k. A tensor tied to the output layer (the word
    embeddings under a masked-LM head) gets a dense gradient, so Adam moves all of it by about the
    learning rate each step and its |delta| fills the top-k, leaving the layers nothing."""
    counts = {i.name: i.nnz for i in diff.infos() if i.kind == "sparse"}
    total = sum(counts.values())
    if not total:
        return None
    name, top = max(counts.items(), key=lambda item: item[1])
    if top < share * total:
        return None
    return (f"{name} holds {top / total:.0%} of the {total:,} selected values; if it is tied to the output "
            f"layer, exclude it (--exclude '{name}') so that k goes to the transformer layers")
