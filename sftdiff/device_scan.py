"""`create`'s scan with torch on a chosen device (`sftdiff create --device`, `create_diff(device=...)`).

The scan computes |fine-tune − base| for every value and keeps the positions whose magnitude reaches
the TopK's floor. On the CPU that is bound by memory bandwidth (numpy, or the compiled kernel of
`kernels`); a CUDA GPU does the arithmetic at its own memory's bandwidth, so there the limit is
moving the bytes over PCIe. `scan` copies a task's slices of both checkpoints into a reused
(pinned, on CUDA) host buffer, sends them to the device without blocking, computes the magnitudes'
float32 bit patterns and compares them with the threshold there, and brings back only the
candidates. It returns bit for bit what `create._scan`'s numpy code returns, so the diff written
is byte-identical with and without a device; the same code runs on `cpu` (how it is tested on a
machine without a GPU) and on `cuda`.

torch is imported only when a device is asked for: `create` without one never imports it. The raw
values of the candidates are taken from the host arrays (O(candidates), not worth a transfer).
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import UsageError

# Values per transfer and computation: each torch op has a fixed cost (and on the CPU starts an
# OpenMP region), so chunks are large; on a GPU a whole scan task goes in one transfer.
# Measured on the CPU: 2^16 values 10-60% slower than 2^20, 2^22 no better.
CPU_CHUNK = 1 << 20
CUDA_CHUNK = 1 << 22
# How each stored dtype is staged (the bytes as they are, in a numpy dtype of the same width) and
# what torch dtype those bytes are then viewed as.
_CARRIER = {"BF16": np.int16, "F16": np.int16, "F32": np.float32, "F64": np.float64}
_TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_SIGN_OFF = 0x7FFFFFFF

_local = threading.local()  # per worker thread: its buffers (and CUDA stream) per device


def resolve(device: Any) -> Any:
    """`device` ("cpu", "cuda", "cuda:N", "auto": CUDA when available, else the CPU) as a
    `torch.device`; a `UsageError` when torch is not installed or the CUDA device is not there."""
    torch = _torch(device)
    if isinstance(device, torch.device):
        device = str(device)
    spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UsageError(f"device {device!r}: torch {torch.__version__} ({build}) sees no CUDA device; "
                         "use --device cpu or leave --device out")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def scan(base_raw: np.ndarray, base_dtype: str, ft_raw: np.ndarray, ft_dtype: str, lo: int, hi: int,
         threshold: np.uint32, device: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(ascending flat indices as int64, |ft − base| as float32), on the host, of the positions in
    [lo, hi) whose magnitude's float32 bit pattern is ≥ `threshold` (NaN and ±inf always pass),
    computed with torch on `device` (a `torch.device` or a spelling `resolve` accepts) exactly as
    `create._scan` computes them; None for inputs it does not take (the caller uses numpy)."""
    b, f = _staged_view(base_raw, base_dtype), _staged_view(ft_raw, ft_dtype)
    if b is None or f is None:
        return None
    torch = _torch(device)
    dev = device if isinstance(device, torch.device) else _resolved(str(device))
    bufs = _buffers(torch, dev)
    chunk = CPU_CHUNK if dev.type == "cpu" else CUDA_CHUNK
    indices, bits = [], []
    try:
        with bufs.stream_context():
            for s in range(lo, hi, chunk):
                e = min(hi, s + chunk)
                i, m = _scan_chunk(torch, bufs, b[s:e], base_dtype, f[s:e], ft_dtype, int(threshold))
                if i.size:
                    indices.append(i + s)
                    bits.append(m)
    except torch.cuda.OutOfMemoryError:  # this name on every torch >= 2.2 (torch.OutOfMemoryError is newer)
        raise UsageError(f"device {dev}: out of memory in create's scan; free the device or leave --device "
                         "out to scan on the CPU") from None
    if not indices:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    idx, mags = np.concatenate(indices), np.concatenate(bits).view(np.float32)
    return idx, _numpy_nans(idx, mags, base_raw, base_dtype, ft_raw, ft_dtype)


def _scan_chunk(torch: Any, bufs: "_Buffers", b: np.ndarray, b_dtype: str, f: np.ndarray, f_dtype: str,
                threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (relative to the chunk, int64) and magnitude bit patterns (uint32) of one chunk."""
    m = b.size
    bt, ft = bufs.stage(torch, b, f)
    bt = bt.view(getattr(torch, _TORCH_DTYPE[b_dtype]))
    ft = ft.view(getattr(torch, _TORCH_DTYPE[f_dtype]))
    wide = torch.float64 if "F64" in (b_dtype, f_dtype) else torch.float32
    bw, fw = bufs.wide(torch, wide, m)
    if bt.dtype != wide:  # widening BF16/F16/F32 to float32 or float64 is exact
        bt = bw.copy_(bt)
    if ft.dtype != wide:
        ft = fw.copy_(ft)
    d = torch.sub(ft, bt, out=bw)
    # As numpy: a float64 difference is rounded once to float32. numpy takes |Δ| before rounding, this
    # after: the same, as rounding to nearest is symmetric; clearing the sign bit is abs (of a NaN too).
    mags = bufs.narrow(torch, m).copy_(d) if wide == torch.float64 else d
    mag_bits = mags.view(torch.int32)
    mag_bits.bitwise_and_(_SIGN_OFF)
    mask = torch.ge(mag_bits, threshold, out=bufs.mask(torch, m))
    where = torch.nonzero(mask).view(-1)  # ascending; on a GPU this waits for the chunk
    found = mag_bits.index_select(0, where)
    return where.cpu().numpy(), found.cpu().numpy().view(np.uint32)


def _numpy_nans(idx: np.ndarray, mags: np.ndarray, base_raw: np.ndarray, base_dtype: str, ft_raw: np.ndarray,
                ft_dtype: str) -> np.ndarray:
    """`mags` with NaN magnitudes recomputed by numpy: which NaN an operation yields is not fixed by
    IEEE 754 (a GPU gives one canonical NaN, the CPU propagates payloads), and the result must be
    numpy's bit for bit. NaN is an error in `create` anyway, so this is rare and cheap."""
    nan = np.flatnonzero(np.isnan(mags))
    if nan.size:
        from .create import abs_delta_slices  # here: create imports this module

        at = idx[nan]
        b, f = base_raw.reshape(-1)[at], ft_raw.reshape(-1)[at]
        with np.errstate(invalid="ignore", over="ignore"):  # NaN is expected here; create reports it
            mags[nan] = next(abs_delta_slices(b, base_dtype, f, ft_dtype, at.size))[1]
    return mags


def _staged_view(raw: np.ndarray, dtype: str) -> np.ndarray | None:
    """The flat raw array as the carrier dtype its bytes are staged in, or None (big-endian data, an
    unexpected dtype or width)."""
    carrier = _CARRIER.get(dtype)
    flat = np.asarray(raw).reshape(-1)
    if carrier is None or flat.dtype.itemsize != np.dtype(carrier).itemsize:
        return None
    if flat.dtype.byteorder not in ("=", "|", "<" if sys.byteorder == "little" else ">"):
        return None
    if flat.dtype.kind not in "uif":
        return None
    return flat.view(carrier)


class _Buffers:
    """One worker thread's reused buffers on one device (grown when a chunk needs more)."""

    def __init__(self, torch: Any, device: Any) -> None:
        self._torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._stage_host = self._stage_dev = None
        self._half = 0
        self._wide: dict[Any, tuple[Any, Any]] = {}
        self._narrow = self._mask = None

    def stream_context(self) -> Any:
        """On CUDA, this thread's own stream: the worker threads' transfers and scans overlap."""
        return self._torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def stage(self, torch: Any, b: np.ndarray, f: np.ndarray) -> tuple[Any, Any]:
        """Both slices on the device, as byte tensors: copied into the host staging buffer (pinned
        for CUDA, so the transfer runs without blocking), then sent; on the CPU the staging buffer
        is the device buffer. Reusing the host buffer for the next chunk is safe because each
        chunk ends by waiting for its results (`nonzero`), which comes after its transfer."""
        nb, nf = b.nbytes, f.nbytes
        if self._stage_host is None or self._half < max(nb, nf):
            self._half = half = _round_up(max(nb, nf, 2 * self._half), 64)  # each input's share, aligned for any view
            self._stage_host = torch.empty(2 * half, dtype=torch.uint8, pin_memory=self.cuda)
            self._stage_host_np = self._stage_host.numpy()
            self._stage_dev = torch.empty(2 * half, dtype=torch.uint8, device=self.device) if self.cuda else None
        half, host = self._half, self._stage_host_np
        np.copyto(host[:nb].view(b.dtype), b)
        np.copyto(host[half:half + nf].view(f.dtype), f)
        if not self.cuda:
            return self._stage_host[:nb], self._stage_host[half:half + nf]
        dev = self._stage_dev
        dev[:nb].copy_(self._stage_host[:nb], non_blocking=True)
        dev[half:half + nf].copy_(self._stage_host[half:half + nf], non_blocking=True)
        return dev[:nb], dev[half:half + nf]

    def wide(self, torch: Any, dtype: Any, m: int) -> tuple[Any, Any]:
        pair = self._wide.get(dtype)
        if pair is None or pair[0].numel() < m:
            pair = tuple(torch.empty(m, dtype=dtype, device=self.device) for _ in range(2))
            self._wide[dtype] = pair
        return pair[0][:m], pair[1][:m]

    def narrow(self, torch: Any, m: int) -> Any:
        if self._narrow is None or self._narrow.numel() < m:
            self._narrow = torch.empty(m, dtype=torch.float32, device=self.device)
        return self._narrow[:m]

    def mask(self, torch: Any, m: int) -> Any:
        if self._mask is None or self._mask.numel() < m:
            self._mask = torch.empty(m, dtype=torch.bool, device=self.device)
        return self._mask[:m]


def _buffers(torch: Any, device: Any) -> _Buffers:
    per_device = getattr(_local, "buffers", None)
    if per_device is None:
        per_device = _local.buffers = {}
    bufs = per_device.get(device)
    if bufs is None:
        bufs = per_device[device] = _Buffers(torch, device)
    return bufs


@lru_cache(maxsize=None)
def _resolved(spec: str) -> Any:
    return resolve(spec)


def _torch(device: Any) -> Any:
    try:
        import torch
    except ImportError:
        raise UsageError(f"device {str(device)!r} needs torch, which is not installed; pip install torch, "
                         "or leave --device out") from None
    return torch


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to
