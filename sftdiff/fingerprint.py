"""Base fingerprints: cheap digests that tell one checkpoint's weights from another's.

A tensor's digest hashes its dtype, shape and byte size and a sample of its bytes: the whole
tensor up to 64 KiB, otherwise 16 blocks of 4 KiB spread evenly from first byte to last. A
fine-tune changes almost every 4 KiB block (even a 0.1%-dense one changes a given block with
probability > 60%, so one of 16 blocks almost surely), while reading 64 KiB per tensor keeps the
cost to a few megabytes for a whole model. The model fingerprint hashes the sorted
(name, digest) pairs of all floating-point tensors. `spec/format.md` ("Base fingerprint") is the
normative description.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np

from .checkpoint import Checkpoint

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
