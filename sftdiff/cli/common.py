"""Options and helpers shared by the commands."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import click

if TYPE_CHECKING:  # not at run time: `sftdiff CMD --help` need not load the diff machinery
    from ..diff import SparseDiff


def open_diff(source: str, base: Any = None) -> SparseDiff:
    """A diff from a `.sft` file, or from any format `sftdiff.convert` recognizes."""
    from ..sources import open_diff as _open

    return _open(source, base=base)


def quiet_option(f: Callable) -> Callable:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary line.")(f)


def force_option(f: Callable) -> Callable:
    return click.option("--force", is_flag=True, help="Replace OUT if it already exists.")(f)


def user_field_options(f: Callable) -> Callable:
    """--description/--kind/--language/--task: free fields stored in the diff's metadata."""
    for name, help_ in reversed([
        ("description", "Free text describing the diff."),
        ("kind", "What the diff is, e.g. language or task."),
        ("language", "Language the diff was trained for."),
        ("task", "Task the diff was trained for."),
    ]):
        f = click.option(f"--{name}", default=None, help=help_)(f)
    return f


def user_fields(**kwargs: str | None) -> dict[str, str]:
    return {k: v for k, v in kwargs.items() if v is not None}


def budget_options(f: Callable) -> Callable:
    """-k N | --density D, exactly one required (checked by `budget`)."""
    f = click.option("--density", "-d", type=float, default=None, help="Fraction of values to keep (0 < D <= 1).")(f)
    f = click.option("-k", "k", type=int, default=None, help="Number of nonzero values to keep.")(f)
    return f


def budget(k: int | None, density: float | None) -> tuple[int | None, float | None]:
    if (k is None) == (density is None):
        raise click.UsageError("give exactly one of -k N or --density D")
    if k is not None and k < 0:
        raise click.UsageError("-k must be a non-negative integer")
    if density is not None and not 0 < density <= 1:
        raise click.UsageError("--density must be in (0, 1]")
    return k, density


def say(message: str, quiet: bool = False) -> None:
    """A status line on stderr (stdout is for results, e.g. --json)."""
    if not quiet:
        click.echo(message, err=True)


def json_option(f: Callable) -> Callable:
    """--json: the command's summary as one JSON object on stdout (everything else on stderr)."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the summary as one JSON object on stdout (messages stay on stderr).")(f)


def report(summary: dict[str, Any], text: str | None, *, as_json: bool = False, quiet: bool = False) -> None:
    """End a command: `summary` as one JSON object on stdout with --json, else `text` on stderr.

    Every command that prints a summary goes through here, so `--json` output has one shape
    convention: a JSON object with a "command" key, keys sorted, non-finite floats as null.
    """
    if as_json:
        import json

        from ..summary import json_safe

        click.echo(json.dumps(json_safe(summary), indent=2, sort_keys=True, ensure_ascii=False))
    elif text:
        say(text, quiet)
