"""Baked models say what they are: the recipe in every shard's metadata, a README.md model card, and
`sftdiff inspect FOLDER` (issue 15 item 2); and `inspect` checks a --base as apply does (issue 12)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest

from helpers_models import build, head_arrays, random_diff, save, tiny_bert_config
import transformers
import yaml

from sftdiff import __version__
from sftdiff.algebra import scale
from sftdiff.bake import bake
from sftdiff.checkpoint import Checkpoint
from sftdiff.diff import SparseDiff
from sftdiff.fingerprint import checkpoint_digests, content_fingerprint, model_fingerprint
from sftdiff.recipe import RECIPE_KEY, front_matter, hub_repo_id, read, split_front_matter
from sftdiff.safetensors_io import SafetensorsFile

PATCH = {"architectures": ["BertForTokenClassification"], "num_labels": 3,
         "id2label": {"0": "O", "1": "B", "2": "I"}, "label2id": {"O": 0, "B": 1, "I": 2}}
BASE_CARD = """---
license: apache-2.0
language:
- en
- bxr
tags:
- fill-mask
- sftdiff
base_model: google-bert/bert-base-uncased
model-index:
- name: tiny
  results: []
---

# Tiny base

A tiny BERT used in tests. Its own words: keep me.
"""


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A BertModel base with its own model card, a language diff (sparse encoder + a dense MLM-head
    bias) and a task diff (sparse + dense classifier + config patch)."""
    root = tmp_path_factory.mktemp("recipe")
    base_dir = save(build(transformers.BertModel, tiny_bert_config()), root / "base")
    (base_dir / "README.md").write_text(BASE_CARD, encoding="utf-8")
    base = Checkpoint.open(base_dir)
    encoder = [n for n in base.tensors if n.startswith("encoder.")]
    lang = random_diff(base, seed=1, density=0.05, names=encoder,
                       dense=head_arrays({"cls.predictions.bias": (120,)}, seed=4))
    lang.meta.user.update(kind="language", language="bxr")
    lang.save(root / "lang.sft")
    task = random_diff(base, seed=3, density=0.02, config_patch=PATCH,
                       dense=head_arrays({"classifier.weight": (3, 32), "classifier.bias": (3,)}, seed=2))
    task.meta.user.update(kind="task", task="ner")
    task.save(root / "task.sft")
    return root, base_dir


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sftdiff", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env)


@pytest.fixture(scope="module")
def baked(bert, tmp_path_factory):
    """`sftdiff apply` run as a user runs it (a subprocess, relative paths), sharded in two."""
    root, _ = bert
    proc = _cli("apply", "base", "lang.sft", "task.sft", "--skip-dense", "lang.sft", "--scale", "1", "--scale", "0.5",
                "--shard-size", "60KB", "-o", "merged", "-q", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "merged"


def test_every_shard_records_the_recipe(bert, baked):
    root, base_dir = bert
    shards = sorted(baked.glob("model-*.safetensors"))
    assert len(shards) >= 2
    texts = {SafetensorsFile(p).metadata[RECIPE_KEY] for p in shards}
    assert len(texts) == 1  # the same recipe in each
    for p in shards:
        assert SafetensorsFile(p).metadata["format"] == "pt"
    recipe = json.loads(texts.pop())
    assert recipe["recipe_version"] == 1 and recipe["tool"] == f"sftdiff {__version__}"
    assert recipe["base"]["hint"] == "base" and recipe["base"]["repo_id"] is None
    base_fp = model_fingerprint(checkpoint_digests(Checkpoint.open(base_dir)))
    assert recipe["base"]["fingerprint"] == base_fp
    lang, task = recipe["diffs"]
    assert lang["file"] == "lang.sft" and task["file"] == "task.sft"
    assert lang["content_fingerprint"] == content_fingerprint(SparseDiff.load(root / "lang.sft"))[0]
    assert task["content_fingerprint"] == content_fingerprint(SparseDiff.load(root / "task.sft"))[0]
    assert lang["fingerprint_of"] == "file" and lang["content_fingerprint"].startswith("sha256:")
    assert (lang["scale"], task["scale"]) == (1.0, 0.5)
    assert (lang["dense_entries"], lang["dense_used"]) == (1, False)  # --skip-dense
    assert (task["dense_entries"], task["dense_used"]) == (2, True)
    assert lang["user"] == {"kind": "language", "language": "bxr"} and lang["base_fingerprint"] == base_fp
    assert recipe["dtype"] == "keep"
    assert recipe["command"] == ("sftdiff apply base lang.sft task.sft --skip-dense lang.sft --scale 1 --scale 0.5 "
                                 "--shard-size 60KB -o merged -q")
    assert recipe["reproduce"] == recipe["command"]


def test_model_card(baked):
    text = (baked / "README.md").read_text(encoding="utf-8")
    meta, body = split_front_matter(text)
    assert meta["library_name"] == "transformers"
    assert meta["tags"][:2] == ["sftdiff", "sparse-fine-tuning"] and "fill-mask" in meta["tags"]
    assert meta["tags"].count("sftdiff") == 1
    # The base's licence and languages still hold; its scores, and its own base, do not.
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en", "bxr"]
    assert "model-index" not in meta and "base_model" not in meta  # a local base has no Hub id
    assert body.lstrip().startswith("# merged\n")
    recipe = read(baked)["recipe"]
    for d in recipe["diffs"]:
        row = next(line for line in body.splitlines() if line.startswith("| ") and f"`{d['file']}`" in line)
        assert d["content_fingerprint"] in row
    assert "| 1 | `lang.sft` | kind: language, language: bxr |" in body and "1 left out (--skip-dense)" in body
    assert "| 0.5 | 2 used |" in body
    assert f"```bash\n{recipe['command']}\n```" in body
    assert recipe["base"]["fingerprint"] in body
    # The base's own card comes after ours, without its front matter.
    assert body.index("## How to reproduce") < body.index("## The base model's card") < body.index("# Tiny base")
    assert "Its own words: keep me." in body and "license:" not in body and "model-index" not in body


def test_transformers_loads_the_baked_model(baked):
    model = transformers.AutoModelForTokenClassification.from_pretrained(baked)
    assert type(model).__name__ == "BertForTokenClassification"


def test_inspect_baked_folder(baked):
    proc = _cli("inspect", baked)
    assert proc.returncode == 0, proc.stderr
    recipe = read(baked)["recipe"]
    out = proc.stdout
    assert out.startswith(f"baked model: {baked}  (2 weight files") or "weight files" in out.splitlines()[0]
    assert f"fingerprint {recipe['base']['fingerprint']}" in out
    assert "1. lang.sft  scale 1  1 dense entries left out  (kind=language, language=bxr)" in out
    assert "2. task.sft  scale 0.5  2 dense entries used" in out
    assert recipe["diffs"][0]["content_fingerprint"] in out
    assert f"command:     {recipe['command']}" in out
    js = _cli("inspect", baked, "--json")
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert data["command"] == "inspect" and data["kind"] == "baked-model"
    assert data["recipe"] == recipe and data["path"] == str(baked)
    assert data["card"] == str(baked / "README.md") and len(data["shards"]) >= 2
    assert set(data) == {"command", "kind", "path", "shards", "recipe", "card"}


def test_inspect_of_a_diff_has_command_and_kind(bert):
    root, _ = bert
    data = json.loads(_cli("inspect", root / "task.sft", "--json").stdout)
    assert data["command"] == "inspect" and data["kind"] == "diff" and data["totals"]["dense_entries"] == 2


def test_library_bake_of_in_memory_diff(bert, tmp_path):
    """No CLI: no exact command; an equivalent one when everything is on disk, none for in-memory diffs."""
    root, base_dir = bert
    out = bake(base_dir, [root / "task.sft"], tmp_path / "a", dtype="bfloat16")
    recipe = read(out.path)["recipe"]
    assert recipe["command"] is None and recipe["dtype"] == "BF16"
    assert recipe["reproduce"] == f"sftdiff apply {base_dir} {root / 'task.sft'} --dtype bfloat16 -o {tmp_path / 'a'}"
    half = scale(SparseDiff.load(root / "task.sft"), 0.5)  # in memory: fingerprinted by its entries
    bake(base_dir, [half], tmp_path / "b")
    recipe = read(tmp_path / "b")["recipe"]
    assert recipe["diffs"][0]["file"] is None and recipe["diffs"][0]["fingerprint_of"] == "entries"
    assert recipe["diffs"][0]["content_fingerprint"] == content_fingerprint(half)[0]
    assert recipe["reproduce"] is None
    assert "no command reproduces it" in (tmp_path / "b" / "README.md").read_text(encoding="utf-8")


def test_base_without_card_and_single_file(bert, tmp_path):
    root, base_dir = bert
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in base_dir.iterdir():
        if p.name != "README.md":
            (bare / p.name).write_bytes(p.read_bytes())
    result = bake(bare, [root / "lang.sft"], tmp_path / "out")
    assert result.shards == 1
    text = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    meta, body = split_front_matter(text)
    assert meta == {"library_name": "transformers", "tags": ["sftdiff", "sparse-fine-tuning"]}
    assert "base model's card" not in body
    assert read(tmp_path / "out")["shards"] == ["model.safetensors"]


def test_hub_base_names_base_model(bert, tmp_path, monkeypatch):
    """A base given as a Hub repo id (resolved from the huggingface_hub cache) is the card's `base_model`."""
    from test_hub import add_to_cache

    root, base_dir = bert
    add_to_cache(tmp_path / "hub", "tiny-org/bert-tiny", {p.name: p.read_bytes() for p in base_dir.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bake("tiny-org/bert-tiny", [root / "task.sft"], tmp_path / "out")
    recipe = read(tmp_path / "out")["recipe"]
    assert recipe["base"]["repo_id"] == "tiny-org/bert-tiny" and "models--tiny-org--bert-tiny" in recipe["base"]["hint"]
    assert recipe["reproduce"] == f"sftdiff apply tiny-org/bert-tiny {root / 'task.sft'} -o {tmp_path / 'out'}"
    meta, body = split_front_matter((tmp_path / "out" / "README.md").read_text(encoding="utf-8"))
    assert meta["base_model"] == "tiny-org/bert-tiny" and meta["license"] == "apache-2.0"
    assert body.lstrip().startswith("# out\n") and "`tiny-org/bert-tiny` with 1 sparse fine-tuning diff " in body
    assert hub_repo_id(str(tmp_path / "hub" / "models--org--tiny-bert" / "snapshots" / ("ab" * 20))) == "org/tiny-bert"
    assert hub_repo_id("base/") is None and hub_repo_id(None) is None


def test_inspect_refuses_model_folder_without_recipe(bert):
    _, base_dir = bert
    proc = _cli("inspect", base_dir)
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "model weights without an sftdiff recipe" in proc.stderr


def test_inspect_refuses_an_unrelated_base(bert, tmp_path):
    root, _ = bert
    other = save(build(transformers.BertModel, tiny_bert_config(), seed=7), tmp_path / "other")
    proc = _cli("inspect", root / "task.sft", "--base", other)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.count("\n") == 1 and "differs from the one this diff was made from" in proc.stderr
    assert proc.stdout == ""  # no density against the wrong base
    ok = _cli("inspect", root / "task.sft", "--base", other, "--no-verify", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["totals"]["base_numel"] > 0


def test_inspect_plot_without_matplotlib_fails_first(bert, tmp_path):
    root, _ = bert
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from sftdiff.cli import main\nmain(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "inspect", str(root / "task.sft"), "--plot",
                           str(tmp_path / "d.png")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "pip install 'sftdiff[plot]'" in proc.stderr
    assert not (tmp_path / "d.png").exists()


def test_base_card_front_matter_edge_cases():
    assert split_front_matter("no front matter\n") == ({}, "no front matter\n")
    assert split_front_matter("---\n: [bad\n---\nbody\n") == ({}, "body\n")
    assert split_front_matter("---\n- a list\n---\nbody") == ({}, "body")
    meta, body = split_front_matter("---\r\ntags: single\r\n---\r\ntext")
    assert meta == {"tags": "single"} and body == "text"
    assert yaml.safe_load("a: 1") == {"a": 1}


def test_inspect_of_baked_folder_imports_neither_torch_nor_transformers(baked):
    code = ("import sys; from sftdiff.cli import main\n"
            "try:\n    main(['inspect', sys.argv[1]])\nexcept SystemExit: pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(baked)], capture_output=True, text=True, check=True)
    assert "baked model:" in r.stdout and r.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.parametrize("meta", [
    {"base_model": "org/name", "library_name": "transformers", "tags": ["sftdiff", "lt-sft"]},
    {"language": ["tr", "id"], "license": "apache-2.0", "datasets": [], "nested": {"a": [1, 2.5, None, True]}},
    {"description": "Türkçe: \"quoted\" — 'single' # not a comment: yes\n second line"},
    {"weird": "a\u2028b", "emoji": "😀"},  # line separator, astral character: YAML's own spelling
    {"when": datetime.date(2024, 1, 2)},  # not JSON
    {"not a key": 1},  # not an identifier
    {"loss": float("nan")},  # not finite
], ids=["plain", "nested", "quoting", "yaml-special", "date", "spaced-key", "nan"])
def test_card_front_matter_reads_back_as_written(meta):
    text = front_matter(meta)
    back = yaml.safe_load(text)
    if "loss" in meta:
        assert back["loss"] != back["loss"]  # NaN
    else:
        assert back == meta
    assert split_front_matter(f"---\n{text}\n---\nbody")[0].keys() == meta.keys()
