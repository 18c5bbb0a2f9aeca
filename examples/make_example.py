"""Build the shipped example: a tiny BERT base, a language diff and a task diff, made as a user would.

Deterministic (fixed seeds, single thread) and offline. Writes under OUT (default examples/out):

    base/       a bare BertModel (save_pretrained) and its word-level tokenizer
    lang.sft    language diff: masked-LM fine-tune of the base, top 20% of encoder changes as
                sparse entries plus the MLM head (which a bare base lacks) as dense entries
    task.sft    task diff: token-classification fine-tune (tag city names) trained with the
                language diff applied in memory, then taken off; top 20% sparse plus
                the classifier as dense entries and a config patch so the head loads
    work/       the full fine-tunes the diffs were made from

Each diff is the first phase of LT-SFT (fine-tune fully, keep the top-k changes); the second,
retraining exactly those entries, is `sftdiff retrain`'s job and is skipped here to stay fast.
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from sftdiff.inplace import apply_to_model, revert_from_model  # noqa: E402
from sftdiff.checkpoint import Checkpoint  # noqa: E402

SEED = 1234
CITIES = ["paris", "london", "rome", "berlin", "madrid", "vienna", "lisbon", "oslo"]
PEOPLE = ["anna", "ben", "carla", "david", "eva", "farid", "gina", "hugo"]
VERBS = ["visited", "left", "loves", "saw", "remembers", "painted", "reached", "described"]
FILLER = ["the", "old", "city", "of", "in", "spring", "again", "quietly", "and", "then", "with", "friends"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + CITIES + PEOPLE + VERBS + FILLER
LABELS = ["O", "CITY"]
DENSITY = 0.20


def sentences(rng: np.random.Generator, count: int) -> list[list[str]]:
    """`<person> <verb> [the old city of] <city> [filler...]`: cities are what the task tags."""
    out = []
    for _ in range(count):
        words = [rng.choice(PEOPLE), rng.choice(VERBS)]
        if rng.random() < 0.5:
            words += ["the", "old", "city", "of"]
        words.append(rng.choice(CITIES))
        words += list(rng.choice(FILLER, size=int(rng.integers(0, 3))))
        out.append([str(w) for w in words])
    return out


def make_tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def make_base(folder: Path, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    torch.manual_seed(SEED)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def encode(tokenizer: transformers.PreTrainedTokenizerBase, batch: list[list[str]]) -> dict[str, torch.Tensor]:
    return tokenizer([" ".join(words) for words in batch], padding=True, return_tensors="pt")


def train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def mlm_batches(tokenizer, rng: np.random.Generator) -> list[dict[str, torch.Tensor]]:
    batches = []
    for _ in range(8):
        enc = encode(tokenizer, sentences(rng, 16))
        ids = enc["input_ids"]
        maskable = (ids >= len(SPECIAL))
        chosen = maskable & torch.from_numpy(rng.random(ids.shape) < 0.2)
        enc["labels"] = torch.where(chosen, ids, torch.full_like(ids, -100))
        enc["input_ids"] = torch.where(chosen, torch.full_like(ids, VOCAB.index("[MASK]")), ids)
        batches.append(enc)
    return batches


def tagging_batches(tokenizer, rng: np.random.Generator) -> list[dict[str, torch.Tensor]]:
    city_ids = torch.tensor([VOCAB.index(c) for c in CITIES])
    batches = []
    for _ in range(8):
        enc = encode(tokenizer, sentences(rng, 16))
        ids = enc["input_ids"]
        labels = torch.isin(ids, city_ids).long()
        enc["labels"] = torch.where(ids < len(SPECIAL), torch.full_like(ids, -100), labels)
        batches.append(enc)
    return batches


def make_diff(base: Path, finetuned: Path, dense: list[str], user: dict[str, str]):
    """The top DENSITY fraction of changes as sparse entries, `dense` parameters as dense ones."""
    from sftdiff.create import CreateWarning, create_diff

    with warnings.catch_warnings():
        # The token classifier has no pooler: "base parameters missing from the fine-tune" is expected.
        warnings.simplefilter("ignore", CreateWarning)
        return create_diff(str(base), str(finetuned), density=DENSITY, dense=dense, user=user)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for stale in ("base", "work"):
        shutil.rmtree(out / stale, ignore_errors=True)
    (out / "work").mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    make_base(out / "base", tokenizer)
    rng = np.random.default_rng(SEED)

    torch.manual_seed(SEED + 1)
    mlm = transformers.BertForMaskedLM.from_pretrained(out / "base")
    train(mlm, mlm_batches(tokenizer, rng), steps=40, lr=3e-3)
    mlm.save_pretrained(out / "work" / "lang-ft")
    head = [n for n in Checkpoint.open(out / "work" / "lang-ft").tensors if n.startswith("cls.")]
    lang = make_diff(out / "base", out / "work" / "lang-ft", head,
                     {"kind": "language", "language": "toy", "description": "MLM on synthetic sentences"})
    lang.save(out / "lang.sft", overwrite=True)

    torch.manual_seed(SEED + 2)
    tagger = transformers.BertForTokenClassification.from_pretrained(
        out / "base", num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)})
    # As in LT-SFT's multi-source training: the task is learned with the language diff applied
    # (its encoder changes; the MLM head stays out), then the language diff is taken off again, so
    # the task diff is relative to the base and composes with any language diff of the same base.
    with_language = apply_to_model(tagger, lang, with_dense=False)
    train(tagger, tagging_batches(tokenizer, rng), steps=200, lr=3e-3)
    revert_from_model(tagger, with_language)
    tagger.save_pretrained(out / "work" / "task-ft")
    task = make_diff(out / "base", out / "work" / "task-ft", ["classifier.weight", "classifier.bias"],
                     {"kind": "task", "task": "city tagging", "description": "tags city names"})
    task.save(out / "task.sft", overwrite=True)
    print(f"wrote {out / 'base'}, {out / 'lang.sft'}, {out / 'task.sft'}")


if __name__ == "__main__":
    main()
