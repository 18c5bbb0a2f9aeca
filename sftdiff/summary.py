"""What `sftdiff inspect` reports: a JSON-ready summary of a diff, and its text rendering."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .diff import SparseDiff, SparseEntry
from .format import FORMAT_VERSION


def summarize(diff: SparseDiff, base_numel: int | None = None) -> dict[str, Any]:
    """Header fields, totals and per-tensor statistics (reads each entry's values once).

    `base_numel` (the base's total parameter count) gives the density relative to the whole
    model; without it the count recorded at creation (`base.numel`) is used if present.
    """
    rows = []
    nnz = touched = dense_numel = 0
    for name in diff.entries:
        entry = diff.entries[name]
        values = entry.values_f32().reshape(-1)
        sparse = isinstance(entry, SparseEntry)
        count = entry.nnz if sparse else entry.numel
        rows.append({
            "name": name,
            "kind": "sparse" if sparse else "dense",
            "shape": list(entry.shape),
            "nnz": count,
            "density": count / entry.numel if entry.numel else 0.0,
            "l2": float(np.sqrt(np.dot(values.astype(np.float64), values.astype(np.float64)))),
            "max_abs": float(np.abs(values).max()) if values.size else 0.0,
            "dtype": entry.dtype,
            "base_dtype": entry.base_dtype,
        })
        if sparse:
            nnz += entry.nnz
            touched += entry.numel
        else:
            dense_numel += entry.numel
    base_numel = base_numel if base_numel is not None else diff.meta.base.get("numel")
    size = os.path.getsize(diff.path) if diff.path and os.path.isfile(diff.path) else None
    return {
        "file": diff.path,
        "file_size": size,
        "format_version": FORMAT_VERSION,
        "base": diff.meta.base,
        "origin": diff.meta.origin,
        "user": diff.meta.user,
        "config_patch": diff.meta.config_patch,
        "provenance": diff.meta.provenance,
        "totals": {
            "entries": len(rows),
            "sparse_entries": sum(r["kind"] == "sparse" for r in rows),
            "dense_entries": sum(r["kind"] == "dense" for r in rows),
            "nnz": nnz,
            "dense_values": dense_numel,
            "touched_numel": touched,
            "density_touched": nnz / touched if touched else 0.0,
            "base_numel": base_numel,
            "density_base": nnz / base_numel if base_numel else None,
            "bytes_per_nonzero": size / nnz if size and nnz else None,
        },
        "tensors": rows,
    }


def _num(n: float | int | None) -> str:
    if n is None:
        return "-"
    if isinstance(n, int):
        return f"{n:,}"
    if n == 0 or 1e-3 <= abs(n) < 1e5:
        return f"{n:.4g}"
    return f"{n:.3e}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.4g}%"


def human_size(n: int | None) -> str:
    """Bytes as `812 B`, `22.6 KiB`, `1.9 GiB` (binary units)."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def render(summary: dict[str, Any], limit: int | None = None) -> str:
    """The human-readable report: header, totals, then one row per tensor."""
    t = summary["totals"]
    base = summary["base"]
    lines = [f"file:        {summary['file'] or '(in memory)'}  ({human_size(summary['file_size'])})",
             f"format:      sft {summary['format_version']}",
             f"base:        {base.get('hint') or '-'}  fingerprint {base.get('fingerprint') or '-'}"]
    origin = summary["origin"]
    if origin:
        lines.append("made by:     " + ", ".join(f"{k}={v}" for k, v in origin.items() if not isinstance(v, (dict, list))))
    for key, value in summary["user"].items():
        lines.append(f"{key + ':':<13}{value}")
    if summary["config_patch"]:
        lines.append("config:      patches " + ", ".join(sorted(summary["config_patch"])))
    if summary["provenance"]:
        lines.append(f"provenance:  {summary['provenance'].get('operation', '?')}")
    lines.append(
        f"entries:     {t['entries']} ({t['sparse_entries']} sparse, {t['dense_entries']} dense)   "
        f"nonzeros: {_num(t['nnz'])}   dense values: {_num(t['dense_values'])}"
    )
    lines.append(
        f"density:     {_pct(t['density_touched'])} of the {_num(t['touched_numel'])} values of the tensors it touches; "
        f"{_pct(t['density_base'])} of the base ({_num(t['base_numel'])})"
    )
    lines.append(f"bytes/nnz:   {_num(t['bytes_per_nonzero'])}")
    rows = summary["tensors"]
    shown = rows if limit is None else rows[:limit]
    if shown:
        head = ("name", "kind", "shape", "nnz", "density", "L2", "max|v|", "dtype")
        table = [head] + [(r["name"], r["kind"], "x".join(map(str, r["shape"])) or "()", _num(r["nnz"]),
                           _pct(r["density"]), _num(r["l2"]), _num(r["max_abs"]), r["dtype"]) for r in shown]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines.append("")
        for row in table:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
            lines.append("  ".join(cells).rstrip())
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more (use --all)")
    return "\n".join(lines)


def json_safe(obj: Any) -> Any:
    """Replace non-finite floats (never expected, but JSON has no spelling for them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj
