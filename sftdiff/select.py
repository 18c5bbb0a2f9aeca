"""Exact top-k selection by magnitude, streamed over tensors, with a documented tie rule.

Candidates are ordered by magnitude, largest first; equal magnitudes are ordered by the tensor's
rank (its position among the parameter names sorted by code point) and then by flat index, the
earlier one winning. Zeros are never selected. Because the global top-k is contained in the union
of every tensor's own top-k, `TopK` keeps at most 2k candidates at a time and never needs more than
one tensor's magnitudes plus O(k) memory (spec: "Selection and ties").
"""

from __future__ import annotations

import numpy as np


def _best(mags: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best (magnitude desc, key asc) among candidates, in O(n)."""
    n = len(mags)
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    tau = np.partition(mags, n - k)[n - k]  # the k-th largest magnitude
    above = np.flatnonzero(mags > tau)
    tied = np.flatnonzero(mags == tau)
    need = k - len(above)
    if need < len(tied):
        tied = tied[np.argpartition(keys[tied], need - 1)[:need]] if need > 0 else tied[:0]
    return np.concatenate([above, tied])


class TopK:
    """Accumulates candidates tensor by tensor and returns the exact global top-k."""

    def __init__(self, k: int, floor: float = 0.0):
        """`floor`: magnitudes below it are ignored from the start. A caller that knows a lower bound
        of the k-th largest magnitude saves work; if fewer than k magnitudes reach the floor, the
        result has fewer than k entries (the caller can then retry with a lower one)."""
        self.k = int(k)
        self._mags: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []  # (rank << 40 | flat index), so keys order as the tie rule
        self._count = 0
        self._floor = float(floor)  # a magnitude below this can no longer make the top-k

    def offer(self, rank: int, magnitudes: np.ndarray) -> None:
        """Offer a tensor's flat magnitudes (float32, non-negative), `rank` its name order."""
        if self.k == 0:
            return
        mags = np.asarray(magnitudes, dtype=np.float32).reshape(-1)
        if mags.size >= 1 << 40:
            raise ValueError("tensors of 2^40 or more elements are not supported")
        idx = np.flatnonzero(mags >= self._floor) if self._floor > 0 else np.flatnonzero(mags)
        if len(idx) > self.k:  # the tensor's own top-k is all that can matter
            idx = idx[_best(mags[idx], idx, self.k)]
        if len(idx) == 0:
            return
        self._mags.append(mags[idx])
        self._keys.append((np.int64(rank) << np.int64(40)) | idx.astype(np.int64))
        self._count += len(idx)
        if self._count >= 2 * self.k:
            self._compact()

    def _compact(self) -> None:
        mags, keys = np.concatenate(self._mags), np.concatenate(self._keys)
        keep = _best(mags, keys, self.k)
        mags, keys = mags[keep], keys[keep]
        self._mags, self._keys, self._count = [mags], [keys], len(mags)
        if len(mags) == self.k:
            self._floor = float(mags.min())

    def result(self) -> dict[int, np.ndarray]:
        """rank -> sorted flat indices selected in that tensor."""
        if not self._mags:
            return {}
        self._compact()
        keys = np.sort(self._keys[0])
        ranks = keys >> np.int64(40)
        out: dict[int, np.ndarray] = {}
        bounds = np.flatnonzero(np.diff(ranks)) + 1
        for chunk in np.split(keys, bounds):
            out[int(chunk[0] >> np.int64(40))] = chunk & np.int64((1 << 40) - 1)
        return out


def select_topk(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the k largest nonzero magnitudes of one array (tie: lower index)."""
    top = TopK(k)
    top.offer(0, magnitudes)
    return top.result().get(0, np.empty(0, dtype=np.int64))


def per_tensor_count(numel: int, density: float) -> int:
    """Values kept per tensor in per-tensor scope: round(density * numel), half up."""
    return int(np.floor(density * numel + 0.5))
