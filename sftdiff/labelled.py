"""Labelled data for task objectives (token and sequence classification): reading files, the label
set and the head's config, encoding with a tokenizer, and seeded batches.

Token classification reads CoNLL-U (FORM + a label column, UPOS by default), two-column CoNLL/IOB2
(`token label`) or JSONL `{"tokens": [...], "tags": [...]}`; sequence classification reads JSONL
`{"text": ..., "label": ..., "text_pair": ...}` or CSV/TSV with a header. Every problem in a file is
a `FormatError` naming the file and line (`FILE:LINE: problem`).

Words are fed to the tokenizer pre-split; a word's label goes on its first subword (the others get
-100, ignored by the loss), and a sentence longer than the model fits is split into several windows
at word boundaries, so every word is labelled exactly once.
"""

from __future__ import annotations

import csv
import io
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import FormatError, OutputError, UsageError

TOKEN_CLASSIFICATION = "token-classification"
SEQUENCE_CLASSIFICATION = "sequence-classification"
TASK_OBJECTIVES = (TOKEN_CLASSIFICATION, SEQUENCE_CLASSIFICATION)
TOKEN_FORMATS = ("conllu", "conll", "jsonl")
SEQUENCE_FORMATS = ("jsonl", "csv", "tsv")
FORMATS = ("auto",) + tuple(dict.fromkeys(TOKEN_FORMATS + SEQUENCE_FORMATS))
CONLLU_COLUMNS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")
IGNORE = -100  # label of positions the loss skips (transformers' CrossEntropyLoss ignore_index)

_TOKEN_EXTENSIONS = {".conllu": "conllu", ".conll": "conll", ".iob": "conll", ".iob2": "conll", ".bio": "conll",
                     ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
_SEQUENCE_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}


@dataclass(frozen=True)
class TokenExample:
    """One sentence: its words, one label per word, and the file line of each word."""

    words: tuple[str, ...]
    labels: tuple[str, ...]
    lines: tuple[int, ...]


@dataclass(frozen=True)
class TextExample:
    """One text (or text pair) with its label and the file line it starts on."""

    text: str
    label: str
    line: int
    text_pair: str | None = None


@dataclass
class LabelledData:
    """The examples of one file, with where they came from (for messages)."""

    path: str
    objective: str
    format: str
    examples: list[Any]

    def __len__(self) -> int:
        return len(self.examples)

    def label_lines(self) -> Iterator[tuple[str, int]]:
        """Every (label, line) in file order."""
        for ex in self.examples:
            if isinstance(ex, TokenExample):
                yield from zip(ex.labels, ex.lines)
            else:
                yield ex.label, ex.line


# ---------------------------------------------------------------- reading


def _problem(path: str | Path, line: int, problem: str) -> FormatError:
    return FormatError(f"{path}:{line}: {problem}")


def _read_lines(path: str | Path) -> list[str]:
    """The file's lines as text; a byte that is not UTF-8 is an error naming its line."""
    try:
        raw = Path(path).read_bytes()
    except IsADirectoryError:
        raise FormatError(f"{path}: is a folder; give a data file") from None
    except OSError as e:
        raise OutputError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _problem(path, line, f"not UTF-8 (byte 0x{raw[e.start]:02x}); convert the file to UTF-8") from None
    if not text.strip():
        raise FormatError(f"{path}: the file is empty; give a file with labelled examples")
    return text.splitlines()


def _detect(path: str | Path, lines: list[str], extensions: dict[str, str], formats: Sequence[str],
            objective: str) -> str:
    """The format from the extension, else from the first content line."""
    suffix = Path(path).suffix.lower()
    if suffix in extensions:
        return extensions[suffix]
    for n, line in enumerate(lines, 1):
        if not line.strip() or (line.startswith("#") and "conllu" in formats):
            continue
        stripped = line.lstrip()
        if stripped.startswith("{"):
            return "jsonl"
        if "conllu" in formats and line.count("\t") == 9:
            return "conllu"
        if "conll" in formats and len(line.split()) == 2:
            return "conll"
        if "tsv" in formats and "\t" in line:
            return "tsv"
        if "csv" in formats and "," in line:
            return "csv"
        raise _problem(path, n, f"cannot tell the format of this {objective} file from its extension or this "
                                f"line; pass the format ({', '.join(formats)})")
    raise FormatError(f"{path}: the file is empty; give a file with labelled examples")


def read_token_file(path: str | Path, *, format: str = "auto", label_column: str | int | None = None) -> LabelledData:
    """Sentences of words with one label each, from CoNLL-U, two-column CoNLL/IOB2 or JSONL.

    `label_column` picks the CoNLL-U column holding the label: a name (upos, xpos, deprel, ...) or
    its 1-based number (default upos); for JSONL it names the key of the tags (default "tags")."""
    lines = _read_lines(path)
    fmt = _detect(path, lines, _TOKEN_EXTENSIONS, TOKEN_FORMATS, TOKEN_CLASSIFICATION) if format == "auto" else format
    if fmt == "conllu":
        examples = _read_conllu(path, lines, _conllu_column(label_column))
    elif fmt == "conll":
        if label_column is not None:
            raise UsageError("a label column applies to CoNLL-U and JSONL files; a two-column file has its "
                             "labels in the second column")
        examples = _read_conll(path, lines)
    elif fmt == "jsonl":
        examples = _read_token_jsonl(path, lines, str(label_column) if label_column is not None else "tags")
    else:
        raise UsageError(f"unknown format {fmt!r} for token classification; use {', '.join(TOKEN_FORMATS)}")
    if not examples:
        raise FormatError(f"{path}: no labelled sentences in this {fmt} file")
    return LabelledData(str(path), TOKEN_CLASSIFICATION, fmt, examples)


def _conllu_column(label_column: str | int | None) -> int:
    if label_column is None:
        return CONLLU_COLUMNS.index("upos")
    text = str(label_column).strip().lower()
    index = int(text) - 1 if text.isdigit() else (CONLLU_COLUMNS.index(text) if text in CONLLU_COLUMNS else -1)
    if index < 2 or index >= len(CONLLU_COLUMNS):
        raise UsageError(f"label column {label_column!r} is not a CoNLL-U label column; use one of "
                         f"{', '.join(CONLLU_COLUMNS[2:])} or its number 3-10")
    return index


def _read_conllu(path: str | Path, lines: list[str], column: int) -> list[TokenExample]:
    examples: list[TokenExample] = []
    words: list[tuple[str, str, int]] = []
    name = CONLLU_COLUMNS[column].upper()
    for n, line in enumerate(lines + [""], 1):
        if not line.strip():
            if words:
                examples.append(_sentence(words))
                words = []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise _problem(path, n, f"{len(cols)} tab-separated columns; a CoNLL-U word line has 10")
        ident = cols[0]
        if "-" in ident or "." in ident:  # a multiword token's range (1-2) or an empty node (1.1): no word of its own
            continue
        if not ident.isdigit():
            raise _problem(path, n, f"word ID {ident!r} is not a number, a range (1-2) or an empty node (1.1)")
        label = cols[column].strip()
        if label in ("", "_"):
            raise _problem(path, n, f"a label missing: the {name} column of word {cols[1]!r} is {label!r}; "
                                    f"annotate it or pick another label column")
        words.append((cols[1], label, n))
    return examples


def _read_conll(path: str | Path, lines: list[str]) -> list[TokenExample]:
    examples: list[TokenExample] = []
    words: list[tuple[str, str, int]] = []
    for n, line in enumerate(lines + [""], 1):
        fields = line.split()
        if not fields:
            if words:
                examples.append(_sentence(words))
                words = []
            continue
        if fields[0] == "-DOCSTART-":
            continue
        if len(fields) != 2:
            hint = "a label missing" if len(fields) == 1 else f"{len(fields)} columns"
            raise _problem(path, n, f"{hint}; a CoNLL/IOB2 line is 'token label' (2 whitespace-separated "
                                    f"columns), with a blank line between sentences")
        words.append((fields[0], fields[1], n))
    return examples


def _sentence(words: list[tuple[str, str, int]]) -> TokenExample:
    return TokenExample(tuple(w for w, _, _ in words), tuple(lab for _, lab, _ in words), tuple(n for _, _, n in words))


def _json_object(path: str | Path, n: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _problem(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _problem(path, n, f"a JSON {type(obj).__name__}, not an object; each line must be one JSON object")
    return obj


def _label_text(path: str | Path, n: int, value: Any, what: str) -> str:
    """A label as text: strings and integers are labels; null, empty and anything else is an error."""
    if value is None or value == "":
        raise _problem(path, n, f"a label missing ({what} is {json.dumps(value)})")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _problem(path, n, f"{what} is {json.dumps(value)[:40]}; a label must be a string or an integer")
    return str(value)


def _read_token_jsonl(path: str | Path, lines: list[str], tags_key: str) -> list[TokenExample]:
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        obj = _json_object(path, n, line)
        for key in ("tokens", tags_key):
            if key not in obj:
                raise _problem(path, n, f"missing key {key!r}; each line needs \"tokens\" and \"{tags_key}\" lists")
            if not isinstance(obj[key], list):
                raise _problem(path, n, f"{key!r} is not a list")
        tokens, tags = obj["tokens"], obj[tags_key]
        if len(tokens) != len(tags):
            raise _problem(path, n, f"{len(tokens)} tokens but {len(tags)} {tags_key}; give one label per token")
        if not tokens:
            continue
        for i, token in enumerate(tokens):
            if not isinstance(token, str):
                raise _problem(path, n, f"token {i + 1} is {json.dumps(token)[:40]}, not a string")
        labels = tuple(_label_text(path, n, tag, f"the label of token {i + 1}") for i, tag in enumerate(tags))
        examples.append(TokenExample(tuple(tokens), labels, (n,) * len(tokens)))
    return examples


def read_sequence_file(path: str | Path, *, format: str = "auto", text_column: str = "text",
                       label_column: str = "label", pair_column: str = "text_pair") -> LabelledData:
    """Texts (or text pairs) with one label each, from JSONL or CSV/TSV with a header row.

    The pair column is optional; when it is present, every example must have it."""
    lines = _read_lines(path)
    fmt = format
    if fmt == "auto":
        fmt = _detect(path, lines, _SEQUENCE_EXTENSIONS, SEQUENCE_FORMATS, SEQUENCE_CLASSIFICATION)
    if fmt == "jsonl":
        examples = _read_sequence_jsonl(path, lines, text_column, label_column, pair_column)
    elif fmt in ("csv", "tsv"):
        examples = _read_table(path, lines, fmt, text_column, label_column, pair_column)
    else:
        raise UsageError(f"unknown format {fmt!r} for sequence classification; use {', '.join(SEQUENCE_FORMATS)}")
    if not examples:
        raise FormatError(f"{path}: no labelled examples in this {fmt} file")
    paired = [ex.text_pair is not None for ex in examples]
    if any(paired) and not all(paired):
        odd = examples[paired.index(not paired[0])]
        raise _problem(path, odd.line, f"{'has' if odd.text_pair is not None else 'lacks'} a {pair_column!r} while "
                                       f"line {examples[0].line} {'has' if paired[0] else 'does not'}; give pairs "
                                       f"for all examples or for none")
    return LabelledData(str(path), SEQUENCE_CLASSIFICATION, fmt, examples)


def _read_sequence_jsonl(path: str | Path, lines: list[str], text_key: str, label_key: str,
                         pair_key: str) -> list[TextExample]:
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        obj = _json_object(path, n, line)
        for key in (text_key, label_key):
            if key not in obj:
                raise _problem(path, n, f"missing key {key!r}; each line needs \"{text_key}\" and \"{label_key}\"")
        pair = obj.get(pair_key)
        for key, value in ((text_key, obj[text_key]), (pair_key, pair)):
            if value is not None and not isinstance(value, str):
                raise _problem(path, n, f"{key!r} is {json.dumps(value)[:40]}, not a string")
        label = _label_text(path, n, obj[label_key], repr(label_key))
        examples.append(TextExample(obj[text_key], label, n, pair))
    return examples


def _read_table(path: str | Path, lines: list[str], fmt: str, text_col: str, label_col: str,
                pair_col: str) -> list[TextExample]:
    # TSV is read unquoted: a quote character in a text is text, as most TSV writers mean it
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {"delimiter": ","}
    reader = csv.reader(io.StringIO("\n".join(lines) + "\n", newline=""), **options)
    header: list[str] | None = None
    examples = []
    try:
        for row in reader:
            n = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                missing = [c for c in (text_col, label_col) if c not in header]
                if missing:
                    raise _problem(path, n, f"the header has no {missing[0]!r} column (it has {', '.join(header)}); "
                                            f"name the columns or pass the column names")
                at = {c: header.index(c) for c in (text_col, label_col, pair_col) if c in header}
                continue
            if len(row) != len(header):
                raise _problem(path, n, f"{len(row)} {fmt.upper()} columns but the header has {len(header)}")
            label = row[at[label_col]].strip()
            if not label:
                raise _problem(path, n, f"a label missing (the {label_col!r} column is empty)")
            pair = row[at[pair_col]] if pair_col in at else None
            examples.append(TextExample(row[at[text_col]], label, n, pair))
    except csv.Error as e:
        raise _problem(path, reader.line_num, f"malformed {fmt.upper()} ({e})") from None
    if header is None:
        raise FormatError(f"{path}: the file is empty; give a header row and labelled rows")
    return examples


def read_labelled(path: str | Path, objective: str, *, format: str = "auto", label_column: str | int | None = None,
                  text_column: str = "text", pair_column: str = "text_pair") -> LabelledData:
    """Read `path` for `objective` (token-classification or sequence-classification).

    `label_column` is the CoNLL-U column or JSONL tags key for token classification, the label
    column/key for sequence classification (default "label")."""
    if objective == TOKEN_CLASSIFICATION:
        return read_token_file(path, format=format, label_column=label_column)
    if objective == SEQUENCE_CLASSIFICATION:
        return read_sequence_file(path, format=format, text_column=text_column,
                                  label_column=str(label_column) if label_column is not None else "label",
                                  pair_column=pair_column)
    raise UsageError(f"unknown task objective {objective!r}; use {' or '.join(TASK_OBJECTIVES)}")


# ---------------------------------------------------------------- labels and the head's config


def _sort_key(label: str) -> tuple[int, Any]:
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


@dataclass(frozen=True)
class LabelSet:
    """The labels a head predicts, id i = labels[i]. Read from training data they are sorted
    (numerically when every label is an integer, so that label "3" gets id 3), so the same data
    always gives the same ids."""

    labels: tuple[str, ...]

    @classmethod
    def from_data(cls, data: LabelledData) -> "LabelSet":
        labels = {label for label, _ in data.label_lines()}
        ordered = sorted(labels, key=_sort_key) if all(lab.lstrip("-").isdigit() for lab in labels) else sorted(labels)
        if len(ordered) < 2:
            raise FormatError(f"{data.path}: only one label ({ordered[0]!r}) in the data; a classifier needs "
                              f"at least two")
        return cls(tuple(ordered))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LabelSet":
        """The labels a model's config.json declares (`id2label`, ids 0..n-1)."""
        id2label = config.get("id2label") or {}
        try:
            ids = sorted(int(i) for i in id2label)
        except (TypeError, ValueError):
            ids = []
        if not ids or ids != list(range(len(ids))):
            raise FormatError("the model's config has no usable id2label (ids 0..n-1); give a diff or model "
                              "trained for this task")
        return cls(tuple(str(id2label[i] if i in id2label else id2label[str(i)]) for i in ids))

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    def check(self, data: LabelledData) -> None:
        """Raise one `FormatError` if `data` has labels outside this set (naming the first, its line,
        and how many others there are)."""
        known = self.label2id
        unseen: dict[str, int] = {}
        for label, line in data.label_lines():
            if label not in known:
                unseen.setdefault(label, line)
        if unseen:
            first, line = next(iter(unseen.items()))
            more = f" (and {len(unseen) - 1} more: {', '.join(list(unseen)[1:6])})" if len(unseen) > 1 else ""
            shown = ", ".join(self.labels[:20]) + (", ..." if len(self.labels) > 20 else "")
            raise _problem(data.path, line, f"label {first!r}{more} is not one of the {self.num_labels} labels "
                                            f"of the training data/model ({shown}); map it to one of them or "
                                            f"drop those examples")

    def config_patch(self, base_config: dict[str, Any], objective: str, tokenizer: Any = None) -> dict[str, Any]:
        """The config.json members that make a baked model load as this task's head: architectures,
        id2label, label2id, num_labels (and problem_type for sequence classification; pad_token_id
        when the base has none and the tokenizer gives one, which decoder sequence classifiers need)."""
        model_type = base_config.get("model_type")
        patch: dict[str, Any] = {
            "architectures": [head_class(model_type, objective)],
            "id2label": {str(i): label for i, label in enumerate(self.labels)},
            "label2id": self.label2id,
            "num_labels": self.num_labels,
        }
        if objective == SEQUENCE_CLASSIFICATION:
            patch["problem_type"] = "single_label_classification"  # never regression, whatever num_labels is
            if base_config.get("pad_token_id") is None and tokenizer is not None:
                pad = _pad_id(tokenizer, default=None)
                if pad is not None:
                    patch["pad_token_id"] = pad
        return patch


def head_class(model_type: str | None, objective: str) -> str:
    """The transformers class name of `objective`'s model for `model_type`, e.g. BertForTokenClassification."""
    from transformers.models.auto import modeling_auto

    table = {TOKEN_CLASSIFICATION: modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
             SEQUENCE_CLASSIFICATION: modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
             "mlm": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
             "clm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}[objective]
    name = table.get(model_type or "")
    if isinstance(name, (list, tuple)):
        name = name[0]
    if not name:
        raise UsageError(f"transformers has no {objective} model for model type {model_type!r}; use another base")
    return name


# ---------------------------------------------------------------- models and tokenizers


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading reports and progress bars off while a model loads (sftdiff reports what matters)."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def read_config(base: str | Path) -> dict[str, Any]:
    """A model folder's config.json as a dict (FormatError when it is not a model folder)."""
    from .text import read_config as read

    return read(str(base))


def build_model(base: str | Path, objective: str, config: dict[str, Any], *, dtype: Any = None) -> tuple[Any, set[str]]:
    """`objective`'s model (token/sequence classification, mlm, clm) from the weights in `base`
    with the config `config` (a config.json dict). Returns the model and the names of its
    parameters the checkpoint did not provide (or provided with another shape): those are newly
    initialized, seeded by the caller's `torch.manual_seed`."""
    import transformers

    auto = {TOKEN_CLASSIFICATION: transformers.AutoModelForTokenClassification,
            SEQUENCE_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
            "mlm": transformers.AutoModelForMaskedLM, "clm": transformers.AutoModelForCausalLM}.get(objective)
    if auto is None:
        raise UsageError(f"unknown objective {objective!r}; use {', '.join(TASK_OBJECTIVES)}, mlm or clm")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise FormatError(f"{base}: config.json has no model type transformers knows ({config.get('model_type')!r})")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        with _quiet_transformers():
            config_object = transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))
            model, info = auto.from_pretrained(str(base), config=config_object,
                                               output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except ValueError as e:
        reason = str(e).splitlines()[0][:200]
        raise FormatError(f"{base}: cannot build a {objective} model from it ({reason})") from None
    missing = set(info.get("missing_keys") or ())
    missing |= {m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys") or ()}
    return model, missing


def load_tokenizer(base: str | Path, objective: str) -> Any:
    """The base's tokenizer; for token classification a fast one that takes pre-split words."""
    import transformers

    try:
        with _quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
            if objective == TOKEN_CLASSIFICATION and getattr(tokenizer, "add_prefix_space", None) is False:
                # byte-level BPE (GPT-2, RoBERTa) only takes pre-split words with a prefix space
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(base), add_prefix_space=True)
    except (OSError, ValueError) as e:
        raise FormatError(f"{base}: no usable tokenizer ({str(e).splitlines()[0][:200]})") from None
    if objective == TOKEN_CLASSIFICATION and not getattr(tokenizer, "is_fast", False):
        raise FormatError(f"{base}: token classification needs a fast tokenizer (tokenizer.json) to map "
                          f"subwords to words; this one is {type(tokenizer).__name__}")
    return tokenizer


def load_task_model(base: str | Path, objective: str, labels: LabelSet) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, config_patch) for training a task head on `base`: the base's weights with
    a new head for `labels` (initialized from torch's current seed), and the config patch a diff of
    it must carry so that the baked model loads with its labels."""
    tokenizer = load_tokenizer(base, objective)
    config = read_config(base)
    patch = labels.config_patch(config, objective, tokenizer)
    model, _ = build_model(base, objective, {**config, **patch})
    return model, tokenizer, patch


def max_length(config: dict[str, Any], tokenizer: Any) -> int:
    """The longest input the model takes: its position table (as `train` decides it), and the
    tokenizer's limit if it has one."""
    from .text import max_block_length

    limits = [limit for limit in (max_block_length(config), getattr(tokenizer, "model_max_length", None))
              if isinstance(limit, int) and 0 < limit < 1_000_000]
    return min(limits) if limits else 512


def _pad_id(tokenizer: Any, default: int | None = 0) -> int | None:
    for value in (tokenizer.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return default


# ---------------------------------------------------------------- encoding and batches


@dataclass
class Encoded:
    """Model inputs of a file: one feature per window (token classification) or example, each
    {input_ids, labels[, token_type_ids]} plus "example" (its example's index)."""

    features: list[dict[str, Any]]
    examples: int
    windows_split: int = 0  # sentences split into several windows
    words_cut: int = 0  # words longer than a window: only their first subwords kept (still labelled once)
    words_unknown: int = 0  # words the tokenizer made no token of: fed as the unknown token
    truncated: int = 0  # sequence-classification examples cut to fit
    labelled: int = 0  # labelled positions: words, or examples

    def stats(self) -> dict[str, int]:
        return {"examples": self.examples, "features": len(self.features), "labelled": self.labelled,
                "split": self.windows_split, "words_cut": self.words_cut, "words_unknown": self.words_unknown,
                "truncated": self.truncated}


def encode(data: LabelledData, tokenizer: Any, labels: LabelSet, seq_len: int) -> Encoded:
    """`data` as model inputs of at most `seq_len` tokens; labels outside `labels` are an error."""
    labels.check(data)
    with _quiet_transformers():  # "sequence longer than the maximum": we split or truncate it on purpose
        if data.objective == TOKEN_CLASSIFICATION:
            return encode_tokens(data.examples, tokenizer, labels.label2id, seq_len, path=data.path)
        return encode_sequences(data.examples, tokenizer, labels.label2id, seq_len)


def _frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence of words."""
    enc = tokenizer(["a"], is_split_into_words=True)
    ids, word_ids = enc["input_ids"], enc.word_ids()
    at = [i for i, w in enumerate(word_ids) if w is not None]
    if not at:
        return [], []
    return list(ids[: at[0]]), list(ids[at[-1] + 1:])


def encode_tokens(examples: Sequence[TokenExample], tokenizer: Any, label2id: dict[str, int],
                  seq_len: int, *, path: str = "data") -> Encoded:
    """Windows of at most `seq_len` tokens: words fed pre-split, each word's label on its first
    subword (others IGNORE), a sentence that does not fit split at word boundaries."""
    prefix, suffix = _frame(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise UsageError(f"a sequence length of {seq_len} leaves no room for words between the special tokens")
    unk = tokenizer.unk_token_id
    out = Encoded([], len(examples))
    for start in range(0, len(examples), 512):
        chunk = examples[start: start + 512]
        enc = tokenizer([list(ex.words) for ex in chunk], is_split_into_words=True, add_special_tokens=False)
        for i, ex in enumerate(chunk):
            pieces: list[list[int]] = [[] for _ in ex.words]
            for token, word in zip(enc["input_ids"][i], enc.word_ids(i)):
                if word is not None:
                    pieces[word].append(token)
            windows: list[tuple[list[int], list[int]]] = [([], [])]
            for w, piece in enumerate(pieces):
                if not piece:
                    if unk is None:
                        raise _problem(path, ex.lines[w], f"the tokenizer makes no token of word {ex.words[w]!r}")
                    piece, out.words_unknown = [unk], out.words_unknown + 1
                if len(piece) > body:
                    piece, out.words_cut = piece[:body], out.words_cut + 1
                ids, labs = windows[-1]
                if ids and len(ids) + len(piece) > body:
                    ids, labs = [], []
                    windows.append((ids, labs))
                ids.extend(piece)
                labs.append(label2id[ex.labels[w]])
                labs.extend([IGNORE] * (len(piece) - 1))
            out.windows_split += len(windows) > 1
            out.labelled += len(ex.words)
            for ids, labs in windows:
                out.features.append({"input_ids": prefix + ids + suffix,
                                     "labels": [IGNORE] * len(prefix) + labs + [IGNORE] * len(suffix),
                                     "example": start + i})
    return out


def encode_sequences(examples: Sequence[TextExample], tokenizer: Any, label2id: dict[str, int],
                     seq_len: int) -> Encoded:
    """One feature per example: text (and pair) truncated to `seq_len` tokens, and its label id."""
    out = Encoded([], len(examples))
    for start in range(0, len(examples), 512):
        chunk = examples[start: start + 512]
        texts = [ex.text for ex in chunk]
        pairs = [ex.text_pair for ex in chunk] if chunk and chunk[0].text_pair is not None else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=seq_len)
        encodings = getattr(enc, "encodings", None)
        for i, ex in enumerate(chunk):
            feature = {"input_ids": list(enc["input_ids"][i]), "labels": label2id[ex.label], "example": start + i}
            if "token_type_ids" in enc:
                feature["token_type_ids"] = list(enc["token_type_ids"][i])
            if encodings is not None and encodings[i].overflowing:
                out.truncated += 1
            out.features.append(feature)
    out.labelled = len(examples)
    return out


class TaskBatches:
    """Re-iterable padded batches {input_ids, attention_mask, labels[, token_type_ids]}; each pass
    reshuffles deterministically from `seed` (unshuffled: the features' order, every pass)."""

    def __init__(self, features: Sequence[dict[str, Any]], batch_size: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True):
        if not features:
            raise FormatError("no examples to batch")
        self.features, self.batch_size, self.pad_id = list(features), max(1, batch_size), pad_id
        self.seed, self.shuffle, self.passes = seed, shuffle, 0

    def __len__(self) -> int:
        return (len(self.features) + self.batch_size - 1) // self.batch_size

    def order(self) -> list[int]:
        """The feature order of the next pass."""
        import torch

        if not self.shuffle:
            return list(range(len(self.features)))
        gen = torch.Generator().manual_seed(self.seed + 1_000_003 * self.passes)
        return torch.randperm(len(self.features), generator=gen).tolist()

    def restart(self) -> None:
        """Back to the first pass: the same order again (a training phase starts over, as `LMBatches`)."""
        self.passes = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self.order()
        self.passes += 1
        for start in range(0, len(order), self.batch_size):
            yield self.collate([self.features[i] for i in order[start: start + self.batch_size]])

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)

        def pad(rows: list[list[int]], value: int) -> Any:
            return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

        batch = {"input_ids": pad([f["input_ids"] for f in features], self.pad_id),
                 "attention_mask": pad([[1] * len(f["input_ids"]) for f in features], 0)}
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = pad([f["token_type_ids"] for f in features], 0)
        if isinstance(features[0]["labels"], list):
            batch["labels"] = pad([f["labels"] for f in features], IGNORE)
        else:
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch


def task_batches(encoded: Encoded, batch_size: int, tokenizer: Any, seed: int = 0,
                 shuffle: bool = True) -> TaskBatches:
    """Batches of `encoded`, padded with the tokenizer's pad token (its EOS if it has none)."""
    return TaskBatches(encoded.features, batch_size, _pad_id(tokenizer), seed, shuffle)


# ---------------------------------------------------------------- one call for a training run


@dataclass
class TaskData:
    """Everything a training command needs for a task objective."""

    model: Any
    tokenizer: Any
    labels: LabelSet
    config_patch: dict[str, Any]
    batches: TaskBatches
    eval_batches: TaskBatches | None
    seq_len: int
    settings: dict[str, Any]
    source_batches: list[TaskBatches] = field(default_factory=list)  # one per data file (multi-source)


def read_task_data(objective: str, data: str | Path | Sequence[str | Path], *, eval_data: str | Path | None = None,
                   format: str = "auto", label_column: str | int | None = None, text_column: str = "text",
                   pair_column: str = "text_pair") -> tuple[list[LabelledData], LabelledData | None, LabelSet]:
    """Read every training file (several: multi-source) and the held-out file, and the one label
    set of all training files. Every file is read, so a bad one fails before any model loads."""
    options = {"format": format, "label_column": label_column, "text_column": text_column, "pair_column": pair_column}
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    if not paths:
        raise UsageError("no training data; give at least one data file")
    sources = [read_labelled(path, objective, **options) for path in paths]
    held_out = read_labelled(eval_data, objective, **options) if eval_data is not None else None
    union = LabelledData(", ".join(str(p) for p in paths), objective, sources[0].format,
                         [ex for source in sources for ex in source.examples])
    labels = LabelSet.from_data(union)
    if held_out is not None:
        labels.check(held_out)
    return sources, held_out, labels


def prepare_task(base: str | Path, objective: str, data: str | Path | Sequence[str | Path], *,
                 eval_data: str | Path | None = None, batch_size: int = 8, seq_len: int | None = None, seed: int = 0,
                 format: str = "auto", label_column: str | int | None = None, text_column: str = "text",
                 pair_column: str = "text_pair",
                 read: tuple[list[LabelledData], LabelledData | None, LabelSet] | None = None) -> TaskData:
    """Read the labelled data (or take `read`, what `read_task_data` returned for the same
    arguments, so a caller that checked the files first reads them once), build the label set from it, load `base` with a new head for it
    (seeded from torch's current seed; call `torch.manual_seed` first), and batch the data.

    `data` may be several files (multi-source training): one label set over all of them, one
    `TaskBatches` per file in `source_batches` (`batches` is the first file's). `seq_len` defaults
    to, and is capped at, the longest input the model takes. `settings` is what a trained diff
    records in its `origin`."""
    sources, held_out, labels = read if read is not None else read_task_data(
        objective, data, eval_data=eval_data, format=format, label_column=label_column,
        text_column=text_column, pair_column=pair_column)
    model, tokenizer, patch = load_task_model(base, objective, labels)
    limit = max_length(read_config(base), tokenizer)
    seq_len = min(seq_len or limit, limit)
    encoded = [encode(source, tokenizer, labels, seq_len) for source in sources]
    source_batches = [task_batches(e, batch_size, tokenizer, seed) for e in encoded]
    eval_batches = None
    if held_out is not None:
        eval_batches = task_batches(encode(held_out, tokenizer, labels, seq_len), batch_size, tokenizer, seed,
                                    shuffle=False)
    stats = [{"data": Path(source.path).name, "format": source.format, **e.stats()}
             for source, e in zip(sources, encoded)]
    settings = {"objective": objective, **(stats[0] if len(stats) == 1 else {"data": stats}),
                "num_labels": labels.num_labels, "batch_size": batch_size, "seq_len": seq_len, "seed": seed}
    return TaskData(model, tokenizer, labels, patch, source_batches[0], eval_batches, seq_len, settings,
                    source_batches)
