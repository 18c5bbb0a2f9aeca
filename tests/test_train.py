"""Sparse training (attach/detach), LT-SFT, DDP equivalence and the retrain/train commands, on tiny
BERT and Llama models built from configs with fixed seeds and offline word-level tokenizers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sftdiff.diff import DenseEntry, SparseDiff, SparseEntry  # noqa: E402
from sftdiff.errors import UsageError, VerificationError  # noqa: E402
from sftdiff.train import attach, detach, lottery_ticket_sft, train_steps  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORDS = "the a cat dog bird sat ran flew on under over mat rug tree big small red blue .".split()
BERT = dict(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
LLAMA = dict(vocab_size=3 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)


def sentences(n: int, seed: int) -> list[str]:
    """A toy language with structure a model can learn: article, adjective, noun, verb, place."""
    rng = np.random.default_rng(seed)
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    return [f"{pick(['the', 'a'])} {pick(['big', 'small', 'red', 'blue'])} {pick(['cat', 'dog', 'bird'])} "
            f"{pick(['sat', 'ran', 'flew'])} {pick(['on', 'under', 'over'])} the {pick(['mat', 'rug', 'tree'])} ."
            for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("text")
    (d / "train.txt").write_text("\n".join(sentences(200, 0)) + "\n", encoding="utf-8")
    (d / "heldout.txt").write_text("\n".join(sentences(40, 1)) + "\n", encoding="utf-8")
    return d / "train.txt", d / "heldout.txt"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A bare BertModel (no MLM head) with a word-level BERT tokenizer."""
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**BERT)).save_pretrained(d)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(d)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(d)
    return d


def tiny_bert_mlm(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(transformers.BertConfig(**BERT))


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))


def clm_batches(n: int = 4, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, LLAMA["vocab_size"], (4, 16), generator=gen) for _ in range(n)]
    return [{"input_ids": x, "labels": x} for x in ids]


def random_mask(model, per_tensor: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randperm(p.numel(), generator=gen)[:per_tensor].sort().values.numpy()
            for n, p in model.named_parameters() if p.dim() == 2}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


# -- attach / detach


def test_sparse_training_changes_only_the_mask_and_learns():
    model = tiny_llama()
    base = snapshot(model)
    mask = random_mask(model)
    attach(model, mask)
    losses = train_steps(model, clm_batches(), 40, lr=1e-2)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    trained = dict(model.named_parameters())  # names now point at the deltas; read effective weights
    with torch.no_grad():
        for name in mask:
            module_name, attr = name.rsplit(".", 1)
            effective = getattr(model.get_submodule(module_name), attr).reshape(-1)
            outside = np.setdiff1d(np.arange(effective.numel()), mask[name])
            assert torch.equal(effective[outside], base[name].reshape(-1)[outside])  # bit-identical
            assert (effective[mask[name]] != base[name].reshape(-1)[mask[name]]).any()
    assert all("delta" in n for n, p in trained.items() if p.requires_grad)
    diff = detach(model)
    for name, value in model.state_dict().items():  # detach restores the base exactly
        assert torch.equal(value, base[name]), name
    assert set(diff.entries) == set(mask)
    for name, entry in diff.entries.items():
        assert isinstance(entry, SparseEntry) and set(entry.indices) <= set(mask[name])
    assert all(p.requires_grad for p in model.parameters())


def test_optimizer_state_is_the_size_of_k():
    model = tiny_llama()
    mask = random_mask(model, per_tensor=25)
    k = sum(len(i) for i in mask.values())
    attach(model, mask)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == k
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    for batch in clm_batches(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert sum(t.numel() for t in state) == 2 * k  # exp_avg + exp_avg_sq, nothing model-sized
    total = sum(p.numel() for p in model.parameters())
    assert 2 * k < total / 10
    detach(model)


def test_detached_diff_applied_to_the_base_reproduces_the_trained_model():
    from sftdiff.inplace import apply_to_model

    model = tiny_bert_mlm()
    mask = random_mask(model, per_tensor=40)
    mask = {n: i for n, i in mask.items() if n.startswith("bert.")}
    mask = {n.removeprefix("bert."): i for n, i in mask.items()}  # spelled as a bare BertModel base
    attach(model, mask, dense=["cls.*"])
    train_steps(model, [_mlm_batch(s) for s in range(3)], 15, lr=1e-2)
    model.eval()
    probe = _mlm_batch(9)
    with torch.no_grad():
        trained_logits = model(**probe).logits
    diff = detach(model)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # still tied
    assert "encoder.layer.0.attention.self.query.weight" in diff.entries  # base spelling kept
    assert isinstance(diff.entries["cls.predictions.transform.dense.weight"], DenseEntry)
    fresh = tiny_bert_mlm()
    fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(**probe).logits, trained_logits, atol=1e-4)
        apply_to_model(fresh, diff)
        torch.testing.assert_close(fresh(**probe).logits, trained_logits, atol=1e-6, rtol=1e-6)


def _mlm_batch(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, BERT["vocab_size"], (4, 12), generator=gen)
    masked = torch.rand(ids.shape, generator=gen) < 0.3
    return {"input_ids": torch.where(masked, 4, ids), "labels": torch.where(masked, ids, -100)}


def test_keep_trained_bakes_the_deltas_in_and_from_values_resumes():
    model = tiny_llama()
    base = snapshot(model)
    mask = random_mask(model, per_tensor=10)
    attach(model, mask)
    train_steps(model, clm_batches(1), 5, lr=1e-2)
    diff = detach(model, keep_trained=True)
    name = "model.layers.0.mlp.up_proj.weight"
    changed = torch.nonzero((model.state_dict()[name] != base[name]).reshape(-1)).reshape(-1).numpy()
    assert set(changed) == set(diff.entries[name].indices)
    resumed = tiny_llama()
    attach(resumed, diff, from_values=True)
    again = detach(resumed)
    np.testing.assert_array_equal(again.entries[name].values, diff.entries[name].values)


def test_attach_rejects_wrong_names_shapes_and_double_attach():
    model = tiny_llama()
    with pytest.raises(VerificationError, match="no parameter"):
        attach(model, {"model.layers.9.mlp.up_proj.weight": np.array([0])})
    entry = SparseEntry.from_float((3, 3), np.array([0]), np.array([1.0]))
    with pytest.raises(VerificationError, match="shape"):
        attach(model, SparseDiff({"model.layers.0.mlp.up_proj.weight": entry}))
    with pytest.raises(VerificationError, match="outside"):
        attach(model, {"model.layers.0.mlp.up_proj.weight": np.array([10**9])})
    attach(model, {"model.layers.0.mlp.up_proj.weight": np.array([0, 5])})
    with pytest.raises(UsageError, match="already"):
        attach(model, {"model.layers.0.mlp.up_proj.weight": np.array([0])})
    detach(model)
    with pytest.raises(UsageError, match="nothing to detach"):
        detach(model)


# -- LT-SFT


def test_lottery_ticket_sft_selects_the_top_k_of_full_fine_tuning_then_retrains_them():
    k, steps = 300, 15
    batches = clm_batches()
    model = tiny_llama()
    base = snapshot(model)
    diff = lottery_ticket_sft(model, batches, k=k, full_steps=steps, sparse_steps=steps, lr=1e-2,
                              exclude_globs=["*norm*"])
    assert 0 < diff.nnz <= k and diff.meta.origin["method"] == "lt-sft"
    assert not any("norm" in n for n in diff.entries)
    for name, value in model.state_dict().items():
        assert torch.equal(value, base[name])  # the model is left as given
    full_loss, sparse_loss = diff.meta.origin["full_loss"], diff.meta.origin["sparse_loss"]
    assert sparse_loss[1] < sparse_loss[0] and full_loss[1] < full_loss[0]

    # The same full fine-tuning by hand: the diff's indices are among its exact top-k of |Δ|.
    reference = tiny_llama()
    for n, p in reference.named_parameters():
        p.requires_grad_("norm" not in n)
    train_steps(reference, batches, steps, lr=1e-2)
    moved = {n: (p.detach() - base[n]).abs().reshape(-1) for n, p in reference.named_parameters() if "norm" not in n}
    threshold = torch.cat(list(moved.values())).topk(k).values[-1]
    for name, entry in diff.entries.items():
        top = set(torch.nonzero(moved[name] >= threshold).reshape(-1).tolist())
        assert set(entry.indices.tolist()) <= top


def test_lottery_ticket_sft_trains_new_parameters_densely_and_l1_shrinks_deltas(bert_dir):
    batches = [_mlm_batch(s) for s in range(3)]
    kwargs = dict(density=0.01, full_steps=10, sparse_steps=10, lr=1e-2, base=str(bert_dir))
    plain = lottery_ticket_sft(tiny_bert_mlm(), batches, **kwargs)
    dense = {n for n, e in plain.entries.items() if isinstance(e, DenseEntry)}
    assert dense and all(n.startswith("cls.") for n in dense)  # the head the bare base lacks
    assert all(not n.startswith("bert.") for n in plain.entries)  # base spelling
    assert plain.meta.base["fingerprint"].startswith("sfp1:")
    shrunk = lottery_ticket_sft(tiny_bert_mlm(), batches, sparse_l1_reg=50.0, **kwargs)
    assert l1_size(shrunk) < 0.8 * l1_size(plain)


def l1_size(diff: SparseDiff) -> float:
    return sum(np.abs(e.values_f32()).sum() for e in diff.entries.values() if isinstance(e, SparseEntry))


def test_transformers_trainer_trains_only_the_deltas(tmp_path):
    model = tiny_llama()
    base = snapshot(model)
    mask = random_mask(model, per_tensor=20)
    attach(model, mask)
    rows = [{"input_ids": r, "labels": r} for b in clm_batches(2) for r in b["input_ids"]]
    args = transformers.TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                                          save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert sum(t.numel() for t in state) == 2 * sum(len(i) for i in mask.values())
    diff = detach(model)
    assert diff.nnz > 0 and all(torch.equal(v, base[n]) for n, v in model.state_dict().items())


# -- data parallelism


def test_two_process_ddp_gives_the_same_diff_as_one_process(llama_dir, tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(worker), str(llama_dir), str(tmp_path / "one.sft")], check=True, env=env,
                   timeout=300)
    # In its own session, so that on a timeout the launcher and both workers are killed together.
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                            str(worker), str(llama_dir), str(tmp_path / "two.sft")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = two.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(two.pid, signal.SIGKILL)
        _, stderr = two.communicate()
        pytest.fail(f"torchrun did not finish in 300 s: {stderr[-3000:]}")
    assert two.returncode == 0, stderr[-3000:]
    one, two = SparseDiff.load(tmp_path / "one.sft"), SparseDiff.load(tmp_path / "two.sft")
    assert set(one.entries) == set(two.entries) and one.nnz > 0
    for name in one.entries:
        np.testing.assert_array_equal(one.entries[name].indices, two.entries[name].indices)
        # Only the order of float additions differs (all-reduce vs one batch). Values reach 5e-2;
        # observed differences are ~5e-8, so 1e-6 is a tight bound that still allows for that.
        np.testing.assert_allclose(one.entries[name].values_f32(), two.entries[name].values_f32(), atol=1e-6)


# -- CLI


def run_cli(*args: str) -> None:
    from sftdiff.cli import main

    main([str(a) for a in args])


def test_cli_train_writes_an_lt_sft_language_diff(bert_dir, corpus, tmp_path, capsys):
    out = tmp_path / "lang.sft"
    run_cli("train", bert_dir, "--text", corpus[0], "--objective", "mlm", "-k", 500, "-o", out,
            "--full-steps", 8, "--sparse-steps", 8, "--lr", 5e-3, "--batch-size", 4, "--seq-len", 24,
            "--eval-text", corpus[1], "--exclude", "*LayerNorm*", "--device", "cpu", "--quiet", "--json")
    diff = SparseDiff.load(out)
    diff.validate()
    sparse = {n for n in diff.entries if diff.info(n).kind == "sparse"}
    assert sparse and sparse <= set(diff.meta.base["tensors"])  # apply can name a base tensor that differs
    assert diff.meta.base["fingerprint"].startswith("sfp1:")
    origin = diff.meta.origin
    assert origin["method"] == "lt-sft" and origin["objective"] == "mlm" and origin["k"] == 500
    assert origin["seed"] == 0 and origin["full_steps"] == 8 and origin["held_out_loss"] > 0
    assert 0 < diff.nnz <= 500 and not any("LayerNorm" in n and not n.startswith("cls.") for n in diff.entries)
    assert {n for n in diff.entries if diff.info(n).kind == "dense"} >= {"cls.predictions.transform.dense.weight"}
    summary = json.loads(capsys.readouterr().out)
    assert summary["command"] == "train" and summary["nnz"] == diff.nnz and summary["output"] == str(out)
    assert summary["held_out_loss"]["trained"] == origin["held_out_loss"] and summary["held_out_loss"]["base"] > 0
    assert summary["origin"]["schedule"] == "constant" and summary["origin"]["reset_dense"] is False  # the defaults
    with pytest.raises(SystemExit) as exit_info:  # refuses to overwrite without --force
        run_cli("train", bert_dir, "--text", corpus[0], "--objective", "mlm", "-k", 500, "-o", out)
    assert exit_info.value.code == 5 and "--force" in capsys.readouterr().err


def test_cli_retrain_retrains_exactly_the_diffs_entries(llama_dir, corpus, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    mask = random_mask(model, per_tensor=20, seed=3)
    source = SparseDiff({n: SparseEntry.from_float(tuple(model.get_parameter(n).shape), i, np.ones(len(i)))
                         for n, i in mask.items()})
    source.save(tmp_path / "mask.sft")
    out = tmp_path / "retrained.sft"
    run_cli("retrain", llama_dir, tmp_path / "mask.sft", "--text", corpus[0], "--objective", "clm", "-o", out,
            "--steps", 10, "--lr", 1e-2, "--batch-size", 4, "--seq-len", 16, "--seed", 1, "--quiet")
    diff = SparseDiff.load(out)
    diff.validate()
    assert diff.meta.origin["method"] == "retrain" and diff.meta.origin["steps"] == 10
    for name, entry in diff.entries.items():
        assert set(entry.indices.tolist()) <= set(mask[name].tolist())
        assert not np.array_equal(entry.values_f32(), np.ones(entry.nnz))  # retrained from the base, not copied


def test_cli_reports_bad_input_in_one_line(llama_dir, tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("the cat\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("train", llama_dir, "--text", tmp_path / "tiny.txt", "--objective", "clm", "-k", 10,
                "-o", tmp_path / "x.sft", "--seq-len", 64)
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and "fewer than one block" in err and "Traceback" not in err
    assert not (tmp_path / "x.sft").exists()


def test_concentration_warning_names_a_tensor_that_took_most_of_k():
    from sftdiff.cli.train import concentration_warning
    from sftdiff.diff import SparseDiff, SparseEntry

    def entry(n):
        return SparseEntry.from_float((1000,), np.arange(n), np.ones(n, np.float32))

    lopsided = SparseDiff({"embeddings.word_embeddings.weight": entry(950), "encoder.w": entry(50)})
    warning = concentration_warning(lopsided)
    assert warning and "embeddings.word_embeddings.weight holds 95%" in warning and "--exclude" in warning
    assert concentration_warning(SparseDiff({"a": entry(500), "b": entry(500)})) is None
    assert concentration_warning(SparseDiff({})) is None



# -- the paper's procedure, and what LT-SFT exposes (issue 17)


def hand_written_lt_sft(model, batches, *, k, steps, lr, seed, schedule, reset_dense, dense_prefix="cls."):
    """LT-SFT as a plain PyTorch loop in composable-sft's way (dense gradients, masked in phase 2):
    per phase a fresh AdamW, transformers' linear (or constant) schedule and a reseed. Returns the
    weights after phase 1 and after phase 2."""
    params = dict(model.named_parameters())
    initial = {n: p.detach().clone() for n, p in params.items()}
    sparse = [n for n in params if not n.startswith(dense_prefix)]

    def phase(masks):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
        decay = (lambda s: max(0.0, (steps - s) / steps)) if schedule == "linear" else (lambda s: 1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
        model.train()
        for step in range(steps):
            model(**batches[step % len(batches)]).loss.backward()
            for name, mask in (masks or {}).items():
                params[name].grad *= mask  # zero gradient and zero Adam state: the value stays put
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        return {n: p.detach().clone() for n, p in params.items()}

    after_full = phase(None)
    moved = torch.cat([(after_full[n] - initial[n]).abs().reshape(-1) for n in sparse])
    threshold = moved.topk(k).values[-1]
    masks = {n: ((after_full[n] - initial[n]).abs() >= threshold).float() for n in sparse}
    with torch.no_grad():
        for name, p in params.items():
            if name in sparse or reset_dense:
                p.copy_(initial[name])
    return after_full, phase(masks)


@pytest.mark.parametrize("schedule,reset_dense", [("linear", True), ("constant", False)])
def test_lottery_ticket_sft_reproduces_a_hand_written_two_phase_loop(bert_dir, schedule, reset_dense):
    def model():  # with dropout, so that the per-phase reseed matters
        torch.manual_seed(5)  # the new MLM head
        return transformers.BertForMaskedLM.from_pretrained(bert_dir, hidden_dropout_prob=0.1)

    batches = [_mlm_batch(s) for s in range(3)]
    k, steps, lr, seed = 400, 8, 5e-3, 11
    reference_full, reference = hand_written_lt_sft(model(), batches, k=k, steps=steps, lr=lr, seed=seed,
                                                    schedule=schedule, reset_dense=reset_dense)
    ours, seen = model(), {}
    diff = lottery_ticket_sft(ours, batches, k=k, full_steps=steps, sparse_steps=steps, lr=lr, schedule=schedule,
                              reset_dense=reset_dense, seed=seed, base=str(bert_dir), keep_trained=True,
                              after_full=lambda m: seen.update({n: p.detach().clone() for n, p in m.named_parameters()}))
    assert set(seen) == set(reference_full)
    for name, value in seen.items():  # the phase-1 model, exposed through the callback
        torch.testing.assert_close(value, reference_full[name], atol=1e-6, rtol=1e-5)
    for name, value in dict(ours.named_parameters()).items():  # the final model: base + diff
        torch.testing.assert_close(value, reference[name], atol=2e-6, rtol=1e-5, msg=name)
    dense = {n for n, e in diff.entries.items() if isinstance(e, DenseEntry)}
    assert dense and all(n.startswith("cls.") for n in dense) and 0 < diff.nnz <= k
    origin = diff.meta.origin
    assert (origin["schedule"], origin["reset_dense"], origin["seed"]) == (schedule, reset_dense, seed)
    assert origin["method"] == "lt-sft" and origin["k"] == k


def test_reset_dense_decides_where_the_head_starts_phase_two(bert_dir):
    """reset_dense=False: the head enters phase 2 as phase 1 left it; True: as it was at the start."""
    batches = [_mlm_batch(s) for s in range(2)]
    heads = {}

    def run(reset_dense):
        torch.manual_seed(5)
        model = transformers.BertForMaskedLM.from_pretrained(bert_dir)
        start = model.cls.predictions.transform.dense.weight.detach().clone()
        heads[reset_dense] = []

        def watch(m):
            heads[reset_dense].append(m.cls.predictions.transform.dense.weight.detach().clone())

        lottery_ticket_sft(model, batches, k=100, full_steps=4, sparse_steps=0, lr=1e-2, reset_dense=reset_dense,
                           base=str(bert_dir), after_full=watch, keep_trained=True)
        return start, model.cls.predictions.transform.dense.weight.detach().clone()

    start, after = run(True)
    assert torch.equal(after, start)  # zero sparse steps: the reset head is what comes out
    start, after = run(False)
    assert not torch.equal(after, start) and torch.equal(after, heads[False][0])


def test_lm_batches_restart_replays_the_first_pass(bert_dir, corpus):
    from sftdiff.text import lm_batches, read_blocks

    tokenizer = transformers.AutoTokenizer.from_pretrained(bert_dir)
    batches = lm_batches(read_blocks(str(corpus[0]), tokenizer, 16, "mlm"), 4, "mlm", tokenizer, seed=2)
    first, second = list(batches), list(batches)
    assert not torch.equal(first[0]["input_ids"], second[0]["input_ids"])  # each pass reshuffles and remasks
    batches.restart()
    for a, b in zip(first, list(batches)):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_detach_records_what_was_trained_not_the_attached_diffs_origin():
    from sftdiff.diff import DiffMeta

    model = tiny_llama()
    mask = random_mask(model, per_tensor=10)
    source = SparseDiff({n: SparseEntry.from_float(tuple(model.get_parameter(n).shape), i, np.ones(len(i)))
                         for n, i in mask.items()},
                        DiffMeta(base={"fingerprint": "sfp1:" + "0" * 32}, origin={"method": "topk", "k": 7},
                                 user={"language": "sw"}))
    attach(model, source)
    train_steps(model, clm_batches(), 6, lr=1e-2, schedule="constant", warmup_steps=2)
    diff = detach(model, origin={"seed": 4, "corpus": "x.txt"})
    origin = diff.meta.origin
    assert origin["method"] == "sparse-training" and origin["mask_from"] == "topk"
    assert origin["k"] == sum(len(i) for i in mask.values()) and origin["nnz"] == diff.nnz
    assert (origin["steps"], origin["lr"], origin["schedule"], origin["warmup_steps"]) == (6, 1e-2, "constant", 2)
    assert origin["seed"] == 4 and origin["corpus"] == "x.txt" and len(origin["loss"]) == 2
    assert diff.meta.user == {"language": "sw"} and diff.meta.base == source.meta.base  # kept: still true


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_detach_drops_values_that_do_not_change_the_weight(dtype):
    from sftdiff.inplace import apply_to_model

    model = tiny_llama().to(dtype)
    name = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():  # ulp at 1000: 6.1e-5 in float32, 4 in bfloat16; at 0.02: 1.9e-9 and 1.2e-4
        model.get_parameter(name).view(-1)[:8] = torch.tensor([1000.0] * 4 + [0.02] * 4)
    base = snapshot(model)
    attach(model, {name: np.arange(8)})
    delta = getattr(model, "_sftdiff_attached").sparse[name][0].delta
    with torch.no_grad():  # 1e-5 vanishes on 1000 in either dtype, on 0.02 in bfloat16; 0.5 on 1000 in bfloat16
        delta.copy_(torch.tensor([1e-5, 0.5, 3.0, 0.0, 1e-5, 0.5, 0.25, 0.0]))
        expected = model.get_submodule(name.rsplit(".", 1)[0]).weight.detach().clone()  # the trained weight
    diff = detach(model, keep_trained=True)
    entry = diff.entries[name]
    changed = sorted(set(torch.nonzero((expected != base[name]).reshape(-1)).reshape(-1).tolist()))
    assert entry.indices.tolist() == changed
    dropped = 1 if dtype == torch.float32 else 3
    assert diff.meta.origin["unchanged_dropped"] == dropped and len(changed) == 6 - dropped
    assert torch.equal(model.get_parameter(name), expected)  # keep_trained bakes exactly what trained
    fresh = tiny_llama().to(dtype)
    with torch.no_grad():
        fresh.get_parameter(name).view(-1)[:8] = torch.tensor([1000.0] * 4 + [0.02] * 4)
    apply_to_model(fresh, diff)
    assert torch.equal(fresh.get_parameter(name), expected)  # apply reproduces the trained weight


def test_extra_modules_train_a_head_outside_the_model_as_dense_entries():
    from sftdiff.train import trainable_parameters

    model = tiny_llama()
    head = torch.nn.Linear(LLAMA["hidden_size"], 3)
    head_start = {n: p.detach().clone() for n, p in head.named_parameters()}
    mask = random_mask(model, per_tensor=10)
    attach(model, mask, extra_modules={"classifier": head})
    params = trainable_parameters(model)
    assert any(p is head.weight for p in params) and any(p is head.bias for p in params)
    assert sum(p.numel() for p in params) == sum(len(i) for i in mask.values()) + head.weight.numel() + 3

    def loss_fn(m, batch):
        hidden = m.model(input_ids=batch["input_ids"]).last_hidden_state[:, 0]
        return torch.nn.functional.cross_entropy(head(hidden), batch["input_ids"][:, 0] % 3)

    losses = train_steps(model, clm_batches(), 20, lr=1e-2, loss_fn=loss_fn)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    trained_head = head.weight.detach().clone()
    diff = detach(model)
    assert isinstance(diff.entries["classifier.weight"], DenseEntry) and diff.info("classifier.weight").base_dtype is None
    np.testing.assert_array_equal(diff.entries["classifier.weight"].values_f32(), trained_head.numpy())
    assert all(torch.equal(p, head_start[n]) for n, p in head.named_parameters())  # restored, like the model
    assert any(isinstance(e, SparseEntry) for e in diff.entries.values())

    # The same through lottery_ticket_sft: the head is trained in both phases and stored densely.
    result = lottery_ticket_sft(tiny_llama(), clm_batches(), k=50, full_steps=3, sparse_steps=3, lr=1e-2,
                                extra_modules={"classifier": head}, loss_fn=loss_fn)
    assert {"classifier.weight", "classifier.bias"} <= set(result.meta.origin["dense"])
    assert isinstance(result.entries["classifier.bias"], DenseEntry)


def test_training_progress_is_plain_lines_when_stderr_is_not_a_terminal(capsys):
    model = tiny_llama()
    attach(model, random_mask(model, per_tensor=5))
    train_steps(model, clm_batches(), 12, lr=1e-2, desc="sparse", progress=True)
    detach(model)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and "\x1b" not in err
    assert lines[0].startswith("sftdiff: sparse step 1/12 loss ") and lines[-1].startswith("sftdiff: sparse step 12/12")
    assert all(" loss " in line and " lr " in line for line in lines)
    train_steps(tiny_llama(), clm_batches(), 3, lr=1e-2)
    assert capsys.readouterr().err == ""  # off unless asked


def test_lr_factor_is_transformers_linear_and_constant_schedule():
    from sftdiff.train import lr_factor

    linear = transformers.get_linear_schedule_with_warmup
    constant = transformers.get_constant_schedule_with_warmup
    for make, schedule in ((linear, "linear"), (constant, "constant")):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(optimizer, 3, 10) if schedule == "linear" else make(optimizer, 3)
        for step in range(10):
            assert lr_factor(step, 10, schedule, 3) == pytest.approx(optimizer.param_groups[0]["lr"]), (schedule, step)
            optimizer.step()
            sched.step()
    with pytest.raises(UsageError, match="schedule"):
        train_steps(tiny_llama(), clm_batches(), 1, lr=1e-2, schedule="cosine")


def test_create_diff_from_in_memory_tensors_records_the_checkpoints_base(bert_dir, tmp_path):
    from sftdiff.checkpoint import Checkpoint
    from sftdiff.create import create_diff
    from sftdiff.overlap import overlap
    from sftdiff.verify import verify_against_base

    torch.manual_seed(0)
    model = transformers.BertForMaskedLM.from_pretrained(bert_dir)  # bert.-prefixed names, plus a new head
    start = {n: p.detach().clone() for n, p in model.named_parameters() if ".layer." in n}  # selectable only
    tuned = {n: v + 0.01 * torch.randn_like(v) for n, v in start.items()}
    diff = create_diff(start, tuned, k=300, base_checkpoint=str(bert_dir))
    assert all(n.startswith("encoder.layer.") for n in diff.entries)  # the checkpoint's spelling
    made_from_checkpoint = create_diff(str(bert_dir), str(save_state(bert_dir, tuned, tmp_path)), k=300)
    assert diff.meta.base["fingerprint"] == made_from_checkpoint.meta.base["fingerprint"]
    assert diff.meta.base["tensors"] == {n: made_from_checkpoint.meta.base["tensors"][n] for n in diff.entries}
    verify_against_base(diff, Checkpoint.open(bert_dir))  # as apply checks it
    assert overlap(diff, made_from_checkpoint).total.shared == diff.nnz == 300  # not "made from different bases"
    other = dict(start)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    other[query] = start[query] + 1.0  # not the checkpoint's tensor (and so it holds most of k)
    with pytest.raises(VerificationError, match="not the base tensor"):
        create_diff(other, tuned, k=300, base_checkpoint=str(bert_dir))


def save_state(bert_dir: Path, tuned: dict, tmp_path: Path) -> Path:
    """bert_dir's bare model with the `bert.`-prefixed `tuned` tensors loaded, saved to tmp_path/ft."""
    model = transformers.BertModel.from_pretrained(bert_dir)
    with torch.no_grad():
        for name, value in tuned.items():
            model.get_parameter(name.removeprefix("bert.")).copy_(value)
    model.save_pretrained(tmp_path / "ft")
    return tmp_path / "ft"


# -- the train/retrain commands as a new user meets them (issue 12)


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory, llama_dir) -> Path:
    """Same architecture and tokenizer as llama_dir, other weights."""
    import shutil

    d = tmp_path_factory.mktemp("llama_other")
    tiny_llama(seed=1).save_pretrained(d)
    for f in Path(llama_dir).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, d / f.name)
    return d


def cli_exit(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    return exit_info.value.code


def test_cli_train_fits_the_block_to_the_model_and_reports_plainly(bert_dir, corpus, tmp_path, capsys):
    out = tmp_path / "lang.sft"
    run_cli("train", bert_dir, "--text", corpus[0], "--objective", "mlm", "-k", 200, "-o", out, "--full-steps", 2,
            "--sparse-steps", 2, "--batch-size", 2, "--device", "cpu", "--json")  # default --seq-len 256 > 64
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("--seq-len 256 is longer than the model's 64 positions; using 64") == 1
    assert "LOAD REPORT" not in err and "corrupted" not in err and "\x1b" not in err and "\r" not in err
    assert "new in the mlm model: cls.predictions.* (5 tensors)" in err and "unused by it: pooler.dense.*" in err
    assert "sftdiff: full step 2/2 loss" in err and "sftdiff: sparse step 2/2 loss" in err
    summary = json.loads(captured.out)
    assert summary["command"] == "train" and summary["origin"]["seq_len"] == 64
    assert SparseDiff.load(out).meta.origin["seq_len"] == 64


def test_cli_refuses_an_objective_the_architecture_cannot_train(bert_dir, llama_dir, corpus, tmp_path, capsys):
    for base, objective, said in ((bert_dir, "clm", "encoder"), (llama_dir, "mlm", "decoder-only")):
        code = cli_exit("train", base, "--text", corpus[0], "--objective", objective, "-k", 10, "-o", tmp_path / "x.sft")
        err = capsys.readouterr().err.strip()
        assert code == 2 and said in err and len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"--objective {objective}" in err
    assert not (tmp_path / "x.sft").exists()


def test_cli_missing_text_says_no_such_file(llama_dir, tmp_path, capsys):
    for option in ("--text", "--eval-text"):
        extra = ["--text", tmp_path / "nope.txt"] if option == "--text" else ["--text", __file__, option,
                                                                             tmp_path / "nope.txt"]
        code = cli_exit("train", llama_dir, *extra, "--objective", "clm", "-k", 10, "-o", tmp_path / "x.sft")
        err = capsys.readouterr().err.strip()
        assert code == 3 and "nope.txt: no such file" in err and "FileNotFoundError" not in err
        assert len(err.splitlines()) == 1


def test_cli_retrain_verifies_the_base_as_apply_does(llama_dir, other_llama_dir, corpus, tmp_path, capsys):
    from sftdiff.checkpoint import Checkpoint
    from sftdiff.fingerprint import base_record

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    mask = random_mask(model, per_tensor=10, seed=3)
    source = SparseDiff({n: SparseEntry.from_float(tuple(model.get_parameter(n).shape), i, np.ones(len(i)))
                         for n, i in mask.items()})
    source.meta.base = base_record(Checkpoint.open(llama_dir), source.entries)
    source.save(tmp_path / "made-for-llama.sft")
    capsys.readouterr()  # the test's own model loading
    args = [tmp_path / "made-for-llama.sft", "--text", corpus[0], "--objective", "clm", "--steps", 1,
            "--batch-size", 2, "--device", "cpu"]
    code = cli_exit("retrain", other_llama_dir, *args, "-o", tmp_path / "x.sft")
    err = capsys.readouterr().err.strip()
    assert code == 4 and "differs from the one this diff was made from" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.sft").exists()

    run_cli("retrain", llama_dir, *args, "-o", tmp_path / "ok.sft", "--json")  # default --seq-len 256 > 64
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["command"] == "retrain" and summary["origin"]["method"] == "retrain"
    assert summary["origin"]["seq_len"] == 64 and summary["origin"]["steps"] == 1
    assert "using 64" in captured.err
    retrained = SparseDiff.load(tmp_path / "ok.sft")
    assert retrained.meta.base["fingerprint"] == source.meta.base["fingerprint"]


# -- `on=` diffs are verified against `base=` in the Python API too (issue 13 item 2)


def on_diff(base_dir: Path, path: Path | None, seed: int = 5, record: bool = True) -> SparseDiff:
    """A language-SFT-like diff over some of base_dir's weights, recording its digests as `create` does
    (`record=False`: no base record at all), saved to `path` when given (then loaded back)."""
    from sftdiff.checkpoint import Checkpoint
    from sftdiff.fingerprint import base_record

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    mask = random_mask(model, per_tensor=10, seed=seed)
    diff = SparseDiff({n: SparseEntry.from_float(tuple(model.get_parameter(n).shape), i, np.full(len(i), 0.01))
                       for n, i in mask.items()})
    if record:
        diff.meta.base = base_record(Checkpoint.open(base_dir), diff.entries)
    if path is None:
        return diff
    diff.save(path)
    return SparseDiff.load(path)


def counting_loss(calls: list):
    def loss_fn(model, batch):
        calls.append(1)
        return model(**batch).loss
    return loss_fn


def test_api_on_diffs_are_verified_against_the_given_base_before_training(llama_dir, other_llama_dir, tmp_path):
    from sftdiff.train import Sources, sparse_retrain

    made_for_llama = on_diff(llama_dir, tmp_path / "lang-llama.sft")
    model = transformers.AutoModelForCausalLM.from_pretrained(other_llama_dir)
    before = snapshot(model)
    calls: list = []
    kwargs = dict(k=20, full_steps=2, sparse_steps=2, lr=1e-2, loss_fn=counting_loss(calls))
    with pytest.raises(VerificationError) as info:
        lottery_ticket_sft(model, clm_batches(), base=str(other_llama_dir), on=[made_for_llama], **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "lang-llama.sft"))
    assert "differs from the one this diff was made from" in message and "verify=False" in message
    assert calls == [] and all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # refused first

    from sftdiff.checkpoint import Checkpoint

    in_memory = on_diff(llama_dir, None)  # no path: named by its place in `on`
    with pytest.raises(VerificationError, match=r"^on\[1\]: base tensor"):
        lottery_ticket_sft(model, clm_batches(), base=Checkpoint.open(other_llama_dir),
                           on=[on_diff(other_llama_dir, None), in_memory], **kwargs)
    with pytest.raises(VerificationError, match="lang-llama.sft"):  # a multi-source run's diffs too
        lottery_ticket_sft(model, Sources([(clm_batches(), [made_for_llama])]), base=other_llama_dir, **kwargs)
    with pytest.raises(VerificationError, match="lang-llama.sft"):
        sparse_retrain(model, random_mask(model, per_tensor=5), clm_batches(), steps=1, lr=1e-2,
                       base=other_llama_dir, on=[made_for_llama])
    assert calls == [] and not hasattr(model, "_sftdiff_attached")

    # verify=False skips only the digests (as --no-verify); the right base passes
    lottery_ticket_sft(model, clm_batches(), base=other_llama_dir, on=[made_for_llama], verify=False, **kwargs)
    assert calls
    right = lottery_ticket_sft(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), clm_batches(),
                               base=llama_dir, on=[tmp_path / "lang-llama.sft"], **kwargs)  # a path is read too
    assert right.meta.origin["on"][0]["diff"] == "lang-llama.sft"

    # a diff that records no base cannot be checked: said, not refused
    with pytest.warns(UserWarning, match="records no base digests or fingerprint"):
        lottery_ticket_sft(transformers.AutoModelForCausalLM.from_pretrained(llama_dir), clm_batches(),
                           base=llama_dir, on=[on_diff(llama_dir, None, record=False)], **kwargs)


def test_cli_train_on_a_diff_for_another_base_exits_4_and_no_verify_trains(llama_dir, other_llama_dir, corpus,
                                                                           tmp_path, capsys):
    on_diff(llama_dir, tmp_path / "lang-llama.sft")
    args = ["--text", corpus[0], "--objective", "clm", "-k", 20, "--full-steps", 1, "--sparse-steps", 1,
            "--batch-size", 2, "--seq-len", 16, "--device", "cpu", "--on", tmp_path / "lang-llama.sft", "-q"]
    capsys.readouterr()
    assert cli_exit("train", other_llama_dir, *args, "-o", tmp_path / "x.sft") == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lang-llama.sft" in err and "differs" in err
    assert not (tmp_path / "x.sft").exists()
    run_cli("train", other_llama_dir, *args, "--no-verify", "-o", tmp_path / "y.sft")  # the API does not re-check
    assert SparseDiff.load(tmp_path / "y.sft").meta.origin["on"][0]["diff"] == "lang-llama.sft"


# -- train and eval mode of the model and of extra_modules


class ModeSpy(torch.nn.Module):
    """A head with dropout that records the mode of itself and its dropout at each call."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.1)
        self.linear = torch.nn.Linear(LLAMA["hidden_size"], 3)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, hidden):
        self.seen.append((self.training, self.drop.training))
        return self.linear(self.drop(hidden))


def head_loss(head: ModeSpy, fail_at: int | None = None):
    def loss_fn(m, batch):
        if fail_at is not None and len(head.seen) == fail_at:
            raise RuntimeError("a step fails")
        hidden = m.model(input_ids=batch["input_ids"]).last_hidden_state[:, 0]
        return torch.nn.functional.cross_entropy(head(hidden), batch["input_ids"][:, 0] % 3)
    return loss_fn


def test_train_steps_puts_extra_modules_in_train_mode_and_restores_every_modules_mode():
    from sftdiff.train import evaluate

    model, head = tiny_llama().eval(), ModeSpy().eval()
    model.model.layers[0].train()  # a caller's own mixed modes come back as they were
    modes = {n: m.training for n, m in [*model.named_modules(), *(("head." + n, m) for n, m in head.named_modules())]}
    attach(model, random_mask(model, per_tensor=5), extra_modules={"classifier": head})
    current = lambda: {n: m.training for n, m in [*model.named_modules(),  # noqa: E731
                                                  *(("head." + n, m) for n, m in head.named_modules())]
                       if "parametrizations" not in n}  # the deltas attach added

    train_steps(model, clm_batches(), 3, lr=1e-2, loss_fn=head_loss(head))
    assert head.seen == [(True, True)] * 3  # the head trained with its dropout on
    assert current() == modes
    head.seen.clear()
    with pytest.raises(RuntimeError, match="a step fails"):
        train_steps(model, clm_batches(), 3, lr=1e-2, loss_fn=head_loss(head, fail_at=1))
    assert current() == modes  # restored on the error too

    head.train()
    head.seen.clear()
    evaluate(model, clm_batches(2), loss_fn=head_loss(head))
    assert head.seen == [(False, False)] * 2 and head.training and head.drop.training  # eval, then back
    with pytest.raises(RuntimeError, match="a step fails"):
        evaluate(model, clm_batches(2), loss_fn=head_loss(head, fail_at=3))
    assert head.training and head.drop.training and not model.training
    detach(model)

    # without attach, extra_modules= says which modules the loss uses
    head.eval()
    head.seen.clear()
    train_steps(model, clm_batches(), 2, lr=1e-2, loss_fn=head_loss(head), extra_modules={"classifier": head},
                parameters=list(head.parameters()))
    assert head.seen == [(True, True)] * 2 and not head.training and not model.training


def test_lottery_ticket_sft_trains_extra_modules_in_train_mode_in_both_phases():
    model, head = tiny_llama().eval(), ModeSpy().eval()
    lottery_ticket_sft(model, clm_batches(), k=30, full_steps=2, sparse_steps=2, lr=1e-2,
                       extra_modules={"classifier": head}, loss_fn=head_loss(head))
    assert head.seen == [(True, True)] * 4
    assert not head.training and not head.drop.training and not model.training
