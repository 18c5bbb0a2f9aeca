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
