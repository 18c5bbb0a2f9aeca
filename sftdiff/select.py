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
_MAX_INDEX = 1 << 40


class _Chunk:
    """One offer that survived so far: a tensor's flat indices, magnitudes and payload arrays."""

    __slots__ = ("rank", "idx", "mags", "payload")

    def __init__(self, rank: int, idx: np.ndarray, mags: np.ndarray, payload: tuple[np.ndarray, ...]):
        self.rank, self.idx, self.mags, self.payload = rank, idx, mags, payload

    def take(self, at: np.ndarray) -> "_Chunk":
        # `take` of positions: several times faster than indexing each array with a boolean mask
        return _Chunk(self.rank, self.idx.take(at), self.mags.take(at), tuple(p.take(at) for p in self.payload))


def _kept(chunks: list[_Chunk], k: int) -> tuple[list[np.ndarray | None], float | None]:
    """For each chunk, the positions of its candidates among the k best of all chunks (magnitude
    desc, then rank asc, then index asc), in the chunk's order, or None for all of them; and the
    k-th largest magnitude (None: there are no more than k, all are kept).

    Only the magnitudes are concatenated (to find the k-th one); ties at it are settled on the
    keys of the tied candidates alone, so the 8-byte keys of everything are never built."""
    n = sum(len(c.idx) for c in chunks)
    if n <= k:
        return [None] * len(chunks), None
    if k <= 0:
        return [np.empty(0, np.int64)] * len(chunks), None
    every = np.concatenate([c.mags for c in chunks]) if len(chunks) > 1 else chunks[0].mags
    # Non-negative floats order as their bit patterns, and integers partition faster.
    tau = np.partition(every.view(np.uint32), n - k)[n - k].view(np.float32)
    need = k - int(np.count_nonzero(every > tau))  # how many of the candidates equal to tau stay
    del every
    tied = [np.flatnonzero(c.mags == tau) for c in chunks]
    keys = [(np.int64(c.rank) << _RANK_SHIFT) | c.idx[t] for c, t in zip(chunks, tied)]
    n_tied = sum(len(t) for t in tied)
    last_key = np.partition(np.concatenate(keys), need - 1)[need - 1] if need < n_tied else None
    kept: list[np.ndarray | None] = []
    for c, t, key in zip(chunks, tied, keys):
        mask = c.mags > tau
        mask[t] = True if last_key is None else key <= last_key
        at = np.flatnonzero(mask)
        kept.append(None if len(at) == len(mask) else at)
    return kept, float(tau)


def _cut(chunks: list[_Chunk], k: int) -> tuple[list[_Chunk], float | None]:
    """The chunks reduced to the k best candidates (see `_kept`), and the k-th largest magnitude."""
    kept, tau = _kept(chunks, k)
    return [c if at is None else c.take(at) for c, at in zip(chunks, kept) if at is None or len(at)], tau


class TopK:
    """Accumulates candidates tensor by tensor and returns the exact global top-k."""

    def __init__(self, k: int, floor: float = 0.0):
        """`floor`: magnitudes below it are ignored from the start. A caller that knows a lower bound
        of the k-th largest magnitude saves work; if fewer than k magnitudes reach the floor, the
        result has fewer than k entries (the caller can then retry with a lower one)."""
        self.k = int(k)
        self._chunks: list[_Chunk] = []
        self._count = 0
        self._floor = float(floor)  # a magnitude below this can no longer make the top-k

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
        if mags.size >= _MAX_INDEX:
            raise ValueError("tensors of 2^40 or more elements are not supported")
        idx = np.flatnonzero(mags >= self._floor) if self._floor > 0 else np.flatnonzero(mags)
        self._add_chunk(_Chunk(rank, idx, mags[idx], ()))

    def offer_at(self, rank: int, indices: np.ndarray, magnitudes: np.ndarray,
                 payload: tuple[np.ndarray, ...] = ()) -> None:
        """Offer the magnitudes of a tensor at some flat `indices` only (each index once, e.g.
        the positions a caller found reaching `floor`); positions not offered count as below it.
        `payload`: arrays aligned with `indices` (the values there, ...) that travel with the
        candidates and come back with the selected ones (`result_with_payload`)."""
        if self.k == 0:
            return
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        mags = np.asarray(magnitudes, dtype=np.float32).reshape(-1)
        if idx.size and int(idx.max()) >= _MAX_INDEX:
            raise ValueError("tensors of 2^40 or more elements are not supported")
        keep = mags >= self._floor if self._floor > 0 else mags != 0
        chunk = _Chunk(rank, idx, mags, tuple(np.asarray(p).reshape(-1) for p in payload))
        if not keep.all():
            chunk = chunk.take(np.flatnonzero(keep))
        self._add_chunk(chunk)

    def _add_chunk(self, chunk: _Chunk) -> None:
        if len(chunk.idx) > self.k:  # the tensor's own top-k is all that can matter
            chunk = _cut([chunk], self.k)[0][0]
        if len(chunk.idx) == 0:
            return
        self._chunks.append(chunk)
        self._count += len(chunk.idx)
        if self._count >= 2 * self.k:
            self._chunks, tau = _cut(self._chunks, self.k)
            self._count = sum(len(c.idx) for c in self._chunks)
            if tau is not None and self._count == self.k:
                self._floor = max(self._floor, tau)

    def result(self) -> dict[int, np.ndarray]:
        """rank -> sorted flat indices selected in that tensor."""
        return {rank: idx for rank, (idx, _) in self.result_with_payload().items()}

    def result_with_payload(self) -> dict[int, tuple[np.ndarray, tuple[np.ndarray, ...]]]:
        """rank -> (sorted flat indices selected in that tensor, their payload arrays in that order)."""
        kept, _ = _kept(self._chunks, self.k)
        by_rank: dict[int, list[tuple[_Chunk, np.ndarray | None]]] = {}
        for c, at in zip(self._chunks, kept):
            if at is None or len(at):
                by_rank.setdefault(c.rank, []).append((c, at))
        out = {}
        for rank in sorted(by_rank):
            parts = by_rank[rank]
            idx = _gather([c.idx for c, _ in parts], [at for _, at in parts])
            payload = tuple(_gather([c.payload[i] for c, _ in parts], [at for _, at in parts])
                            for i in range(len(parts[0][0].payload)))
            if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):  # offers out of index order
                order = np.argsort(idx, kind="stable")
                idx, payload = idx[order], tuple(p[order] for p in payload)
            out[rank] = (idx, payload)
        return out


def _gather(arrays: list[np.ndarray], positions: list[np.ndarray | None]) -> np.ndarray:
    """The concatenation of arrays[i][positions[i]] (None: all of it), written once."""
    sizes = [len(a) if at is None else len(at) for a, at in zip(arrays, positions)]
    out = np.empty(sum(sizes), arrays[0].dtype)
    start = 0
    for a, at, size in zip(arrays, positions, sizes):
        if at is None:
            out[start:start + size] = a
        else:
            np.take(a, at, out=out[start:start + size])
        start += size
    return out


def select_topk(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the k largest nonzero magnitudes of one array (tie: lower index)."""
    top = TopK(k)
    top.offer(0, magnitudes)
    return top.result().get(0, np.empty(0, dtype=np.int64))


def per_tensor_count(numel: int, density: float) -> int:
    """Values kept per tensor in per-tensor scope: round(density * numel), half up."""
    return int(np.floor(density * numel + 0.5))
