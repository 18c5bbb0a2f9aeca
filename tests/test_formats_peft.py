"""PEFT adapters: SpIEL (peft_type SFT) import/export, LoRA import (checked against peft's own
merge) and LoRA export (loaded back by peft)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from sftdiff.checkpoint import Checkpoint  # noqa: E402
from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry  # noqa: E402
from sftdiff.errors import FormatError  # noqa: E402
from sftdiff.formats import convert, load_foreign  # noqa: E402

transformers.logging.set_verbosity_error()

QUERY = "bert.encoder.layer.0.attention.self.query.weight"
VALUE = "bert.encoder.layer.1.attention.self.value.weight"
EMBED = "bert.embeddings.word_embeddings.weight"


def tiny_bert(seed: int = 0, num_labels: int = 3) -> transformers.BertForSequenceClassification:
    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "bert"
    tiny_bert().save_pretrained(folder)
    return folder


def state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- SpIEL


def spiel_adapter(folder: Path, deltas: dict[str, tuple[np.ndarray, np.ndarray]], base_hint: str | None,
                  *, as_bin: bool = False) -> Path:
    folder.mkdir(parents=True)
    tensors = {}
    for module, (indices, values) in deltas.items():
        tensors[f"base_model.model.{module}.sft_delta.indices"] = indices
        tensors[f"base_model.model.{module}.sft_delta.values"] = values.astype(np.float32)
    config = {"peft_type": "SFT", "base_model_name_or_path": base_hint, "target_modules": sorted(deltas)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if as_bin:
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / "adapter_model.bin")
    else:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def messy_deltas(seed: int = 0):
    """Unsorted indices with repeats and an explicit zero, and the dense delta they add up to."""
    rng = np.random.default_rng(seed)
    deltas, expected = {}, {}
    for module, shape in ((QUERY[:-7], (16, 16)), (VALUE[:-7], (16, 16))):
        idx = rng.integers(0, 256, size=60).astype(np.int32)
        idx = np.concatenate([idx, idx[:10]])  # repeats
        vals = rng.standard_normal(len(idx)).astype(np.float32)
        vals[3] = 0.0
        dense = np.zeros(256, dtype=np.float32)
        np.add.at(dense, idx, vals)
        deltas[module], expected[module + ".weight"] = (idx, vals), dense.reshape(shape)
    return deltas, expected


@pytest.mark.parametrize("as_bin", [False, True])
def test_spiel_import_sums_repeats_and_drops_zeros(base_dir, tmp_path, as_bin):
    deltas, expected = messy_deltas()
    folder = spiel_adapter(tmp_path / "spiel", deltas, None, as_bin=as_bin)
    diff = load_foreign(str(folder), base=Checkpoint.open(base_dir))
    diff.save(tmp_path / "d.sft")  # the result obeys every rule of the format
    assert set(diff.entries) == set(expected)
    for name, dense in expected.items():
        entry = diff.entries[name]
        np.testing.assert_allclose(entry.to_dense(), dense, rtol=1e-6, atol=1e-7)
        assert entry.nnz == int(np.count_nonzero(dense))


def test_spiel_needs_a_base_for_shapes(base_dir, tmp_path):
    deltas, expected = messy_deltas()
    folder = spiel_adapter(tmp_path / "nobase", deltas, None)
    with pytest.raises(FormatError, match="pass --base"):
        load_foreign(str(folder))
    # base_model_name_or_path pointing at a local folder is enough.
    hinted = spiel_adapter(tmp_path / "hinted", deltas, str(base_dir))
    diff = load_foreign(str(hinted))
    np.testing.assert_allclose(diff.entries[QUERY].to_dense(), expected[QUERY], rtol=1e-6, atol=1e-7)
    assert diff.meta.base["fingerprint"].startswith("sfp1:")


def test_spiel_export_round_trips(base_dir, tmp_path):
    deltas, expected = messy_deltas(1)
    folder = spiel_adapter(tmp_path / "in", deltas, str(base_dir))
    convert(str(folder), tmp_path / "a.sft")
    result = convert(str(tmp_path / "a.sft"), tmp_path / "out", to_format="peft-sft")
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert config["peft_type"] == "SFT" and config["base_model_name_or_path"] == str(base_dir)
    back = load_foreign(str(result.output))
    original = SparseDiff.load(tmp_path / "a.sft")
    assert set(back.entries) == set(original.entries)
    for name in original.entries:
        np.testing.assert_array_equal(back.entries[name].indices, original.entries[name].indices)
        np.testing.assert_array_equal(back.entries[name].values, original.entries[name].values)


def test_spiel_export_refuses_what_it_cannot_hold(tmp_path):
    diff = SparseDiff({"classifier.bias": DenseEntry(np.ones(3, np.float32))}, DiffMeta())
    diff.save(tmp_path / "d.sft")
    with pytest.raises(FormatError, match="cannot be written as PEFT-SFT"):
        convert(str(tmp_path / "d.sft"), tmp_path / "out", to_format="peft-sft")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- LoRA import


def lora_adapter(folder: Path, seed: int, **config) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Save a peft LoRA adapter with random (nonzero) factors; return base and merged weights."""
    model = tiny_bert()
    base = state(model)
    fields = dict(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"])
    fields.update(config)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**fields))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(folder)
    merged = state(peft_model.merge_and_unload())
    return base, merged


@pytest.mark.parametrize("config", [
    {},
    {"use_rslora": True, "rank_pattern": {"value": 2}, "alpha_pattern": {"query": 3}},
    {"modules_to_save": ["classifier"]},
])
def test_lora_import_matches_peft_merge(base_dir, tmp_path, config):
    base, merged = lora_adapter(tmp_path / "lora", 0, **config)
    diff = load_foreign(str(tmp_path / "lora"), base=Checkpoint.open(base_dir))
    changed = {n for n in base if not np.array_equal(base[n], merged[n])}
    assert set(diff.entries) == changed
    for name in changed:
        entry = diff.entries[name]
        if isinstance(entry, DenseEntry):
            np.testing.assert_allclose(entry.values_f32(), merged[name], rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(entry.to_dense(), merged[name] - base[name], rtol=1e-4, atol=1e-6)
    assert ("classifier.weight" in diff.entries) == ("modules_to_save" in config)


def test_lora_fan_in_fan_out_transposes(tmp_path):
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    base = state(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "gpt2lora")
    merged = state(pm.merge_and_unload())
    diff = load_foreign(str(tmp_path / "gpt2lora"))
    name = "transformer.h.0.attn.c_attn.weight"
    assert set(diff.entries) == {name}
    np.testing.assert_allclose(diff.entries[name].to_dense(), merged[name] - base[name], rtol=1e-4, atol=1e-6)


def test_lora_import_keeps_exact_top_k(tmp_path):
    base, merged = lora_adapter(tmp_path / "lora", 2)
    names = sorted(n for n in base if not np.array_equal(base[n], merged[n]))
    deltas = [(merged[n] - base[n]).reshape(-1) for n in names]
    total = sum(d.size for d in deltas)
    k = 100
    diff = load_foreign(str(tmp_path / "lora"), k=k)
    assert diff.nnz == k
    kept = np.concatenate([diff.entries[n].values_f32() for n in names if n in diff.entries])
    threshold = np.sort(np.abs(np.concatenate(deltas)))[-k]
    assert np.all(np.abs(kept) >= threshold * (1 - 1e-5))
    dense = load_foreign(str(tmp_path / "lora"), density=1.0)
    assert dense.nnz == total  # every value of a random product is nonzero
    half = load_foreign(str(tmp_path / "lora"), density=0.5)
    assert half.nnz == int(np.floor(0.5 * total + 0.5))


@pytest.mark.parametrize("config,match", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "trains biases"),
])
def test_lora_refuses_what_a_diff_cannot_hold(tmp_path, config, match):
    lora_adapter(tmp_path / "lora", 0, target_modules=["query"], **config)
    with pytest.raises(FormatError, match=match):
        load_foreign(str(tmp_path / "lora"))


# ---------------------------------------------------------------- LoRA export


def test_lora_export_loads_in_peft_within_reported_error(base_dir, tmp_path):
    ckpt = Checkpoint.open(base_dir)
    rng = np.random.default_rng(0)
    entries = {}
    for name in (QUERY, VALUE, EMBED, "bert.encoder.layer.0.attention.self.query.bias"):
        shape = ckpt.tensors[name].shape
        numel = int(np.prod(shape))
        idx = np.sort(rng.choice(numel, size=numel // 5, replace=False))
        entries[name] = SparseEntry.from_float(shape, idx, rng.standard_normal(len(idx)) * 0.05)
    SparseDiff(entries, DiffMeta(base={"hint": str(base_dir)})).save(tmp_path / "d.sft")

    proc = subprocess.run([sys.executable, "-m", "sftdiff", "convert", str(tmp_path / "d.sft"), "-o",
                           str(tmp_path / "lora"), "--rank", "6"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "total relative error" in proc.stderr and "query.bias" in proc.stderr

    result = convert(str(tmp_path / "d.sft"), tmp_path / "lora2", rank=6)
    report = result.lora
    assert report.unrepresented == ["bert.encoder.layer.0.attention.self.query.bias"]
    model = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "lora2"))
    merged = state(model.merge_and_unload())
    base = state(tiny_bert())
    residual = total = 0.0
    for name, entry in entries.items():
        target = entry.to_dense()
        got = merged[name] - base[name]
        error = np.linalg.norm(got - target) / np.linalg.norm(target)
        assert error == pytest.approx(report.errors[name], rel=1e-3, abs=1e-5)
        assert 0 < error < 1 or name in report.unrepresented
        residual += np.linalg.norm(got - target) ** 2
        total += np.linalg.norm(target) ** 2
    assert np.sqrt(residual / total) == pytest.approx(report.total_error, rel=1e-3)
    # Full rank reproduces a 2-D delta exactly.
    exact = convert(str(tmp_path / "d.sft"), tmp_path / "lora16", rank=16).lora
    assert exact.errors[QUERY] < 1e-5 and exact.errors[VALUE] < 1e-5


# ---------------------------------------------------------------- hostile adapters (fuzzer findings)


def _raw_adapter(folder: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"base_model.model.{k}": v for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


_Q = QUERY[: -len(".weight")]
_I32, _F32 = np.int32, np.float32

SPIEL_HOSTILE = {
    "indices-float": ({"indices": np.array([1.0, 2.0], _F32), "values": np.ones(2, _F32)}, "not integers"),
    "indices-2d": ({"indices": np.array([[1, 2]], _I32), "values": np.ones(2, _F32)}, "must be 1-D"),
    "values-int": ({"indices": np.array([1, 2], _I32), "values": np.array([1, 2], _I32)}, "not floating point"),
    "length-mismatch": ({"indices": np.array([1, 2, 3], _I32), "values": np.ones(2, _F32)}, "3 indices but 2 values"),
    "index-negative": ({"indices": np.array([-1, 2], _I32), "values": np.ones(2, _F32)}, "out of range"),
    "index-past-end": ({"indices": np.array([1, 256], _I32), "values": np.ones(2, _F32)}, "out of range"),
    "index-huge-uint64": ({"indices": np.array([1, 2**64 - 1], np.uint64), "values": np.ones(2, _F32)}, "out of range"),
    "repeats-overflow-float32": ({"indices": np.array([3, 3], _I32), "values": np.full(2, 3e38, _F32)}, "infinity"),
}


@pytest.mark.parametrize("case", list(SPIEL_HOSTILE))
def test_hostile_spiel_tensors_are_format_errors(base_dir, tmp_path, case):
    parts, match = SPIEL_HOSTILE[case]
    tensors = {f"{_Q}.sft_delta.{kind}": array for kind, array in parts.items()}
    folder = _raw_adapter(tmp_path / "spiel", {"peft_type": "SFT"}, tensors)
    with pytest.raises(FormatError, match=match) as info:
        load_foreign(str(folder), base=Checkpoint.open(base_dir))
    assert "\n" not in str(info.value)


def _lora_tensors(rank: int = 2, a_rank: int | None = None, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"{_Q}.lora_A.weight": rng.standard_normal((a_rank or rank, 16)).astype(dtype),
            f"{_Q}.lora_B.weight": rng.standard_normal((16, rank)).astype(dtype)}


LORA_HOSTILE = {
    "r-boolean": ({"r": True}, {}, "r must be a positive integer"),
    "r-float": ({"r": 2.0}, {}, "r must be a positive integer"),
    "alpha-negative": ({"lora_alpha": -4}, {}, "lora_alpha must be a positive number"),
    "alpha-pattern-list": ({"alpha_pattern": ["query"]}, {}, "alpha_pattern must be an object"),
    "rank-pattern-value-string": ({"rank_pattern": {"query": "2"}}, {}, "must be a positive integer"),
    "pattern-key-not-a-regex": ({"alpha_pattern": {"query(": 2}}, {}, "not a valid regular expression"),
    "use-rslora-string": ({"use_rslora": "yes"}, {}, "use_rslora must be true or false"),
    "modules-to-save-numbers": ({"modules_to_save": [1, 2]}, {}, "modules_to_save must be a list"),
    "base-hint-number": ({"base_model_name_or_path": 5}, {}, "base_model_name_or_path must be a string"),
    "factors-integer": ({}, {"dtype": np.int32}, "expected floating point"),
    "factor-ranks-differ": ({}, {"a_rank": 3}, "A is \\[3, 16\\], B is \\[16, 2\\]"),
    "rank-differs-from-config": ({"r": 4}, {}, "has rank 2 but the config says r=4"),
}


@pytest.mark.parametrize("case", list(LORA_HOSTILE))
def test_hostile_lora_adapters_are_format_errors(base_dir, tmp_path, case):
    config, tensor_args, match = LORA_HOSTILE[case]
    folder = _raw_adapter(tmp_path / "lora", {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config},
                          _lora_tensors(**tensor_args))
    with pytest.raises(FormatError, match=match) as info:
        load_foreign(str(folder), base=Checkpoint.open(base_dir))
    assert "\n" not in str(info.value)


def test_lora_product_overflowing_float32_is_a_format_error(base_dir, tmp_path):
    tensors = {k: np.full_like(v, 1e30) for k, v in _lora_tensors().items()}
    folder = _raw_adapter(tmp_path / "lora", {"peft_type": "LORA", "r": 2, "lora_alpha": 2}, tensors)
    with pytest.raises(FormatError, match="NaN or infinity"):
        load_foreign(str(folder), base=Checkpoint.open(base_dir))


def test_lora_shapes_are_checked_against_the_base_before_multiplying(base_dir, tmp_path, monkeypatch):
    """A/B whose product would not fit the base parameter are refused before ΔW is computed (a
    small file can describe an enormous product)."""
    from sftdiff.errors import VerificationError
    from sftdiff.formats import lora

    rng = np.random.default_rng(0)
    tensors = {f"{_Q}.lora_A.weight": rng.standard_normal((1, 4000)).astype(np.float32),
               f"{_Q}.lora_B.weight": rng.standard_normal((4000, 1)).astype(np.float32)}
    folder = _raw_adapter(tmp_path / "lora", {"peft_type": "LORA", "r": 1, "lora_alpha": 1}, tensors)
    monkeypatch.setattr(lora, "_delta", lambda *a: pytest.fail("ΔW was computed"))
    with pytest.raises(VerificationError, match="has shape \\[4000, 4000\\]"):
        load_foreign(str(folder), base=Checkpoint.open(base_dir))


# ---------------------------------------------------------------- LoRA export keeps heads (issue 11 item 4)

CLASSIFIER_W, CLASSIFIER_B = "classifier.weight", "classifier.bias"
NORM = "bert.encoder.layer.0.output.LayerNorm.weight"


def _head_diff(base_dir: Path, path: Path, *, with_bias: bool = False) -> SparseDiff:
    """A diff as a task fine-tune makes it: sparse deltas on attention matrices and a LayerNorm, a
    dense classifier head, user fields and a config patch."""
    ckpt = Checkpoint.open(base_dir)
    rng = np.random.default_rng(1)
    entries = {}
    names = [QUERY, VALUE, NORM] + (["bert.encoder.layer.0.attention.self.query.bias"] if with_bias else [])
    for name in names:
        shape = ckpt.tensors[name].shape
        numel = int(np.prod(shape))
        idx = np.sort(rng.choice(numel, size=max(1, numel // 4), replace=False))
        entries[name] = SparseEntry.from_float(shape, idx, rng.standard_normal(len(idx)) * 0.05, "F32", "F32")
    entries[CLASSIFIER_W] = DenseEntry(rng.standard_normal((3, 16)).astype(np.float32), "F32", "F32")
    entries[CLASSIFIER_B] = DenseEntry(rng.standard_normal(3).astype(np.float32), "F32", "F32")
    diff = SparseDiff(entries, DiffMeta(base={"hint": str(base_dir)}, user={"task": "nli"},
                                        config_patch={"num_labels": 3}))
    diff.save(path)
    return diff


def _logits(model, seed: int = 5) -> np.ndarray:
    torch.manual_seed(seed)
    ids = torch.randint(0, 60, (3, 9))
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def test_lora_export_keeps_the_head_in_modules_to_save_and_loads_in_peft(base_dir, tmp_path):
    """base + adapter (loaded by real PEFT) gives the outputs of base + diff baked by sftdiff."""
    import sftdiff

    _head_diff(base_dir, tmp_path / "d.sft")
    result = convert(str(tmp_path / "d.sft"), tmp_path / "lora", rank=16, base=str(base_dir))
    report = result.lora
    kinds = {t.name: t.kind for t in report.tensors}
    assert kinds == {QUERY: "lora", VALUE: "lora", NORM: "saved", CLASSIFIER_W: "saved", CLASSIFIER_B: "saved"}
    assert report.modules_to_save == ["bert.encoder.layer.0.output.LayerNorm", "classifier"]
    assert report.unrepresented == [] and report.total_error < 1e-5
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == report.modules_to_save and config["r"] == 16

    sftdiff.bake(str(base_dir), [str(tmp_path / "d.sft")], tmp_path / "baked")
    baked = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "baked").eval()
    adapted = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "lora")).eval()
    np.testing.assert_allclose(_logits(adapted), _logits(baked), rtol=1e-4, atol=1e-5)
    # without the head in modules_to_save, the adapted model's head is the base's random one
    assert not np.allclose(_logits(tiny_bert()), _logits(baked), atol=1e-3)
    # and the adapter reads back as the same diff (head dense, the norm's full value dense)
    back = load_foreign(str(tmp_path / "lora"), base=Checkpoint.open(base_dir))
    np.testing.assert_array_equal(back.entries[CLASSIFIER_W].values_f32(),
                                  SparseDiff.load(tmp_path / "d.sft").entries[CLASSIFIER_W].values_f32())


def test_lora_export_reports_what_it_cannot_express(base_dir, tmp_path):
    _head_diff(base_dir, tmp_path / "d.sft", with_bias=True)
    # without --base: the LayerNorm delta has no LoRA form and no full value; the linear bias never has
    result = convert(str(tmp_path / "d.sft"), tmp_path / "lora", rank=4)
    rows = {t.name: t for t in result.lora.tensors}
    assert rows[NORM].kind == "dropped" and "--base" in rows[NORM].reason
    assert rows["bert.encoder.layer.0.attention.self.query.bias"].kind == "dropped"
    assert rows[CLASSIFIER_W].kind == "saved"
    assert any("have no place in a LoRA adapter" in n for n in result.notes)
    assert {"config_patch", "user"} <= set(result.dropped_metadata)

    proc = subprocess.run([sys.executable, "-m", "sftdiff", "convert", str(tmp_path / "d.sft"), "--rank", "4",
                           "--base", str(base_dir), "-o", str(tmp_path / "lora-b"), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["command"] == "convert" and summary["to"] == "lora"
    table = {row["name"]: row for row in summary["lora"]["tensors"]}
    assert table[NORM]["kind"] == "saved" and table[NORM]["error"] == 0
    bias = table["bert.encoder.layer.0.attention.self.query.bias"]
    assert bias["kind"] == "dropped" and bias["error"] == 1 and "no LoRA form" in bias["reason"]
    assert table[QUERY]["kind"] == "lora" and table[QUERY]["rank"] == 4 and 0 < table[QUERY]["error"] < 1
    assert summary["lora"]["modules_to_save"] == ["bert.encoder.layer.0.output.LayerNorm", "classifier"]
    assert set(summary["dropped_metadata"]) >= {"config_patch", "user"}


def test_lora_rank_is_capped_at_each_matrix_size(base_dir, tmp_path):
    """--rank 1000 on 16×16 and 60×16 matrices: each gets its full rank, not 1000 (issue 12)."""
    ckpt = Checkpoint.open(base_dir)
    rng = np.random.default_rng(2)
    entries = {}
    for name, (rows, cols) in ((QUERY, (16, 16)), (EMBED, (60, 16))):
        idx = np.sort(rng.choice(rows * cols, 40, replace=False))
        entries[name] = SparseEntry.from_float((rows, cols), idx, rng.standard_normal(40), "F32", "F32")
    assert all(ckpt.tensors[n].shape == e.shape for n, e in entries.items())
    SparseDiff(entries, DiffMeta()).save(tmp_path / "d.sft")
    result = convert(str(tmp_path / "d.sft"), tmp_path / "lora", rank=1000)
    assert result.lora.rank == 16 and result.lora.requested_rank == 1000
    assert result.lora.errors[QUERY] < 1e-6 and result.lora.errors[EMBED] < 1e-6
    assert any("exceeds the smaller side" in n for n in result.notes)
    size = sum(p.stat().st_size for p in (tmp_path / "lora").iterdir())
    assert size < 20_000  # rank 16 factors, not rank 1000 (which would be ~300 kB)
    peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "lora"))  # loads

    # different sizes: the smaller matrix gets its rank through rank_pattern, with scaling 1
    small = {QUERY: entries[QUERY], "bert.encoder.layer.0.attention.self.key.weight": SparseEntry.from_float(
        (16, 16), np.arange(16) * 17, rng.standard_normal(16), "F32", "F32")}
    small["x.proj.weight"] = SparseEntry.from_float((4, 16), np.arange(8), rng.standard_normal(8), "F32", "F32")
    SparseDiff(small, DiffMeta()).save(tmp_path / "s.sft")
    out = convert(str(tmp_path / "s.sft"), tmp_path / "lora-s", rank=8).lora
    config = json.loads((tmp_path / "lora-s" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] == {r"x\.proj": 4} and config["alpha_pattern"] == {r"x\.proj": 4}
    assert out.capped == {"x.proj": 4}
    back = load_foreign(str(tmp_path / "lora-s"), density=1.0)
    np.testing.assert_allclose(back.entries["x.proj.weight"].to_dense(), small["x.proj.weight"].to_dense(), atol=1e-6)


def test_lora_module_with_dense_and_sparse_weight_needs_the_base(base_dir, tmp_path):
    """classifier.bias dense + classifier.weight sparse: saved whole with --base (exact), else dropped."""
    ckpt = Checkpoint.open(base_dir)
    rng = np.random.default_rng(4)
    entries = {QUERY: SparseEntry.from_float((16, 16), np.arange(0, 256, 7), rng.standard_normal(37), "F32", "F32"),
               CLASSIFIER_W: SparseEntry.from_float((3, 16), np.array([2, 20]), np.array([0.5, -0.5]), "F32", "F32"),
               CLASSIFIER_B: DenseEntry(np.array([1.0, 2.0, 3.0], np.float32), "F32", "F32")}
    SparseDiff(entries, DiffMeta()).save(tmp_path / "d.sft")
    without = convert(str(tmp_path / "d.sft"), tmp_path / "a", rank=16).lora
    assert sorted(without.unrepresented) == [CLASSIFIER_B, CLASSIFIER_W]
    with_base = convert(str(tmp_path / "d.sft"), tmp_path / "b", rank=16, base=str(base_dir)).lora
    assert with_base.unrepresented == [] and with_base.modules_to_save == ["classifier"]
    adapted = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "b")).merge_and_unload()
    got = state(adapted)
    expected_w = ckpt.array(CLASSIFIER_W).reshape(-1).copy()
    expected_w[[2, 20]] += np.array([0.5, -0.5], np.float32)
    np.testing.assert_array_equal(got[CLASSIFIER_W].reshape(-1), expected_w)
    np.testing.assert_array_equal(got[CLASSIFIER_B], [1.0, 2.0, 3.0])


def test_lora_export_spells_names_as_the_base(base_dir, tmp_path):
    """A diff cut against a bare BertModel (no `bert.` prefix), exported with --base the head model:
    the adapter's keys carry the prefix, so PEFT loads them (it silently skips unknown keys)."""
    rng = np.random.default_rng(6)
    bare = QUERY[len("bert."):]
    entry = SparseEntry.from_float((16, 16), np.arange(0, 256, 5), rng.standard_normal(52) * 0.1, "F32", "F32")
    SparseDiff({bare: entry, CLASSIFIER_B: DenseEntry(np.array([1.0, 2.0, 3.0], np.float32))}).save(tmp_path / "d.sft")
    report = convert(str(tmp_path / "d.sft"), tmp_path / "lora", rank=16, base=str(base_dir)).lora
    assert {t.name for t in report.tensors} == {QUERY, CLASSIFIER_B}
    merged = state(peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "lora")).merge_and_unload())
    np.testing.assert_allclose(merged[QUERY] - state(tiny_bert())[QUERY], entry.to_dense(), atol=1e-6)


def test_lora_export_of_a_diff_without_lora_modules_is_refused(tmp_path):
    SparseDiff({CLASSIFIER_B: DenseEntry(np.ones(3, np.float32))}).save(tmp_path / "d.sft")
    with pytest.raises(FormatError, match="no 2-D .weight sparse entries"):
        convert(str(tmp_path / "d.sft"), tmp_path / "lora", rank=4)
    assert not (tmp_path / "lora").exists()


def _peft_load(model, folder: Path):
    """PeftModel.from_pretrained, failing on PEFT's "missing adapter keys" warning (the weights it
    names stay at LoRA's zero init: the adapter silently does nothing there)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = peft.PeftModel.from_pretrained(model, str(folder)).eval()
    missing = [str(w.message)[:300] for w in caught if "missing adapter keys" in str(w.message).lower()]
    assert not missing, missing
    return adapted


@pytest.mark.parametrize("with_base", [False, True])
def test_lora_export_of_a_head_diff_cut_against_a_bare_base_is_spelled_for_the_head_model(tmp_path, with_base):
    """`create` against a bare BertModel from a BertForTokenClassification fine-tune: names
    `encoder.*` plus a dense `classifier.*` and a config patch naming the head model. The adapter
    can only be loaded onto that model (it carries the head), so its keys are spelled as it spells
    them (`bert.encoder.*`, `classifier`); PEFT then finds every weight, and base + adapter gives
    the logits of base + diff baked. Before, the keys were spelled bare and every LoRA weight was
    left at zero."""
    import sftdiff

    config = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    ft = transformers.BertForTokenClassification.from_pretrained(tmp_path / "base", num_labels=3)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    ft.save_pretrained(tmp_path / "ft")
    # biases of LoRA-adapted layers have no place in an adapter: leave them (and norms) out of the cut
    run = [sys.executable, "-m", "sftdiff"]
    proc = subprocess.run(run + ["create", str(tmp_path / "base"), str(tmp_path / "ft"), "-o", str(tmp_path / "task.sft"),
                                 "--density", "0.2", "--exclude", "*LayerNorm*", "--exclude", "*.bias"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    task = SparseDiff.load(tmp_path / "task.sft")
    assert task.meta.config_patch["architectures"] == ["BertForTokenClassification"]
    assert "encoder.layer.0.attention.self.query.weight" in task.entries and CLASSIFIER_W in task.entries

    args = ["convert", str(tmp_path / "task.sft"), "--rank", "64", "-o", str(tmp_path / "lora"), "--json"]
    proc = subprocess.run(run + args + (["--base", str(tmp_path / "base")] if with_base else []),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)["lora"]
    assert summary["target_model"] == "BertForTokenClassification"
    assert any("BertForTokenClassification" in n for n in summary["notes"])
    rows = {row["name"]: row for row in summary["tensors"]}
    assert rows["bert.encoder.layer.0.attention.self.query.weight"]["kind"] == "lora"
    assert rows["bert.embeddings.word_embeddings.weight"]["kind"] == "lora"
    assert rows[CLASSIFIER_W]["kind"] == "saved" and summary["modules_to_save"] == ["classifier"]
    assert summary["total_error"] < 1e-5 and not [r for r in rows.values() if r["kind"] == "dropped"]
    adapter = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["classifier"]

    sftdiff.bake(str(tmp_path / "base"), [str(tmp_path / "task.sft")], tmp_path / "baked")
    baked = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "baked").eval()
    # the model a user loads the adapter onto: the bare base as the head model the diff's config names
    head_config = transformers.AutoConfig.from_pretrained(tmp_path / "baked")
    plain = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "base", config=head_config)
    adapted = _peft_load(plain, tmp_path / "lora")
    np.testing.assert_allclose(_logits(adapted), _logits(baked), rtol=1e-4, atol=1e-4)
    # the encoder's deltas matter: the baked head on the unchanged encoder gives other logits
    encoder_only = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "base", config=head_config)
    with torch.no_grad():
        encoder_only.classifier.weight.copy_(baked.classifier.weight)
        encoder_only.classifier.bias.copy_(baked.classifier.bias)
    assert not np.allclose(_logits(encoder_only.eval()), _logits(baked), atol=1e-3)


def test_lora_export_without_an_architecture_keeps_the_diffs_spelling(base_dir, tmp_path):
    """No architecture in the config patch: no target model is known, names stay as the diff spells them."""
    rng = np.random.default_rng(7)
    bare = QUERY[len("bert."):]
    entry = SparseEntry.from_float((16, 16), np.arange(0, 256, 5), rng.standard_normal(52) * 0.1, "F32", "F32")
    SparseDiff({bare: entry}, DiffMeta(config_patch={"num_labels": 3})).save(tmp_path / "d.sft")
    report = convert(str(tmp_path / "d.sft"), tmp_path / "lora", rank=16).lora
    assert report.target_model is None and report.to_json()["target_model"] is None
    assert {t.name for t in report.tensors} == {bare}
