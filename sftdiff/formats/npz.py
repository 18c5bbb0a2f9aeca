"""numpy `.npz` export, for readers without torch or safetensors.

Arrays: `NAME/indices` (flat row-major, sorted) and `NAME/values` (float32) per sparse entry,
`NAME/dense` (float32) per dense entry, and `__metadata__`: a one-element string array holding the
`.sft` metadata object as JSON (shapes under `entries`).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from ..diff import DenseEntry, SparseDiff

METADATA_KEY = "__metadata__"


def export_npz(diff: SparseDiff, out: Path, *, overwrite: bool) -> Path:
    from ..atomic import atomic_path

    described = {}
    with atomic_path(out, overwrite=overwrite) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED,
                                                                       allowZip64=True) as archive:
        # One member at a time, so memory stays bounded by the largest entry.
        def put(key: str, array: np.ndarray) -> None:
            with archive.open(key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)

        for name in sorted(diff.entries):
            entry = diff.entries[name]
            if isinstance(entry, DenseEntry):
                put(f"{name}/dense", entry.values_f32())
            else:
                put(f"{name}/indices", entry.indices)
                put(f"{name}/values", entry.values_f32())
            described[name] = {"shape": list(entry.shape), "base_dtype": entry.base_dtype}
        text = json.dumps(diff.meta.to_json(described), sort_keys=True, ensure_ascii=False)
        put(METADATA_KEY, np.array([text]))
    return out
