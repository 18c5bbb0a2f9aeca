"""`SparseDiff`: a set of sparse and dense entries plus metadata, loaded from and saved to `.sft`.

Loading is lazy: `SparseDiff.load` reads and checks the header only; an entry's arrays are mapped
from the file, and its data checked, when that entry is first accessed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import numpy as np

from . import format as fmt
from .atomic import atomic_path
from .dtypes import STORAGE, VALUE_DTYPES, from_float32, to_float32
from .errors import FormatError
from .safetensors_io import SafetensorsFile, SpooledWriter, StreamingWriter, Written, verify_written


@dataclass(frozen=True, eq=False)
class SparseEntry:
    """Delta values at flat row-major `indices` of a parameter of `shape`."""

    shape: tuple[int, ...]
    indices: np.ndarray  # int32/int64, strictly increasing
    values: np.ndarray  # stored representation of `dtype` (BF16 as uint16)
    dtype: str = "F32"
    base_dtype: str | None = None

    @property
    def nnz(self) -> int:
        return int(len(self.indices))

    @property
    def numel(self) -> int:
        return fmt.numel_of(self.shape)

    def values_f32(self) -> np.ndarray:
        return to_float32(self.values, self.dtype)

    def to_dense(self) -> np.ndarray:
        """The full float32 delta (allocates the whole parameter)."""
        out = np.zeros(self.numel, dtype=np.float32)
        out[self.indices] = self.values_f32()
        return out.reshape(self.shape)

    @classmethod
    def from_float(cls, shape: tuple[int, ...], indices: np.ndarray, values: np.ndarray,
                   dtype: str = "F32", base_dtype: str | None = None) -> "SparseEntry | None":
        """Canonical entry from sorted, unique indices and float values: rounds to `dtype` and
        drops values that are (or round to) zero. None if nothing is left."""
        stored = from_float32(np.asarray(values, dtype=np.float32), dtype)
        keep = to_float32(stored, dtype) != 0
        if not keep.all():
            indices, stored = np.asarray(indices)[keep], stored[keep]
        if len(indices) == 0:
            return None
        idx_dtype = STORAGE[fmt.index_dtype_for(fmt.numel_of(shape))]
        return cls(tuple(int(d) for d in shape), np.asarray(indices, dtype=idx_dtype), stored, dtype, base_dtype)


@dataclass(frozen=True, eq=False)
class DenseEntry:
    """A full replacement value for a parameter (a new head, a resized embedding)."""

    values: np.ndarray  # stored representation of `dtype`, shaped
    dtype: str = "F32"
    base_dtype: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def numel(self) -> int:
        return int(self.values.size)

    def values_f32(self) -> np.ndarray:
        return to_float32(self.values, self.dtype)


Entry = Union[SparseEntry, DenseEntry]


@dataclass
class DiffMeta:
    """Everything in the `sft` metadata object except the entries' own descriptions."""

    base: dict[str, Any] = field(default_factory=dict)  # hint, fingerprint
    origin: dict[str, Any] = field(default_factory=dict)  # tool, method, k, density, scope, source
    user: dict[str, str] = field(default_factory=dict)  # description, kind, language, task
    config_patch: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for round trips

    @property
    def base_hint(self) -> str | None:
        return self.base.get("hint")

    @property
    def base_fingerprint(self) -> str | None:
        return self.base.get("fingerprint")

    def to_json(self, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(entries=entries, base=self.base, origin=self.origin, user=self.user)
        if self.config_patch is not None:
            out["config_patch"] = self.config_patch
        if self.provenance is not None:
            out["provenance"] = self.provenance
        return out

    @classmethod
    def from_json(cls, sft: dict[str, Any]) -> "DiffMeta":
        known = {"entries", "base", "origin", "user", "config_patch", "provenance"}
        return cls(
            base=dict(sft.get("base", {})),
            origin=dict(sft.get("origin", {})),
            user=dict(sft.get("user", {})),
            config_patch=sft.get("config_patch"),
            provenance=sft.get("provenance"),
            extra={k: v for k, v in sft.items() if k not in known},
        )

    def copy(self, **changes: Any) -> "DiffMeta":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EntryInfo:
    """What the header says about an entry; available without reading its data."""

    name: str
    kind: str  # "sparse" | "dense"
    shape: tuple[int, ...]
    dtype: str
    nnz: int  # stored values (numel for dense)
    base_dtype: str | None
    nbytes: int


def _info(name: str, entry: Entry) -> EntryInfo:
    if isinstance(entry, SparseEntry):
        nbytes = entry.indices.nbytes + entry.values.nbytes
        return EntryInfo(name, "sparse", entry.shape, entry.dtype, entry.nnz, entry.base_dtype, nbytes)
    return EntryInfo(name, "dense", entry.shape, entry.dtype, entry.numel, entry.base_dtype, entry.values.nbytes)


class _FileEntries(Mapping[str, Entry]):
    """Entries of a `.sft` file, built (and their data validated) on first access."""

    def __init__(self, st: SafetensorsFile, described: dict[str, Any]):
        self._st = st
        self._described = described
        self.infos: dict[str, EntryInfo] = {}
        self._validated: set[str] = set()
        parts: dict[str, dict[str, str]] = {}
        for key in st.tensors:
            kind, name = fmt.split_key(key)
            parts.setdefault(name, {})[kind] = key
        for name in described:
            if name not in parts:
                raise FormatError(f"entry {name!r} is described in the metadata but has no tensors")
        for name, keys in sorted(parts.items()):
            if name not in described:
                raise FormatError(f"tensors of {name!r} have no description in the metadata entries")
            self.infos[name] = self._check_header(name, keys, described[name])

    def _check_header(self, name: str, keys: dict[str, str], desc: dict[str, Any]) -> EntryInfo:
        shape = tuple(desc["shape"])
        base_dtype = desc.get("base_dtype")
        if set(keys) == {"dense"}:
            t = self._st.tensors[keys["dense"]]
            if t.shape != shape:
                raise FormatError(f"entry {name!r}: dense tensor has shape {list(t.shape)}, metadata says {list(shape)}")
            return EntryInfo(name, "dense", shape, t.dtype, t.numel, base_dtype, t.nbytes)
        if set(keys) != {"indices", "values"}:
            raise FormatError(
                f"entry {name!r}: needs either dense/ or both indices/ and values/ tensors, found {sorted(keys)}"
            )
        ti, tv = self._st.tensors[keys["indices"]], self._st.tensors[keys["values"]]
        fmt.check_sparse(
            name, shape, _Shape(ti.shape), _Shape(tv.shape), ti.dtype, tv.dtype, check_data=False
        )
        return EntryInfo(name, "sparse", shape, tv.dtype, ti.numel, base_dtype, ti.nbytes + tv.nbytes)

    def __getitem__(self, name: str) -> Entry:
        info = self.infos[name]
        if info.kind == "dense":
            values = self._st.array(fmt.DENSE + name)
            if name not in self._validated:
                fmt.check_values(name, values, info.dtype, allow_zero=True)
            entry: Entry = DenseEntry(values, info.dtype, info.base_dtype)
        else:
            indices = self._st.array(fmt.INDICES + name)
            values = self._st.array(fmt.VALUES + name)
            if name not in self._validated:
                idx_dtype = self._st.tensors[fmt.INDICES + name].dtype
                fmt.check_sparse(name, info.shape, indices, values, idx_dtype, info.dtype)
            entry = SparseEntry(info.shape, indices, values, info.dtype, info.base_dtype)
        self._validated.add(name)
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


class _Shape:
    """Stands in for an array in header-only checks (only ndim and len are consulted)."""

    def __init__(self, shape: tuple[int, ...]):
        self.ndim = len(shape)
        self._len = shape[0] if shape else 0

    def __len__(self) -> int:
        return self._len


class SparseDiff:
    """Sparse and dense entries keyed by parameter name (as the base spells it), plus metadata."""

    def __init__(self, entries: Mapping[str, Entry] | None = None, meta: DiffMeta | None = None,
                 path: str | None = None):
        self.entries: Mapping[str, Entry] = entries if entries is not None else {}
        self.meta = meta if meta is not None else DiffMeta()
        self.path = path

    # -- reading

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparseDiff":
        """Open a `.sft` file, checking its header; entry data is mapped and checked on access."""
        return cls._from_file(SafetensorsFile(path))

    @classmethod
    def _from_file(cls, st: SafetensorsFile) -> "SparseDiff":
        try:
            sft = fmt.decode_metadata(st.metadata)
            entries = _FileEntries(st, sft["entries"])
        except FormatError as e:
            raise FormatError(f"{st.path}: {e}") from None
        return cls(_LoadErrorsNamed(entries, st.path), DiffMeta.from_json(sft), st.path)

    def info(self, name: str) -> EntryInfo:
        infos = getattr(self.entries, "infos", None)
        return infos[name] if infos is not None else _info(name, self.entries[name])

    def infos(self) -> list[EntryInfo]:
        return [self.info(name) for name in self.entries]

    @property
    def nnz(self) -> int:
        """Stored sparse values (dense entries not counted)."""
        return sum(i.nnz for i in self.infos() if i.kind == "sparse")

    def validate(self) -> None:
        """Read every entry once, checking all data rules (loading alone checks the header)."""
        for name in self.entries:
            self.entries[name]

    # -- writing

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write atomically as `.sft`: every entry is checked against the spec before it is written,
        and the file is read back and compared with what was written before it is kept."""
        path = Path(path)
        with atomic_path(path, overwrite=overwrite) as tmp:
            written = write_sft(tmp, self.entries, self.meta)
            # write_sft ran the spec's data rules on the very arrays it wrote (the one conversion,
            # indices to the index dtype, is exact for the in-range indices it checked), so another
            # O(nnz) pass (`validate`) would repeat them. Reading back is for writer faults: the
            # header, metadata and header-level entry rules are parsed again in full, and the
            # tensor layout and sampled bytes are compared with what was written.
            st = SafetensorsFile(tmp)
            SparseDiff._from_file(st)
            verify_written(st, written)


class _LoadErrorsNamed(Mapping[str, Entry]):
    """Prefixes data-check errors raised on access with the file's path."""

    def __init__(self, inner: _FileEntries, path: str):
        self._inner, self._path, self.infos = inner, path, inner.infos

    def __getitem__(self, name: str) -> Entry:
        try:
            return self._inner[name]
        except FormatError as e:
            raise FormatError(f"{self._path}: {e}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._inner)

    def __len__(self) -> int:
        return len(self._inner)


def write_sft(path: str | os.PathLike, entries: Mapping[str, Entry], meta: DiffMeta) -> Written:
    """Write `entries` (in name order) and `meta` to `path` as it is (callers make it atomic),
    after checking every entry against the spec; returns what was written (`verify_written`).

    Entries already held in memory are written straight behind a header computed up front;
    any other Mapping goes through a spool (see `_held`). Both give the same bytes.
    """
    if _held(entries):
        return _write_direct(path, entries, meta)
    return _write_spooled(path, entries, meta)


def _held(entries: Mapping[str, Entry]) -> bool:
    """Whether every entry's arrays already exist, so the header can be computed before writing.

    That is a plain dict (what `create`, `train` and the importers build) whose values are entries
    holding numpy arrays: looking at every entry first costs nothing and holds nothing new. Any
    other Mapping may compute an entry on access (algebra's and merge's results, `LazyEntries`) or
    map and check it from a file (a loaded diff): sizes are then known only by computing every
    entry and keeping them all, which the spool avoids. A dict subclass may compute in
    `__getitem__` too, so only `dict` itself counts.
    """
    if type(entries) is not dict:
        return False
    for entry in entries.values():
        if isinstance(entry, SparseEntry):
            if not (isinstance(entry.indices, np.ndarray) and isinstance(entry.values, np.ndarray)):
                return False
        elif not (isinstance(entry, DenseEntry) and isinstance(entry.values, np.ndarray)):
            return False
    return True


def _checked_tensors(name: str, entry: Entry) -> list[tuple[str, str, np.ndarray]]:
    """An entry's tensors (key, dtype, array) to write, after checking it against the spec."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"parameter names must be non-empty strings, got {name!r}")
    if np.asarray(entry.values).dtype != STORAGE[entry.dtype]:
        raise ValueError(f"entry {name!r}: values are {entry.values.dtype}, not the storage of {entry.dtype}")
    if isinstance(entry, SparseEntry):
        idx_dtype = fmt.index_dtype_for(entry.numel)
        fmt.check_sparse(name, entry.shape, np.asarray(entry.indices), np.asarray(entry.values),
                         idx_dtype, entry.dtype)
        return [(fmt.INDICES + name, idx_dtype, entry.indices), (fmt.VALUES + name, entry.dtype, entry.values)]
    fmt.check_values(name, entry.values, entry.dtype, allow_zero=True)
    return [(fmt.DENSE + name, entry.dtype, entry.values)]


def _description(entry: Entry) -> dict[str, Any]:
    return {"shape": list(entry.shape), "base_dtype": entry.base_dtype}


def _write_direct(path: str | os.PathLike, entries: dict[str, Entry], meta: DiffMeta) -> Written:
    tensors: list[tuple[str, str, np.ndarray]] = []
    described: dict[str, dict[str, Any]] = {}
    for name in sorted(entries):
        entry = entries[name]
        tensors += _checked_tensors(name, entry)
        described[name] = _description(entry)
    specs = [(key, dtype, tuple(np.shape(array))) for key, dtype, array in tensors]
    with open(path, "wb") as f:
        writer = StreamingWriter(f, specs, fmt.encode_metadata(meta.to_json(described)))
        for key, _, array in tensors:
            writer.write(key, array)
        writer.close()
    return writer.written


def _write_spooled(path: str | os.PathLike, entries: Mapping[str, Entry], meta: DiffMeta) -> Written:
    described: dict[str, dict[str, Any]] = {}
    spool = SpooledWriter(os.path.dirname(os.fspath(path)) or ".")
    try:
        for name in sorted(entries):
            entry = entries[name]  # computed here, once, and dropped after writing
            for key, dtype, array in _checked_tensors(name, entry):
                spool.add(key, dtype, array)
            described[name] = _description(entry)
        with open(path, "wb") as f:
            spool.finish(f, fmt.encode_metadata(meta.to_json(described)))
    except BaseException:
        spool.discard()
        raise
    return spool.written


__all__ = ["SparseDiff", "SparseEntry", "DenseEntry", "DiffMeta", "EntryInfo", "Entry", "VALUE_DTYPES"]
