"""numba kernels of pass 1 (imported by `kernels` only when numba is installed; see there).

Module-level functions, so that numba's on-disk cache (`cache=True`) finds them again in later
processes. Each kernel works in blocks of `BLOCK` values: a branch-free loop (which LLVM
vectorizes) computes the magnitudes' float32 bit patterns |Δ| into an L1-resident buffer and their
maximum; only a block whose maximum reaches the threshold is looked at again (`_collect`), and
there only the groups of `GROUP` values whose own maximum reaches it are scanned value by value.
At the ~1.5% of values pass 1 keeps nearly every block holds a candidate, while about one group
in nine does; on this project's VM the grouped collection measured within noise of a branch per
value of the block (tools/bench_create.py: the collection costs ~1.4 ns per scanned value either
way, see docs/create.md). Bit patterns, as in create's numpy code: for non-negative floats they order as the
values, and NaN and ±inf (patterns ≥ 0x7F800000) pass every finite floor.

One kernel per common dtype pair, whose widening is fixed at compile time, and a generic one for
mixed pairs, whose `kind` arguments say how each side is widened: 0 BF16 bits, 1 F16 bits,
2 float32, 3 float64 (then the difference is taken in float64 and rounded to float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

BLOCK = 512  # values per block: the buffer stays in L1
GROUP = 8  # values per group of `_collect` (a full block holds BLOCK // GROUP of them)
_SIGN_OFF = np.uint32(0x7FFFFFFF)


@njit(cache=True, nogil=True, inline="always")
def _bf16(x: Any) -> Any:
    return np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)


@njit(cache=True, nogil=True, inline="always")
def _f16(x: Any) -> Any:
    """IEEE binary16 bits to float32, exactly (as numpy's float16 → float32 cast), without branches."""
    h = np.uint32(x)
    sign = np.uint32((h & np.uint32(0x8000)) << np.uint32(16))
    exp = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    normal = np.uint32(((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13)))
    special = np.uint32(np.uint32(0x7F800000) | (mant << np.uint32(13)))  # inf, NaN (payload kept)
    tiny = np.float32(np.float32(mant) * np.float32(5.9604644775390625e-08)).view(np.uint32)  # zero, subnormal: exact
    body = tiny if exp == 0 else (special if exp == 31 else normal)
    return np.uint32(sign | body).view(np.float32)


@njit(cache=True, nogil=True, inline="always")
def _to_f32(x: Any, kind: int) -> Any:
    if kind == 0:
        return _bf16(x)
    if kind == 1:
        return _f16(x)
    return np.float32(x)


@njit(cache=True, nogil=True, inline="always")
def _to_f64(x: Any, kind: int) -> Any:
    if kind == 3:
        return np.float64(x)
    return np.float64(_to_f32(x, kind))


@njit(cache=True, nogil=True, inline="always")
def _collect(buf: Any, n: int, start: int, threshold: Any, out_idx: Any, out_bits: Any, count: int) -> int:
    """Append the positions (start + j) and bit patterns of buf[:n] reaching the threshold."""
    if n < BLOCK:  # the tensor's or task's last, partial block
        for j in range(n):
            if buf[j] >= threshold:
                out_idx[count] = start + j
                out_bits[count] = buf[j]
                count += 1
        return count
    for g in range(0, BLOCK, GROUP):
        top = buf[g]
        for j in range(g + 1, g + GROUP):  # a constant trip count: unrolled
            top = max(top, buf[j])
        if top >= threshold:  # write every value of the group, advance past those that pass: no branches
            for j in range(g, g + GROUP):
                out_idx[count] = start + j
                out_bits[count] = buf[j]
                count += buf[j] >= threshold
    return count


@njit(cache=True, nogil=True, boundscheck=False)
def scan_bf16(b: Any, f: Any, lo: int, hi: int, threshold: Any, out_idx: Any, out_bits: Any) -> int:
    buf = np.empty(BLOCK, np.uint32)
    count = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        bb, ff = b[start:start + n], f[start:start + n]
        top = np.uint32(0)
        for j in range(n):
            m = np.float32(_bf16(ff[j]) - _bf16(bb[j])).view(np.uint32) & _SIGN_OFF
            buf[j] = m
            top = max(top, m)
        if top >= threshold:
            count = _collect(buf, n, start, threshold, out_idx, out_bits, count)
    return count


@njit(cache=True, nogil=True, boundscheck=False)
def scan_f16(b: Any, f: Any, lo: int, hi: int, threshold: Any, out_idx: Any, out_bits: Any) -> int:
    buf = np.empty(BLOCK, np.uint32)
    count = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        bb, ff = b[start:start + n], f[start:start + n]
        top = np.uint32(0)
        for j in range(n):
            m = np.float32(_f16(ff[j]) - _f16(bb[j])).view(np.uint32) & _SIGN_OFF
            buf[j] = m
            top = max(top, m)
        if top >= threshold:
            count = _collect(buf, n, start, threshold, out_idx, out_bits, count)
    return count


@njit(cache=True, nogil=True, boundscheck=False)
def scan_f32(b: Any, f: Any, lo: int, hi: int, threshold: Any, out_idx: Any, out_bits: Any) -> int:
    buf = np.empty(BLOCK, np.uint32)
    count = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        bb, ff = b[start:start + n], f[start:start + n]
        top = np.uint32(0)
        for j in range(n):
            m = np.float32(ff[j] - bb[j]).view(np.uint32) & _SIGN_OFF
            buf[j] = m
            top = max(top, m)
        if top >= threshold:
            count = _collect(buf, n, start, threshold, out_idx, out_bits, count)
    return count


@njit(cache=True, nogil=True, boundscheck=False)
def scan_mixed(b: Any, kb: int, f: Any, kf: int, lo: int, hi: int, threshold: Any, out_idx: Any,
               out_bits: Any) -> int:
    buf = np.empty(BLOCK, np.uint32)
    wide64 = kb == 3 or kf == 3
    count = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        for j in range(n):
            if wide64:  # subtract in float64, round the magnitude once to float32 (as numpy's cast)
                m = np.float32(abs(_to_f64(f[start + j], kf) - _to_f64(b[start + j], kb))).view(np.uint32)
            else:
                m = np.float32(_to_f32(f[start + j], kf) - _to_f32(b[start + j], kb)).view(np.uint32) & _SIGN_OFF
            buf[j] = m
        count = _collect(buf, n, start, threshold, out_idx, out_bits, count)
    return count
