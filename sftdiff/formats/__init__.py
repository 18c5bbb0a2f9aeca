"""Other frameworks' diff formats: detection, import (`load_foreign`) and `convert`.

| format | import | export |
|---|---|---|
| `sft` | yes | yes |
| `composable-sft` (`pytorch_diff.bin`) | yes, without torch | yes |
| `peft-sft` (SpIEL adapter folder) | yes, shapes from the base | yes |
| `lora` (PEFT adapter folder) | top-k of ΔW | truncated SVD (`rank`), heads in `modules_to_save` |
| `task-vector` (safetensors of dense deltas) | top-k | yes (full values where the base lacks a head) |
| `npz` | no | yes |

A source may be a local file or folder, or a Hub repo id (`org/name[@revision]`, see `sftdiff.hub`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..diff import SparseDiff
from ..errors import FormatError, UsageError

IMPORT_FORMATS = ("sft", "composable-sft", "peft-sft", "lora", "task-vector")
EXPORT_FORMATS = ("sft", "composable-sft", "peft-sft", "lora", "task-vector", "npz")
HUB_SFT_NAME = "diff.sft"  # the file an `.sft` Hub repo is expected to hold
# Other tools' file names, here rather than in their format modules so that telling a diff from a
# checkpoint (`sources.looks_like_diff`, on every apply) imports none of the format code.
COMPOSABLE_FILE = "pytorch_diff.bin"  # composable-sft
ADAPTER_CONFIG = "adapter_config.json"  # PEFT


def _locate(source: str) -> Path:
    """A local path for `source`, resolving Hub repo ids through the Hugging Face cache."""
    path = Path(source)
    if path.exists():
        return path
    from .. import hub

    if hub.looks_like_repo_id(source):
        return hub.resolve(source)
    raise FormatError(f"{source}: no such file or folder (nor an org/name Hub repo id)")


def _sniff_safetensors(path: Path) -> str | None:
    from ..safetensors_io import SafetensorsFile

    meta = SafetensorsFile(path).metadata
    return {"sft": "sft", "task-vector": "task-vector"}.get(meta.get("format", ""))


def _looks_like_checkpoint_folder(folder: Path) -> bool:
    """A Hugging Face model folder: weights under the names save_pretrained writes."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return any((folder / name).is_file() for name in weights)


def _sft_in_folder(folder: Path) -> Path | None:
    if (folder / HUB_SFT_NAME).is_file():
        return folder / HUB_SFT_NAME
    found = sorted(folder.glob("*.sft"))
    if len(found) > 1:
        raise FormatError(f"{folder}: holds several .sft files ({', '.join(p.name for p in found[:4])}); "
                          "name one of them")
    return found[0] if found else None


def detect(path: Path) -> tuple[str, Path]:
    """(format, path to read) of a local file or folder."""
    if path.is_dir():
        sft = _sft_in_folder(path)
        if sft is not None:
            return "sft", sft
        if (path / COMPOSABLE_FILE).is_file():
            return "composable-sft", path / COMPOSABLE_FILE
        if (path / ADAPTER_CONFIG).is_file():
            from .common import read_adapter_config

            peft_type = str(read_adapter_config(path).get("peft_type", "")).upper()
            kinds = {"SFT": "peft-sft", "LORA": "lora"}
            if peft_type not in kinds:
                raise FormatError(f"{path}: PEFT adapter of type {peft_type!r} cannot be converted "
                                  "(supported: SFT, LORA)")
            return kinds[peft_type], path
        if _looks_like_checkpoint_folder(path):
            raise FormatError(f"{path}: this is a model checkpoint folder, not a diff; use it as BASE "
                              "(or make a diff from it with `sftdiff create BASE FINETUNED`)")
        raise FormatError(f"{path}: no diff found (expected a .sft file, {COMPOSABLE_FILE} or {ADAPTER_CONFIG})")
    if path.name in (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin"):
        return detect(path.parent)
    if path.suffix == ".npz":
        raise FormatError(f"{path}: .npz is an export-only format; convert from the original diff instead")
    if path.suffix == ".bin" or path.name == COMPOSABLE_FILE:
        return "composable-sft", path
    kind = _sniff_safetensors(path)
    if kind is None and path.name.startswith("model") and path.suffix == ".safetensors":
        raise FormatError(f"{path}: this is a model checkpoint's weights, not a diff; use its folder as BASE "
                          "(or `sftdiff create BASE FINETUNED`); if it holds dense deltas, pass --from task-vector")
    if kind is None:
        raise FormatError(f"{path}: a safetensors file that is neither an .sft diff nor a marked task vector; "
                          "if it holds dense deltas, convert it with --from task-vector")
    return kind, path


def _input_path(fmt: str, path: Path) -> Path:
    """The file or folder a given format reads, when `--from` overrides detection."""
    if fmt in ("peft-sft", "lora") and path.is_file():
        return path.parent
    if fmt == "composable-sft" and path.is_dir():
        return path / COMPOSABLE_FILE
    if fmt == "sft" and path.is_dir():
        sft = _sft_in_folder(path)
        if sft is None:
            raise FormatError(f"{path}: no .sft file in this folder")
        return sft
    return path


def load_foreign(source: str, base: Checkpoint | None = None, *, from_format: str | None = None,
                 k: int | None = None, density: float | None = None) -> SparseDiff:
    """Any supported diff (file, folder or Hub id) as a `SparseDiff`, names spelled as `base`
    spells them when given. LoRA and task vectors keep their top-k (`k`/`density`; all nonzeros
    by default); `base` supplies shapes that PEFT-SFT adapters lack."""
    path = _locate(source)
    if from_format is None:
        fmt, path = detect(path)
    else:
        if from_format not in IMPORT_FORMATS:
            raise UsageError(f"cannot import {from_format!r}; importable formats: {', '.join(IMPORT_FORMATS)}")
        fmt, path = from_format, _input_path(from_format, path)
    if fmt == "sft":
        return SparseDiff.load(path)
    if fmt == "composable-sft":
        from .composable import load_composable

        return load_composable(path, base, source)
    if fmt == "peft-sft":
        from .peft_sft import load_peft_sft

        return load_peft_sft(path, base, source)
    if fmt == "lora":
        from .lora import load_lora

        return load_lora(path, base, source, k=k, density=density)
    from .task_vector import load_task_vector

    return load_task_vector(path, base, source, k=k, density=density)


def output_format(out: Path, rank: int | None) -> str:
    """The format an output name implies (a folder name is ambiguous unless --rank asks for LoRA)."""
    by_suffix = {".sft": "sft", ".npz": "npz", ".bin": "composable-sft", ".safetensors": "task-vector"}
    if out.suffix in by_suffix:
        return by_suffix[out.suffix]
    if rank is not None:
        return "lora"
    raise UsageError(f"cannot tell the output format from {out.name!r}; pass --to "
                     f"({', '.join(EXPORT_FORMATS)})")


@dataclass
class ConvertResult:
    """What `convert` wrote; `lora` carries the table of a LoRA export; `notes` say what the output
    format could not hold or holds differently, `dropped_metadata` which metadata fields it lost."""

    output: Path
    from_format: str
    to_format: str
    entries: int
    nnz: int
    lora: object | None = None
    notes: list[str] = field(default_factory=list)
    dropped_metadata: list[str] = field(default_factory=list)
    replacements: list[str] = field(default_factory=list)  # task vector: full values, not deltas

    def to_json(self, source: str) -> dict[str, Any]:
        """The `convert --json` summary (docs/convert.md, "JSON output")."""
        return {"command": "convert", "input": source, "output": str(self.output), "from": self.from_format,
                "to": self.to_format, "entries": self.entries, "nnz": self.nnz, "notes": self.notes,
                "dropped_metadata": self.dropped_metadata, "replacements": self.replacements,
                "lora": self.lora.to_json() if self.lora is not None else None}


# Formats whose files carry the whole `sft` metadata object (the others have no place for most of it).
_KEEPS_METADATA = ("sft", "task-vector", "npz")


def _lost_metadata(diff: SparseDiff, to_format: str) -> tuple[list[str], list[str]]:
    """(fields, one note) of the diff's metadata that `to_format` cannot hold."""
    if to_format in _KEEPS_METADATA:
        return [], []
    meta = diff.meta
    lost: list[str] = []
    details: list[str] = []
    if meta.config_patch:
        lost.append("config_patch")
        details.append(f"the config patch ({', '.join(sorted(meta.config_patch))})")
    if meta.user:
        lost.append("user")
        details.append(f"the user fields ({', '.join(sorted(meta.user))})")
    if meta.base.get("fingerprint") or meta.base.get("tensors"):
        lost.append("base.fingerprint")
        details.append("the base fingerprint and digests (the check against a wrong base)")
    if meta.provenance:
        lost.append("provenance")
        details.append("the provenance")
    if not lost:
        return [], []
    hint = " (the base hint is kept as base_model_name_or_path)" if to_format in ("lora", "peft-sft") else ""
    return lost, [f"{to_format} has no place for {', '.join(details)}: they are not in the output{hint}; "
                  "keep the .sft for them"]


def convert(source: str, output: str | Path, *, from_format: str | None = None, to_format: str | None = None,
            base: str | Checkpoint | None = None, k: int | None = None, density: float | None = None,
            rank: int | None = None, overwrite: bool = False, verify: bool = True) -> ConvertResult:
    """Convert the diff at `source` (file, folder or Hub id) to `output` in `to_format`.

    `k`/`density` keep the top-k values (for LoRA and task vectors, of their dense deltas);
    `rank` is the LoRA rank of an export to LoRA; `base` (path, Hub id or `Checkpoint`) gives
    shapes and names where the source lacks them; a diff that records its base is checked against
    it as `apply` checks it (`verify=False` skips only the digest comparison). What the output
    format cannot hold is listed in the result's `notes` and `dropped_metadata`."""
    out = Path(output)
    to_format = to_format or output_format(out, rank)
    if to_format not in EXPORT_FORMATS:
        raise UsageError(f"cannot export {to_format!r}; formats: {', '.join(EXPORT_FORMATS)}")
    if rank is not None and to_format != "lora":
        raise UsageError("--rank applies only to exports to LoRA (--to lora)")
    if to_format == "lora" and rank is None:
        raise UsageError("exporting to LoRA needs --rank R")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, not {rank}")
    from ..atomic import check_not_input

    check_not_input(out, [source] + ([base] if isinstance(base, (str, Path)) else []))
    checkpoint = Checkpoint.open(base) if isinstance(base, (str, Path)) else base
    from_format_detected = from_format or detect(_locate(source))[0]
    diff = load_foreign(source, checkpoint, from_format=from_format_detected, k=k, density=density)
    # Outputs computed from the base's values (task vectors, saved LoRA modules) need the diff's own
    # base; a diff that records which base that is gets apply's check (one without a record cannot).
    if checkpoint is not None and (diff.meta.base_fingerprint or diff.meta.base.get("tensors")):
        from ..verify import verify_against_base

        verify_against_base(diff, checkpoint, label=source, fingerprint=verify)
    if from_format_detected not in ("lora", "task-vector") and (k is not None or density is not None):
        from .common import topk_sparse

        diff = SparseDiff(topk_sparse(diff.entries, k, density), diff.meta)
        diff.meta = diff.meta.copy(origin={**diff.meta.origin, "k": k, "density": density})
    dropped_metadata, notes = _lost_metadata(diff, to_format)
    if k is not None and k > diff.nnz:  # a budget that selects nothing away is said, not silently moot
        notes.insert(0, f"-k {k:,} is more than the {diff.nnz:,} nonzero values there are: all of them are kept")
    lora_report = None
    replacements: list[str] = []
    if to_format == "sft":
        diff.save(out, overwrite=overwrite)
    elif to_format == "composable-sft":
        from .composable import export_composable

        out = export_composable(diff, out, overwrite=overwrite)
    elif to_format == "peft-sft":
        from .peft_sft import export_peft_sft

        export_peft_sft(diff, out, overwrite=overwrite)
    elif to_format == "lora":
        from .lora import export_lora

        lora_report = export_lora(diff, out, rank, overwrite=overwrite, base=checkpoint)
        notes.extend(lora_report.notes)
        if lora_report.capped:
            n = len(lora_report.capped)
            notes.append(f"--rank {rank} exceeds the smaller side of {n} {'matrix' if n == 1 else 'matrices'}: each "
                         f"gets at most its full rank (adapter r = {lora_report.rank}, smaller ones in rank_pattern)")
        if lora_report.unrepresented:
            notes.append(f"{len(lora_report.unrepresented)} entries have no place in a LoRA adapter and are not in "
                         f"it: {', '.join(lora_report.unrepresented[:4])}"
                         f"{', …' if len(lora_report.unrepresented) > 4 else ''} (see the table for why)")
    elif to_format == "task-vector":
        from .task_vector import export_task_vector

        replacements = export_task_vector(diff, out, overwrite=overwrite, base=checkpoint)
        if replacements:
            notes.append(f"{', '.join(replacements[:4])}{', …' if len(replacements) > 4 else ''}: the base has no "
                         "such parameter (or one of another shape), so the task vector holds the full value, listed "
                         "under 'replacements' in its metadata (sftdiff reads it back as a dense entry; other "
                         "tools would add it to a base as a delta)")
    else:
        from .npz import export_npz

        export_npz(diff, out, overwrite=overwrite)
    return ConvertResult(out, from_format_detected, to_format, len(diff.entries), diff.nnz, lora_report,
                         notes, dropped_metadata, replacements)


__all__ = ["load_foreign", "convert", "detect", "ConvertResult", "IMPORT_FORMATS", "EXPORT_FORMATS"]
