"""`sftdiff apply`: bake a base plus diffs into a standalone checkpoint folder."""

from __future__ import annotations

import click

from ..errors import UsageError
from .common import force_option, json_option, open_diff, quiet_option, report, say


@click.command("apply")
@click.argument("base", metavar="BASE")
@click.argument("diffs", metavar="DIFF...", nargs=-1, required=True)
@click.option("--output", "-o", "out", required=True, help="Folder to write the checkpoint to (must not exist unless --force).")
@click.option("--scale", "scales", type=float, multiple=True,
              help="Factor for a diff's sparse values; repeat once per DIFF, in order (one value applies to all).")
@click.option("--skip-dense", "skip_dense", multiple=True, metavar="DIFF",
              help="Apply this DIFF without its dense entries and config patch (e.g. a language diff's MLM head). Repeatable.")
@click.option("--dtype", type=click.Choice(["keep", "float32", "bfloat16", "float16"]), default="keep",
              show_default=True, help="Dtype of the output's floating-point weights.")
@click.option("--shard-size", default="50GB", show_default=True,
              help="Largest shard file, with a unit (500MB, 2GB, 2GiB); above it the weights are split and "
                   "indexed like save_pretrained does.")
@click.option("--no-verify", is_flag=True, help="Skip the base fingerprint check (shapes and bounds are always checked).")
@force_option
@quiet_option
@json_option
def apply_cmd(base: str, diffs: tuple[str, ...], out: str, scales: tuple[float, ...], skip_dense: tuple[str, ...],
              dtype: str, shard_size: str, no_verify: bool, force: bool, quiet: bool, as_json: bool) -> None:
    """Apply DIFFs (in order) to the checkpoint BASE and write the result to OUT.

    OUT is a checkpoint folder that transformers loads like BASE: same tensor names, shapes and
    dtypes, BASE's tokenizer and other files, and config.json with the diffs' config patches.
    """
    from ..bake import bake, parse_size
    from ..checkpoint import Checkpoint
    from ..sources import check_order, with_dense_flags
    from ..summary import human_size

    check_order("apply", base, diffs, "-o OUT")
    with_dense = with_dense_flags(diffs, skip_dense)
    if scales and len(scales) not in (1, len(diffs)):
        raise UsageError(f"got {len(scales)} --scale values for {len(diffs)} diffs; give one per diff or one for all")
    parse_size(shard_size)  # refuse a bad size before reading anything
    checkpoint = Checkpoint.open(base)
    loaded = [open_diff(d, base=checkpoint) for d in diffs]
    notes: list[str] = []

    def warn(message: str) -> None:
        notes.append(message)
        say(f"sftdiff: warning: {message}")

    result = bake(
        checkpoint, loaded, out,
        scales=list(scales) or None,
        with_dense=with_dense,
        dtype=dtype, shard_size=shard_size, verify=not no_verify, force=force, progress=not quiet and not as_json,
        warn=warn,
    )
    added = f", {len(result.added)} added" if result.added else ""
    text = (f"wrote {result.path}: {result.tensors} tensors ({result.changed} changed{added}), "
            f"{result.shards} shard{'s' if result.shards > 1 else ''}, {human_size(result.nbytes)}")
    summary = {"command": "apply", "base": base, "diffs": list(diffs), "output": str(result.path),
               "scales": list(scales) if len(scales) == len(diffs) else [scales[0] if scales else 1.0] * len(diffs),
               "with_dense": with_dense, "dtype": dtype, "tensors": result.tensors, "changed": result.changed,
               "added": result.added, "shards": result.shards, "bytes": result.nbytes, "verified": not no_verify,
               "warnings": notes}
    report(summary, text, as_json=as_json, quiet=quiet)
