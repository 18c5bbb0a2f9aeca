"""How much two diffs of one base overlap: shared indices and agreement of their values there.

Used for interference analysis (does a task SFT touch what a language SFT touches, and pull the
same way?). Per tensor and in total: shared indices, Jaccard index, the shared part relative to
each side, cosine similarity and sign agreement of the values on the shared indices, and each
side's L2 norm there. Ratios that would divide by zero are None. Dense entries are not compared
(they are listed in `dense_skipped`). Memory: one tensor's entries at a time. Entries are matched
by parameter across the base-model prefix (`algebra.align`), and reported as A spells them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import numpy as np

from .algebra import align, check_same_base, check_sparse_shapes, label_of
from .diff import SparseDiff, SparseEntry


@dataclass(frozen=True)
class OverlapCounts:
    """Additive statistics of two index sets with values; ratios derive from them."""

    name: str
    nnz_a: int = 0
    nnz_b: int = 0
    shared: int = 0
    dot: float = 0.0  # Σ a·b over shared indices
    sq_a: float = 0.0  # Σ a² over shared indices
    sq_b: float = 0.0
    same_sign: int = 0

    @property
    def union(self) -> int:
        return self.nnz_a + self.nnz_b - self.shared

    @property
    def jaccard(self) -> float | None:
        return _ratio(self.shared, self.union)

    @property
    def overlap_a(self) -> float | None:
        """Fraction of A's indices that B shares."""
        return _ratio(self.shared, self.nnz_a)

    @property
    def overlap_b(self) -> float | None:
        return _ratio(self.shared, self.nnz_b)

    @property
    def cosine(self) -> float | None:
        denom = math.sqrt(self.sq_a) * math.sqrt(self.sq_b)
        return max(-1.0, min(1.0, self.dot / denom)) if denom > 0 else None

    @property
    def sign_agreement(self) -> float | None:
        return _ratio(self.same_sign, self.shared)

    @property
    def norm_a_shared(self) -> float:
        return math.sqrt(self.sq_a)

    @property
    def norm_b_shared(self) -> float:
        return math.sqrt(self.sq_b)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("dot", "sq_a", "sq_b", "same_sign")}
        for key in ("union", "jaccard", "overlap_a", "overlap_b", "cosine", "sign_agreement",
                    "norm_a_shared", "norm_b_shared"):
            out[key] = getattr(self, key)
        return out


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def total(name: str, rows: Iterable[OverlapCounts]) -> OverlapCounts:
    """The sums of `rows`' additive statistics, under `name`."""
    acc = dict(nnz_a=0, nnz_b=0, shared=0, dot=0.0, sq_a=0.0, sq_b=0.0, same_sign=0)
    for row in rows:
        for key in acc:
            acc[key] += getattr(row, key)
    return OverlapCounts(name, **acc)


def entry_overlap(name: str, a: SparseEntry | None, b: SparseEntry | None) -> OverlapCounts:
    """Statistics of one parameter's sparse entries (None: that side does not touch it)."""
    if a is None or b is None:
        return OverlapCounts(name, nnz_a=a.nnz if a else 0, nnz_b=b.nnz if b else 0)
    _, pos_a, pos_b = np.intersect1d(np.asarray(a.indices), np.asarray(b.indices),
                                     assume_unique=True, return_indices=True)
    va = a.values_f32()[pos_a].astype(np.float64)
    vb = b.values_f32()[pos_b].astype(np.float64)
    return OverlapCounts(
        name, nnz_a=a.nnz, nnz_b=b.nnz, shared=len(pos_a), dot=float(np.dot(va, vb)),
        sq_a=float(np.dot(va, va)), sq_b=float(np.dot(vb, vb)), same_sign=int(np.count_nonzero((va > 0) == (vb > 0))),
    )


@dataclass
class OverlapReport:
    """Per-tensor rows (names in code point order), their total, and the dense entries left out."""

    a: str
    b: str
    tensors: list[OverlapCounts]
    total: OverlapCounts
    dense_skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "total": self.total.to_json(),
                "tensors": [row.to_json() for row in self.tensors], "dense_skipped": self.dense_skipped}

    def render(self, limit: int | None = 50) -> str:
        """A table: one row per tensor touched by both sides (all rows with limit=None), then the total."""
        head = ("name", "nnz A", "nnz B", "shared", "jaccard", "of A", "of B", "cosine", "sign=", "|A|sh", "|B|sh")
        shown = [r for r in self.tensors if r.nnz_a and r.nnz_b]
        hidden = 0 if limit is None else max(0, len(shown) - limit)
        shown = shown if limit is None else shown[:limit]
        table = [head] + [_cells(r) for r in shown] + [_cells(self.total)]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = [f"A: {self.a}", f"B: {self.b}", ""]
        for i, row in enumerate(table):
            if i == len(table) - 1:
                lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
            lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip())
        only_a = sum(1 for r in self.tensors if r.nnz_a and not r.nnz_b)
        only_b = sum(1 for r in self.tensors if r.nnz_b and not r.nnz_a)
        lines.append(f"tensors only in A: {only_a}, only in B: {only_b}"
                     + (f"; {hidden} more shared tensors (use --all)" if hidden else ""))
        if self.dense_skipped:
            lines.append(f"dense entries not compared: {', '.join(self.dense_skipped)}")
        return "\n".join(lines)


def _cells(r: OverlapCounts) -> tuple[str, ...]:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.3g}%"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    return (r.name, f"{r.nnz_a:,}", f"{r.nnz_b:,}", f"{r.shared:,}", pct(r.jaccard), pct(r.overlap_a),
            pct(r.overlap_b), num(r.cosine), pct(r.sign_agreement), num(r.norm_a_shared), num(r.norm_b_shared))


def overlap(a: SparseDiff, b: SparseDiff, *, ignore_base: bool = False) -> OverlapReport:
    """Compare two diffs of the same base (refused otherwise, unless `ignore_base`)."""
    labels = [label_of(a, 0), label_of(b, 1)]
    al = align([a, b], labels)
    if not ignore_base:
        check_same_base([a, b], labels, al)
    check_sparse_shapes([a, b], labels, al)
    rows, dense = [], []
    for name in sorted(al.names):
        held = dict(al.names[name])
        infos = {i: (a, b)[i].info(n) for i, n in held.items()}
        if any(info.kind == "dense" for info in infos.values()):
            dense.append(name)
            continue
        rows.append(entry_overlap(name, a.entries[held[0]] if 0 in held else None,
                                  b.entries[held[1]] if 1 in held else None))
    return OverlapReport(labels[0], labels[1], rows, total("(total)", rows), dense)


__all__ = ["overlap", "OverlapReport", "OverlapCounts", "entry_overlap", "total"]
