"""Hub repo ids as diff and base arguments, resolved from an offline huggingface_hub cache."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sftdiff.checkpoint import Checkpoint
from sftdiff.diff import SparseDiff
from sftdiff.errors import FormatError
from sftdiff.formats import convert, load_foreign
from sftdiff.formats.composable import read_composable

from shared_fixtures import composable_fixtures as fixtures_root

LANG_REPO = "cambridgeltl/mbert-lang-sft-bxr-small"
BASE_REPO = "tiny-org/bert-base-tiny"


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
    """Lay files out as huggingface_hub does: blobs by hash, snapshot symlinks, refs/<revision>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode() + b"".join(files[n] for n in sorted(files))).hexdigest()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> dict[str, str]:
    """An offline cache holding the composable-sft fixture and a tiny base it fits."""
    import torch
    import transformers

    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    diff_bytes = (fixtures_root() / "lang-sft-small" / "pytorch_diff.bin").read_bytes()
    add_to_cache(cache, LANG_REPO, {"pytorch_diff.bin": diff_bytes, "config.json": b"{}"})
    config = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    saved = tmp_path_factory.mktemp("base")
    transformers.BertForMaskedLM(config).save_pretrained(saved)
    add_to_cache(cache, BASE_REPO, {p.name: p.read_bytes() for p in saved.iterdir()})
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def offline_env(hub_cache, monkeypatch) -> dict[str, str]:
    for key, value in hub_cache.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **hub_cache}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftdiff", *args], capture_output=True, text=True, env=env)


def test_inspect_hub_id(offline_env):
    proc = run(["inspect", LANG_REPO], offline_env)
    assert proc.returncode == 0, proc.stderr
    assert "bert.encoder.layer.0.attention.self.query.weight" in proc.stdout
    assert "cls.predictions.bias" in proc.stdout


def test_inspect_with_hub_base(offline_env):
    proc = run(["inspect", "--json", LANG_REPO, "--base", BASE_REPO], offline_env)
    assert proc.returncode == 0, proc.stderr
    assert '"base_numel"' in proc.stdout and "sfp1:" in proc.stdout


def test_convert_from_hub_id_matches_the_file(offline_env, tmp_path):
    out = tmp_path / "lang.sft"
    proc = run(["convert", f"{LANG_REPO}@main", "-o", str(out)], offline_env)
    assert proc.returncode == 0, proc.stderr
    diff = SparseDiff.load(out)
    expected = read_composable(fixtures_root() / "lang-sft-small" / "pytorch_diff.bin")
    assert set(diff.entries) == set(expected)
    for name, entry in expected.items():
        np.testing.assert_array_equal(diff.entries[name].values_f32(), entry.values_f32())
    assert diff.meta.origin["source"] == f"{LANG_REPO}@main"


def test_sft_repo_is_recognized(offline_env, tmp_path):
    convert(str(fixtures_root() / "task-sft-small"), tmp_path / "task.sft")
    add_to_cache(Path(offline_env["HF_HUB_CACHE"]), "someone/task-sft", {"diff.sft": (tmp_path / "task.sft").read_bytes()})
    diff = load_foreign("someone/task-sft")
    assert diff.path.endswith("diff.sft") and diff.nnz == SparseDiff.load(tmp_path / "task.sft").nnz


def test_base_hub_id_opens_as_checkpoint(offline_env):
    ckpt = Checkpoint.open(BASE_REPO)
    assert ckpt.tensors["bert.embeddings.word_embeddings.weight"].shape == (1000, 32)


def test_apply_hub_ids(offline_env, tmp_path):
    pytest.importorskip("sftdiff.bake")  # written by another engineer; exercised here once it exists
    out = tmp_path / "baked"
    proc = run(["apply", BASE_REPO, LANG_REPO, "-o", str(out), "-q"], offline_env)
    assert proc.returncode == 0, proc.stderr
    base, baked = Checkpoint.open(BASE_REPO), Checkpoint.open(out)
    diff = read_composable(fixtures_root() / "lang-sft-small" / "pytorch_diff.bin")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    np.testing.assert_allclose(baked.array(name), base.array(name) + diff[name].to_dense(), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(baked.array("cls.predictions.bias"), diff["cls.predictions.bias"].values_f32())


def test_missing_repo_is_a_clear_error(offline_env, tmp_path):
    with pytest.raises(FormatError, match="not found in the local Hugging Face cache and the Hub is offline"):
        load_foreign("nobody/no-such-sft")
    with pytest.raises(FormatError, match="not found in the local Hugging Face cache"):
        Checkpoint.open("nobody/no-such-model")
    proc = run(["inspect", "nobody/no-such-sft"], offline_env)
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1 and "nobody/no-such-sft: not found in the local Hugging Face cache" in proc.stderr
    proc = run(["convert", "nobody/no-such-sft", "-o", str(tmp_path / "x.sft")], offline_env)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.sft").exists()


def test_local_paths_are_not_taken_for_repo_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for missing in ("../nothing/here.sft", "missing/diff.sft", "out/model"):
        with pytest.raises(FormatError, match="no such file or folder"):
            load_foreign(missing)
    with pytest.raises(FormatError, match="no such file or folder"):
        Checkpoint.open("out/model")
