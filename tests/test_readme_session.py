"""The README's "A session" block runs as written, top to bottom, and every output is checked.

The block is read from README.md itself (as `.ci/run` reads the test command), so the README and this
test cannot drift apart. The files the session starts from are built here, tiny and deterministic:
`base/` (a bare BERT with a word-level tokenizer), `ft-ner/` (its token-classification fine-tune),
`lang.sft` (a masked-LM diff with the dense MLM head), `cut.sft` (a sparse cut to retrain),
`corpus.txt`, `heldout.txt`, `my-lora/` (a real PEFT LoRA adapter) and an offline Hugging Face cache
holding `cambridgeltl/mbert-lang-sft-bxr-small` (composable-sft's own file, from ../shared/fixtures).
Each line then runs through bash in that folder with `sftdiff` on PATH and HF_HUB_OFFLINE=1, and each
line has a check of what it printed or wrote; a README line without a check fails the test.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from helpers_models import build
import peft
import torch
import transformers

from sftdiff.checkpoint import Checkpoint
from sftdiff.create import create_diff
from sftdiff.diff import DenseEntry, SparseDiff, SparseEntry
from sftdiff.recipe import read as read_recipe
from sftdiff.safetensors_io import SafetensorsFile

from shared_fixtures import composable_fixtures
from test_hub import LANG_REPO, add_to_cache

README = Path(__file__).resolve().parents[1] / "README.md"
WORDS = ("the a old city of in spring again and then with friends anna ben carla david eva visited left "
         "loves saw paris london rome berlin madrid vienna lisbon oslo river house small big red blue "
         "walked to from near far sea hill road town").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
LABELS = ["O", "B-LOC", "I-LOC"]


def session_commands() -> list[str]:
    """The commands of the ```bash block under "### A session" (comments dropped, `\\` lines joined)."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^### A session\n(?:(?!^#).)*?^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert m, "README.md has no ```bash block under '### A session'"
    commands, pending = [], ""
    for line in m.group(1).splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    return commands


# ---------------------------------------------------------------- the files the session starts from


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A stand-in for a fine-tune: every weight moved a little (deterministically)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def _sentences(rng: np.random.Generator, count: int) -> str:
    return "\n".join(" ".join(rng.choice(WORDS, size=int(rng.integers(5, 14)))) for _ in range(count)) + "\n"


def build_session(work: Path) -> dict[str, str]:
    """Write the session's inputs into `work`; return the environment the commands run in."""
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    # 64 positions: `train`/`retrain` fit their default 256-token blocks to the model (and say so), which
    # keeps the README's 2000 training steps affordable here.
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    base = work / "base"
    build(transformers.BertModel, config, seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)

    torch.manual_seed(1)
    ner = transformers.BertForTokenClassification.from_pretrained(
        base, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={x: i for i, x in enumerate(LABELS)})
    _perturbed(ner, 2).save_pretrained(work / "ft-ner")
    tokenizer.save_pretrained(work / "ft-ner")

    torch.manual_seed(3)
    mlm = transformers.BertForMaskedLM.from_pretrained(base)
    _perturbed(mlm, 4).save_pretrained(work / "scratch" / "ft-mlm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MLM model has no pooler: expected
        heads = [n for n in Checkpoint.open(work / "scratch" / "ft-mlm").tensors if n.startswith("cls.")]
        lang = create_diff(str(base), str(work / "scratch" / "ft-mlm"), density=0.01, dense=heads,
                           user={"kind": "language", "language": "toy"})
        cut = create_diff(str(base), str(work / "scratch" / "ft-mlm"), density=0.01, exclude=["*LayerNorm*"],
                          user={"kind": "language"})
    lang.save(work / "lang.sft")
    cut.save(work / "cut.sft")

    rng = np.random.default_rng(5)
    (work / "corpus.txt").write_text(_sentences(rng, 400), encoding="utf-8")
    (work / "heldout.txt").write_text(_sentences(rng, 60), encoding="utf-8")

    torch.manual_seed(6)
    lora = peft.get_peft_model(transformers.BertModel.from_pretrained(base),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # lora_B starts at zero: make the adapter do something
    lora.save_pretrained(work / "my-lora")

    home = work.parent / "hf-home"
    data = (composable_fixtures() / "lang-sft-small" / "pytorch_diff.bin").read_bytes()
    add_to_cache(home / "hub", LANG_REPO, {"pytorch_diff.bin": data, "config.json": b"{}"})

    sftdiff = Path(sys.executable).parent / "sftdiff"
    assert sftdiff.is_file(), f"{sftdiff} missing: install the package (pip install -e .) so the CLI is on PATH"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTEST_"))}
    env.update(PATH=f"{sftdiff.parent}{os.pathsep}{env.get('PATH', '')}", HF_HOME=str(home),
               HF_HUB_CACHE=str(home / "hub"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1")  # a tiny model trains fastest on one thread, and the suite shares 2 cores
    return env


# ---------------------------------------------------------------- checks, one per README line


def _load(work: Path, name: str) -> SparseDiff:
    path = work / name
    assert path.is_file(), f"{name} was not written"
    return SparseDiff.load(path)


def _sparse(diff: SparseDiff) -> dict[str, SparseEntry]:
    return {n: diff.entries[n] for n in diff.entries if isinstance(diff.entries[n], SparseEntry)}


def check_create(work: Path, out: str) -> None:
    task = _load(work, "task.sft")
    assert task.meta.user == {"kind": "task", "task": "ner"}, task.meta.user
    assert not [n for n in task.entries if "LayerNorm" in n]
    assert {"classifier.weight", "classifier.bias"} <= {n for n in task.entries if isinstance(task.entries[n], DenseEntry)}
    base = Checkpoint.open(work / "base")
    selectable = sum(t.numel for n, t in base.tensors.items() if "LayerNorm" not in n and not n.startswith("pooler."))
    assert task.nnz == round(0.01 * selectable), (task.nnz, selectable)
    assert task.meta.config_patch["architectures"] == ["BertForTokenClassification"]


def check_inspect_text(work: Path, out: str) -> None:
    task = _load(work, "task.sft")
    assert "task.sft" in out and f"nonzeros: {task.nnz:,}" in out, out
    names = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in task.entries]
    assert sorted(names) == sorted(task.entries)


def check_inspect_totals(work: Path, out: str) -> None:
    try:
        totals = json.loads(out)
    except ValueError:
        totals = ast.literal_eval(out.strip())
    task = _load(work, "task.sft")
    assert totals["nnz"] == task.nnz and totals["dense_entries"] == 2, totals


def check_plot(work: Path, out: str) -> None:
    assert (work / "density.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def check_apply(work: Path, out: str) -> None:
    recipe = read_recipe(work / "merged")["recipe"]
    assert [(d["file"], d["dense_used"]) for d in recipe["diffs"]] == [("lang.sft", False), ("task.sft", True)]
    st = SafetensorsFile(work / "merged" / "model.safetensors")
    assert "cls.predictions.bias" not in st.tensors  # the language diff's MLM head stayed out
    task = _load(work, "task.sft")
    np.testing.assert_array_equal(st.array("classifier.weight"), task.entries["classifier.weight"].values_f32())
    assert json.loads((work / "merged" / "config.json").read_text())["architectures"] == ["BertForTokenClassification"]
    side = {q.name for q in (work / "base").iterdir() if q.suffix != ".safetensors" and q.name != "config.json"}
    assert side and side <= {q.name for q in (work / "merged").iterdir()}, side  # the tokenizer goes along
    assert (work / "merged" / "README.md").is_file()


def check_inspect_baked(work: Path, out: str) -> None:
    recipe = read_recipe(work / "merged")["recipe"]
    assert out.startswith("baked model: merged/") and recipe["base"]["fingerprint"] in out, out
    assert "1. lang.sft  scale 1" in out and "2. task.sft  scale 1" in out, out
    assert f"command:     {recipe['command']}" in out and recipe["command"].startswith("sftdiff apply base/ ")


def check_load(work: Path, out: str) -> None:
    model = transformers.AutoModelForTokenClassification.from_pretrained(work / "merged")
    assert model.config.num_labels == 3 and model.config.id2label[1] == "B-LOC"


def check_overlap(work: Path, out: str) -> None:
    assert "jaccard" in out.lower() and "total" in out.lower(), out


def check_prune(work: Path, out: str) -> None:
    small, task = _load(work, "task-small.sft"), _load(work, "task.sft")
    assert small.nnz == min(100000, task.nnz)


def check_add(work: Path, out: str) -> None:
    both, lang, task = _load(work, "both.sft"), _load(work, "lang.sft"), _load(work, "task.sft")
    assert set(both.entries) == set(lang.entries) | set(task.entries)  # one name per parameter
    for name, entry in _sparse(both).items():
        want = np.zeros(entry.numel, np.float64)
        for d in (lang, task):
            if name in d.entries and isinstance(d.entries[name], SparseEntry):
                np.add.at(want, d.entries[name].indices, d.entries[name].values_f32())
        np.testing.assert_allclose(entry.to_dense().reshape(-1), want, atol=1e-6, err_msg=name)


def check_subtract(work: Path, out: str) -> None:
    again, task = _load(work, "task-again.sft"), _load(work, "task.sft")
    assert set(again.entries) == set(task.entries)
    for name in task.entries:
        np.testing.assert_allclose(np.asarray(again.entries[name].to_dense() if isinstance(again.entries[name], SparseEntry)
                                              else again.entries[name].values_f32()),
                                   np.asarray(task.entries[name].to_dense() if isinstance(task.entries[name], SparseEntry)
                                              else task.entries[name].values_f32()), atol=1e-6, err_msg=name)


def check_scale(work: Path, out: str) -> None:
    half, task = _load(work, "half.sft"), _load(work, "task.sft")
    for name, entry in _sparse(task).items():
        np.testing.assert_array_equal(half.entries[name].indices, entry.indices)
        np.testing.assert_allclose(half.entries[name].values_f32(), 0.5 * entry.values_f32(), rtol=1e-6)


def check_inspect_hub(work: Path, out: str) -> None:
    shapes = json.loads((composable_fixtures() / "lang-sft-small" / "shapes.json").read_text())
    for name in shapes:
        assert name in out, name


def check_convert_hub(work: Path, out: str) -> None:
    bxr = _load(work, "bxr.sft")
    expected = SafetensorsFile(composable_fixtures() / "lang-sft-small" / "expected.safetensors")
    for name in bxr.entries:
        entry = bxr.entries[name]
        if isinstance(entry, SparseEntry):
            np.testing.assert_array_equal(entry.indices, expected.array(f"diff/{name}/c_order_indices"))
            np.testing.assert_array_equal(entry.values_f32(), expected.array(f"diff/{name}/values"))
        else:
            np.testing.assert_array_equal(entry.values_f32(), expected.array(f"abs/{name}"))
    assert len(bxr.entries) == len(json.loads((composable_fixtures() / "lang-sft-small" / "shapes.json").read_text()))


def check_convert_lora(work: Path, out: str) -> None:
    diff = _load(work, "lora.sft")
    assert diff.entries and all(re.search(r"attention\.self\.(query|value)\.weight$", n) for n in diff.entries)
    total = sum(math.prod(diff.info(n).shape) for n in diff.entries)
    assert 0 < diff.nnz <= 0.011 * total + 1


def check_convert_rank(work: Path, out: str) -> None:
    config = json.loads((work / "task-lora" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    assert "classifier" in (config.get("modules_to_save") or []), config  # the task head goes along
    # The adapter is for the task model (it carries the classifier): PEFT must find all its weights
    # there, or the encoder's deltas are silently left at LoRA's zero init.
    model = transformers.BertForTokenClassification.from_pretrained(work / "base", num_labels=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = peft.PeftModel.from_pretrained(model, work / "task-lora")
    missing = [str(w.message)[:300] for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    task = _load(work, "task.sft")
    state = {k.replace(".modules_to_save.default.", "."): v for k, v in adapted.state_dict().items()}
    head = next(v for k, v in state.items() if k.endswith("classifier.weight") and "original_module" not in k)
    np.testing.assert_allclose(head.detach().numpy(), task.entries["classifier.weight"].values_f32(), rtol=1e-6)


def check_retrain(work: Path, out: str) -> None:
    """Exactly the cut's positions are trained (a value that never moved, e.g. the embedding of a
    token the corpus lacks, is zero and so not stored)."""
    new, cut = _load(work, "lang-retrained.sft"), _load(work, "cut.sft")
    assert set(_sparse(new)) <= set(_sparse(cut))
    for name, entry in _sparse(new).items():
        assert np.isin(entry.indices, cut.entries[name].indices).all(), name
    assert new.nnz >= 0.8 * cut.nnz, (new.nnz, cut.nnz)


def check_train(work: Path, out: str) -> None:
    diff = _load(work, "lang-ltsft.sft")
    base = Checkpoint.open(work / "base")
    assert 0 < diff.nnz <= 0.011 * base.float_numel(), diff.nnz
    assert diff.meta.base.get("fingerprint") and diff.meta.origin, diff.meta


# (pattern matched against a README line, check of its outputs). Every line must match exactly one.
CHECKS: list[tuple[str, Callable[[Path, str], None]]] = [
    (r"^sftdiff create base/ ft-ner/ ", check_create),
    (r"^sftdiff inspect task\.sft$", check_inspect_text),
    (r"^sftdiff inspect task\.sft --json \| ", check_inspect_totals),
    (r"^sftdiff inspect task\.sft --plot density\.png", check_plot),
    (r"^sftdiff apply base/ lang\.sft task\.sft ", check_apply),
    (r"^sftdiff inspect merged/", check_inspect_baked),
    (r"^python -c .*from_pretrained\('merged/'\)", check_load),
    (r"^sftdiff overlap ", check_overlap),
    (r"^sftdiff prune ", check_prune),
    (r"^sftdiff add ", check_add),
    (r"^sftdiff subtract ", check_subtract),
    (r"^sftdiff scale ", check_scale),
    (r"^sftdiff inspect cambridgeltl/", check_inspect_hub),
    (r"^sftdiff convert cambridgeltl/", check_convert_hub),
    (r"^sftdiff convert my-lora/ ", check_convert_lora),
    (r"^sftdiff convert task\.sft --rank ", check_convert_rank),
    (r"^sftdiff retrain ", check_retrain),
    (r"^sftdiff train ", check_train),
]


def test_every_readme_line_has_a_check():
    for command in session_commands():
        found = [c for p, c in CHECKS if re.search(p, command)]
        assert len(found) == 1, f"{command!r} matches {len(found)} checks: add one to CHECKS"


def test_readme_session_runs_as_written(tmp_path):
    work = tmp_path / "session"
    work.mkdir()
    env = build_session(work)
    failures = []
    for command in session_commands():
        check = next(c for p, c in CHECKS if re.search(p, command))
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=work, env=env, capture_output=True,
                              text=True, timeout=900, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            failures.append(f"{command}\n    exit {proc.returncode}: {proc.stderr.strip()[-600:]}")
            continue
        try:
            check(work, proc.stdout)
        except Exception as e:  # noqa: BLE001 - collected: one report of every line that fails
            failures.append(f"{command}\n    ran, but its output is wrong: {type(e).__name__}: {str(e)[:600]}")
    assert not failures, "README session lines that fail:\n" + "\n".join(failures)


def test_session_commands_quote_cleanly():
    for command in session_commands():
        shlex.split(command, comments=True)  # every line is one well-formed shell command
