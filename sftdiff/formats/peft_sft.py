"""PEFT-SFT adapters (SpIEL, Ansell et al. 2024): `peft_type: "SFT"` adapter folders.

Per target module the adapter stores `base_model.model.<module>.sft_delta.values` and
`....sft_delta.indices`: flat row-major indices into `<module>.weight`, possibly unsorted, repeated
(repeats add up when merged) or pointing at explicit zeros. Full shapes are not recorded, so
importing needs the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint
from ..diff import DenseEntry, SparseDiff, SparseEntry
from ..errors import FormatError
from ..names import NameMap
from .common import (PEFT_PREFIX, adapter_base, adapter_hint, canonical_sparse, make_diff,
                     read_adapter_config, read_adapter_weights, strip_peft_prefix, write_adapter)

PEFT_TYPE = "SFT"
_VALUES, _INDICES = ".sft_delta.values", ".sft_delta.indices"


def _modules(tensors: dict[str, np.ndarray], folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module name -> (indices, values), refusing tensors this format does not define."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        name = strip_peft_prefix(key, folder)
        for suffix, kind in ((_VALUES, "values"), (_INDICES, "indices")):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[kind] = array
                break
        else:
            raise FormatError(f"{folder}: tensor {key!r} is not an sft_delta.values/indices tensor; "
                              "it cannot be represented and was not dropped silently")
    for module, p in parts.items():
        if set(p) != {"values", "indices"}:
            raise FormatError(f"{folder}: module {module!r} has sft_delta {sorted(p)} but needs both indices and values")
    return {m: (p["indices"], p["values"]) for m, p in parts.items()}


def load_peft_sft(folder: Path, base: Checkpoint | None, source: str) -> SparseDiff:
    config = read_adapter_config(folder)
    if str(config.get("peft_type", "")).upper() != PEFT_TYPE:
        raise FormatError(f"{folder}: peft_type is {config.get('peft_type')!r}, expected 'SFT'")
    modules = _modules(read_adapter_weights(folder), folder)
    base = adapter_base(config, base, folder, needed_for="importing a PEFT-SFT adapter")
    params = [m + ".weight" for m in modules]
    mapping = NameMap(base.tensors, params).lookup(params)
    entries = {}
    for module, (indices, values) in modules.items():
        target = mapping[module + ".weight"]
        if target is None:
            raise FormatError(f"{folder}: the base {base.path} has no parameter {module + '.weight'!r}; is it the right base?")
        entry = canonical_sparse(base.tensors[target].shape, indices, values, what=f"{folder}: {module}")
        if entry is not None:
            entries[target] = entry
    return make_diff(entries, "peft-sft", source, base, hint=adapter_hint(config, folder))


def export_peft_sft(diff: SparseDiff, out: Path, *, overwrite: bool) -> Path:
    """An adapter folder with one sft_delta per `.weight` entry (row-major, sorted indices)."""
    tensors: dict[str, np.ndarray] = {}
    modules = []
    dense = [n for n in sorted(diff.entries) if isinstance(diff.entries[n], DenseEntry)]
    other = [n for n in sorted(diff.entries) if n not in dense and not n.endswith(".weight")]
    if dense or other:
        # One command that drops every such entry, so following the hint works the first time.
        globs = sorted({f"*.{n.rsplit('.', 1)[1]}" if "." in n else n for n in other})
        drop = " ".join((["--no-dense"] if dense else []) + [f"--exclude '{g}'" for g in globs])
        raise FormatError(
            f"{len(dense) + len(other)} entries (e.g. {(dense + other)[0]!r}) cannot be written as PEFT-SFT, which "
            f"holds sparse deltas of .weight parameters only; drop them with `sftdiff filter {diff.path or 'DIFF'} "
            f"{drop} -o OUT.sft` or export to another format"
        )
    for name in sorted(diff.entries):
        entry = diff.entries[name]
        assert isinstance(entry, SparseEntry)
        module = name[: -len(".weight")]
        modules.append(module)
        tensors[PEFT_PREFIX + module + _INDICES] = np.asarray(entry.indices)
        tensors[PEFT_PREFIX + module + _VALUES] = entry.values_f32()
    config: dict[str, Any] = {
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": diff.meta.base_hint,
        "target_modules": modules,
        "inference_mode": True,
        "task_type": None,
        "num_tunable_weights": int(sum(diff.entries[n].nnz for n in diff.entries)),
    }
    write_adapter(out, config, tensors, overwrite=overwrite)
    return out
