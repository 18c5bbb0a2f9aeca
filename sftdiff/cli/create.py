"""`sftdiff create`: a top-k diff from a base and a fully fine-tuned checkpoint."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import click

from .common import budget_options, force_option, json_option, quiet_option, report, user_field_options, user_fields


@click.command("create")
@click.argument("base", metavar="BASE")
@click.argument("finetuned", metavar="FINETUNED")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="The .sft file to write.")
@budget_options
@click.option("--scope", type=click.Choice(["global", "per-tensor"]), default="global", show_default=True,
              help="Top-k over all parameters, or the same fraction of each.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only parameters matching (as the base names them).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out matching parameters, e.g. '*LayerNorm*'.")
@click.option("--dense", "dense_globs", multiple=True, metavar="GLOB",
              help="Store matching parameters whole (e.g. a task head).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Dtype of the stored values (float32 reconstructs the fine-tune exactly).")
@click.option("--device", metavar="DEVICE", default=None,
              help="Scan the checkpoints with torch on DEVICE (cpu, cuda, cuda:N, auto). Helps on large "
                   "checkpoints with a CUDA GPU; the output is the same. Default: not used (numpy).")
@user_field_options
@force_option
@quiet_option
@json_option
def create_cmd(base: str, finetuned: str, out: str, k: int | None, density: float | None, scope: str,
               include: tuple[str, ...], exclude: tuple[str, ...], dense_globs: tuple[str, ...], dtype: str,
               device: str | None,
               description: str | None, kind: str | None, language: str | None, task: str | None,
               force: bool, quiet: bool, as_json: bool) -> None:
    """Keep the k largest changes FINETUNED made to BASE (checkpoint folders or .safetensors/.bin files)."""
    from ..atomic import check_can_create, check_not_input
    from ..create import check_budget, create_diff

    check_budget(k, density, scope, cli=True)  # one line, exit 2 (the library's UsageError)
    check_not_input(out, [base, finetuned])
    check_can_create(Path(out), force)  # fail before the long part, not after it
    notes: list[str] = []
    with _warnings_to_stderr(notes):
        diff = create_diff(base, finetuned, k=k, density=density, scope=scope, include=include, exclude=exclude,
                           dense=dense_globs, dtype=dtype, device=device,
                           user=user_fields(description=description, kind=kind, language=language, task=task),
                           progress=not quiet and not as_json)
    diff.save(out, overwrite=force)
    dense = [i.name for i in diff.infos() if i.kind == "dense"]
    origin = diff.meta.origin
    summary = {"command": "create", "base": base, "finetuned": finetuned, "output": out,
               "nnz": origin["nnz"], "k": origin["k"], "scope": origin["scope"], "density": origin["density"],
               "selectable": origin["selectable_numel"], "selected": origin["selected"], "dtype": origin["dtype"],
               "dense": dense, "config_patch": diff.meta.config_patch, "bytes": os.path.getsize(out),
               "warnings": notes}
    report(summary, summary_line(out, origin, dense), as_json=as_json, quiet=quiet)


@contextlib.contextmanager
def _warnings_to_stderr(notes: list[str] | None = None) -> Iterator[None]:
    """Show the library's CreateWarnings as they happen, as plain `sftdiff: warning:` lines (and
    collect them in `notes` for the summary)."""
    from ..create import CreateWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", CreateWarning)
        default = warnings.showwarning

        def show(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, CreateWarning):
                click.echo(f"sftdiff: warning: {message}", err=True)
                if notes is not None:
                    notes.append(str(message))
            else:
                default(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def summary_line(out: str, origin: dict[str, Any], dense: list[str]) -> str:
    """One line: values kept, k and density, dense entries, file size."""
    from ..summary import human_size

    nnz, k = origin["nnz"], origin["k"]
    kept = f"{nnz:,} values (k={k:,}, {origin['scope']}, density {origin['density']:.4%} of "
    kept += f"{origin['selectable_numel']:,} selectable)"
    if origin.get("selected", k) < k:
        kept += f"; only {origin['selected']:,} deltas were nonzero: kept them all"
    heads = f"{len(dense)} dense entr{'y' if len(dense) == 1 else 'ies'}"
    if dense:
        heads += " (" + ", ".join(dense[:3]) + (", …" if len(dense) > 3 else "") + ")"
    return f"wrote {out}: {kept}, {heads}, {human_size(os.path.getsize(out))}"
