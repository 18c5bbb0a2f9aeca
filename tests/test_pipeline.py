"""Commands chained on each other's outputs, as a user runs them: create → inspect → algebra →
convert → apply → evaluate. Each test here is a defect that lived between two commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from helpers_models import build, run_cli, save, tiny_bert_config, tree_hashes
from sftdiff.cli import main
from sftdiff.diff import SparseDiff


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A bare BertModel base, a token-classification fine-tune of it, and an unrelated
    token-classification model of the same shape (a wrong base)."""
    root = tmp_path_factory.mktemp("pipeline")
    config = tiny_bert_config(num_labels=3)
    base = build(transformers.BertModel, config, seed=0)
    save(base, root / "base")
    ft = build(transformers.BertForTokenClassification, config, seed=1)
    ft.bert.load_state_dict(base.state_dict(), strict=False)  # no pooler in a tagger
    with torch.no_grad():
        for p in ft.bert.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save(ft, root / "ft")
    other = build(transformers.BertForTokenClassification, config, seed=2)
    save(other, root / "other")
    return {"root": root, "base": root / "base", "ft": root / "ft", "other": root / "other"}


@pytest.fixture(scope="module")
def task_sft(models) -> Path:
    out = models["root"] / "task.sft"
    code = 0
    try:
        main(["create", str(models["base"]), str(models["ft"]), "-o", str(out), "--density", "0.05", "-q"])
    except SystemExit as e:
        code = e.code or 0
    assert code == 0 and out.exists()
    return out


@pytest.mark.parametrize("to", [["--to", "task-vector"], ["--rank", "2"]])
def test_convert_with_base_checks_the_diff_belongs_to_it(models, task_sft, tmp_path, capsys, to):
    """`convert --base` computes from the base's values (a task vector's deltas of dense entries,
    a LoRA module saved whole), so a base the diff was not made from must be refused (exit 4) as
    `apply` and `inspect --base` refuse it, not silently give a wrong output; `--no-verify` skips
    the check as it does for them."""
    before = tree_hashes(task_sft, models["other"])
    out = tmp_path / ("tv.safetensors" if "task-vector" in to else "lora")
    code, _, err = run_cli(["convert", task_sft, *to, "--base", models["other"], "-o", out], capsys)
    assert code == 4, err
    assert err.startswith("sftdiff: error: ") and len(err.strip().splitlines()) == 1, err
    assert "--no-verify" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir()]
    code, _, err = run_cli(["convert", task_sft, *to, "--base", models["base"], "-o", out], capsys)
    assert code == 0, err
    code, _, err = run_cli(["convert", task_sft, *to, "--base", models["other"], "--no-verify", "-o",
                            tmp_path / ("b-" + out.name)], capsys)
    assert code == 0, err
    assert tree_hashes(task_sft, models["other"]) == before


def test_evaluate_matches_skip_dense_to_a_diff_as_apply_does(models, task_sft, tmp_path, capsys, monkeypatch):
    """`apply base ./lang.sft task.sft --skip-dense lang.sft` works (the same file however spelled);
    `evaluate` with the same arguments must accept them too and skip the same diff's dense entries,
    not refuse the spelling as "not one of the DIFF arguments"."""
    import importlib

    evaluate_module = importlib.import_module("sftdiff.evaluate")  # the package exports a function of that name
    seen = {}

    def fake_evaluate(base, diffs, **kw):
        seen["with_dense"] = kw["with_dense"]
        raise SystemExit(0)

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    data = tmp_path / "dev.conll"
    data.write_text("a O\n\n")
    monkeypatch.chdir(task_sft.parent)
    code, _, err = run_cli(["evaluate", models["base"], f"./{task_sft.name}", task_sft, "--skip-dense", task_sft.name,
                            "--objective", "token-classification", "--data", data], capsys)
    assert code == 0, err
    assert seen["with_dense"] == [False, False]
    code, _, err = run_cli(["evaluate", models["base"], task_sft, "--skip-dense", "nothere.sft",
                            "--objective", "token-classification", "--data", data], capsys)
    assert code == 2 and "--skip-dense nothere.sft is not one of the DIFF arguments" in err, err


def _hinted_command(err: str) -> list[str]:
    """The `sftdiff ...` command an error message suggests, as arguments (quotes removed)."""
    import shlex

    command = err.split("`")[1]
    assert command.startswith("sftdiff "), err
    return shlex.split(command)[1:]


def test_peft_sft_export_hint_is_one_command_that_works(models, task_sft, tmp_path, capsys):
    """A `create` diff has dense head entries and sparse biases; exporting it to PEFT-SFT used to
    name one of them and suggest dropping just that one, so following the hint failed again on
    the next (13 rounds for this diff). The hint must be one filter command after which the
    export succeeds."""
    out = tmp_path / "peft"
    code, _, err = run_cli(["convert", task_sft, "--to", "peft-sft", "-o", out], capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1, err
    hinted = [a.replace("OUT.sft", str(tmp_path / "w.sft")) for a in _hinted_command(err)]
    code, _, err = run_cli(hinted, capsys)
    assert code == 0, err
    code, _, err = run_cli(["convert", tmp_path / "w.sft", "--to", "peft-sft", "-o", out], capsys)
    assert code == 0, err
    code, _, err = run_cli(["convert", out, "--base", models["base"], "-o", tmp_path / "back.sft"], capsys)
    assert code == 0, err
    kept, back = SparseDiff.load(tmp_path / "w.sft"), SparseDiff.load(tmp_path / "back.sft")
    assert sorted(kept.entries) == sorted(back.entries) and kept.entries
    for name in kept.entries:
        assert np.array_equal(kept.entries[name].indices, back.entries[name].indices)
        assert np.array_equal(kept.entries[name].values_f32(), back.entries[name].values_f32())


@pytest.fixture(scope="module")
def lang_sft(models) -> Path:
    """A language diff: an MLM fine-tune of the base, its new MLM head as dense entries."""
    root = models["root"]
    config = tiny_bert_config()
    mlm = build(transformers.BertForMaskedLM, config, seed=3)
    mlm.bert.load_state_dict(transformers.BertModel.from_pretrained(models["base"]).state_dict(), strict=False)
    with torch.no_grad():
        for p in mlm.bert.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save(mlm, root / "ft-mlm")
    out = root / "lang.sft"
    try:
        main(["create", str(models["base"]), str(root / "ft-mlm"), "-o", str(out), "-k", "500", "-q"])
    except SystemExit as e:
        assert not e.code
    return out


def test_subtract_hint_drops_every_refused_dense_entry_at_once(task_sft, lang_sft, tmp_path, capsys):
    """`subtract task.sft lang.sft`: lang's MLM head (several dense entries) is not in task, so A − B
    has no diff form. The hint used to name one head entry; following it failed on the next. It
    must be one filter command after which the subtraction succeeds."""
    dense = [n for n in SparseDiff.load(lang_sft).entries if SparseDiff.load(lang_sft).info(n).kind == "dense"]
    assert len(dense) > 1
    code, _, err = run_cli(["subtract", task_sft, lang_sft, "-o", tmp_path / "r.sft"], capsys)
    assert code == 4 and len(err.strip().splitlines()) == 1, err
    assert f"and {len(dense) - 1} more" in err
    hinted = [a.replace("B2.sft", str(tmp_path / "b2.sft")) for a in _hinted_command(err)]
    code, _, err = run_cli(hinted, capsys)
    assert code == 0, err
    code, _, err = run_cli(["subtract", task_sft, tmp_path / "b2.sft", "-o", tmp_path / "r.sft"], capsys)
    assert code == 0, err
    assert not any(n in SparseDiff.load(tmp_path / "r.sft").entries for n in dense)


def _add_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(100)])}
    tk = Tokenizer(tk_models.WordPiece(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                         sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)


def test_evaluate_takes_apply_scales_and_equals_the_scaled_bake(models, task_sft, lang_sft, tmp_path, capsys):
    """`apply --scale` bakes a weighted composition; `evaluate` had no --scale, so that composition
    could not be measured in memory. With the same arguments both must give the same accuracy."""
    _add_tokenizer(models["base"])
    rng = np.random.default_rng(0)
    data = tmp_path / "dev.conll"
    data.write_text("".join("".join(f"w{rng.integers(100)} LABEL_{rng.integers(3)}\n" for _ in range(6)) + "\n"
                            for _ in range(12)))
    stack = [models["base"], lang_sft, task_sft, "--skip-dense", lang_sft, "--scale", "0.5", "--scale", "3"]
    code, _, err = run_cli(["apply", *stack, "-o", tmp_path / "baked", "-q"], capsys)
    assert code == 0, err
    task = ["--objective", "token-classification", "--data", data, "--json"]
    code, out, err = run_cli(["evaluate", *stack, *task], capsys)
    assert code == 0, err
    memory = json.loads(out)
    code, out, err = run_cli(["evaluate", tmp_path / "baked", *task], capsys)
    assert code == 0, err
    baked = json.loads(out)
    assert memory["scales"] == [0.5, 3.0] and memory["total"] == baked["total"] > 0
    assert memory["correct"] == baked["correct"]
    code, out, err = run_cli(["evaluate", *stack[:5], *task], capsys)  # unscaled: another model
    unscaled = json.loads(out)
    assert code == 0 and unscaled["scales"] == [1.0, 1.0]
    code, _, err = run_cli(["evaluate", *stack, "--scale", "1", *task], capsys)
    assert code == 2 and "3 scale values for 2 diffs" in err, err
    from sftdiff.evaluate import load_model

    model, _, _, _ = load_model(models["base"], [lang_sft, task_sft], "token-classification",
                                with_dense=[False, True], scales=[0.5, 3.0])
    reference, _, _, _ = load_model(tmp_path / "baked", [], "token-classification")
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_create_and_convert_never_write_over_an_input_even_with_force(models, task_sft, tmp_path, capsys):
    """`create base ft -o ft/model.safetensors --force` replaced the fine-tune's weights with the
    diff, and `convert adapter/ -o adapter/ --force` replaced the adapter it read; the algebra
    commands already refused this. Every command refuses an output that is, or is inside, an input."""
    import shutil

    ft = tmp_path / "ft"
    shutil.copytree(models["ft"], ft)
    diff = tmp_path / "d.sft"
    shutil.copy(task_sft, diff)
    code, _, err = run_cli(["convert", diff, "--rank", "2", "-o", tmp_path / "lora", "-q"], capsys)
    assert code == 0, err
    before = tree_hashes(ft, diff, tmp_path / "lora")
    for args in (["create", models["base"], ft, "-o", ft / "model.safetensors", "-k", "10", "--force"],
                 ["convert", diff, "-o", diff, "-k", "10", "--force"],
                 ["convert", tmp_path / "lora", "--to", "lora", "--rank", "1", "-o", tmp_path / "lora", "--force"],
                 ["prune", diff, "-k", "10", "-o", diff, "--force"]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "write the result somewhere else" in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    assert tree_hashes(ft, diff, tmp_path / "lora") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.sft", "ft", "lora"]


def test_evaluate_says_when_base_and_diff_are_swapped_as_apply_does(models, task_sft, tmp_path, capsys):
    """`apply task.sft base/` says the arguments look swapped and how to run it (exit 2);
    `evaluate task.sft base/ ...` said only "Directory 'task.sft' is a file", with no hint."""
    data = tmp_path / "t.txt"
    data.write_text("w1 w2\n")
    for command, rest in (("apply", ["-o", tmp_path / "out"]), ("evaluate", ["--objective", "mlm", "--data", data])):
        code, _, err = run_cli([command, task_sft, models["base"], *rest], capsys)
        assert code == 2 and "the arguments look swapped" in err, err
        assert f"sftdiff {command} {models['base']} {task_sft}" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["evaluate", models["base"], models["ft"], "--objective", "mlm", "--data", data], capsys)
    assert code == 2 and f"run sftdiff create {models['base']} {models['ft']}" in err, err


def test_retrain_and_train_refuse_to_overwrite_their_inputs(tmp_path):
    """`retrain base cut.sft -o cut.sft --force` must not replace the diff it reads (nor train its corpus)."""
    import subprocess
    import sys

    (tmp_path / "base").mkdir()  # checked for existence only: the refusal comes before anything is read
    (tmp_path / "corpus.txt").write_text("some text\n", encoding="utf-8")
    (tmp_path / "cut.sft").write_bytes(b"not read: refused before anything is opened")
    before = (tmp_path / "cut.sft").read_bytes()
    for args in (["retrain", "base", "cut.sft", "--text", "corpus.txt", "--objective", "mlm", "-o", "cut.sft"],
                 ["train", "base", "--text", "corpus.txt", "--objective", "mlm", "--density", "0.1",
                  "-o", "corpus.txt"]):
        r = subprocess.run([sys.executable, "-m", "sftdiff", *args, "--force"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "is the input" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert (tmp_path / "cut.sft").read_bytes() == before
    assert (tmp_path / "corpus.txt").read_text(encoding="utf-8") == "some text\n"
