"""Merging many diffs into one: weighted sum, TIES, DARE and DARE-TIES, on sparse entries.

These are the task-vector merge methods of mergekit and PEFT, read on sparse diffs: a position a
diff does not store is a zero delta (it neither votes in TIES' sign election nor counts in its
mean), so every step touches only the union of the operands' supports, one parameter at a time.
The result is lazy like the algebra's (`algebra.LazyEntries`): saving streams it.

Per parameter, with wᵢ the weights and vᵢ the stored values of operand i (docs/merge.md):
- trim (ties, with `density` D): keep the round-half-up(D·nnzᵢ) largest |vᵢ| (ties: lower index);
- drop (dare, dare-ties, with `drop` P): keep each stored value with probability 1−P, rescale the
  kept ones by 1/(1−P); the random stream is derived from (seed, operand position, parameter
  name as the result spells it), so it does not depend on which other entries exist or the
  order they are computed in;
- sum, dare: Σ wᵢ·vᵢ;
- ties, dare-ties: the elected sign is +1 where Σ wᵢ·vᵢ ≥ 0, else −1; the result is
  Σ wᵢ·vᵢ / Σ wᵢ over the entries whose wᵢ·vᵢ has the elected sign (0 where none does);
- then × `scale` (λ). Accumulation is in float64, rounded once to the output dtype.

Dense entries are replacement values, not deltas: they are never trimmed, dropped, weighted or
scaled. They follow the composition rule of `apply`: the last operand with a dense value for a
parameter wins, and only the sparse entries of the operands after it are merged (by the method)
and added onto it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Sequence

import numpy as np

from . import algebra
from .algebra import (LazyEntries, agreed_user_fields, dense_from_f64, merged_config_patch, output_dtype,
                      sparse_from_f64)
from .compose import last_dense
from .compose import _warn as _default_warn
from .diff import DenseEntry, Entry, SparseDiff, SparseEntry
from .errors import UsageError
from .select import per_tensor_count, select_topk

METHODS = ("sum", "ties", "dare", "dare-ties")
_TRIMS = ("ties",)
_DROPS = ("dare", "dare-ties")
_ELECTS = ("ties", "dare-ties")


# -- the per-parameter arithmetic (pure) -----------------------------------------------------------


def trim_positions(magnitudes: np.ndarray, density: float) -> np.ndarray:
    """Sorted positions of the round-half-up(density·n) largest of n stored magnitudes."""
    return select_topk(magnitudes, per_tensor_count(len(magnitudes), density))


def keep_mask(seed: int, name: str, operand: int, count: int, drop: float) -> np.ndarray:
    """DARE's draw for `count` stored values of parameter `name` in operand `operand`: True where kept.

    Each value is kept when its uniform draw in [0, 1) is ≥ `drop` (probability 1 − drop). The
    stream is seeded by (seed, operand, SHA-256 of the name), so a parameter's draw is the same
    whatever else the diffs contain and whatever order entries are computed in.
    """
    digest = np.frombuffer(hashlib.sha256(name.encode("utf-8")).digest(), dtype="<u4")
    sequence = np.random.SeedSequence([int(seed), int(operand), *(int(x) for x in digest)])
    return np.random.Generator(np.random.PCG64(sequence)).random(count) >= drop


def merge_values(parts: Sequence[tuple[np.ndarray, np.ndarray, float]], elect: bool,
                 scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Merge (indices, float64 values, weight) per operand, in operand order: sorted union of the
    indices and, at each, Σ wᵢ·vᵢ (elect=False) or TIES' disjoint mean (elect=True), × scale.

    Sums are accumulated in operand order (a stable sort), as `algebra.sum_by_index` does, so the
    weighted sum is bit-identical to `add`'s.
    """
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    indices = np.concatenate([np.asarray(i, dtype=np.int64) for i, _, _ in parts])
    weighted = np.concatenate([np.asarray(v, dtype=np.float64) * w for _, v, w in parts])
    weights = np.concatenate([np.full(len(v), w, dtype=np.float64) for _, v, w in parts])
    order = np.argsort(indices, kind="stable")
    indices, weighted, weights = indices[order], weighted[order], weights[order]
    if not len(indices):
        return indices, weighted
    first = np.concatenate(([True], indices[1:] != indices[:-1]))
    starts = np.flatnonzero(first)
    total = np.add.reduceat(weighted, starts)
    if elect:
        group = np.cumsum(first) - 1
        elected = np.where(total >= 0, 1.0, -1.0)  # a zero sum elects +, as mergekit does
        agree = np.sign(weighted) == elected[group]
        numerator = np.add.reduceat(np.where(agree, weighted, 0.0), starts)
        denominator = np.add.reduceat(np.where(agree, weights, 0.0), starts)
        safe = np.where(denominator != 0, denominator, 1.0)
        total = np.where(denominator != 0, numerator / safe, 0.0)
    if scale != 1.0:
        total = total * scale
    return indices[starts], total


# -- arguments -------------------------------------------------------------------------------------


def _validate(method: str, count: int, weights: Sequence[float] | None, density: float | None,
              drop: float | None, seed: int, scale: float) -> list[float]:
    if method not in METHODS:
        raise UsageError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if count < 1:
        raise UsageError("merge needs at least one diff")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise UsageError(f"{len(weights)} weights for {count} diffs; give one weight per diff")
    if not all(math.isfinite(w) for w in weights):
        raise UsageError("weights must be finite numbers")
    if method in _ELECTS and any(w < 0 for w in weights):
        raise UsageError(f"--method {method} takes a weighted mean, so weights must be >= 0; "
                         f"negate a diff with `sftdiff scale DIFF -1` instead")
    if density is not None:
        if method not in _TRIMS:
            raise UsageError(f"--density trims values for --method ties only, not {method}"
                             + ("; DARE drops at random, give --drop P" if method in _DROPS else ""))
        if not (math.isfinite(density) and 0 < density <= 1):
            raise UsageError("--density must be in (0, 1]")
    if method in _DROPS:
        if drop is None:
            raise UsageError(f"--method {method} needs --drop P, the probability of dropping each value (0 <= P < 1)")
        if not (math.isfinite(drop) and 0 <= drop < 1):
            raise UsageError("--drop must be in [0, 1)")
    elif drop is not None:
        raise UsageError(f"--drop applies to --method dare and dare-ties only, not {method}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {seed!r}")
    if not math.isfinite(scale):
        raise UsageError("--scale must be a finite number")
    return weights


# -- merge -----------------------------------------------------------------------------------------


def merge(*diffs: SparseDiff, method: str = "ties", weights: Sequence[float] | None = None,
          density: float | None = None, drop: float | None = None, seed: int = 0, scale: float = 1.0,
          dtype: str | None = None, ignore_base: bool = False, warn: Callable[[str], None] | None = None) -> SparseDiff:
    """Merge diffs of one base into one lazy diff with `method` (sum, ties, dare, dare-ties).

    `weights` (default all 1) weight each diff; `density` trims each diff's stored values per
    parameter to that fraction (ties; none when not given); `drop` is DARE's drop probability,
    drawn from `seed`; `scale` (λ) multiplies the merged deltas. Dense entries follow the
    composition rule (see the module docstring); overwritten entries and config keys set
    differently are reported through `warn` (default: a `compose.CompositionWarning`). Operands
    are aligned by parameter across the base-model prefix (`algebra.align`); operands recording
    different bases are refused unless `ignore_base`.
    """
    weights = _validate(method, len(diffs), weights, density, drop, seed, float(scale))
    scale = float(scale)
    warn = warn or _default_warn
    labels, al, replaced = algebra.plan_stack(diffs, "last", ignore_base=ignore_base, warn=warn)  # as add
    out_dtype = output_dtype(diffs, dtype)
    trim = density if method in _TRIMS and density is not None and density < 1 else None
    elect = method in _ELECTS

    def operand_values(name: str, i: int, entry: SparseEntry) -> tuple[np.ndarray, np.ndarray, float]:
        indices, values = np.asarray(entry.indices, dtype=np.int64), algebra._f64(entry)
        if trim is not None:
            keep = trim_positions(np.abs(entry.values_f32()), trim)
            indices, values = indices[keep], values[keep]
        if method in _DROPS and drop:
            keep = keep_mask(seed, name, i, len(values), drop)
            indices, values = indices[keep], values[keep] / (1.0 - drop)
        return indices, values, weights[i]

    def compute(name: str) -> Entry | None:
        held = [(i, diffs[i].entries[n]) for i, n in al.names[name]]
        last = last_dense(["dense" if isinstance(e, DenseEntry) else "sparse" for _, e in held])
        sparse = held if last is None else held[last + 1:]
        parts = [operand_values(name, i, e) for i, e in sparse]
        indices, values = merge_values(parts, elect, scale)
        if last is None:
            first = held[0][1]
            return sparse_from_f64(name, first.shape, indices, values, out_dtype, first.base_dtype)
        chosen = held[last][1]
        if not len(indices):
            return chosen
        total = algebra._f64(chosen).copy()
        total[indices] += values
        base_dtype = next((e.base_dtype for _, e in held[last:] if e.base_dtype is not None), None)
        return dense_from_f64(name, total.reshape(chosen.shape), chosen.dtype, base_dtype)

    params: dict[str, Any] = {"method": method, "weights": weights,
                              "density": density if method in _TRIMS else None,
                              "drop": drop if method in _DROPS else None,
                              "seed": int(seed) if method in _DROPS else None,
                              "scale": scale, "dtype": out_dtype}
    config = merged_config_patch(diffs, labels, warn=warn)
    meta = algebra._meta(diffs, labels, "merge", params, agreed_user_fields(diffs), config, al, replaced)
    # origin.method names the operation (as for add, prune...); the merge method is its own key.
    meta.origin["method"] = "merge"
    meta.origin["merge_method"] = method
    return SparseDiff(LazyEntries(list(al.names), compute), meta)


__all__ = ["METHODS", "merge", "merge_values", "keep_mask", "trim_positions"]
