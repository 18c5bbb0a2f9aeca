"""Pictures of diffs: density per layer and module type, and overlap per layer (PNG, matplotlib Agg).

Layers and module types are read from parameter names in the BERT/XLM-R (`encoder.layer.3.
attention.self.query.weight`), Llama (`model.layers.3.self_attn.q_proj.weight`) and GPT-2
(`h.3.attn.c_attn.weight`) styles; parameters outside any layer (embeddings, final norm, head)
form the row "no layer". matplotlib is optional (`pip install 'sftdiff[plot]'`); it is imported
only here, without pyplot, so no global backend is changed.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Iterable

import numpy as np

from .atomic import atomic_path
from .diff import SparseDiff
from .errors import SftError, UsageError

NO_LAYER = "no layer"
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")
# (module type, pattern), tried in order on the name; the first match wins.
MODULE_PATTERNS: list[tuple[str, re.Pattern[str]]] = [(m, re.compile(p)) for m, p in [
    ("layernorm", r"(?i)(layernorm|layer_norm|(^|\.)ln_\w*|(^|\.)norm\.|_norm\.)"),
    ("embeddings", r"(embeddings\.|embed_tokens|(^|\.)wte\.|(^|\.)wpe\.|shared\.)"),
    ("query", r"(\.query\.|q_proj)"),
    ("key", r"(\.key\.|k_proj)"),
    ("value", r"(\.value\.|v_proj)"),
    ("qkv", r"(c_attn|qkv_proj|query_key_value|Wqkv)"),
    ("attn-out", r"(attention\.output\.dense|o_proj|attn\.c_proj|out_proj|attention\.dense)"),
    ("ffn-in", r"(intermediate\.dense|gate_proj|up_proj|c_fc|fc1|dense_h_to_4h|\.w1\.|\.w3\.)"),
    ("ffn-out", r"(output\.dense|down_proj|mlp\.c_proj|fc2|dense_4h_to_h|\.w2\.)"),
    ("head", r"(lm_head|classifier|(^|\.)cls\.|pooler|qa_outputs|(^|\.)score\.|head)"),
]]
MODULE_ORDER = ["embeddings", "query", "key", "value", "qkv", "attn-out", "ffn-in", "ffn-out",
                "layernorm", "head", "other"]


def layer_of(name: str) -> int | None:
    """The transformer layer a parameter belongs to, or None (embeddings, head, final norm)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_of(name: str) -> str:
    """The module type of a parameter (`query`, `ffn-in`, ... or `other`)."""
    for module, pattern in MODULE_PATTERNS:
        if pattern.search(name):
            return module
    return "other"


def row_label(layer: int | None) -> str:
    return NO_LAYER if layer is None else str(layer)


def density_grid(counts: Iterable[tuple[str, int, int]]) -> tuple[list[str], list[str], np.ndarray]:
    """(row labels, module columns, density matrix with NaN where no parameter falls) from
    (name, nonzeros, numel) triples; rows are "no layer" then layers in order."""
    nnz: dict[tuple[int | None, str], int] = {}
    numel: dict[tuple[int | None, str], int] = {}
    for name, count, size in counts:
        key = (layer_of(name), module_of(name))
        nnz[key] = nnz.get(key, 0) + count
        numel[key] = numel.get(key, 0) + size
    layers = sorted({k[0] for k in numel}, key=lambda x: -1 if x is None else x)
    modules = [m for m in MODULE_ORDER if any(k[1] == m for k in numel)]
    grid = np.full((len(layers), len(modules)), np.nan)
    for (layer, module), size in numel.items():
        grid[layers.index(layer), modules.index(module)] = nnz[(layer, module)] / size if size else 0.0
    return [row_label(x) for x in layers], modules, grid


MISSING_MATPLOTLIB = "--plot needs matplotlib, which is not installed; install it with: pip install 'sftdiff[plot]'"


def require_matplotlib() -> None:
    """Raise `UsageError` (exit 2) unless matplotlib can be imported: commands call this before
    any work, so a missing optional dependency is one line, not a failure after the results."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(MISSING_MATPLOTLIB) from None


def _figure(width: float, height: float) -> Any:
    require_matplotlib()
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(MISSING_MATPLOTLIB) from None
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> None:
    """Written atomically; an existing picture at `path` is replaced."""
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format="png")


def plot_density(diff: SparseDiff, path: str | os.PathLike) -> None:
    """Heatmap of density (nonzeros / numel) per layer × module type; dense entries count as 1."""
    counts = [(i.name, i.nnz, math.prod(i.shape)) for i in diff.infos()]
    if not counts:
        raise SftError(f"{diff.path or 'the diff'} has no entries; there is nothing to plot")
    rows, modules, grid = density_grid(counts)
    fig = _figure(1.6 + 0.95 * len(modules), 1.6 + 0.32 * len(rows))
    ax = fig.add_subplot()
    finite = grid[np.isfinite(grid) & (grid > 0)]
    norm = None
    if finite.size and finite.max() / finite.min() > 20:
        from matplotlib.colors import LogNorm

        norm = LogNorm(vmin=finite.min(), vmax=finite.max())
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")  # grey: no parameter of that kind
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    if len(rows) <= 48:
        _annotate(ax, grid, image)
    total_nnz = sum(c for _, c, _ in counts)
    total_numel = sum(n for _, _, n in counts)
    name = os.path.basename(diff.path) if diff.path else "diff"
    overall = total_nnz / total_numel if total_numel else 0.0
    ax.set_title(f"{name}: density per layer and module ({100 * overall:.3g}% of touched tensors)",
                 fontsize=9)
    from matplotlib.ticker import PercentFormatter

    fig.colorbar(image, ax=ax, label="density (nonzeros / values)", format=PercentFormatter(1.0, decimals=None))
    _save(fig, path)


def _annotate(ax: Any, grid: np.ndarray, image: Any) -> None:
    for r, c in zip(*np.nonzero(np.isfinite(grid))):
        value = grid[r, c]
        rgba = image.cmap(image.norm(value)) if value > 0 else image.cmap(0.0)
        light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
        text = f"{100 * value:.0f}%" if value >= 0.1 else f"{100 * value:.2g}%"
        ax.text(c, r, text, ha="center", va="center", fontsize=7,
                color="black" if light else "white")


def plot_overlap(report: Any, path: str | os.PathLike) -> None:
    """Per layer: Jaccard index and overlap relative to each side (top), cosine similarity and
    sign agreement on the shared indices (bottom). `report` is an `overlap.OverlapReport`."""
    from .overlap import total

    groups: dict[int | None, list[Any]] = {}
    for row in report.tensors:
        groups.setdefault(layer_of(row.name), []).append(row)
    if not groups:
        raise SftError("the diffs have no sparse entries; there is nothing to plot")
    layers = sorted(groups, key=lambda x: -1 if x is None else x)
    rows = [total(row_label(x), groups[x]) for x in layers]
    labels = [r.name for r in rows]
    x = np.arange(len(rows))
    fig = _figure(max(6.0, 1.5 + 0.3 * len(rows)), 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True)

    def series(attr: str, scale: float = 1.0) -> np.ndarray:
        return np.array([np.nan if getattr(r, attr) is None else scale * getattr(r, attr) for r in rows])

    for attr, label, marker in (("jaccard", "Jaccard", "o"), ("overlap_a", "shared / A", "^"),
                                ("overlap_b", "shared / B", "v")):
        top.plot(x, series(attr, 100), marker=marker, label=label)
    top.set_ylabel("% of indices")
    top.set_ylim(0, 105)
    top.legend(fontsize=8, loc="best")
    top.grid(alpha=0.3)
    a, b = (os.path.basename(str(s)) for s in (report.a, report.b))
    top.set_title(f"overlap per layer: A = {a}, B = {b}", fontsize=9)
    bottom.plot(x, series("cosine"), marker="o", label="cosine on shared")
    bottom.plot(x, series("sign_agreement"), marker="s", label="sign agreement")
    bottom.axhline(0, color="grey", linewidth=0.8)
    bottom.set_ylim(-1.05, 1.05)
    bottom.set_ylabel("on shared indices")
    bottom.legend(fontsize=8, loc="best")
    bottom.grid(alpha=0.3)
    bottom.set_xticks(x, labels, rotation=90 if len(rows) > 30 else 0)
    bottom.set_xlabel("layer")
    _save(fig, path)
