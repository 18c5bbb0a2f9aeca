"""Diff algebra: prune, add, subtract, scale and filter diffs of one base, tensor by tensor.

Results are lazy: each output entry is computed from the operands' entries of the same parameter
when it is first needed, and kept (up to `RESOLVE_CACHE_BYTES`, see `LazyEntries`), so saving or
baking a result computes each entry once and streams. Nothing here imports torch.

Operands are aligned by parameter, not by spelling (`align`, through `names.NameMap`): two diffs
that name one parameter `encoder.x` and `bert.encoder.x` hold one parameter, spelled in the
result as the first operand spells it. Their recorded base digests are compared the same way.

`add`, `subtract` and `scale` follow the composition rule of `apply` (`compose.py`, spec
"Applying a stack of diffs"), so `apply(base, A, B) == apply(base, add(A, B))`:
- sparse values are accumulated in float64, in operand order (× weight), and rounded once to the
  output dtype; values that round to exactly zero are dropped, and an entry left with none
  disappears. The output value dtype is the operands' sparse value dtype if they all share one,
  else F32, unless `dtype` is given;
- a dense entry replaces: for each parameter the last operand's dense entry wins and only the
  sparse entries of the operands after it are added onto it (weighted); earlier entries are
  overwritten. Weights and factors never apply to dense entries;
- config patches merge key by key, a later operand winning, with a warning naming the key.
The content fingerprint of an operand (recorded in `meta.provenance`) is `sha256:` + the SHA-256
of its file's bytes when it was loaded from a file, else of its canonical entry bytes
(`fingerprint.content_fingerprint`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from . import __version__
from .compose import last_dense, merge_config_patches, overwritten
from .compose import _warn as _default_warn
from .diff import DenseEntry, DiffMeta, Entry, EntryInfo, SparseDiff, SparseEntry, _info
from .dtypes import from_float32, round_to_odd_f32, to_float32, value_dtype
from .errors import UsageError, VerificationError
from .fingerprint import content_fingerprint
from .names import NameMap, matches_any
from .select import TopK, per_tensor_count, select_topk

# "last" is apply's rule; "error" refuses to overwrite anything; "sum" adds dense values (weighted).
DENSE_POLICIES = ("last", "error", "sum")
SCOPES = ("global", "per-tensor")
# Computed entries are kept, up to this many bytes, for the accesses that follow (resolving which
# names survive, checking, saving, baking) instead of being computed again.
RESOLVE_CACHE_BYTES = 256 << 20

Warn = Callable[[str], None]


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


# -- aligning operands by parameter ----------------------------------------------------------------


class Alignment(NamedTuple):
    """How operands' entries line up: `names` maps each output name (the first operand's spelling,
    else the first spelling seen) to the (operand position, that operand's entry name) pairs that
    hold it, in operand order; `lookup[i]` maps operand i's entry names to output names; `maps[i]`
    is the `NameMap` that decided it (reference: the output names of operands 0..i−1)."""

    names: dict[str, list[tuple[int, str]]]
    lookup: list[dict[str, str]]
    maps: list[NameMap]

    def spell(self, i: int, name: str) -> str:
        """Operand i's `name` (an entry, or a recorded base tensor) as the output spells it."""
        found = self.lookup[i].get(name)
        return found if found is not None else self.maps[i].spell(name)


def align(diffs: Sequence[SparseDiff], labels: Sequence[str] | None = None) -> Alignment:
    """Match the operands' entries by parameter across the base-model prefix (`names.NameMap`).

    Refuses an operand that holds one parameter under two spellings. A parameter only a later
    operand has keeps its name, minus a prefix the output does not use, or plus one the output
    uses when that operand's base had the parameter (its `base_dtype` is set: not a new head)."""
    labels = list(labels) if labels is not None else [label_of(d, i) for i, d in enumerate(diffs)]
    names: dict[str, list[tuple[int, str]]] = {}
    lookup: list[dict[str, str]] = []
    maps: list[NameMap] = []
    for i, diff in enumerate(diffs):
        own = list(diff.entries)
        m = NameMap(names.keys(), own)
        mine: dict[str, str] = {}
        taken: dict[str, str] = {}
        for name in own:
            out = m.to_ref(name)
            if out is None:
                out = m.spell(name)
                if out == name and m.stripped and diff.info(name).base_dtype is not None:
                    out = m.stripped + name
            if out in taken:
                raise VerificationError(
                    f"{labels[i]} has entries {taken[out]!r} and {name!r}, one parameter spelled two ways; "
                    f"keep one with `sftdiff filter --exclude`"
                )
            taken[out] = name
            mine[name] = out
        for name, out in mine.items():
            names.setdefault(out, []).append((i, name))
        lookup.append(mine)
        maps.append(m)
    return Alignment(names, lookup, maps)


# -- operands: bases, shapes, merged metadata ------------------------------------------------------


def check_same_base(diffs: Sequence[SparseDiff], labels: Sequence[str], alignment: Alignment | None = None) -> None:
    """Refuse operands made from different bases.

    Recorded base-tensor digests are compared through the name map (`align`): a tensor two
    operands record differently is refused. Operands that share recorded tensors, all equal, have
    the same base even if their model fingerprints differ (one cut against a bare `BertModel`,
    one against the `bert.`-spelled head model); operands sharing none are compared by model
    fingerprint when both record one."""
    al = alignment or align(diffs, labels)
    records = []
    for i, diff in enumerate(diffs):
        tensors = {al.spell(i, n): d for n, d in (diff.meta.base.get("tensors") or {}).items()}
        records.append((labels[i], diff.meta.base_fingerprint, tensors))
    for j in range(len(records)):
        for i in range(j):
            (li, fi, ti), (lj, fj, tj) = records[i], records[j]
            shared = ti.keys() & tj.keys()
            conflicts = sorted(n for n in shared if ti[n] != tj[n])
            if conflicts:
                raise VerificationError(
                    f"{li} and {lj} record different base tensors for {conflicts[0]!r} "
                    f"({len(conflicts)} tensor(s) differ); combine diffs of the same base, or pass --ignore-base (ignore_base=True in Python)"
                )
            if not shared and fi is not None and fj is not None and fi != fj:
                raise VerificationError(
                    f"{li} and {lj} were made from different bases (fingerprints {fi} and {fj}); "
                    f"combine diffs of the same base, or pass --ignore-base (ignore_base=True in Python)"
                )


def check_sparse_shapes(diffs: Sequence[SparseDiff], labels: Sequence[str], alignment: Alignment | None = None) -> None:
    """Refuse sparse entries of one parameter whose shapes differ between operands (from headers)."""
    al = alignment or align(diffs, labels)
    for out, holders in al.names.items():
        seen: tuple[tuple[int, ...], str] | None = None
        for i, name in holders:
            info = diffs[i].info(name)
            if info.kind != "sparse":
                continue
            if seen is not None and seen[0] != info.shape:
                raise VerificationError(
                    f"entry {out!r} has shape {list(seen[0])} in {seen[1]} but {list(info.shape)} in {labels[i]}; "
                    f"these diffs are not of the same model"
                )
            seen = seen or (info.shape, labels[i])


def merged_base(diffs: Sequence[SparseDiff], alignment: Alignment | None = None,
                replaced: Iterable[str] = ()) -> dict[str, Any]:
    """The result's `base`: the operands' hint, fingerprint and numel (first recorded), and the union
    of their base-tensor digests in the output's spelling (first wins, which matters only with
    ignore_base), except for the `replaced` parameters, whose result is a dense value that does not
    depend on the base (one operand's base may even lack them: a head in one, new in another)."""
    al = alignment or align(diffs)
    replaced = set(replaced)
    out: dict[str, Any] = {}
    tensors: dict[str, str] = {}
    for i, diff in enumerate(diffs):
        for key, value in diff.meta.base.items():
            if key != "tensors" and value is not None:
                out.setdefault(key, value)
        for name, digest in (diff.meta.base.get("tensors") or {}).items():
            if al.spell(i, name) not in replaced:
                tensors.setdefault(al.spell(i, name), digest)
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


def merged_config_patch(diffs: Sequence[SparseDiff], labels: Sequence[str], policy: str | None = None, *,
                        warn: Warn | None = None) -> dict[str, Any] | None:
    """Config patches merged by the composition rule (`compose.merge_config_patches`): key by key, a
    later operand winning, with a warning per key set differently. `policy` is ignored (config
    patches follow the rule whatever the dense policy; kept for callers)."""
    return merge_config_patches([(label, d.meta.config_patch) for d, label in zip(diffs, labels)], warn)


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
          user: dict[str, str], config_patch: dict[str, Any] | None,
          alignment: Alignment | None = None, replaced: Iterable[str] = ()) -> DiffMeta:
    params = {k: v for k, v in params.items() if v is not None}
    return DiffMeta(
        base=merged_base(diffs, alignment, replaced),
        origin={"tool": f"sftdiff {__version__}", "method": operation, **params},
        user=user,
        config_patch=config_patch,
        provenance={"operation": operation, "operands": _operand_records(diffs, labels), **params},
    )


# -- lazy result -----------------------------------------------------------------------------------


class LazyEntries(Mapping[str, Entry]):
    """Entries computed on access by `compute(name)` (None: the entry cancelled out).

    Which candidates survive is known only by computing them, so the first question about the
    names (iterating, `len`, `in`, an entry's `EntryInfo`) computes every candidate once, in name
    order, records the survivors' facts (`infos`, what `SparseDiff.info` reads: nothing is
    computed to answer it) and keeps the entries, up to `cache_bytes` in all, for later accesses:
    checking, saving and baking a result then compute each entry once. Entries past that budget
    are computed again when accessed. `computed` counts calls of `compute`. With `known` (each
    candidate's `EntryInfo`, e.g. from an operand's header, when every candidate survives as it is)
    names and facts are answered without computing anything.
    """

    def __init__(self, candidates: Iterable[str], compute: Callable[[str], Entry | None],
                 cache_bytes: int = RESOLVE_CACHE_BYTES, *, known: Mapping[str, EntryInfo] | None = None):
        self._candidates = sorted(set(candidates))
        self._compute = compute
        self._cache_bytes = cache_bytes
        self._cache: dict[str, Entry] = {}
        self._used = 0
        self._names: list[str] | None = None
        self._infos: dict[str, EntryInfo] = {}
        if known is not None:  # the caller knows names and facts from headers (filter): nothing to resolve
            self._infos = {name: known[name] for name in self._candidates}
            self._names = list(self._candidates)
        self.infos: Mapping[str, EntryInfo] = _ResolvedInfos(self)
        self.computed = 0

    def _get(self, name: str) -> Entry | None:
        entry = self._cache.get(name)
        if entry is not None:
            return entry
        entry = self._compute(name)
        self.computed += 1
        if entry is not None and self._used + _nbytes(entry) <= self._cache_bytes:
            self._cache[name] = entry
            self._used += _nbytes(entry)
        return entry

    def _resolve(self) -> list[str]:
        if self._names is None:
            names = []
            for name in self._candidates:
                entry = self._get(name)
                if entry is not None:
                    names.append(name)
                    self._infos[name] = _info(name, entry)
            self._names = names
        return self._names

    def __getitem__(self, name: str) -> Entry:
        if name not in self._infos and (self._names is not None or name not in self._candidates):
            raise KeyError(name)
        entry = self._get(name)
        if entry is None:
            raise KeyError(name)
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolve())

    def __len__(self) -> int:
        return len(self._resolve())

    def __contains__(self, name: object) -> bool:
        self._resolve()
        return name in self._infos


class _ResolvedInfos(Mapping[str, EntryInfo]):
    """A lazy result's `EntryInfo`s, recorded when its names were resolved."""

    def __init__(self, owner: LazyEntries):
        self._owner = owner

    def __getitem__(self, name: str) -> EntryInfo:
        self._owner._resolve()
        return self._owner._infos[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner._resolve())

    def __len__(self) -> int:
        return len(self._owner._resolve())


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
    pruning a top-k' diff of F32 values to k gives what top-k selection would have given. A
    budget that keeps every value changes nothing (`sftdiff prune` says so).
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
    """Multiply the sparse values by `factor` (rounded once); dense entries are kept as they are
    (the composition rule: a scale never applies to a replacement value)."""
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


# -- filter ----------------------------------------------------------------------------------------


def filter_entries(diff: SparseDiff, *, include: Sequence[str] = (), exclude: Sequence[str] = (),
                   dense: bool = True, warn: Warn | None = None, allow_empty: bool = False) -> SparseDiff:
    """The entries of `diff` whose names match an `include` glob (all if none is given) and no
    `exclude` glob; `dense=False` drops every dense entry as well. Globs are shell-style and
    case-sensitive (`cls.*`, `*classifier*`). Entries are kept as they are (nothing is recomputed).

    A filter that keeps no entry is almost always a mistyped glob, so it raises `UsageError`
    naming the globs and a few of the diff's entry names; `allow_empty=True` returns the empty
    diff instead. When the diff's dense entries are all dropped its `config_patch` goes too (it
    describes the head those entries carry), with a warning; a glob that matches no entry (while
    others keep some) gets a warning.
    """
    warn = warn or _default_warn
    label = label_of(diff, 0)
    infos = {i.name: i for i in diff.infos()}
    kept = [n for n, info in infos.items()
            if (not include or matches_any(n, include)) and not matches_any(n, exclude)
            and (dense or info.kind != "dense")]
    if not kept and not allow_empty:
        raise UsageError(_kept_nothing(label, list(infos), include, exclude, dense))
    for glob in list(include) + list(exclude):
        if not any(matches_any(n, [glob]) for n in infos):
            warn(f"{glob!r} matches no entry of {label}")
    had_dense = any(i.kind == "dense" for i in infos.values())
    keeps_dense = any(infos[n].kind == "dense" for n in kept)
    config_patch = diff.meta.config_patch
    if config_patch is not None and had_dense and not keeps_dense:
        warn(f"all dense entries of {label} were dropped, and with them its config_patch "
             f"(keys {', '.join(sorted(config_patch))})")
        config_patch = None
    params = {"include": list(include), "exclude": list(exclude), "dense": bool(dense),
              "dropped": sorted(set(infos) - set(kept))}
    meta = _meta([diff], [label], "filter", params, dict(diff.meta.user), config_patch)
    meta.origin = {**diff.meta.origin}
    meta.base = dict(diff.meta.base)
    if "tensors" in meta.base:
        meta.base["tensors"] = {n: d for n, d in meta.base["tensors"].items() if n in set(kept)}
    return SparseDiff(LazyEntries(kept, lambda name: diff.entries[name], known=infos), meta)


def _kept_nothing(label: str, names: list[str], include: Sequence[str], exclude: Sequence[str], dense: bool) -> str:
    """One line for a filter that keeps no entry: the globs, and the entry names closest to the
    first include glob (else the first names), so a mistyped prefix shows at a glance."""
    import difflib

    if not names:
        return f"{label} has no entries, so the filter keeps none; filter a diff that has entries"
    asked = [f"include {list(include)}"] if include else []
    asked += [f"exclude {list(exclude)}"] if exclude else []
    asked += [] if dense else ["no dense entries"]
    examples = (difflib.get_close_matches(include[0], names, n=3, cutoff=0.0) if include else []) or names[:3]
    more = ", ..." if len(names) > len(examples) else ""
    fix = "fix the globs" if dense else "fix the globs or keep the dense entries"
    return (f"{label}: the filter ({'; '.join(asked)}) keeps none of its {len(names)} entries, named like "
            f"{', '.join(repr(n) for n in examples)}{more}; {fix} (shell-style, case-sensitive, matched against "
            f"these names; `sftdiff inspect --all` lists them all)")


# -- add / subtract --------------------------------------------------------------------------------


def add(*diffs: SparseDiff, weights: Sequence[float] | None = None, dense: str = "last",
        dtype: str | None = None, ignore_base: bool = False, warn: Warn | None = None) -> SparseDiff:
    """Σ wᵢ·diffᵢ by the composition rule, so that applying the result equals applying the diffs
    in order (with the weights as their scales).

    Sparse values: the union of indices, summed in float64 in operand order, rounded once. Dense
    entries: for each parameter the last operand's dense entry wins and the weighted sparse
    entries of later operands are added onto it; earlier entries are overwritten (a warning lists
    them). `dense` chooses the policy: "last" (the rule, default), "error" (refuse to overwrite any
    entry) or "sum" (the dense values of all operands are added, weighted: Σ wᵢ·Dᵢ; not what
    applying the diffs in order does). Config patches: later operands win key by key, with a
    warning per key (through `warn`, default a `compose.CompositionWarning`).
    """
    if not diffs:
        raise UsageError("add needs at least one diff")
    weights = [1.0] * len(diffs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(diffs):
        raise UsageError(f"{len(weights)} weights for {len(diffs)} diffs; give one weight per diff")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError("weights must be finite numbers")
    if dense == "first":
        raise UsageError("--dense first is gone: apply lets the later diff's dense entry win, and add does too; "
                         "put the diff whose dense value should win last, or drop the other's with "
                         "`sftdiff filter --exclude NAME`")
    if dense not in DENSE_POLICIES:
        raise UsageError(f"--dense must be one of {', '.join(DENSE_POLICIES)}")
    warn = warn or _default_warn
    labels, al, replaced = plan_stack(diffs, dense, ignore_base=ignore_base, warn=warn)
    config = merged_config_patch(diffs, labels, warn=warn)
    out_dtype = output_dtype(diffs, dtype)

    def compute(name: str) -> Entry | None:
        parts = [(weights[i], diffs[i].entries[n]) for i, n in al.names[name]]
        return combine_entry(name, parts, dense, out_dtype)

    params = {"weights": weights, "dense": dense, "dtype": out_dtype}
    meta = _meta(diffs, labels, "add", params, agreed_user_fields(diffs), config, al, replaced)
    return SparseDiff(LazyEntries(list(al.names), compute), meta)


def subtract(a: SparseDiff, b: SparseDiff, *, dtype: str | None = None, ignore_base: bool = False) -> SparseDiff:
    """A − B: the diff R with apply(base, R, B) == apply(base, A).

    Sparse values are subtracted (float64, rounded once). A dense entry of B must be one A has with
    the same value: it is removed (e.g. `subtract both.sft lang.sft` drops the language diff's MLM
    head). Anything else cannot be expressed as a diff and is refused, naming the entry. A dense
    entry of A minus a sparse one of B is A's value minus B's delta. The result keeps A's user
    fields and A's config_patch without the keys B patches to the same value.
    """
    labels = [label_of(a, 0), label_of(b, 1)]
    al = align([a, b], labels)
    if not ignore_base:
        check_same_base([a, b], labels, al)
    removed = set()
    refused: list[tuple[str, str]] = []  # (B's name, why): all of them, so the hint drops them at once
    for name, holders in al.names.items():
        infos = {i: (n, [a, b][i].info(n)) for i, n in holders}
        if 1 not in infos or infos[1][1].kind != "dense":
            _check_stack(name, [(labels[i], info) for i, (_, info) in sorted(infos.items())], "last")
            continue
        b_name = infos[1][0]
        a_dense = 0 in infos and infos[0][1].kind == "dense"
        if not a_dense or infos[0][1].shape != infos[1][1].shape:
            refused.append((b_name, "replaces it with another shape" if a_dense else "does not replace it"))
            continue
        removed.add(name)
    if refused:
        (b_name, what), more = sorted(refused)[0], len(refused) - 1
        excludes = " ".join(f"--exclude '{n}'" for n, _ in sorted(refused))
        raise VerificationError(
            f"{labels[1]} replaces {b_name!r}{f' (and {more} more)' if more else ''} with a dense value and "
            f"{labels[0]} {what}, so A − B cannot be written as a diff; subtract the rest with "
            f"`sftdiff filter {labels[1]} {excludes} -o B2.sft`"
        )

    def compute(name: str) -> Entry | None:
        holders = al.names[name]
        if name in removed:
            (_, an), (_, bn) = holders
            da, db = a.entries[an], b.entries[bn]
            if not np.array_equal(da.values_f32(), db.values_f32()):
                raise VerificationError(
                    f"{labels[1]} and {labels[0]} replace {bn!r} with different dense values, so A − B cannot be "
                    f"written as a diff; subtract the rest with `sftdiff filter {labels[1]} --exclude '{bn}' -o B2.sft`"
                )
            return None
        parts = [((1.0, -1.0)[i], (a, b)[i].entries[n]) for i, n in holders]
        return combine_entry(name, parts, "last", out_dtype)

    out_dtype = output_dtype([a, b], dtype)
    config = a.meta.config_patch
    if config is not None and b.meta.config_patch:
        missing = object()
        config = {k: v for k, v in config.items() if b.meta.config_patch.get(k, missing) != v} or None
    meta = _meta([a, b], labels, "subtract", {"dtype": out_dtype}, dict(a.meta.user), config, al)
    return SparseDiff(LazyEntries(list(al.names), compute), meta)


def plan_stack(diffs: Sequence[SparseDiff], policy: str, *, ignore_base: bool,
               warn: Warn) -> tuple[list[str], Alignment, list[str]]:
    """What `add` and `merge` decide before computing anything, from headers: the operands' labels,
    their alignment, their bases checked (unless `ignore_base`), each parameter's stack checked
    under the dense `policy` (entries a later dense entry overwrites are reported through `warn`),
    and the names a dense entry replaces while another operand also holds them."""
    labels = [label_of(d, i) for i, d in enumerate(diffs)]
    al = align(diffs, labels)
    if not ignore_base:
        check_same_base(diffs, labels, al)
    lost, replaced = [], []
    for name, holders in al.names.items():
        infos = [(labels[i], diffs[i].info(n)) for i, n in holders]
        lost += _check_stack(name, infos, policy)
        if len(holders) > 1 and any(info.kind == "dense" for _, info in infos):
            replaced.append(name)
    if lost:
        warn(f"{len(lost)} entr{'y' if len(lost) == 1 else 'ies'} overwritten by a later dense entry, as apply "
             f"would overwrite them: {_some(lost)}")
    return labels, al, replaced


def _check_stack(name: str, infos: Sequence[tuple[str, EntryInfo]], policy: str) -> list[str]:
    """Check one parameter's stack (operand label, entry facts) in order, from headers: the entries
    that count must share one shape, and "error" refuses to overwrite any. Returns the
    overwritten entries, for the warning."""
    lost = overwritten(list(infos), lambda item: item[1].kind)
    if lost and policy == "error":
        winner = infos[last_dense([info.kind for _, info in infos])][0]
        raise VerificationError(
            f"{winner} replaces {name!r} with a dense value, overwriting its entry in {lost[0][0]}; "
            f"pass --dense last to let it (as apply does), or drop one with `sftdiff filter --exclude '{name}'`"
        )
    used = list(infos[len(lost):])
    if policy == "sum":
        used += [item for item in lost if item[1].kind == "dense"]
    shapes: dict[tuple[int, ...], str] = {}
    for label, info in used:
        shapes.setdefault(info.shape, label)
    if len(shapes) > 1:
        (s1, l1), (s2, l2) = list(shapes.items())[:2]
        raise VerificationError(
            f"entry {name!r} has shape {list(s1)} in {l1} but {list(s2)} in {l2}; these diffs are not of the same model"
        )
    return [f"{name} ({label})" for label, _ in lost] if policy != "sum" else []


def _some(items: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def combine_entry(name: str, parts: Sequence[tuple[float, Entry]], policy: str, dtype: str) -> Entry | None:
    """One output entry from (weight, entry) pairs in operand order, by the composition rule (see
    `add`); `policy` "sum" adds the weighted dense values instead of keeping the last one."""
    kinds = ["dense" if isinstance(e, DenseEntry) else "sparse" for _, e in parts]
    start = last_dense(kinds)
    if start is None:
        first = parts[0][1]
        indices, values = merge_sorted_sum([(e.indices, _f64(e) * w) for w, e in parts])
        return sparse_from_f64(name, first.shape, indices, values, dtype, first.base_dtype)
    chosen = parts[start][1]
    after = parts[start + 1:]
    dense = [(w, e) for w, e in parts if isinstance(e, DenseEntry)]
    if policy == "sum" and len(dense) > 1:
        total = np.zeros(chosen.numel, dtype=np.float64)
        for w, e in dense:
            total += _f64(e) * w
        dtypes = {e.dtype for _, e in dense}
        dense_dtype = dtypes.pop() if len(dtypes) == 1 else "F32"
    elif not after:
        return chosen
    else:
        total, dense_dtype = _f64(chosen).copy(), chosen.dtype
    for w, e in after:
        total[np.asarray(e.indices)] += _f64(e) * w
    base_dtype = next((e.base_dtype for _, e in parts[start:] if e.base_dtype is not None), None)
    return dense_from_f64(name, total.reshape(chosen.shape), dense_dtype, base_dtype)


__all__ = ["prune", "add", "subtract", "scale", "filter_entries", "align", "Alignment", "LazyEntries",
           "combine_entry", "check_same_base", "DENSE_POLICIES"]
