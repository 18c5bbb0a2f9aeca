"""`sftdiff merge`: many diffs into one with TIES, DARE, DARE-TIES or a weighted sum (numpy only)."""

from __future__ import annotations

import click

from .algebra import _check_output, _finish, _Notes, _weights
from .common import force_option, json_option, open_diff, quiet_option


@click.command("merge")
@click.argument("diffs", nargs=-1, required=True, metavar="DIFF...")
@click.option("--output", "-o", "output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the merged .sft file.")
@click.option("--method", "-m", type=click.Choice(["ties", "dare", "dare-ties", "sum"]), required=True,
              help="ties: trim, elect sign, disjoint mean; dare: random drop and rescale, then sum; "
                   "dare-ties: DARE's drop, then TIES' election; sum: weighted sum.")
@click.option("--weights", "-w", default=None, help="Comma-separated weight per diff (default: all 1).")
@click.option("--density", "-d", type=float, default=None,
              help="ties: keep this fraction of each diff's stored values per parameter, by magnitude "
                   "(default: no trim). Relative to stored values, not to the parameter's size.")
@click.option("--drop", "-p", type=float, default=None,
              help="dare, dare-ties: probability of dropping each stored value (0 <= P < 1).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random drop.")
@click.option("--scale", "scale", type=float, default=1.0, show_default=True,
              help="Multiply the merged deltas by this factor (lambda); dense entries are kept as they are.")
@click.option("--dtype", default=None, help="Value dtype of the result: float32, bfloat16 or float16 "
              "(default: the inputs' dtype if they share one, else float32).")
@click.option("--ignore-base", is_flag=True, help="Merge diffs even if they record different base models.")
@force_option
@quiet_option
@json_option
def merge_cmd(diffs: tuple[str, ...], output: str, method: str, weights: str | None, density: float | None,
              drop: float | None, seed: int, scale: float, dtype: str | None, ignore_base: bool, force: bool,
              quiet: bool, as_json: bool) -> None:
    """Merge DIFFs of one base into one diff (TIES, DARE, DARE-TIES or a weighted sum).

    A position a diff does not store is a zero delta: it neither votes in TIES' sign election nor
    counts in its mean. Dense entries are not merged: the last diff with a dense value for a
    parameter wins (as apply does), and the sparse deltas of the diffs after it are merged and
    added onto it.
    """
    from ..merge import merge

    _check_output(output, diffs)
    operands = [open_diff(d) for d in diffs]
    notes = _Notes()
    result = merge(*operands, method=method, weights=_weights(weights, len(diffs)), density=density, drop=drop,
                   seed=seed, scale=scale, dtype=dtype, ignore_base=ignore_base, warn=notes)
    provenance = result.meta.provenance or {}
    extra = {key: provenance.get(key) for key in ("method", "weights", "density", "drop", "seed", "scale", "dtype")}
    extra["input_nnz"] = [d.nnz for d in operands]
    _finish("merge", result, output, list(diffs), notes, force=force, quiet=quiet, as_json=as_json, extra=extra)
