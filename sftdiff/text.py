"""Language-modelling data for `retrain`/`train`: a plain-text corpus packed into fixed-length
blocks, batched with seeded shuffling and (for MLM) seeded masking, plus loading the model.

MLM masking follows BERT: 15% of the non-special tokens are predicted; of those 80% become the mask
token, 10% a random token, 10% stay. A `torch.Generator` makes it reproducible from `seed`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import FormatError, OutputError, UsageError

# Objective -> the transformers auto class that loads a model for it. A new objective (a task:
# token classification, ...) adds its class here, its batches beside `lm_batches`, and trains its
# new head densely like the MLM head: `train`/`retrain` store parameters the base lacks as dense entries.
MODEL_CLASSES = {"mlm": "AutoModelForMaskedLM", "clm": "AutoModelForCausalLM"}
OBJECTIVES = tuple(MODEL_CLASSES)
MLM_PROBABILITY = 0.15


def pick_device(device: str) -> str:
    """`auto` -> cuda when a GPU is present, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no GPU is available here; use --device cpu or auto")
    return device


# Model types whose position ids start after the padding index (RoBERTa's convention), so
# max_position_embeddings counts pad_token_id + 1 positions no token can use.
PADDING_OFFSET_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                                      "data2vec-text", "roberta-prelayernorm", "ibert", "luke", "mpnet", "markuplm"})


def read_config(base: str) -> dict[str, Any]:
    """config.json of an HF model folder (before anything heavy is loaded)."""
    import json

    path = Path(base) / "config.json"
    if not path.is_file():
        raise FormatError(f"{base}: not a model folder with config.json (BASE must be a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable JSON config ({e.__class__.__name__})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: not a JSON object")
    return config


def check_objective(config: dict[str, Any], objective: str, base: str) -> None:
    """Refuse an objective the architecture cannot train honestly: causal LM on an encoder (it
    would see the tokens it predicts), masked LM on a decoder-only model."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = config.get("model_type")
    if not isinstance(kind, str):
        return  # transformers decides from the architecture when loading
    masked, causal = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES, kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if objective == "mlm" and not masked:
        what = "a decoder-only (causal) model" if causal else "a model transformers has no masked-LM head for"
        raise UsageError(f"{base}: --objective mlm needs an encoder, but this {kind} checkpoint is {what}"
                         + ("; use --objective clm" if causal else ""))
    encoder = masked and not any(config.get(flag) for flag in ("is_decoder", "is_encoder_decoder", "causal"))
    if objective == "clm" and (encoder or not causal):
        what = ("an encoder (bidirectional attention: a causal LM objective would let it see the tokens it "
                "predicts)" if encoder else "a model transformers has no causal-LM head for")
        raise UsageError(f"{base}: --objective clm needs a decoder, but this {kind} checkpoint is {what}"
                         + ("; use --objective mlm" if masked else ""))


def max_block_length(config: dict[str, Any]) -> int | None:
    """The longest token block the model has positions for (None: no learned limit in the config)."""
    limit = next((config[key] for key in ("max_position_embeddings", "n_positions", "max_sequence_length")
                  if isinstance(config.get(key), int) and config[key] > 0), None)
    if limit is not None and config.get("model_type") in PADDING_OFFSET_POSITIONS:
        limit -= int(config.get("pad_token_id") or 0) + 1
    return limit


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (restored afterwards): the caller
    says what matters in one line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_language_model(base: str, objective: str) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF folder: a masked-LM for `mlm` (a head the base lacks is newly
    initialized), a causal LM for `clm`. transformers' own load report is silenced."""
    import transformers

    config = read_config(base)
    check_objective(config, objective, base)
    with quiet_transformers():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(base)
        except (OSError, ValueError) as e:
            raise FormatError(f"{base}: no usable tokenizer ({str(e).splitlines()[0][:200]})") from None
        auto = getattr(transformers, MODEL_CLASSES[objective])
        try:
            model = auto.from_pretrained(base)
        except ValueError as e:
            raise FormatError(f"{base}: cannot build a {objective.upper()} model from it "
                              f"({str(e).splitlines()[0][:200]})") from None
    if objective == "mlm" and tokenizer.mask_token_id is None:
        raise FormatError(f"{base}: the tokenizer has no mask token, so --objective mlm is impossible; try clm")
    return model, tokenizer


def check_text_file(path: str) -> None:
    """Refuse a missing path or a folder in one line (before anything is loaded)."""
    if not Path(path).exists():
        raise FormatError(f"{path}: no such file; give a plain UTF-8 text file")
    if Path(path).is_dir():
        raise FormatError(f"{path}: is a folder; give a plain UTF-8 text file")


def read_blocks(path: str, tokenizer: Any, seq_len: int, objective: str) -> Any:
    """The corpus as a LongTensor [blocks, seq_len]: tokens packed back to back, each block framed
    by the tokenizer's special tokens ([CLS] … [SEP] for MLM, BOS … for CLM); the tail is dropped."""
    import torch

    check_text_file(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text (byte {e.start}); give a plain UTF-8 text file") from None
    except OSError as e:
        raise OutputError(f"{path}: cannot read it ({e.strerror or e.__class__.__name__})") from None
    texts = [line for line in lines if line.strip()]
    rows = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    ids = [i for row in rows for i in row]
    if objective == "mlm" and ids and set(ids) <= set(tokenizer.all_special_ids):
        raise FormatError(f"{path}: every token is special or unknown to the tokenizer ({tokenizer.unk_token}), "
                          f"so masked LM has nothing to predict; give text in the model's language")
    head, tail = _frame(tokenizer, objective)
    body = seq_len - len(head) - len(tail)
    if body < 1:
        raise UsageError(f"--seq-len {seq_len} leaves no room for text between the special tokens")
    n = len(ids) // body
    if n == 0:
        raise FormatError(f"{path}: {len(ids)} tokens, fewer than one block of {body}; give more text "
                          f"or a smaller --seq-len")
    text = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    frame = lambda ids: torch.tensor(ids, dtype=torch.long).expand(n, -1)  # noqa: E731
    return torch.cat([frame(head), text, frame(tail)], dim=1)


def _frame(tokenizer: Any, objective: str) -> tuple[list[int], list[int]]:
    if objective == "mlm" and tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None:
        return [tokenizer.cls_token_id], [tokenizer.sep_token_id]
    if objective == "clm" and tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id], []
    return [], []


def lm_batches(blocks: Any, batch_size: int, objective: str, tokenizer: Any, seed: int,
               shuffle: bool = True) -> "LMBatches":
    return LMBatches(blocks, batch_size, objective, tokenizer, seed, shuffle)


class LMBatches:
    """Re-iterable batches {input_ids, attention_mask, labels}; each pass reshuffles and remasks,
    deterministically from `seed` (an unshuffled instance yields the same batches every pass)."""

    def __init__(self, blocks: Any, batch_size: int, objective: str, tokenizer: Any, seed: int, shuffle: bool):
        if objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {objective!r}; use mlm or clm")
        self.blocks, self.batch_size, self.objective = blocks, max(1, batch_size), objective
        self.tokenizer, self.seed, self.shuffle = tokenizer, seed, shuffle
        self.passes = 0
        special = set(tokenizer.all_special_ids)
        import torch

        self.special = torch.tensor(sorted(special), dtype=torch.long)
        if objective == "mlm":  # a block of special tokens only has nothing to mask: leave it out
            self.blocks = blocks[(~torch.isin(blocks, self.special)).any(dim=1)]
            if len(self.blocks) == 0:
                raise FormatError("no block of the corpus has a token that masked LM can predict")

    def restart(self) -> None:
        """Back to the first pass: the next iteration shuffles and masks as the first one did."""
        self.passes = 0

    def __len__(self) -> int:
        return (len(self.blocks) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        gen = torch.Generator().manual_seed(self.seed + (1_000_003 * self.passes if self.shuffle else 0))
        self.passes += 1
        order = torch.randperm(len(self.blocks), generator=gen) if self.shuffle else torch.arange(len(self.blocks))
        for start in range(0, len(order), self.batch_size):
            ids = self.blocks[order[start : start + self.batch_size]]
            if self.objective == "clm":
                yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
            else:
                yield self._mask(ids, gen)

    def _mask(self, ids: Any, gen: Any) -> dict[str, Any]:
        import torch

        candidates = ~torch.isin(ids, self.special)
        chosen = (torch.rand(ids.shape, generator=gen) < MLM_PROBABILITY) & candidates
        if not chosen.any():  # a loss over no tokens is NaN: always predict at least one
            chosen.view(-1)[int(torch.nonzero(candidates.view(-1))[0])] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, generator=gen)
        random_ids = torch.randint(len(self.tokenizer), ids.shape, generator=gen)
        inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, self.tokenizer.mask_token_id), ids)
        inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
        return {"input_ids": inputs, "attention_mask": torch.ones_like(ids), "labels": labels}
