"""prune / add / subtract / scale: algebraic properties, metadata, refusals, and the CLI.

Rounding tolerances (values are summed in float64 and rounded once to float32, u = 2^-24):
- associativity: |((a+b)+c) − (a+(b+c))| ≤ 2^-22·(|a|+|b|+|c|) per element (each grouping rounds
  an intermediate and the result, ≤ 2u·Σ|·| each);
- (A+B)−B vs A: ≤ 2^-23·(|a|+|b|) where they overlap, exact elsewhere;
- scale(scale(A, f), 1/f) vs A: ≤ 2^-22·|a| (two roundings plus the rounding of 1/f).
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftdiff.algebra import (LazyEntries, add, content_fingerprint, merge_sorted_sum, prune,
                             round_to_odd_f32, scale, subtract)
from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from sftdiff.dtypes import from_float32, to_float32
from sftdiff.errors import UsageError, VerificationError
from sftdiff.select import TopK, per_tensor_count, select_topk

from helpers_models import run_main as run

FP = "sfp1:" + "0" * 32
SHAPES = {"layer.0.q.weight": (4, 5), "layer.0.q.bias": (7,), "z.emb": (3, 2, 2)}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

nonzero = st.floats(2.0**-20, 100, width=32).flatmap(lambda v: st.sampled_from([v, -v]))


@st.composite
def sparse_diffs(draw: st.DrawFn) -> SparseDiff:
    entries = {}
    for name, shape in SHAPES.items():
        numel = math.prod(shape)
        idx = sorted(draw(st.sets(st.integers(0, numel - 1), max_size=numel)))
        vals = draw(st.lists(nonzero, min_size=len(idx), max_size=len(idx)))
        entry = SparseEntry.from_float(shape, np.array(idx, dtype=np.int64), np.array(vals, dtype=np.float32))
        if entry is not None:
            entries[name] = entry
    return SparseDiff(entries, DiffMeta(base={"fingerprint": FP}))


def dense_of(diff: SparseDiff) -> dict[str, np.ndarray]:
    """Every parameter's delta as float64 (zeros where the diff has no entry)."""
    out = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    for name in diff.entries:
        out[name] = diff.entries[name].to_dense().astype(np.float64)
    return out


def same_entries(x: SparseDiff, y: SparseDiff) -> bool:
    if sorted(x.entries) != sorted(y.entries):
        return False
    for name in x.entries:
        a, b = x.entries[name], y.entries[name]
        if a.dtype != b.dtype or not np.array_equal(a.indices, b.indices) or a.values.tobytes() != b.values.tobytes():
            return False
    return True


def sparse(shape, idx, vals, dtype="F32"):
    return SparseEntry.from_float(shape, np.array(idx, dtype=np.int64), np.array(vals, dtype=np.float32), dtype)


def diff_of(entries, **base) -> SparseDiff:
    return SparseDiff(entries, DiffMeta(base=base or {"fingerprint": FP}))


# -- properties ----------------------------------------------------------------------------------


@SETTINGS
@given(sparse_diffs(), sparse_diffs(), st.floats(-3, 3), st.floats(-3, 3))
def test_add_is_commutative_exactly(a, b, wa, wb):
    assert same_entries(add(a, b), add(b, a))
    assert same_entries(add(a, b, weights=[wa, wb]), add(b, a, weights=[wb, wa]))


@SETTINGS
@given(sparse_diffs(), sparse_diffs(), sparse_diffs())
def test_add_is_associative_up_to_rounding(a, b, c):
    left, right = dense_of(add(add(a, b), c)), dense_of(add(a, add(b, c)))
    da, db, dc = dense_of(a), dense_of(b), dense_of(c)
    for name in SHAPES:
        bound = 2.0**-22 * (np.abs(da[name]) + np.abs(db[name]) + np.abs(dc[name]))
        assert np.all(np.abs(left[name] - right[name]) <= bound)


@SETTINGS
@given(sparse_diffs(), sparse_diffs())
def test_add_then_subtract_gives_back_a(a, b):
    back = dense_of(subtract(add(a, b), b))
    da, db = dense_of(a), dense_of(b)
    for name in SHAPES:
        apart = db[name] == 0
        assert np.array_equal(back[name][apart], da[name][apart])
        assert np.all(np.abs(back[name] - da[name]) <= 2.0**-23 * (np.abs(da[name]) + np.abs(db[name])))


@SETTINGS
@given(sparse_diffs(), st.floats(1e-3, 1e3), st.booleans())
def test_scale_then_inverse_scale(a, factor, negative):
    factor = -factor if negative else factor
    back, da = dense_of(scale(scale(a, factor), 1 / factor)), dense_of(a)
    for name in SHAPES:
        assert np.all(np.abs(back[name] - da[name]) <= 2.0**-22 * np.abs(da[name]))
        assert np.array_equal(back[name] != 0, da[name] != 0)


@SETTINGS
@given(sparse_diffs())
def test_scale_minus_one_negates_and_adds_to_nothing(a):
    neg = scale(a, -1)
    for name in a.entries:
        assert np.array_equal(neg.entries[name].values_f32(), -a.entries[name].values_f32())
    assert len(add(a, neg).entries) == 0


# Deltas with many ties (small integers), so the tie rule is exercised.
deltas = st.fixed_dictionaries({
    name: st.lists(st.integers(-3, 3), min_size=math.prod(s), max_size=math.prod(s)).map(
        lambda v, s=s: np.array(v, dtype=np.float32).reshape(s))
    for name, s in SHAPES.items()
})


def create_like(delta: dict[str, np.ndarray], k: int | None = None, density: float | None = None) -> SparseDiff:
    """What `create` makes of a delta: global top-k over sorted names, or per-tensor by density."""
    names = sorted(delta)
    if k is not None:
        top = TopK(k)
        for rank, name in enumerate(names):
            top.offer(rank, np.abs(delta[name]))
        chosen = {names[r]: idx for r, idx in top.result().items()}
    else:
        chosen = {n: select_topk(np.abs(delta[n]), per_tensor_count(delta[n].size, density)) for n in names}
    entries = {}
    for name, idx in chosen.items():
        entry = SparseEntry.from_float(delta[name].shape, idx, delta[name].reshape(-1)[idx])
        if entry is not None:
            entries[name] = entry
    return diff_of(entries)


@SETTINGS
@given(deltas, st.integers(0, 40), st.integers(0, 40))
def test_prune_of_topk_is_topk(delta, k1, k2):
    small, large = sorted((k1, k2))
    assert same_entries(prune(create_like(delta, k=large), k=small), create_like(delta, k=small))


@SETTINGS
@given(deltas, st.floats(0.01, 1), st.floats(0.01, 1))
def test_per_tensor_prune_of_per_tensor_topk(delta, d1, d2):
    small, large = sorted((d1, d2))
    pruned = prune(create_like(delta, density=large), density=small, scope="per-tensor")
    assert same_entries(pruned, create_like(delta, density=small))


def test_prune_with_create_diff_if_available(tmp_path):
    create = pytest.importorskip("sftdiff.create")
    if not hasattr(create, "create_diff"):
        pytest.skip("sftdiff.create has no create_diff")
    from sftdiff.checkpoint import Checkpoint

    rng = np.random.default_rng(3)
    base = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    tuned = {n: v + np.round(rng.normal(size=v.shape)).astype(np.float32) for n, v in base.items()}
    try:
        big = create.create_diff(Checkpoint.from_state_dict(base), Checkpoint.from_state_dict(tuned), k=20)
        small = create.create_diff(Checkpoint.from_state_dict(base), Checkpoint.from_state_dict(tuned), k=8)
    except TypeError:
        pytest.skip("create_diff has another signature")
    pruned = prune(big, k=8)
    assert sorted(pruned.entries) == sorted(small.entries)
    for name in small.entries:
        assert np.array_equal(pruned.entries[name].indices, small.entries[name].indices)
        assert np.array_equal(pruned.entries[name].values_f32(), small.entries[name].values_f32())


# -- prune details ---------------------------------------------------------------------------------


def test_prune_density_is_relative_to_touched_tensors_and_keeps_dense():
    head = DenseEntry(np.ones((2, 3), dtype=np.float32))
    d = diff_of({"w": sparse((10, 10), [1, 2, 3, 4], [4, -3, 2, 1]), "head": head})
    out = prune(d, density=0.025)  # round-half-up(0.025 * 100) = 3 of the 100 touched values
    assert out.entries["w"].indices.tolist() == [1, 2, 3]
    assert out.entries["head"] is head
    assert prune(d, threshold=2.5).entries["w"].indices.tolist() == [1, 2]
    assert out.meta.origin["method"] == "prune" and out.meta.provenance["density"] == 0.025


def test_prune_refuses_bad_budgets():
    d = diff_of({"w": sparse((3,), [0], [1])})
    for kwargs in ({}, {"k": 1, "density": 0.5}, {"k": -1}, {"density": 1.5}, {"threshold": -1.0},
                   {"k": 1, "scope": "layer"}):
        with pytest.raises(UsageError):
            prune(d, **kwargs)


# -- arithmetic details ----------------------------------------------------------------------------


def test_merge_sorted_sum_sums_in_operand_order():
    idx, vals = merge_sorted_sum([(np.array([1, 5]), np.array([1.0, 2.0])), (np.array([0, 5, 9]), np.array([3.0, 4.0, 5.0]))])
    assert idx.tolist() == [0, 1, 5, 9] and vals.tolist() == [3.0, 1.0, 6.0, 5.0]


def test_round_to_odd_avoids_double_rounding():
    x = np.array([1 + 2.0**-8 + 2.0**-30, -(1 + 2.0**-8 + 2.0**-30), 1 + 2.0**-8, 3.0])
    via_f32 = to_float32(from_float32(x.astype(np.float32), "BF16"), "BF16")
    once = to_float32(from_float32(round_to_odd_f32(x), "BF16"), "BF16")
    assert via_f32[0] == 1.0  # the double-rounding trap: a tie after the first rounding
    assert once.tolist() == [1 + 2.0**-7, -(1 + 2.0**-7), 1.0, 3.0]


def test_sums_that_cancel_drop_values_and_entries():
    a = diff_of({"w": sparse((5,), [0, 1], [1.5, 2]), "v": sparse((2,), [0], [1])})
    b = diff_of({"w": sparse((5,), [1, 2], [-2, 3]), "v": sparse((2,), [0], [-1])})
    out = add(a, b)
    assert list(out.entries) == ["w"]
    assert out.entries["w"].indices.tolist() == [0, 2]


def test_output_dtype_rules():
    bf = diff_of({"w": sparse((4,), [0, 1], [1, 2], "BF16")})
    f32 = diff_of({"w": sparse((4,), [1, 2], [1, 2])})
    assert add(bf, bf).entries["w"].dtype == "BF16"
    assert add(bf, f32).entries["w"].dtype == "F32"
    assert add(bf, f32, dtype="float16").entries["w"].dtype == "F16"
    with pytest.raises(UsageError):
        add(bf, f32, dtype="int8")


def test_overflow_is_a_clear_error():
    big = diff_of({"w": sparse((2,), [0], [3e38])})
    with pytest.raises(VerificationError, match="overflows"):
        dict(add(big, big).entries)


def test_dense_policies():
    d1 = diff_of({"h": DenseEntry(np.full((2, 2), 1.0, dtype=np.float32)), "w": sparse((4,), [0], [1])})
    d2 = diff_of({"h": DenseEntry(np.full((2, 2), 3.0, dtype=np.float32))})
    notes = []
    # "last" (the default) is apply's rule: the later dense entry wins, with a warning.
    assert add(d1, d2, warn=notes.append).entries["h"].values_f32().tolist() == [[3, 3], [3, 3]]
    assert len(notes) == 1 and "overwritten" in notes[0] and "h (operand 1" in notes[0]
    with pytest.raises(VerificationError, match="--dense last"):
        add(d1, d2, dense="error")
    with pytest.raises(UsageError, match="first is gone.*sftdiff filter"):
        add(d1, d2, dense="first")
    assert add(d1, d2, dense="sum", weights=[0.5, 0.5]).entries["h"].values_f32().tolist() == [[2, 2], [2, 2]]
    # A sparse delta after the dense entry is added onto it (weighted); weights never scale dense values.
    s = diff_of({"h": sparse((2, 2), [3], [10])})
    assert add(d1, s, weights=[3, 0.5]).entries["h"].values_f32().tolist() == [[1, 1], [1, 6]]
    # ...but one before it is overwritten (issue 12: it used to give B + A's sparse values).
    assert add(s, d1).entries["h"].values_f32().tolist() == [[1, 1], [1, 1]]
    with pytest.raises(VerificationError, match="--dense last"):
        add(s, d1, dense="error")
    with pytest.raises(VerificationError, match="shape"):
        add(d1, diff_of({"h": sparse((4,), [3], [10])}))
    add(diff_of({"h": sparse((4,), [3], [10])}), d1, warn=notes.append)  # overwritten: its shape does not matter
    # scale and prune leave replacement values alone
    assert scale(d1, 2).entries["h"].values_f32().tolist() == [[1, 1], [1, 1]]


def test_subtract_removes_the_same_dense_entries_and_refuses_what_it_cannot_express():
    head = DenseEntry(np.full((2, 2), 1.0, dtype=np.float32))
    lang = diff_of({"h": head, "w": sparse((4,), [0, 1], [1, 2])})
    task = diff_of({"c": DenseEntry(np.full((3,), 5.0, dtype=np.float32)), "w": sparse((4,), [1, 2], [1, 1])})
    both = add(lang, task)
    back = subtract(both, lang)
    assert sorted(back.entries) == ["c", "w"]
    assert back.entries["w"].indices.tolist() == [1, 2] and back.entries["w"].values_f32().tolist() == [1, 1]
    with pytest.raises(VerificationError, match=r"does not replace it.*sftdiff filter .*--exclude 'h'"):
        subtract(task, lang)
    other = diff_of({"h": DenseEntry(np.full((2, 2), 2.0, dtype=np.float32))})
    with pytest.raises(VerificationError, match="different dense values.*sftdiff filter"):
        dict(subtract(both, other).entries)
    # A dense entry minus a sparse delta: applying the result, then B, gives A back.
    minus = subtract(lang, diff_of({"h": sparse((2, 2), [0], [0.5])}))
    assert minus.entries["h"].values_f32().tolist() == [[0.5, 1], [1, 1]]


def test_config_patches_later_wins_with_a_warning():
    a = SparseDiff({"w": sparse((2,), [0], [1])}, DiffMeta(base={"fingerprint": FP}, config_patch={"num_labels": 3, "x": 1}))
    b = SparseDiff({"w": sparse((2,), [1], [1])}, DiffMeta(base={"fingerprint": FP}, config_patch={"num_labels": 5}))
    notes = []
    for policy in ("last", "error", "sum"):
        assert add(a, b, dense=policy, warn=notes.append).meta.config_patch == {"num_labels": 5, "x": 1}
    assert len(notes) == 3 and all("'num_labels'" in n and "operand 1" in n and "operand 2" in n for n in notes)
    assert subtract(a, b).meta.config_patch == a.meta.config_patch
    # keys B patches to the same value are B's: subtracting B takes them out
    assert subtract(add(a, b, warn=notes.append), b).meta.config_patch == {"x": 1}


def test_user_fields_kept_where_operands_agree():
    meta = lambda **u: DiffMeta(base={"fingerprint": FP}, user=u)  # noqa: E731
    a = SparseDiff({"w": sparse((2,), [0], [1])}, meta(language="de", kind="language"))
    b = SparseDiff({"w": sparse((2,), [1], [1])}, meta(task="nli", kind="task"))
    assert add(a, b).meta.user == {"language": "de", "task": "nli"}


# -- refusals --------------------------------------------------------------------------------------


def test_different_bases_are_refused_unless_ignored():
    a = diff_of({"w": sparse((2,), [0], [1])})
    b = diff_of({"w": sparse((2,), [1], [1])}, fingerprint="sfp1:" + "1" * 32)
    with pytest.raises(VerificationError, match="different bases"):
        add(a, b)
    assert len(add(a, b, ignore_base=True).entries) == 1
    c = diff_of({"w": sparse((2,), [0], [1])}, tensors={"w": "a" * 32})
    d = diff_of({"w": sparse((2,), [1], [1])}, tensors={"w": "b" * 32})
    with pytest.raises(VerificationError, match="'w'"):
        subtract(c, d)


def test_shape_mismatch_is_refused_even_with_ignore_base():
    a = diff_of({"w": sparse((2, 3), [0], [1])})
    b = diff_of({"w": sparse((3, 2), [1], [1])})
    with pytest.raises(VerificationError, match="shape"):
        add(a, b, ignore_base=True)


# -- metadata, laziness ----------------------------------------------------------------------------


def test_provenance_records_operands_and_merges_base(tmp_path):
    a = diff_of({"w": sparse((2,), [0], [1])}, fingerprint=FP, tensors={"w": "a" * 32}, hint="m")
    b = diff_of({"v": sparse((2,), [1], [1])}, fingerprint=FP, tensors={"v": "b" * 32})
    a.save(tmp_path / "a.sft")
    loaded = SparseDiff.load(tmp_path / "a.sft")
    out = add(loaded, b, weights=[2, 1])
    prov = out.meta.provenance
    assert prov["operation"] == "add" and prov["weights"] == [2.0, 1.0]
    file_hash = hashlib.sha256((tmp_path / "a.sft").read_bytes()).hexdigest()
    assert prov["operands"][0] == {"name": loaded.path, "fingerprint": f"sha256:{file_hash}",
                                   "fingerprint_of": "file", "origin": {}}
    assert prov["operands"][1]["fingerprint"] == content_fingerprint(b)[0]
    assert out.meta.base == {"fingerprint": FP, "hint": "m", "tensors": {"w": "a" * 32, "v": "b" * 32}}
    out.save(tmp_path / "out.sft")
    assert SparseDiff.load(tmp_path / "out.sft").meta.provenance == prov


def test_in_memory_fingerprint_depends_on_content():
    a = diff_of({"w": sparse((2,), [0], [1])})
    assert content_fingerprint(a) == content_fingerprint(diff_of({"w": sparse((2,), [0], [1])}))
    assert content_fingerprint(a) != content_fingerprint(diff_of({"w": sparse((2,), [1], [1])}))


def test_lazy_entries_compute_once_when_cached_and_hide_empty_results():
    calls = []

    def compute(name):
        calls.append(name)
        return None if name == "gone" else sparse((2,), [0], [1])

    cached = LazyEntries(["b", "gone", "a"], compute)
    assert list(cached) == ["a", "b"] and "gone" not in cached
    cached["a"], cached["b"], cached["a"], cached.infos["a"]
    assert sorted(calls) == ["a", "b", "gone"] and cached.computed == 3
    calls.clear()
    uncached = LazyEntries(["a"], compute, cache_bytes=0)
    list(uncached), uncached["a"]
    assert calls == ["a", "a"]
    with pytest.raises(KeyError):
        uncached["gone"]


# -- CLI -------------------------------------------------------------------------------------------




@pytest.fixture()
def files(tmp_path):
    a = diff_of({"w": sparse((10,), [0, 3, 5], [1, -2, 3]), "v": sparse((4,), [1], [0.5])})
    b = diff_of({"w": sparse((10,), [3, 7], [2, 4])})
    other = diff_of({"w": sparse((10,), [1], [1])}, fingerprint="sfp1:" + "9" * 32)
    paths = {}
    for name, d in (("a", a), ("b", b), ("other", other)):
        paths[name] = tmp_path / f"{name}.sft"
        d.save(paths[name])
    return paths


def values_of(path) -> dict[str, tuple[list[int], list[float]]]:
    d = SparseDiff.load(path)
    d.validate()
    return {n: (d.entries[n].indices.tolist(), d.entries[n].values_f32().tolist()) for n in d.entries}


def test_cli_commands_write_valid_results_and_leave_inputs_alone(files, tmp_path, capsys):
    before = {k: p.read_bytes() for k, p in files.items()}
    out = lambda name: str(tmp_path / name)  # noqa: E731
    assert run(["add", str(files["a"]), str(files["b"]), "-o", out("sum.sft"), "--weights", "1,0.5"]) == 0
    assert values_of(out("sum.sft")) == {"v": ([1], [0.5]), "w": ([0, 3, 5, 7], [1.0, -1.0, 3.0, 2.0])}
    assert run(["subtract", str(files["a"]), str(files["b"]), "-o", out("diff.sft")]) == 0
    assert values_of(out("diff.sft"))["w"] == ([0, 3, 5, 7], [1.0, -4.0, 3.0, -4.0])
    assert run(["scale", str(files["a"]), "-2", "-o", out("neg.sft")]) == 0
    assert values_of(out("neg.sft"))["w"] == ([0, 3, 5], [-2.0, 4.0, -6.0])
    assert run(["prune", str(files["a"]), "-k", "2", "-o", out("top.sft")]) == 0
    assert values_of(out("top.sft")) == {"w": ([3, 5], [-2.0, 3.0])}
    assert run(["prune", str(files["a"]), "--threshold", "1", "--scope", "per-tensor", "-o", out("t.sft"), "-q"]) == 0
    assert values_of(out("t.sft")) == {"w": ([0, 3, 5], [1.0, -2.0, 3.0])}
    assert "wrote" in capsys.readouterr().err
    assert {k: p.read_bytes() for k, p in files.items()} == before


def test_cli_errors_have_exit_codes_and_one_line(files, tmp_path, capsys):
    out = str(tmp_path / "x.sft")
    assert run(["add", str(files["a"]), str(files["other"]), "-o", out]) == 4
    err = capsys.readouterr().err
    assert err.startswith("sftdiff: error:") and err.count("\n") == 1 and "--ignore-base" in err
    assert not os.path.exists(out)
    assert run(["add", str(files["a"]), str(files["other"]), "-o", out, "--ignore-base"]) == 0
    assert run(["add", str(files["a"]), str(files["b"]), "-o", out]) == 5  # exists, no --force
    assert run(["add", str(files["a"]), str(files["b"]), "-o", out, "--force"]) == 0
    assert run(["add", str(files["a"]), "-o", out, "--force"]) == 2
    assert run(["add", str(files["a"]), str(files["b"]), "-o", out, "--force", "--weights", "1"]) == 2
    assert run(["prune", str(files["a"]), "-o", out, "--force"]) == 2
    assert run(["subtract", str(files["a"]), str(tmp_path / "missing.sft"), "-o", out, "--force"]) in (3, 5)
    (tmp_path / "bad.sft").write_bytes(b"not a diff")
    assert run(["scale", str(tmp_path / "bad.sft"), "2", "-o", out, "--force"]) == 3
    capsys.readouterr()


def test_cli_does_not_import_torch(files, tmp_path):
    code = (
        "import sys\nfrom sftdiff.cli import main\n"
        f"main(['add', {str(files['a'])!r}, {str(files['b'])!r}, '-o', {str(tmp_path / 'n.sft')!r}, '-q'])\n"
        f"main(['prune', {str(files['a'])!r}, '-k', '1', '-o', {str(tmp_path / 'p.sft')!r}, '-q'])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- filter ----------------------------------------------------------------------------------------


def named_diff() -> SparseDiff:
    return diff_of({"encoder.layer.0.attention.query.weight": sparse((4, 4), [1, 5], [1, 2]),
                    "encoder.layer.1.output.dense.weight": sparse((4, 4), [3], [3]),
                    "embeddings.word_embeddings.weight": sparse((6, 4), [0], [1]),
                    "cls.predictions.bias": DenseEntry(np.arange(6, dtype=np.float32), "F32", "F32")})


def test_filter_that_keeps_nothing_is_refused_naming_the_globs_and_some_entry_names():
    from sftdiff.algebra import filter_entries

    diff = named_diff()
    with pytest.raises(UsageError) as info:  # the usual slip: the model's `bert.` prefix
        filter_entries(diff, include=["bert.encoder.*"], exclude=["*bias"])
    message = str(info.value)
    assert "\n" not in message and "include ['bert.encoder.*']" in message and "exclude ['*bias']" in message
    assert "of its 4 entries" in message and "'encoder.layer.0.attention.query.weight'" in message
    with pytest.raises(UsageError, match=r"\(include \['cls\.\*'\]; no dense entries\).*keep the dense entries"):
        filter_entries(diff, include=["cls.*"], dense=False)  # the globs match, but --no-dense drops it
    with pytest.raises(UsageError, match=r"exclude \['\*'\]"):
        filter_entries(diff, exclude=["*"])

    notes = []
    empty = filter_entries(diff, include=["bert.encoder.*"], allow_empty=True, warn=notes.append)
    assert len(empty.entries) == 0 and empty.meta.provenance["dropped"] == sorted(diff.entries)
    assert notes and "'bert.encoder.*' matches no entry" in notes[0]
    kept = filter_entries(diff, include=["encoder.*", "bert.*"], warn=notes.append)  # one glob matches: kept
    assert sorted(kept.entries) == ["encoder.layer.0.attention.query.weight", "encoder.layer.1.output.dense.weight"]
    assert any("'bert.*' matches no entry" in n for n in notes)


def test_cli_filter_that_keeps_nothing_exits_2_and_writes_nothing(tmp_path, capsys):
    src, out = tmp_path / "lang.sft", tmp_path / "out.sft"
    named_diff().save(src)
    before = src.read_bytes()
    assert run(["filter", str(src), "--include", "bert.encoder.*", "--include", "pooler.*", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sftdiff: error:") and err.count("\n") == 1 and "warning" not in err
    assert "include ['bert.encoder.*', 'pooler.*']" in err and "'encoder.layer" in err and str(src) in err
    assert not out.exists() and src.read_bytes() == before
    assert run(["filter", str(src), "--include", "encoder.*", "-o", str(out), "--json"]) == 0
    assert sorted(SparseDiff.load(out).entries) == ["encoder.layer.0.attention.query.weight",
                                                    "encoder.layer.1.output.dense.weight"]
