"""`sftdiff evaluate`: accuracy or LM loss of a base plus diffs, applied in memory (no bake)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import FormatError

from .common import json_option, quiet_option, report, say


@click.command("evaluate")
@click.argument("base", metavar="BASE", type=click.Path(exists=True))
@click.argument("diffs", metavar="[DIFF...]", nargs=-1)
@click.option("--objective", required=True,
              type=click.Choice(["token-classification", "sequence-classification", "mlm", "clm"]),
              help="What to measure: tagging accuracy, classification accuracy, masked- or causal-LM loss.")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Labelled data (CoNLL-U, CoNLL/IOB2, JSONL, CSV/TSV) or, for mlm/clm, plain UTF-8 text.")
@click.option("--format", "data_format", default="auto", show_default=True,
              type=click.Choice(["auto", "conllu", "conll", "jsonl", "csv", "tsv"]),
              help="Format of --data (auto: from the extension, else the content).")
@click.option("--label-column", default=None,
              help="CoNLL-U column of the labels (upos, xpos, deprel, ... or 3-10; default upos), or the "
                   "JSONL key / CSV column of the labels (default tags / label).")
@click.option("--text-column", default="text", show_default=True, help="JSONL key / CSV column of the text.")
@click.option("--pair-column", default="text_pair", show_default=True,
              help="JSONL key / CSV column of the second text of a pair (used when present).")
@click.option("--skip-dense", "skip_dense", multiple=True, metavar="DIFF",
              help="Apply this DIFF without its dense entries and config patch (e.g. a language diff's MLM head). "
                   "Repeatable.")
@click.option("--scale", "scales", type=float, multiple=True,
              help="Factor for a diff's sparse values; repeat once per DIFF, in order (one value applies to all), "
                   "as for apply.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=2), default=None,
              help="Tokens per input (default and maximum: what the model takes). Longer sentences are split "
                   "into several windows for token classification, truncated for sequence classification.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds MLM masking.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-verify", is_flag=True, help="Skip the base fingerprint check (shapes are always checked).")
@json_option
@quiet_option
def evaluate_cmd(base: str, diffs: tuple[str, ...], objective: str, data: str, data_format: str,
                 label_column: str | None, text_column: str, pair_column: str, skip_dense: tuple[str, ...],
                 scales: tuple[float, ...], batch_size: int, seq_len: int | None, seed: int, device: str,
                 no_verify: bool, as_json: bool, quiet: bool) -> None:
    """Evaluate BASE (a model folder, or a baked one) with DIFFs applied in memory, in order, on --data.

    Prints the accuracy (token classification: of each word's first subword) or the mean token NLL
    and perplexity; the numbers equal evaluating the folder `sftdiff apply` bakes from the same inputs.
    """
    from ..evaluate import describe, evaluate
    from ..sources import check_order, with_dense_flags

    check_order("evaluate", base, diffs, f"--objective {objective} --data {data}")
    if not Path(base).is_dir():
        raise FormatError(f"{base}: not a model folder; BASE is a folder with config.json, weights and tokenizer")
    with_dense = with_dense_flags(diffs, skip_dense)  # as apply matches them: the same file however spelled
    result = evaluate(base, list(diffs), objective=objective, data=data,
                      with_dense=with_dense, scales=list(scales) or None, batch_size=batch_size, seq_len=seq_len,
                      seed=seed, device=device, format=data_format, label_column=label_column,
                      text_column=text_column, pair_column=pair_column, verify=not no_verify,
                      warn=lambda message: say(f"sftdiff: warning: {message}", quiet))
    if result.skipped:
        say(f"sftdiff: note: {len(result.skipped)} diff entries are for parameters this {objective} model lacks "
            f"and were not applied (e.g. {result.skipped[0]})", quiet)
    summary = {"command": "evaluate", "base": base, "diffs": list(diffs), "skip_dense": list(skip_dense),
               "scales": list(scales) if len(scales) == len(diffs) else [scales[0] if scales else 1.0] * len(diffs),
               "batch_size": batch_size, "seed": seed, **result.to_dict()}
    if as_json:
        report(summary, None, as_json=True)
    else:
        click.echo(describe(result))  # the result itself: stdout, like inspect's table
