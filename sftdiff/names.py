"""The one place that decides how parameter names of two sides relate across the base-model prefix.

A bare `BertModel` spells `encoder.layer.0...`, a `BertForMaskedLM` fine-tuned from it
`bert.encoder.layer.0...`; Llama uses `model.`, RoBERTa `roberta.`. transformers' loader knows the
prefix from the model class and decides per key (keep a key the model has; else strip the prefix,
or add it, when that gives a key the model has). File-level commands do not import model classes,
so the prefix is inferred once from the names themselves, and then the same per-key rule is used.

`NameMap(ref, other)` is that decision for one pair of name sets: `ref` is the side whose spelling
wins (a base checkpoint, a model, the first operand of the algebra), `other` the side being
matched to it (a diff, a fine-tune, another operand). Every command and importer builds one and
asks it, instead of re-inferring the prefix itself.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Mapping, TypeVar

V = TypeVar("V")


class NameMap:
    """How names of `other` correspond to names of `ref` (built once, consulted per key).

    Attributes: `prefix` (the base-model prefix relating the two, "" if none), and its direction
    as the old API spelled it: `added` (other spells ref's names with the prefix: ref is bare) or
    `stripped` (ref spells other's names with it: ref is prefixed); at most one is non-empty.
    """

    def __init__(self, ref: Iterable[str], other: Iterable[str]):
        self.ref = frozenset(ref)
        other = list(dict.fromkeys(other))
        self.prefix, direction = _infer(self.ref, other)
        self.added = self.prefix if direction == "added" else ""
        self.stripped = self.prefix if direction == "stripped" else ""

    def to_ref(self, name: str) -> str | None:
        """`name` as `ref` spells it, or None if `ref` has no such parameter (transformers' per-key
        rule: the name itself, else without the prefix, else with it)."""
        if name in self.ref:
            return name
        p = self.prefix
        if p:
            if name.startswith(p) and name[len(p):] in self.ref:
                return name[len(p):]
            if p + name in self.ref:
                return p + name
        return None

    def spell(self, name: str) -> str:
        """`name` in `ref`'s spelling; a parameter `ref` lacks (a new head, the pooler of a bare
        base) keeps its name minus a prefix `ref` does not use (heads carry no prefix)."""
        target = self.to_ref(name)
        if target is not None:
            return target
        if self.added and name.startswith(self.added) and len(name) > len(self.added):
            return name[len(self.added):]
        return name

    def lookup(self, names: Iterable[str]) -> dict[str, str | None]:
        """name -> `to_ref(name)` for each of `names`."""
        return {name: self.to_ref(name) for name in names}

    def respell(self, items: Mapping[str, V]) -> dict[str, V]:
        """`items` keyed by `spell(name)` (e.g. a diff's recorded base digests, in `ref`'s spelling)."""
        return {self.spell(name): value for name, value in items.items()}

    def __repr__(self) -> str:
        return f"NameMap(prefix={self.prefix!r}, added={self.added!r}, stripped={self.stripped!r})"


def _infer(ref: frozenset[str], other: list[str]) -> tuple[str, str]:
    """(prefix, "added" | "stripped" | "") relating `other` to `ref`: the `head.` that turns the
    most names of `other` that `ref` lacks into names `ref` has, by stripping or by adding it.

    Decided over the unmatched names only, so a diff mixing spellings (an `add` of a bare and a
    prefixed diff that touch different tensors) still finds its prefix."""
    unmatched = [n for n in other if n not in ref]
    if not unmatched:
        return "", ""
    heads = sorted({n.split(".", 1)[0] + "." for n in list(ref) + unmatched if "." in n})
    best = ("", "", 0)
    for p in heads:
        added = sum(1 for n in unmatched if n.startswith(p) and n[len(p):] in ref)
        stripped = sum(1 for n in unmatched if p + n in ref)
        if added > best[2]:
            best = (p, "added", added)
        if stripped > best[2]:
            best = (p, "stripped", stripped)
    return best[0], best[1]


def matches_any(name: str, globs: Iterable[str]) -> bool:
    """Whether `name` matches one of the shell-style `globs` (`*LayerNorm*`, `classifier.*`), case-sensitively."""
    return any(fnmatch.fnmatchcase(name, g) for g in globs)
