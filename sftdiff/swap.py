"""O(k) patching of a loaded torch tensor with a sparse entry, and undoing it exactly: the hot path of
`inplace.apply_to_model` / `revert_from_model` (swapping a language diff in a served or training model).

Two things keep a swap near the cost of touching k values:

- An entry's indices and values are converted (int → intp, stored dtype → float32/float64, onto the
  device) once per diff and cached beside the `SparseDiff` (`_PREPARED`, dropped with the diff); a
  swap then allocates only the k originals it must keep, plus k-sized temporaries.
- On the CPU the k-sized work is done with numpy on the tensor's memory, single-threaded. torch's
  element-wise ops run an OpenMP parallel region per call, and on a loaded machine each region waits
  for every thread to be scheduled (measured: 75-100 ms for a 115k-value add with 2 threads under
  load, 0.1 ms with one), which over ~200 tensors and a handful of ops per tensor made a swap take
  seconds. Other devices use torch ops (the same arithmetic: `_patch_torch`).

Values are computed as in `bake`: round(wide(w) + scale × v) with wide float32 (float64 for F64
weights) and one rounding to the weight's dtype (round to nearest even).
"""

from __future__ import annotations

import weakref
from collections.abc import MutableMapping
from typing import Any, Iterator

import numpy as np

from .diff import SparseDiff, SparseEntry
from .dtypes import from_float32

# diff -> (its entries mapping when cached, {(entry name, device, work dtype): (entry, indices, values)}).
_PREPARED: "weakref.WeakKeyDictionary[SparseDiff, tuple[Any, dict]]" = weakref.WeakKeyDictionary()
# Indices handled at a time on the CPU: the cache lines a chunk gathers are still cached when it
# scatters (measured ~25% faster than whole-tensor take + put on a 1.1B model).
CHUNK = 1 << 14
# torch dtype name -> (torch int dtype of the same width, numpy view of the bits, work dtype)
_KINDS = {"bfloat16": ("int16", np.uint16, np.float32), "float16": ("int16", np.uint16, np.float32),
          "float32": ("int32", np.uint32, np.float32), "float64": ("int64", np.uint64, np.float64)}


def add_sparse(t: Any, diff: SparseDiff, name: str, entry: SparseEntry, scale: float) -> tuple[Any, Any, Any]:
    """Add scale × `entry` to tensor `t` in place; returns (indices, delta, originals) for `restore`."""
    if _numpy_path(t):
        kind = _kind(t)
        idx, values = _prepared(diff, name, entry, None, _KINDS[kind][2])
        delta = values if scale == 1.0 else values * values.dtype.type(scale)  # scale rounded as bake does
        original = _add_numpy(_bits(t), kind, idx, delta)
        _bump(t)
        return idx, delta, original
    idx, values = _prepared(diff, name, entry, t.device, _torch_work(t))
    delta = values if scale == 1.0 else values * float(scale)
    return _patch_torch(t, idx, delta)


def restore(t: Any, item: tuple[Any, Any, Any]) -> None:
    """Undo `add_sparse`: positions still holding what it wrote get their exact original back
    (bit for bit); positions changed since (training) get the delta subtracted."""
    idx, delta, original = item
    if _numpy_path(t) and isinstance(original, np.ndarray):
        _restore_numpy(_bits(t), _kind(t), idx, delta, original)
        _bump(t)
        return
    _restore_torch(t, *_as_torch(t, idx, delta, original))


def subtract_sparse(t: Any, diff: SparseDiff, name: str, entry: SparseEntry, scale: float) -> None:
    """Subtract scale × `entry` from `t` in place (reverting without a record: exact up to rounding)."""
    if _numpy_path(t):
        kind = _kind(t)
        idx, values = _prepared(diff, name, entry, None, _KINDS[kind][2])
        delta = values if scale == 1.0 else values * values.dtype.type(scale)
        w = _bits(t)
        for a, b in _chunks(idx.size):
            i = idx[a:b]
            w[i] = _round(_widen(w.take(i, mode="clip"), kind) - delta[a:b], kind)
        _bump(t)
        return
    idx, values = _prepared(diff, name, entry, t.device, _torch_work(t))
    delta = values if scale == 1.0 else values * float(scale)
    flat = _flat(t)
    flat.index_copy_(0, idx, (flat.index_select(0, idx).to(delta.dtype) - delta).to(t.dtype))
    _store(t, flat)


def forget(diff: SparseDiff) -> None:
    """Drop the converted arrays cached for `diff` (they also go when the diff is garbage collected)."""
    _PREPARED.pop(diff, None)


# ---------------------------------------------------------------- the cache


def _prepared(diff: SparseDiff, name: str, entry: SparseEntry, device: Any, work: Any) -> tuple[Any, Any]:
    """The entry's indices and float values in the form a swap uses, converted once per diff.

    `device` None: numpy arrays (intp indices, `work` values) for the CPU path; else torch tensors on
    it. A diff whose entries can change (a plain dict) is re-checked by entry identity; a loaded
    file's entries cannot change."""
    cached = _PREPARED.get(diff)
    if cached is None or cached[0] is not diff.entries:
        cached = (diff.entries, {})
        _PREPARED[diff] = cached
    table = cached[1]
    key = (name, None if device is None else str(device), str(work))
    hit = table.get(key)
    if hit is not None and (hit[0] is entry or not isinstance(diff.entries, MutableMapping)):
        return hit[1], hit[2]
    idx = np.asarray(entry.indices, dtype=np.intp)
    values = np.asarray(entry.values_f32(), dtype=np.float32)
    if device is None:
        values = values.astype(work, copy=True)  # own memory: the file's map may go
        idx = idx if idx is not entry.indices else idx.copy()
    else:
        import torch

        idx = torch.from_numpy(np.array(idx, dtype=np.int64)).to(device)
        values = torch.from_numpy(np.array(values, dtype=np.float32)).to(device=device, dtype=work)
    table[key] = (entry, idx, values)
    return idx, values


# ---------------------------------------------------------------- CPU: numpy on the tensor's memory


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for a in range(0, n, CHUNK):
        yield a, min(n, a + CHUNK)


def _add_numpy(w: np.ndarray, kind: str, idx: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """w[idx] = round(wide(w[idx]) + delta), chunk by chunk; returns the originals."""
    original = np.empty(idx.size, w.dtype)
    for a, b in _chunks(idx.size):
        i = idx[a:b]
        o = w.take(i, out=original[a:b], mode="clip")  # in range: checked when the entry was read
        w[i] = _round(_widen(o, kind) + delta[a:b], kind)
    return original


def _restore_numpy(w: np.ndarray, kind: str, idx: np.ndarray, delta: np.ndarray, original: np.ndarray) -> None:
    for a, b in _chunks(idx.size):
        i, o, d = idx[a:b], original[a:b], delta[a:b]
        current = w.take(i, mode="clip")
        applied = _round(_widen(o, kind) + d, kind)
        if np.array_equal(current, applied):  # the usual case: nothing changed since the apply
            w[i] = o
        else:  # still what apply wrote: same bits, or equal values (+0.0 == -0.0, as torch compares)
            same = (current == applied) | (_widen(current, kind) == _widen(applied, kind))
            w[i] = np.where(same, o, _round(_widen(current, kind) - d, kind))


def _kind(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def _numpy_path(t: Any) -> bool:
    """CPU tensors of the four float dtypes, contiguous (others go through torch ops)."""
    return t.device.type == "cpu" and _kind(t) in _KINDS and t.is_contiguous()


def _bits(t: Any) -> np.ndarray:
    """A flat numpy view of the tensor's memory as unsigned integers of its width."""
    import torch

    torch_int, view, _ = _KINDS[_kind(t)]
    return t.detach().reshape(-1).view(getattr(torch, torch_int)).numpy().view(view)


def _widen(bits: np.ndarray, kind: str) -> np.ndarray:
    """Stored bits as the values sums are made in (float32; float64 for float64 weights), exactly."""
    if kind == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if kind == "float16":
        return bits.view(np.float16).astype(np.float32)
    return bits.view(np.float32 if kind == "float32" else np.float64)


def _round(values: np.ndarray, kind: str) -> np.ndarray:
    """Values rounded once (to nearest even) to the weight's dtype, as its bits."""
    if kind == "bfloat16":
        return from_float32(values, "BF16")
    if kind == "float16":
        with np.errstate(over="ignore"):  # overflow gives inf, as torch's conversion does
            return values.astype(np.float16).view(np.uint16)
    return values.view(np.uint32 if kind == "float32" else np.uint64)


def _bump(t: Any) -> None:
    """Tell autograd the tensor changed (numpy writes bypass torch's version counter)."""
    import torch

    torch.autograd.graph.increment_version(t)


# ---------------------------------------------------------------- other devices: torch ops


def _torch_work(t: Any) -> Any:
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _flat(t: Any) -> Any:
    return t.view(-1) if t.is_contiguous() else t.reshape(-1).clone()


def _store(t: Any, flat: Any) -> None:
    if not t.is_contiguous():
        t.copy_(flat.view(t.shape))


def _patch_torch(t: Any, idx: Any, delta: Any) -> tuple[Any, Any, Any]:
    flat = _flat(t)
    original = flat.index_select(0, idx)
    flat.index_copy_(0, idx, (original.to(delta.dtype) + delta).to(t.dtype))
    _store(t, flat)
    return idx, delta, original


def _restore_torch(t: Any, idx: Any, delta: Any, original: Any) -> None:
    import torch

    flat = _flat(t)
    current = flat.index_select(0, idx)
    applied = (original.to(delta.dtype) + delta).to(t.dtype)
    if torch.equal(current, applied):
        flat.index_copy_(0, idx, original)
    else:
        subtracted = (current.to(delta.dtype) - delta).to(t.dtype)
        flat.index_copy_(0, idx, torch.where(current == applied, original, subtracted))
    _store(t, flat)


def _as_torch(t: Any, idx: Any, delta: Any, original: Any) -> tuple[Any, Any, Any]:
    """A record made by the CPU path as torch tensors on `t`'s device (the model moved since)."""
    import torch

    if not isinstance(original, np.ndarray):
        return idx.to(t.device), delta.to(t.device), original.to(t.device)
    bits = torch.from_numpy(original.view(original.dtype.str.replace("u", "i")))  # torch lacks most uints
    return (torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(t.device),
            torch.from_numpy(delta).to(t.device, dtype=_torch_work(t)),
            bits.view(t.dtype).to(t.device))
