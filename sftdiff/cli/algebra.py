"""`sftdiff prune|add|subtract|scale|overlap`: diff algebra on files (numpy only, no torch)."""

from __future__ import annotations

import json
from typing import Any, Callable

import click

from ..errors import UsageError
from .common import budget_options, force_option, open_diff, quiet_option, say


def _output_option(f: Callable) -> Callable:
    return click.option("--output", "-o", "output", required=True, type=click.Path(dir_okay=False),
                        help="Where to write the resulting .sft file.")(f)


def _dtype_option(f: Callable) -> Callable:
    return click.option("--dtype", default=None, help="Value dtype of the result: float32, bfloat16 or float16 "
                        "(default: the inputs' dtype if they share one, else float32).")(f)


def _ignore_base_option(f: Callable) -> Callable:
    return click.option("--ignore-base", is_flag=True,
                        help="Combine diffs even if they record different base models.")(f)


def _save(result: Any, output: str, force: bool, quiet: bool) -> None:
    from ..diff import SparseDiff

    result.save(output, overwrite=force)
    written = SparseDiff.load(output)
    say(f"wrote {output}: {len(written.entries)} entries, {written.nnz:,} nonzeros", quiet)


@click.command("prune")
@click.argument("diff", metavar="IN")
@_output_option
@budget_options
@click.option("--threshold", "-t", type=float, default=None, help="Keep values with |v| >= T.")
@click.option("--scope", type=click.Choice(["global", "per-tensor"]), default="global", show_default=True,
              help="Rank values across all tensors, or keep the budget in each tensor.")
@_dtype_option
@force_option
@quiet_option
def prune_cmd(diff: str, output: str, k: int | None, density: float | None, threshold: float | None,
              scope: str, dtype: str | None, force: bool, quiet: bool) -> None:
    """Keep only the largest |values| of IN (exactly one of -k, --density, --threshold).

    Ties are broken as `create` breaks them. --density is relative to the tensors IN has sparse
    entries for. Dense entries are kept as they are.
    """
    from ..algebra import prune

    _save(prune(open_diff(diff), k=k, density=density, threshold=threshold, scope=scope, dtype=dtype),
          output, force, quiet)


def _weights(text: str | None, count: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: give comma-separated numbers, e.g. --weights 1,0.5") from None
    if len(weights) != count:
        raise UsageError(f"--weights has {len(weights)} numbers for {count} diffs; give one per diff")
    return weights


@click.command("add")
@click.argument("diffs", nargs=-1, required=True, metavar="A B [C...]")
@_output_option
@click.option("--weights", "-w", default=None, help="Comma-separated weight per diff (default: all 1).")
@click.option("--dense", "dense", type=click.Choice(["error", "first", "last", "sum"]), default="error",
              show_default=True, help="What to do when several diffs replace the same parameter with a dense value.")
@_dtype_option
@_ignore_base_option
@force_option
@quiet_option
def add_cmd(diffs: tuple[str, ...], output: str, weights: str | None, dense: str, dtype: str | None,
            ignore_base: bool, force: bool, quiet: bool) -> None:
    """Add diffs: union of indices, values summed (weighted) in float64 and rounded once."""
    from ..algebra import add

    if len(diffs) < 2:
        raise UsageError("add needs at least two diffs")
    operands = [open_diff(d) for d in diffs]
    _save(add(*operands, weights=_weights(weights, len(diffs)), dense=dense, dtype=dtype, ignore_base=ignore_base),
          output, force, quiet)


@click.command("subtract")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@_output_option
@_dtype_option
@_ignore_base_option
@force_option
@quiet_option
def subtract_cmd(a: str, b: str, output: str, dtype: str | None, ignore_base: bool, force: bool, quiet: bool) -> None:
    """Write A − B (B may not have dense entries)."""
    from ..algebra import subtract

    _save(subtract(open_diff(a), open_diff(b), dtype=dtype, ignore_base=ignore_base), output, force, quiet)


# A negative FACTOR (`scale IN -1`) must not be taken for an option.
@click.command("scale", context_settings={"ignore_unknown_options": True})
@click.argument("diff", metavar="IN")
@click.argument("factor", type=float, metavar="FACTOR")
@_output_option
@_dtype_option
@force_option
@quiet_option
def scale_cmd(diff: str, factor: float, output: str, dtype: str | None, force: bool, quiet: bool) -> None:
    """Multiply IN's sparse values by FACTOR (-1 negates); dense entries are kept as they are."""
    from ..algebra import scale

    _save(scale(open_diff(diff), factor, dtype=dtype), output, force, quiet)


@click.command("overlap")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every shared tensor (default: the first 50).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also draw overlap per layer to this PNG (needs matplotlib).")
@_ignore_base_option
def overlap_cmd(a: str, b: str, as_json: bool, show_all: bool, plot: str | None, ignore_base: bool) -> None:
    """Measure how much two diffs overlap: shared indices, Jaccard, cosine and sign agreement."""
    from ..overlap import overlap
    from ..summary import json_safe

    report = overlap(open_diff(a), open_diff(b), ignore_base=ignore_base)
    if as_json:
        click.echo(json.dumps(json_safe(report.to_json()), indent=2, ensure_ascii=False))
    else:
        click.echo(report.render(limit=None if show_all else 50))
    if plot is not None:
        from ..plot import plot_overlap

        plot_overlap(report, plot)
        click.echo(f"wrote {plot}", err=True)
