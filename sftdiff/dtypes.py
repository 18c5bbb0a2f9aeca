"""Safetensors dtype names, their numpy storage, and float conversions without torch.

numpy has no bfloat16, so a BF16 tensor is held as its 16-bit pattern (`uint16`) and converted
with bit arithmetic. The rounding matches torch's (round to nearest, ties to even; NaN stays NaN).
"""

from __future__ import annotations

import numpy as np

# safetensors dtype name -> numpy dtype used to hold the raw bytes (little-endian).
STORAGE: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("uint8"),
    "I8": np.dtype("int8"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# Dtypes a sparse entry may store its values in (spec: "Sparse entries").
VALUE_DTYPES = ("F32", "BF16", "F16")

_ALIASES = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "float64": "F64", "f64": "F64",
}


def canonical(name: str) -> str:
    """Map a user spelling (`bfloat16`, `bf16`, `BF16`) to the safetensors name."""
    upper = name.upper()
    if upper in STORAGE:
        return upper
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


def value_dtype(spelling: str) -> str:
    """A user's choice of sparse value dtype (`--dtype`): F32, BF16 or F16, else a usage error."""
    from .errors import UsageError

    try:
        name = canonical(spelling)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if name not in VALUE_DTYPES:
        raise UsageError(f"values cannot be stored as {spelling}; use float32, bfloat16 or float16")
    return name


def itemsize(dtype: str) -> int:
    return STORAGE[dtype].itemsize


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Values of a stored array as float32 (exact for F16/BF16/F32)."""
    if dtype == "BF16":
        return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw).astype(np.float32, copy=False)


def to_float64(raw: np.ndarray, dtype: str) -> np.ndarray:
    return to_float32(raw, dtype).astype(np.float64) if dtype != "F64" else np.asarray(raw)


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 (or float64) values once to `dtype`'s storage representation."""
    if dtype == "BF16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        # Round to nearest even on the 16 bits dropped; NaNs become a quiet NaN keeping the sign.
        rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
        nan = np.isnan(values)
        if nan.any():
            rounded[nan] = ((bits[nan] >> 16) & 0x8000 | 0x7FC0).astype(np.uint16)
        return rounded
    return np.asarray(values).astype(STORAGE[dtype], copy=False)


def convert(raw: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert stored values between float dtypes, rounding once."""
    if src == dst:
        return raw
    if dst == "F64":
        return to_float64(raw, src)
    if src == "F64":
        return from_float32(np.asarray(raw), dst) if dst == "BF16" else raw.astype(STORAGE[dst])
    return from_float32(to_float32(raw, src), dst)
