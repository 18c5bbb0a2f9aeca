"""numba kernels of `create`'s scan (imported by `kernels` only when numba is installed; see there).

Module-level functions, so that numba's on-disk cache (`cache=True`) finds them again in later
processes. Each kernel works in blocks of `BLOCK` values: a branch-free loop (which LLVM
vectorizes) computes the magnitudes' float32 bit patterns |Δ| into an L1-resident buffer and a
flag byte per value that reaches the threshold; `_collect` then tests the flags `GROUP` at a time
as one 64-bit word and notes the offsets of the groups that hold a candidate, then copies those
candidates out: their positions, magnitudes and both raw values (so `create` never reads the
selected values a second time). At the ~1.5% of values the scan keeps, nearly every block holds a
candidate and about one group in nine does. This replaced a per-group maximum over the magnitudes
(tools/bench_create.py, docs/create.md: the collection went from ~1.1 to ~0.3 ns per scanned
value). Bit patterns, as in create's numpy code: for non-negative floats they order as the
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
GROUP = 8  # flags per 64-bit word tested at once by `_collect`
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
def _collect(buf: Any, flags: Any, words: Any, pos: Any, bb: Any, ff: Any, n: int, start: int, out_idx: Any,
             out_bits: Any, out_b: Any, out_f: Any, count: int) -> int:
    """Append the positions (start + j), bit patterns and raw base and fine-tune values (bb, ff) of
    the block's values whose flag is set (`words`: the flags as 64-bit words); `pos` is scratch
    for the block's passing offsets."""
    for j in range(n, BLOCK):  # a partial last block: nothing beyond n passes
        flags[j] = 0
    c = 0
    for g in range(BLOCK // GROUP):
        if words[g] != 0:
            for j in range(g * GROUP, g * GROUP + GROUP):  # no branch per value
                pos[c] = j
                c += flags[j]
    for q in range(c):  # then one sequential write per candidate and output
        j = pos[q]
        out_idx[count + q] = start + j
        out_bits[count + q] = buf[j]
        out_b[count + q] = bb[j]
        out_f[count + q] = ff[j]
    return count + c


@njit(cache=True, nogil=True, boundscheck=False)
def scan_bf16(b: Any, f: Any, lo: int, hi: int, threshold: Any, out_idx: Any, out_bits: Any, out_b: Any,
              out_f: Any) -> int:
    buf, flags, pos = np.empty(BLOCK, np.uint32), np.zeros(BLOCK, np.uint8), np.empty(BLOCK, np.int32)
    words = flags.view(np.uint64)  # a group's GROUP flags as one word: one test skips the group
    count = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        bb, ff = b[start:start + n], f[start:start + n]
        for j in range(n):
            m = np.float32(_bf16(ff[j]) - _bf16(bb[j])).view(np.uint32) & _SIGN_OFF
            buf[j] = m
            flags[j] = m >= threshold
        count = _collect(buf, flags, words, pos, bb, ff, n, start, out_idx, out_bits, out_b, out_f, count)
    return count


@njit(cache=True, nogil=True, boundscheck=False)
def scan_f16(b: Any, f: Any, lo: int, hi: int, threshold: Any, out_idx: Any, out_bits: Any, out_b: Any,
             out_f: Any) -> int:
    buf, flags, pos = np.empty(BLOCK, np.uint32), np.zeros(BLOCK, np.uint8), np.empty(BLOCK, np.int32)
    words = flags.view(np.uint64)
    count = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        bb, ff = b[start:start + n], f[start:start + n]
        for j in range(n):
            m = np.float32(_f16(ff[j]) - _f16(bb[j])).view(np.uint32) & _SIGN_OFF
            buf[j] = m
            flags[j] = m >= threshold
        count = _collect(buf, flags, words, pos, bb, ff, n, start, out_idx, out_bits, out_b, out_f, count)
    return count


@njit(cache=True, nogil=True, boundscheck=False)
def scan_f32(b: Any, f: Any, lo: int, hi: int, threshold: Any, out_idx: Any, out_bits: Any, out_b: Any,
             out_f: Any) -> int:
    buf, flags, pos = np.empty(BLOCK, np.uint32), np.zeros(BLOCK, np.uint8), np.empty(BLOCK, np.int32)
    words = flags.view(np.uint64)
    count = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        bb, ff = b[start:start + n], f[start:start + n]
        for j in range(n):
            m = np.float32(ff[j] - bb[j]).view(np.uint32) & _SIGN_OFF
            buf[j] = m
            flags[j] = m >= threshold
        count = _collect(buf, flags, words, pos, bb, ff, n, start, out_idx, out_bits, out_b, out_f, count)
    return count


@njit(cache=True, nogil=True, boundscheck=False)
def scan_mixed(b: Any, kb: int, f: Any, kf: int, lo: int, hi: int, threshold: Any, out_idx: Any,
               out_bits: Any, out_b: Any, out_f: Any) -> int:
    buf, flags, pos = np.empty(BLOCK, np.uint32), np.zeros(BLOCK, np.uint8), np.empty(BLOCK, np.int32)
    words = flags.view(np.uint64)
    wide64 = kb == 3 or kf == 3
    count = 0
    for start in range(lo, hi, BLOCK):
        n = min(BLOCK, hi - start)
        bb, ff = b[start:start + n], f[start:start + n]
        for j in range(n):
            if wide64:  # subtract in float64, round the magnitude once to float32 (as numpy's cast)
                m = np.float32(abs(_to_f64(ff[j], kf) - _to_f64(bb[j], kb))).view(np.uint32)
            else:
                m = np.float32(_to_f32(ff[j], kf) - _to_f32(bb[j], kb)).view(np.uint32) & _SIGN_OFF
            buf[j] = m
            flags[j] = m >= threshold
        count = _collect(buf, flags, words, pos, bb, ff, n, start, out_idx, out_bits, out_b, out_f, count)
    return count
