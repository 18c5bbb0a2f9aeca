"""create's scan as one compiled loop per value: the C extension `sftdiff._kernels`, when it is built.

The scan reads every value of both checkpoints once. The numpy code in `create` needs about ten
array passes per value (widen, subtract, magnitude, compare, compress, per slice); `scan` here is
one fused loop per value (sftdiff/_kernels.c), run in `create`'s worker threads with the GIL released,
so all cores work on it. It returns exactly what `create._scan`'s numpy code returns for the same
inputs (tests/test_kernels.py), so the diff written is byte-identical either way.

Why an extension compiled ahead of time: it loads in no time, so every model, small or large, gets
the compiled scan. numba, used before, compiled the same loop at run time but cost ~1 s of CPU to
import and load on every run (holding the GIL meanwhile), more than numpy's whole scan of a
BERT-base model; and torch has no fused filter-and-compress (`device_scan` uses torch for
`--device`). The extension is built at install time (setup.py) and is optional: without a C
compiler, or with `SFTDIFF_COMPILED=0` in the environment, `scan` returns None and `create` uses
its numpy code.
"""

from __future__ import annotations

import os
import sys
import threading
from types import ModuleType

import numpy as np

try:
    from . import _kernels as _compiled
except ImportError:  # not built (no compiler at install time): numpy does the work
    _compiled = None

# How each stored dtype is handed to the kernel: BF16 and F16 as their 16-bit patterns.
_KIND = {"BF16": 0, "F16": 1, "F32": 2, "F64": 3}
_RAW = {"BF16": np.uint16, "F16": np.uint16, "F32": np.float32, "F64": np.float64}
_scratch = threading.local()


def _kernel() -> ModuleType | None:
    """The compiled module, unless it is missing or turned off (read on every call: tests and users
    can switch it with the environment variable)."""
    if os.environ.get("SFTDIFF_COMPILED", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return _compiled


def available() -> bool:
    """Whether `scan` runs the compiled kernel."""
    return _kernel() is not None


def built() -> bool:
    """Whether the extension was built at install time (`available` also honours SFTDIFF_COMPILED)."""
    return _compiled is not None


def scan(base_raw: np.ndarray, base_dtype: str, ft_raw: np.ndarray, ft_dtype: str, lo: int, hi: int,
         threshold: np.uint32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(ascending flat indices as int64, |ft − base| as float32, the base's and the fine-tune's raw
    values there) of the positions in [lo, hi) whose magnitude's float32 bit pattern is
    ≥ `threshold` (NaN and ±inf always pass), as `create._scan` computes them; None when the kernel
    is not available or cannot take these arrays: the caller uses numpy."""
    kernel = _kernel()
    if kernel is None or base_dtype not in _KIND or ft_dtype not in _KIND:
        return None
    b, f = _as_kernel_array(base_raw, base_dtype), _as_kernel_array(ft_raw, ft_dtype)
    if b is None or f is None:
        return None
    n = hi - lo
    idx, bits = _buffer("idx", n, np.int64), _buffer("bits", n, np.uint32)  # bits: float32 patterns
    out_b, out_f = _buffer("b", n, b.dtype), _buffer("f", n, f.dtype)
    count = kernel.scan(_KIND[base_dtype], b, _KIND[ft_dtype], f, lo, hi, int(threshold), idx, bits, out_b, out_f)
    return (idx[:count].copy(), bits[:count].view(np.float32).copy(),
            out_b[:count].view(base_raw.dtype).copy(), out_f[:count].view(ft_raw.dtype).copy())


def _as_kernel_array(raw: np.ndarray, dtype: str) -> np.ndarray | None:
    """The flat raw array in native byte order as the kernel reads it, or None (big-endian,
    strided or misaligned data)."""
    flat = np.asarray(raw).reshape(-1)
    want = np.dtype(_RAW[dtype])
    if flat.dtype.byteorder not in ("=", "|", "<" if sys.byteorder == "little" else ">"):
        return None
    # The C code reads whole elements through typed pointers: misaligned data (a safetensors file
    # may place a tensor at any byte offset) stays with numpy, which handles it.
    if flat.dtype.itemsize != want.itemsize or not (flat.flags.c_contiguous and flat.flags.aligned):
        return None
    return flat.view(want)


def _buffer(role: str, n: int, dtype: np.dtype) -> np.ndarray:
    """A per-thread output buffer of at least n entries, reused by every task of the thread."""
    key = (role, np.dtype(dtype).str)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    if key not in buffers or buffers[key].size < n:
        buffers[key] = np.empty(n, dtype)
    return buffers[key]

