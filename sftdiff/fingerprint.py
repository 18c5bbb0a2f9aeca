"""Base fingerprints: cheap digests that tell one checkpoint's weights from another's.

A tensor's digest hashes its dtype, shape and byte size and a sample of its bytes: the whole
tensor up to 64 KiB, otherwise 16 blocks of 4 KiB spread evenly from first byte to last. A
fine-tune changes almost every 4 KiB block (even a 0.1%-dense one changes a given block with
probability > 60%, so one of 16 blocks almost surely), while reading 64 KiB per tensor keeps the
cost to a few megabytes for a whole model. The model fingerprint hashes the sorted
(name, digest) pairs of all floating-point tensors. `spec/format.md` ("Base fingerprint") is the
normative description.

A diff's content fingerprint (`content_fingerprint`, recorded in provenance and recipes) is the
SHA-256 of its file, or of its canonical entry bytes when it lives only in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

import numpy as np

from .checkpoint import Checkpoint
from .diff import SparseDiff, SparseEntry

SCHEME = "sfp1"
BLOCK = 4096
BLOCKS = 16
WHOLE_LIMIT = BLOCK * BLOCKS


def sample_offsets(nbytes: int) -> list[int]:
    """Start offsets of the sampled blocks of a tensor of `nbytes` bytes ([0] if read whole)."""
    if nbytes <= WHOLE_LIMIT:
        return [0]
    return [i * (nbytes - BLOCK) // (BLOCKS - 1) for i in range(BLOCKS)]


def tensor_digest(dtype: str, shape: tuple[int, ...], raw: np.ndarray) -> str:
    """32 hex digits identifying a tensor's dtype, shape and sampled bytes."""
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    nbytes = int(data.size)
    h = hashlib.sha256()
    h.update(json.dumps([SCHEME, dtype, list(shape), nbytes]).encode())
    if nbytes <= WHOLE_LIMIT:
        h.update(data.tobytes())
    else:
        for start in sample_offsets(nbytes):
            h.update(data[start : start + BLOCK].tobytes())
    return h.hexdigest()[:32]


def checkpoint_digests(ckpt: Checkpoint, names: Iterable[str] | None = None) -> dict[str, str]:
    """Digests of the named tensors (default: every floating-point tensor, tied copies once)."""
    out = {}
    for name in ckpt.float_names() if names is None else names:
        t = ckpt.tensors[name]
        out[name] = tensor_digest(t.dtype, t.shape, ckpt.array(name))
        # The OS maps whole (huge) pages around each sampled block; over a big model that adds up.
        ckpt.release(name)
    return out


def base_record(ckpt: Checkpoint, touched: Iterable[str], hint: str | None = None) -> dict[str, Any]:
    """The `base` metadata of a diff made against `ckpt` that modifies the `touched` tensors."""
    digests = checkpoint_digests(ckpt)
    touched = [n for n in touched if n in ckpt.tensors]
    return {
        "hint": hint if hint is not None else ckpt.hint,
        "fingerprint": model_fingerprint(digests),
        "tensors": {n: digests[n] if n in digests else tensor_digest(
            ckpt.tensors[n].dtype, ckpt.tensors[n].shape, ckpt.array(n)) for n in sorted(touched)},
        "numel": ckpt.float_numel(),
    }


def model_fingerprint(digests: dict[str, str]) -> str:
    """`sfp1:` + 32 hex digits over the sorted (name, digest) pairs."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(json.dumps([name, digests[name]], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return f"{SCHEME}:{h.hexdigest()[:32]}"


def digest_conflicts(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """Names whose base-tensor digests two diffs record differently (sorted)."""
    return sorted(n for n in a.keys() & b.keys() if a[n] != b[n])


def record_as_made_from(checkpoint: Any, in_memory: Checkpoint, entries: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(entries renamed to `checkpoint`'s spelling, the `base` record of `checkpoint`) for a diff
    computed from `in_memory` tensors that came from `checkpoint` (a path or `Checkpoint`): the
    diff then matches the checkpoint's fingerprint and digests. A tensor whose dtype agrees in
    both but whose digest does not shows they are not the same weights, and is refused."""
    from .errors import VerificationError
    from .names import NameMap

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    mapping = NameMap(ckpt.tensors, entries).lookup(entries)
    renamed = {mapping[n] or n: e for n, e in entries.items()}
    for name, target in mapping.items():
        if target is None or name not in in_memory.tensors:
            continue
        mine, theirs = in_memory.tensors[name], ckpt.tensors[target]
        differs = tuple(mine.shape) != tuple(theirs.shape)
        if not differs and mine.dtype == theirs.dtype:  # another dtype (a model loaded in float32) cannot be compared
            differs = (tensor_digest(mine.dtype, mine.shape, in_memory.array(name))
                       != tensor_digest(theirs.dtype, theirs.shape, ckpt.array(target)))
        if differs:
            raise VerificationError(f"base_checkpoint {ckpt.hint or ''}: its tensor {target!r} is not the base tensor "
                                    f"{name!r} given in memory; pass the checkpoint the base tensors came from")
    return renamed, base_record(ckpt, sorted(n for n in renamed if n in ckpt.tensors))


def content_fingerprint(diff: SparseDiff) -> tuple[str, str]:
    """(`sha256:<hex>`, what was hashed: "file" or "entries").

    A diff loaded from a file is identified by its file's bytes. An in-memory diff is identified by
    its entries in name order: for each, the UTF-8 JSON `[name, kind, shape, dtype, base_dtype]`, then
    (sparse) its indices as little-endian int64 and its stored values, or (dense) its stored values.
    """
    h = hashlib.sha256()
    if diff.path and os.path.isfile(diff.path):
        with open(diff.path, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        return f"sha256:{h.hexdigest()}", "file"
    for name in sorted(diff.entries):
        entry = diff.entries[name]
        kind = "sparse" if isinstance(entry, SparseEntry) else "dense"
        h.update(json.dumps([name, kind, list(entry.shape), entry.dtype, entry.base_dtype]).encode())
        if isinstance(entry, SparseEntry):
            h.update(np.asarray(entry.indices, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(entry.values).tobytes())
    return f"sha256:{h.hexdigest()}", "entries"
