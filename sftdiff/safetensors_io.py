"""Reading and writing safetensors files with numpy only, validating everything read.

The reader parses the header itself rather than trusting a library: every number in it is checked
against the file's size before anything is allocated or mapped, so a hostile or truncated file ends
in a `FormatError`, never in a crash or a huge allocation. Tensor data is memory-mapped and read only
when an array is touched.

The writers produce files that the reference `safetensors` implementation accepts: 8-byte
little-endian header length, JSON header padded with spaces to a multiple of 8, tensor buffers
packed back to back in header order with no gaps.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Mapping

import numpy as np

from .dtypes import STORAGE
from .errors import FormatError, OutputError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # same bound as the reference implementation
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. `array(name)` maps one tensor lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.metadata, self.tensors, self.data_start = self._parse(f, size)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        except FormatError as e:
            raise FormatError(f"{self.path}: {e}") from None
        except IsADirectoryError:
            raise FormatError(f"{self.path}: is a folder, expected a safetensors file") from None
        except FileNotFoundError:
            raise FormatError(f"{self.path}: no such file") from None
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read ({e.strerror or e})") from None
        self.size = size

    @staticmethod
    def _parse(f: BinaryIO, size: int):
        prefix = f.read(8)
        if len(prefix) < 8:
            raise FormatError("not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"not a safetensors file: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if n > size - 8:
            raise FormatError(f"not a safetensors file, or truncated: header length {n} runs past the end of the {size}-byte file")
        if n < 2:
            raise FormatError("header is too short to be a JSON object")
        raw = f.read(n)
        if raw[:1] != b"{":
            raise FormatError("header does not start with '{' (not a safetensors file?)")
        # The spec allows only spaces (0x20) after the JSON object; json.loads would also take
        # tabs and newlines, so two readers could disagree on what a valid file is.
        body = raw.rstrip(b" ")
        if body[-1:] != b"}":
            raise FormatError("header JSON is followed by bytes other than spaces (only 0x20 may pad it)")
        try:
            header = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as e:  # ValueError: bad UTF-8/JSON, or an integer of > 4300 digits
            raise FormatError(f"header is not valid UTF-8 JSON ({e.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise FormatError("header is not a JSON object")
        try:  # a "\ud800" escape is valid JSON but not Unicode text (the reference reader refuses it too)
            json.dumps(header, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError("header holds a lone surrogate escape (\\ud800-\\udfff), which is not valid Unicode") from None
        data_start = 8 + n
        data_len = size - data_start
        metadata = header.pop(METADATA_KEY, None)
        if metadata is None:  # absent, or null as the reference implementation allows
            metadata = {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise FormatError("__metadata__ must map strings to strings")
        tensors: dict[str, TensorInfo] = {}
        for name, info in header.items():
            tensors[name] = _tensor_info(name, info, data_start, data_len)
        spans = sorted((t.start, t.end, t.name) for t in tensors.values())
        cursor = data_start
        for start, end, name in spans:
            if start != cursor:
                what = "overlaps another tensor" if start < cursor else "leaves a gap before it"
                raise FormatError(f"tensor {name!r} {what} (byte offsets must be contiguous)")
            cursor = end
        if cursor != size:
            raise FormatError(f"{size - cursor} bytes after the last tensor (offsets must cover the buffer)")
        return metadata, tensors, data_start

    def array(self, name: str) -> np.ndarray:
        """The tensor's raw values (BF16 as uint16), read-only, mapped from the file."""
        t = self.tensors[name]
        dtype = STORAGE[t.dtype]
        if t.numel == 0:
            return np.empty(t.shape, dtype=dtype)
        flat = np.frombuffer(self._map, dtype=dtype, count=t.numel, offset=t.start)
        return flat.reshape(t.shape)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process's mapping (the OS page cache keeps them), so a
        pass over files larger than memory keeps the resident size bounded; reads map them again."""
        t = self.tensors[name]
        if self._map is None or t.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.start - t.start % mmap.PAGESIZE  # madvise needs a page-aligned start
        self._map.madvise(mmap.MADV_DONTNEED, start, t.end - start)

    def read_bytes(self, start: int, length: int) -> bytes:
        """Raw bytes of the file (used for fingerprint sampling)."""
        if self._map is None or length <= 0:
            return b""
        return self._map[start : start + length]


def _tensor_info(name: str, info: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"} or len(info) != 3:
        raise FormatError(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in STORAGE:  # a list or object is unhashable: check the type first
        raise FormatError(f"tensor {name!r}: unsupported dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise FormatError(f"tensor {name!r}: data_offsets {offsets!r} outside the {data_len}-byte buffer")
    numel = 1
    for d in shape:
        numel *= d
    if numel * STORAGE[dtype].itemsize != offsets[1] - offsets[0]:
        raise FormatError(
            f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not hold shape {shape} of {dtype}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


# ---------------------------------------------------------------- writing


def header_bytes(specs: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None) -> bytes:
    """Length prefix + padded JSON header for tensors (name, dtype, shape) laid out in this order."""
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        if name == METADATA_KEY or name in header:
            raise ValueError(f"duplicate or reserved tensor name {name!r}")
        nbytes = STORAGE[dtype].itemsize * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return len(text).to_bytes(8, "little") + text


def _as_bytes(array: np.ndarray, dtype: str) -> memoryview:
    arr = np.ascontiguousarray(array, dtype=STORAGE[dtype])
    return memoryview(arr).cast("B") if arr.size else memoryview(b"")


@dataclass(frozen=True)
class WrittenTensor:
    """A tensor as a writer put it out: enough to recognise it when the file is read back."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    samples: tuple[tuple[int, bytes], ...]  # (byte offset inside the tensor, the bytes written there)


@dataclass
class Written:
    """What a writer wrote, in file order; `verify_written` compares a file with it."""

    metadata: dict[str, str]
    tensors: list[WrittenTensor]


def _write_chunked(f: BinaryIO, array: np.ndarray, dtype: str, chunk_bytes: int = 64 << 20) -> tuple[tuple[int, bytes], ...]:
    """Write an array's bytes; large arrays go in slices so a conversion never doubles the memory.

    Returns the first, middle and last element of every slice as written (byte offset, bytes):
    a misplaced, reordered or shifted slice or tensor shows up there when the file is read back.
    """
    flat = np.asarray(array).reshape(-1)
    itemsize = STORAGE[dtype].itemsize
    step = max(1, chunk_bytes // max(1, itemsize))
    samples: list[tuple[int, bytes]] = []
    for i in range(0, flat.size, step):
        buf = _as_bytes(flat[i : i + step], dtype)
        f.write(buf)
        n = len(buf) // itemsize
        for j in sorted({0, n // 2, n - 1}):
            samples.append(((i + j) * itemsize, bytes(buf[j * itemsize : (j + 1) * itemsize])))
    return tuple(samples)


class StreamingWriter:
    """Writes a safetensors file whose tensor list is known up front; data streams in order.

    Used for checkpoints, where names, dtypes and shapes are known before any value is computed,
    and for diffs whose entries are all in memory: the header goes first and each tensor is
    written as soon as it exists, once.
    """

    def __init__(self, f: BinaryIO, specs: list[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None):
        self._f = f
        self._pending = list(specs)
        self._next = 0
        f.write(header_bytes(specs, metadata))
        self.written = Written(dict(metadata or {}), [])

    def write(self, name: str, array: np.ndarray) -> None:
        expected, dtype, shape = self._pending[self._next]
        if name != expected or tuple(np.shape(array)) != tuple(shape):
            raise ValueError(f"expected tensor {expected!r} {shape}, got {name!r} {np.shape(array)}")
        samples = _write_chunked(self._f, array, dtype)
        self.written.tensors.append(WrittenTensor(name, dtype, tuple(shape), samples))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._pending):
            raise ValueError(f"{len(self._pending) - self._next} tensors were never written")


class SpooledWriter:
    """Collects tensors whose number and sizes are not known in advance, then writes one file.

    Data goes to an anonymous temporary file next to the output as it arrives, so memory stays
    bounded by the largest tensor; `finish` writes the header and copies the spool behind it.
    The price is writing the data twice and reading it once, so use `StreamingWriter` whenever
    the tensor list can be known before the first tensor is written.
    """

    def __init__(self, spool_dir: str | None = None):
        self._spool = tempfile.TemporaryFile(dir=spool_dir)
        self._specs: list[tuple[str, str, tuple[int, ...]]] = []
        self.written = Written({}, [])

    def add(self, name: str, dtype: str, array: np.ndarray) -> None:
        shape = tuple(np.shape(array))
        self._specs.append((name, dtype, shape))
        self.written.tensors.append(WrittenTensor(name, dtype, shape, _write_chunked(self._spool, array, dtype)))

    def finish(self, f: BinaryIO, metadata: Mapping[str, str] | None) -> None:
        f.write(header_bytes(self._specs, metadata))
        self.written.metadata = dict(metadata or {})
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, f, 16 << 20)
        self._spool.close()

    def discard(self) -> None:
        self._spool.close()


def verify_written(st: SafetensorsFile, written: Written) -> None:
    """Check that a file read back holds what a writer wrote: the same metadata, the same tensors
    (names, dtypes, shapes) in the same order, and the sampled bytes at each tensor's offsets.

    Parsing `st` has already checked that the offsets are contiguous and cover the file exactly,
    so together this catches a wrong header, misplaced or reordered data and a short or long
    write, in O(tensors) reads rather than a pass over the data.
    """
    def fail(problem: str) -> OutputError:
        return OutputError(f"{st.path}: read back after writing, {problem}; the file is not kept "
                           "(a bug in sftdiff or a disk fault: please report it)")

    if st.metadata != written.metadata:
        raise fail("its metadata differs from what was written")
    in_file = sorted(st.tensors.values(), key=lambda t: t.start)
    if [t.name for t in in_file] != [w.name for w in written.tensors]:
        raise fail("its tensors are not the ones written, in the order written")
    for t, w in zip(in_file, written.tensors):
        if t.dtype != w.dtype or t.shape != w.shape:
            raise fail(f"tensor {w.name!r} is {t.dtype} {list(t.shape)}, but {w.dtype} {list(w.shape)} was written")
        for offset, expected in w.samples:
            if st.read_bytes(t.start + offset, len(expected)) != expected:
                raise fail(f"tensor {w.name!r} holds other bytes at offset {offset} than were written there")
