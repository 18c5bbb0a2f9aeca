"""Exact streamed top-k (sftdiff/select.py) against a brute-force sort, spec "Selection and ties".

The order is magnitude descending, then tensor rank ascending, then flat index ascending; zeros are never
selected and magnitudes below `floor` are ignored. Magnitudes are drawn from a few small values so that
ties at the k-th magnitude are the rule, ranks and indices are offered out of order, and k ranges from 0
to past the total so that both the compaction (>= 2k held) and the per-offer cut (> k in one offer) run.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftdiff.select import TopK, per_tensor_count, select_topk

MAGS = [0.0, 0.5, 1.0, 2.0, 3.0]  # few values: heavy ties; exact in float32
BIG = 1 << 40  # the first flat index TopK refuses
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- a model of the offers, the brute-force reference, and the checks --------------------------------

@st.composite
def offers(draw, dense_allowed: bool = True):
    """A list of offers, interleaved across ranks in random order.

    Each is ("dense", rank, mags) or ("sparse", rank, idx, mags); a rank is offered either once densely
    or in several sparse offers with disjoint indices (each in shuffled order), some near 2^40."""
    ranks = draw(st.lists(st.integers(0, 5000), min_size=1, max_size=6, unique=True))  # key: rank << 40
    out = []
    for rank in ranks:
        if dense_allowed and draw(st.booleans()):
            n = draw(st.integers(0, 30))
            mags = draw(st.lists(st.sampled_from(MAGS), min_size=n, max_size=n))
            out.append(("dense", rank, np.array(mags, dtype=np.float32)))
            continue
        positions = draw(st.lists(st.one_of(st.integers(0, 60), st.integers(BIG - 40, BIG - 1)),
                                  max_size=30, unique=True))
        positions = draw(st.permutations(positions))
        cuts = sorted(draw(st.lists(st.integers(0, len(positions)), max_size=3)))
        for lo, hi in zip([0] + cuts, cuts + [len(positions)]):
            part = positions[lo:hi]
            mags = draw(st.lists(st.sampled_from(MAGS), min_size=len(part), max_size=len(part)))
            out.append(("sparse", rank, np.array(part, dtype=np.int64), np.array(mags, dtype=np.float32)))
    return draw(st.permutations(out))


def candidates(offer_list) -> list[tuple[float, int, int]]:
    """Every (magnitude, rank, index) offered, zeros included."""
    out = []
    for o in offer_list:
        if o[0] == "dense":
            out += [(float(m), o[1], i) for i, m in enumerate(o[2])]
        else:
            out += [(float(m), o[1], int(i)) for i, m in zip(o[2], o[3])]
    return out


def reference(cands, k: int, floor: float = 0.0) -> dict[int, list[int]]:
    """The spec's rule by brute force: sort by (-magnitude, rank, index), take the first k."""
    eligible = [c for c in cands if c[0] != 0 and c[0] >= floor]
    best = sorted(eligible, key=lambda c: (-c[0], c[1], c[2]))[:max(k, 0)]
    out: dict[int, list[int]] = {}
    for _, rank, idx in best:
        out.setdefault(rank, []).append(idx)
    return {rank: sorted(v) for rank, v in sorted(out.items())}


def payload_of(rank: int, idx: np.ndarray) -> tuple[np.ndarray, ...]:
    """Three payload arrays of different dtypes, each a function of (rank, index) to check against."""
    return ((idx * 7 + rank).astype(np.int64),
            ((idx * 3 + rank * 5) % 65521).astype(np.uint16),
            (idx % 1000).astype(np.float32) + np.float32(rank) / np.float32(8))


def feed(top: TopK, offer_list) -> None:
    for o in offer_list:
        if o[0] == "dense":
            top.offer(o[1], o[2])
        else:
            top.offer_at(o[1], o[2], o[3], payload=payload_of(o[1], o[2]))


def assert_result(top: TopK, offer_list, expected: dict[int, list[int]]) -> None:
    dense_ranks = {o[1] for o in offer_list if o[0] == "dense"}
    got = top.result()
    assert sorted(got) == list(expected), (got, expected)
    for rank, idx in got.items():
        assert idx.dtype.kind == "i"
        assert idx.tolist() == expected[rank], (rank, idx, expected[rank])
    with_payload = top.result_with_payload()
    assert sorted(with_payload) == list(expected)
    for rank, (idx, payload) in with_payload.items():
        assert idx.tolist() == expected[rank]
        if rank in dense_ranks:
            assert payload == ()
            continue
        want = payload_of(rank, np.array(expected[rank], dtype=np.int64))
        assert len(payload) == len(want)
        for got_p, want_p in zip(payload, want):
            assert got_p.dtype == want_p.dtype
            np.testing.assert_array_equal(got_p, want_p)


def k_for(data, total: int) -> int:
    """k anywhere from 0 to past the total, with small k (compaction, per-offer cuts) often."""
    return data.draw(st.one_of(st.integers(2, 5), st.integers(1, max(1, total // 2)),
                               st.integers(0, total + 3)), label="k")


def check_against_reference(data, offer_list) -> None:
    """Feed the offers to a TopK of a drawn k and compare its result with the brute-force one."""
    cands = candidates(offer_list)
    k = k_for(data, len(cands))
    top = TopK(k)
    feed(top, offer_list)
    assert_result(top, offer_list, reference(cands, k))


# --- 1, 2: exact top-k with ties, payload travelling ------------------------------------------------

@pytest.mark.parametrize("dense_allowed", [False, True], ids=["offer_at", "offer-and-offer_at"])
@SETTINGS
@given(data=st.data())
def test_offers_match_brute_force(dense_allowed, data):
    check_against_reference(data, data.draw(offers(dense_allowed=dense_allowed), label="offers"))


def test_compaction_and_per_offer_cut_both_exercised():
    """A fixed case that goes through both paths: tied magnitudes across ranks offered high rank first."""
    top = TopK(3)
    top.offer_at(9, np.array([5, 1, 3, 0]), np.array([2, 2, 2, 2], np.float32),
                 payload=(np.array([50, 10, 30, 0], np.int64),))  # 4 > k: cut to indices 0, 1, 3
    top.offer(4, np.array([0, 2, 0, 1], np.float32))  # held 3 + 2 < 2k
    first = {r: i.tolist() for r, i in top.result().items()}
    assert first == {4: [1], 9: [0, 1]}  # a result taken midway must not disturb later offers
    assert top.floor == 0.0
    top.offer_at(2, np.array([8]), np.array([2], np.float32), payload=(np.array([80], np.int64),))
    assert top.floor == 2.0  # held 6 >= 2k: compacted to 3, the 3rd magnitude is 2
    got = top.result_with_payload()
    # magnitude 2 everywhere: rank 2 first, then rank 4, then rank 9's lowest index
    assert {r: i.tolist() for r, (i, _) in got.items()} == {2: [8], 4: [1], 9: [0]}
    assert got[9][1][0].tolist() == [0] and got[2][1][0].tolist() == [80]
    assert {r: i.tolist() for r, i in top.result().items()} == {2: [8], 4: [1], 9: [0]}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_float32_magnitudes_order_exactly(data):
    """Subnormals, huge values and infinity order as numbers (the k-th one is found on bit patterns)."""
    mag = st.one_of(st.sampled_from([0.0, 1e-45, 1.1754942e-38, 1.0, 3.4028235e38, float("inf")]),
                    st.floats(min_value=0.0, width=32, allow_nan=False))
    offer_list = []
    for rank in data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True), label="ranks"):
        mags = np.array(data.draw(st.lists(mag, max_size=20), label="mags"), dtype=np.float32)
        if data.draw(st.booleans(), label="dense"):
            offer_list.append(("dense", rank, mags))
        else:
            offer_list.append(("sparse", rank, np.arange(len(mags))[::-1].copy(), mags))
    check_against_reference(data, offer_list)


def test_strided_and_float64_inputs():
    """Views that are not contiguous and float64 magnitudes are taken as given (converted to float32)."""
    base = np.array([5, 0, 1, 0, 3, 0, 3, 0, 2, 0], np.float32)
    payload = np.arange(100, 110, dtype=np.int32)
    top = TopK(2)
    top.offer_at(1, np.arange(5)[::-1], base[::2][::-1], payload=(payload[::2][::-1],))  # mags 2,3,3,1,5
    top.offer(0, np.array([[3.0, 0.0], [0.5, 3.0]], np.float64).T)  # flat (transposed): 3, 0.5, 0, 3
    got = top.result_with_payload()
    # 5 (rank 1 index 0), then the 3s: rank 0 indices 0 and 3 come before rank 1's
    assert {r: i.tolist() for r, (i, _) in got.items()} == {0: [0], 1: [0]}
    assert got[1][1][0].tolist() == [100] and got[1][1][0].dtype == np.int32
    assert got[0][1] == ()


def test_negative_zero_is_zero():
    top = TopK(3)
    top.offer(0, np.array([-0.0, 1.0, -0.0], np.float32))
    top.offer_at(1, np.array([4, 2]), np.array([-0.0, 2.0], np.float32))
    assert {r: i.tolist() for r, i in top.result().items()} == {0: [1], 1: [2]}


# --- 3, 4: the floor ---------------------------------------------------------------------------------

@SETTINGS
@given(data=st.data())
def test_initial_floor_ignores_smaller_magnitudes(data):
    offer_list = data.draw(offers(), label="offers")
    cands = candidates(offer_list)
    k = k_for(data, len(cands))
    floor = data.draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0]), label="floor")
    top = TopK(k, floor=floor)
    feed(top, offer_list)
    expected = reference(cands, k, floor)
    assert_result(top, offer_list, expected)
    mag = {(r, i): m for m, r, i in cands}
    assert all(mag[r, i] >= floor for r, idx in expected.items() for i in idx)


@SETTINGS
@given(data=st.data())
def test_floor_rises_soundly_and_compaction_sets_it(data):
    """After each offer the floor equals what the documented mechanics give (held count modelled here):
    a compaction at >= 2k held leaves exactly k and raises the floor to the k-th largest eligible
    magnitude so far; it never rises past that, never falls, and bounds every selected magnitude."""
    offer_list = data.draw(offers(), label="offers")
    cands = candidates(offer_list)
    k = k_for(data, len(cands))
    initial = data.draw(st.sampled_from([0.0, 0.0, 1.0, 2.0]), label="floor")
    top = TopK(k, floor=initial)
    assert top.floor == initial
    held, floor, seen = 0, initial, []
    compactions = 0
    for o in offer_list:
        mags = o[2] if o[0] == "dense" else o[3]
        seen += [float(m) for m in mags if m != 0 and m >= initial]
        eligible = int(np.count_nonzero(mags >= floor if floor > 0 else mags != 0))
        before = top.floor
        feed(top, [o])
        if k > 0 and eligible:
            held += min(eligible, k)
            if held >= 2 * k:
                held = k
                floor = sorted(seen, reverse=True)[k - 1]
                compactions += 1
        assert top.floor >= before
        assert top.floor == floor, (o, k, held)
        if len(seen) >= k > 0:
            assert top.floor <= sorted(seen, reverse=True)[k - 1]
        else:
            assert top.floor == initial
    mag = {(r, i): m for m, r, i in cands}
    for rank, idx in top.result().items():
        assert all(mag[rank, int(i)] >= top.floor for i in idx)
    assert_result(top, offer_list, reference(cands, k, initial))


def test_floor_set_by_compaction_example():
    top = TopK(2)
    top.offer(0, np.array([1, 3, 0, 2], np.float32))  # 3 eligible > k: cut to 2 held, no compaction
    assert top.floor == 0.0
    top.offer_at(1, np.array([4, 2]), np.array([2, 1], np.float32))  # held 4 >= 2k: floor -> 2nd = 2.0
    assert top.floor == 2.0
    top.offer_at(2, np.array([0, 1]), np.array([1.5, 2], np.float32))  # 1.5 < floor: not held
    assert top.floor == 2.0
    # magnitude 3 (rank 0, index 1), then the 2.0s: rank 0 index 3 wins over rank 1 and rank 2
    assert {r: i.tolist() for r, i in top.result().items()} == {0: [1, 3]}


# --- 5: edge cases -----------------------------------------------------------------------------------

def test_k_zero_selects_nothing():
    top = TopK(0)
    top.offer(0, np.array([1, 2, 3], np.float32))
    top.offer_at(1, np.array([0, 5]), np.array([4, 4], np.float32), payload=(np.array([1, 2]),))
    assert top.result() == {}
    assert top.result_with_payload() == {}
    assert top.floor == 0.0


def test_empty_offers_and_all_zero_magnitudes():
    top = TopK(3)
    top.offer(0, np.empty(0, np.float32))
    top.offer_at(1, np.empty(0, np.int64), np.empty(0, np.float32), payload=(np.empty(0, np.int64),))
    top.offer(2, np.zeros(10, np.float32))
    top.offer_at(3, np.array([7, 1, 4]), np.zeros(3, np.float32), payload=(np.array([1, 2, 3]),))
    assert top.result() == {}
    assert top.result_with_payload() == {}
    top.offer_at(1, np.array([6, 2]), np.array([0, 1], np.float32), payload=(np.array([60, 20]),))
    got = top.result_with_payload()
    assert list(got) == [1]
    assert got[1][0].tolist() == [2] and got[1][1][0].tolist() == [20]


def test_single_candidate():
    top = TopK(5)
    top.offer_at(3, np.array([BIG - 1]), np.array([0.25], np.float32),
                 payload=(np.array([42], np.int64), np.array([7], np.uint16)))
    got = top.result_with_payload()
    assert list(got) == [3]
    idx, (a, b) = got[3]
    assert idx.tolist() == [BIG - 1]
    assert a.tolist() == [42] and a.dtype == np.int64
    assert b.tolist() == [7] and b.dtype == np.uint16


def test_index_of_2_pow_40_is_refused():
    top = TopK(1)
    with pytest.raises(ValueError, match="2\\^40"):
        top.offer_at(0, np.array([3, BIG]), np.array([1, 1], np.float32))
    with pytest.raises(ValueError, match="2\\^40"):
        # a stride-0 view: no memory, but 2^40 elements
        top.offer(1, np.broadcast_to(np.float32(1), (BIG,)))
    top.offer_at(0, np.array([BIG - 1]), np.array([1], np.float32))  # the largest allowed index
    assert {r: i.tolist() for r, i in top.result().items()} == {0: [BIG - 1]}


def test_one_offer_larger_than_k():
    mags = np.array([1, 3, 3, 2, 3, 0, 3], np.float32)
    top = TopK(2)
    top.offer(0, mags)
    assert top.result()[0].tolist() == [1, 2]  # four 3s tie: the lowest indices win

    top = TopK(3)
    idx = np.array([6, 4, 2, 1, 3])
    top.offer_at(5, idx, mags[idx], payload=(idx * 10, idx.astype(np.float32) / 2))
    got_idx, (tens, halves) = top.result_with_payload()[5]
    assert got_idx.tolist() == [1, 2, 4]
    assert tens.tolist() == [10, 20, 40]
    assert halves.dtype == np.float32 and halves.tolist() == [0.5, 1.0, 2.0]


# --- helpers -----------------------------------------------------------------------------------------

def test_select_topk_ties_go_to_lower_index():
    mags = np.array([0, 2, 1, 2, 2, 0, 3], np.float32)
    assert select_topk(mags, 3).tolist() == [1, 3, 6]
    assert select_topk(mags, 10).tolist() == [1, 2, 3, 4, 6]  # zeros never selected
    assert select_topk(mags, 0).tolist() == []


def test_per_tensor_count_rounds_half_up():
    assert per_tensor_count(5, 0.5) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert per_tensor_count(10, 0.25) == 3  # 2.5 -> 3
    assert per_tensor_count(10, 0.05) == 1  # 0.5 -> 1
    assert per_tensor_count(10, 0.04) == 0  # 0.4 -> 0
    assert per_tensor_count(7, 1.0) == 7
    assert per_tensor_count(0, 0.5) == 0
