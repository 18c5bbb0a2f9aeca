"""Checking that a diff belongs to a base before anything is computed from the two.

A diff names parameters as the checkpoint it was made from spelled them; the base at hand may
spell them with or without the base-model prefix, so names are matched first, by one `names.NameMap`
(kept in the returned `BaseMatch`; the recorded digests are matched through it too).
Then shapes are compared, every entry's data is checked against the spec (bounds, sortedness,
finiteness), and the base tensors the diff touches are compared with the digests the diff
recorded (`base.tensors`). A diff that recorded only the model fingerprint is checked against
that; a diff that recorded neither cannot be checked and gets a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .checkpoint import Checkpoint
from .diff import SparseDiff
from .dtypes import FLOAT_DTYPES
from .errors import VerificationError
from .fingerprint import model_fingerprint, tensor_digest
from .names import NameMap


@dataclass
class BaseMatch:
    """How a diff's entries line up with a base."""

    names: dict[str, str]  # diff entry name -> base name (its base spelling for a dense entry the base lacks)
    name_map: NameMap | None = None  # how the diff's names relate to the base's
    new: set[str] = field(default_factory=set)  # dense entries for parameters the base lacks (diff names)
    resized: set[str] = field(default_factory=set)  # dense entries whose shape differs from the base's
    warnings: list[str] = field(default_factory=list)


class BaseDigests:
    """Digests of a base's tensors, computed once however many diffs are checked against it."""

    def __init__(self, base: Checkpoint):
        self.base = base
        self._digests: dict[str, str] = {}

    def digest(self, name: str) -> str:
        if name not in self._digests:
            t = self.base.tensors[name]
            self._digests[name] = tensor_digest(t.dtype, t.shape, self.base.array(name))
            self.base.release(name)  # sampled pages would otherwise stay resident for the whole run
        return self._digests[name]

    def all(self) -> dict[str, str]:
        """Digests of every tensor the model fingerprint counts (as `checkpoint_digests`), each once."""
        return {name: self.digest(name) for name in self.base.float_names()}

    def fingerprints(self, diff_names: list[str]) -> set[str]:
        """Model fingerprints of the base as spelled as-is and with the diff's prefix convention
        (a diff made from `BertForMaskedLM` recorded `bert.`-prefixed names)."""
        own = self.all()
        found = {model_fingerprint(own)}
        m = NameMap(own, diff_names)
        added, stripped = m.added, m.stripped
        if added:
            found.add(model_fingerprint({added + n: d for n, d in own.items()}))
        if stripped:
            found.add(model_fingerprint({n[len(stripped):] if n.startswith(stripped) else n: d
                                         for n, d in own.items()}))
        return found


def verify_against_base(diff: SparseDiff, base: Checkpoint, *, label: str | None = None,
                        fingerprint: bool = True, digests: BaseDigests | None = None,
                        replaced: Mapping[str, tuple[int, ...]] | None = None) -> BaseMatch:
    """Match `diff`'s entries to `base`, or raise `VerificationError` naming the diff and tensor.

    Shapes and entry data are always checked; `fingerprint=False` skips only the digest
    comparison (the `--no-verify` of the commands). Pass one `digests` for several diffs against
    the same base so each base tensor is hashed once. In a stack, `replaced` holds the parameters
    (base spelling) that earlier diffs replace with dense entries, and their shapes then: by the
    composition rule a sparse entry for one adds onto that value, so it must fit that shape (the
    base may lack the parameter) and the base's tensor (its digest) does not matter.
    """
    label = label or diff.path or "diff"
    digests = digests or BaseDigests(base)
    replaced = replaced or {}
    name_map = NameMap(base.tensors, diff.entries)
    match = BaseMatch(names={}, name_map=name_map)
    for name in diff.entries:
        info = diff.info(name)
        target = name_map.to_ref(name)
        earlier = replaced.get(target if target is not None else name_map.spell(name))
        if earlier is not None and info.kind == "sparse":
            if info.shape != tuple(earlier):
                raise VerificationError(
                    f"{label}: parameter {name!r} has shape {list(info.shape)} in the diff but an earlier diff's "
                    f"dense entry makes it {list(earlier)}; check the order of the diffs"
                )
            match.names[name] = target if target is not None else name_map.spell(name)
            continue
        if target is None:
            if info.kind != "dense":
                raise VerificationError(
                    f"{label}: parameter {name!r} is not in the base {base.hint or ''}; "
                    f"check that this diff was made from this base"
                )
            match.names[name] = name_map.spell(name)
            match.new.add(name)
            continue
        base_shape = base.tensors[target].shape
        if info.shape != base_shape:
            if info.kind != "dense":
                raise VerificationError(
                    f"{label}: parameter {name!r} has shape {list(info.shape)} in the diff but "
                    f"{list(base_shape)} in the base; check that this diff was made from this base"
                )
            match.resized.add(name)
        if base.tensors[target].dtype not in FLOAT_DTYPES:
            raise VerificationError(f"{label}: parameter {name!r} is {base.tensors[target].dtype} in the base; "
                                    f"only floating-point parameters can be changed")
        match.names[name] = target
    diff.validate()  # bounds, order and finiteness of every entry, before anything is written
    if fingerprint:
        _check_digests(diff, base, name_map, digests, label, match, replaced)
    return match


def _check_digests(diff: SparseDiff, base: Checkpoint, name_map: NameMap, digests: BaseDigests, label: str,
                   match: BaseMatch, replaced: Mapping[str, tuple[int, ...]]) -> None:
    recorded = diff.meta.base.get("tensors") or {}
    if recorded:
        for name in sorted(recorded):
            target = name_map.to_ref(name)
            if (target if target is not None else name_map.spell(name)) in replaced:
                continue  # an earlier diff's dense value, not the base's, is what this diff changes
            if target is None:
                raise VerificationError(
                    f"{label}: was made from a base with tensor {name!r}, which this base lacks; "
                    f"use the base it was made from (its hint: {diff.meta.base_hint}) or pass --no-verify (verify=False in Python)"
                )
            if digests.digest(target) != recorded[name]:
                raise VerificationError(
                    f"{label}: base tensor {target!r} differs from the one this diff was made from "
                    f"(hint: {diff.meta.base_hint}); use that base or pass --no-verify (verify=False in Python)"
                )
        return
    expected = diff.meta.base_fingerprint
    if expected:
        if expected not in digests.fingerprints(list(diff.entries)):
            raise VerificationError(
                f"{label}: base fingerprint differs from the one this diff was made from ({expected}, "
                f"hint: {diff.meta.base_hint}); use that base or pass --no-verify (verify=False in Python)"
            )
        return
    match.warnings.append(f"{label} records no base digests or fingerprint; cannot check it was made from this base")
