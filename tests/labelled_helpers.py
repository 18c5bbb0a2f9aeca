"""A tiny BERT with a tiny WordPiece vocabulary, and a toy tagged language, for the labelled-data
and evaluate tests. Some words split into several subwords ("walking" -> walk ##ing), so the
first-subword rule and window splitting are exercised."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LEXICON = {  # word -> tag
    "the": "DET", "a": "DET", "big": "ADJ", "small": "ADJ", "red": "ADJ", "cat": "NOUN", "dog": "NOUN",
    "bird": "NOUN", "mat": "NOUN", "tree": "NOUN", "cats": "NOUN", "dogs": "NOUN", "sat": "VERB", "ran": "VERB",
    "walked": "VERB", "walking": "VERB", "jumped": "VERB", "on": "ADP", "under": "ADP", ".": "PUNCT",
}
VOCAB = SPECIALS + ["the", "a", "big", "small", "red", "cat", "dog", "bird", "mat", "tree", "sat", "ran", "walk",
                    "jump", "on", "under", ".", "##s", "##ed", "##ing"]
BERT = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)


def bert_folder(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A bare BertModel (no head) with the WordPiece tokenizer, as a model folder."""
    torch.manual_seed(seed)
    transformers.BertModel(transformers.BertConfig(**BERT)).to(dtype).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def tagged_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """DET ADJ NOUN VERB ADP DET NOUN PUNCT, words drawn at random."""
    rng = np.random.default_rng(seed)
    by_tag: dict[str, list[str]] = {}
    for word, tag in LEXICON.items():
        by_tag.setdefault(tag, []).append(word)
    pattern = ["DET", "ADJ", "NOUN", "VERB", "ADP", "DET", "NOUN", "PUNCT"]
    return [[(by_tag[t][rng.integers(len(by_tag[t]))], t) for t in pattern] for _ in range(n)]


def write_conllu(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    out = []
    for s, words in enumerate(sentences):
        out += [f"# sent_id = {s + 1}", "# text = " + " ".join(w for w, _ in words)]
        out += [f"{i}\t{w}\t{w}\t{t}\tX{t}\t_\t0\tdep\t_\t_" for i, (w, t) in enumerate(words, 1)]
        out.append("")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def write_sequences(path: Path, n: int, seed: int) -> Path:
    """JSONL texts labelled by whether a cat or a dog is in them (a pair gives a second text)."""
    import json

    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        animal = ["cat", "dog"][rng.integers(2)]
        adjective = ["big", "small", "red"][rng.integers(3)]
        lines.append(json.dumps({"text": f"the {adjective} {animal} sat on the mat .", "label": animal}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
