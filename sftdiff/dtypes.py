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


def round_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """float64 → float32 rounding toward zero with the last bit set when inexact ("round to odd").

    float32 has more than twice BF16's and F16's precision plus two bits, so rounding this result
    to BF16/F16 gives exactly what rounding `x` directly would: float64 → BF16 rounds once, where
    going through the nearest float32 rounds twice (1 + 2⁻⁸ + 2⁻³⁰ would become 1.0, not 1.0078125).
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow stays infinity, as direct rounding gives
        r = x.astype(np.float32)
        inexact = (r.astype(np.float64) != x) & np.isfinite(r)
        overshot = inexact & (np.abs(r.astype(np.float64)) > np.abs(x))
    bits = r.view(np.uint32).copy()
    bits[overshot] -= 1  # one step toward zero (sign-magnitude bits)
    bits[inexact] |= 1
    return bits.view(np.float32)


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32 (or float64) values once to `dtype`'s storage representation.

    float64 input is rounded once too: to BF16 through `round_to_odd_f32`, to F16/F32 directly."""
    if dtype == "BF16":
        if np.asarray(values).dtype == np.float64:
            values = round_to_odd_f32(values)
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
    if src == "F64":  # from_float32 rounds float64 once, BF16 included
        return from_float32(np.asarray(raw, dtype=np.float64), dst)
    return from_float32(to_float32(raw, src), dst)


def scaled_delta(raw: np.ndarray, dtype: str, scale: float, work: np.dtype) -> np.ndarray:
    """`scale · values` of a sparse entry as the apply rule computes it, in `work` (float32 or
    float64): for F64 parameters the product is made in float64 too, so adding it to the weight
    is the only rounding when scale is 1 and no float32 product is rounded on the way."""
    values = to_float32(raw, dtype)
    if work == np.float64:
        values = values.astype(np.float64)
    if scale != 1.0:
        values = values * work.type(scale)
    return values
