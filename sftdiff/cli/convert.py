"""`sftdiff convert`: between `.sft` and other frameworks' formats."""

from __future__ import annotations

import click

from .common import force_option, json_option, quiet_option, report, say

_IMPORT = ["sft", "composable-sft", "peft-sft", "lora", "task-vector"]
_EXPORT = _IMPORT + ["npz"]


@click.command("convert")
@click.argument("source", metavar="IN")
@click.option("-o", "--output", "output", required=True, metavar="OUT", help="Where to write the result.")
@click.option("--from", "from_format", type=click.Choice(_IMPORT), default=None,
              help="Format of IN (default: detected from its name or adapter_config.json).")
@click.option("--to", "to_format", type=click.Choice(_EXPORT), default=None,
              help="Format of OUT (default: from its extension: .sft, .npz, .bin, .safetensors; --rank means lora).")
@click.option("--base", default=None, help="Base checkpoint (path or Hub id): shapes for PEFT-SFT adapters, "
              "names spelled as the base spells them, deltas of dense entries for task vectors.")
@click.option("-k", "k", type=int, default=None, help="Keep the K largest values (LoRA and task vectors: of ΔW).")
@click.option("--density", "-d", type=float, default=None,
              help="Keep this fraction of the values (relative to the tensors' total size; 1 keeps every nonzero).")
@click.option("--rank", type=click.IntRange(min=1), default=None,
              help="LoRA rank of an export to LoRA (truncated SVD; at most each matrix's smaller side).")
@click.option("--no-verify", is_flag=True, help="With --base: skip the base fingerprint check (shapes are always checked).")
@force_option
@quiet_option
@json_option
def convert_cmd(source: str, output: str, from_format: str | None, to_format: str | None, base: str | None,
                k: int | None, density: float | None, rank: int | None, no_verify: bool, force: bool, quiet: bool,
                as_json: bool) -> None:
    """Convert the diff IN (file, folder or Hub id org/name[@rev]) to OUT."""
    from ..formats import convert

    if k is not None and density is not None:
        raise click.UsageError("give at most one of -k N or --density D")
    result = convert(source, output, from_format=from_format, to_format=to_format, base=base, k=k,
                     density=density, rank=rank, overwrite=force, verify=not no_verify)
    lines = []
    if result.lora is not None:
        for row in result.lora.tensors:
            what = {"lora": f"LoRA rank {row.rank}", "saved": "modules_to_save (exact)",
                    "dropped": "not kept"}[row.kind]
            why = f": {row.reason}" if row.reason else ""
            lines.append(f"  {row.name}: {what}, relative error {row.error:.4g}{why}")
        lines.append(f"LoRA rank {result.lora.rank}: total relative error {result.lora.total_error:.4g}"
                     + (f"; modules_to_save: {', '.join(result.lora.modules_to_save)}"
                        if result.lora.modules_to_save else "")
                     + (f"; keys spelled for {result.lora.target_model}" if result.lora.target_model else ""))
    if not as_json:  # what the output lost is said even with --quiet
        for note in result.notes:
            say(f"note: {note}")
    lines.append(f"wrote {result.output} ({result.to_format}; from {result.from_format}, {result.entries} entries, "
                 f"{result.nnz:,} nonzeros)")
    report(result.to_json(source), "\n".join(lines), as_json=as_json, quiet=quiet)
