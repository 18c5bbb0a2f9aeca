"""Edge-case values and raw safetensors checkpoints written from numpy arrays (no torch), for the
tests of `create`'s pass-1 scans (the compiled kernel, the torch device scan) against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sftdiff.dtypes import from_float32
from sftdiff.safetensors_io import StreamingWriter


def edge_values(n: int, seed: int, special: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A base and a fine-tune (float32) whose differences include exact ties, zeros of both signs,
    subnormals, values that overflow float16, equal inputs and (`special`) ±inf and NaN."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n).astype(np.float32) * np.float32(0.02)
    ft = base + rng.standard_normal(n).astype(np.float32) * np.float32(0.004)
    ft[::7] = base[::7]  # unchanged
    ft[3::11] = base[3::11] + np.float32(0.0078125)  # many identical magnitudes, exact in every dtype
    base[5::13], ft[5::13] = 0.0, -0.0
    base[6::17], ft[6::17] = 1e-41, -1e-41  # float32 subnormals (zero once rounded to F16/BF16)
    base[8::19], ft[8::19] = 3e-8, -2e-8  # float16 subnormals
    base[9::23], ft[9::23] = 60000.0, -60000.0  # |Δ| 120000: finite in float32, beyond float16
    if special:
        base[10::97], ft[10::97] = np.inf, np.inf  # inf − inf: NaN
        ft[11::89] = np.nan
        base[12::83] = -np.inf  # |Δ| = inf
    return base, ft


def stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 `values` as a checkpoint of `dtype` stores them (BF16/F16 as raw uint16)."""
    if dtype == "F64":
        return values.astype(np.float64)
    with np.errstate(over="ignore"):
        return from_float32(values.astype(np.float32), dtype)


def write_checkpoint(folder: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    """A one-file checkpoint folder: `tensors` maps names to (raw array, safetensors dtype)."""
    folder.mkdir(parents=True)
    names = sorted(tensors)
    with open(folder / "model.safetensors", "wb") as fh:
        writer = StreamingWriter(fh, [(n, tensors[n][1], tensors[n][0].shape) for n in names], {"format": "pt"})
        for n in names:
            writer.write(n, tensors[n][0])
        writer.close()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))


def write_pair(root: Path, dtype: str, seed: int, poison: float | None = None) -> tuple[Path, Path]:
    """A base and a fine-tune folder under `root` of `edge_values` tensors in `dtype` (and an integer
    buffer); `poison` is written into one fine-tune value (NaN, inf) when given."""
    base, ft = {}, {}
    for i, shape in enumerate([(64, 48), (48,), (1 << 11, 96), (3, 5)]):
        b, f = edge_values(int(np.prod(shape)), seed + i)
        if poison is not None and i == 2:
            f[100] = poison
        base[f"layer.{i}.weight"] = (stored(b, dtype).reshape(shape), dtype)
        ft[f"layer.{i}.weight"] = (stored(f, dtype).reshape(shape), dtype)
    base["position_ids"] = ft["position_ids"] = (np.arange(8, dtype=np.int64), "I64")
    write_checkpoint(root / "base", base)
    write_checkpoint(root / "ft", ft)
    return root / "base", root / "ft"
