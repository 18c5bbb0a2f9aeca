"""Compiled kernels for `create`'s scan, with numba when it is installed (`pip install sftdiff[fast]`).

The scan reads every value of both checkpoints once. The numpy code in `create` needs about ten
array passes per value (widen, subtract, magnitude, compare, compress, per slice); `scan` here is
one fused loop per value, compiled, run in `create`'s worker threads with the GIL released, so all
cores work on it. It returns exactly what `create._scan`'s numpy code returns for the same inputs
(tests/test_kernels.py), so the diff written is byte-identical either way.

numba was chosen because it compiles this loop from Python source at run time from wheels (no
compiler needed), releases the GIL, and keeps `import sftdiff` light: it is imported only for a
scan of at least `MIN_VALUES` values (small models never pay for it), in a background thread
started when the scan begins (`preload`), while the worker threads scan with numpy until it is ready;
its compiled code is cached on disk (`cache=True`) so later runs skip compiling. Without numba, or
with `SFTDIFF_NUMBA=0` in the environment, `scan` returns None and `create` uses its numpy code.
torch's kernels were not used by default: `create` does not import torch (about a second of
start-up), and torch has no fused filter-and-compress (`device_scan` uses torch for `--device`).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import numpy as np

# The smallest scan that loads the kernel: importing numba and loading the compiled kernel from
# its cache costs about a second of CPU, more than numpy spends on a BERT-base-sized model (110M
# values), and about what the kernel saves on 300M.
MIN_VALUES = 1 << 28
# How each stored dtype is handed to the kernel: BF16 and F16 as their 16-bit patterns.
_KIND = {"BF16": 0, "F16": 1, "F32": 2, "F64": 3}

_lock = threading.Lock()
_kernel: Any = None  # the module of compiled kernels, False when unavailable, None before the first try
_scratch = threading.local()


def available() -> bool:
    """Whether the compiled kernel can be used (imports numba and loads or compiles it on first call)."""
    return _load() is not None


def preload(values: int) -> None:
    """Start loading the kernel in a background thread if a scan of `values` values repays it
    (`scan` returns None, i.e. numpy does the work, until it is loaded)."""
    if values >= MIN_VALUES and _kernel is None:
        threading.Thread(target=_load, name="sftdiff-kernel-load", daemon=True).start()


def scan(base_raw: np.ndarray, base_dtype: str, ft_raw: np.ndarray, ft_dtype: str, lo: int, hi: int,
         threshold: np.uint32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(ascending flat indices as int64, |ft − base| as float32, the base's and the fine-tune's raw
    values there) of the positions in [lo, hi) whose magnitude's float32 bit pattern is
    ≥ `threshold` (NaN and ±inf always pass), as `create._scan` computes them; None when the kernel
    is not loaded (see `preload`, `available`) or cannot take these arrays: the caller uses numpy."""
    kernel = _kernel or None
    if kernel is None or base_dtype not in _KIND or ft_dtype not in _KIND:
        return None
    b, f = _as_kernel_array(base_raw, base_dtype), _as_kernel_array(ft_raw, ft_dtype)
    if b is None or f is None:
        return None
    n = hi - lo
    idx, bits = _buffer("idx", n, np.int64), _buffer("bits", n, np.uint32)  # bits: float32 patterns
    out_b, out_f = _buffer("b", n, b.dtype), _buffer("f", n, f.dtype)
    threshold = np.uint32(threshold)
    same = base_dtype == ft_dtype
    if same and base_dtype == "BF16":
        count = kernel.scan_bf16(b, f, lo, hi, threshold, idx, bits, out_b, out_f)
    elif same and base_dtype == "F16":
        count = kernel.scan_f16(b, f, lo, hi, threshold, idx, bits, out_b, out_f)
    elif same and base_dtype == "F32":
        count = kernel.scan_f32(b, f, lo, hi, threshold, idx, bits, out_b, out_f)
    else:
        count = kernel.scan_mixed(b, _KIND[base_dtype], f, _KIND[ft_dtype], lo, hi, threshold, idx, bits,
                                  out_b, out_f)
    return (idx[:count].copy(), bits[:count].view(np.float32).copy(),
            out_b[:count].view(base_raw.dtype).copy(), out_f[:count].view(ft_raw.dtype).copy())


def _as_kernel_array(raw: np.ndarray, dtype: str) -> np.ndarray | None:
    """The flat raw array in native byte order as the kernel reads it, or None (e.g. big-endian data)."""
    flat = np.asarray(raw).reshape(-1)
    want = {"BF16": np.uint16, "F16": np.uint16, "F32": np.float32, "F64": np.float64}[dtype]
    if flat.dtype.byteorder not in ("=", "|", "<" if sys.byteorder == "little" else ">"):
        return None
    if flat.dtype.itemsize != np.dtype(want).itemsize:
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


def _load() -> Any:
    """The kernels' module, or None (loaded once; a second caller waits for the first)."""
    global _kernel
    if _kernel is None:
        with _lock:
            if _kernel is None:
                _kernel = _compile() or False
    return _kernel or None


def _compile() -> Any:
    if os.environ.get("SFTDIFF_NUMBA", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        from . import _numba_scan
    except Exception:  # noqa: BLE001 - numba not installed, or a broken install: numpy does the work
        return None
    return _numba_scan
