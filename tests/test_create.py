"""`sftdiff create`: exact top-k selection, entry planning, exact values, inputs, metadata and CLI."""

from __future__ import annotations

import importlib
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from helpers_models import build, save, tiny_bert_config, tiny_llama_config  # noqa: E402

import sftdiff  # noqa: E402
create_mod = importlib.import_module("sftdiff.create")  # noqa: E402
from sftdiff.checkpoint import Checkpoint  # noqa: E402
from sftdiff.create import CreateWarning, create_diff, exact_deltas  # noqa: E402
from sftdiff.diff import DenseEntry, SparseDiff, SparseEntry  # noqa: E402
from sftdiff.dtypes import from_float32, to_float32  # noqa: E402
from sftdiff.errors import FormatError, UsageError, VerificationError  # noqa: E402
from sftdiff.fingerprint import checkpoint_digests, model_fingerprint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# ---------------------------------------------------------------- fixtures and helpers


def perturbed(model, seed: int, scale: float = 1e-3, fraction: float = 0.5):
    """The model with a seeded change to `fraction` of each parameter (a stand-in for training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            mask = torch.rand(p.shape, generator=gen) < fraction
            p.add_((noise * mask).to(p.dtype))
    return model


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A bare BertModel base and fine-tunes of it as BertModel, BertForMaskedLM and BertForTokenClassification."""
    root = tmp_path_factory.mktemp("bert")
    base = build(transformers.BertModel, tiny_bert_config(), seed=0)
    save(base, root / "base")
    ft = perturbed(build(transformers.BertModel, tiny_bert_config(), seed=0), seed=1)
    save(ft, root / "ft")
    save(ft, root / "ft-sharded", max_shard_size="20KB")
    mlm = transformers.BertForMaskedLM(tiny_bert_config(architectures=["BertForMaskedLM"]))
    mlm.bert.load_state_dict(base.state_dict(), strict=False)
    save(perturbed(mlm, seed=2), root / "mlm")
    tok = transformers.BertForTokenClassification(tiny_bert_config(num_labels=3, architectures=["BertForTokenClassification"]))
    tok.bert.load_state_dict(base.state_dict(), strict=False)
    save(perturbed(tok, seed=3), root / "tok")
    return root


def state(path) -> dict[str, np.ndarray]:
    ckpt = Checkpoint.open(path)
    return {n: np.array(ckpt.array(n)) for n in ckpt.tensors}


def brute_force_topk(base: dict, ft: dict, names: list[str], k: int) -> dict[str, np.ndarray]:
    """The spec's rule on whole arrays: |fl32(ft − base)| desc, name asc, flat index asc; no zeros."""
    rows = []
    for rank, name in enumerate(sorted(names)):
        mags = np.abs(ft[name].astype(np.float32).reshape(-1) - base[name].astype(np.float32).reshape(-1))
        for idx in np.flatnonzero(mags):
            rows.append((-float(mags[idx]), rank, int(idx), name))
    rows.sort()
    chosen: dict[str, list[int]] = {}
    for _, _, idx, name in rows[:k]:
        chosen.setdefault(name, []).append(idx)
    return {n: np.array(sorted(v)) for n, v in chosen.items()}


def sparse_indices(diff: SparseDiff) -> dict[str, np.ndarray]:
    return {n: np.asarray(e.indices) for n, e in diff.entries.items() if isinstance(e, SparseEntry)}


def reconstruct(base_raw: np.ndarray, dtype: str, entry: SparseEntry | None) -> np.ndarray:
    """The spec's apply (float32 sum, one rounding to the base dtype), done with numpy."""
    work = to_float32(base_raw, dtype).reshape(-1).copy()
    if entry is not None:
        work[entry.indices] = work[entry.indices] + entry.values_f32()
    return from_float32(work, dtype).reshape(base_raw.shape)


def reachable(b32: np.ndarray, target: np.ndarray, dtype: str, ulps: int = 64) -> np.ndarray:
    """Whether any float32 value within `ulps` of the plain difference reconstructs target."""
    v = (target.astype(np.float64) - b32.astype(np.float64)).astype(np.float32)
    ok = np.zeros(len(v), bool)
    for direction in (np.float32(np.inf), np.float32(-np.inf)):
        c = v.copy()
        for _ in range(ulps):
            ok |= to_float32(from_float32(b32 + c, dtype), dtype) == target
            c = np.nextafter(c, direction)
    return ok


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "sftdiff", *args], capture_output=True, text=True, env=env,
                          cwd=REPO)


# ---------------------------------------------------------------- selection


def test_global_topk_is_exact_against_brute_force(bert):
    base, ft = state(bert / "base"), state(bert / "ft")
    names = [n for n in base if base[n].dtype == np.float32]
    for k in (1, 37, 1000, 5000):
        diff = create_diff(bert / "base", bert / "ft", k=k)
        expected = brute_force_topk(base, ft, names, k)
        got = sparse_indices(diff)
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
        assert diff.nnz == k == diff.meta.origin["nnz"]


def test_ties_follow_name_then_index_across_slices(monkeypatch):
    """Equal magnitudes everywhere: the first names, then the lowest indices, win, even when a
    tensor is offered in many slices."""
    monkeypatch.setattr(create_mod, "SLICE", 7)
    rng = np.random.default_rng(0)
    base = {n: (rng.integers(-64, 64, size=s) / 64).astype(np.float32)
            for n, s in [("b.w", (5, 9)), ("a.w", (4, 4)), ("c", (30,))]}
    ft = {n: v + rng.choice(np.float32([-0.5, -0.25, 0, 0.25, 0.5]), size=v.shape) for n, v in base.items()}
    for k in (3, 10, 17, 40, 200):
        diff = create_diff(base, ft, k=k)
        expected = brute_force_topk(base, ft, list(base), k)
        got = sparse_indices(diff)
        assert got.keys() == expected.keys(), k
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])


def test_density_rounds_half_up_and_short_budgets_keep_all_nonzero():
    base = {"w": np.zeros(10, np.float32)}
    ft = {"w": np.array([0, 1, 0, 2, 0, 3, 0, 0, 0, 0], np.float32)}
    assert create_diff(base, ft, density=0.25).meta.origin["k"] == 3  # 2.5 -> 3
    diff = create_diff(base, ft, k=8)
    assert diff.nnz == 3 and diff.meta.origin["selected"] == 3 and diff.meta.origin["k"] == 8
    np.testing.assert_array_equal(diff.entries["w"].indices, [1, 3, 5])
    assert create_diff(base, base, density=1.0).entries == {}


def test_per_tensor_scope_keeps_the_same_fraction_of_each(bert):
    base, ft = state(bert / "base"), state(bert / "ft")
    diff = create_diff(bert / "base", bert / "ft", density=0.1, scope="per-tensor")
    got = sparse_indices(diff)
    for name, b in base.items():
        if b.dtype != np.float32:
            continue
        count = int(np.floor(0.1 * b.size + 0.5))
        expected = brute_force_topk({name: b}, {name: ft[name]}, [name], count).get(name)
        if expected is None:
            assert name not in got
        else:
            np.testing.assert_array_equal(got[name], expected)
    assert diff.meta.origin["scope"] == "per-tensor"


# ---------------------------------------------------------------- which parameters become what


def test_include_exclude_and_dense_globs(bert):
    diff = create_diff(bert / "base", bert / "ft", density=0.2, include=["encoder.*", "pooler.*"],
                       exclude=["*LayerNorm*"], dense=["pooler.dense.bias"])
    names = set(diff.entries)
    assert names and all(n.startswith(("encoder.", "pooler.")) for n in names)
    assert not any("LayerNorm" in n for n in names)
    dense = diff.entries["pooler.dense.bias"]
    assert isinstance(dense, DenseEntry) and dense.dtype == "F32" and dense.base_dtype == "F32"
    np.testing.assert_array_equal(dense.values, state(bert / "ft")["pooler.dense.bias"])
    assert diff.meta.origin["include"] == ["encoder.*", "pooler.*"] and diff.meta.origin["dense"] == ["pooler.dense.bias"]
    # k counts only selectable parameters: encoder minus LayerNorm, pooler weight
    selectable = sum(np.size(v) for n, v in state(bert / "base").items()
                     if n.startswith("encoder.") and "LayerNorm" not in n) + 32 * 32
    assert diff.meta.origin["selectable_numel"] == selectable
    assert diff.meta.origin["k"] == int(np.floor(0.2 * selectable + 0.5))


def test_new_resized_missing_and_integer_parameters():
    rng = np.random.default_rng(1)
    base = {"emb": rng.normal(size=(6, 4)).astype(np.float32), "w": rng.normal(size=(4, 4)).astype(np.float32),
            "gone": np.ones(3, np.float32), "ids": np.arange(6, dtype=np.int64)}
    ft = {"emb": rng.normal(size=(8, 4)).astype(np.float32), "w": base["w"] + 1,
          "head": rng.normal(size=(2, 4)).astype(np.float16), "ids": np.arange(6, dtype=np.int64)[::-1].copy()}
    with pytest.warns(CreateWarning) as caught:
        diff = create_diff(base, ft, density=1.0)
    text = " | ".join(str(w.message) for w in caught)
    assert "only in the fine-tune" in text and "head" in text
    assert "changed shape" in text and "emb [6, 4]->[8, 4]" in text
    assert "missing from the fine-tune" in text and "gone" in text
    head, emb = diff.entries["head"], diff.entries["emb"]
    assert isinstance(head, DenseEntry) and head.dtype == "F16" and head.base_dtype is None
    assert isinstance(emb, DenseEntry) and emb.base_dtype == "F32" and emb.shape == (8, 4)
    assert "ids" not in diff.entries and "gone" not in diff.entries  # int buffers are never deltas
    assert diff.entries["w"].nnz == 16
    assert set(diff.meta.base["tensors"]) == {"emb", "w"}  # base tensors the diff replaces or changes


def test_tied_weights_count_once_in_bin_checkpoints(tmp_path):
    """BertForMaskedLM ties the decoder to the word embeddings; torch.save keeps the sharing."""
    base = build(transformers.BertForMaskedLM, tiny_bert_config(), seed=0)
    ft = perturbed(build(transformers.BertForMaskedLM, tiny_bert_config(), seed=0), seed=4)
    for name, model in (("base", base), ("ft", ft)):
        (tmp_path / name).mkdir()
        torch.save(model.state_dict(), tmp_path / name / "pytorch_model.bin")
    ckpt = Checkpoint.open(tmp_path / "base")
    assert "cls.predictions.decoder.weight" in ckpt.aliases
    diff = create_diff(tmp_path / "base", tmp_path / "ft", density=1.0)
    assert "cls.predictions.decoder.weight" not in diff.entries
    assert "bert.embeddings.word_embeddings.weight" in diff.entries
    floats = {n: t for n, t in ckpt.tensors.items() if t.dtype == "F32"}
    assert set(ckpt.aliases) == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert diff.meta.base["numel"] == sum(t.numel for n, t in floats.items() if n not in ckpt.aliases)
    assert diff.meta.base["fingerprint"] == model_fingerprint(checkpoint_digests(ckpt))


def test_tied_lm_head_of_a_head_model_maps_to_the_bare_base():
    cfg = tiny_llama_config(tie_word_embeddings=True)
    base = build(transformers.LlamaModel, cfg, seed=0)
    ft = transformers.LlamaForCausalLM(cfg)
    ft.model.load_state_dict(base.state_dict())
    perturbed(ft, seed=5)
    sd = ft.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CreateWarning)  # nothing new, nothing missing
        diff = create_diff(base.state_dict(), sd, density=0.5)
    assert "embed_tokens.weight" in diff.entries and not any(n.startswith(("lm_head", "model.")) for n in diff.entries)
    assert diff.meta.origin["name_prefix"] == {"added": "model.", "removed": ""}


def test_prefixed_head_models_against_a_bare_base(bert):
    with pytest.warns(CreateWarning) as caught:
        mlm = create_diff(bert / "base", bert / "mlm", density=0.05)
    assert any("only in the fine-tune stored densely: cls.predictions." in str(w.message) for w in caught)
    assert mlm.meta.origin["name_prefix"] == {"added": "bert.", "removed": ""}
    sparse = [n for n, e in mlm.entries.items() if isinstance(e, SparseEntry)]
    dense = sorted(n for n, e in mlm.entries.items() if isinstance(e, DenseEntry))
    base_names = set(Checkpoint.open(bert / "base").tensors)
    assert sparse and set(sparse) <= base_names  # spelled as the base spells them
    assert dense and all(n.startswith("cls.predictions.") for n in dense)
    assert mlm.meta.config_patch == {"architectures": ["BertForMaskedLM"]}

    with pytest.warns(CreateWarning) as caught:
        tok = create_diff(bert / "base", bert / "tok", density=1.0)
    assert any("pooler.dense.weight" in str(w.message) for w in caught)  # token classifiers have no pooler
    assert sorted(n for n, e in tok.entries.items() if isinstance(e, DenseEntry)) == ["classifier.bias", "classifier.weight"]
    patch = tok.meta.config_patch
    assert patch["architectures"] == ["BertForTokenClassification"] and len(patch["id2label"]) == 3
    assert "transformers_version" not in patch and "dtype" not in patch

    # base + diff, keyed as the diff stores them, loads into the head model with every weight as fine-tuned
    ft_state = state(bert / "tok")
    base_state = state(bert / "base")
    baked = {}
    for name, entry in tok.entries.items():
        baked[name] = (np.array(entry.values) if isinstance(entry, DenseEntry)
                       else reconstruct(base_state[name], "F32", entry))
    for name, value in baked.items():
        source = name if name in ft_state else "bert." + name
        np.testing.assert_allclose(value, ft_state[source], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- exact values


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_density_one_reconstructs_the_fine_tune(dtype, tmp_path):
    base = build(transformers.BertModel, tiny_bert_config(), seed=0, dtype=TORCH_DTYPES[dtype])
    save(base, tmp_path / "base")
    save(perturbed(build(transformers.BertModel, tiny_bert_config(), seed=0, dtype=TORCH_DTYPES[dtype]), seed=6,
                   scale=1e-4, fraction=1.0), tmp_path / "ft")
    diff = create_diff(tmp_path / "base", tmp_path / "ft", density=1.0)
    base_state, ft_state = state(tmp_path / "base"), state(tmp_path / "ft")
    unreachable = 0
    for name, raw in base_state.items():
        if raw.dtype.kind in "iub":
            continue
        got = reconstruct(raw, dtype, diff.entries.get(name))
        same = to_float32(got, dtype) == to_float32(ft_state[name], dtype)
        if dtype != "F32":
            np.testing.assert_array_equal(got, ft_state[name])  # bit for bit
            continue
        # float32: exact wherever any float32 value can be exact (not where a weight crosses zero
        # with |ft| far below |base|: then ft has bits below the sum's resolution)
        misses = np.flatnonzero(~same.reshape(-1))
        b32, target = raw.reshape(-1)[misses], ft_state[name].reshape(-1)[misses]
        assert not reachable(b32, target, "F32").any()
        unreachable += len(misses)
    total = sum(v.size for v in base_state.values() if v.dtype.kind == "f")
    assert unreachable <= 0.005 * total  # ~0.02% with deltas of 1e-4 on weights of 0.02


ADVERSARIAL_PAIRS = [  # (base, fine-tuned)
    (1.0, 1e-8), (0.05, -3e-7), (-2.0, 2.0), (3.0, -1e-30), (1e-38, 2e-38), (1e-44, -1e-45),
    (0.0, 1e-45), (1e-45, 0.0), (-0.024205938, 0.25), (1.0761502, -4.0), (-1.1886425e-06, 3.814697265625e-06),
    (65504.0, -65504.0), (6e-8, 6.1e-5), (1e4, 0.1), (-7.5, 7.5),
]


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_adversarial_values_reconstruct_wherever_possible(dtype):
    rng = np.random.default_rng(7)
    pairs = np.array(ADVERSARIAL_PAIRS, np.float32)
    b_rand = (rng.choice([-1, 1], 4000) * 2.0 ** rng.uniform(-24 if dtype == "F16" else -40, 8, 4000)).astype(np.float32)
    f_rand = (rng.choice([-1, 1], 4000) * 2.0 ** rng.uniform(-24 if dtype == "F16" else -40, 8, 4000)).astype(np.float32)
    f_rand[::2] = (np.sign(f_rand[::2]) * 2.0 ** np.round(np.log2(np.abs(f_rand[::2])))).astype(np.float32)
    b32 = np.concatenate([pairs[:, 0], b_rand])
    f32 = np.concatenate([pairs[:, 1], f_rand])
    with np.errstate(over="ignore"):
        b_raw, f_raw = from_float32(b32, dtype), from_float32(f32, dtype)
    finite = np.isfinite(to_float32(b_raw, dtype)) & np.isfinite(to_float32(f_raw, dtype))
    b_raw, f_raw = b_raw[finite], f_raw[finite]
    to_torch = (lambda a: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)) if dtype == "BF16" else torch.from_numpy
    diff = create_diff({"w": to_torch(b_raw.copy())}, {"w": to_torch(f_raw.copy())}, density=1.0)
    got = to_float32(reconstruct(b_raw, dtype, diff.entries.get("w")), dtype)
    target = to_float32(f_raw, dtype)
    misses = np.flatnonzero(got != target)
    assert not reachable(to_float32(b_raw, dtype)[misses], target[misses], dtype).any()
    # plain float32 subtraction misses some that the neighbour search gets right (rounding boundaries)
    plain = to_float32(from_float32(to_float32(b_raw, dtype) + (target - to_float32(b_raw, dtype)), dtype), dtype)
    if dtype == "F32":
        assert (plain != target).sum() > len(misses)
    assert len(misses) < len(target)


def test_exact_deltas_handles_a_rounding_boundary():
    b, f = np.float32([-0.024205938]), np.float32([0.25])
    assert np.float32(b + (f - b))[0] != f[0]  # plain subtraction misses
    v = exact_deltas(b, "F32", f, "F32")
    assert np.float32(b + v)[0] == f[0]


def test_value_dtypes_round_and_drop_zeros():
    base = {"w": np.zeros(4, np.float32)}
    ft = {"w": np.array([1e-9, 0.1, 70000.0, -3.0], np.float32)}
    bf = create_diff(base, ft, density=1.0, dtype="bfloat16")
    assert bf.entries["w"].dtype == "BF16" and bf.meta.origin["dtype"] == "BF16"
    with pytest.raises(UsageError, match="float16 range"):
        create_diff(base, ft, density=1.0, dtype="float16")
    small = create_diff({"w": np.zeros(2, np.float32)}, {"w": np.float32([1e-9, 1.0])}, k=2, dtype="F16")
    assert small.nnz == 1  # 1e-9 rounds to zero in float16 and is dropped


# ---------------------------------------------------------------- inputs, metadata, determinism


def _write_bin(folder: Path, sd: dict, shards: int) -> None:
    folder.mkdir()
    names = sorted(sd)
    if shards == 1:
        torch.save({n: torch.from_numpy(sd[n]) for n in names}, folder / "pytorch_model.bin")
        return
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: torch.from_numpy(sd[n]) for n in part}, folder / file)
        weight_map.update({n: file for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_all_input_kinds_give_the_same_entries(bert, tmp_path):
    ft_state = state(bert / "ft")
    _write_bin(tmp_path / "bin1", ft_state, 1)
    _write_bin(tmp_path / "bin3", ft_state, 3)
    assert len(list((bert / "ft-sharded").glob("model-*.safetensors"))) > 1
    sources = [bert / "ft", bert / "ft-sharded", tmp_path / "bin1", tmp_path / "bin3",
               bert / "ft" / "model.safetensors", ft_state, Checkpoint.open(bert / "ft")]
    results = [create_diff(bert / "base", s, density=0.03) for s in sources]
    reference = results[0]
    for diff in results[1:]:
        assert diff.entries.keys() == reference.entries.keys()
        for name, entry in reference.entries.items():
            np.testing.assert_array_equal(diff.entries[name].indices, entry.indices)
            np.testing.assert_array_equal(diff.entries[name].values, entry.values)
        assert diff.meta.base == reference.meta.base
    assert results[0].meta.origin["source"] == str(bert / "ft") and results[5].meta.origin["source"] is None


@pytest.mark.filterwarnings("ignore::sftdiff.create.CreateWarning")
def test_metadata_and_deterministic_bytes(bert, tmp_path):
    for name in ("a.sft", "b.sft"):
        create_diff(str(bert / "base"), str(bert / "mlm"), k=500, user={"task": "mlm"}).save(tmp_path / name)
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.sft", "b.sft")]
    assert digest[0] == digest[1]
    diff = SparseDiff.load(tmp_path / "a.sft")
    diff.validate()
    base = Checkpoint.open(bert / "base")
    meta = diff.meta
    assert meta.base["hint"] == str(bert / "base")
    assert meta.base["fingerprint"] == model_fingerprint(checkpoint_digests(base))
    sparse = {n for n, e in diff.entries.items() if isinstance(e, SparseEntry)}
    assert set(meta.base["tensors"]) == sparse  # the MLM head is new: no base tensor to record
    assert meta.base["tensors"] == checkpoint_digests(base, sorted(sparse))
    assert meta.base["numel"] == sum(t.numel for t in base.tensors.values() if t.dtype == "F32")
    assert meta.origin["tool"] == f"sftdiff {sftdiff.__version__}" and meta.origin["method"] == "topk"
    assert meta.origin["k"] == 500 == meta.origin["nnz"] and meta.user == {"task": "mlm"}
    assert sftdiff.create_diff is create_diff and create_mod.create is create_diff


def test_inputs_are_left_unchanged(bert):
    before = {p: p.read_bytes() for p in (bert / "ft").iterdir()}
    sd = {"w": torch.ones(3)}
    create_diff(bert / "base", bert / "ft", density=0.5)
    create_diff({"w": torch.zeros(3)}, sd, k=1)
    assert {p: p.read_bytes() for p in (bert / "ft").iterdir()} == before and torch.equal(sd["w"], torch.ones(3))


# ---------------------------------------------------------------- errors


def test_bad_options_and_mismatched_inputs(bert, tmp_path):
    with pytest.raises(UsageError):
        create_diff(bert / "base", bert / "ft", k=3, density=0.1)
    with pytest.raises(UsageError):
        create_diff(bert / "base", bert / "ft")
    with pytest.raises(UsageError):
        create_diff(bert / "base", bert / "ft", k=3, scope="layer")
    with pytest.raises(UsageError):
        create_diff(bert / "base", bert / "ft", k=3, dtype="int8")
    llama = build(transformers.LlamaModel, tiny_llama_config(), seed=0)
    with pytest.raises(VerificationError, match="does not look like a fine-tune"):
        create_diff(bert / "base", llama.state_dict(), k=3)
    with pytest.raises(FormatError, match="no such file"):
        create_diff(bert / "base", tmp_path / "nowhere", k=3)
    with pytest.raises(FormatError, match="NaN or infinity"):
        create_diff({"w": np.zeros(3, np.float32)}, {"w": np.float32([0, np.nan, 1])}, k=1)


# ---------------------------------------------------------------- CLI


def test_cli_summary_quiet_force_and_no_torch(bert, tmp_path):
    out = tmp_path / "d.sft"
    code = ("import sys; from sftdiff.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code, "create", str(bert / "base"), str(bert / "mlm"), "-o", str(out),
                        "--density", "0.01", "--exclude", "*LayerNorm*", "--task", "mlm"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    # --exclude '*LayerNorm*' is for the base's LayerNorms: the new MLM head keeps its own (issue 12)
    assert lines[0].startswith("sftdiff: warning: 5 parameter(s) only in the fine-tune")
    assert lines[-1].startswith(f"wrote {out}: ") and "density 1.0000%" in lines[-1] and "5 dense entries" in lines[-1]
    diff = SparseDiff.load(out)
    assert diff.meta.user == {"task": "mlm"}
    assert sorted(n for n in diff.entries if "LayerNorm" in n) == ["cls.predictions.transform.LayerNorm.bias",
                                                                 "cls.predictions.transform.LayerNorm.weight"]

    r = run_cli("create", str(bert / "base"), str(bert / "ft"), "-o", str(out), "-k", "10", "--quiet")
    assert r.returncode == 5 and "already exists" in r.stderr and "--force" in r.stderr
    r = run_cli("create", str(bert / "base"), str(bert / "ft"), "-o", str(out), "-k", "10", "--quiet", "--force")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""
    assert SparseDiff.load(out).nnz == 10
    r = run_cli("create", str(bert / "base"), str(bert / "ft"), "-o", str(tmp_path / "x.sft"), "-k", "100000")
    assert r.returncode == 0 and "kept them all" in r.stderr
    r = run_cli("create", str(bert / "base"), str(bert / "ft"), "-o", str(tmp_path / "y.sft"), "-k", "10000000")
    assert r.returncode == 0 and "is more than the" in r.stderr and "density 100.0000%" in r.stderr, r.stderr
    assert "%" not in r.stderr.replace("density 100%", "").replace("density 100.0000%", ""), r.stderr


def test_cli_errors_have_their_exit_codes(bert, tmp_path):
    def create(*args: str) -> subprocess.CompletedProcess:
        return run_cli("create", *args, "-o", str(tmp_path / "e.sft"), "-k", "5")

    r = run_cli("create", str(bert / "base"), str(bert / "ft"), "-o", str(tmp_path / "e.sft"), "-k", "5",
                "--density", "0.1")
    assert r.returncode == 2 and "exactly one" in r.stderr
    r = create(str(bert / "base"), str(tmp_path / "missing"))
    assert r.returncode == 3 and "missing: no such file" in r.stderr and "Traceback" not in r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in (bert / "ft-sharded").iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    r = create(str(bert / "base"), str(broken))
    assert r.returncode == 3 and shard.name in r.stderr and "Traceback" not in r.stderr
    save(build(transformers.LlamaModel, tiny_llama_config(), seed=0), tmp_path / "llama")
    r = create(str(bert / "base"), str(tmp_path / "llama"))
    assert r.returncode == 4 and "does not look like a fine-tune" in r.stderr
    assert not (tmp_path / "e.sft").exists()


# ---------------------------------------------------------------- pass 1 fast paths (BF16 pairs, threads, floor)


def _bf16_states(seed: int, shapes: dict, unaligned: bool = False):
    """Base and fine-tune state dicts of BF16 torch tensors with many exactly tied deltas, and the
    same values as float32 numpy arrays for `brute_force_topk`."""
    rng = np.random.default_rng(seed)
    torch_sd, numpy_sd = [{}, {}], [{}, {}]
    for name, shape in shapes.items():
        b32 = (rng.integers(-64, 64, size=shape) / 64).astype(np.float32)
        f32 = b32 + rng.choice(np.float32([-0.5, -0.25, 0, 0, 0.25, 0.5, 1e-3]), size=shape)
        for i, v in enumerate((b32, f32)):
            raw = from_float32(v, "BF16")
            if unaligned:  # start 2 bytes into a buffer: the 32-bit word view is misaligned
                holder = torch.zeros(raw.size + 1, dtype=torch.int16)
                holder[1:] = torch.from_numpy(raw.view(np.int16).reshape(-1))
                t = holder[1:].view(torch.bfloat16).reshape(shape)
            else:
                t = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
            torch_sd[i][name] = t
            numpy_sd[i][name] = to_float32(raw, "BF16")
    return torch_sd, numpy_sd


@pytest.mark.parametrize("unaligned", [False, True])
def test_bf16_pairs_threads_and_slices_match_brute_force(monkeypatch, unaligned):
    """The BF16 word-pair path, odd sizes, tiny slices and tasks split over threads: same selection
    as the spec's rule on whole arrays, in both scopes."""
    monkeypatch.setattr(create_mod, "SLICE", 10)
    monkeypatch.setattr(create_mod, "TASK", 30)
    (base, ft), (b32, f32) = _bf16_states(1, {"b.w": (7, 9), "a.w": (5, 5), "c": (101,), "d": (1,)}, unaligned)
    for k in (1, 5, 40, 120, 500):
        got = sparse_indices(create_diff(base, ft, k=k))
        expected = brute_force_topk(b32, f32, list(b32), k)
        assert got.keys() == expected.keys(), k
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])
    per_tensor = sparse_indices(create_diff(base, ft, density=0.3, scope="per-tensor"))
    for name in b32:
        count = int(np.floor(0.3 * b32[name].size + 0.5))
        expected = brute_force_topk(b32, f32, [name], count).get(name, np.empty(0, np.int64))
        np.testing.assert_array_equal(per_tensor.get(name, np.empty(0, np.int64)), expected)


def test_selection_does_not_depend_on_threads_or_task_size(monkeypatch):
    (base, ft), _ = _bf16_states(2, {f"t{i}": (64, 33) for i in range(6)})
    results = []
    for workers, task in ((1, 1 << 22), (2, 64), (3, 10)):
        monkeypatch.setattr(create_mod, "WORKERS", workers)
        monkeypatch.setattr(create_mod, "TASK", task)
        monkeypatch.setattr(create_mod, "SLICE", 16)
        results.append(sparse_indices(create_diff(base, ft, k=300)))
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for name in results[0]:
            np.testing.assert_array_equal(other[name], results[0][name])


def test_a_floor_hint_above_the_kth_magnitude_falls_back_to_an_exact_selection(monkeypatch):
    (base, ft), (b32, f32) = _bf16_states(3, {"x": (50, 40), "y": (2000,)})
    monkeypatch.setattr(create_mod, "estimated_floor", lambda *a, **kw: 0.75)  # above most deltas
    got = sparse_indices(create_diff(base, ft, k=700))
    expected = brute_force_topk(b32, f32, list(b32), 700)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_bf16_values_are_refused_whatever_the_floor(monkeypatch, bad):
    (base, ft), _ = _bf16_states(4, {"w": (301,)})
    ft["w"] = ft["w"].clone()
    ft["w"][123] = bad
    for hint in (0.0, 0.3):
        monkeypatch.setattr(create_mod, "estimated_floor", lambda *a, **kw: hint)
        with pytest.raises(FormatError, match="NaN or infinity"):
            create_diff(base, ft, k=5)


def test_threshold_bits_never_filter_a_magnitude_reaching_the_floor():
    for floor in (0.0, 1e-45, 0.1, 1 / 3, 0.0052, 3.4e38):
        bits = create_mod._threshold_bits(floor)
        mags = np.float32([floor, np.nextafter(np.float32(floor), np.float32(np.inf))]) if floor else np.float32([1e-45])
        assert (mags.view(np.uint32) >= bits).all(), floor
        below = np.nextafter(np.float32(bits.view(np.float32)), np.float32(0))
        assert float(below) < floor or floor == 0


# ---------------------------------------------------------------- globs, budgets (issue 12)


@pytest.mark.parametrize("globs", [dict(include=["*intermediate*"]), dict(include=["*attention.output*"]),
                                   dict(include=["*.weight"], exclude=["*LayerNorm*"])])
def test_include_does_not_make_a_real_fine_tune_look_unrelated(bert, globs):
    """The relatedness check counts every parameter the two share, before globs: `--include
    '*intermediate*'` used to refuse the real fine-tune ("4 of 39 base parameters match")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CreateWarning)
        diff = create_diff(bert / "base", bert / "tok", k=200, **globs)
    assert diff.entries and all(
        (not globs.get("include") or any(create_mod.matches_any(n, [g]) for g in globs["include"]))
        and not create_mod.matches_any(n, globs.get("exclude", ()))
        for n in diff.entries if n in Checkpoint.open(bert / "base").tensors)
    assert {"classifier.weight", "classifier.bias"} <= set(diff.entries)  # the new head always travels
    with pytest.raises(VerificationError, match="does not look like a fine-tune"):  # still refuses strangers
        create_diff(bert / "base", build_unrelated_state(), k=10, **globs)


def build_unrelated_state() -> dict[str, np.ndarray]:
    """A Llama state dict: nothing in common with BERT."""
    model = build(transformers.LlamaForCausalLM, tiny_llama_config(), seed=0)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_exclude_glob_for_base_parameters_keeps_new_head_parameters(bert):
    """`--exclude '*LayerNorm*'` is about the base's LayerNorms: the new MLM head's LayerNorm stays
    (dense); an exclude glob that matches only new parameters (`cls.*`) drops them, and says so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CreateWarning)
        diff = create_diff(bert / "base", bert / "mlm", k=100, exclude=["*LayerNorm*"])
    assert "cls.predictions.transform.LayerNorm.weight" in diff.entries
    assert not any("LayerNorm" in n for n in diff.entries if not n.startswith("cls."))
    assert not any("dropped" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CreateWarning)
        diff = create_diff(bert / "base", bert / "mlm", k=100, exclude=["cls.*"])
    assert not any(n.startswith("cls.") for n in diff.entries)
    dropped = [str(w.message) for w in caught if "dropped by --exclude" in str(w.message)]
    assert len(dropped) == 1 and "'cls.*'" in dropped[0] and "cls.predictions.bias" in dropped[0], dropped
    diff = create_diff(bert / "base", bert / "mlm", k=100, exclude=["cls.*"], dense=["cls.predictions.bias"])
    assert [n for n in diff.entries if n.startswith("cls.")] == ["cls.predictions.bias"]  # --dense wins


def test_k_above_selectable_is_clamped_with_a_warning(bert):
    with pytest.warns(CreateWarning, match="is more than the"):
        diff = create_diff(bert / "base", bert / "ft", k=10**9)
    assert diff.meta.origin["density"] == 1.0 and diff.meta.origin["k"] == diff.meta.origin["selectable_numel"]


@pytest.mark.parametrize("args, expected", [
    (["--density", "2"], "--density must be in (0, 1]"),
    (["--density", "0"], "--density must be in (0, 1]"),
    (["-k", "-3"], "-k must be a non-negative integer"),
    (["-k", "5", "--density", "0.1"], "exactly one"),
    ([], "exactly one"),
])
def test_create_option_errors_are_one_line_exit_2(bert, tmp_path, args, expected):
    """`--density 2` printed click's 3-line usage block; every option error is one line, exit 2."""
    r = run_cli("create", str(bert / "base"), str(bert / "ft"), "-o", str(tmp_path / "e.sft"), *args)
    assert r.returncode == 2 and expected in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Usage:" not in r.stderr and not (tmp_path / "e.sft").exists()


def test_create_json_summary(bert, tmp_path):
    out = tmp_path / "j.sft"
    r = run_cli("create", str(bert / "base"), str(bert / "tok"), "-o", str(out), "-k", "300", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    diff = SparseDiff.load(out)
    assert summary["command"] == "create" and summary["output"] == str(out) and summary["k"] == 300
    assert summary["nnz"] == diff.nnz == 300 and summary["scope"] == "global" and summary["dtype"] == "F32"
    assert summary["bytes"] == out.stat().st_size and summary["selectable"] == diff.meta.origin["selectable_numel"]
    assert summary["dense"] == ["classifier.bias", "classifier.weight"]
    assert summary["config_patch"] == diff.meta.config_patch and len(summary["config_patch"]["id2label"]) == 3
    assert len(summary["warnings"]) == 2 and "only in the fine-tune" in summary["warnings"][0]
    assert "wrote" not in r.stderr and "%|" not in r.stderr  # no summary line or progress bar beside the JSON
