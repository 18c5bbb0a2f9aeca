"""`sftdiff inspect`: what a diff holds, as a table or as JSON."""

from __future__ import annotations

import json

import click

from .common import open_diff


@click.command("inspect")
@click.argument("diff", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (shape: README, 'inspect --json').")
@click.option("--base", default=None, help="Base checkpoint: gives the density relative to the whole model, "
              "and shapes for foreign diffs that lack them.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor (default: the first 50).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also draw density per layer and module type to this PNG (needs matplotlib).")
def inspect_cmd(diff: str, as_json: bool, base: str | None, show_all: bool, plot: str | None) -> None:
    """Summarize a diff FILE: metadata, totals and a per-tensor table."""
    from ..summary import json_safe, render, summarize

    checkpoint = None
    base_numel = None
    if base is not None:
        from ..checkpoint import Checkpoint

        checkpoint = Checkpoint.open(base)
        base_numel = checkpoint.float_numel()
    sd = open_diff(diff, base=checkpoint)
    summary = summarize(sd, base_numel=base_numel)
    if as_json:
        click.echo(json.dumps(json_safe(summary), indent=2, ensure_ascii=False))
    else:
        click.echo(render(summary, limit=None if show_all else 50))
    if plot is not None:
        from ..plot import plot_density

        plot_density(sd, plot)
        click.echo(f"wrote {plot}", err=True)
