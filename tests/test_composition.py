"""One name map and one composition rule across apply, add, subtract, scale, filter and overlap.

The central property: applying diffs in order equals applying their sum,
`apply(base, A, B) == apply(base, add(A, B))` (and with scales ≙ weights), over generated stacks of
sparse and dense entries whose names are spelled bare (`encoder.…`) or with the base-model prefix
(`bert.encoder.…`). Values agree up to float32 rounding: apply adds each diff's values to the weight
in float32 one diff at a time, add sums the deltas in float64 first (a few ulps, far below any delta).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sftdiff.algebra as algebra
from sftdiff.algebra import add, align, filter_entries, scale, subtract
from sftdiff.bake import bake
from sftdiff.checkpoint import Checkpoint
from sftdiff.compose import CompositionWarning, merge_config_patches
from sftdiff.create import create_diff
from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from sftdiff.errors import VerificationError
from sftdiff.names import NameMap
from sftdiff.overlap import overlap

from helpers_models import build, run_main as run, save, tiny_bert_config

import torch  # noqa: E402  (helpers_models imported it already)
import transformers  # noqa: E402

PREFIX = "bert."
# base parameters (bare spelling) and their shapes; "classifier.weight" is a head the base lacks
PARAMS = {"embeddings.word_embeddings.weight": (6, 4), "encoder.layer.0.weight": (4, 4),
          "encoder.layer.0.bias": (4,), "pooler.dense.weight": (3, 4)}
HEAD = ("classifier.weight", (2, 4))


def base_state(prefixed: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {(PREFIX if prefixed else "") + n: rng.normal(size=s).astype(np.float32) for n, s in PARAMS.items()}


# -- the name map -------------------------------------------------------------------------------------


def test_name_map_follows_transformers_per_key_rule():
    bare = ["encoder.x", "pooler.y"]
    m = NameMap(bare, ["bert.encoder.x", "classifier.w", "bert.new.z"])
    assert (m.prefix, m.added, m.stripped) == ("bert.", "bert.", "")
    assert m.to_ref("bert.encoder.x") == "encoder.x" and m.to_ref("encoder.x") == "encoder.x"
    assert m.to_ref("classifier.w") is None and m.spell("classifier.w") == "classifier.w"
    assert m.spell("bert.new.z") == "new.z"  # a base-model parameter the bare side lacks
    m = NameMap(["bert.encoder.x", "classifier.w"], ["encoder.x"])
    assert (m.added, m.stripped) == ("", "bert.") and m.to_ref("encoder.x") == "bert.encoder.x"
    # a mostly-matching, mixed-spelled name set still finds the prefix for its odd names
    m = NameMap(["bert.a.x", "bert.b.x", "bert.c.x"], ["bert.a.x", "bert.b.x", "c.x"])
    assert m.to_ref("c.x") == "bert.c.x"
    assert NameMap(["a"], ["b"]).prefix == ""
    assert m.respell({"c.x": 1}) == {"bert.c.x": 1}


def test_align_spells_as_the_first_operand_and_refuses_two_spellings_in_one_operand():
    e = SparseEntry.from_float((2,), np.array([0]), np.array([1.0], np.float32), base_dtype="F32")
    a = SparseDiff({"encoder.x": e}, DiffMeta())
    b = SparseDiff({"bert.encoder.x": e, "bert.pooler.y": e}, DiffMeta())
    al = align([a, b])
    assert al.names == {"encoder.x": [(0, "encoder.x"), (1, "bert.encoder.x")], "pooler.y": [(1, "bert.pooler.y")]}
    al = align([b, a])
    assert set(al.names) == {"bert.encoder.x", "bert.pooler.y"}
    # a bare later operand's parameter of its base that the first operand lacks gets the prefix too
    c = SparseDiff({"encoder.x": e, "embeddings.z": e}, DiffMeta())
    assert set(align([b, c]).names) == {"bert.encoder.x", "bert.pooler.y", "bert.embeddings.z"}
    with pytest.raises(VerificationError, match="spelled two ways"):
        align([SparseDiff({"encoder.x": e}, DiffMeta()), SparseDiff({"x": e, "bert.x": e, "encoder.x": e}, DiffMeta())])


def test_config_patches_later_wins_with_a_warning_naming_key_and_diffs():
    with pytest.warns(CompositionWarning, match=r"'architectures' .*lang\.sft.*task\.sft.*task\.sft, wins"):
        merged = merge_config_patches([("lang.sft", {"architectures": ["M"], "x": 1}),
                                       ("task.sft", {"architectures": ["T"], "num_labels": 3})])
    assert merged == {"architectures": ["T"], "x": 1, "num_labels": 3}
    assert merge_config_patches([("a", None)]) is None


# -- apply(base, A, B) == apply(base, add(A, B)) ------------------------------------------------------


@st.composite
def stacks(draw: st.DrawFn) -> tuple[bool, list[SparseDiff], list[float]]:
    prefixed_base = draw(st.booleans())
    diffs, scales = [], []
    current: dict = {}  # shape after the dense entries so far; a sparse entry must fit it
    for d in range(draw(st.integers(2, 3))):
        prefixed = draw(st.booleans())
        rng = np.random.default_rng(draw(st.integers(0, 2**31)))
        entries: dict = {}
        for name, base_shape in list(PARAMS.items()) + [HEAD]:
            # the base lacks the head: a sparse entry for it needs an earlier diff's dense one
            kinds = ["none", "sparse", "dense"] if name != HEAD[0] or name in current else ["none", "dense"]
            kind = draw(st.sampled_from(kinds))
            if kind == "dense" and name.startswith("embeddings."):  # a resized embedding, sometimes
                current[name] = draw(st.sampled_from([base_shape, (7, 4)]))
            elif kind == "dense":
                current[name] = base_shape
            shape = current.get(name, base_shape)
            numel = int(np.prod(shape))
            spelled = (PREFIX if prefixed and name != HEAD[0] else "") + name
            if kind == "sparse":
                idx = np.sort(rng.choice(numel, size=int(rng.integers(1, numel + 1)), replace=False))
                vals = (rng.uniform(0.1, 1.0, len(idx)) * rng.choice([-1, 1], len(idx))).astype(np.float32)
                entries[spelled] = SparseEntry.from_float(shape, idx, vals, base_dtype="F32")
            elif kind == "dense":
                entries[spelled] = DenseEntry(rng.normal(size=shape).astype(np.float32), "F32",
                                              None if name == HEAD[0] else "F32")
        patch = {"architectures": [f"Model{d}"], f"key{d}": d} if draw(st.booleans()) else None
        diffs.append(SparseDiff(entries, DiffMeta(config_patch=patch)))
        scales.append(draw(st.sampled_from([1.0, 1.0, 0.5, -1.0, 2.0])))
    return prefixed_base, diffs, scales


def baked(base: Checkpoint, diffs: list[SparseDiff], scales: list[float] | None, out: Path,
          verify: bool = False) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompositionWarning)
        bake(base, diffs, out, scales=scales, verify=verify, warn=lambda m: None)
    ckpt = Checkpoint.open(out)
    return {"tensors": {n: np.array(ckpt.array(n)) for n in ckpt.tensors}, "config": ckpt.config}


def assert_same_checkpoint(x: dict, y: dict) -> None:
    assert sorted(x["tensors"]) == sorted(y["tensors"])
    for name in x["tensors"]:
        a, b = x["tensors"][name], y["tensors"][name]
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6, err_msg=name)
    assert x["config"] == y["config"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks(), st.booleans())
def test_apply_in_order_equals_apply_of_the_sum(stack, use_scales):
    prefixed_base, diffs, scales = stack
    scales = scales if use_scales else None
    base = Checkpoint.from_state_dict(base_state(prefixed_base))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", CompositionWarning)
        in_order = baked(base, diffs, scales, Path(tmp) / "in-order")
        total = add(*diffs, weights=scales)
        summed = baked(base, [total], None, Path(tmp) / "summed")
        assert_same_checkpoint(in_order, summed)
        # the sum holds each parameter once, whatever the operands' spellings
        assert len(total.entries) == len({NameMap(PARAMS, [n]).spell(n) for d in diffs for n in d.entries})
        # scale ≙ apply's per-diff scale (dense entries are not scaled by either)
        if scales is not None:
            scaled = [scale(d, s) for d, s in zip(diffs, scales)]
            assert_same_checkpoint(in_order, baked(base, scaled, None, Path(tmp) / "scaled"))


def test_sparse_onto_a_head_an_earlier_diff_adds_applies_like_the_sum(tmp_path):
    """The base lacks the head: the first diff adds it densely, the second trains it sparsely
    (recording the digest of its own base's head, which does not matter here)."""
    base = Checkpoint.from_state_dict(base_state(True))
    name, shape = HEAD
    a = SparseDiff({name: DenseEntry(np.ones(shape, np.float32))}, DiffMeta())
    b = SparseDiff({name: SparseEntry.from_float(shape, np.array([1, 6]), np.array([0.5, -1], np.float32))},
                   DiffMeta(base={"tensors": {name: "0" * 32}}))
    x = baked(base, [a, b], [1.0, 2.0], tmp_path / "x", verify=True)
    assert x["tensors"][name].reshape(-1).tolist() == [1, 2, 1, 1, 1, 1, -1, 1]
    assert_same_checkpoint(x, baked(base, [add(a, b, weights=[1, 2])], None, tmp_path / "y"))
    with pytest.raises(VerificationError, match="not in the base"):
        bake(base, [a, b], tmp_path / "z", with_dense=[False, True], warn=lambda m: None)


def test_issue12_sparse_then_dense_gives_the_dense_value(tmp_path):
    base = Checkpoint.from_state_dict(base_state(False))
    head = "encoder.layer.0.weight"
    a = SparseDiff({head: SparseEntry.from_float((4, 4), np.array([0, 5]), np.array([1, 2], np.float32))}, DiffMeta())
    b = SparseDiff({PREFIX + head: DenseEntry(np.full((4, 4), 3.0, np.float32))}, DiffMeta())
    with pytest.warns(CompositionWarning, match="overwritten"):
        total = add(a, b)
    assert total.entries[head].values_f32().tolist() == np.full((4, 4), 3.0).tolist()
    assert_same_checkpoint(baked(base, [a, b], None, tmp_path / "x"), baked(base, [total], None, tmp_path / "y"))


# -- lazy results: each entry computed once ------------------------------------------------------------


def test_one_bake_of_a_lazy_sum_computes_each_entry_once(tmp_path, monkeypatch):
    calls = []
    real = algebra.combine_entry
    monkeypatch.setattr(algebra, "combine_entry", lambda name, *a: (calls.append(name), real(name, *a))[1])
    base = Checkpoint.from_state_dict(base_state(False))
    e = lambda i: SparseEntry.from_float((4, 4), np.array([i]), np.array([1.0], np.float32))  # noqa: E731
    total = add(SparseDiff({"encoder.layer.0.weight": e(1)}, DiffMeta()),
                SparseDiff({"encoder.layer.0.weight": e(2)}, DiffMeta()))
    assert calls == []  # building the result computes nothing
    baked(base, [total], None, tmp_path / "out")
    assert calls == ["encoder.layer.0.weight"]  # was 7 (issue 11)
    total.save(tmp_path / "sum.sft")
    assert total.info("encoder.layer.0.weight").nnz == 2 and calls == ["encoder.layer.0.weight"]
    # nested results: the inner one is computed once too
    calls.clear()
    nested = add(total, scale(total, 2.0))
    nested.save(tmp_path / "nested.sft")
    assert calls == ["encoder.layer.0.weight"]


# -- two spellings of one fine-tune --------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """A bare BertModel base, the `bert.`-spelled head model with the same weights, and a fine-tune."""
    root = tmp_path_factory.mktemp("pair")
    config = tiny_bert_config(num_labels=3)
    head_model = build(transformers.BertForTokenClassification, config, seed=0)
    bare = transformers.BertModel(config, add_pooling_layer=False).eval()
    bare.load_state_dict(head_model.bert.state_dict())
    save(bare, root / "bare")
    save(head_model, root / "head")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in head_model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save(head_model, root / "ft")
    return root


def test_two_spellings_of_one_fine_tune_are_one_diff(bert_pair, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d_bare = create_diff(str(bert_pair / "bare"), str(bert_pair / "ft"), density=0.1, scope="per-tensor")
        d_pref = create_diff(str(bert_pair / "head"), str(bert_pair / "ft"), density=0.1, scope="per-tensor")
    assert any(n.startswith("bert.") for n in d_pref.entries) and not any(n.startswith("bert.") for n in d_bare.entries)
    assert d_bare.meta.base_fingerprint != d_pref.meta.base_fingerprint  # different checkpoints, same weights
    report = overlap(d_bare, d_pref)
    assert report.total.jaccard == 1.0 and report.total.shared == d_bare.nnz
    assert report.dense_skipped == ["classifier.bias", "classifier.weight"]  # new head in one, sparse in the other
    total = add(d_bare, d_pref)
    union = set(d_bare.entries) | {n.removeprefix("bert.") for n in d_pref.entries}
    assert len(total.entries) == len(union) == len(d_bare.entries)  # 39 here, not 38 + 38
    assert set(total.entries) == set(d_bare.entries)  # spelled as the first operand
    assert len(total.meta.base["tensors"]) == len(d_bare.meta.base["tensors"])
    back = subtract(total, d_pref)  # 2·Δ − Δ: the bare cut again, in its spelling
    assert sorted(back.entries) == sorted(d_bare.entries)
    for name in d_bare.entries:
        np.testing.assert_allclose(back.entries[name].values_f32(), d_bare.entries[name].values_f32(), rtol=1e-6)
    # the same through the CLI, with the result applied to either base
    d_bare.save(tmp_path / "bare.sft")
    d_pref.save(tmp_path / "pref.sft")
    assert run(["overlap", str(tmp_path / "bare.sft"), str(tmp_path / "pref.sft"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["command"] == "overlap" and data["total"]["jaccard"] == 1.0
    assert run(["add", str(tmp_path / "pref.sft"), str(tmp_path / "bare.sft"), "-o", str(tmp_path / "sum.sft"),
                "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["command"] == "add" and data["entries"] == len(union)
    for base in ("bare", "head"):
        bake(str(bert_pair / base), [str(tmp_path / "sum.sft")], tmp_path / f"out-{base}", warn=lambda m: None)


# -- the README session: lang + task ------------------------------------------------------------------


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """base/ (bare BertModel), lang.sft (BertForMaskedLM: dense MLM head) and task.sft
    (BertForTokenClassification: dense classifier), made by `create` as the README does."""
    root = tmp_path_factory.mktemp("session")
    config = tiny_bert_config(num_labels=3)
    base = build(transformers.BertModel, config, seed=0)
    save(base, root / "base")
    heads = (("mlm", transformers.BertForMaskedLM, 1), ("ner", transformers.BertForTokenClassification, 2))
    for name, cls, seed in heads:
        model = build(cls, config, seed=seed)
        model.bert.load_state_dict(base.state_dict(), strict=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        save(model, root / f"ft-{name}")
    assert run(["create", str(root / "base"), str(root / "ft-mlm"), "-o", str(root / "lang.sft"),
                "--density", "0.05", "-q"]) == 0
    assert run(["create", str(root / "base"), str(root / "ft-ner"), "-o", str(root / "task.sft"),
                "--density", "0.05", "-q"]) == 0
    return root


def entries_of(path: Path) -> dict:
    d = SparseDiff.load(path)
    return {n: d.entries[n] for n in d.entries}


def test_readme_add_subtract_filter_session(session, tmp_path, capsys):
    lang, task, both = session / "lang.sft", session / "task.sft", tmp_path / "both.sft"
    lang_diff, task_diff = SparseDiff.load(lang), SparseDiff.load(task)
    assert any(i.kind == "dense" and i.name.startswith("cls.") for i in lang_diff.infos())
    assert any(i.kind == "dense" and i.name.startswith("classifier.") for i in task_diff.infos())
    assert lang_diff.meta.config_patch["architectures"] == ["BertForMaskedLM"]
    capsys.readouterr()
    # add: works, with a warning naming the key and both diffs
    assert run(["add", str(lang), str(task), "-o", str(both)]) == 0
    err = capsys.readouterr().err
    assert "warning: config_patch key 'architectures'" in err and str(lang) in err and str(task) in err
    both_diff = SparseDiff.load(both)
    assert both_diff.meta.config_patch["architectures"] == ["BertForTokenClassification"]
    # apply warns the same way (and lets the later diff win too)
    notes = []
    result = bake(str(session / "base"), [lang_diff, task_diff], tmp_path / "m0", warn=notes.append)
    assert any("'architectures'" in n and str(task) in n for n in notes) and notes == result.warnings
    assert json.loads((tmp_path / "m0" / "config.json").read_text())["architectures"] == ["BertForTokenClassification"]
    # applying the sum equals applying the two in order
    with_both = baked(Checkpoint.open(session / "base"), [both_diff], None, tmp_path / "m1")
    in_order = baked(Checkpoint.open(session / "base"), [lang_diff, task_diff], None, tmp_path / "m2")
    assert_same_checkpoint(in_order, with_both)
    # subtract gives the task diff back: same entries, the head exactly, values up to one rounding
    again = tmp_path / "task-again.sft"
    assert run(["subtract", str(both), str(lang), "-o", str(again), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["command"] == "subtract" and summary["output"] == str(again)
    got, want = entries_of(again), entries_of(task)
    assert sorted(got) == sorted(want)
    for name, entry in want.items():
        if isinstance(entry, DenseEntry):
            assert np.array_equal(got[name].values, entry.values), name
        else:
            assert np.array_equal(got[name].indices, entry.indices), name
            np.testing.assert_allclose(got[name].values_f32(), entry.values_f32(), rtol=1e-6, atol=1e-9)
    assert SparseDiff.load(again).meta.config_patch == task_diff.meta.config_patch
    # filter drops the MLM head (and the config patch that describes it), keeping the rest as it is
    body = tmp_path / "lang-body.sft"
    assert run(["filter", str(lang), "--exclude", "cls.*", "-o", str(body), "--json"]) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out)
    assert summary["command"] == "filter" and summary["config_patch_dropped"] is True
    assert all(n.startswith("cls.") for n in summary["dropped"]) and summary["dropped"]
    assert "config_patch" in out.err
    kept = SparseDiff.load(body)
    assert not any(n.startswith("cls.") for n in kept.entries) and kept.meta.config_patch is None
    assert kept.meta.provenance["operation"] == "filter" and kept.meta.provenance["exclude"] == ["cls.*"]
    assert all(np.array_equal(kept.entries[n].values, lang_diff.entries[n].values) for n in kept.entries)
    # --no-dense, and the sum of the body with the task needs no config decision
    assert run(["filter", str(task), "--no-dense", "-o", str(tmp_path / "task-sparse.sft"), "-q"]) == 0
    assert all(i.kind == "sparse" for i in SparseDiff.load(tmp_path / "task-sparse.sft").infos())
    assert "config_patch (keys architectures" in capsys.readouterr().err  # warnings print even with -q
    assert run(["add", str(body), str(task), "-o", str(tmp_path / "b2.sft")]) == 0
    assert "warning" not in capsys.readouterr().err
    # subtracting a diff whose dense head the minuend lacks says what to run instead
    assert run(["subtract", str(task), str(lang), "-o", str(tmp_path / "no.sft")]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sftdiff filter" in err and "--exclude" in err


def test_filter_api_and_messages(session):
    lang = SparseDiff.load(session / "lang.sft")
    notes = []
    only = filter_entries(lang, include=["encoder.layer.0.*"], exclude=["*bias"], warn=notes.append)
    assert only.entries and all(n.startswith("encoder.layer.0.") and not n.endswith("bias") for n in only.entries)
    assert [i.nnz for i in only.infos()] == [lang.info(n).nnz for n in only.entries]
    assert only.entries.computed == 0  # names and facts come from the input's header
    assert only.meta.config_patch is None and any("config_patch" in n for n in notes)
    assert set(only.meta.base["tensors"]) == set(only.entries)
    filter_entries(lang, exclude=["nothing*"], warn=notes.append)
    assert any("'nothing*' matches no entry" in n for n in notes)
    kept = filter_entries(lang, exclude=["*LayerNorm*"], warn=notes.append)
    assert kept.meta.config_patch == lang.meta.config_patch  # dense entries remain: the patch stays


def test_cli_json_for_prune_scale_and_nothing_pruned(session, tmp_path, capsys):
    task = session / "task.sft"
    nnz = SparseDiff.load(task).nnz
    capsys.readouterr()
    assert run(["prune", str(task), "-k", str(nnz * 10), "-o", str(tmp_path / "p.sft"), "--json"]) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert data["command"] == "prune" and data["nnz"] == data["nnz_in"] == nnz
    assert "nothing was pruned" in out.err and any("nothing was pruned" in w for w in data["warnings"])
    assert run(["prune", str(task), "-k", "3", "-o", str(tmp_path / "p3.sft"), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["nnz"] == 3 and "nothing" not in out.err
    assert run(["scale", str(task), "-1", "-o", str(tmp_path / "neg.sft"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["command"] == "scale" and data["factor"] == -1.0 and data["dense"]
    # inputs are never the output, even with --force
    assert run(["scale", str(task), "2", "-o", str(task), "--force"]) == 2
    assert "is the input" in capsys.readouterr().err


def test_apply_to_model_one_diff_after_another_follows_the_rule(tmp_path):
    """In-place application, diff by diff, gives what `bake` gives for the stack (names either way)."""
    from sftdiff.inplace import apply_to_model

    model = build(transformers.BertModel, tiny_bert_config(), seed=3)
    state = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    w = "encoder.layer.0.attention.self.query.weight"
    shape = state[w].shape
    rng = np.random.default_rng(0)
    sparse_a = SparseEntry.from_float(shape, np.arange(0, 40, 3), rng.uniform(0.1, 1, 14).astype(np.float32))
    dense_b = DenseEntry(rng.normal(size=shape).astype(np.float32))
    sparse_c = SparseEntry.from_float(shape, np.arange(1, 50, 7), rng.uniform(0.1, 1, 7).astype(np.float32))
    stack = [SparseDiff({w: sparse_a}, DiffMeta()), SparseDiff({"bert." + w: dense_b}, DiffMeta()),
             SparseDiff({"bert." + w: sparse_c}, DiffMeta())]
    scales = [2.0, 3.0, -0.5]
    for diff, s in zip(stack, scales):
        apply_to_model(model, diff, s)
    expected = baked(Checkpoint.from_state_dict(state), stack, scales, tmp_path / "out")["tensors"][w]
    want = dense_b.values_f32().reshape(-1).copy()  # the dense value (not scaled), then C's delta
    want[sparse_c.indices] += np.float32(-0.5) * sparse_c.values_f32()
    np.testing.assert_array_equal(model.state_dict()[w].numpy(), expected)
    np.testing.assert_array_equal(expected.reshape(-1), want)
