"""composable-sft's `pytorch_diff.bin` (Ansell et al.'s reference implementation).

The file is a torch.save pickle of `{'diffs': {name: {'size', 'index_steps', 'values'}},
'abs': {name: tensor}}`. `index_steps` delta-encodes sorted flat indices in which the FIRST
dimension varies fastest (column-major), so indices are remapped to row-major and re-sorted with
their values. Import needs no torch (see `torch_pickle`); export uses torch.save, as
composable-sft reads its files with torch.load.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint
from ..diff import DenseEntry, Entry, SparseDiff
from ..errors import FormatError
from . import COMPOSABLE_FILE
from .common import canonical_sparse, make_diff
from .torch_pickle import TorchArray, load_torch_zip

_DIFF_KEYS = {"size", "index_steps", "values"}
MAX_NUMEL = 2**63 - 1  # flat indices are int64


def column_major_to_row_major(indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Flat indices with the first dimension fastest → flat row-major indices (not re-sorted)."""
    if len(shape) <= 1:
        return np.asarray(indices, dtype=np.int64)
    coords = np.unravel_index(np.asarray(indices, dtype=np.int64), shape, order="F")
    return np.ravel_multi_index(coords, shape, order="C").astype(np.int64)


def row_major_to_column_major(indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) <= 1:
        return np.asarray(indices, dtype=np.int64)
    coords = np.unravel_index(np.asarray(indices, dtype=np.int64), shape, order="C")
    return np.ravel_multi_index(coords, shape, order="F").astype(np.int64)


def _float_values(t: Any, where: str) -> np.ndarray:
    if not isinstance(t, TorchArray):
        raise FormatError(f"{where} is not a tensor")
    if t.bfloat16:
        from ..dtypes import to_float32

        return to_float32(t.array, "BF16")
    if t.array.dtype.kind != "f":
        raise FormatError(f"{where} holds {t.array.dtype} values, expected floating point")
    return t.array.astype(np.float32)


def _shape(size: Any, where: str) -> tuple[tuple[int, ...], int]:
    """(shape, numel) of a diff's 'size': non-negative ints whose product fits in int64 (numpy's
    index arithmetic needs that)."""
    if not isinstance(size, tuple) or not all(type(d) is int and d >= 0 for d in size):
        raise FormatError(f"{where}: 'size' is not a torch.Size of non-negative integers")
    numel = math.prod(size)
    if numel > MAX_NUMEL:
        raise FormatError(f"{where}: size {list(size)} has more than {MAX_NUMEL} elements")
    return size, numel


def _decode_steps(steps: Any, numel: int, where: str) -> np.ndarray:
    """Sorted flat indices in [0, numel) from their delta encoding: the first step is the first
    index (>= 0), every later step is >= 1 (indices strictly increase)."""
    if not isinstance(steps, list) or not all(isinstance(s, (int, np.integer)) for s in steps):
        raise FormatError(f"{where}: index_steps must be a list of integers")
    try:
        array = np.array(steps, dtype=np.int64)
    except OverflowError:
        raise FormatError(f"{where}: index_steps must be integers that fit in 64 bits") from None
    if array.size == 0:
        return array
    if array[0] < 0 or bool(np.any(array[1:] < 1)):
        raise FormatError(f"{where}: index_steps must start at >= 0 and then be >= 1 (strictly increasing indices)")
    flat = np.cumsum(array)
    # Every step is below 2^63, so a sum that wraps past int64 comes out smaller than the one before
    # it: strictly increasing sums are exact.
    if bool(np.any(flat[1:] <= flat[:-1])) or int(flat[-1]) >= numel:
        raise FormatError(f"{where}: index_steps add up to an index out of range [0, {numel})")
    return flat


_CHECKPOINT_KEYS = ("state_dict", "model", "module", "model_state_dict", "weights")


def _state_dict_size(obj: Any) -> int:
    """Tensors of a plain state dict (name -> tensor), or of one under a training checkpoint's usual
    key ({'state_dict': ...}, {'model': ...}); 0 for anything else, composable-sft diffs included."""
    if not isinstance(obj, dict) or "diffs" in obj or "abs" in obj:
        return 0
    for key in _CHECKPOINT_KEYS:
        if isinstance(obj.get(key), dict):
            return _state_dict_size(obj[key])
    tensors = sum(isinstance(v, TorchArray) for v in obj.values())
    if obj and all(isinstance(k, str) for k in obj) and tensors * 2 > len(obj):  # mostly name -> tensor
        return tensors
    return 0


def read_composable(path: str | Path) -> dict[str, Entry]:
    """Entries of a pytorch_diff.bin, keyed by its own parameter names."""
    obj = load_torch_zip(path)
    tensors = _state_dict_size(obj)
    if tensors:
        raise FormatError(f"{path}: this is a model checkpoint ({tensors} tensors), not a diff; use it as BASE "
                          "(or make a diff from it with `sftdiff create BASE FINETUNED`)")
    if (not isinstance(obj, dict) or not ("diffs" in obj or "abs" in obj)
            or not isinstance(obj.get("diffs", {}), dict) or not isinstance(obj.get("abs", {}), dict)):
        raise FormatError(f"{path}: not a composable-sft diff (expected a dict with 'diffs' and 'abs')")
    entries: dict[str, Entry] = {}
    for name, d in obj.get("diffs", {}).items():
        where = f"{path}: diff {name!r}"
        if not isinstance(name, str) or not isinstance(d, dict) or not _DIFF_KEYS <= d.keys():
            raise FormatError(f"{where}: needs 'size', 'index_steps' and 'values'")
        shape, numel = _shape(d["size"], where)
        flat = _decode_steps(d["index_steps"], numel, where)
        values = _float_values(d["values"], f"{where}: 'values'").reshape(-1)
        entry = canonical_sparse(shape, column_major_to_row_major(flat, shape), values, what=where)
        if entry is not None:
            entries[name] = entry
    for name, t in obj.get("abs", {}).items():
        where = f"{path}: abs {name!r}"
        if not isinstance(name, str):
            raise FormatError(f"{where}: parameter names must be strings")
        if name in entries:
            raise FormatError(f"{where}: also has a sparse diff")
        values = _float_values(t, where)
        if not np.isfinite(values).all():
            raise FormatError(f"{where}: values contain NaN or infinity")
        if isinstance(t, TorchArray) and t.bfloat16:
            entries[name] = DenseEntry(t.array.copy(), "BF16")
        else:
            entries[name] = DenseEntry(values, "F32")
    return entries


def load_composable(path: Path, base: Checkpoint | None, source: str) -> SparseDiff:
    file = path / COMPOSABLE_FILE if path.is_dir() else path
    return make_diff(read_composable(file), "composable-sft", source, base)


def export_composable(diff: SparseDiff, out: Path, *, overwrite: bool) -> Path:
    """Write `diff` as composable-sft's pytorch_diff.bin (into OUT/ unless OUT names a .bin)."""
    import torch

    from ..atomic import atomic_path

    target_is_file = out.suffix == ".bin"
    diffs: dict[str, Any] = {}
    dense: dict[str, Any] = {}
    for name in sorted(diff.entries):
        entry = diff.entries[name]
        values = torch.from_numpy(np.array(entry.values_f32(), dtype=np.float32, copy=True))
        if isinstance(entry, DenseEntry):
            dense[name] = values.reshape(entry.shape)
            continue
        flat = row_major_to_column_major(entry.indices, entry.shape)
        order = np.argsort(flat, kind="stable")
        flat = flat[order]
        steps = np.diff(flat, prepend=0)
        # composable-sft writes the first step as a numpy int64 scalar and the rest as Python ints.
        index_steps = [np.int64(steps[0])] + steps[1:].tolist() if steps.size else []
        diffs[name] = {"size": torch.Size(entry.shape), "index_steps": index_steps, "values": values[order]}
    payload = {"diffs": diffs, "abs": dense}
    with atomic_path(out, overwrite=overwrite, directory=not target_is_file) as tmp:
        torch.save(payload, tmp if target_is_file else tmp / COMPOSABLE_FILE)
    return out if target_is_file else out / COMPOSABLE_FILE
