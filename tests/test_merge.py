"""merge: each method against a brute-force dense reading of its definition, DARE's determinism and
statistics, dense entries, refusals, provenance and the CLI (--json).

The brute-force readings below loop over every position of every parameter in float64 and share no
code with sftdiff.merge except `keep_mask` (DARE's random draw, which is an input of the definition;
its statistics are tested on their own). `mergekit_ties` is a numpy transcription of mergekit's dense
TIES (stacked task vectors, density over the whole tensor), checked against a baked merge.

Tolerance: the result is summed in float64 and rounded once to float32, so it is within 2^-23
relative (plus float64 noise) of the float64 reference; 1e-6 relative leaves room.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftdiff.algebra import add
from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from sftdiff.errors import UsageError, VerificationError
from sftdiff.merge import keep_mask, merge

from helpers_models import run_main as run

FP = "sfp1:" + "0" * 32
SHAPES = {"layer.0.q.weight": (4, 5), "layer.0.q.bias": (7,), "z.emb": (3, 2, 2)}
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Few distinct magnitudes, so equal magnitudes (trim ties) and exactly cancelling sums occur.
magnitudes = st.one_of(st.sampled_from([0.5, 1.0, 2.0, 3.0]), st.floats(2.0**-10, 50, width=32))
nonzero = magnitudes.flatmap(lambda v: st.sampled_from([v, -v]))


@st.composite
def sparse_diffs(draw: st.DrawFn) -> SparseDiff:
    entries = {}
    for name, shape in SHAPES.items():
        if not draw(st.booleans()) and entries:
            continue
        numel = math.prod(shape)
        idx = sorted(draw(st.sets(st.integers(0, numel - 1), max_size=numel)))
        vals = draw(st.lists(nonzero, min_size=len(idx), max_size=len(idx)))
        entry = SparseEntry.from_float(shape, np.array(idx, dtype=np.int64), np.array(vals, dtype=np.float32))
        if entry is not None:
            entries[name] = entry
    return SparseDiff(entries, DiffMeta(base={"fingerprint": FP}))


def dense_f64(diff: SparseDiff, name: str) -> np.ndarray:
    """A parameter's delta as a flat float64 array (zeros where the diff stores nothing)."""
    if name not in diff.entries:
        return np.zeros(math.prod(SHAPES[name]))
    return diff.entries[name].to_dense().astype(np.float64).reshape(-1)


def brute_force(diffs, method, weights, density=None, drop=None, seed=0, scale=1.0) -> dict[str, np.ndarray]:
    """The definitions of docs/merge.md, position by position, on dense readings of the diffs."""
    out = {}
    for name in SHAPES:
        vectors = []
        for i, diff in enumerate(diffs):
            d = dense_f64(diff, name)
            stored = [p for p in range(len(d)) if d[p] != 0]  # canonical diffs store no zeros
            if method == "ties" and density is not None:
                keep = math.floor(density * len(stored) + 0.5)
                ranked = sorted(stored, key=lambda p: (-abs(float(np.float32(d[p]))), p))
                for p in ranked[keep:]:
                    d[p] = 0.0
            if method in ("dare", "dare-ties"):
                kept = keep_mask(seed, name, i, len(stored), drop)
                for p, k in zip(stored, kept):
                    d[p] = d[p] / (1 - drop) if k else 0.0
            vectors.append(d)
        result = np.zeros(math.prod(SHAPES[name]))
        for p in range(len(result)):
            terms = [(weights[i], weights[i] * vectors[i][p]) for i in range(len(diffs))]
            total = sum(wv for _, wv in terms)
            if method in ("ties", "dare-ties"):
                sign = 1.0 if total >= 0 else -1.0
                agreeing = [(w, wv) for w, wv in terms if wv != 0 and math.copysign(1.0, wv) == sign]
                denominator = sum(w for w, _ in agreeing)
                total = sum(wv for _, wv in agreeing) / denominator if denominator else 0.0
            result[p] = total * scale
        out[name] = result
    return out


def assert_matches(result: SparseDiff, expected: dict[str, np.ndarray]) -> None:
    for name in SHAPES:
        got = dense_f64(result, name)
        np.testing.assert_allclose(got, expected[name], rtol=1e-6, atol=1e-30, err_msg=name)
        if name in result.entries:  # entries are canonical: no stored zeros
            assert (result.entries[name].values_f32() != 0).all()


# -- each method against its definition ------------------------------------------------------------


@SETTINGS
@given(st.lists(sparse_diffs(), min_size=1, max_size=4), st.data())
def test_sum_and_ties_match_brute_force(diffs, data):
    n = len(diffs)
    weights = data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 1.5, 3.0]), min_size=n, max_size=n))
    scale = data.draw(st.sampled_from([1.0, 0.5, 2.0]))
    density = data.draw(st.one_of(st.none(), st.sampled_from([0.1, 0.3, 0.5, 0.75, 1.0])))
    assert_matches(merge(*diffs, method="ties", weights=weights, density=density, scale=scale),
                   brute_force(diffs, "ties", weights, density=density, scale=scale))
    signed = data.draw(st.lists(st.sampled_from([-2.0, -0.5, 0.0, 1.0, 2.5]), min_size=n, max_size=n))
    assert_matches(merge(*diffs, method="sum", weights=signed, scale=scale),
                   brute_force(diffs, "sum", signed, scale=scale))


@SETTINGS
@given(st.lists(sparse_diffs(), min_size=1, max_size=4), st.data())
def test_dare_and_dare_ties_match_brute_force(diffs, data):
    n = len(diffs)
    weights = data.draw(st.lists(st.sampled_from([0.25, 1.0, 2.0]), min_size=n, max_size=n))
    drop = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    seed = data.draw(st.integers(0, 2**40))
    for method in ("dare", "dare-ties"):
        assert_matches(merge(*diffs, method=method, weights=weights, drop=drop, seed=seed),
                       brute_force(diffs, method, weights, drop=drop, seed=seed))


@SETTINGS
@given(st.lists(sparse_diffs(), min_size=2, max_size=3))
def test_sum_is_add_bit_for_bit(diffs):
    weights = [0.5 + i for i in range(len(diffs))]
    merged, added = merge(*diffs, method="sum", weights=weights), add(*diffs, weights=weights)
    assert list(merged.entries) == list(added.entries)
    for name in merged.entries:
        assert merged.entries[name].indices.tolist() == added.entries[name].indices.tolist()
        assert merged.entries[name].values.tobytes() == added.entries[name].values.tobytes()


def test_absent_position_neither_votes_nor_counts_and_zero_sum_elects_plus():
    a = SparseDiff({"w": SparseEntry.from_float((4,), np.array([0, 1, 2]), np.array([2.0, -1.0, 3.0]))})
    b = SparseDiff({"w": SparseEntry.from_float((4,), np.array([1, 2, 3]), np.array([4.0, -3.0, -5.0]))})
    got = merge(a, b, method="ties").entries["w"].to_dense().tolist()
    # 0: only a (mean of one = 2); 1: sum 3 > 0, only b agrees; 2: 3 - 3 = 0 elects +, a's 3;
    # 3: only b.
    assert got == [2.0, 4.0, 3.0, -5.0]
    # weighted: 1: 5·(−1) + 4 < 0 elects −, a's −5 over weight 5; 2: 15 − 3 > 0, a's 15 over 5
    assert merge(a, b, method="ties", weights=[5, 1]).entries["w"].to_dense().tolist() == [2.0, -1.0, 3.0, -5.0]


def test_trim_keeps_the_fraction_of_stored_values_per_parameter():
    values = np.array([1.0, -5.0, 2.0, 4.0, -3.0])
    d = SparseDiff({"w": SparseEntry.from_float((100,), np.array([3, 10, 20, 50, 99]), values)})
    got = merge(d, method="ties", density=0.5).entries["w"]  # round-half-up(2.5) = 3 of 5 stored values
    assert got.indices.tolist() == [10, 50, 99] and got.values_f32().tolist() == [-5.0, 4.0, -3.0]
    assert merge(d, method="ties", density=1.0).entries["w"].nnz == 5


# -- DARE ------------------------------------------------------------------------------------------


def test_dare_kept_fraction_and_rescaling():
    n, drop = 40_000, 0.3
    d = SparseDiff({"w": SparseEntry.from_float((n,), np.arange(n), np.full(n, 0.75))})
    got = merge(d, method="dare", drop=drop, seed=7).entries["w"]
    sd = math.sqrt(n * drop * (1 - drop))
    assert abs(got.nnz - n * (1 - drop)) < 5 * sd  # binomial: kept ~ n(1-P)
    assert set(got.values_f32().tolist()) == {float(np.float32(0.75 / (1 - drop)))}
    # the expected total is preserved: Σ kept/(1-P) ≈ Σ v
    assert abs(got.values_f32().sum(dtype=np.float64) / (0.75 * n) - 1) < 5 * sd / (n * (1 - drop))
    # kept positions are spread over the whole parameter (no block structure)
    halves = np.histogram(got.indices, bins=2, range=(0, n))[0]
    assert abs(halves[0] - halves[1]) < 5 * math.sqrt(n * drop * (1 - drop) / 2) * 2
    other = merge(d, method="dare", drop=drop, seed=8).entries["w"]
    assert other.indices.tolist() != got.indices.tolist()


def test_dare_draw_does_not_depend_on_other_entries_or_operand_order():
    x = SparseEntry.from_float((500,), np.arange(0, 500, 2), np.linspace(1, 2, 250))
    y = SparseEntry.from_float((30,), np.arange(30), np.ones(30))
    alone = merge(SparseDiff({"x": x}), method="dare", drop=0.5, seed=3).entries["x"]
    with_y = merge(SparseDiff({"y": y, "x": x}), method="dare", drop=0.5, seed=3)
    assert with_y.entries["x"].indices.tolist() == alone.indices.tolist()
    # reading entries in another order gives the same values
    assert with_y.entries["y"].values.tobytes() == with_y.entries["y"].values.tobytes()
    assert keep_mask(3, "x", 0, 250, 0.5).tolist() == keep_mask(3, "x", 0, 250, 0.5).tolist()
    assert keep_mask(3, "x", 0, 250, 0.5).tolist() != keep_mask(3, "x", 1, 250, 0.5).tolist()


def test_dare_with_no_drop_is_the_sum():
    a = SparseDiff({"w": SparseEntry.from_float((6,), np.array([0, 2]), np.array([1.0, 2.0]))})
    b = SparseDiff({"w": SparseEntry.from_float((6,), np.array([2, 5]), np.array([0.5, -1.0]))})
    assert (merge(a, b, method="dare", drop=0.0).entries["w"].to_dense().tolist()
            == merge(a, b, method="sum").entries["w"].to_dense().tolist())


def test_same_seed_gives_byte_identical_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(2):
        idx = np.sort(rng.choice(2000, 300, replace=False))
        d = SparseDiff({"w": SparseEntry.from_float((2000,), idx, rng.normal(size=300)),
                        "v": SparseEntry.from_float((50,), np.arange(50), rng.normal(size=50))},
                       DiffMeta(base={"fingerprint": FP}))
        paths.append(str(tmp_path / f"d{k}.sft"))
        d.save(paths[-1])
    outs = [str(tmp_path / f"m{k}.sft") for k in range(3)]
    for out, seed in zip(outs, (11, 11, 12)):
        assert run(["merge", *paths, "-o", out, "--method", "dare-ties", "--drop", "0.4", "--seed", str(seed),
                    "-q"]) == 0
    data = [open(o, "rb").read() for o in outs]
    assert data[0] == data[1] and data[0] != data[2]


# -- dense entries ---------------------------------------------------------------------------------


def test_dense_entries_follow_the_composition_rule():
    head = DenseEntry(np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32))
    other_head = DenseEntry(np.array([[9.0, 9.0], [9.0, 9.0]], dtype=np.float32))
    before = SparseDiff({"h": SparseEntry.from_float((2, 2), np.array([0]), np.array([100.0]))})
    dense = SparseDiff({"h": head})
    after1 = SparseDiff({"h": SparseEntry.from_float((2, 2), np.array([1, 3]), np.array([1.0, -2.0]))})
    after2 = SparseDiff({"h": SparseEntry.from_float((2, 2), np.array([1]), np.array([-3.0]))})
    # only dense: kept as it is (not weighted, not scaled)
    alone = merge(dense, method="ties", weights=[2.0], scale=0.5).entries["h"]
    assert isinstance(alone, DenseEntry) and alone.values_f32().tolist() == [[1, 2], [3, 4]]
    # sparse before the last dense value is replaced; sparse after it is merged (ties) and added
    got = merge(before, SparseDiff({"h": other_head}), dense, after1, after2, method="ties",
                warn=[].append).entries["h"]
    assert isinstance(got, DenseEntry)
    # position 1: 1 and -3 elect −, mean −3; position 3: −2
    assert got.values_f32().tolist() == [[1.0, -1.0], [3.0, 2.0]]


def test_dense_shape_mismatch_is_refused():
    dense = SparseDiff({"h": DenseEntry(np.zeros((2, 2), dtype=np.float32))})
    sparse = SparseDiff({"h": SparseEntry.from_float((4,), np.array([1]), np.array([1.0]))})
    with pytest.raises(VerificationError, match="shape"):
        merge(dense, sparse, method="sum")
    merge(sparse, dense, method="sum", warn=[].append)  # the earlier sparse delta is replaced: nothing to combine


def test_names_align_across_the_base_model_prefix_and_config_patches_later_win():
    bare = SparseDiff({"encoder.w": SparseEntry.from_float((4,), np.array([0, 1]), np.array([1.0, -2.0]))},
                      DiffMeta(base={"fingerprint": FP}, config_patch={"architectures": ["BertForMaskedLM"], "a": 1}))
    prefixed = SparseDiff({"bert.encoder.w": SparseEntry.from_float((4,), np.array([1, 2]), np.array([4.0, 3.0])),
                           "classifier.weight": DenseEntry(np.ones((2, 2), dtype=np.float32))},
                          DiffMeta(base={"fingerprint": FP},
                                   config_patch={"architectures": ["BertForTokenClassification"]}))
    warnings: list[str] = []
    got = merge(bare, prefixed, method="ties", warn=warnings.append)
    assert sorted(got.entries) == ["classifier.weight", "encoder.w"]  # one parameter, the first operand's spelling
    assert got.entries["encoder.w"].to_dense().tolist() == [1.0, 4.0, 3.0, 0.0]
    assert got.meta.config_patch == {"architectures": ["BertForTokenClassification"], "a": 1}
    assert len(warnings) == 1 and "'architectures'" in warnings[0]


def test_overwritten_entries_are_reported():
    sparse = SparseDiff({"h": SparseEntry.from_float((2,), np.array([0]), np.array([1.0]))})
    dense = SparseDiff({"h": DenseEntry(np.zeros(2, dtype=np.float32))})
    warnings: list[str] = []
    merge(sparse, dense, method="sum", warn=warnings.append)
    assert len(warnings) == 1 and "overwritten" in warnings[0] and "h (operand 1" in warnings[0]


def test_lazy_operands_and_inputs_left_unchanged(tmp_path):
    rng = np.random.default_rng(3)

    def make() -> SparseDiff:
        idx = np.sort(rng.choice(50, 10, replace=False))
        return SparseDiff({"w": SparseEntry.from_float((50,), idx, rng.normal(size=10)),
                           "h": DenseEntry(rng.normal(size=(2, 2)).astype(np.float32))})

    def snapshot(d: SparseDiff) -> dict[str, tuple[bytes, bytes]]:
        return {n: (np.array(e.values).tobytes(), np.array(getattr(e, "indices", [])).tobytes())
                for n, e in d.entries.items()}

    a, b, c = make(), make(), make()
    before = [snapshot(d) for d in (a, b, c)]
    lazy = add(a, b, warn=[].append)
    out = merge(lazy, c, method="dare-ties", drop=0.3, seed=1, warn=[].append)
    out.save(tmp_path / "m.sft")
    expected = merge(SparseDiff(dict(lazy.entries)), c, method="dare-ties", drop=0.3, seed=1, warn=[].append)
    got = SparseDiff.load(tmp_path / "m.sft")
    for name in expected.entries:
        assert got.entries[name].values.tobytes() == expected.entries[name].values.tobytes()
    assert [snapshot(d) for d in (a, b, c)] == before


# -- refusals, provenance --------------------------------------------------------------------------


def test_base_mismatch_is_refused_as_in_add():
    a = SparseDiff({"w": SparseEntry.from_float((2,), np.array([0]), np.array([1.0]))},
                   DiffMeta(base={"fingerprint": FP}))
    b = SparseDiff({"w": SparseEntry.from_float((2,), np.array([1]), np.array([1.0]))},
                   DiffMeta(base={"fingerprint": "sfp1:" + "1" * 32}))
    with pytest.raises(VerificationError, match="different bases"):
        add(a, b)
    with pytest.raises(VerificationError, match="different bases"):
        merge(a, b, method="ties")
    assert len(merge(a, b, method="ties", ignore_base=True).entries) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="median"), "unknown merge method"),
    (dict(method="dare"), "needs --drop"),
    (dict(method="dare", drop=1.0), "--drop must be"),
    (dict(method="sum", drop=0.5), "--drop applies"),
    (dict(method="sum", density=0.5), "--density"),
    (dict(method="dare-ties", drop=0.1, density=0.5), "give --drop"),
    (dict(method="ties", density=0.0), r"\(0, 1\]"),
    (dict(method="ties", weights=[1.0, -1.0]), ">= 0"),
    (dict(method="ties", weights=[1.0]), "one weight per diff"),
    (dict(method="dare", drop=0.1, seed=-1), "--seed"),
    (dict(method="sum", scale=math.inf), "--scale"),
])
def test_usage_errors(kwargs, message):
    a = SparseDiff({"w": SparseEntry.from_float((2,), np.array([0]), np.array([1.0]))})
    with pytest.raises(UsageError, match=message):
        merge(a, a, **kwargs)


def test_provenance_records_method_weights_density_drop_seed(tmp_path):
    a = SparseDiff({"w": SparseEntry.from_float((4,), np.array([0, 1]), np.array([1.0, 2.0]))},
                   DiffMeta(base={"fingerprint": FP, "hint": "m"}, user={"task": "nli"}))
    a.save(tmp_path / "a.sft")
    loaded = SparseDiff.load(tmp_path / "a.sft")
    out = merge(loaded, a, method="dare-ties", weights=[2, 1], drop=0.25, seed=5, scale=0.5)
    prov = out.meta.provenance
    assert {k: prov[k] for k in ("operation", "method", "weights", "drop", "seed", "scale", "dtype")} == {
        "operation": "merge", "method": "dare-ties", "weights": [2.0, 1.0], "drop": 0.25, "seed": 5,
        "scale": 0.5, "dtype": "F32"}
    file_hash = hashlib.sha256((tmp_path / "a.sft").read_bytes()).hexdigest()
    assert prov["operands"][0]["fingerprint"] == f"sha256:{file_hash}"
    assert out.meta.origin["method"] == "merge" and out.meta.origin["merge_method"] == "dare-ties"
    assert out.meta.base["fingerprint"] == FP and out.meta.user == {"task": "nli"}
    ties = merge(a, a, method="ties", density=0.5).meta.provenance
    assert ties["density"] == 0.5 and "drop" not in ties and "seed" not in ties
    out.save(tmp_path / "out.sft")
    assert SparseDiff.load(tmp_path / "out.sft").meta.provenance == prov


# -- against mergekit's dense algorithm ------------------------------------------------------------


def mergekit_ties(base: dict[str, np.ndarray], tuned: list[dict[str, np.ndarray]], weights: list[float],
                  density: float, lam: float) -> dict[str, np.ndarray]:
    """mergekit's TIES (merge_methods/generalized_task_arithmetic.py, sparsify.magnitude) in numpy:
    dense task vectors, per-tensor top int(density·numel) by magnitude, sign of the weighted sum
    (≥ 0 is +), sum of agreeing weighted deltas over the sum of their weights (0 → 1), × λ."""
    out = {}
    for name, b in base.items():
        deltas = []
        for t in tuned:
            delta = (t[name] - b).astype(np.float32).reshape(-1)
            if density < 1:
                k = int(density * delta.size)
                mask = np.zeros(delta.size, dtype=np.float32)
                mask[np.argsort(-np.abs(delta), kind="stable")[:k]] = 1
                delta = delta * mask
            deltas.append(delta)
        deltas = np.stack(deltas)
        w = np.array(weights, dtype=np.float32)[:, None]
        weighted = deltas * w
        majority = np.where(weighted.sum(axis=0) >= 0, 1.0, -1.0).astype(np.float32)
        mask = np.sign(weighted) == majority
        mixed = (weighted * mask).sum(axis=0)
        divisor = (w * mask).sum(axis=0)
        divisor[divisor == 0] = 1
        out[name] = (b.reshape(-1) + mixed / divisor * lam).reshape(b.shape).astype(np.float32)
    return out


@pytest.mark.parametrize("mergekit_density, our_density", [(1.0, None), (0.05, 0.5)])
def test_baked_ties_equals_mergekit_dense_ties(tmp_path, mergekit_density, our_density):
    """Fine-tunes = base + each diff (dense task vectors made from the diffs). Every tensor's diff
    stores exactly 10% of its positions, so mergekit's density 0.05 over the tensor is our 0.5 over
    stored values."""
    from sftdiff.bake import bake
    from sftdiff.checkpoint import Checkpoint
    from sftdiff.safetensors_io import SafetensorsFile

    rng = np.random.default_rng(1)
    base = {"a.weight": rng.normal(size=(40, 50)).astype(np.float32),
            "a.bias": rng.normal(size=(40,)).astype(np.float32) * 0.1}
    diffs, tuned = [], []
    for _ in range(3):
        entries = {}
        for name, b in base.items():
            idx = np.sort(rng.choice(b.size, b.size // 10, replace=False))
            entries[name] = SparseEntry.from_float(b.shape, idx, rng.normal(size=len(idx)) * 0.01)
        diff = SparseDiff(entries)
        diffs.append(diff)
        tuned.append({n: (b.reshape(-1) + diff.entries[n].to_dense().reshape(-1)).reshape(b.shape)
                      for n, b in base.items()})
    weights = [1.0, 0.6, 0.3]
    merged = merge(*diffs, method="ties", weights=weights, density=our_density, scale=0.8)
    # the in-memory diffs record no base digests: nothing to verify, no warning wanted
    result = bake(Checkpoint.from_state_dict(base), [merged], tmp_path / "out", warn=[].append)
    files = [f for f in os.listdir(result.path) if f.endswith(".safetensors")]
    baked = {}
    for f in files:
        st = SafetensorsFile(os.path.join(result.path, f))
        baked.update({n: np.array(st.array(n)) for n in st.tensors})
    expected = mergekit_ties(base, tuned, weights, mergekit_density, 0.8)
    for name in base:
        np.testing.assert_allclose(baked[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
    changed = sum(int((baked[n] != base[n]).sum()) for n in base)
    assert changed > 0


# -- CLI -------------------------------------------------------------------------------------------


@pytest.fixture()
def files(tmp_path):
    a = SparseDiff({"w": SparseEntry.from_float((10,), np.array([0, 3, 5]), np.array([1.0, -2.0, 3.0]))},
                   DiffMeta(base={"fingerprint": FP}))
    b = SparseDiff({"w": SparseEntry.from_float((10,), np.array([3, 7]), np.array([4.0, 4.0]))},
                   DiffMeta(base={"fingerprint": FP}))
    other = SparseDiff({"w": SparseEntry.from_float((10,), np.array([1]), np.array([1.0]))},
                       DiffMeta(base={"fingerprint": "sfp1:" + "9" * 32}))
    paths = {}
    for name, d in (("a", a), ("b", b), ("other", other)):
        paths[name] = tmp_path / f"{name}.sft"
        d.save(paths[name])
    return paths


def test_cli_json_and_inputs_untouched(files, tmp_path, capsys):
    before = {k: p.read_bytes() for k, p in files.items()}
    out = str(tmp_path / "m.sft")
    capsys.readouterr()
    assert run(["merge", str(files["a"]), str(files["b"]), "-o", out, "--method", "ties",
                "--weights", "1,0.5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["command"] == "merge" and summary["method"] == "ties" and summary["output"] == out
    assert summary["weights"] == [1.0, 0.5] and summary["entries"] == 1 and summary["dense"] == []
    assert summary["nnz"] == 4 and summary["input_nnz"] == [3, 2]
    assert summary["inputs"] == [str(files["a"]), str(files["b"])]
    assert summary["warnings"] == [] and summary["density"] is None and summary["scale"] == 1.0
    got = SparseDiff.load(out).entries["w"]
    # 3: −2 + 0.5·4 = 0 elects +, mean of b's 0.5·4 over 0.5 → 4
    assert got.indices.tolist() == [0, 3, 5, 7] and got.values_f32().tolist() == [1.0, 4.0, 3.0, 4.0]
    assert {k: p.read_bytes() for k, p in files.items()} == before
    assert run(["merge", str(files["a"]), str(files["b"]), "-o", out, "--force", "-m", "dare", "--drop", "0.5",
                "--seed", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["drop"] == 0.5 and summary["seed"] == 3 and summary["density"] is None


def test_cli_errors_have_exit_codes_and_one_line(files, tmp_path, capsys):
    out = str(tmp_path / "x.sft")
    assert run(["merge", str(files["a"]), str(files["other"]), "-o", out, "-m", "ties"]) == 4
    err = capsys.readouterr().err
    assert err.startswith("sftdiff: error:") and err.count("\n") == 1 and "--ignore-base" in err
    assert not os.path.exists(out)
    assert run(["merge", str(files["a"]), str(files["other"]), "-o", out, "-m", "ties", "--ignore-base", "-q"]) == 0
    assert run(["merge", str(files["a"]), str(files["b"]), "-o", out, "-m", "ties"]) == 5  # exists
    assert run(["merge", str(files["a"]), str(files["b"]), "-o", out, "-m", "dare", "--force"]) == 2
    assert run(["merge", str(files["a"]), str(files["b"]), "-o", out, "-m", "ties", "-w", "1", "--force"]) == 2
    assert run(["merge", str(files["a"]), str(files["b"]), "-o", out, "--force"]) == 2  # --method required
    before = files["a"].read_bytes()
    assert run(["merge", str(files["a"]), str(files["b"]), "-o", str(files["a"]), "-m", "sum", "--force"]) == 2
    assert files["a"].read_bytes() == before
    capsys.readouterr()


def test_cli_does_not_import_torch(files, tmp_path):
    code = (
        "import sys\nfrom sftdiff.cli import main\n"
        f"main(['merge', {str(files['a'])!r}, {str(files['b'])!r}, '-o', {str(tmp_path / 'n.sft')!r},"
        " '-m', 'ties', '-q'])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


PARAMS = {"encoder.w": (3, 4), "encoder.b": (5,), "head.weight": (2, 3)}


@st.composite
def spelled_stacks(draw: st.DrawFn) -> list[SparseDiff]:
    """Operands whose entries spell the same parameters with or without `bert.`, some dense."""
    diffs = []
    for _ in range(draw(st.integers(2, 4))):
        prefix = draw(st.sampled_from(["", "bert."]))
        entries = {}
        for name, shape in PARAMS.items():
            kind = draw(st.sampled_from(["none", "sparse", "sparse", "dense"]))
            numel = math.prod(shape)
            if kind == "dense":
                values = draw(st.lists(nonzero, min_size=numel, max_size=numel))
                entries[prefix + name] = DenseEntry(np.array(values, dtype=np.float32).reshape(shape), "F32", "F32")
            elif kind == "sparse":
                idx = sorted(draw(st.sets(st.integers(0, numel - 1), min_size=1, max_size=numel)))
                vals = draw(st.lists(nonzero, min_size=len(idx), max_size=len(idx)))
                entries[prefix + name] = SparseEntry.from_float(shape, np.array(idx), np.array(vals, np.float32),
                                                                "F32", "F32")
        patch = draw(st.one_of(st.none(), st.fixed_dictionaries({"k": st.sampled_from([1, 2])})))
        diffs.append(SparseDiff(entries, DiffMeta(base={"fingerprint": FP}, config_patch=patch)))
    return diffs


@SETTINGS
@given(spelled_stacks(), st.data())
def test_sum_follows_the_algebra_name_map_and_composition_rule(diffs, data):
    """merge --method sum is add, entry for entry, on stacks with dense entries and both spellings;
    ties differs from it only on the sparse parts (the same names, kinds and dense winners)."""
    weights = data.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=len(diffs), max_size=len(diffs)))
    merge_notes, add_notes = [], []
    merged = merge(*diffs, method="sum", weights=weights, warn=merge_notes.append)
    added = add(*diffs, weights=weights, warn=add_notes.append)
    assert list(merged.entries) == list(added.entries) and merge_notes == add_notes
    assert merged.meta.config_patch == added.meta.config_patch
    for name in merged.entries:
        x, y = merged.entries[name], added.entries[name]
        assert type(x) is type(y) and x.values.tobytes() == y.values.tobytes()
        if isinstance(x, SparseEntry):
            assert x.indices.tolist() == y.indices.tolist()
    ties = merge(*diffs, method="ties", weights=weights, warn=[].append)
    for name in added.entries:
        if isinstance(added.entries[name], DenseEntry):
            assert isinstance(ties.entries[name], DenseEntry)
