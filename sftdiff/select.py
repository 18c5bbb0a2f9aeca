"""Exact top-k selection by magnitude, streamed over tensors, with a documented tie rule.

Candidates are ordered by magnitude, largest first; equal magnitudes are ordered by the tensor's
rank (its position among the parameter names sorted by code point) and then by flat index, the
earlier one winning. Zeros are never selected. Because the global top-k is contained in the union
of every tensor's own top-k, `TopK` keeps at most 2k candidates at a time and never needs more than
one tensor's magnitudes plus O(k) memory (spec: "Selection and ties").

A caller that filters candidates itself (`create` does, in worker threads) reads `TopK.floor` and
offers only positions reaching it with `offer_at`; the result is the same as offering everything.
"""

from __future__ import annotations

import numpy as np

_RANK_SHIFT = np.int64(40)
_INDEX_MASK = np.int64((1 << 40) - 1)


def _best(mags: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray | None:
    """Mask of the k best (magnitude desc, key asc) among candidates, in O(n); None: all of them.
    A mask keeps the candidates' order (candidates that arrive in key order stay in key order and
    need no sort later) and compresses faster than an index gather."""
    n = len(mags)
    if k >= n:
        return None
    if k <= 0:
        return np.zeros(n, dtype=bool)
    tau = np.partition(mags, n - k)[n - k]  # the k-th largest magnitude
    keep = mags > tau
    tied = np.flatnonzero(mags == tau)
    need = k - int(np.count_nonzero(keep))
    if need < len(tied):
        tied = tied[np.argpartition(keys[tied], need - 1)[:need]] if need > 0 else tied[:0]
    keep[tied] = True
    return keep


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
        self._last_key = -1  # the largest key offered so far: while offers ascend, result() needs no sort
        self._ascending = True

    @property
    def floor(self) -> float:
        """Magnitudes below this can no longer enter the top-k (0.0: every nonzero one can).
        Only ever rises, so a value read earlier is a safe pre-filter later."""
        return self._floor

    def offer(self, rank: int, magnitudes: np.ndarray) -> None:
        """Offer a tensor's flat magnitudes (float32, non-negative), `rank` its name order."""
        if self.k == 0:
            return
        mags = np.asarray(magnitudes, dtype=np.float32).reshape(-1)
        if mags.size >= 1 << 40:
            raise ValueError("tensors of 2^40 or more elements are not supported")
        idx = np.flatnonzero(mags >= self._floor) if self._floor > 0 else np.flatnonzero(mags)
        self._add(rank, idx, mags[idx])

    def offer_at(self, rank: int, indices: np.ndarray, magnitudes: np.ndarray) -> None:
        """Offer the magnitudes of a tensor at some flat `indices` only (each index once, e.g.
        the positions a caller found reaching `floor`); positions not offered count as below it."""
        if self.k == 0:
            return
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        mags = np.asarray(magnitudes, dtype=np.float32).reshape(-1)
        if idx.size and int(idx.max()) >= 1 << 40:
            raise ValueError("tensors of 2^40 or more elements are not supported")
        keep = mags >= self._floor if self._floor > 0 else mags != 0
        if not keep.all():
            idx, mags = idx[keep], mags[keep]
        self._add(rank, idx, mags)

    def _add(self, rank: int, idx: np.ndarray, mags: np.ndarray) -> None:
        if len(idx) > self.k:  # the tensor's own top-k is all that can matter
            best = _best(mags, idx, self.k)
            idx, mags = idx[best], mags[best]  # (never None here: len > k)
        if len(idx) == 0:
            return
        keys = (np.int64(rank) << _RANK_SHIFT) | idx
        if self._ascending:
            self._ascending = int(keys[0]) > self._last_key and bool(np.all(keys[1:] > keys[:-1]))
            self._last_key = int(keys[-1])
        self._mags.append(mags)
        self._keys.append(keys)
        self._count += len(idx)
        if self._count >= 2 * self.k:
            self._compact()

    def _compact(self) -> None:
        mags, keys = np.concatenate(self._mags), np.concatenate(self._keys)
        keep = _best(mags, keys, self.k)
        if keep is not None:
            mags, keys = mags[keep], keys[keep]
        self._mags, self._keys, self._count = [mags], [keys], len(mags)
        if len(mags) == self.k:
            self._floor = max(self._floor, float(mags.min()))

    def result(self) -> dict[int, np.ndarray]:
        """rank -> sorted flat indices selected in that tensor."""
        if not self._mags:
            return {}
        keys = np.concatenate(self._keys)  # a last compaction, of the keys only: no magnitudes needed
        keep = _best(np.concatenate(self._mags), keys, self.k)
        if keep is not None:
            keys = keys[keep]
        if not self._ascending:
            keys = np.sort(keys)
        ranks = keys >> _RANK_SHIFT
        out: dict[int, np.ndarray] = {}
        bounds = np.flatnonzero(ranks[1:] != ranks[:-1]) + 1
        for chunk in np.split(keys, bounds):
            out[int(chunk[0] >> _RANK_SHIFT)] = chunk & _INDEX_MASK
        return out


def select_topk(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the k largest nonzero magnitudes of one array (tie: lower index)."""
    top = TopK(k)
    top.offer(0, magnitudes)
    return top.result().get(0, np.empty(0, dtype=np.int64))


def per_tensor_count(numel: int, density: float) -> int:
    """Values kept per tensor in per-tensor scope: round(density * numel), half up."""
    return int(np.floor(density * numel + 0.5))
