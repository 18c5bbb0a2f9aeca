"""`sftdiff evaluate` / `sftdiff.evaluate`: accuracy and LM loss of a base plus diffs applied in
memory, equal to evaluating the baked checkpoint; on a tiny WordPiece BERT and a tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers_models import head_arrays, random_diff, run_main
from labelled_helpers import BERT, bert_folder, tagged_sentences, write_conllu, write_sequences
import torch
import transformers

from sftdiff.bake import bake
from sftdiff.checkpoint import Checkpoint
from sftdiff.errors import FormatError
from sftdiff.evaluate import evaluate, load_model
from sftdiff.labelled import LabelSet, prepare_task, read_labelled
from sftdiff.train import lottery_ticket_sft

H, V = BERT["hidden_size"], BERT["vocab_size"]
MLM_HEAD = {"cls.predictions.transform.dense.weight": (H, H), "cls.predictions.transform.dense.bias": (H,),
            "cls.predictions.transform.LayerNorm.weight": (H,), "cls.predictions.transform.LayerNorm.bias": (H,),
            "cls.predictions.bias": (V,)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A bare BERT base, POS data, a trained task diff, a language diff with an MLM head, and text."""
    d = tmp_path_factory.mktemp("evaluate")
    base = bert_folder(d / "base")
    train = write_conllu(d / "train.conllu", tagged_sentences(96, 0))
    dev = write_conllu(d / "dev.conllu", tagged_sentences(24, 1))
    torch.manual_seed(0)
    task = prepare_task(base, "token-classification", train, batch_size=8)
    diff = lottery_ticket_sft(task.model, task.batches, density=0.05, full_steps=20, sparse_steps=20, lr=5e-3,
                              base=Checkpoint.open(base))
    diff.meta.config_patch = task.config_patch
    diff.save(d / "task.sft")
    lang = random_diff(Checkpoint.open(base), seed=1, density=0.05, dense=head_arrays(MLM_HEAD, seed=2))
    lang.save(d / "lang.sft")
    text = d / "text.txt"
    text.write_text("\n".join(" ".join(w for w, _ in s) for s in tagged_sentences(30, 3)) + "\n", encoding="utf-8")
    return {"dir": d, "base": base, "train": train, "dev": dev, "task": d / "task.sft", "lang": d / "lang.sft",
            "text": text}


def same(a, b) -> None:
    assert a.metrics == b.metrics and a.per_example == b.per_example and a.labels == b.labels


def test_task_diff_in_memory_equals_baked(world):
    in_memory = evaluate(world["base"], [world["task"]], objective="token-classification", data=world["dev"])
    assert in_memory.metrics["accuracy"] > 0.5  # trained: chance is 1/6, the most frequent tag 1/4
    assert in_memory.metrics["total"] == 24 * 8 and in_memory.metrics["examples"] == 24
    assert in_memory.labels == ["ADJ", "ADP", "DET", "NOUN", "PUNCT", "VERB"]
    assert [t for _, t in in_memory.per_example] == [8] * 24
    baked = bake(world["base"], [world["task"]], world["dir"] / "baked-task").path
    same(in_memory, evaluate(baked, [], objective="token-classification", data=world["dev"]))
    model = transformers.AutoModelForTokenClassification.from_pretrained(baked)
    assert model.config.id2label == dict(enumerate(in_memory.labels))


def test_accuracy_helper_matches_evaluate(world):
    """`accuracy(model, batches)`: what a training command reports on held-out data."""
    from sftdiff.evaluate import accuracy, load_model
    from sftdiff.labelled import encode, task_batches

    expected = evaluate(world["base"], [world["task"]], objective="token-classification", data=world["dev"])
    model, tokenizer, config, _ = load_model(world["base"], [world["task"]], "token-classification")
    model.train()
    data = read_labelled(world["dev"], "token-classification")
    batches = task_batches(encode(data, tokenizer, LabelSet.from_config(config), 64), 7, tokenizer, seed=1)
    assert accuracy(model, batches) == expected.metrics["accuracy"] and model.training  # mode restored


def test_long_sentences_split_into_windows_count_every_word_once(world):
    full = evaluate(world["base"], [world["task"]], objective="token-classification", data=world["dev"])
    split = evaluate(world["base"], [world["task"]], objective="token-classification", data=world["dev"], seq_len=6)
    assert split.seq_len == 6 and split.metrics["split"] == 24 and split.metrics["inputs"] >= 2 * 24
    assert [t for _, t in split.per_example] == [t for _, t in full.per_example]  # every word, once


def test_composition_with_a_language_diff(world):
    """base + language SFT (without its MLM head) + task SFT, as the cross-lingual recipe applies them."""
    args = dict(objective="token-classification", data=world["dev"])
    skipped = evaluate(world["base"], [world["lang"], world["task"]], with_dense=[False, True], **args)
    # The language diff changes the encoder (accuracy alone may not show it: the tiny tagger can be perfect).
    both_model = load_model(world["base"], [world["lang"], world["task"]], "token-classification",
                            with_dense=[False, True])[0].state_dict()
    alone_model = load_model(world["base"], [world["task"]], "token-classification")[0].state_dict()
    changed = [n for n in alone_model if not torch.equal(both_model[n], alone_model[n])]
    assert changed and all(not n.startswith("classifier.") for n in changed)
    baked = bake(world["base"], [world["lang"], world["task"]], world["dir"] / "baked-both",
                 with_dense=[False, True]).path
    same(skipped, evaluate(baked, [], **args))
    # with its dense entries, the MLM head has nowhere to go on a tagger: skipped, the numbers unchanged
    with_head = evaluate(world["base"], [world["lang"], world["task"]], **args)
    same(with_head, skipped)
    pooler = ["pooler.dense.bias", "pooler.dense.weight"]  # a tagger has no pooler either
    assert sorted(s.split(":")[-1] for s in with_head.skipped) == sorted([*MLM_HEAD, *pooler])
    assert sorted(s.split(":")[-1] for s in skipped.skipped) == pooler


def test_no_trained_head_is_an_error(world):
    with pytest.raises(FormatError, match=r"needs 'classifier\.(bias|weight)' \(and 1 more\)"):
        evaluate(world["base"], [], objective="token-classification", data=world["dev"])
    with pytest.raises(FormatError, match="needs 'cls.predictions"):
        evaluate(world["base"], [world["lang"]], with_dense=[False], objective="mlm", data=world["text"])


def test_mlm_loss_is_seeded_and_equals_baked(world):
    args = dict(objective="mlm", data=world["text"], seq_len=32)
    first = evaluate(world["base"], [world["lang"]], **args)
    assert first.metrics == evaluate(world["base"], [world["lang"]], **args).metrics
    m = first.metrics
    assert m["tokens"] > 0 and math.isclose(m["perplexity"], math.exp(m["loss"])) and first.seq_len == 32
    baked = bake(world["base"], [world["lang"]], world["dir"] / "baked-lang").path
    assert evaluate(baked, [], **args).metrics == m
    other_seed = evaluate(world["base"], [world["lang"]], seed=1, **args).metrics
    assert other_seed["loss"] != m["loss"]


def test_clm_loss_is_the_models_own(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a cat dog sat on mat .".split()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=3 + len(words), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                                      max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "llama")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "llama")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat .\na dog sat on a mat .\n" * 6, encoding="utf-8")
    result = evaluate(tmp_path / "llama", [], objective="clm", data=text, seq_len=16, batch_size=64)
    from sftdiff.text import read_blocks

    blocks = read_blocks(str(text), fast, 16, "clm")
    with torch.no_grad():
        expected = model(input_ids=blocks, labels=blocks).loss.item()
    assert result.metrics["tokens"] == blocks.shape[0] * 15 and result.metrics["blocks"] == blocks.shape[0]
    assert math.isclose(result.metrics["loss"], expected, rel_tol=1e-5)


def test_sequence_classification_in_memory_equals_baked(world, tmp_path):
    data = write_sequences(tmp_path / "s.jsonl", 20, 0)
    labels = LabelSet.from_data(read_labelled(data, "sequence-classification"))
    ckpt = Checkpoint.open(world["base"])
    diff = random_diff(ckpt, seed=5, density=0.05, config_patch=labels.config_patch(ckpt.config, "sequence-classification"),
                       dense=head_arrays({"classifier.weight": (2, H), "classifier.bias": (2,)}, seed=6))
    diff.save(tmp_path / "seq.sft")
    result = evaluate(world["base"], [tmp_path / "seq.sft"], objective="sequence-classification", data=data)
    assert result.metrics["total"] == 20 and result.metrics["unit"] == "examples" and result.labels == ["cat", "dog"]
    assert all(t == 1 for _, t in result.per_example)
    baked = bake(world["base"], [tmp_path / "seq.sft"], tmp_path / "baked").path
    same(result, evaluate(baked, [], objective="sequence-classification", data=data))


def test_half_precision_base_rounds_like_bake(tmp_path):
    """Two diffs touching the same bf16 values: bake sums them in float32 and rounds once."""
    base = bert_folder(tmp_path / "base", dtype=torch.bfloat16)
    ckpt = Checkpoint.open(base)
    labels = LabelSet(("ADJ", "ADP", "DET", "NOUN", "PUNCT", "VERB"))
    first = random_diff(ckpt, seed=1, density=0.3)
    second = random_diff(ckpt, seed=2, density=0.3, config_patch=labels.config_patch(ckpt.config, "token-classification"),
                         dense=head_arrays({"classifier.weight": (6, H), "classifier.bias": (6,)}, seed=3))
    data = write_conllu(tmp_path / "dev.conllu", tagged_sentences(24, 1))
    result = evaluate(base, [first, second], objective="token-classification", data=data)
    baked = bake(ckpt, [first, second], tmp_path / "baked").path
    same(result, evaluate(baked, [], objective="token-classification", data=data))
    # and the MLM-free check on the weights themselves: the in-memory model equals the baked one
    from sftdiff.evaluate import load_model

    model, *_ = load_model(base, [first, second], "token-classification")
    reference, *_ = load_model(baked, [], "token-classification")
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


# -- the command


def test_cli_json_and_text(world, capsys):
    args = ["evaluate", str(world["base"]), str(world["lang"]), str(world["task"]), "--skip-dense", str(world["lang"]),
            "--objective", "token-classification", "--data", str(world["dev"]), "--batch-size", "5"]
    assert run_main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = evaluate(world["base"], [world["lang"], world["task"]], with_dense=[False, True],
                        objective="token-classification", data=world["dev"])
    assert out["command"] == "evaluate" and out["objective"] == "token-classification"
    assert out["accuracy"] == expected.metrics["accuracy"] and out["correct"] == expected.metrics["correct"]
    assert out["total"] == 192 and out["unit"] == "words" and out["examples"] == 24 and out["seq_len"] == 64
    assert out["diffs"] == [str(world["lang"]), str(world["task"])] and out["skip_dense"] == [str(world["lang"])]
    assert out["labels"] == expected.labels and len(out["skipped_entries"]) == 2 and out["batch_size"] == 5
    assert run_main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"accuracy {expected.metrics['accuracy']:.4f} ({expected.metrics['correct']}/192 words, 24 sentences)"
    assert run_main(["evaluate", str(world["base"]), str(world["lang"]), "--objective", "mlm", "--data",
                     str(world["text"]), "--seq-len", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"loss", "perplexity", "tokens", "blocks"} and out["seq_len"] == 32


def test_cli_errors(world, tmp_path, capsys):
    base, task = str(world["base"]), str(world["task"])
    assert run_main(["evaluate", base, task, "--skip-dense", "other.sft", "--objective", "token-classification",
                     "--data", str(world["dev"])]) == 2
    assert "--skip-dense other.sft is not one of the DIFF arguments" in capsys.readouterr().err
    bad = tmp_path / "bad.conllu"
    bad.write_text("1\tthe\tthe\tDET\t_\t_\t0\tdet\t_\t_\n2\tcat\tcat\tNOUN\t_\t_\n", encoding="utf-8")
    assert run_main(["evaluate", base, task, "--objective", "token-classification", "--data", str(bad)]) == 3
    err = capsys.readouterr().err
    assert err == f"sftdiff: error: {bad}:2: 6 tab-separated columns; a CoNLL-U word line has 10\n"
    unseen = tmp_path / "unseen.iob2"
    unseen.write_text("the DET\ncat NOUN\n\nsat AUX\n", encoding="utf-8")
    assert run_main(["evaluate", base, task, "--objective", "token-classification", "--data", str(unseen)]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"sftdiff: error: {unseen}:4: label 'AUX' is not one of the 6 labels") and err.count("\n") == 1
    assert run_main(["evaluate", base, "--objective", "token-classification", "--data", str(world["dev"])]) == 3
    assert "needs 'classifier." in capsys.readouterr().err


def test_api_export():
    """`sftdiff.evaluate` is the function (in a fresh interpreter: importing the submodule
    `sftdiff.evaluate` first makes Python bind the package attribute to the module)."""
    import subprocess
    import sys

    code = "import sftdiff; f = sftdiff.evaluate; from sftdiff.evaluate import evaluate; assert f is evaluate"
    subprocess.run([sys.executable, "-c", code], check=True)
