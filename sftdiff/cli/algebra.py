"""`sftdiff prune|add|subtract|scale|filter|overlap`: diff algebra on files (numpy only, no torch)."""

from __future__ import annotations

from typing import Any, Callable

import click

from ..errors import UsageError
from .common import budget_options, force_option, json_option, open_diff, quiet_option, report, say


def _output_option(f: Callable) -> Callable:
    return click.option("--output", "-o", "output", required=True, type=click.Path(dir_okay=False),
                        help="Where to write the resulting .sft file.")(f)


def _dtype_option(f: Callable) -> Callable:
    return click.option("--dtype", default=None, help="Value dtype of the result: float32, bfloat16 or float16 "
                        "(default: the inputs' dtype if they share one, else float32).")(f)


def _ignore_base_option(f: Callable) -> Callable:
    return click.option("--ignore-base", is_flag=True,
                        help="Combine diffs even if they record different base models.")(f)


class _Notes:
    """Warnings of one command: printed on stderr as they come, and listed in the --json summary."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def __call__(self, message: str) -> None:
        self.items.append(message)
        say(f"sftdiff: warning: {message}")


def _check_output(output: str, inputs: tuple[str, ...] | list[str]) -> None:
    """Inputs are never modified, not even with --force."""
    from ..atomic import check_not_input

    check_not_input(output, inputs)


def _finish(command: str, result: Any, output: str, inputs: list[str], notes: _Notes, *, force: bool,
            quiet: bool, as_json: bool, extra: dict[str, Any] | None = None,
            remark: Callable[[Any], str | None] | None = None) -> None:
    """Save `result`, read it back, and report what was written (`remark` may add a note about it)."""
    from ..diff import SparseDiff

    result.save(output, overwrite=force)
    written = SparseDiff.load(output)
    infos = written.infos()
    nnz = sum(i.nnz for i in infos if i.kind == "sparse")
    note = remark(written) if remark is not None else None
    if note:
        notes(note)
    summary = {"command": command, "inputs": inputs, "output": output, "entries": len(infos), "nnz": nnz,
               "dense": sorted(i.name for i in infos if i.kind == "dense"),
               "config_patch": written.meta.config_patch, "warnings": notes.items, **(extra or {})}
    report(summary, f"wrote {output}: {len(infos)} entries, {nnz:,} nonzeros", as_json=as_json, quiet=quiet)


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
@json_option
def prune_cmd(diff: str, output: str, k: int | None, density: float | None, threshold: float | None,
              scope: str, dtype: str | None, force: bool, quiet: bool, as_json: bool) -> None:
    """Keep only the largest |values| of IN (exactly one of -k, --density, --threshold).

    Ties are broken as `create` breaks them. --density is relative to the tensors IN has sparse
    entries for. Dense entries are kept as they are. A budget that keeps every value is said so.
    """
    from ..algebra import prune

    _check_output(output, [diff])
    source = open_diff(diff)
    nnz_in = source.nnz
    budget = (f"-k {k}" if k is not None else f"--density {density}" if density is not None
              else f"--threshold {threshold}")

    def remark(written: Any) -> str | None:
        if written.nnz == nnz_in:
            return f"{budget} keeps all {nnz_in:,} nonzeros of {diff}: nothing was pruned"
        return None

    _finish("prune", prune(source, k=k, density=density, threshold=threshold, scope=scope, dtype=dtype),
            output, [diff], _Notes(), force=force, quiet=quiet, as_json=as_json, extra={"nnz_in": nnz_in},
            remark=remark)


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
@click.option("--weights", "-w", default=None, help="Comma-separated weight per diff (default: all 1); "
              "like apply's --scale, weights do not apply to dense entries.")
@click.option("--dense", "dense", type=click.Choice(["last", "error", "sum"]), default="last", show_default=True,
              help="Dense entries: last = the later diff's replaces earlier entries (what apply does); "
                   "error = refuse to overwrite any entry; sum = add the diffs' dense values (weighted).")
@_dtype_option
@_ignore_base_option
@force_option
@quiet_option
@json_option
def add_cmd(diffs: tuple[str, ...], output: str, weights: str | None, dense: str, dtype: str | None,
            ignore_base: bool, force: bool, quiet: bool, as_json: bool) -> None:
    """Add diffs so that applying the result equals applying them in order.

    Sparse values: union of indices, summed (weighted) in float64 and rounded once. A dense entry
    replaces what earlier diffs did to its parameter. Config patches: a later diff wins, key by key.
    """
    from ..algebra import add

    if len(diffs) < 2:
        raise UsageError("add needs at least two diffs")
    _check_output(output, diffs)
    operands = [open_diff(d) for d in diffs]
    notes = _Notes()
    result = add(*operands, weights=_weights(weights, len(diffs)), dense=dense, dtype=dtype,
                 ignore_base=ignore_base, warn=notes)
    _finish("add", result, output, list(diffs), notes, force=force, quiet=quiet, as_json=as_json)


@click.command("subtract")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@_output_option
@_dtype_option
@_ignore_base_option
@force_option
@quiet_option
@json_option
def subtract_cmd(a: str, b: str, output: str, dtype: str | None, ignore_base: bool, force: bool, quiet: bool,
                 as_json: bool) -> None:
    """Write A − B: the diff that, applied before B, gives what A gives.

    B's dense entries must be in A with the same value; they are removed (e.g. a language diff's
    MLM head from a language+task sum).
    """
    from ..algebra import subtract

    _check_output(output, [a, b])
    _finish("subtract", subtract(open_diff(a), open_diff(b), dtype=dtype, ignore_base=ignore_base),
            output, [a, b], _Notes(), force=force, quiet=quiet, as_json=as_json)


# A negative FACTOR (`scale IN -1`) must not be taken for an option.
@click.command("scale", context_settings={"ignore_unknown_options": True})
@click.argument("diff", metavar="IN")
@click.argument("factor", type=float, metavar="FACTOR")
@_output_option
@_dtype_option
@force_option
@quiet_option
@json_option
def scale_cmd(diff: str, factor: float, output: str, dtype: str | None, force: bool, quiet: bool,
              as_json: bool) -> None:
    """Multiply IN's sparse values by FACTOR (-1 negates); dense entries are kept as they are."""
    from ..algebra import scale

    _check_output(output, [diff])
    _finish("scale", scale(open_diff(diff), factor, dtype=dtype), output, [diff], _Notes(),
            force=force, quiet=quiet, as_json=as_json, extra={"factor": factor})


@click.command("filter")
@click.argument("diff", metavar="IN")
@_output_option
@click.option("--include", multiple=True, metavar="GLOB",
              help="Keep only entries whose name matches GLOB (repeatable; default: all).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Drop entries whose name matches GLOB (repeatable).")
@click.option("--no-dense", is_flag=True, help="Drop every dense entry (new heads, resized embeddings).")
@force_option
@quiet_option
@json_option
def filter_cmd(diff: str, output: str, include: tuple[str, ...], exclude: tuple[str, ...], no_dense: bool,
               force: bool, quiet: bool, as_json: bool) -> None:
    """Keep or drop entries of IN by name, e.g. a language diff's MLM head: --exclude 'cls.*'.

    Globs are shell-style and case-sensitive. Entries are copied unchanged. Dropping all dense
    entries drops the config patch too (it describes the head they carry). A filter that keeps
    no entry is refused (a mistyped glob), showing some of IN's entry names.
    """
    from ..algebra import filter_entries

    if not include and not exclude and not no_dense:
        raise UsageError("nothing to filter: give --include GLOB, --exclude GLOB or --no-dense")
    _check_output(output, [diff])
    source = open_diff(diff)
    notes = _Notes()
    result = filter_entries(source, include=include, exclude=exclude, dense=not no_dense, warn=notes)
    dropped = result.meta.provenance["dropped"]
    _finish("filter", result, output, [diff], notes, force=force, quiet=quiet, as_json=as_json,
            extra={"dropped": dropped, "config_patch_dropped":
                   source.meta.config_patch is not None and result.meta.config_patch is None})


@click.command("overlap")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@json_option
@click.option("--all", "show_all", is_flag=True, help="List every shared tensor (default: the first 50).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also draw overlap per layer to this PNG (needs matplotlib).")
@_ignore_base_option
def overlap_cmd(a: str, b: str, as_json: bool, show_all: bool, plot: str | None, ignore_base: bool) -> None:
    """Measure how much two diffs overlap: shared indices, Jaccard, cosine and sign agreement."""
    from ..overlap import overlap

    if plot is not None:
        from ..plot import require_matplotlib

        require_matplotlib()  # before the table is printed
    result = overlap(open_diff(a), open_diff(b), ignore_base=ignore_base)
    if as_json:
        report({"command": "overlap", **result.to_json()}, None, as_json=True)
    else:
        click.echo(result.render(limit=None if show_all else 50))  # the table is the result: stdout
    if plot is not None:
        from ..plot import plot_overlap

        plot_overlap(result, plot)
        say(f"wrote {plot}")
