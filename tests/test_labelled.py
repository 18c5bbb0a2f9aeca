"""Labelled-data readers, label sets and head configs, encoding (first subword, window splitting)
and batching, on files written by the tests (malformed ones too) and a tiny WordPiece BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labelled_helpers import bert_folder, tagged_sentences, tokenizer, write_conllu
import torch
import transformers

from sftdiff.errors import FormatError, UsageError
from sftdiff.labelled import (IGNORE, LabelSet, TaskBatches, encode, encode_tokens, head_class, load_task_model,
                              max_length, prepare_task, read_labelled, read_sequence_file, read_token_file)

CONLLU = """# newdoc id = d1
# sent_id = 1
# text = Kedisini gördüm.
1-2\tKedisini\t_\t_\t_\t_\t_\t_\t_\t_
1\tKedi\tkedi\tNOUN\tNoun\t_\t3\tobj\t_\t_
2\tsini\tsi\tPRON\tPron\t_\t1\tnmod\t_\t_
3\tgördüm\tgör\tVERB\tVerb\t_\t0\troot\t_\tSpaceAfter=No
3.1\tgörmek\t_\tVERB\t_\t_\t_\t_\t3:ref\t_
4\t.\t.\tPUNCT\tPunc\t_\t3\tpunct\t_\t_

# sent_id = 2
1\tNew York\tNew York\tPROPN\tNp\t_\t0\troot\t_\t_
"""


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# -- token classification readers


def test_conllu_skips_comments_ranges_and_empty_nodes(tmp_path):
    data = read_token_file(write(tmp_path, "a.conllu", CONLLU))
    assert data.format == "conllu"
    assert [ex.words for ex in data.examples] == [("Kedi", "sini", "gördüm", "."), ("New York",)]
    assert [ex.labels for ex in data.examples] == [("NOUN", "PRON", "VERB", "PUNCT"), ("PROPN",)]
    assert data.examples[0].lines == (5, 6, 7, 9)  # file lines of the words (for messages)


@pytest.mark.parametrize("column, expected", [("xpos", ("Noun", "Pron", "Verb", "Punc")), ("XPOS", ("Noun", "Pron", "Verb", "Punc")),
                                              ("8", ("obj", "nmod", "root", "punct")), ("deprel", ("obj", "nmod", "root", "punct"))])
def test_conllu_label_column(tmp_path, column, expected):
    data = read_token_file(write(tmp_path, "a.conllu", CONLLU), label_column=column)
    assert data.examples[0].labels == expected


@pytest.mark.parametrize("column", ["form", "1", "11", "nope"])
def test_conllu_label_column_must_be_a_label_column(tmp_path, column):
    with pytest.raises(UsageError, match="label column"):
        read_token_file(write(tmp_path, "a.conllu", CONLLU), label_column=column)


def test_conll_two_columns_iob2(tmp_path):
    text = "-DOCSTART- O\n\nJohn B-PER\nSmith\tI-PER\nruns O\n\n\n\nParis B-LOC\n"
    data = read_token_file(write(tmp_path, "ner.iob2", text))
    assert data.format == "conll"
    assert [ex.words for ex in data.examples] == [("John", "Smith", "runs"), ("Paris",)]
    assert [ex.labels for ex in data.examples] == [("B-PER", "I-PER", "O"), ("B-LOC",)]
    assert data.examples[1].lines == (9,)


def test_token_jsonl(tmp_path):
    text = json.dumps({"tokens": ["a", "cat"], "tags": ["DET", "NOUN"]}) + "\n\n" + \
        json.dumps({"tokens": [], "tags": []}) + "\n" + json.dumps({"tokens": ["x"], "tags": [3], "id": 7}) + "\n"
    data = read_token_file(write(tmp_path, "t.jsonl", text))
    assert [(ex.words, ex.labels, ex.lines) for ex in data.examples] == [
        (("a", "cat"), ("DET", "NOUN"), (1, 1)), (("x",), ("3",), (4,))]
    other = read_token_file(write(tmp_path, "u.jsonl", json.dumps({"tokens": ["a"], "upos": ["DET"]})),
                            label_column="upos")
    assert other.examples[0].labels == ("DET",)


def test_format_detected_from_content_and_overridable(tmp_path):
    conllu = write(tmp_path, "ud.txt", CONLLU)
    conll = write(tmp_path, "ner.txt", "John B-PER\nruns O\n")
    jsonl = write(tmp_path, "t.data", json.dumps({"tokens": ["a"], "tags": ["DET"]}) + "\n")
    assert [read_token_file(p).format for p in (conllu, conll, jsonl)] == ["conllu", "conll", "jsonl"]
    # an extension that says otherwise is overridden by an explicit format
    odd = write(tmp_path, "ner.conllu", "John B-PER\nruns O\n")
    assert read_token_file(odd, format="conll").examples[0].words == ("John", "runs")
    assert read_labelled(conll, "token-classification").format == "conll"


# -- sequence classification readers


def test_sequence_jsonl_with_pairs(tmp_path):
    lines = [{"text": "a cat", "text_pair": "an animal", "label": "entailment"},
             {"text": "a dog", "text_pair": "a tree", "label": "contradiction", "extra": 1}]
    data = read_sequence_file(write(tmp_path, "nli.jsonl", "\n".join(map(json.dumps, lines)) + "\n"))
    assert [(ex.text, ex.text_pair, ex.label, ex.line) for ex in data.examples] == [
        ("a cat", "an animal", "entailment", 1), ("a dog", "a tree", "contradiction", 2)]


def test_sequence_csv_and_tsv(tmp_path):
    csv_text = 'label,text\npos,"good, really good"\n\nneg,"bad ""very"" bad"\n'
    data = read_sequence_file(write(tmp_path, "s.csv", csv_text))
    assert [(ex.text, ex.label, ex.line, ex.text_pair) for ex in data.examples] == [
        ("good, really good", "pos", 2, None), ('bad "very" bad', "neg", 4, None)]
    tsv_text = 'premise\thypothesis\tgold\nA "quoted" cat\tan animal\tyes\n'
    data = read_sequence_file(write(tmp_path, "s.tsv", tsv_text), text_column="premise",
                              pair_column="hypothesis", label_column="gold")
    assert data.format == "tsv"
    assert (data.examples[0].text, data.examples[0].text_pair, data.examples[0].label) == ('A "quoted" cat', "an animal", "yes")
    # detected from content when the extension says nothing
    assert read_sequence_file(write(tmp_path, "s.dat", csv_text)).format == "csv"
    assert read_labelled(write(tmp_path, "s2.dat", tsv_text), "sequence-classification", text_column="premise",
                         label_column="gold").format == "tsv"


# -- malformed files: one FormatError naming file, line and problem


BAD_TOKEN_FILES = [
    ("a.conllu", "1\tcat\tcat\tNOUN\t_\t_\t0\troot\t_\n", 1, "9 tab-separated columns"),
    ("a.conllu", "# c\n1\tcat\tcat\tNOUN\t_\t_\t0\troot\t_\t_\nx\tdog\tdog\tNOUN\t_\t_\t0\troot\t_\t_\n", 3, "word ID 'x'"),
    ("a.conllu", "1\tcat\tcat\tNOUN\t_\t_\t0\troot\t_\t_\n2\tsat\tsit\t_\t_\t_\t0\troot\t_\t_\n", 2, "a label missing"),
    ("a.iob2", "John B-PER\nSmith I-PER extra\n", 2, "3 columns"),
    ("a.iob2", "John B-PER\n\nSmith\n", 3, "a label missing"),
    ("a.jsonl", '{"tokens": ["a"], "tags": ["DET"]}\n{"tokens": ["a"], "tags": ["DET"]\n', 2, "not valid JSON"),
    ("a.jsonl", '["a", "DET"]\n', 1, "not an object"),
    ("a.jsonl", '{"tokens": ["a"], "tags": ["DET"]}\n\n{"tokens": ["a", "b"]}\n', 3, "missing key 'tags'"),
    ("a.jsonl", '{"tokens": ["a", "b"], "tags": ["DET"]}\n', 1, "2 tokens but 1 tags"),
    ("a.jsonl", '{"tokens": ["a", "b"], "tags": ["DET", null]}\n', 1, "a label missing"),
    ("a.jsonl", '{"tokens": ["a", 5], "tags": ["DET", "X"]}\n', 1, "token 2"),
    ("a.txt", "John\tB-PER\textra\tmore\n", 1, "cannot tell the format"),
]


@pytest.mark.parametrize("name, text, line, problem", BAD_TOKEN_FILES)
def test_bad_token_files(tmp_path, name, text, line, problem):
    path = write(tmp_path, name, text)
    with pytest.raises(FormatError) as e:
        read_token_file(path)
    message = str(e.value)
    assert message.startswith(f"{path}:{line}: ") and problem in message
    assert "\n" not in message


BAD_SEQUENCE_FILES = [
    ("s.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', 2, "missing key 'label'"),
    ("s.jsonl", '{"text": "a", "label": null}\n', 1, "a label missing"),
    ("s.jsonl", '{"text": 3, "label": "x"}\n', 1, "not a string"),
    ("s.jsonl", '{"text": "a", "label": [1]}\n', 1, "must be a string or an integer"),
    ("s.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "text_pair": "c", "label": "y"}\n', 2, "give pairs"),
    ("s.csv", "sentence,label\nhello,pos\n", 1, "no 'text' column"),
    ("s.csv", "text,label\nhello,pos\nhi,neg,extra\n", 3, "3 CSV columns but the header has 2"),
    ("s.tsv", "text\tlabel\nhello\t\n", 2, "a label missing"),
]


@pytest.mark.parametrize("name, text, line, problem", BAD_SEQUENCE_FILES)
def test_bad_sequence_files(tmp_path, name, text, line, problem):
    path = write(tmp_path, name, text)
    with pytest.raises(FormatError) as e:
        read_sequence_file(path)
    assert str(e.value).startswith(f"{path}:{line}: ") and problem in str(e.value)


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "a.iob2", "John B-PER\n\nM\xfcller B-PER\n".encode("latin-1"))
    with pytest.raises(FormatError, match=rf"^{path}:3: not UTF-8 \(byte 0xfc\)"):
        read_token_file(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_files(tmp_path, text):
    for name, read in (("a.conllu", read_token_file), ("s.csv", read_sequence_file), ("s.jsonl", read_sequence_file)):
        path = write(tmp_path, name, text)
        with pytest.raises(FormatError, match=rf"^{path}: the file is empty"):
            read(path)


def test_files_without_examples(tmp_path):
    path = write(tmp_path, "a.conllu", "# just a comment\n")
    with pytest.raises(FormatError, match=rf"^{path}: no labelled sentences"):
        read_token_file(path)
    path = write(tmp_path, "s.csv", "text,label\n")
    with pytest.raises(FormatError, match=rf"^{path}: no labelled examples"):
        read_sequence_file(path)


def test_unknown_format_and_objective(tmp_path):
    path = write(tmp_path, "a.conllu", CONLLU)
    with pytest.raises(UsageError, match="unknown format 'csv'"):
        read_token_file(path, format="csv")
    with pytest.raises(UsageError, match="unknown task objective"):
        read_labelled(path, "tagging")


# -- labels and the head's config


def test_label_set_is_sorted_and_stable(tmp_path):
    a = write(tmp_path, "a.iob2", "x O\ny B-PER\n\nz I-PER\nw B-LOC\n")
    b = write(tmp_path, "b.iob2", "w B-LOC\nz I-PER\n\nx O\ny B-PER\nx O\n")
    la, lb = LabelSet.from_data(read_token_file(a)), LabelSet.from_data(read_token_file(b))
    assert la == lb and la.labels == ("B-LOC", "B-PER", "I-PER", "O")
    assert la.label2id == {"B-LOC": 0, "B-PER": 1, "I-PER": 2, "O": 3} and la.num_labels == 4
    assert la.id2label == {0: "B-LOC", 1: "B-PER", 2: "I-PER", 3: "O"}
    # integer labels are ordered as numbers, so label "10" is id 10 and not id 2
    numbers = write(tmp_path, "n.jsonl", "\n".join(json.dumps({"text": "t", "label": i}) for i in [2, 10, 0, 1, 3, 4, 5, 6, 7, 8, 9]))
    assert LabelSet.from_data(read_sequence_file(numbers)).labels == tuple(str(i) for i in range(11))


def test_one_label_is_not_a_classifier(tmp_path):
    path = write(tmp_path, "a.iob2", "x O\ny O\n")
    with pytest.raises(FormatError, match=rf"^{path}: only one label \('O'\)"):
        LabelSet.from_data(read_token_file(path))


def test_unseen_labels_one_clear_error(tmp_path):
    train = LabelSet.from_data(read_token_file(write(tmp_path, "train.iob2", "x O\ny B-PER\n")))
    path = write(tmp_path, "eval.iob2", "x O\ny B-LOC\n\nz B-ORG\nw B-LOC\n")
    with pytest.raises(FormatError) as e:
        train.check(read_token_file(path))
    message = str(e.value)
    assert message.startswith(f"{path}:2: label 'B-LOC' (and 1 more: B-ORG) is not one of the 2 labels")
    assert "B-PER" in message


def test_config_patch_and_label_set_from_config():
    labels = LabelSet(("ADJ", "NOUN", "VERB"))
    patch = labels.config_patch({"model_type": "bert"}, "token-classification")
    assert patch == {"architectures": ["BertForTokenClassification"], "num_labels": 3,
                     "id2label": {"0": "ADJ", "1": "NOUN", "2": "VERB"}, "label2id": {"ADJ": 0, "NOUN": 1, "VERB": 2}}
    assert LabelSet.from_config(patch) == labels
    assert LabelSet.from_config({"id2label": {0: "ADJ", 1: "NOUN", 2: "VERB"}}) == labels
    seq = labels.config_patch({"model_type": "llama"}, "sequence-classification", tokenizer=_PadLess())
    assert seq["architectures"] == ["LlamaForSequenceClassification"]
    assert seq["problem_type"] == "single_label_classification" and seq["pad_token_id"] == 2
    assert head_class("roberta", "token-classification") == "RobertaForTokenClassification"
    with pytest.raises(UsageError, match="no token-classification model for model type 'nonsense'"):
        head_class("nonsense", "token-classification")
    with pytest.raises(FormatError, match="no usable id2label"):
        LabelSet.from_config({"id2label": {"1": "A", "2": "B"}})


class _PadLess:
    pad_token_id = None
    eos_token_id = 2


def test_max_length():
    tok = tokenizer()
    assert max_length({"model_type": "bert", "max_position_embeddings": 64}, tok) == 64
    assert max_length({"model_type": "xlm-roberta", "max_position_embeddings": 514, "pad_token_id": 1}, tok) == 512
    tok.model_max_length = 32
    assert max_length({"model_type": "bert", "max_position_embeddings": 64}, tok) == 32


# -- encoding


def test_first_subword_gets_the_label():
    tok = tokenizer()
    from sftdiff.labelled import TokenExample

    ex = TokenExample(("the", "cats", "walking", "xyz"), ("DET", "NOUN", "VERB", "X"), (1, 2, 3, 4))
    label2id = {"DET": 0, "NOUN": 1, "VERB": 2, "X": 3}
    enc = encode_tokens([ex], tok, label2id, 64)
    (feature,) = enc.features
    ids = tok.convert_ids_to_tokens(feature["input_ids"])
    assert ids == ["[CLS]", "the", "cat", "##s", "walk", "##ing", "[UNK]", "[SEP]"]
    assert feature["labels"] == [IGNORE, 0, 1, IGNORE, 2, IGNORE, 3, IGNORE]


def test_long_sentences_are_split_not_truncated():
    tok = tokenizer()
    from sftdiff.labelled import TokenExample

    words = ["the", "cats", "walking", "on", "a", "red", "mat", "."] * 5 + ["jumped"]
    labels = [f"L{i % 7}" for i in range(len(words))]
    ex = TokenExample(tuple(words), tuple(labels), tuple(range(1, len(words) + 1)))
    label2id = {f"L{i}": i for i in range(7)}
    enc = encode_tokens([ex, ex], tok, label2id, 10)
    assert enc.windows_split == 2 and enc.labelled == 2 * len(words)
    per_example = {0: [], 1: []}
    for f in enc.features:
        assert len(f["input_ids"]) <= 10 and len(f["input_ids"]) == len(f["labels"])
        assert f["input_ids"][0] == tok.cls_token_id and f["input_ids"][-1] == tok.sep_token_id
        assert f["labels"][1] != IGNORE  # a window starts at a word, never inside one
        per_example[f["example"]] += [lab for lab in f["labels"] if lab != IGNORE]
    # every word labelled exactly once, in order, across the windows
    assert per_example[0] == per_example[1] == [label2id[lab] for lab in labels]


def test_word_longer_than_a_window_keeps_its_first_subwords():
    tok = tokenizer()
    from sftdiff.labelled import TokenExample

    ex = TokenExample(("a", "walkinginginging", "."), ("A", "B", "C"), (1, 1, 1))
    enc = encode_tokens([ex], tok, {"A": 0, "B": 1, "C": 2}, 5)
    assert enc.words_cut == 1
    assert [f["labels"] for f in enc.features] == [[IGNORE, 0, IGNORE], [IGNORE, 1, IGNORE, IGNORE, IGNORE],
                                                   [IGNORE, 2, IGNORE]]
    with pytest.raises(UsageError, match="no room"):
        encode_tokens([ex], tok, {"A": 0, "B": 1, "C": 2}, 2)


def test_sequence_encoding_pairs_and_truncation(tmp_path):
    tok = tokenizer()
    lines = [{"text": "the cat sat", "text_pair": "a dog", "label": "b"},
             {"text": " ".join(["the big cat"] * 20), "text_pair": "the dog", "label": "a"}]
    data = read_sequence_file(write(tmp_path, "p.jsonl", "\n".join(map(json.dumps, lines))))
    labels = LabelSet.from_data(data)
    enc = encode(data, tok, labels, 16)
    first, second = enc.features
    assert tok.convert_ids_to_tokens(first["input_ids"]) == ["[CLS]", "the", "cat", "sat", "[SEP]", "a", "dog", "[SEP]"]
    assert first["token_type_ids"] == [0] * 5 + [1] * 3 and first["labels"] == 1
    assert len(second["input_ids"]) == 16 and enc.truncated == 1 and second["labels"] == 0


# -- batches


def test_batches_pad_and_shuffle_reproducibly():
    features = [{"input_ids": [2] + [5] * n + [3], "labels": [IGNORE] + [1] * n + [IGNORE], "example": i}
                for i, n in enumerate([1, 4, 2, 3, 5])]
    batches = TaskBatches(features, 2, pad_id=0, seed=7)
    first, second = [b["input_ids"].tolist() for b in batches], [b["input_ids"].tolist() for b in batches]
    again = [b["input_ids"].tolist() for b in TaskBatches(features, 2, pad_id=0, seed=7)]
    assert first == again and first != second  # seeded, and reshuffled each pass
    batch = next(iter(TaskBatches(features, 5, pad_id=0, shuffle=False)))
    assert batch["input_ids"].shape == (5, 7) and batch["labels"].shape == (5, 7)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch["input_ids"][0].tolist() == [2, 5, 3, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE, 1, IGNORE] + [IGNORE] * 4
    seq = TaskBatches([{"input_ids": [2, 5, 3], "labels": 1, "example": 0, "token_type_ids": [0, 0, 0]}], 4, 0)
    assert next(iter(seq))["labels"].tolist() == [1] and "token_type_ids" in next(iter(seq))


# -- model, and a training run end to end


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return bert_folder(tmp_path_factory.mktemp("bert") / "base")


def test_load_task_model_has_the_labels(base, tmp_path):
    labels = LabelSet(("ADJ", "NOUN", "VERB"))
    model, tok, patch = load_task_model(base, "token-classification", labels)
    assert type(model).__name__ == "BertForTokenClassification" and tok.is_fast
    assert model.config.id2label == {0: "ADJ", 1: "NOUN", 2: "VERB"} and model.classifier.out_features == 3
    assert patch["architectures"] == ["BertForTokenClassification"]
    model, _, patch = load_task_model(base, "sequence-classification", labels)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3
    # a config with the patch is what a baked model carries: transformers loads it with the labels
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(patch)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert loaded.config.id2label == {0: "ADJ", 1: "NOUN", 2: "VERB"} and loaded.config.problem_type == "single_label_classification"


def test_prepare_task_trains(base, tmp_path):
    train = write_conllu(tmp_path / "train.conllu", tagged_sentences(64, 0))
    held_out = write_conllu(tmp_path / "dev.conllu", tagged_sentences(16, 1))
    torch.manual_seed(0)
    task = prepare_task(base, "token-classification", train, eval_data=held_out, batch_size=16, seq_len=1000)
    assert task.seq_len == 64  # capped at what the model takes
    assert task.labels.labels == ("ADJ", "ADP", "DET", "NOUN", "PUNCT", "VERB")
    assert task.settings["examples"] == 64 and task.settings["num_labels"] == 6
    from sftdiff.train import train_steps

    losses = train_steps(task.model, task.batches, 30, lr=3e-3)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    with torch.no_grad():
        batch = next(iter(task.eval_batches))
        assert task.model(**batch).loss.item() < losses[0]


def test_prepare_task_unseen_eval_label(base, tmp_path):
    train = write(tmp_path, "train.iob2", "the O\ncat B-ANIMAL\n")
    held_out = write(tmp_path, "dev.iob2", "the O\n\nmat B-THING\n")
    with pytest.raises(FormatError, match=rf"^{held_out}:3: label 'B-THING'"):
        prepare_task(base, "token-classification", train, eval_data=held_out)


def test_prepare_task_sequence_pairs_from_tsv(base, tmp_path):
    rows = ["premise\thypothesis\tlabel"] + [f"the {a} sat\ta {b}\t{'same' if a == b else 'other'}"
                                              for a in ("cat", "dog", "bird") for b in ("cat", "dog")]
    data = write(tmp_path, "nli.tsv", "\n".join(rows) + "\n")
    torch.manual_seed(0)
    task = prepare_task(base, "sequence-classification", data, text_column="premise", pair_column="hypothesis",
                        batch_size=4, seed=3)
    assert task.labels.labels == ("other", "same") and task.config_patch["problem_type"] == "single_label_classification"
    batch = next(iter(task.batches))
    assert batch["labels"].shape == (4,) and batch["token_type_ids"].max().item() == 1
    loss = task.model(**batch).loss
    assert torch.isfinite(loss) and type(task.model).__name__ == "BertForSequenceClassification"
