"""Matching parameter names across checkpoints that differ by the base-model prefix.

A bare `BertModel` spells `encoder.layer.0...`, a `BertForMaskedLM` fine-tuned from it
`bert.encoder.layer.0...`; Llama uses `model.`. Like transformers' loader (which decides per key:
strip the prefix if the stripped name exists, add it if the prefixed name exists), names are
matched one by one; the prefix is inferred from the names themselves, since file-level commands
do not import the model classes.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable


def infer_prefix(base: Iterable[str], other: Iterable[str]) -> tuple[str, str]:
    """The prefix to add to base names ("bert.", ...) and the one to strip from them.

    Returns (added, stripped): `other` names are `added + base name` or base names are
    `stripped + other name`; at most one is non-empty.
    """
    base, other = set(base), set(other)
    if base & other and len(base & other) * 2 >= min(len(base), len(other)):
        return "", ""
    best = ("", "", 0)
    heads = {n.split(".", 1)[0] + "." for n in base | other if "." in n}
    for p in sorted(heads):
        added = sum(1 for n in base if p + n in other)
        stripped = sum(1 for n in other if p + n in base)
        if added > best[2]:
            best = (p, "", added)
        if stripped > best[2]:
            best = ("", p, stripped)
    return best[0], best[1]


def map_to_base(base: Iterable[str], other: Iterable[str]) -> dict[str, str | None]:
    """For each name in `other`, the base name it corresponds to (None if the base lacks it)."""
    base = set(base)
    other = list(other)
    added, stripped = infer_prefix(base, other)
    out: dict[str, str | None] = {}
    for name in other:
        if name in base:
            out[name] = name
        elif added and name.startswith(added) and name[len(added):] in base:
            out[name] = name[len(added):]
        elif stripped and stripped + name in base:
            out[name] = stripped + name
        else:
            out[name] = None
    return out


def matches_any(name: str, globs: Iterable[str]) -> bool:
    """Whether `name` matches one of the shell-style `globs` (`*LayerNorm*`, `classifier.*`), case-sensitively."""
    return any(fnmatch.fnmatchcase(name, g) for g in globs)
