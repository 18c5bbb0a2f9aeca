"""The `.sft` format, version 1: tensor naming, metadata layout and validity rules.

`spec/format.md` is the normative description; this module implements exactly that and nothing
more. A `.sft` file is a safetensors file whose tensors are named

    indices/<parameter name>   flat row-major indices of a sparse entry (I32 or I64)
    values/<parameter name>    its values, one per index (F32, BF16 or F16)
    dense/<parameter name>     a full replacement value for a parameter

The parameter name is everything after the first `/`, so any name whatsoever is representable and
no two entries can collide. `__metadata__` carries `format`, `format_version` and `sft` (a JSON
object with the entries' shapes and everything else).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from .dtypes import FLOAT_DTYPES, STORAGE, VALUE_DTYPES, to_float32
from .errors import FormatError

FORMAT_NAME = "sft"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

# format_version: MAJOR.MINOR, each a decimal integer in ASCII digits without sign or leading zeros
# (spec section 4). `[0-9]`, not `\d`, which would also take Arabic-Indic or full-width digits.
VERSION_GRAMMAR = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")

INDICES, VALUES, DENSE = "indices/", "values/", "dense/"
INT32_LIMIT = 2**31  # parameters with at least this many elements use I64 indices


def index_dtype_for(numel: int) -> str:
    """I32 below 2^31 elements, I64 from there on (spec: "Sparse entries")."""
    return "I32" if numel < INT32_LIMIT else "I64"


def numel_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def split_key(key: str) -> tuple[str, str]:
    """('indices'|'values'|'dense', parameter name) for a tensor key of a `.sft` file."""
    for prefix in (INDICES, VALUES, DENSE):
        if key.startswith(prefix) and len(key) > len(prefix):
            return prefix[:-1], key[len(prefix):]
    raise FormatError(f"tensor {key!r} is not named indices/<name>, values/<name> or dense/<name>")


def encode_metadata(sft: dict[str, Any]) -> dict[str, str]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sft": json.dumps(sft, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False),
    }


def decode_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """Check the format name and version and return the parsed `sft` object."""
    if metadata.get("format") != FORMAT_NAME:
        raise FormatError(f"not an .sft file (__metadata__ format is {metadata.get('format')!r}, expected 'sft')")
    version = metadata.get("format_version", "")
    match = VERSION_GRAMMAR.fullmatch(version)
    if match is None:
        raise FormatError(f"format_version {version[:40]!r} is not MAJOR.MINOR (ASCII digits, no sign, "
                          "spaces or leading zeros, e.g. '1.0')")
    if match.group(1) != str(FORMAT_MAJOR):  # compared as text: a 5000-digit MAJOR is not an int to parse
        raise FormatError(
            f"format version {version[:40]} is not supported (this sftdiff reads {FORMAT_MAJOR}.x); upgrade sftdiff"
        )
    try:
        sft = json.loads(metadata.get("sft", ""), parse_constant=_reject_constant, parse_float=_finite_float,
                         object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise FormatError(f"metadata 'sft' has the key {e.args[0][:80]!r} twice in one object; readers could "
                          "disagree on which one counts") from None
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"metadata 'sft' is not valid JSON ({e})") from None
    if not isinstance(sft, dict):
        raise FormatError("metadata 'sft' must be a JSON object")
    try:  # "\ud800" escapes parse, but are not Unicode text: nothing could print or re-encode them
        json.dumps(sft, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError("metadata 'sft' holds a lone surrogate escape, which is not valid Unicode") from None
    _check_types(sft)
    return sft


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse duplicate keys (json.loads lets the last win), as the safetensors header does."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in metadata")


def _finite_float(text: str) -> float:
    """Standard JSON like `1e400` still parses to infinity, which metadata must not hold either."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} overflows to infinity, which is not allowed in metadata")
    return value


_OBJECT_FIELDS = ("entries", "base", "origin", "user", "config_patch", "provenance")


def _check_types(sft: dict[str, Any]) -> None:
    for field in _OBJECT_FIELDS:
        if field in sft and not isinstance(sft[field], dict):
            raise FormatError(f"metadata field {field!r} must be a JSON object")
    if "entries" not in sft:
        raise FormatError("metadata 'sft' has no 'entries'")
    for name, info in sft["entries"].items():
        if not isinstance(info, dict):
            raise FormatError(f"entry {name!r}: metadata must be an object")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise FormatError(f"entry {name!r}: shape must be a list of non-negative integers")
        base_dtype = info.get("base_dtype")
        if base_dtype is not None and (not isinstance(base_dtype, str) or base_dtype not in STORAGE):
            raise FormatError(f"entry {name!r}: unknown base_dtype {base_dtype!r}")
    base = sft.get("base", {})
    for key in ("hint", "fingerprint"):
        if base.get(key) is not None and not isinstance(base[key], str):
            raise FormatError(f"metadata base.{key} must be a string or null")
    tensors = base.get("tensors", {})
    if not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values()):
        raise FormatError("metadata base.tensors must map parameter names to digest strings")
    numel = base.get("numel")
    if numel is not None and (type(numel) is not int or numel < 0):
        raise FormatError("metadata base.numel must be a non-negative integer")
    for key, value in sft.get("user", {}).items():
        if not isinstance(value, str):
            raise FormatError(f"metadata user.{key} must be a string")


def check_sparse(name: str, shape: tuple[int, ...], indices: np.ndarray, values: np.ndarray,
                 index_dtype: str, value_dtype: str, *, check_data: bool = True) -> None:
    """Enforce the rules for one sparse entry. With `check_data`, also reads the arrays."""
    numel = numel_of(shape)
    if index_dtype != index_dtype_for(numel):
        raise FormatError(
            f"entry {name!r}: indices are {index_dtype}, but a parameter of {numel} elements needs "
            f"{index_dtype_for(numel)}"
        )
    if value_dtype not in VALUE_DTYPES:
        raise FormatError(f"entry {name!r}: values are {value_dtype}; allowed: {', '.join(VALUE_DTYPES)}")
    if indices.ndim != 1 or values.ndim != 1:
        raise FormatError(f"entry {name!r}: indices and values must be 1-D")
    if len(indices) != len(values):
        raise FormatError(f"entry {name!r}: {len(indices)} indices but {len(values)} values")
    if len(indices) == 0:
        raise FormatError(f"entry {name!r}: no indices (empty entries must be omitted)")
    if len(indices) > numel:
        raise FormatError(f"entry {name!r}: {len(indices)} indices for a parameter of {numel} elements")
    if not check_data:
        return
    if indices[0] < 0 or indices[-1] >= numel:
        raise FormatError(f"entry {name!r}: index out of range [0, {numel}) for shape {list(shape)}")
    if len(indices) > 1 and not bool(np.all(indices[1:] > indices[:-1])):
        raise FormatError(f"entry {name!r}: indices are not strictly increasing (unsorted or duplicated)")
    check_values(name, values, value_dtype, allow_zero=False)


def check_values(name: str, values: np.ndarray, dtype: str, *, allow_zero: bool) -> None:
    """Reject NaN/Inf (and, for sparse values, explicit zeros) in float data, a slice at a time."""
    if dtype not in FLOAT_DTYPES:
        return
    flat = np.asarray(values).reshape(-1)
    for i in range(0, flat.size, 1 << 24):
        chunk = to_float32(flat[i : i + (1 << 24)], dtype) if dtype != "F64" else flat[i : i + (1 << 24)]
        if not bool(np.isfinite(chunk).all()):
            raise FormatError(f"entry {name!r}: values contain NaN or infinity")
        if not allow_zero and not bool(np.all(chunk != 0)):
            raise FormatError(f"entry {name!r}: stores a zero value (zero deltas must be omitted)")
