"""Dense task vectors: a safetensors file holding the full delta (fine-tuned − base) per tensor.

Import keeps the top-k of those deltas (as `create` does); export writes every entry's delta in
full. Exports are marked `format: task-vector` in `__metadata__` so they are recognized later.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint
from ..diff import DenseEntry, SparseDiff
from ..dtypes import FLOAT_DTYPES, to_float32
from ..errors import FormatError
from ..safetensors_io import SafetensorsFile, StreamingWriter
from .common import make_diff, topk_from_dense

FORMAT_TAG = "task-vector"


def is_task_vector(st: SafetensorsFile) -> bool:
    return st.metadata.get("format") == FORMAT_TAG


def load_task_vector(path: Path, base: Checkpoint | None, source: str, *, k: int | None = None,
                     density: float | None = None) -> SparseDiff:
    st = SafetensorsFile(path)
    names = [n for n, t in st.tensors.items() if t.dtype in FLOAT_DTYPES]
    others = sorted(set(st.tensors) - set(names))
    if others:
        raise FormatError(f"{path}: tensor {others[0]!r} is not floating point, so it is not a delta")
    entries = topk_from_dense(
        names, lambda n: st.tensors[n].shape, lambda n: to_float32(st.array(n), st.tensors[n].dtype), k, density
    )
    return make_diff(entries, "task-vector", source, base, hint=st.metadata.get("base"), k=k, density=density)


def export_task_vector(diff: SparseDiff, out: Path, *, overwrite: bool, base: Checkpoint | None = None) -> Path:
    """Each entry's full float32 delta. Dense entries (replacements) need the base to become deltas."""
    from ..atomic import atomic_path

    names = sorted(diff.entries)
    for name in names:
        if isinstance(diff.entries[name], DenseEntry) and base is None:
            raise FormatError(f"entry {name!r} replaces the parameter outright; pass --base so its delta "
                              "from the base can be written")
    specs = [(n, "F32", tuple(diff.entries[n].shape)) for n in names]
    metadata = {"format": FORMAT_TAG, "sft": json.dumps(diff.meta.to_json({}), sort_keys=True)}
    if diff.meta.base_hint:
        metadata["base"] = diff.meta.base_hint
    with atomic_path(out, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        writer = StreamingWriter(f, specs, metadata)
        for name in names:
            entry = diff.entries[name]
            if isinstance(entry, DenseEntry):
                original = to_float32(base.array(name), base.tensors[name].dtype)
                delta = entry.values_f32() - original.reshape(entry.shape)
            else:
                delta = entry.to_dense()
            writer.write(name, np.asarray(delta, dtype=np.float32))
        writer.close()
    return out
