"""`sftdiff inspect`: what a diff holds, or what a baked model folder was made from, as text or JSON."""

from __future__ import annotations

import click

from .common import json_option, open_diff, report, say


@click.command("inspect")
@click.argument("diff", metavar="FILE")
@json_option
@click.option("--base", default=None, help="Base checkpoint: checked against the diff as apply checks it, then "
              "gives the density relative to the whole model, and shapes for foreign diffs that lack them.")
@click.option("--no-verify", is_flag=True, help="With --base: skip the base fingerprint check (shapes are always checked).")
@click.option("--all", "show_all", is_flag=True, help="List every tensor (default: the first 50).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also draw density per layer and module type to this PNG (needs matplotlib).")
def inspect_cmd(diff: str, as_json: bool, base: str | None, no_verify: bool, show_all: bool, plot: str | None) -> None:
    """Summarize a diff FILE: metadata, totals and a per-tensor table.

    FILE may also be a model folder written by `sftdiff apply`: then the recipe it records (base,
    diffs with their fingerprints and scales, the command) is printed.
    """
    from .. import recipe

    if recipe.is_model_folder(diff):
        if base is not None or plot is not None:
            raise click.UsageError(f"{diff} is a model folder: --base and --plot apply to diffs, not to baked models")
        summary = {"command": "inspect", "kind": "baked-model", **recipe.read(diff)}
        _print(summary, recipe.render(summary), as_json)
        return
    if plot is not None:
        from ..plot import require_matplotlib

        require_matplotlib()  # before any work, not after the table is printed
    from ..summary import render, summarize

    checkpoint = None
    base_numel = None
    if base is not None:
        from ..checkpoint import Checkpoint

        checkpoint = Checkpoint.open(base)
        base_numel = checkpoint.float_numel()
    sd = open_diff(diff, base=checkpoint)
    if checkpoint is not None:
        from ..verify import verify_against_base

        # A density against a base the diff was not made from would be a silent wrong answer.
        match = verify_against_base(sd, checkpoint, label=diff, fingerprint=not no_verify)
        for message in match.warnings:
            say(f"sftdiff: warning: {message}")
    summary = {"command": "inspect", "kind": "diff", **summarize(sd, base_numel=base_numel)}
    _print(summary, render(summary, limit=None if show_all else 50), as_json)
    if plot is not None:
        from ..plot import plot_density

        plot_density(sd, plot)
        say(f"wrote {plot}")


def _print(summary: dict, text: str, as_json: bool) -> None:
    """The JSON object, or the text report, on stdout (the report is inspect's result, not a status line)."""
    if as_json:
        report(summary, None, as_json=True)
    else:
        click.echo(text)
