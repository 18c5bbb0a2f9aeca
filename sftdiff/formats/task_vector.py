"""Dense task vectors: a safetensors file holding the full delta (fine-tuned − base) per tensor.

Import keeps the top-k of those deltas (as `create` does); export writes every entry's delta in
full. Exports are marked `format: task-vector` in `__metadata__` so they are recognized later.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..diff import DenseEntry, Entry, SparseDiff
from ..dtypes import FLOAT_DTYPES, to_float32
from ..errors import FormatError, UsageError
from ..format import check_values
from ..names import NameMap
from ..safetensors_io import SafetensorsFile, StreamingWriter
from .common import make_diff, topk_from_dense

FORMAT_TAG = "task-vector"
REPLACEMENTS_KEY = "replacements"  # metadata: JSON list of tensors holding full values, not deltas


def is_task_vector(st: SafetensorsFile) -> bool:
    return st.metadata.get("format") == FORMAT_TAG


def _replacements(st: SafetensorsFile, path: Path) -> list[str]:
    """Names whose tensor holds a parameter's full value rather than a delta (see the export)."""
    raw = st.metadata.get(REPLACEMENTS_KEY)
    if raw is None:
        return []
    try:
        names = json.loads(raw)
    except (ValueError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) and n in st.tensors for n in names):
        raise FormatError(f"{path}: metadata {REPLACEMENTS_KEY!r} must be a JSON list of this file's tensor names")
    return names


def load_task_vector(path: Path, base: Checkpoint | None, source: str, *, k: int | None = None,
                     density: float | None = None) -> SparseDiff:
    st = SafetensorsFile(path)
    full = set(_replacements(st, path))
    names = [n for n, t in st.tensors.items() if t.dtype in FLOAT_DTYPES and n not in full]
    others = sorted(set(st.tensors) - set(names) - full)
    if others:
        raise FormatError(f"{path}: tensor {others[0]!r} is not floating point, so it is not a delta")
    entries: dict[str, Entry] = dict(topk_from_dense(
        names, lambda n: st.tensors[n].shape, lambda n: to_float32(st.array(n), st.tensors[n].dtype), k, density
    ))
    for name in sorted(full):
        t = st.tensors[name]
        if t.dtype not in FLOAT_DTYPES:
            raise FormatError(f"{path}: replacement {name!r} is {t.dtype}, not floating point")
        values = np.array(st.array(name), copy=True)
        check_values(name, values, t.dtype, allow_zero=True)
        entries[name] = DenseEntry(values, t.dtype)
    return make_diff(entries, "task-vector", source, base, hint=st.metadata.get("base"), k=k, density=density)


def export_task_vector(diff: SparseDiff, out: Path, *, overwrite: bool, base: Checkpoint | None = None) -> list[str]:
    """Each entry's full float32 delta. Dense entries (replacements) need the base to become deltas;
    a dense entry for a parameter the base lacks (a new head) or has in another shape (a resized
    embedding) has no delta, so its full value is written and its name listed in the metadata
    under `replacements`. Returns those names."""
    from ..atomic import atomic_path

    names = sorted(diff.entries)
    dense = [n for n in names if isinstance(diff.entries[n], DenseEntry)]
    if dense and base is None:
        raise UsageError(f"entry {dense[0]!r} replaces the parameter outright; pass --base so its delta "
                         "from the base can be written")
    targets = NameMap(base.tensors, names).lookup(names) if base is not None else {}
    full = [n for n in dense if targets[n] is None
            or tuple(base.tensors[targets[n]].shape) != tuple(diff.entries[n].shape)
            or base.tensors[targets[n]].dtype not in FLOAT_DTYPES]
    specs = [(n, "F32", tuple(diff.entries[n].shape)) for n in names]
    metadata = {"format": FORMAT_TAG, "sft": json.dumps(diff.meta.to_json({}), sort_keys=True)}
    if diff.meta.base_hint:
        metadata["base"] = diff.meta.base_hint
    if full:
        metadata[REPLACEMENTS_KEY] = json.dumps(full)
    with atomic_path(out, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        writer = StreamingWriter(f, specs, metadata)
        for name in names:
            entry = diff.entries[name]
            if isinstance(entry, DenseEntry) and name not in full:
                target = targets[name]
                original = to_float32(base.array(target), base.tensors[target].dtype)
                delta = entry.values_f32() - original.reshape(entry.shape)
            elif isinstance(entry, DenseEntry):
                delta = entry.values_f32()
            else:
                delta = entry.to_dense()
            writer.write(name, np.asarray(delta, dtype=np.float32))
        writer.close()
    return full
