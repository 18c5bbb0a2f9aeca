"""Applying diffs to a loaded torch model in place, and undoing it (`apply_to_model`, `revert_from_model`).

For training loops that switch diffs per batch, as composable-sft's multi-source training does.
Each touched value becomes `round(float32(w) + scale * v)` in the weight's dtype, exactly what
`bake` writes for one diff; the returned `AppliedDiff` keeps what was replaced, so reverting with
it is exact in every dtype. torch is imported
when these functions run, never at module import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import swap
from .diff import DenseEntry, SparseDiff
from .errors import UsageError, VerificationError
from .names import NameMap


@dataclass
class AppliedDiff:
    """What `apply_to_model` changed: enough to undo it exactly with `revert_from_model`."""

    diff: SparseDiff
    scale: float
    with_dense: bool
    sparse: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)  # param -> (indices, delta, original)
    dense: dict[str, Any] = field(default_factory=dict)  # param -> original value
    skipped: list[str] = field(default_factory=list)  # entries for parameters the model lacks (strict=False)


def as_diff(diff: Any, what: str = "diff", expected: str = "a SparseDiff or a diff file's path (str or os.PathLike)"
            ) -> SparseDiff:
    """`diff` itself, or the diff a path (str or os.PathLike) names, read as the commands read a DIFF
    argument (`sources.open_diff`); anything else is a TypeError saying what was given and what is
    expected (`what` names the argument)."""
    if isinstance(diff, SparseDiff):
        return diff
    if isinstance(diff, (str, os.PathLike)):
        from .sources import open_diff

        return open_diff(os.fspath(diff))
    raise TypeError(f"{what} must be {expected}, not {type(diff).__module__}.{type(diff).__qualname__}")


def apply_to_model(model: Any, diff: SparseDiff | str | os.PathLike, scale: float = 1.0, with_dense: bool = True,
                   *, strict: bool = True) -> AppliedDiff:
    """Add `diff` (sparse values × `scale`; dense entries replace) to a torch module's weights in
    place, on their device. Returns the record `revert_from_model` uses to undo it exactly.
    `diff` is a `SparseDiff` or a diff file's path (read as `sftdiff apply` reads it, on each call:
    a loop swapping diffs should load them once, as `swap` caches their conversion on the object).

    Each touched value is computed as round(float32(w) + scale × v): the same single rounding
    `bake` does for one diff. Several diffs applied one after the other follow the composition
    rule of `bake` (`compose.py`): a dense entry replaces what earlier diffs did, later sparse
    entries add onto it, scales never apply to dense values (config patches are `bake`'s only). Base digests are not checked here; shapes and names are: an entry
    for a parameter the model lacks raises, or with `strict=False` is skipped (a language diff's
    MLM-head or pooler entries on a task model) and listed in the record's `skipped`.
    """
    import torch

    diff = as_diff(diff, "apply_to_model's diff")
    tensors = _model_tensors(model)
    record = AppliedDiff(diff, float(scale), with_dense)
    with torch.no_grad():
        for name, target in _resolve(tensors, diff, with_dense, strict, record.skipped):
            t = tensors[target]
            entry = diff.entries[name]
            if isinstance(entry, DenseEntry):
                record.dense[target] = t.detach().clone()
                t.copy_(torch.from_numpy(np.array(entry.values_f32())).to(t.device).reshape(t.shape))
                continue
            record.sparse[target] = swap.add_sparse(t, diff, name, entry, float(scale))
    return record


def revert_from_model(model: Any, diff: "SparseDiff | AppliedDiff | str | os.PathLike", scale: float = 1.0,
                      with_dense: bool = True, *, strict: bool = True) -> None:
    """Undo `apply_to_model` in place.

    Given the `AppliedDiff` record, values still equal to what apply wrote get their exact
    original back (any dtype) and dense entries are restored; values changed since (training)
    get the delta subtracted. Given a plain `SparseDiff`, the delta × `scale` is subtracted
    (exact up to one rounding to the parameter's dtype); dense entries cannot be reverted that
    way, so they raise unless `with_dense=False`. A path is read as a plain `SparseDiff`.
    """
    import torch

    if not isinstance(diff, AppliedDiff):
        diff = as_diff(diff, "revert_from_model's diff", "the AppliedDiff record apply_to_model returned, a SparseDiff "
                       "or a diff file's path (str or os.PathLike)")
    tensors = _model_tensors(model)
    with torch.no_grad():
        if isinstance(diff, AppliedDiff):
            for target, original in diff.dense.items():
                tensors[target].copy_(original)
            for target, item in diff.sparse.items():
                swap.restore(tensors[target], item)
            return
        for name, target in _resolve(tensors, diff, with_dense, strict, []):
            entry = diff.entries[name]
            if isinstance(entry, DenseEntry):
                raise UsageError(
                    f"cannot revert dense entry {name!r} from the diff alone (the replaced values are gone); "
                    f"pass the record apply_to_model returned, or with_dense=False"
                )
            swap.subtract_sparse(tensors[target], diff, name, entry, float(scale))


def _model_tensors(model: Any) -> dict[str, Any]:
    """Parameters and buffers by state-dict name (tensors share memory with the module)."""
    from .checkpoint import tied_aliases

    state = model.state_dict()
    aliases = tied_aliases(state)
    return {name: state[aliases.get(name, name)] for name in state}


def _resolve(tensors: dict[str, Any], diff: SparseDiff, with_dense: bool, strict: bool,
             skipped: list[str]) -> list[tuple[str, str]]:
    """(entry name, model name) pairs to change, checked for presence, shape and tied duplicates."""
    name_map = NameMap(tensors, diff.entries)
    pairs = []
    seen: dict[int, str] = {}
    for name in diff.entries:
        info = diff.info(name)
        if info.kind == "dense" and not with_dense:
            continue
        target = name_map.to_ref(name)
        if target is None:
            if not strict:
                skipped.append(name)
                continue
            raise VerificationError(f"{diff.path or 'diff'}: the model has no parameter {name!r}; load the "
                                    f"model class the diff was made for, or pass strict=False to skip it")
        t = tensors[target]
        if tuple(t.shape) != info.shape:
            raise VerificationError(f"{diff.path or 'diff'}: {name!r} has shape {list(info.shape)} in the diff "
                                    f"but {list(t.shape)} in the model")
        if not t.is_floating_point():
            raise VerificationError(f"{diff.path or 'diff'}: model tensor {target!r} is not floating point")
        key = t.data_ptr()
        if key in seen:
            raise VerificationError(f"{diff.path or 'diff'}: {name!r} and {seen[key]!r} are the same tied "
                                    f"parameter of the model; the diff must change it once")
        seen[key] = name
        pairs.append((name, target))
    return pairs
