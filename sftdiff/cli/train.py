"""`sftdiff retrain` and `sftdiff train`: language SFTs (masked or causal LM) from a text corpus."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from .common import budget, budget_options, force_option, open_diff, quiet_option, say, user_field_options, user_fields

if TYPE_CHECKING:
    from ..diff import SparseDiff


def _lm_options(f: Callable) -> Callable:
    """Options shared by both commands (applied in reverse so --help lists them in this order)."""
    options = [
        click.option("--text", "text", required=True, type=click.Path(dir_okay=False),
                     help="Training corpus: a plain UTF-8 text file."),
        click.option("--objective", type=click.Choice(["mlm", "clm"]), required=True,
                     help="mlm: masked LM (encoders); clm: causal LM (decoders)."),
        click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
                     help="The .sft file to write."),
        click.option("--lr", type=float, default=5e-5, show_default=True, help="AdamW learning rate."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True,
                     help="Tokens per training block."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seeds head initialization, shuffling and masking."),
        click.option("--eval-text", type=click.Path(dir_okay=False), default=None,
                     help="Held-out text: its loss is reported before and after training."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


class _Run:
    """Model, tokenizer, base checkpoint and batches for one command, and the shared reporting."""

    def __init__(self, base: str, text: str, objective: str, out: str, force: bool, batch_size: int,
                 seq_len: int, seed: int, device: str, eval_text: str | None, quiet: bool):
        import torch

        from ..atomic import check_can_create
        from ..checkpoint import Checkpoint
        from ..text import load_language_model, lm_batches, pick_device, read_blocks

        check_can_create(Path(out), force)  # fail before training, not after
        self.device = pick_device(device)
        torch.manual_seed(seed)  # a new head's initialization
        self.ckpt = Checkpoint.open(base)
        self.model, tokenizer = load_language_model(base, objective)
        self.model.to(self.device)
        self.batches = lm_batches(read_blocks(text, tokenizer, seq_len, objective), batch_size, objective,
                                  tokenizer, seed)
        self.eval_batches = None
        if eval_text is not None:
            held_out = read_blocks(eval_text, tokenizer, seq_len, objective)
            self.eval_batches = lm_batches(held_out, batch_size, objective, tokenizer, seed, shuffle=False)
        self.quiet = quiet
        self.settings = {"objective": objective, "batch_size": batch_size, "seq_len": seq_len, "seed": seed,
                         "corpus": Path(text).name, "blocks": len(self.batches.blocks)}

    def new_parameters(self) -> list[str]:
        """Model parameters the base lacks (an MLM head on a bare encoder): trained densely."""
        from ..train import base_spelling

        spelling = base_spelling(dict(self.model.named_parameters()), self.ckpt.tensors)
        return sorted(b for b in spelling.values() if b not in self.ckpt.tensors)

    def held_out(self) -> float | None:
        from ..train import evaluate

        return evaluate(self.model, self.eval_batches) if self.eval_batches is not None else None

    def finish(self, diff: Any, out: str, force: bool, before: float | None) -> None:
        diff.save(out, overwrite=force)
        sparse = [e for e in diff.infos() if e.kind == "sparse"]
        dense = [e for e in diff.infos() if e.kind == "dense"]
        say(f"wrote {out}: {diff.nnz} values in {len(sparse)} tensors, {len(dense)} dense tensors", self.quiet)
        after = diff.meta.origin.get("held_out_loss")
        if after is not None:
            click.echo(f"held-out loss: {before:.4f} (base) -> {after:.4f} (trained)")


@click.command("retrain")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@click.argument("diff")
@_lm_options
@click.option("--steps", type=click.IntRange(min=0), default=1000, show_default=True, help="Training steps.")
@click.option("--l1-reg", type=float, default=0.0, show_default=True, help="L1 pull of the values towards the base.")
@user_field_options
@force_option
@quiet_option
def retrain_cmd(base: str, diff: str, text: str, objective: str, out: str, lr: float, batch_size: int, seq_len: int,
                seed: int, eval_text: str | None, device: str, steps: int, l1_reg: float, description: str | None,
                kind: str | None, language: str | None, task: str | None, force: bool, quiet: bool) -> None:
    """Retrain exactly DIFF's entries from BASE (an HF model folder) on a text corpus."""
    from ..diff import DiffMeta
    from ..train import base_info, loss_ends, sparse_retrain

    run = _Run(base, text, objective, out, force, batch_size, seq_len, seed, device, eval_text, quiet)
    source = open_diff(diff, base=run.ckpt)
    before = run.held_out()
    trained, losses = sparse_retrain(run.model, source, run.batches, steps=steps, lr=lr, dense=run.new_parameters(),
                                     l1_reg=l1_reg, base_names=run.ckpt.tensors, keep_trained=True,
                                     progress=not quiet)
    origin = {"tool": "sftdiff", "method": "retrain", "source": Path(diff).name, "k": trained.nnz, "steps": steps,
              "lr": lr, "l1_reg": l1_reg, **run.settings, "loss": loss_ends(losses), "held_out_loss": run.held_out()}
    user = {**source.meta.user, **user_fields(description=description, kind=kind, language=language, task=task)}
    trained.meta = DiffMeta(base=base_info(run.ckpt, trained), origin=origin, user=user)
    run.finish(trained, out, force, before)


@click.command("train")
@click.argument("base", type=click.Path(exists=True, file_okay=False))
@_lm_options
@budget_options
@click.option("--full-steps", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Steps of full fine-tuning (phase 1).")
@click.option("--sparse-steps", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Steps of sparse retraining (phase 2).")
@click.option("--sparse-lr", type=float, default=None,
              help="Learning rate of phase 2 (default: --lr); training only k values often wants a larger one.")
@click.option("--full-l1-reg", type=float, default=0.0, show_default=True, help="L1 pull towards the base, phase 1.")
@click.option("--sparse-l1-reg", type=float, default=0.0, show_default=True, help="L1 pull towards the base, phase 2.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Never train these parameters (repeatable).")
@click.option("--dense", multiple=True, metavar="GLOB", help="Train these densely, as dense entries (repeatable).")
@user_field_options
@force_option
@quiet_option
def train_cmd(base: str, text: str, objective: str, out: str, lr: float, batch_size: int, seq_len: int, seed: int,
              eval_text: str | None, device: str, k: int | None, density: float | None, full_steps: int,
              sparse_steps: int, sparse_lr: float | None, full_l1_reg: float, sparse_l1_reg: float,
              exclude: tuple[str, ...],
              dense: tuple[str, ...], description: str | None, kind: str | None, language: str | None,
              task: str | None, force: bool, quiet: bool) -> None:
    """Run LT-SFT on BASE (an HF model folder): full fine-tuning, top-k, reset, sparse retraining."""
    from ..train import lottery_ticket_sft

    k, density = budget(k, density)
    run = _Run(base, text, objective, out, force, batch_size, seq_len, seed, device, eval_text, quiet)
    before = run.held_out()
    diff = lottery_ticket_sft(run.model, run.batches, k=k, density=density, full_steps=full_steps,
                              sparse_steps=sparse_steps, lr=lr, sparse_lr=sparse_lr, dense_globs=dense,
                              exclude_globs=exclude,
                              full_l1_reg=full_l1_reg, sparse_l1_reg=sparse_l1_reg, base=run.ckpt,
                              keep_trained=True, progress=not quiet)
    diff.meta.origin.update(run.settings, held_out_loss=run.held_out())
    diff.meta.user = user_fields(description=description, kind=kind, language=language, task=task)
    warning = concentration_warning(diff)
    if warning:
        say(f"sftdiff: warning: {warning}", quiet)
    run.finish(diff, out, force, before)


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
