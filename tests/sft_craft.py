"""Building raw (possibly malformed) safetensors/.sft files byte by byte for tests."""

from __future__ import annotations

import json

import numpy as np


def raw_file(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None, *,
             header_override: bytes | None = None) -> bytes:
    """tensors: name -> (dtype, shape, bytes), laid out in the given order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = header_override if header_override is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + b"".join(d for _, _, d in tensors.values())


def sft_meta(entries: dict[str, list[int]], version: str = "1.0", **extra) -> dict:
    sft = {"entries": {n: {"shape": s, "base_dtype": "F32"} for n, s in entries.items()}, "base": {},
           "origin": {}, "user": {}}
    sft.update(extra)
    return {"format": "sft", "format_version": version, "sft": json.dumps(sft)}


def sparse_file(name: str = "w", shape: list[int] = (4, 4), indices=(1, 5), values=(0.5, -2.0),
                index_dtype: str = "I32", value_dtype: str = "F32", **meta_extra) -> bytes:
    idx = np.asarray(indices, dtype={"I32": "<i4", "I64": "<i8", "I16": "<i2"}[index_dtype]).tobytes()
    val = np.asarray(values, dtype={"F32": "<f4", "F16": "<f2", "F64": "<f8", "I32": "<i4"}[value_dtype]).tobytes()
    n_idx, n_val = len(np.frombuffer(idx, dtype=np.uint8)) // {"I32": 4, "I64": 8, "I16": 2}[index_dtype], \
        len(values)
    return raw_file(
        {f"indices/{name}": (index_dtype, [n_idx], idx), f"values/{name}": (value_dtype, [n_val], val)},
        sft_meta({name: list(shape)}, **meta_extra),
    )
