"""Base + diffs → a standalone checkpoint on disk (`bake`); `inplace.py` changes a loaded model instead.

Composition rule (spec "Applying"): diffs apply in order; a sparse entry adds `scale × values`
(summed in float32, float64 for F64 tensors, and rounded once to the output dtype); a dense
entry replaces the parameter (a later one wins, later sparse entries add onto it; scales do not
apply to dense entries); a dense entry for a parameter the base lacks adds it under its own name.

`bake` streams: the output's tensor list is known before any value is computed, so each shard's
header is written first and tensors follow one at a time. Unchanged tensors are copied by the
kernel (`Checkpoint.copy_to`, `copy_file_range`) straight from the base's safetensors files; changed
ones are read (`Checkpoint.read_into`) in slices of `CHUNK_ELEMENTS` into a few reused, cache-sized
buffers this module allocates, and only the touched values are converted, summed and rounded in
place, so time stays near a file copy and memory near one slice plus the diffs, whatever the model.
Inputs are never written: values are patched only in buffers allocated here (`_patched` copies a
slice it does not own: a read-only view of an in-memory base, or a dense entry's values).
Slices are written by a background thread (`_Writer`) while the next one is read and patched, and written data goes to the disk in the background
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import recipe as recipes
from .atomic import atomic_path
from .checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, Checkpoint
from .compose import effective, merge_config_patches
from .diff import DenseEntry, SparseDiff, SparseEntry
from .dtypes import FLOAT_DTYPES, STORAGE, canonical, convert, from_float32, scaled_delta, to_float32
from .errors import UsageError, VerificationError
from .progress import progress_bar
from .safetensors_io import header_bytes
from .verify import BaseDigests, BaseMatch, verify_against_base

DEFAULT_SHARD_SIZE = 50 * 10**9  # transformers' save_pretrained default, "50GB"
# Values read, patched and written at a time. Small enough that a slice stays in the CPU caches
# from the read through the patch to the write (1M: 2-4 MB; 8M slices made `apply` ~1.5x slower).
CHUNK_ELEMENTS = 1 << 20
WRITE_BYTES = 1 << 20
# Slices the writer thread may hold (one being written, the rest queued): bounds memory, and tells
# `_Buffers` how many read buffers to rotate through (IN_FLIGHT + 1, the extra one being patched).
IN_FLIGHT = 2
# Written data handed to the disk at a time, while the next is computed: small, so the disk starts
# writing almost as soon as apply does (see `_Flusher`).
FLUSH_BYTES = 32 << 20
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


MIN_SHARD_SIZE = 1000  # bytes: below this a "size" is surely a missing unit, not a wish for 41 shards


def parse_size(text: str | int) -> int:
    """Bytes in "50GB", "500MB", "2GiB" or "1e9B" (GB = 10^9 as in transformers); an int is bytes.

    A string needs a unit: `--shard-size 10` meaning 10 bytes (one shard per tensor) is never what
    was meant. Sizes under `MIN_SHARD_SIZE` are refused."""
    hint = "write it with a unit, like 50GB, 500MB or 2GiB"
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise UsageError(f"cannot read size {text!r}; {hint}")
        if not m.group(2):
            raise UsageError(f"size {text!r} has no unit; {hint}")
        unit = m.group(2).upper().rstrip("B") or "B"
        powers = {"B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                  "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
        try:
            size = int(float(m.group(1)) * powers[unit])
        except (ValueError, KeyError, OverflowError):
            raise UsageError(f"cannot read size {text!r}; {hint}") from None
    if size < MIN_SHARD_SIZE:
        raise UsageError(f"size {text!r} is only {size} bytes (the minimum is 1KB); give e.g. 500MB or 2GB")
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
    """The output's tensors in base order (tied copies dropped), new dense parameters last. Each
    tensor's updates are the entries that decide it by the composition rule (`compose.effective`:
    from its last dense entry on), so a dense entry can only be the first."""
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
    updates = {target: effective(ops, lambda op: layers[op[0]].diff.info(op[1]).kind)
               for target, ops in updates.items()}
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
    """The shape after `ops` (trimmed by `plan_tensors`): a leading dense entry's, which the sparse
    entries after it must fit."""
    for i, name in ops:
        info = layers[i].diff.info(name)
        if info.kind == "dense":
            shape = info.shape
        elif info.shape != tuple(shape):
            raise VerificationError(f"{layers[i].label}: {name!r} has shape {list(info.shape)} but an earlier "
                                    f"dense entry makes it {list(shape)}")
    return tuple(shape)


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


def merged_config(config: dict | None, layers: Sequence[Layer], dtype: str | None,
                  warn: Callable[[str], None] | None = None) -> dict | None:
    """The base's config.json with the diffs' `config_patch`es merged by the composition rule
    (`compose.merge_config_patches`: key by key, a later diff wins, `warn` names each key set
    differently). A diff applied without its dense entries contributes no patch, since its patch
    describes the head those entries carry."""
    patch = merge_config_patches([(layer.label, layer.diff.meta.config_patch) for layer in layers
                                  if layer.with_dense], warn)
    if config is None and not patch and dtype is None:
        return None
    merged = dict(config or {})
    merged.update(patch or {})
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
    hashes = recipes.Hashes(loaded)  # the recipe's content fingerprints, hashed while the diffs are checked

    digests = BaseDigests(ckpt)
    layers = []
    replaced: dict[str, tuple[int, ...]] = {}  # parameters earlier diffs replace densely (composition rule)
    for i, (sd, s, wd) in enumerate(zip(loaded, scales, with_dense)):
        label = sd.path or f"diff #{i + 1}"
        match = verify_against_base(sd, ckpt, label=label, fingerprint=verify, digests=digests, replaced=replaced)
        layers.append(Layer(sd, float(s), bool(wd), label, match))
        replaced.update({t: sd.info(n).shape for n, t in match.names.items() if wd and sd.info(n).kind == "dense"})
    report = warn or (lambda message: _warnings.warn(message, stacklevel=3))
    notes = [w for layer in layers for w in layer.match.warnings]
    for note in notes:
        report(note)

    plan = plan_tensors(ckpt, layers, target_dtype)
    shards = plan_shards(plan, max_bytes)
    names = shard_names(len(shards))
    config = merged_config(ckpt.config, layers, target_dtype, warn=lambda m: (notes.append(m), report(m)))
    recipe = recipes.build(ckpt, layers, target_dtype, out, hashes, digests)  # what the output is: shard metadata, README.md
    metadata = recipes.shard_metadata(recipe, OUTPUT_METADATA)
    sources = _Buffers(ckpt)
    bar = progress_bar(total=len(plan), desc="apply", enabled=progress)
    try:
        with atomic_path(out, overwrite=force, directory=True) as tmp:
            with _Flusher() as flusher:
                for shard_name, shard in zip(names, shards):
                    _write_shard(tmp / shard_name, shard, ckpt, sources, layers, bar, flusher, metadata)
                # The small files come last: made while the disk writes the weights' last bytes (the
                # card's rendering and the side files' copies) rather than before the first.
                if len(shards) > 1:
                    _write_index(tmp / SAFETENSORS_INDEX, shards, names)
                copy_side_files(ckpt.path, tmp)
                recipes.write_card(tmp, ckpt.path, recipe, title=out.name)
                if config is not None:
                    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                                     encoding="utf-8")
    finally:
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


def _write_shard(path: Path, tensors: Sequence[OutputTensor], ckpt: Checkpoint, sources: "_Buffers",
                 layers: Sequence[Layer], bar: Any, flusher: "_Flusher", metadata: dict[str, str] = OUTPUT_METADATA) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, header_bytes([(t.name, t.dtype, t.shape) for t in tensors], metadata))
        with _Writer(fd) as writer:  # finishes (or abandons) its writes before the fd is closed
            for t in tensors:
                written = _write_tensor(fd, writer, t, ckpt, sources, layers, lambda n: flusher.written(path, n))
                if written != t.nbytes:  # the header promised t.nbytes: anything else is a bug here
                    raise RuntimeError(f"wrote {written} bytes for {t.name!r}, header says {t.nbytes}")
                if bar is not None:
                    bar.update(1)
    finally:
        os.close(fd)
    flusher.finished(path)


class _Flusher:
    """Hands written data to the disk in a background thread while the next tensors are computed.

    The output must be durable before it is renamed into place (`atomic_path` fsyncs every file),
    but one fsync at the very end leaves the disk idle while the CPU works and the CPU idle while
    the disk catches up. Here each file is fsynced every `FLUSH_BYTES` and when it is complete, so
    the final fsync finds little left to write. A failed fsync fails the bake.

    The disk, not the CPU, is what a bake of a page-cached base waits for (a 440 MB shard takes
    ~0.65 s to reach this VM's disk; apply computes it with ~0.35 s of CPU), so the first flush
    comes early: with 256 MiB flushes the disk stayed idle for the first 256 MiB, and up to 256 MiB
    were left to write after the last byte. A new flush starts only when the previous one is done,
    so the fsync thread simply keeps the disk busy; each byte is still written once (an fsync writes
    only what is dirty), and the final fsync of `atomic_path` finds the files clean.

    A plain thread and a `SimpleQueue` rather than a `ThreadPoolExecutor`: importing
    `concurrent.futures` (and the `logging` it pulls in) cost ~6 ms of apply's start-up.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._submitted = 0  # changed by the main thread only
        self._done = 0  # changed by the fsync thread only: the two differ while a flush is pending
        self._error: BaseException | None = None
        self._abandoned = False
        self._unflushed: dict[Path, int] = {}
        self._thread = threading.Thread(target=self._run, name="sftdiff-fsync", daemon=True)
        self._thread.start()

    def written(self, path: Path, nbytes: int) -> None:
        self._unflushed[path] = self._unflushed.get(path, 0) + nbytes
        busy = self._done != self._submitted
        if self._unflushed[path] >= FLUSH_BYTES and not busy:  # never queue flushes up behind a slow disk
            self._submit(path)

    def finished(self, path: Path) -> None:
        """The file is complete: its rest goes to the disk as soon as the flush under way (if any)
        is done, while the main thread goes on (the next shard, the small files)."""
        self._submit(path)

    def _submit(self, path: Path) -> None:
        self._unflushed[path] = 0
        self._submitted += 1
        self._jobs.put(path)

    def _run(self) -> None:
        while True:
            path = self._jobs.get()
            if path is None:
                return
            try:
                if self._error is None and not self._abandoned:
                    _fsync_file(path)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._error = e
            finally:
                self._done += 1

    def __enter__(self) -> "_Flusher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._abandoned = exc[0] is not None  # the bake failed already: skip the flushes still queued
        self._jobs.put(None)
        self._thread.join()
        if exc[0] is None and self._error is not None:
            raise self._error  # the OSError of a failed fsync


class _Writer:
    """Writes slices to one file in a background thread, in order, while the next is computed.

    Apply is CPU-bound, and a write is mostly the kernel copying the slice into the page cache, with
    the GIL released: in this thread it overlaps with reading and patching the next slice instead of
    following it. The thread holds at most `IN_FLIGHT` slices, so `write` blocks when it is behind
    (memory stays bounded), and a slice handed over is written once `IN_FLIGHT` more have been handed
    over (`_Buffers` reuses its buffers on that). A failed write fails the bake: its OSError is raised
    in the main thread by the next call here or on leaving the block, and later writes are skipped.

    Ctrl-C raises KeyboardInterrupt in the main thread between any two bytecodes, also inside
    `queue.Queue`'s pure-Python condition variables, where it can drop a wake-up and leave the
    thread waiting forever (seen: `apply` hung in `__exit__`'s join). So the hand-over is a
    `SimpleQueue` (its put is one C call, never half done, and never blocks), the bound a semaphore
    released only by the thread, and on an abandoned bake the thread stops between 1 MiB writes.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue[np.ndarray | threading.Event | None] = queue.SimpleQueue()
        self._slots = threading.Semaphore(IN_FLIGHT)  # slices held by the thread, queued or being written
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="sftdiff-write", daemon=True)
        self._thread.start()

    def write(self, array: np.ndarray) -> int:
        """Queue `array` (not to be changed afterwards) for writing; returns its size in bytes."""
        self._raise_error()
        self._slots.acquire()
        self._queue.put(array)
        return array.nbytes  # what `_write_all` writes, or it raises

    def drain(self) -> None:
        """Wait until everything queued is written (before writing to the file another way)."""
        done = threading.Event()
        self._queue.put(done)
        done.wait()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                if self._error is None and not self._abandoned:
                    _write_all(self._fd, item, stop=lambda: self._abandoned)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self._error = e
            finally:
                self._slots.release()

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


def _write_tensor(fd: int, writer: _Writer, t: OutputTensor, ckpt: Checkpoint, sources: "_Buffers",
                  layers: Sequence[Layer], written: Callable[[int], None] = lambda n: None) -> int:
    """Write one output tensor at the file offset; `written(n)` is told of each slice handed over."""
    if not t.updates:
        base_dtype = ckpt.tensors[t.source].dtype
        if base_dtype == t.dtype and ckpt.in_file(t.source):
            writer.drain()  # the kernel copy appends at the file offset: queued slices go first
            n = ckpt.copy_to(t.source, fd)
            written(n)
            return n
        chunks = (convert(chunk, base_dtype, t.dtype) for chunk, _ in sources.chunks(t.source))
    else:
        chunks = _updated_chunks(t, ckpt, sources, layers)
    total = 0
    for chunk in chunks:
        n = writer.write(chunk)
        written(n)  # per slice, not per tensor: a 90 MB embedding should not hold back the flushes
        total += n
    return total


def _updated_chunks(t: OutputTensor, ckpt: Checkpoint, sources: "_Buffers",
                    layers: Sequence[Layer]) -> Iterator[np.ndarray]:
    """The output tensor's values, slice by slice, in its output dtype."""
    entries = [(layers[i], layers[i].diff.entries[name]) for i, name in t.updates]
    last_dense = max((k for k, (_, e) in enumerate(entries) if isinstance(e, DenseEntry)), default=None)
    if last_dense is not None:
        start = entries[last_dense][1]
        start_dtype = start.dtype
        starts = ((chunk, False) for chunk in _slices(np.asarray(start.values).reshape(-1)))  # the diff's: never written
        entries = entries[last_dense + 1:]
    else:
        start_dtype = ckpt.tensors[t.source].dtype
        starts = sources.chunks(t.source)
    wide = "F64" in (start_dtype, t.dtype)
    if start_dtype == t.dtype:  # only the touched values change: patch them into the raw slice
        lo = 0
        for raw, owned in starts:
            hi = lo + raw.size
            yield _patched(raw, t.dtype, entries, lo, hi, wide, owned)
            lo = hi
        return
    lo = 0
    for raw, _ in starts:
        hi = lo + raw.size
        values = raw if start_dtype == "F64" else to_float32(raw, start_dtype)
        work = np.array(values, dtype=np.float64 if wide else np.float32)  # own, writable copy
        for layer, entry in entries:
            _add_slice(work, entry, layer.scale, lo, hi)
        yield from_float32(work, t.dtype) if t.dtype != "F64" else work
        lo = hi


def _patched(raw: np.ndarray, dtype: str, entries: Sequence[tuple[Layer, SparseEntry]], lo: int, hi: int,
             wide: bool, owned: bool) -> np.ndarray:
    """`raw` (flat elements [lo, hi) of a tensor) with the entries' values added at their indices:
    the same values as converting the whole slice, adding and rounding, at O(touched) cost.

    Patched in place only when `owned` (a buffer this module allocated); anything else (an input's
    memory, however writeable) is copied first."""
    spans = []
    for layer, entry in entries:
        a, b = _span(entry.indices, lo, hi)
        if a < b:
            delta = scaled_delta(entry.values[a:b], entry.dtype, layer.scale, np.dtype(np.float64 if wide else np.float32))
            spans.append((np.subtract(entry.indices[a:b], lo, dtype=np.intp), delta))
    if not spans:
        return raw
    out = raw if owned else raw.copy()
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
    values = scaled_delta(entry.values[a:b], entry.dtype, scale, work.dtype)
    work[np.asarray(entry.indices[a:b], dtype=np.int64) - lo] += values


def _span(indices: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """Positions in sorted `indices` of the values in [lo, hi). The bounds are given in the indices'
    own dtype: mixed dtypes make numpy convert the whole index array on every call."""
    a, b = indices.searchsorted(np.array([lo, hi], dtype=indices.dtype))
    return int(a), int(b)


def _slices(flat: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, flat.size, CHUNK_ELEMENTS):
        yield flat[i:i + CHUNK_ELEMENTS]


def _write_all(fd: int, array: np.ndarray, stop: Callable[[], bool] | None = None) -> int:
    """Write the array's bytes at the file offset; `stop()` true ends early (an abandoned output)."""
    data = memoryview(np.ascontiguousarray(array)).cast("B") if np.asarray(array).size else memoryview(b"")
    done = 0
    while done < len(data):  # 1 MiB writes: several times faster than huge ones (they stay in cache)
        if stop is not None and stop():
            break
        done += os.write(fd, data[done:done + WRITE_BYTES])
    return done


class _Buffers:
    """The base's tensors slice by slice, for writing or patching: `IN_FLIGHT + 1` read buffers
    allocated here and reused in turn (fresh memory costs a page fault per 4 KiB), filled by
    `Checkpoint.read_into` with plain reads (not memory maps, whose pages would count towards the
    process's resident memory for the whole model)."""

    def __init__(self, ckpt: Checkpoint):
        self._ckpt = ckpt
        self._buffers = [np.empty(0, dtype=np.uint8) for _ in range(IN_FLIGHT + 1)]
        self._turn = 0

    def chunks(self, name: str) -> Iterator[tuple[np.ndarray, bool]]:
        """(raw values, owned) `CHUNK_ELEMENTS` at a time. An owned slice is one of this object's
        buffers: valid (and writable) until `IN_FLIGHT + 1` more are requested, so it may be handed
        to the `_Writer` (which holds at most `IN_FLIGHT`) before the next is requested. A tensor
        not in a file comes as read-only slices of the checkpoint's array (not owned)."""
        if not self._ckpt.in_file(name):
            for chunk in _slices(self._ckpt.array(name).reshape(-1)):
                yield chunk, False
            return
        t = self._ckpt.tensors[name]
        dtype = STORAGE[t.dtype]
        step = CHUNK_ELEMENTS * dtype.itemsize
        nbytes = t.numel * dtype.itemsize
        for off in range(0, nbytes, step):
            self._turn = (self._turn + 1) % len(self._buffers)
            if len(self._buffers[self._turn]) < min(step, nbytes):
                self._buffers[self._turn] = np.empty(step, dtype=np.uint8)
            buf = self._buffers[self._turn][:min(step, nbytes - off)].view(dtype)
            yield self._ckpt.read_into(name, off // dtype.itemsize, buf), True
