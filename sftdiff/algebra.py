"""Diff algebra: prune, add, subtract and scale diffs of one base, tensor by tensor.

Results are lazy: each output entry is computed from the operands' entries of the same name when
it is accessed, so saving a result streams and memory stays bounded by the largest entries
involved (plus `RESOLVE_CACHE_BYTES`, see `LazyEntries`). Nothing here imports torch.

Arithmetic rules (README "Diff algebra"):
- Values are accumulated in float64, in operand order, and rounded once to the output dtype;
  values that round to exactly zero are dropped, and an entry left with none disappears.
- The output value dtype is the operands' sparse value dtype if they all share one, else F32,
  unless `dtype` is given.
- Dense entries are replacement values, not deltas: prune and scale keep them as they are; add
  keeps a dense entry that only one operand has, and otherwise applies the dense policy.
- The content fingerprint of an operand (recorded in `meta.provenance`) is `sha256:` + the
  SHA-256 of its file's bytes when it was loaded from a file, else of its canonical entry bytes
  (`content_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import __version__
from .diff import DenseEntry, DiffMeta, Entry, SparseDiff, SparseEntry
from .dtypes import from_float32, to_float32, value_dtype
from .errors import UsageError, VerificationError
from .fingerprint import digest_conflicts
from .select import TopK, per_tensor_count, select_topk

DENSE_POLICIES = ("error", "first", "last", "sum")
SCOPES = ("global", "per-tensor")
# Entries computed while finding which names survive are kept, up to this many bytes, for the
# access that follows (saving), instead of being computed a second time.
RESOLVE_CACHE_BYTES = 256 << 20


# -- array helpers (pure) ------------------------------------------------------------------------


def merge_sorted_sum(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Union of strictly increasing index arrays, and at each index the float64 sum of the values
    found there, added in the order of `parts` (so two operands commute exactly)."""
    if len(parts) == 1:
        return np.asarray(parts[0][0], dtype=np.int64), np.asarray(parts[0][1], dtype=np.float64)
    indices = np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in parts])
    values = np.concatenate([np.asarray(v, dtype=np.float64) for _, v in parts])
    return sum_by_index(indices, values)


def sum_by_index(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique indices and, at each, the float64 sum of the values found there, added in
    their given order (a stable sort keeps equal indices in order; on concatenated sorted runs it
    is a merge)."""
    order = np.argsort(indices, kind="stable")
    indices = np.asarray(indices, dtype=np.int64)[order]
    values = np.asarray(values, dtype=np.float64)[order]
    if not len(indices):
        return indices, values
    starts = np.flatnonzero(np.concatenate(([True], indices[1:] != indices[:-1])))
    return indices[starts], np.add.reduceat(values, starts)


def round_to_odd_f32(x: np.ndarray) -> np.ndarray:
    """float64 → float32 rounding toward zero with the last bit set when inexact ("round to odd").

    Rounding that result to a 16-bit float gives the same as rounding `x` directly, which makes
    float64 → BF16/F16 a single rounding although `dtypes.from_float32` takes float32.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):  # overflow is reported by _check_finite, with the entry's name
        r = x.astype(np.float32)
    inexact = r.astype(np.float64) != x
    bits = r.view(np.uint32).copy()
    overshot = inexact & (np.abs(r.astype(np.float64)) > np.abs(x))
    bits[overshot] -= 1  # one step toward zero (sign-magnitude bits)
    bits[inexact] |= 1
    return bits.view(np.float32)


def round_once(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values as float32 such that `from_float32(result, dtype)` rounds them only once."""
    if dtype == "F32":
        with np.errstate(over="ignore"):
            return np.asarray(values, dtype=np.float64).astype(np.float32)
    return round_to_odd_f32(values)


def _check_finite(name: str, stored: np.ndarray, dtype: str) -> None:
    if not bool(np.isfinite(to_float32(stored, dtype)).all()):
        raise VerificationError(
            f"entry {name!r}: the result overflows {dtype}; scale the operands down or choose --dtype float32"
        )


def sparse_from_f64(name: str, shape: tuple[int, ...], indices: np.ndarray, values: np.ndarray,
                    dtype: str, base_dtype: str | None) -> SparseEntry | None:
    """A canonical sparse entry from float64 values (rounded once, zeros dropped); None if empty."""
    entry = SparseEntry.from_float(shape, indices, round_once(values, dtype), dtype, base_dtype)
    if entry is not None:
        _check_finite(name, entry.values, dtype)
    return entry


def dense_from_f64(name: str, values: np.ndarray, dtype: str, base_dtype: str | None) -> DenseEntry:
    """A dense entry of `dtype` from float64 values, rounded once."""
    if dtype == "F64":
        stored = np.asarray(values, dtype=np.float64)
    else:
        stored = from_float32(round_once(values, dtype), dtype).reshape(np.shape(values))
    _check_finite(name, stored, dtype)
    return DenseEntry(stored, dtype, base_dtype)


def _f64(entry: Entry) -> np.ndarray:
    return entry.values_f32().astype(np.float64).reshape(-1)


# -- operands: labels, fingerprints, compatibility, merged metadata --------------------------------


def label_of(diff: SparseDiff, position: int) -> str:
    """How messages and provenance name an operand: its path, else its position."""
    return diff.path if diff.path else f"operand {position + 1} (in memory)"


def content_fingerprint(diff: SparseDiff) -> tuple[str, str]:
    """(`sha256:<hex>`, what was hashed: "file" or "entries").

    A diff loaded from a file is identified by its file's bytes. An in-memory diff is identified by
    its entries in name order: for each, the UTF-8 JSON `[name, kind, shape, dtype, base_dtype]`, then
    (sparse) its indices as little-endian int64 and its stored values, or (dense) its stored values.
    """
    h = hashlib.sha256()
    if diff.path and os.path.isfile(diff.path):
        with open(diff.path, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        return f"sha256:{h.hexdigest()}", "file"
    for name in sorted(diff.entries):
        entry = diff.entries[name]
        kind = "sparse" if isinstance(entry, SparseEntry) else "dense"
        h.update(json.dumps([name, kind, list(entry.shape), entry.dtype, entry.base_dtype]).encode())
        if isinstance(entry, SparseEntry):
            h.update(np.asarray(entry.indices, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(entry.values).tobytes())
    return f"sha256:{h.hexdigest()}", "entries"


def check_same_base(diffs: Sequence[SparseDiff], labels: Sequence[str]) -> None:
    """Refuse operands whose recorded bases differ (model fingerprint or a base-tensor digest)."""
    first: tuple[str, str] | None = None
    digests: dict[str, str] = {}
    owner: dict[str, str] = {}
    for diff, label in zip(diffs, labels):
        fp = diff.meta.base_fingerprint
        if fp is not None:
            if first is not None and fp != first[1]:
                raise VerificationError(
                    f"{first[0]} and {label} were made from different bases (fingerprints {first[1]} and {fp}); "
                    f"combine diffs of the same base, or pass --ignore-base"
                )
            first = first or (label, fp)
        tensors = diff.meta.base.get("tensors") or {}
        conflicts = digest_conflicts(digests, tensors)
        if conflicts:
            name = conflicts[0]
            raise VerificationError(
                f"{owner[name]} and {label} record different base tensors for {name!r} "
                f"({len(conflicts)} tensor(s) differ); combine diffs of the same base, or pass --ignore-base"
            )
        for name, digest in tensors.items():
            digests.setdefault(name, digest)
            owner.setdefault(name, label)


def check_sparse_shapes(diffs: Sequence[SparseDiff], labels: Sequence[str]) -> None:
    """Refuse sparse entries of one name whose shapes differ between operands (from headers)."""
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    for diff, label in zip(diffs, labels):
        for info in diff.infos():
            if info.kind != "sparse":
                continue
            if info.name in seen and seen[info.name][0] != info.shape:
                shape, other = seen[info.name]
                raise VerificationError(
                    f"entry {info.name!r} has shape {list(shape)} in {other} but {list(info.shape)} in {label}; "
                    f"these diffs are not of the same model"
                )
            seen.setdefault(info.name, (info.shape, label))


def merged_base(diffs: Sequence[SparseDiff]) -> dict[str, Any]:
    """The result's `base`: the operands' hint, fingerprint and numel (first recorded), and the union
    of their base-tensor digests (first wins, which matters only with ignore_base)."""
    out: dict[str, Any] = {}
    tensors: dict[str, str] = {}
    for diff in diffs:
        for key, value in diff.meta.base.items():
            if key != "tensors" and value is not None:
                out.setdefault(key, value)
        for name, digest in (diff.meta.base.get("tensors") or {}).items():
            tensors.setdefault(name, digest)
    if tensors:
        out["tensors"] = tensors
    return out


def agreed_user_fields(diffs: Sequence[SparseDiff]) -> dict[str, str]:
    """User fields every operand that sets them agrees on (a language diff plus a task diff keeps
    both `language` and `task`; fields set differently are dropped)."""
    values: dict[str, set[str]] = {}
    for diff in diffs:
        for key, value in diff.meta.user.items():
            values.setdefault(key, set()).add(value)
    return {k: next(iter(v)) for k, v in values.items() if len(v) == 1}


def merged_config_patch(diffs: Sequence[SparseDiff], labels: Sequence[str], policy: str) -> dict[str, Any] | None:
    """Config patches merged key by key. A key patched differently follows the dense policy
    (`first`/`last` win, since the patch describes the dense head); otherwise it is an error."""
    out: dict[str, Any] = {}
    owner: dict[str, str] = {}
    found = False
    for diff, label in zip(diffs, labels):
        patch = diff.meta.config_patch
        if patch is None:
            continue
        found = True
        for key, value in patch.items():
            if key in out and out[key] != value:
                if policy == "first":
                    continue
                if policy != "last":
                    raise VerificationError(
                        f"config_patch key {key!r} is {json.dumps(out[key])} in {owner[key]} but "
                        f"{json.dumps(value)} in {label}; choose --dense first or --dense last"
                    )
            out[key], owner[key] = value, label
    return out if found else None


def output_dtype(diffs: Sequence[SparseDiff], requested: str | None) -> str:
    """`requested` if given, else the sparse value dtype all operands share, else F32."""
    if requested is not None:
        return value_dtype(requested)
    found = {info.dtype for diff in diffs for info in diff.infos() if info.kind == "sparse"}
    return found.pop() if len(found) == 1 else "F32"


def _operand_records(diffs: Sequence[SparseDiff], labels: Sequence[str]) -> list[dict[str, Any]]:
    records = []
    for diff, label in zip(diffs, labels):
        fingerprint, of = content_fingerprint(diff)
        records.append({"name": label, "fingerprint": fingerprint, "fingerprint_of": of,
                        "origin": diff.meta.origin})
    return records


def _meta(diffs: Sequence[SparseDiff], labels: Sequence[str], operation: str, params: dict[str, Any],
          user: dict[str, str], config_patch: dict[str, Any] | None) -> DiffMeta:
    params = {k: v for k, v in params.items() if v is not None}
    return DiffMeta(
        base=merged_base(diffs),
        origin={"tool": f"sftdiff {__version__}", "method": operation, **params},
        user=user,
        config_patch=config_patch,
        provenance={"operation": operation, "operands": _operand_records(diffs, labels), **params},
    )


# -- lazy result -----------------------------------------------------------------------------------


class LazyEntries(Mapping[str, Entry]):
    """Entries computed on access by `compute(name)` (None: the entry cancelled out).

    Which candidates survive is known only by computing them, so iterating computes each once in
    name order and keeps the results, up to `cache_bytes`, for their next access (which takes
    them out of the cache: saving reads each entry once, in name order).
    """

    def __init__(self, candidates: Sequence[str], compute: Callable[[str], Entry | None],
                 cache_bytes: int = RESOLVE_CACHE_BYTES):
        self._candidates = sorted(candidates)
        self._compute = compute
        self._cache_bytes = cache_bytes
        self._cache: dict[str, Entry] = {}
        self._names: list[str] | None = None

    def _resolve(self) -> list[str]:
        if self._names is None:
            names, used = [], 0
            for name in self._candidates:
                entry = self._compute(name)
                if entry is None:
                    continue
                names.append(name)
                size = _nbytes(entry)
                if used + size <= self._cache_bytes:
                    self._cache[name] = entry
                    used += size
            self._names = names
        return self._names

    def __getitem__(self, name: str) -> Entry:
        if name in self._cache:
            return self._cache.pop(name)
        if name not in self._candidates or (self._names is not None and name not in self._names):
            raise KeyError(name)
        entry = self._compute(name)
        if entry is None:
            raise KeyError(name)
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolve())

    def __len__(self) -> int:
        return len(self._resolve())

    def __contains__(self, name: object) -> bool:
        return name in self._resolve()


def _nbytes(entry: Entry) -> int:
    if isinstance(entry, SparseEntry):
        return entry.indices.nbytes + entry.values.nbytes
    return entry.values.nbytes


# -- prune -----------------------------------------------------------------------------------------


def prune(diff: SparseDiff, *, k: int | None = None, density: float | None = None,
          threshold: float | None = None, scope: str = "global", dtype: str | None = None) -> SparseDiff:
    """Keep the largest |values| of the sparse entries; dense entries are kept as they are.

    Exactly one of `k` (values to keep), `density` (fraction of the numel of the tensors the diff
    has sparse entries for, rounded half up; per tensor with scope "per-tensor") or `threshold`
    (keep |v| ≥ threshold). Ties follow `select.py` (magnitude, then name order, then index), so
    pruning a top-k' diff of F32 values to k gives what top-k selection would have given.
    """
    _check_budget(k, density, threshold, scope)
    label = label_of(diff, 0)
    sparse_names = sorted(i.name for i in diff.infos() if i.kind == "sparse")
    out_dtype = output_dtype([diff], dtype)
    if threshold is not None:
        def positions(name: str, entry: SparseEntry) -> np.ndarray:
            return np.flatnonzero(np.abs(_f64(entry)) >= threshold)
    elif scope == "per-tensor":
        def positions(name: str, entry: SparseEntry) -> np.ndarray:
            count = k if k is not None else per_tensor_count(entry.numel, density)
            return select_topk(np.abs(entry.values_f32()), count)
    else:
        chosen = global_topk_positions(diff, sparse_names, _global_count(diff, sparse_names, k, density))
        def positions(name: str, entry: SparseEntry) -> np.ndarray:
            return chosen.get(name, np.empty(0, dtype=np.int64))

    def compute(name: str) -> Entry | None:
        entry = diff.entries[name]
        if isinstance(entry, DenseEntry):
            return entry
        keep = positions(name, entry)
        if len(keep) == entry.nnz and out_dtype == entry.dtype:
            return entry
        return sparse_from_f64(name, entry.shape, np.asarray(entry.indices)[keep], _f64(entry)[keep],
                               out_dtype, entry.base_dtype)

    params = {"k": k, "density": density, "threshold": threshold,
              "scope": None if threshold is not None else scope, "dtype": out_dtype}
    meta = _meta([diff], [label], "prune", params, dict(diff.meta.user), diff.meta.config_patch)
    return SparseDiff(LazyEntries(list(diff.entries), compute), meta)


def _check_budget(k: int | None, density: float | None, threshold: float | None, scope: str) -> None:
    if sum(x is not None for x in (k, density, threshold)) != 1:
        raise UsageError("give exactly one of -k N, --density D or --threshold T")
    if k is not None and k < 0:
        raise UsageError("-k must be a non-negative integer")
    if density is not None and not 0 < density <= 1:
        raise UsageError("--density must be in (0, 1]")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise UsageError("--threshold must be a finite number >= 0")
    if scope not in SCOPES:
        raise UsageError(f"--scope must be one of {', '.join(SCOPES)}")


def _global_count(diff: SparseDiff, names: Sequence[str], k: int | None, density: float | None) -> int:
    if k is not None:
        return k
    touched = sum(math.prod(diff.info(n).shape) for n in names)
    return per_tensor_count(touched, density)  # the same round-half-up, over all touched values


def global_topk_positions(diff: SparseDiff, names: Sequence[str], k: int) -> dict[str, np.ndarray]:
    """name -> sorted positions (into the entry's values) of the global top-k |values|, streaming
    over the sorted `names` (rank = position in that list, as in `create`)."""
    if k >= sum(diff.info(n).nnz for n in names):
        return {n: np.arange(diff.info(n).nnz) for n in names}
    top = TopK(k)
    for rank, name in enumerate(names):
        top.offer(rank, np.abs(diff.entries[name].values_f32()))
    return {names[rank]: positions for rank, positions in top.result().items()}


# -- scale -----------------------------------------------------------------------------------------


def scale(diff: SparseDiff, factor: float, *, dtype: str | None = None) -> SparseDiff:
    """Multiply the sparse values by `factor` (rounded once); dense entries are kept as they are."""
    factor = float(factor)
    if not math.isfinite(factor):
        raise UsageError(f"the factor must be a finite number, got {factor}")
    out_dtype = output_dtype([diff], dtype)

    def compute(name: str) -> Entry | None:
        entry = diff.entries[name]
        if isinstance(entry, DenseEntry):
            return entry
        return sparse_from_f64(name, entry.shape, entry.indices, _f64(entry) * factor, out_dtype, entry.base_dtype)

    meta = _meta([diff], [label_of(diff, 0)], "scale", {"factor": factor, "dtype": out_dtype}, dict(diff.meta.user),
                 diff.meta.config_patch)
    return SparseDiff(LazyEntries(list(diff.entries), compute), meta)


# -- add / subtract --------------------------------------------------------------------------------


def add(*diffs: SparseDiff, weights: Sequence[float] | None = None, dense: str = "error",
        dtype: str | None = None, ignore_base: bool = False) -> SparseDiff:
    """Σ wᵢ·diffᵢ: the union of indices, values summed in float64 in operand order, rounded once.

    A dense entry present in one operand is kept as it is; in several, `dense` decides: "error"
    (refuse), "first", "last", or "sum" (Σ wᵢ·Dᵢ). Sparse entries of the same name in other
    operands are then added onto the chosen dense value (weighted; shapes must match).
    """
    if not diffs:
        raise UsageError("add needs at least one diff")
    weights = [1.0] * len(diffs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(diffs):
        raise UsageError(f"{len(weights)} weights for {len(diffs)} diffs; give one weight per diff")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError("weights must be finite numbers")
    if dense not in DENSE_POLICIES:
        raise UsageError(f"--dense must be one of {', '.join(DENSE_POLICIES)}")
    labels = [label_of(d, i) for i, d in enumerate(diffs)]
    config = merged_config_patch(diffs, labels, dense)
    params = {"weights": weights, "dense": dense}
    return _combine(diffs, labels, weights, dense, dtype, ignore_base, "add", params,
                    agreed_user_fields(diffs), config)


def subtract(a: SparseDiff, b: SparseDiff, *, dtype: str | None = None, ignore_base: bool = False) -> SparseDiff:
    """A − B. B may not have dense entries (a replacement value cannot be subtracted); the result
    keeps A's user fields and config_patch."""
    labels = [label_of(a, 0), label_of(b, 1)]
    dense_b = [i.name for i in b.infos() if i.kind == "dense"]
    if dense_b:
        raise VerificationError(
            f"{labels[1]} has dense entries ({dense_b[0]!r}...), which replace a parameter and cannot be "
            f"subtracted; subtract a diff without dense entries"
        )
    return _combine([a, b], labels, [1.0, -1.0], "error", dtype, ignore_base, "subtract", {},
                    dict(a.meta.user), a.meta.config_patch)


def _combine(diffs: Sequence[SparseDiff], labels: Sequence[str], weights: Sequence[float], policy: str,
             dtype: str | None, ignore_base: bool, operation: str, params: dict[str, Any],
             user: dict[str, str], config_patch: dict[str, Any] | None) -> SparseDiff:
    if not ignore_base:
        check_same_base(diffs, labels)
    check_sparse_shapes(diffs, labels)
    holders = _holders(diffs)
    for name, owners in holders.items():
        _check_dense_plan(name, [(labels[i], diffs[i].info(name)) for i in owners], policy)
    out_dtype = output_dtype(diffs, dtype)

    def compute(name: str) -> Entry | None:
        parts = [(weights[i], diffs[i].entries[name]) for i in holders[name]]
        return combine_entry(name, parts, policy, out_dtype)

    meta = _meta(diffs, labels, operation, {**params, "dtype": out_dtype}, user, config_patch)
    return SparseDiff(LazyEntries(list(holders), compute), meta)


def _holders(diffs: Sequence[SparseDiff]) -> dict[str, list[int]]:
    """name -> positions of the operands that have an entry of that name."""
    out: dict[str, list[int]] = {}
    for i, diff in enumerate(diffs):
        for name in diff.entries:
            out.setdefault(name, []).append(i)
    return out


def _check_dense_plan(name: str, infos: Sequence[tuple[str, Any]], policy: str) -> None:
    dense = [(label, info) for label, info in infos if info.kind == "dense"]
    if not dense:
        return
    if len(dense) > 1 and policy == "error":
        raise VerificationError(
            f"{dense[0][0]} and {dense[1][0]} both replace {name!r} with a dense value; "
            f"choose --dense first, last or sum"
        )
    shapes = {info.shape for _, info in dense} if policy == "sum" else {_chosen(dense, policy)[1].shape}
    shapes |= {info.shape for _, info in infos if info.kind == "sparse"}
    if len(shapes) > 1:
        raise VerificationError(
            f"entry {name!r}: cannot combine shapes {sorted(map(list, shapes))} (dense replacement and "
            f"sparse deltas, or dense values to sum, must have one shape)"
        )


def _chosen(dense: Sequence[Any], policy: str) -> Any:
    return dense[-1] if policy == "last" else dense[0]


def combine_entry(name: str, parts: Sequence[tuple[float, Entry]], policy: str, dtype: str) -> Entry | None:
    """One output entry from (weight, entry) pairs in operand order (see `add`)."""
    sparse = [(w, e) for w, e in parts if isinstance(e, SparseEntry)]
    dense = [(w, e) for w, e in parts if isinstance(e, DenseEntry)]
    if not dense:
        first = sparse[0][1]
        indices, values = merge_sorted_sum([(e.indices, _f64(e) * w) for w, e in sparse])
        return sparse_from_f64(name, first.shape, indices, values, dtype, first.base_dtype)
    if len(dense) == 1 or policy != "sum":
        chosen = _chosen(dense, policy)[1]
        if not sparse:
            return chosen
        total, dense_dtype, shape = _f64(chosen).copy(), chosen.dtype, chosen.shape
    else:
        total = np.zeros(dense[0][1].numel, dtype=np.float64)
        for w, e in dense:
            total += _f64(e) * w
        dtypes = {e.dtype for _, e in dense}
        dense_dtype = dtypes.pop() if len(dtypes) == 1 else "F32"
        shape = dense[0][1].shape
    for w, e in sparse:
        total[np.asarray(e.indices)] += _f64(e) * w
    base_dtype = next((e.base_dtype for _, e in parts if e.base_dtype is not None), None)
    return dense_from_f64(name, total.reshape(shape), dense_dtype, base_dtype)
