"""Resolving a diff argument (a `.sft` path, a foreign format, a Hub id) to a `SparseDiff`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .diff import SparseDiff
from .errors import UsageError


def open_diff(source: str, base: Any = None) -> SparseDiff:
    """Load `source` as a diff. `.sft` files are read directly; anything else (another framework's
    format, a folder, a Hub repo id) goes through `sftdiff.formats.load_foreign`, which takes
    shapes and name spellings from `base` (a `Checkpoint`) where the format lacks them."""
    path = Path(source)
    if path.is_file() and _is_sft(path):
        return SparseDiff.load(path)
    from .formats import load_foreign

    return load_foreign(source, base=base)


def same_source(a: str, b: str) -> bool:
    """Whether two arguments name the same diff: the same file or folder however spelled
    (`./lang.sft`, an absolute path, a symlink), else the same text (a Hub id)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(a) == os.path.normpath(b)


def with_dense_flags(diffs: Sequence[str], skip_dense: Sequence[str]) -> list[bool]:
    """Per diff argument, whether its dense entries are applied: not when a `--skip-dense` names it
    (however spelled); a `--skip-dense` naming none of them is a usage error."""
    unknown = [s for s in skip_dense if not any(same_source(d, s) for d in diffs)]
    if unknown:
        raise UsageError(f"--skip-dense {unknown[0]} is not one of the DIFF arguments ({', '.join(diffs)})")
    return [not any(same_source(d, s) for s in skip_dense) for d in diffs]


def _looks_like_checkpoint(arg: str) -> bool:
    from .checkpoint import BIN_INDEX, BIN_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE

    p = Path(arg)
    return p.is_dir() and any((p / n).is_file() for n in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX, BIN_SINGLE, BIN_INDEX))


def check_order(command: str, base: str, diffs: Sequence[str], rest: str) -> None:
    """Say so when the base and a diff were given the wrong way round (`apply task.sft base/`),
    for every command taking `BASE DIFF...`; `rest` is the rest of its usage (`-o OUT`)."""
    checkpoints = [d for d in diffs if _looks_like_checkpoint(d)]
    if looks_like_diff(base):  # by content: a garbage file named x.sft is not a diff
        if checkpoints:
            others = " ".join([base, *(d for d in diffs if d != checkpoints[0])])
            raise UsageError(f"the arguments look swapped: BASE {base} is a diff and {checkpoints[0]} a checkpoint; "
                             f"the base comes first: sftdiff {command} {checkpoints[0]} {others} {rest}")
        raise UsageError(f"BASE {base} is a diff, not a checkpoint; give the base model first: "
                         f"sftdiff {command} BASE {base} {rest}")
    if checkpoints:
        raise UsageError(f"DIFF {checkpoints[0]} is a model checkpoint, not a diff; to make a diff from a fine-tune, "
                         f"run sftdiff create {base} {checkpoints[0]} -o diff.sft")


def looks_like_diff(source: str | Path) -> bool:
    """Cheaply, without parsing it: is `source` a local diff (a `.sft` file by its header, or a
    folder holding one, a composable-sft `pytorch_diff.bin` or a PEFT `adapter_config.json`)?
    For telling swapped arguments apart; a file merely named `*.sft` is not a diff."""
    from .formats import ADAPTER_CONFIG, COMPOSABLE_FILE

    path = Path(source)
    if path.is_file():
        return _is_sft(path)
    return path.is_dir() and (any(p.is_file() and _is_sft(p) for p in path.glob("*.sft"))
                              or (path / COMPOSABLE_FILE).is_file() or (path / ADAPTER_CONFIG).is_file())


def _is_sft(path: Path) -> bool:
    """Cheap sniff: a safetensors header that mentions the sft format."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            head = f.read(min(n, 1 << 20))
    except OSError:
        return False
    return head.startswith(b"{") and b'"format":"sft"' in head.replace(b" ", b"")
