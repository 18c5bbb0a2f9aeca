"""`sftdiff convert`: between `.sft` and other frameworks' formats."""

from __future__ import annotations

import click

from .common import force_option, quiet_option, say

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
@click.option("--rank", type=int, default=None, help="LoRA rank of an export to LoRA (truncated SVD).")
@force_option
@quiet_option
def convert_cmd(source: str, output: str, from_format: str | None, to_format: str | None, base: str | None,
                k: int | None, density: float | None, rank: int | None, force: bool, quiet: bool) -> None:
    """Convert the diff IN (file, folder or Hub id org/name[@rev]) to OUT."""
    from ..formats import convert

    if k is not None and density is not None:
        raise click.UsageError("give at most one of -k N or --density D")
    result = convert(source, output, from_format=from_format, to_format=to_format, base=base, k=k,
                     density=density, rank=rank, overwrite=force)
    if result.lora is not None:
        for name, error in result.lora.errors.items():
            note = "  (not 2-D: no LoRA form, dropped)" if name in result.lora.unrepresented else ""
            say(f"  {name}: relative error {error:.4g}{note}", quiet)
        say(f"LoRA rank {result.lora.rank}: total relative error {result.lora.total_error:.4g}", quiet)
    say(f"wrote {result.output} ({result.to_format}; from {result.from_format}, {result.entries} entries, "
        f"{result.nnz:,} nonzeros)", quiet)
