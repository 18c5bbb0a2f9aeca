"""The composition rule: what a stack of diffs does to one parameter and to config.json.

Written once here (and in spec/format.md, "Applying a stack of diffs"); `bake` (`apply`),
`apply_to_model` (one diff at a time, in order, which is the same rule), and the algebra's `add`,
`subtract` and `scale` all follow it, so `apply(base, A, B) == apply(base, add(A, B))`:

- Diffs apply in order. A sparse entry adds `scale × values`; a dense entry replaces the
  parameter (or adds it, when the base lacks it). Scales never apply to dense entries.
- So for one parameter only the entries from the LAST dense entry on matter: that dense value,
  plus the sparse entries after it. Sparse entries before it (and earlier dense entries) are
  overwritten (`effective`).
- Config patches merge key by key; a later diff wins, with a warning naming the key and both
  diffs when the values differ (`merge_config_patches`). A diff applied without its dense
  entries (`apply --skip-dense`) contributes no patch, since its patch describes that head.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


class CompositionWarning(UserWarning):
    """Something the user should know about how diffs were combined (a config key overridden, ...)."""


def last_dense(kinds: Sequence[str]) -> int | None:
    """Position of the last "dense" in `kinds` (one entry per diff touching a parameter, in order)."""
    found = None
    for i, kind in enumerate(kinds):
        if kind == "dense":
            found = i
    return found


def effective(ops: Sequence[T], kind_of: Callable[[T], str]) -> list[T]:
    """The entries of a parameter's stack (in order) that decide its value: from the last dense
    entry on (all of them if none is dense)."""
    start = last_dense([kind_of(op) for op in ops])
    return list(ops if start is None else ops[start:])


def overwritten(ops: Sequence[T], kind_of: Callable[[T], str]) -> list[T]:
    """The entries a later dense entry overwrites (they have no effect on the result)."""
    start = last_dense([kind_of(op) for op in ops])
    return [] if start is None else list(ops[:start])


def merge_config_patches(patches: Sequence[tuple[str, dict[str, Any] | None]],
                         warn: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """(label, patch) pairs in diff order merged key by key, a later patch winning. Each key set to
    different values is reported through `warn` (default: a `CompositionWarning`). None if no
    diff has a patch."""
    warn = warn or _warn
    out: dict[str, Any] = {}
    owner: dict[str, str] = {}
    found = False
    for label, patch in patches:
        if patch is None:
            continue
        found = True
        for key, value in patch.items():
            if key in out and out[key] != value:
                warn(f"config_patch key {key!r} is {_short(out[key])} in {owner[key]} and {_short(value)} in "
                     f"{label}; the later one, {label}, wins")
            out[key], owner[key] = value, label
    return out if found else None


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _warn(message: str) -> None:
    warnings.warn(message, CompositionWarning, stacklevel=3)


__all__ = ["CompositionWarning", "last_dense", "effective", "overwritten", "merge_config_patches"]
