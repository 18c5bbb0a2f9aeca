"""overlap: shared indices, Jaccard, cosine, sign agreement; refusals; the CLI table and JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers_models import run_main as run
from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from sftdiff.errors import VerificationError
from sftdiff.overlap import entry_overlap, overlap

FP = "sfp1:" + "0" * 32
SHAPES = {"encoder.layer.0.attention.self.query.weight": (6, 5), "encoder.layer.1.output.dense.bias": (9,)}


def sparse(shape, idx, vals):
    return SparseEntry.from_float(shape, np.array(idx, dtype=np.int64), np.array(vals, dtype=np.float32))


def diff_of(entries, fingerprint=FP):
    return SparseDiff(entries, DiffMeta(base={"fingerprint": fingerprint}))


@st.composite
def diffs(draw):
    entries = {}
    for name, shape in SHAPES.items():
        numel = math.prod(shape)
        idx = sorted(draw(st.sets(st.integers(0, numel - 1), min_size=1, max_size=numel)))
        vals = draw(st.lists(st.floats(0.5, 50, width=32).flatmap(lambda v: st.sampled_from([v, -v])),
                             min_size=len(idx), max_size=len(idx)))
        entries[name] = sparse(shape, idx, vals)
    return diff_of(entries)


@settings(max_examples=60, deadline=None)
@given(diffs())
def test_overlap_with_itself_is_complete(a):
    report = overlap(a, a)
    for row in report.tensors + [report.total]:
        assert row.shared == row.nnz_a == row.nnz_b
        assert row.jaccard == 1 and row.overlap_a == 1 and row.overlap_b == 1 and row.sign_agreement == 1
        assert row.cosine == pytest.approx(1, abs=1e-12)
        assert row.norm_a_shared == row.norm_b_shared > 0


@settings(max_examples=60, deadline=None)
@given(diffs())
def test_overlap_of_disjoint_diffs_is_zero(a):
    complement = {}
    for name, shape in SHAPES.items():
        rest = np.setdiff1d(np.arange(math.prod(shape)), a.entries[name].indices)
        if len(rest):
            complement[name] = sparse(shape, rest, np.ones(len(rest)))
    report = overlap(a, diff_of(complement))
    assert report.total.shared == 0 and report.total.jaccard == 0
    assert report.total.cosine is None and report.total.sign_agreement is None
    assert report.total.norm_a_shared == 0


@settings(max_examples=60, deadline=None)
@given(diffs(), diffs())
def test_overlap_is_symmetric(a, b):
    ab, ba = overlap(a, b).total, overlap(b, a).total
    assert ab.shared == ba.shared and ab.jaccard == ba.jaccard and ab.overlap_a == ba.overlap_b
    assert (ab.cosine is None) == (ba.cosine is None)
    if ab.cosine is not None:
        assert ab.cosine == pytest.approx(ba.cosine, abs=1e-12)


def test_known_numbers():
    a = sparse((10,), [0, 1, 2, 3], [1, 2, -3, 4])
    b = sparse((10,), [2, 3, 8], [3, 4, 1])
    row = entry_overlap("w", a, b)
    assert (row.shared, row.union) == (2, 5)
    assert row.jaccard == pytest.approx(0.4)
    assert (row.overlap_a, row.overlap_b) == (0.5, pytest.approx(2 / 3))
    assert row.cosine == pytest.approx((-9 + 16) / 25)
    assert row.sign_agreement == 0.5
    assert (row.norm_a_shared, row.norm_b_shared) == (5.0, 5.0)


def test_tensors_on_one_side_and_dense_entries():
    a = diff_of({"w": sparse((4,), [0], [1]), "head": DenseEntry(np.ones(3, dtype=np.float32))})
    b = diff_of({"v": sparse((4,), [0], [1])})
    report = overlap(a, b)
    assert [r.name for r in report.tensors] == ["v", "w"]
    assert report.total.shared == 0 and report.total.union == 2
    assert report.dense_skipped == ["head"]


def test_refuses_other_bases_and_shapes():
    a = diff_of({"w": sparse((4,), [0], [1])})
    with pytest.raises(VerificationError, match="different bases"):
        overlap(a, diff_of({"w": sparse((4,), [0], [1])}, fingerprint="sfp1:" + "1" * 32))
    with pytest.raises(VerificationError, match="shape"):
        overlap(a, diff_of({"w": sparse((2, 2), [0], [1])}))




def test_cli_table_json_and_errors(tmp_path, capsys):
    a = diff_of({"w": sparse((10,), [0, 1, 2, 3], [1, 2, -3, 4])})
    b = diff_of({"w": sparse((10,), [2, 3, 8], [3, 4, 1])})
    c = diff_of({"w": sparse((10,), [2], [3])}, fingerprint="sfp1:" + "2" * 32)
    for name, d in (("a", a), ("b", b), ("c", c)):
        d.save(tmp_path / f"{name}.sft")
    pa, pb, pc = (str(tmp_path / f"{n}.sft") for n in "abc")
    assert run(["overlap", pa, pb]) == 0
    table = capsys.readouterr().out
    assert "jaccard" in table and "(total)" in table and "40%" in table
    assert run(["overlap", pa, pb, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"]["shared"] == 2 and data["total"]["jaccard"] == pytest.approx(0.4)
    assert data["tensors"][0]["name"] == "w" and data["a"] == pa
    assert run(["overlap", pa, pc]) == 4
    assert capsys.readouterr().err.startswith("sftdiff: error:")
    assert run(["overlap", pa, pc, "--ignore-base", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["shared"] == 1
    assert run(["overlap", pa]) == 2


@settings(max_examples=30, deadline=None)
@given(diffs())
def test_a_parameter_spelled_two_ways_is_one_parameter(a):
    """The same diff with its names spelled with the base-model prefix overlaps completely, and the
    rows are named as A spells them; base digests are compared through the same name map."""
    prefixed = diff_of({"bert." + n: a.entries[n] for n in a.entries})
    for x, y, names in ((a, prefixed, sorted(a.entries)), (prefixed, a, sorted("bert." + n for n in a.entries))):
        report = overlap(x, y)
        assert report.total.jaccard == 1.0 and report.total.shared == a.nnz
        assert [r.name for r in report.tensors] == names


def test_base_digests_are_compared_across_spellings():
    w = "encoder.layer.0.attention.self.query.weight"
    e = sparse((6, 5), [1, 2], [1, 2])
    a = SparseDiff({w: e}, DiffMeta(base={"fingerprint": FP, "tensors": {w: "a" * 32}}))
    same = SparseDiff({"bert." + w: e},
                      DiffMeta(base={"fingerprint": "sfp1:" + "1" * 32, "tensors": {"bert." + w: "a" * 32}}))
    other = SparseDiff({"bert." + w: e}, DiffMeta(base={"fingerprint": FP, "tensors": {"bert." + w: "b" * 32}}))
    assert overlap(a, same).total.jaccard == 1.0  # fingerprints differ (bare vs head model); digests agree
    with pytest.raises(VerificationError, match=f"different base tensors for '{w}'"):
        overlap(a, other)
