"""Base + diffs → a standalone checkpoint on disk (`bake`); `inplace.py` changes a loaded model instead.

Composition rule (spec "Applying"): diffs apply in order; a sparse entry adds `scale × values`
(summed in float32, float64 for F64 tensors, and rounded once to the output dtype); a dense
entry replaces the parameter (a later one wins, later sparse entries add onto it; scales do not
apply to dense entries); a dense entry for a parameter the base lacks adds it under its own name.

`bake` streams: the output's tensor list is known before any value is computed, so each shard's
header is written first and tensors follow one at a time. Unchanged tensors are copied by the
kernel (`copy_file_range`) straight from the base's safetensors files; changed ones are read in
slices of `CHUNK_ELEMENTS` into a few reused, cache-sized buffers, and only the touched values are
converted, summed and rounded in place, so time stays near a file copy and memory near one slice
plus the diffs, whatever the model. Slices are written by a background thread (`_Writer`) while
the next one is read and patched, and written data goes to the disk in the background
(`_Flusher`) while later tensors are computed, rather than all in the final fsync.

Copying a changed tensor with `copy_file_range` and patching the output through a writable
memory map was measured and not kept: with 1%-dense diffs every 4 KiB page is touched, and the
write fault per page cost about twice the CPU of reading the slice through this buffer;
MADV_POPULATE_WRITE brings it level, but needs Linux 5.14 and per-slice mappings to bound memory.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import threading
import warnings as _warnings
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .atomic import atomic_path
from .checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, Checkpoint
from .diff import DenseEntry, SparseDiff, SparseEntry
from .dtypes import FLOAT_DTYPES, STORAGE, canonical, convert, from_float32, to_float32
from .errors import OutputError, UsageError, VerificationError
from .progress import progress_bar
from .safetensors_io import SafetensorsFile, header_bytes
from .verify import BaseDigests, BaseMatch, verify_against_base

DEFAULT_SHARD_SIZE = 50 * 10**9  # transformers' save_pretrained default, "50GB"
# Values read, patched and written at a time. Small enough that a slice stays in the CPU caches
# from the read through the patch to the write (1M: 2-4 MB; 8M slices made `apply` ~1.5x slower).
CHUNK_ELEMENTS = 1 << 20
WRITE_BYTES = 1 << 20
# Slices the writer thread may hold (one being written, the rest queued): bounds memory, and tells
# `_RawSources` how many read buffers to rotate through (IN_FLIGHT + 1, the extra one being patched).
IN_FLIGHT = 2
FLUSH_BYTES = 256 << 20  # written data handed to the disk at a time, while the next is computed
OUTPUT_METADATA = {"format": "pt"}  # what transformers writes; its loader checks for it

# Files in a model folder that hold weights in some format: never copied (they would be stale).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".onnx")
_WEIGHT_INDEX = re.compile(r".*\.(safetensors|bin|h5|msgpack)\.index\.json$")


@dataclass(frozen=True)
class Layer:
    """One diff of the stack, as it will be applied."""

    diff: SparseDiff
    scale: float
    with_dense: bool
    label: str
    match: BaseMatch


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str | None  # base tensor it starts from (None: a new parameter from a dense entry)
    updates: tuple[tuple[int, str], ...]  # (layer index, entry name) in application order

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * STORAGE[self.dtype].itemsize


@dataclass
class BakeResult:
    path: Path
    tensors: int
    changed: int  # tensors some diff touches
    added: list[str]  # new parameters from dense entries
    shards: int
    nbytes: int
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- planning (pure)


def parse_size(text: str | int) -> int:
    """Bytes in "50GB", "500MB", "2GiB", "1e9" or a plain integer (GB = 10^9 as in transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"cannot read size {text!r}; write it like 50GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    powers = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
    try:
        size = int(float(m.group(1)) * powers[unit])
    except (ValueError, KeyError):
        raise UsageError(f"cannot read size {text!r}; write it like 50GB, 500MB or 2GiB") from None
    if size <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return size


def output_dtype(requested: str) -> str | None:
    """None for "keep", else the safetensors name of a float dtype."""
    if requested in (None, "keep"):
        return None
    try:
        name = canonical(requested)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if name not in ("F32", "BF16", "F16"):
        raise UsageError(f"--dtype {requested} is not supported; use keep, float32, bfloat16 or float16")
    return name


def plan_tensors(base: Checkpoint, layers: Sequence[Layer], dtype: str | None) -> list[OutputTensor]:
    """The output's tensors in base order (tied copies dropped), new dense parameters last."""
    updates: dict[str, list[tuple[int, str]]] = {}
    new: dict[str, tuple[str, tuple[int, ...]]] = {}
    for i, layer in enumerate(layers):
        for name, target in layer.match.names.items():
            info = layer.diff.info(name)
            if info.kind == "dense" and not layer.with_dense:
                continue
            updates.setdefault(target, []).append((i, name))
            if name in layer.match.new:
                new[target] = (info.dtype, info.shape)
    default_dtype = dtype or model_dtype(base)
    plan = []
    for name, t in base.tensors.items():
        if name in base.aliases:
            continue  # transformers re-ties shared weights on load, as save_pretrained expects
        ops = tuple(updates.get(name, ()))
        out_dtype = dtype if dtype and t.dtype in FLOAT_DTYPES else t.dtype
        plan.append(OutputTensor(name, out_dtype, _final_shape(t.shape, ops, layers), name, ops))
    for name, (_, shape) in new.items():
        ops = tuple(updates[name])
        plan.append(OutputTensor(name, default_dtype, _final_shape(shape, ops, layers), None, ops))
    return plan


def _final_shape(shape: tuple[int, ...], ops: Sequence[tuple[int, str]], layers: Sequence[Layer]) -> tuple[int, ...]:
    for i, name in ops:
        if layers[i].diff.info(name).kind == "dense":
            shape = layers[i].diff.info(name).shape
    for i, name in ops:  # a sparse entry after a resizing dense one must fit the new shape
        info = layers[i].diff.info(name)
        if info.kind == "sparse" and _starts_after_last_dense(i, ops, layers) and info.shape != shape:
            raise VerificationError(f"{layers[i].label}: {name!r} has shape {list(info.shape)} but an earlier "
                                    f"dense entry makes it {list(shape)}")
    return tuple(shape)


def _starts_after_last_dense(i: int, ops: Sequence[tuple[int, str]], layers: Sequence[Layer]) -> bool:
    dense_at = [j for j, n in ops if layers[j].diff.info(n).kind == "dense"]
    return not dense_at or i > dense_at[-1]


def model_dtype(base: Checkpoint) -> str:
    """The float dtype holding most of the base's parameters (for parameters a diff adds)."""
    counts: Counter[str] = Counter()
    for t in base.tensors.values():
        if t.dtype in FLOAT_DTYPES:
            counts[t.dtype] += t.numel
    return counts.most_common(1)[0][0] if counts else "F32"


def plan_shards(plan: Sequence[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    """Tensors packed in order into shards of at most `max_bytes` (a bigger tensor goes alone)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def merged_config(config: dict | None, layers: Sequence[Layer], dtype: str | None) -> dict | None:
    """The base's config.json with each diff's `config_patch` applied in order (shallow: a later
    diff's field wins). A diff applied without its dense entries contributes no patch, since its
    patch describes the head those entries carry."""
    patches = [layer.diff.meta.config_patch for layer in layers if layer.with_dense and layer.diff.meta.config_patch]
    if config is None and not patches and dtype is None:
        return None
    merged = dict(config or {})
    for patch in patches:
        merged.update(patch)
    if dtype is not None:
        name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]
        for key in ("dtype", "torch_dtype"):
            if key in merged or key == "dtype":
                merged[key] = name
    return merged


def check_output_location(out: Path, base_path: str | None, diff_paths: Sequence[str | None]) -> None:
    """Refuse outputs that would write into the base or replace a folder holding a diff."""
    target = out.resolve()
    if base_path:
        b = Path(base_path).resolve()
        if target == b or target in b.parents or b in target.parents:
            raise UsageError(f"output {out} overlaps the base {base_path}; write the result somewhere else")
    for d in diff_paths:
        if d and (target == Path(d).resolve() or target in Path(d).resolve().parents):
            raise UsageError(f"output {out} would replace the diff {d}; write the result somewhere else")


# ---------------------------------------------------------------- baking


def bake(base: str | os.PathLike | Checkpoint, diffs: Sequence[str | os.PathLike | SparseDiff],
         out: str | os.PathLike, *, scales: Sequence[float] | None = None,
         with_dense: Sequence[bool] | None = None, dtype: str = "keep",
         shard_size: int | str = DEFAULT_SHARD_SIZE, verify: bool = True, force: bool = False,
         progress: bool = False, warn: Callable[[str], None] | None = None) -> BakeResult:
    """Write `base` with `diffs` applied to the checkpoint folder `out`, atomically.

    `scales` and `with_dense` give one value per diff (default 1.0 and True). Everything is
    checked (shapes, entry data, base digests unless `verify=False`) before anything is written.
    """
    ckpt = base if isinstance(base, Checkpoint) else Checkpoint.open(base)
    loaded = [d if isinstance(d, SparseDiff) else _open(d, ckpt) for d in diffs]
    if not loaded:
        raise UsageError("give at least one diff to apply")
    scales = _per_diff(scales, 1.0, len(loaded), "scale")
    with_dense = _per_diff(with_dense, True, len(loaded), "with_dense")
    out = Path(out)
    check_output_location(out, ckpt.path, [d.path for d in loaded])
    target_dtype = output_dtype(dtype)
    max_bytes = parse_size(shard_size)

    digests = BaseDigests(ckpt)
    layers = []
    for i, (sd, s, wd) in enumerate(zip(loaded, scales, with_dense)):
        label = sd.path or f"diff #{i + 1}"
        match = verify_against_base(sd, ckpt, label=label, fingerprint=verify, digests=digests)
        layers.append(Layer(sd, float(s), bool(wd), label, match))
    report = warn or (lambda message: _warnings.warn(message, stacklevel=3))
    notes = [w for layer in layers for w in layer.match.warnings]
    for note in notes:
        report(note)

    plan = plan_tensors(ckpt, layers, target_dtype)
    shards = plan_shards(plan, max_bytes)
    names = shard_names(len(shards))
    config = merged_config(ckpt.config, layers, target_dtype)
    sources = _RawSources(ckpt)
    bar = progress_bar(total=len(plan), desc="apply", enabled=progress)
    try:
        with atomic_path(out, overwrite=force, directory=True) as tmp:
            copy_side_files(ckpt.path, tmp)
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            with _Flusher() as flusher:
                for shard_name, shard in zip(names, shards):
                    _write_shard(tmp / shard_name, shard, ckpt, sources, layers, bar, flusher)
            if len(shards) > 1:
                _write_index(tmp / SAFETENSORS_INDEX, shards, names)
    finally:
        sources.close()
        if bar is not None:
            bar.close()
    return BakeResult(out, len(plan), sum(1 for t in plan if t.updates), [t.name for t in plan if t.source is None],
                      len(shards), sum(t.nbytes for t in plan), notes)


def _open(source: str | os.PathLike, ckpt: Checkpoint) -> SparseDiff:
    from .sources import open_diff

    return open_diff(os.fspath(source), base=ckpt)


def _per_diff(values: Sequence[Any] | None, default: Any, count: int, what: str) -> list[Any]:
    if values is None:
        return [default] * count
    values = list(values)
    if len(values) == 1 and count > 1:
        return values * count
    if len(values) != count:
        raise UsageError(f"got {len(values)} {what} values for {count} diffs; give one per diff (or one for all)")
    return values


def copy_side_files(base_path: str | None, dest: Path) -> None:
    """Copy everything in the base folder except weights, their indexes, config.json and hidden
    entries (e.g. `.cache`, `.git`): tokenizer, generation config, README, ..."""
    if not base_path or not Path(base_path).is_dir():
        return
    for entry in sorted(Path(base_path).iterdir()):
        name = entry.name
        if name.startswith(".") or name == "config.json" or name.endswith(_WEIGHT_SUFFIXES) or _WEIGHT_INDEX.match(name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest / name)
        else:
            shutil.copyfile(entry, dest / name)  # follows symlinks (Hub cache snapshots link to blobs)


def _write_index(path: Path, shards: Sequence[Sequence[OutputTensor]], names: Sequence[str]) -> None:
    weight_map = {t.name: shard_name for shard_name, shard in zip(names, shards) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_shard(path: Path, tensors: Sequence[OutputTensor], ckpt: Checkpoint, sources: "_RawSources",
                 layers: Sequence[Layer], bar: Any, flusher: "_Flusher") -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, header_bytes([(t.name, t.dtype, t.shape) for t in tensors], OUTPUT_METADATA))
        with _Writer(fd) as writer:  # finishes (or abandons) its writes before the fd is closed
            for t in tensors:
                written = _write_tensor(fd, writer, t, ckpt, sources, layers)
                if written != t.nbytes:  # the header promised t.nbytes: anything else is a bug here
                    raise RuntimeError(f"wrote {written} bytes for {t.name!r}, header says {t.nbytes}")
                flusher.written(path, written)
                if bar is not None:
                    bar.update(1)
    finally:
        os.close(fd)
    flusher.written(path, FLUSH_BYTES)  # a finished shard goes to the disk now, whatever its size


class _Flusher:
    """Hands written data to the disk in a background thread while the next tensors are computed.

    The output must be durable before it is renamed into place (`atomic_path` fsyncs every file),
    but one fsync at the very end leaves the disk idle while the CPU works and the CPU idle while
    the disk catches up. Here each file is fsynced every `FLUSH_BYTES` and when it is complete, so
    the final fsync finds little left to write. A failed fsync fails the bake.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sftdiff-fsync")
        self._pending: list[Future] = []
        self._unflushed: dict[Path, int] = {}

    def written(self, path: Path, nbytes: int) -> None:
        self._unflushed[path] = self._unflushed.get(path, 0) + nbytes
        busy = self._pending and not self._pending[-1].done()
        if self._unflushed[path] >= FLUSH_BYTES and not busy:  # never queue flushes up behind a slow disk
            self._unflushed[path] = 0
            self._pending.append(self._pool.submit(_fsync_file, path))

    def __enter__(self) -> "_Flusher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        if exc[0] is None:
            for job in self._pending:
                job.result()  # re-raises the OSError of a failed fsync


class _Writer:
    """Writes slices to one file in a background thread, in order, while the next is computed.

    Apply is CPU-bound, and a write is mostly the kernel copying the slice into the page cache, with
    the GIL released: in this thread it overlaps with reading and patching the next slice instead of
    following it. The thread holds at most `IN_FLIGHT` slices, so `write` blocks when it is behind
    (memory stays bounded), and a slice handed over is written once `IN_FLIGHT` more have been handed
    over (`_RawSources` reuses its buffers on that). A failed write fails the bake: its OSError is raised
    in the main thread by the next call here or on leaving the block, and later writes are skipped.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=IN_FLIGHT - 1)
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="sftdiff-write", daemon=True)
        self._thread.start()

    def write(self, array: np.ndarray) -> int:
        """Queue `array` (not to be changed afterwards) for writing; returns its size in bytes."""
        self._raise_error()
        self._queue.put(array)
        return array.nbytes  # what `_write_all` writes, or it raises

    def drain(self) -> None:
        """Wait until everything queued is written (before writing to the file another way)."""
        self._queue.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            array = self._queue.get()
            try:
                if array is None:
                    return
                if self._error is None and not self._abandoned:
                    _write_all(self._fd, array)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._error = e
            finally:
                self._queue.task_done()

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._abandoned = exc[0] is not None  # the bake failed already: the output will be removed
        self._queue.put(None)
        self._thread.join()
        if exc[0] is None:
            self._raise_error()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensor(fd: int, writer: _Writer, t: OutputTensor, ckpt: Checkpoint, sources: "_RawSources",
                  layers: Sequence[Layer]) -> int:
    if not t.updates:
        base_dtype = ckpt.tensors[t.source].dtype
        if base_dtype == t.dtype and sources.can_copy(t.source):
            writer.drain()  # the kernel copy appends at the file offset: queued slices go first
            return sources.copy(t.source, fd)
        return sum(writer.write(convert(chunk, base_dtype, t.dtype)) for chunk in _base_chunks(t.source, ckpt, sources))
    return sum(writer.write(chunk) for chunk in _updated_chunks(t, ckpt, sources, layers))


def _updated_chunks(t: OutputTensor, ckpt: Checkpoint, sources: "_RawSources",
                    layers: Sequence[Layer]) -> Iterator[np.ndarray]:
    """The output tensor's values, slice by slice, in its output dtype."""
    entries = [(layers[i], layers[i].diff.entries[name]) for i, name in t.updates]
    last_dense = max((k for k, (_, e) in enumerate(entries) if isinstance(e, DenseEntry)), default=None)
    if last_dense is not None:
        start = entries[last_dense][1]
        start_dtype = start.dtype
        starts = _slices(np.asarray(start.values).reshape(-1))
        entries = entries[last_dense + 1:]
    else:
        start_dtype = ckpt.tensors[t.source].dtype
        starts = _base_chunks(t.source, ckpt, sources)
    wide = "F64" in (start_dtype, t.dtype)
    if start_dtype == t.dtype:  # only the touched values change: patch them into the raw slice
        lo = 0
        for raw in starts:
            hi = lo + raw.size
            yield _patched(raw, t.dtype, entries, lo, hi, wide)
            lo = hi
        return
    lo = 0
    for raw in starts:
        hi = lo + raw.size
        values = raw if start_dtype == "F64" else to_float32(raw, start_dtype)
        work = np.array(values, dtype=np.float64 if wide else np.float32)  # own, writable copy
        for layer, entry in entries:
            _add_slice(work, entry, layer.scale, lo, hi)
        yield from_float32(work, t.dtype) if t.dtype != "F64" else work
        lo = hi


def _patched(raw: np.ndarray, dtype: str, entries: Sequence[tuple[Layer, SparseEntry]], lo: int, hi: int,
             wide: bool) -> np.ndarray:
    """`raw` (flat elements [lo, hi) of a tensor) with the entries' values added at their indices:
    the same values as converting the whole slice, adding and rounding, at O(touched) cost."""
    spans = []
    for layer, entry in entries:
        a, b = _span(entry.indices, lo, hi)
        if a < b:
            delta = to_float32(entry.values[a:b], entry.dtype)
            if layer.scale != 1.0:
                delta = delta * np.float32(layer.scale)
            spans.append((np.subtract(entry.indices[a:b], lo, dtype=np.intp), delta))
    if not spans:
        return raw
    out = raw if raw.flags.writeable else raw.copy()
    if len(spans) == 1:  # one diff: no sum to keep, round each value straight back
        at, delta = spans[0]
        out[at] = _rounded(_widened(out[at], dtype, wide) + delta, dtype)
        return out
    # Several diffs: sum them per position in a scratch array indexed like the slice, so a value
    # touched by several diffs gets base + d1 + d2 ... in order and one rounding, without the cost
    # of merging the index lists. Positions shared by two spans are loaded and stored twice, with
    # identical values.
    acc = np.empty(hi - lo, dtype=np.float64 if wide else np.float32)
    for at, _ in spans:
        acc[at] = _widened(out[at], dtype, wide)
    for at, delta in spans:
        acc[at] += delta
    for at, _ in spans:
        out[at] = _rounded(acc[at], dtype)
    return out


def _widened(raw: np.ndarray, dtype: str, wide: bool) -> np.ndarray:
    """Stored values as the type sums are made in: float32, or float64 for F64 tensors."""
    return np.asarray(raw if dtype == "F64" else to_float32(raw, dtype), dtype=np.float64 if wide else np.float32)


def _rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    return values if dtype == "F64" else from_float32(values, dtype)


def _add_slice(work: np.ndarray, entry: SparseEntry, scale: float, lo: int, hi: int) -> None:
    """work += scale × entry's values whose flat index falls in [lo, hi)."""
    a, b = _span(entry.indices, lo, hi)
    if a == b:
        return
    values = to_float32(entry.values[a:b], entry.dtype)
    if scale != 1.0:
        values = values * np.float32(scale)
    work[np.asarray(entry.indices[a:b], dtype=np.int64) - lo] += values


def _span(indices: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Positions in sorted `indices` of the values in [lo, hi). The bounds are given in the indices'
    own dtype: mixed dtypes make numpy convert the whole index array on every call."""
    a, b = indices.searchsorted(np.array([lo, hi], dtype=indices.dtype))
    return int(a), int(b)


def _slices(flat: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, flat.size, CHUNK_ELEMENTS):
        yield flat[i:i + CHUNK_ELEMENTS]


def _base_chunks(name: str, ckpt: Checkpoint, sources: "_RawSources") -> Iterator[np.ndarray]:
    if sources.can_copy(name):
        yield from sources.chunks(name)
    else:
        yield from _slices(ckpt.array(name).reshape(-1))


def _write_all(fd: int, array: np.ndarray) -> int:
    data = memoryview(np.ascontiguousarray(array)).cast("B") if np.asarray(array).size else memoryview(b"")
    done = 0
    while done < len(data):  # 1 MiB writes: several times faster than huge ones (they stay in cache)
        done += os.write(fd, data[done:done + WRITE_BYTES])
    return done


class _RawSources:
    """Byte ranges of the base's safetensors tensors, read with plain reads (not memory maps, whose
    pages would count towards the process's resident memory for the whole model)."""

    def __init__(self, ckpt: Checkpoint):
        self._where: dict[str, tuple[int, int, int, str]] = {}  # name -> (fd, start, nbytes, dtype)
        self._fds: list[int] = []
        self._buffers = [np.empty(0, dtype=np.uint8) for _ in range(IN_FLIGHT + 1)]
        self._turn = 0
        for file in ckpt.weight_files:
            if not file.endswith(".safetensors"):
                continue
            st = SafetensorsFile(file)
            fd = os.open(file, os.O_RDONLY)
            self._fds.append(fd)
            for name, t in st.tensors.items():
                self._where[name] = (fd, t.start, t.nbytes, t.dtype)

    def can_copy(self, name: str | None) -> bool:
        return name in self._where

    def copy(self, name: str, dst: int) -> int:
        fd, start, nbytes, _ = self._where[name]
        done = 0
        while done < nbytes:
            n = _copy_range(fd, dst, start + done, nbytes - done)
            if n == 0:
                raise OutputError(f"unexpected end of base file while copying {name!r}")
            done += n
        return done

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        """The tensor's raw values, `CHUNK_ELEMENTS` at a time, read into `IN_FLIGHT + 1` reused
        buffers in turn: each slice is valid (and writable) until `IN_FLIGHT + 1` more are requested,
        so it may be handed to the `_Writer` (which holds at most `IN_FLIGHT`) before the next is
        requested."""
        fd, start, nbytes, dtype = self._where[name]
        step = CHUNK_ELEMENTS * STORAGE[dtype].itemsize
        for off in range(0, nbytes, step):
            self._turn = (self._turn + 1) % len(self._buffers)
            if len(self._buffers[self._turn]) < min(step, nbytes):  # fresh memory costs a page fault
                self._buffers[self._turn] = np.empty(step, dtype=np.uint8)  # per 4 KiB: reuse it
            buf = self._buffers[self._turn][:min(step, nbytes - off)]
            view = memoryview(buf)
            got = 0
            while got < len(buf):
                n = os.preadv(fd, [view[got:]], start + off + got)
                if n == 0:
                    raise OutputError(f"unexpected end of base file while reading {name!r}")
                got += n
            yield buf.view(STORAGE[dtype])

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


_KERNEL_COPY = hasattr(os, "copy_file_range")


def _copy_range(src: int, dst: int, offset: int, count: int) -> int:
    """Append up to `count` bytes of `src` from `offset` to `dst`; the kernel copies when it can."""
    global _KERNEL_COPY
    if _KERNEL_COPY:
        try:
            return os.copy_file_range(src, dst, min(count, 1 << 30), offset)
        except OSError:  # older kernels, some filesystems: fall back to reading and writing
            _KERNEL_COPY = False
    data = os.pread(src, min(count, 64 << 20), offset)
    return _write_all(dst, np.frombuffer(data, dtype=np.uint8)) if data else 0
