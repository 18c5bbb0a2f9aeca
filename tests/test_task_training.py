"""Task SFTs from labelled data through `train`/`retrain` (issue 13 items 1-3): token and sequence
classification, training on top of a language SFT (`--on`, `on=`) and multi-source training
(`--source`, `Sources`), on a tiny WordPiece BERT and label files written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_models import head_arrays, random_diff, run_main
from labelled_helpers import BERT, bert_folder, tagged_sentences, write_conllu, write_sequences
import torch
import transformers

from sftdiff.fingerprint import content_fingerprint
from sftdiff.checkpoint import Checkpoint
from sftdiff.diff import SparseDiff
from sftdiff.evaluate import evaluate
from sftdiff.fingerprint import checkpoint_digests, model_fingerprint
from sftdiff.inplace import apply_to_model, revert_from_model
from sftdiff.labelled import prepare_task
from sftdiff.train import Sources, lottery_ticket_sft, sparse_retrain

H, V = BERT["hidden_size"], BERT["vocab_size"]
MLM_HEAD = {"cls.predictions.transform.dense.weight": (H, H), "cls.predictions.transform.dense.bias": (H,),
            "cls.predictions.bias": (V,)}
LABELS = ["ADJ", "ADP", "DET", "NOUN", "PUNCT", "VERB"]
FAST = ["-k", "400", "--full-steps", "6", "--sparse-steps", "6", "--lr", "5e-3", "--batch-size", "8",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A bare BERT, POS data, and two 'language SFTs' (random sparse diffs with an MLM head)."""
    d = tmp_path_factory.mktemp("task")
    base = bert_folder(d / "base")
    ckpt = Checkpoint.open(base)
    for i, name in enumerate(("src", "tgt")):
        random_diff(ckpt, seed=10 + i, density=0.05, dense=head_arrays(MLM_HEAD, seed=20 + i)).save(d / f"{name}.sft")
    return {"dir": d, "base": base, "src": d / "src.sft", "tgt": d / "tgt.sft",
            "train": write_conllu(d / "train.conllu", tagged_sentences(48, 0)),
            "dev": write_conllu(d / "dev.conllu", tagged_sentences(16, 1))}


def cli_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert run_main([str(a) for a in args]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_on_a_language_sft_then_apply_with_another_loads_with_the_data_labels(world, tmp_path, capsys):
    out = tmp_path / "task.sft"
    summary = cli_json(capsys, "train", world["base"], "--objective", "token-classification", "--data", world["train"],
                       "--eval-data", world["dev"], "--on", world["src"], "-o", out, *FAST, "--json")
    assert summary["command"] == "train" and summary["labels"] == LABELS
    accuracy = summary["held_out_accuracy"]
    assert 0 <= accuracy["base"] <= 1 and accuracy["trained"] > 0.5  # chance is 1/6
    task = SparseDiff.load(out)
    task.validate()
    patch = task.meta.config_patch
    assert patch["architectures"] == ["BertForTokenClassification"] and patch["num_labels"] == 6
    assert patch["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert {n for n in task.entries if task.info(n).kind == "dense"} == {"classifier.weight", "classifier.bias"}
    origin = task.meta.origin
    assert origin["method"] == "lt-sft" and origin["objective"] == "token-classification"
    assert origin["held_out_accuracy"] == accuracy["trained"] and origin["data"] == "train.conllu"
    src = SparseDiff.load(world["src"])
    assert origin["on"] == [{"diff": "src.sft", "content_fingerprint": content_fingerprint(src)[0]}]
    assert task.meta.base["fingerprint"] == model_fingerprint(checkpoint_digests(Checkpoint.open(world["base"])))

    merged = tmp_path / "merged"
    assert run_main(["apply", str(world["base"]), str(world["tgt"]), str(out), "--skip-dense", str(world["tgt"]),
                     "-o", str(merged)]) == 0
    model = transformers.AutoModelForTokenClassification.from_pretrained(merged)
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.num_labels == 6

    in_memory = evaluate(world["base"], [world["tgt"], out], with_dense=[False, True],
                         objective="token-classification", data=world["dev"])
    baked = evaluate(merged, [], objective="token-classification", data=world["dev"])
    assert in_memory.metrics == baked.metrics and in_memory.per_example == baked.per_example
    # the number the command reported is the accuracy of base + src + task
    on_src = evaluate(world["base"], [world["src"], out], with_dense=[False, True],
                      objective="token-classification", data=world["dev"])
    assert on_src.metrics["accuracy"] == pytest.approx(accuracy["trained"], abs=1.5 / on_src.metrics["total"])


def _task(world, seed: int = 0):
    torch.manual_seed(seed)
    return prepare_task(world["base"], "token-classification", world["train"], batch_size=8, seed=seed)


def test_on_result_is_the_difference_from_base_plus_the_language_sft(world):
    """sparse_retrain(on=[src]) equals training with src applied by hand: its values are
    trained − (base + src), and the model it leaves holds no trace of src."""
    src = SparseDiff.load(world["src"])
    ckpt = Checkpoint.open(world["base"])
    first = _task(world)
    names = dict(first.model.named_parameters())
    mask = {"encoder.layer.0.attention.self.query.weight": np.arange(0, 1024, 3),
            "encoder.layer.1.output.dense.weight": np.arange(5, 2048, 7)}
    model_names = {"encoder.layer.0.attention.self.query.weight": "bert.encoder.layer.0.attention.self.query.weight",
                   "encoder.layer.1.output.dense.weight": "bert.encoder.layer.1.output.dense.weight"}
    head = ["classifier.weight", "classifier.bias"]
    options = dict(steps=4, lr=1e-2, seed=0, dense=head, base_names=ckpt.tensors, keep_trained=True)

    by_hand = _task(world)
    record = apply_to_model(by_hand.model, src, with_dense=False, strict=False)
    on_base = {n: by_hand.model.get_parameter(m).detach().clone() for n, m in model_names.items()}  # base + src
    reference, _ = sparse_retrain(by_hand.model, mask, by_hand.batches, **options)
    trained = {n: by_hand.model.get_parameter(m).detach().clone() for n, m in model_names.items()}
    revert_from_model(by_hand.model, record)

    result, _ = sparse_retrain(first.model, mask, first.batches, **options, on=[src])
    for name, model_name in model_names.items():
        entry = result.entries[name]
        expected = (trained[name] - on_base[name]).reshape(-1)[torch.from_numpy(entry.indices)]
        np.testing.assert_allclose(entry.values_f32(), expected.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(entry.indices, reference.entries[name].indices)
        # the model is left as base + result: src's own positions hold the base's values
        left = names[model_name].detach().reshape(-1).numpy()
        base = ckpt.read(name, 0, ckpt.tensors[name].numel).reshape(-1)
        untouched = np.setdiff1d(src.entries[name].indices, entry.indices)
        assert len(untouched) and np.array_equal(left[untouched], base[untouched])
    assert result.meta.origin["on"][0]["content_fingerprint"] == content_fingerprint(src)[0]
    # training did see src: without it the result differs
    plain = _task(world)
    without, _ = sparse_retrain(plain.model, mask, plain.batches, **options)
    name = next(iter(mask))
    assert not np.allclose(without.entries[name].values_f32(), result.entries[name].values_f32())


def test_multi_source_takes_batches_from_each_source_in_turn_with_its_own_diff(world):
    ckpt = Checkpoint.open(world["base"])
    probe = "embeddings.LayerNorm.weight"  # frozen below, so it shows exactly which diff is applied
    diffs = [random_diff(ckpt, seed=30 + i, density=0.3, names=[probe, "encoder.layer.0.output.dense.weight"])
             for i in range(2)]
    task = _task(world)
    sources = Sources([([dict(b, source=i) for b in task.batches] , [diffs[i]]) for i in range(2)])
    base = torch.from_numpy(ckpt.read(probe, 0, ckpt.tensors[probe].numel).copy())
    seen = []

    def loss_fn(model, batch):
        i = batch.pop("source")
        weight = model.get_parameter("bert.embeddings.LayerNorm.weight").detach()
        expected = base.clone().reshape(-1)
        entry = diffs[i].entries[probe]
        expected[torch.from_numpy(entry.indices)] += torch.from_numpy(entry.values_f32())
        seen.append((i, torch.equal(weight, expected)))
        return model(**batch).loss

    diff = lottery_ticket_sft(task.model, sources, k=200, full_steps=4, sparse_steps=4, lr=1e-2, seed=0,
                              exclude_globs=["*LayerNorm*"], base=ckpt, loss_fn=loss_fn)
    assert [i for i, _ in seen] == [0, 1] * 4 and all(ok for _, ok in seen)  # both phases
    assert torch.equal(task.model.get_parameter("bert.embeddings.LayerNorm.weight").detach(), base)  # taken away
    assert [s["on"][0]["content_fingerprint"] for s in diff.meta.origin["sources"]] == \
        [content_fingerprint(d)[0] for d in diffs]


def test_cli_multi_source_shares_one_label_set(world, tmp_path, capsys):
    other = tmp_path / "other.conllu"  # a second source with a tag the first lacks
    write_conllu(other, [s + [("under", "X")] for s in tagged_sentences(16, 5)])
    out = tmp_path / "multi.sft"
    summary = cli_json(capsys, "train", world["base"], "--objective", "token-classification",
                       "--source", world["train"], world["src"], "--source", other, world["tgt"],
                       "--eval-data", world["dev"], "-o", out, *FAST, "--json", "--quiet")
    assert summary["labels"] == LABELS + ["X"]
    origin = SparseDiff.load(out).meta.origin
    assert [s["data"] for s in origin["data"]] == ["train.conllu", "other.conllu"]
    assert [s["on"][0]["diff"] for s in origin["sources"]] == ["src.sft", "tgt.sft"]
    assert SparseDiff.load(out).meta.config_patch["num_labels"] == 7


def test_sequence_classification_from_jsonl(world, tmp_path, capsys):
    data = write_sequences(tmp_path / "train.jsonl", 40, 0)
    dev = write_sequences(tmp_path / "dev.jsonl", 12, 1)
    out = tmp_path / "seq.sft"
    summary = cli_json(capsys, "train", world["base"], "--objective", "sequence-classification", "--data", data,
                       "--eval-data", dev, "-o", out, *FAST, "--json")
    assert summary["labels"] == ["cat", "dog"] and summary["held_out_accuracy"]["trained"] is not None
    diff = SparseDiff.load(out)
    assert diff.meta.config_patch["architectures"] == ["BertForSequenceClassification"]
    dense = {n for n in diff.entries if diff.info(n).kind == "dense"}
    assert {"classifier.weight", "classifier.bias"} <= dense
    merged = tmp_path / "merged"
    assert run_main(["apply", str(world["base"]), str(out), "-o", str(merged)]) == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(merged)
    assert model.config.id2label == {0: "cat", 1: "dog"}
    baked = evaluate(merged, [], objective="sequence-classification", data=dev)
    assert baked.metrics["accuracy"] == pytest.approx(summary["held_out_accuracy"]["trained"])


def test_retrain_with_a_task_objective_on_a_language_sft(world, tmp_path, capsys):
    first = tmp_path / "task.sft"
    assert run_main(["train", str(world["base"]), "--objective", "token-classification", "--data",
                     str(world["train"]), "-o", str(first), *FAST, "--quiet"]) == 0
    out = tmp_path / "again.sft"
    summary = cli_json(capsys, "retrain", world["base"], first, "--objective", "token-classification", "--data",
                       world["train"], "--eval-data", world["dev"], "--on", world["src"], "-o", out, "--steps", 3,
                       "--lr", "5e-3", "--batch-size", 8, "--device", "cpu", "--json")
    assert summary["command"] == "retrain" and summary["labels"] == LABELS
    retrained, source = SparseDiff.load(out), SparseDiff.load(first)
    assert retrained.meta.origin["method"] == "retrain" and retrained.meta.origin["on"][0]["diff"] == "src.sft"
    assert retrained.meta.config_patch["id2label"] == source.meta.config_patch["id2label"]
    for name, entry in retrained.entries.items():
        if retrained.info(name).kind == "sparse":
            assert set(entry.indices.tolist()) <= set(source.entries[name].indices.tolist())
    # a language SFT as the mask: its MLM head is no part of the task model, said on stderr
    capsys.readouterr()
    assert run_main(["retrain", str(world["base"]), str(world["src"]), "--objective", "token-classification",
                     "--data", str(world["train"]), "--eval-data", str(world["dev"]), "--on", str(world["tgt"]),
                     "-o", str(tmp_path / "from-lang.sft"), "--steps", 2, "--batch-size", 8, "--device", "cpu"]) == 0
    err = capsys.readouterr().err  # the summary is on stderr without --json
    assert f"trained on top of {world['tgt']} (not included in the result)" in err
    assert "held-out accuracy: " in err and "(base) -> " in err
    assert f"{world['tgt']}: trained on top of without its dense entries cls.predictions.*" in err
    assert "retraining without its dense entries cls.predictions.* (3 tensors) (dense entries are not" in err, err
    assert "lacks: pooler.dense.* (2 tensors)" in err, err


@pytest.mark.parametrize("args, code, said", [
    (["--objective", "token-classification", "--text", "x.txt"], 2, "--text is for --objective mlm/clm"),
    (["--objective", "token-classification"], 2, "needs labelled data"),
    (["--objective", "mlm", "--data", "x.conllu"], 2, "--data is for the task objectives"),
    (["--objective", "mlm"], 2, "needs a text corpus"),
])
def test_cli_refuses_data_options_that_do_not_go_with_the_objective(world, tmp_path, capsys, args, code, said):
    capsys.readouterr()
    assert run_main(["train", str(world["base"]), *args, "-k", "10", "-o", str(tmp_path / "x.sft")]) == code
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1 and not (tmp_path / "x.sft").exists()


def test_cli_malformed_data_is_one_line_with_file_and_line(world, tmp_path, capsys):
    bad = tmp_path / "bad.conllu"
    bad.write_text("1\tthe\tthe\tDET\t_\t_\t0\tdep\t_\t_\n2\tcat\tcat\n", encoding="utf-8")
    capsys.readouterr()
    for command in (["train", str(world["base"]), "-k", "10"], ["retrain", str(world["base"]), str(world["src"])]):
        code = run_main([*command, "--objective", "token-classification", "--data", str(bad), "--on", str(world["src"]),
                         "-o", str(tmp_path / "x.sft"), "--device", "cpu"])
        err = capsys.readouterr().err.strip()
        assert code == 3 and f"{bad}:2:" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.sft").exists()
