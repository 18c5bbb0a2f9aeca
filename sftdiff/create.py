"""Base + fully fine-tuned checkpoint → exact top-k `SparseDiff` (LT-SFT's first phase).

One pass over the data, so memory stays at a few slices per thread plus O(k) whatever the model
size. The scan computes |Δ| = |fine-tune − base| in float32, slice by slice in a few threads, and
offers the positions reaching the current floor to `select.TopK`, tensor by tensor in name order,
together with both checkpoints' raw values there. A tensor's TopK rank is its position in that
order, so TopK's rule "magnitude desc, rank asc, index asc" is exactly the spec's tie rule
"magnitude desc, name asc, flat index asc". The stored values of the k selected positions are then
computed from the raw values that came along (`exact_deltas`), so nothing is read twice and the
whole delta is never held.

Which parameters become what (`plan_entries`): float parameters present in both with the same
shape are selectable (sparse); parameters only the fine-tune has, or whose shape changed, travel
as dense replacements (with a warning), as do those named by `dense` globs; integer and bool
buffers (position ids, ...) are never deltas and are skipped; `include`/`exclude` rule parameters
out entirely. Names are stored as the base spells them (`names.NameMap`).

`include`/`exclude` globs choose among the base's parameters. Parameters only the fine-tune has (a
new head) are not theirs to drop: without them the applied model re-initializes that head. So a
glob that matches any base parameter (`*LayerNorm*`) leaves them alone; only an `exclude` glob that
matches no base parameter, i.e. one written for the new parameters (`cls.*` on a bare base),
drops them, and every parameter dropped that way is reported. Whether a base and a fine-tune are
related is judged on all their parameters, before any glob applies.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from . import __version__
from . import format as fmt
from . import device_scan, kernels
from .checkpoint import Checkpoint
from .diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from .dtypes import FLOAT_DTYPES, from_float32, to_float32, to_float64, value_dtype
from .errors import FormatError, SftError, UsageError, VerificationError
from .fingerprint import base_record, record_as_made_from
from .names import NameMap, matches_any
from .progress import progress_bar
from .select import TopK, per_tensor_count

SCOPES = ("global", "per-tensor")
# Elements per numpy pass of the scan: big enough that Python's per-call overhead is small against
# numpy's work, small enough that a slice's buffers stay in the CPU caches.
SLICE = 1 << 17
# Elements per scan task handed to a worker thread (a whole number of slices).
TASK = 1 << 22
# Worker threads of the scan and of the values; numpy releases the GIL in the loops that matter.
WORKERS = max(1, min(4, os.cpu_count() or 1))
# Tensors the scan asks the kernel to read ahead of the one it scans (`Checkpoint.read_ahead`).
READ_AHEAD = 2
# config.json fields that differ between any two saves and say nothing about the model.
CONFIG_NOISE = frozenset({"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash",
                          "_attn_implementation_autoset"})
F16_MAX = 65504.0
# Values from which a missing compiled scan (`kernels.built()`) is worth a warning: ~1 s of numpy.
NOTE_SLOW_SCAN_FROM = 1 << 28


class CreateWarning(UserWarning):
    """Something the user should know about a created diff (a new head stored densely, ...)."""


@dataclass(frozen=True)
class Pair:
    """A parameter as stored in the diff (`name`, as the base spells it) and in the fine-tune."""

    name: str
    source: str
    reason: str = ""  # for dense entries: "new", "resized" or "requested"


@dataclass
class Plan:
    sparse: list[Pair] = field(default_factory=list)  # sorted by name
    dense: list[Pair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prefix: tuple[str, str] = ("", "")  # (added, removed): see names.NameMap


def create_diff(base: Any, finetuned: Any, *, k: int | None = None, density: float | None = None,
                scope: str = "global", include: Sequence[str] = (), exclude: Sequence[str] = (),
                dense: Sequence[str] = (), dtype: str = "F32", user: dict | None = None,
                progress: bool = False, base_checkpoint: Any = None, device: str | None = None) -> SparseDiff:
    """The top-k (or top-`density`) difference `finetuned − base` as an unsaved `SparseDiff`.

    `base`/`finetuned`: a checkpoint path, a `Checkpoint`, or an in-memory state dict. Warnings
    (dense entries made because the fine-tune added or resized a parameter, base parameters the
    fine-tune lacks) are issued as `CreateWarning`. `base_checkpoint` (a path or `Checkpoint`):
    the checkpoint in-memory `base` tensors came from (perhaps only some of its tensors); the diff
    then records its fingerprint and digests and spells names as it does. `device` ("cpu", "cuda",
    "cuda:N", "auto"): the scan runs with torch there (`device_scan`); the diff is the same.
    """
    stored_dtype = value_dtype(dtype)
    check_budget(k, density, scope)
    if device is not None:  # refuse an unusable device before any work
        device_scan.resolve(device)
    base_ckpt, base_hint = _checkpoint(base)
    ft_ckpt, ft_hint = _checkpoint(finetuned)
    plan = plan_entries(base_ckpt, ft_ckpt, include=include, exclude=exclude, dense=dense)
    for note in plan.notes:
        warnings.warn(note, CreateWarning, stacklevel=2)

    numels = [ft_ckpt.tensors[p.source].numel for p in plan.sparse]
    selectable = sum(numels)
    if k is not None and k > selectable:  # a budget above everything there is: all of it, said once
        warnings.warn(f"k={k:,} is more than the {selectable:,} selectable values; keeping every changed value "
                      "(density 100%)", CreateWarning, stacklevel=2)
        k = selectable
    if density is not None:
        fraction = float(density)
    else:
        fraction = k / selectable if selectable else 0.0
    if scope == "global":
        counts = [k if k is not None else per_tensor_count(selectable, fraction)]
    else:
        counts = [per_tensor_count(n, fraction) for n in numels]
    budget = counts[0] if scope == "global" else counts
    if device is None and selectable >= NOTE_SLOW_SCAN_FROM and not kernels.built():
        warnings.warn("sftdiff's compiled scan is not installed (no C compiler when sftdiff was installed): "
                      "numpy scans instead, with the same result, about twice as slow; reinstall sftdiff where a C "
                      "compiler is available to get it", CreateWarning, stacklevel=2)
    hint = estimated_floor(base_ckpt, ft_ckpt, plan.sparse, counts[0], selectable) if scope == "global" else 0.0
    chosen = select(base_ckpt, ft_ckpt, plan.sparse, budget, floor=hint, progress=progress, device=device)
    selected = sum(len(c.indices) for c in chosen.values())
    if hint > 0 and selected < counts[0]:  # the estimate was too high: select again without it
        chosen = select(base_ckpt, ft_ckpt, plan.sparse, budget, progress=progress, device=device)
        selected = sum(len(c.indices) for c in chosen.values())

    entries: dict[str, SparseEntry | DenseEntry] = {}
    pairs = [p for p in plan.sparse if p.name in chosen]
    with ThreadPoolExecutor(WORKERS) as pool:  # map keeps the order: entries come out as one thread makes them
        made = pool.map(lambda pair: sparse_entry(base_ckpt, ft_ckpt, pair, chosen.pop(pair.name), stored_dtype),
                        pairs)
        for pair, entry in zip(pairs, made):
            if entry is not None:
                entries[pair.name] = entry
    for pair in plan.dense:
        entries[pair.name] = dense_entry(base_ckpt, ft_ckpt, pair)

    if base_checkpoint is not None:
        entries, made_from = record_as_made_from(base_checkpoint, base_ckpt, entries)
    else:
        made_from = base_record(base_ckpt, sorted(n for n in entries if n in base_ckpt.tensors), base_hint)
    meta = DiffMeta(
        base=made_from,
        origin={
            "tool": f"sftdiff {__version__}", "method": "topk", "scope": scope,
            "k": int(sum(counts)), "nnz": sum(e.nnz for e in entries.values() if isinstance(e, SparseEntry)),
            "density": fraction, "selectable_numel": selectable, "selected": selected,
            "source": ft_hint, "dtype": stored_dtype,
            "include": list(include), "exclude": list(exclude), "dense": list(dense),
            "name_prefix": {"added": plan.prefix[0], "removed": plan.prefix[1]},
        },
        user=dict(user or {}),
        config_patch=config_patch(base_ckpt.config, ft_ckpt.config),
    )
    return SparseDiff(entries, meta)


create = create_diff


# ---------------------------------------------------------------- options and inputs


def check_budget(k: int | None, density: float | None, scope: str, *, cli: bool = False) -> None:
    """Refuse a budget that is not exactly one of k ≥ 0 and density in (0, 1] (`cli`: name the options)."""
    k_name, d_name = ("-k", "--density") if cli else ("k", "density")
    if (k is None) == (density is None):
        raise UsageError("give exactly one of k (-k N) or density (--density D)")
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0):
        raise UsageError(f"{k_name} must be a non-negative integer, got {k!r}")
    if density is not None and not 0 < density <= 1:
        raise UsageError(f"{d_name} must be in (0, 1], got {density!r}; e.g. {d_name} 0.01 keeps 1% of the values")
    if scope not in SCOPES:
        raise UsageError(f"unknown scope {scope!r}; use 'global' or 'per-tensor'")



def _checkpoint(source: Any) -> tuple[Checkpoint, str | None]:
    """The checkpoint and the hint recorded for it (the path as given)."""
    if isinstance(source, Checkpoint):
        return source, source.hint
    if isinstance(source, (str, os.PathLike)):
        return Checkpoint.open(source), os.fspath(source)
    if isinstance(source, Mapping):
        return Checkpoint.from_state_dict(source), None
    raise TypeError(f"expected a checkpoint path, a Checkpoint or a state dict, got {type(source).__name__}")


def plan_entries(base: Checkpoint, ft: Checkpoint, *, include: Sequence[str] = (), exclude: Sequence[str] = (),
                 dense: Sequence[str] = ()) -> Plan:
    """Decide, from headers alone, which parameters are selectable, dense or skipped."""
    name_map = NameMap(base.tensors, ft.tensors)
    mapping = name_map.lookup(ft.tensors)
    added, removed = name_map.added, name_map.stripped
    plan = Plan(prefix=(added, removed))
    ft_copies = ft.tied_copies(keep=lambda n: mapping.get(n) is not None)
    base_copies = base.tied_copies()

    def allowed(name: str) -> bool:
        return (not include or matches_any(name, include)) and not matches_any(name, exclude)

    base_names = [n for n, t in base.tensors.items() if t.dtype in FLOAT_DTYPES and n not in base_copies]
    new_only = [g for g in exclude if not any(matches_any(n, [g]) for n in base_names)]  # globs for new params

    new, resized, claimed, dropped_new, matched = [], [], {}, [], []
    for source in sorted(ft.tensors):
        t = ft.tensors[source]
        if t.dtype not in FLOAT_DTYPES or source in ft_copies:
            continue  # integer/bool buffers are never trained; a tied copy is its twin
        target = mapping.get(source)
        name = target if target is not None else _strip(source, added)
        if name in claimed:
            raise VerificationError(f"fine-tune tensors {claimed[name]!r} and {source!r} both map to {name!r}; "
                                    "the checkpoint mixes prefixed and unprefixed copies of a parameter")
        claimed[name] = source
        b = base.tensors.get(target) if target is not None else None
        if b is not None:
            matched.append(Pair(name, source))
        if matches_any(name, dense):
            plan.dense.append(Pair(name, source, "requested"))
        elif b is None and matches_any(name, new_only):
            dropped_new.append(name)
        elif b is not None and not allowed(name):
            continue
        elif b is None:
            plan.dense.append(Pair(name, source, "new"))
            new.append(name)
        elif b.dtype not in FLOAT_DTYPES or b.shape != t.shape:
            plan.dense.append(Pair(name, source, "resized"))
            resized.append(f"{name} {list(b.shape)}->{list(t.shape)}")
        else:
            plan.sparse.append(Pair(name, source))

    _check_related(base, ft, matched, base_names)
    missing = sorted(n for n, t in base.tensors.items()
                     if t.dtype in FLOAT_DTYPES and n not in base_copies and n not in claimed and allowed(n))
    if new:
        plan.notes.append(f"{len(new)} parameter(s) only in the fine-tune stored densely: {_some(new)}")
    if resized:
        plan.notes.append(f"{len(resized)} parameter(s) with a changed shape stored densely: {_some(resized)}")
    if missing:
        plan.notes.append(f"{len(missing)} base parameter(s) missing from the fine-tune, left unchanged: "
                          f"{_some(missing)}")
    if dropped_new:
        plan.notes.append(f"{len(dropped_new)} parameter(s) only in the fine-tune dropped by --exclude "
                          f"{' '.join(repr(g) for g in new_only)}: {_some(dropped_new)}; a model the diff is "
                          "applied to will initialize them afresh")
    plan.sparse.sort(key=lambda p: p.name)
    plan.dense.sort(key=lambda p: p.name)
    return plan


def _strip(name: str, prefix: str) -> str:
    """A new parameter of a prefixed fine-tune, spelled as the base would (head keys have no prefix)."""
    return name[len(prefix):] if prefix and name.startswith(prefix) and len(name) > len(prefix) else name


def _some(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _check_related(base: Checkpoint, ft: Checkpoint, matched: Sequence[Pair], base_float: Sequence[str]) -> None:
    """Refuse pairs that are not a base and a fine-tune of it (another architecture or size), judged
    on every float parameter the two share by name (`matched`), whatever include/exclude keep."""
    if not base_float:
        raise VerificationError(f"base {base.hint or '(state dict)'} has no floating-point parameters")
    by_name = [p for p in matched if p.name in base.tensors]
    same_shape = [p for p in by_name if base.tensors[p.name].shape == ft.tensors[p.source].shape]
    if len(by_name) * 2 < len(base_float) or len(same_shape) * 2 < len(by_name):
        raise VerificationError(
            f"{ft.hint or 'the fine-tune'} does not look like a fine-tune of {base.hint or 'the base'}: "
            f"{len(by_name)} of {len(base_float)} base parameters match by name, {len(same_shape)} also by shape; "
            "check the arguments' order and that both are the same architecture and size")


def config_patch(base_config: dict | None, ft_config: dict | None) -> dict | None:
    """Top-level config.json fields the fine-tune sets differently from the base (e.g. its head)."""
    if not isinstance(base_config, dict) or not isinstance(ft_config, dict):
        return None
    missing = object()
    patch = {key: value for key, value in ft_config.items()
             if key not in CONFIG_NOISE and base_config.get(key, missing) != value}
    return patch or None


# ---------------------------------------------------------------- the scan: selection
#
# The scan is the hot loop: every value of both checkpoints goes through it once. Each tensor is cut
# into tasks of TASK elements that a small thread pool scans (numpy releases the GIL in ufuncs);
# a task computes |Δ| slice by slice into reused per-thread buffers and returns only the positions
# whose |Δ| reaches the TopK's current floor, with both raw values there. The main thread offers
# those to the TopK in task order, so the result does not depend on thread timing: the floor only
# decides how much is filtered early, never what is selected.


def abs_delta_slices(base_raw: np.ndarray, base_dtype: str, ft_raw: np.ndarray, ft_dtype: str,
                     size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, |ft − base| as float32) for consecutive slices of the flattened tensors.

    The yielded array is a reused buffer, valid until the next step."""
    size = size or SLICE
    b, f = base_raw.reshape(-1), ft_raw.reshape(-1)
    wide = np.float64 if "F64" in (base_dtype, ft_dtype) else np.float32
    n = min(size, f.size)
    f_buf, b_buf = np.empty(n, wide), np.empty(n, wide)
    mags_buf = f_buf if wide is np.float32 else np.empty(n, np.float32)
    for lo in range(0, f.size, size):
        m = min(size, f.size - lo)
        out = f_buf[:m]
        np.subtract(_as_wide(f[lo:lo + m], ft_dtype, out), _as_wide(b[lo:lo + m], base_dtype, b_buf[:m]), out=out)
        np.abs(out, out=out)
        mags = mags_buf[:m]
        if mags is not out:
            np.copyto(mags, out, casting="same_kind")
        yield lo, mags


def _as_wide(raw: np.ndarray, dtype: str, buf: np.ndarray) -> np.ndarray:
    """`raw` as `buf`'s float dtype: the raw array itself when it already is, else converted into buf."""
    if raw.dtype == buf.dtype and dtype != "BF16":
        return raw
    if dtype == "BF16" and buf.dtype == np.float32:
        np.left_shift(raw, 16, out=buf.view(np.uint32), dtype=np.uint32)  # exact, no temporary
    elif dtype == "BF16":
        np.copyto(buf, to_float32(raw, dtype))
    else:
        np.copyto(buf, raw, casting="unsafe")
    return buf


def estimated_floor(base: Checkpoint, ft: Checkpoint, pairs: Sequence[Pair], k: int, total: int,
                    sample: int = 1 << 21, block: int = 1 << 14) -> float:
    """A magnitude that about 1.5k of the deltas reach, estimated from evenly spaced blocks of every
    tensor. Only a hint that lets the scan skip most values from the start; a wrong one costs a retry.

    Why 1.5k: the fewer candidates reach the floor, the less the scan keeps and sorts out, but the
    hint must stay below the true k-th magnitude. A 2M-value sample holds ~2·10⁴·density values above
    it, so a 50% margin is many standard deviations for any sample that represents the model.
    Blocks of 16K values (not more, smaller ones) keep the reads few when the files are not cached."""
    if k <= 0 or 4 * k >= total or 2 * k * sample < 100 * total:
        return 0.0
    def block_mags(pair: Pair) -> list[np.ndarray]:
        t, f_dtype = base.tensors[pair.name], ft.tensors[pair.source].dtype
        blocks = max(1, round(sample * t.numel / total / block))
        out = []
        for start in np.linspace(0, max(0, t.numel - block), blocks).astype(np.int64):
            n = min(block, t.numel - int(start))
            b = base.read(pair.name, int(start), n)  # pread: only the sampled bytes, not a read-around window
            f = ft.read(pair.source, int(start), n)
            out += [m.copy() for _, m in abs_delta_slices(b, t.dtype, f, f_dtype)]
        base.release(pair.name)
        ft.release(pair.source)
        return out

    with ThreadPoolExecutor(WORKERS) as pool:  # a cold disk serves concurrent reads faster
        mags = [m for part in pool.map(block_mags, pairs) for m in part]
    values = np.concatenate(mags)
    rank = len(values) - int(len(values) * 1.5 * k / total)
    hint = float(np.partition(values, rank)[rank]) if 0 <= rank < len(values) else 0.0
    return hint if np.isfinite(hint) else 0.0  # NaN/inf in the data: the scan reports it


@dataclass
class _Tensor:
    """One selectable tensor during the scan: its raw arrays and the TopK it feeds."""

    pair: Pair
    base_raw: np.ndarray  # flat
    base_dtype: str
    ft_raw: np.ndarray  # flat
    ft_dtype: str
    top: TopK
    rank: int  # the TopK rank: position in name order (global scope) or 0 (its own TopK)


class Candidates(NamedTuple):
    """Positions of one tensor (ascending flat indices), their |Δ| and both checkpoints' raw values there."""

    indices: np.ndarray
    mags: np.ndarray
    base: np.ndarray
    ft: np.ndarray


def select(base: Checkpoint, ft: Checkpoint, pairs: Sequence[Pair], budget: int | Sequence[int], *,
           floor: float = 0.0, progress: bool = False, device: str | None = None) -> dict[str, Candidates]:
    """The selected positions of each parameter, by name, with their raw values (`mags` left empty).

    `budget` is k over all pairs (global scope) or one count per pair (per-tensor scope); `floor`
    a magnitude the global top-k is believed to reach (see `estimated_floor`)."""
    shared = TopK(budget, floor=floor) if isinstance(budget, (int, np.integer)) else None
    found: dict[str, Candidates] = {}

    def finish(t: _Tensor) -> None:  # every task of t has been merged
        base.release(t.pair.name)
        ft.release(t.pair.source)
        if shared is None:
            found.update(_by_name(t.top, [t.pair.name]))

    pending: deque[tuple[_Tensor, Future | None, bool]] = deque()  # (tensor, scan, last task of it)

    def merge_oldest() -> None:
        t, scan, last = pending.popleft()
        if scan is not None:
            c = scan.result()
            if c.mags.size and not np.isfinite(c.mags).all():  # NaN/inf always pass the filter
                raise FormatError(f"{ft.hint or 'fine-tune'}: {t.pair.source} (or the base's {t.pair.name}) "
                                  "contains NaN or infinity; a diff needs finite weights")
            t.top.offer_at(t.rank, c.indices, c.mags, (c.base, c.ft))
        if last:
            finish(t)

    def read_ahead(i: int) -> None:  # the next tensors' bytes, while this one is scanned
        for pair in pairs[i:i + READ_AHEAD]:
            base.read_ahead(pair.name)
            ft.read_ahead(pair.source)

    with ThreadPoolExecutor(WORKERS) as pool, ThreadPoolExecutor(1) as reader:
        try:
            reader.submit(read_ahead, 0)
            for i, pair in enumerate(_bar(pairs, "select", progress)):
                reader.submit(read_ahead, i + 1)
                top = shared if shared is not None else TopK(budget[i])
                t = _Tensor(pair, base.array(pair.name).reshape(-1), base.tensors[pair.name].dtype,
                            ft.array(pair.source).reshape(-1), ft.tensors[pair.source].dtype,
                            top, i if shared is not None else 0)
                step = _task_size()
                bounds = list(range(0, t.ft_raw.size, step)) or [0]
                for lo in bounds:
                    hi = min(t.ft_raw.size, lo + step)
                    scan = pool.submit(_scan, t, lo, hi, device) if hi > lo else None
                    pending.append((t, scan, lo == bounds[-1]))
                    while len(pending) > 2 * WORKERS:  # bounded: unmerged candidates cost memory
                        merge_oldest()
            while pending:
                merge_oldest()
        finally:
            for _, scan, _ in pending:
                if scan is not None:
                    scan.cancel()
    if shared is not None:
        found = _by_name(shared, [p.name for p in pairs])
    return found


def _by_name(top: TopK, names: Sequence[str]) -> dict[str, Candidates]:
    """TopK's result (rank -> sorted flat indices and raw values) by parameter name."""
    empty = np.empty(0, np.float32)
    return {names[rank]: Candidates(indices, empty, b, f)
            for rank, (indices, (b, f)) in top.result_with_payload().items()}


def _task_size() -> int:
    """Elements per scan task: a whole number of (even-sized) slices."""
    return max(1, TASK // _slice_size()) * _slice_size()


def _slice_size() -> int:
    return max(2, SLICE - SLICE % 2)  # even, so that BF16 values pair up into 32-bit words


def _scan(t: _Tensor, lo: int, hi: int, device: str | None = None) -> Candidates:
    """The positions in [lo, hi) whose |Δ| reaches the TopK's floor (every nonzero one while it is
    0), in ascending order, with |Δ| as float32 and the raw values of both tensors there (so the
    values of the selected ones need no second read). Runs in a worker thread."""
    threshold = _threshold_bits(t.top.floor)  # read once: the floor only rises, so an old one is safe
    if device is not None:  # --device: torch scans there, with the same result (None: numpy below)
        on_device = device_scan.scan(t.base_raw, t.base_dtype, t.ft_raw, t.ft_dtype, lo, hi, threshold, device)
        if on_device is not None:
            idx, mags = on_device
            return Candidates(idx, mags, t.base_raw[idx], t.ft_raw[idx])
    fused = kernels.scan(t.base_raw, t.base_dtype, t.ft_raw, t.ft_dtype, lo, hi, threshold)
    if fused is not None:  # the compiled kernel (sftdiff._kernels built): the same result in one pass
        return Candidates(*fused)
    pairwise = t.base_dtype == t.ft_dtype == "BF16" and sys.byteorder == "little"
    step = _slice_size()
    scratch = _scratch(step)
    found = [Candidates(np.empty(0, np.int64), np.empty(0, np.float32), t.base_raw[:0], t.ft_raw[:0])]
    for s in range(lo, hi, step):
        e = min(hi, s + step)
        mid = s + (e - s) // 2 * 2 if pairwise else s
        b, f = t.base_raw[s:e], t.ft_raw[s:e]
        if mid > s:
            i, m = _scan_bf16_pairs(b[:mid - s], f[:mid - s], threshold, scratch)
            found.append(Candidates(i + s, m, b.take(i), f.take(i)))  # taken while the slice is cached
        if e > mid:  # other dtypes, or the odd last BF16 value
            for _, d in abs_delta_slices(b[mid - s:], t.base_dtype, f[mid - s:], t.ft_dtype, e - mid):
                i = np.flatnonzero(np.greater_equal(d.view(np.uint32), threshold))
                found.append(Candidates(i + mid, d.take(i), b[mid - s:].take(i), f[mid - s:].take(i)))
    return Candidates(*(np.concatenate(column) for column in zip(*found)))


def _threshold_bits(floor: float) -> np.uint32:
    """The floor as a float32 bit pattern: for non-negative floats bit patterns order as the
    values, so |Δ| ≥ floor is one integer comparison, and NaN and ±inf (patterns ≥ 0x7F800000)
    always pass it, which is how the scan notices them without a separate check of every value."""
    if floor <= 0:
        return np.uint32(1)  # every nonzero |Δ| (+0.0 is pattern 0)
    f = np.float32(floor)
    if float(f) > floor:  # rounded up: step down so that nothing reaching `floor` is filtered
        f = np.nextafter(f, np.float32(0))
    return f.view(np.uint32)


def _scan_bf16_pairs(b16: np.ndarray, f16: np.ndarray, threshold: np.uint32,
                     scratch: "_Scratch") -> tuple[np.ndarray, np.ndarray]:
    """`_scan` on an even number of BF16 values, without converting them one by one.

    Two BF16 values side by side are one little-endian 32-bit word: the even-indexed value in the
    low half, the odd one in the high half. `word << 16` and `word & 0xFFFF0000` are then exactly
    the two values as float32 bit patterns, each in one same-type pass (a uint16→uint32 widening
    costs numpy several times more). Each parity gives an ascending run of positions; a stable
    argsort merges the two runs in linear time."""
    bw, fw = b16.view(np.uint32), f16.view(np.uint32)
    h = bw.size
    a, d, mask = scratch.a[:h], scratch.d[:h], scratch.mask[:h]
    positions, mags = [], []
    for parity in (0, 1):
        if parity == 0:
            np.left_shift(bw, 16, out=a)
            np.left_shift(fw, 16, out=d)
        else:
            np.bitwise_and(bw, 0xFFFF0000, out=a)
            np.bitwise_and(fw, 0xFFFF0000, out=d)
        np.subtract(d.view(np.float32), a.view(np.float32), out=d.view(np.float32))  # ft − base, float32
        np.bitwise_and(d, 0x7FFFFFFF, out=d)  # |Δ|: clear the sign bit
        np.greater_equal(d, threshold, out=mask)
        j = np.flatnonzero(mask)
        positions.append(2 * j + parity)
        mags.append(d[j].view(np.float32))
    positions, mags = np.concatenate(positions), np.concatenate(mags)
    order = np.argsort(positions, kind="stable")
    return positions[order], mags[order]


class _Scratch(threading.local):
    """Per-thread scan buffers, allocated once and reused by every slice."""

    size = 0

    def ensure(self, size: int) -> "_Scratch":
        if self.size < size:
            half = size // 2 + 1
            self.a, self.d = np.empty(half, np.uint32), np.empty(half, np.uint32)
            self.mask = np.empty(half, bool)
            self.size = size
        return self


_SCRATCH = _Scratch()


def _scratch(size: int) -> _Scratch:
    return _SCRATCH.ensure(size)


# ---------------------------------------------------------------- values


def exact_deltas(base_raw: np.ndarray, base_dtype: str, ft_raw: np.ndarray, ft_dtype: str) -> np.ndarray:
    """float32 deltas v such that round_to_base_dtype(float32(base) + v) == ft wherever such a v exists.

    v starts as the float32 nearest to the exact (float64) difference; where that misses, because
    ft is far smaller than base or lies on a rounding boundary, its float32 neighbours are tried."""
    b = to_float64(base_raw, base_dtype)
    target = to_float64(ft_raw, ft_dtype)
    v = (target - b).astype(np.float32)
    b32 = b.astype(np.float32)
    miss = np.flatnonzero(~_reconstructs(b32, v, target, base_dtype))
    for direction in (np.float32(np.inf), np.float32(-np.inf)):
        if miss.size == 0:
            break
        candidate = np.nextafter(v[miss], direction)
        ok = _reconstructs(b32[miss], candidate, target[miss], base_dtype)
        v[miss[ok]] = candidate[ok]
        miss = miss[~ok]
    return v


def _reconstructs(b32: np.ndarray, v: np.ndarray, target: np.ndarray, dtype: str) -> np.ndarray:
    """Whether applying v (spec 3.1: float32 sum, rounded once to the base dtype) gives `target`."""
    with np.errstate(over="ignore", invalid="ignore"):
        applied = from_float32(b32 + v, dtype)
        return to_float64(applied, dtype) == target


def sparse_entry(base: Checkpoint, ft: Checkpoint, pair: Pair, chosen: Candidates,
                 stored_dtype: str) -> SparseEntry | None:
    """The sparse entry of `pair` from its selected positions and the raw values found there."""
    t = base.tensors[pair.name]
    values = exact_deltas(chosen.base, t.dtype, chosen.ft, ft.tensors[pair.source].dtype)
    if stored_dtype == "F16" and values.size and float(np.abs(values).max()) > F16_MAX:
        raise UsageError(f"a delta of {pair.name} exceeds the float16 range; store values as float32 or bfloat16")
    return SparseEntry.from_float(t.shape, chosen.indices, values, stored_dtype, t.dtype)


def dense_entry(base: Checkpoint, ft: Checkpoint, pair: Pair) -> DenseEntry:
    """The fine-tune's whole tensor, in its own dtype (copied when it lives in memory, so later
    training of the model cannot change the diff)."""
    t = ft.tensors[pair.source]
    values = ft.array(pair.source)
    if not ft.weight_files:
        values = np.array(values)
    try:
        fmt.check_values(pair.name, values, t.dtype, allow_zero=True)
    except SftError as e:
        raise FormatError(f"{ft.hint or 'fine-tune'}: {pair.source}: {e}") from None
    base_t = base.tensors.get(pair.name)
    return DenseEntry(values, t.dtype, base_t.dtype if base_t is not None else None)


def _bar(items: Sequence[Any], desc: str, enabled: bool) -> Any:
    return progress_bar(items, total=len(items), desc=desc, enabled=enabled)
