"""Resolving a diff argument (a `.sft` path, a foreign format, a Hub id) to a `SparseDiff`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .diff import SparseDiff


def open_diff(source: str, base: Any = None) -> SparseDiff:
    """Load `source` as a diff. `.sft` files are read directly; anything else (another framework's
    format, a folder, a Hub repo id) goes through `sftdiff.formats.load_foreign`, which takes
    shapes and name spellings from `base` (a `Checkpoint`) where the format lacks them."""
    path = Path(source)
    if path.is_file() and _is_sft(path):
        return SparseDiff.load(path)
    from .formats import load_foreign

    return load_foreign(source, base=base)


def _is_sft(path: Path) -> bool:
    """Cheap sniff: a safetensors header that mentions the sft format."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            head = f.read(min(n, 1 << 20))
    except OSError:
        return False
    return head.startswith(b"{") and b'"format":"sft"' in head.replace(b" ", b"")
