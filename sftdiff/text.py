"""Language-modelling data for `retrain`/`train`: a plain-text corpus packed into fixed-length
blocks, batched with seeded shuffling and (for MLM) seeded masking, plus loading the model.

MLM masking follows BERT: 15% of the non-special tokens are predicted; of those 80% become the mask
token, 10% a random token, 10% stay. A `torch.Generator` makes it reproducible from `seed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from .errors import FormatError, UsageError

OBJECTIVES = ("mlm", "clm")
MLM_PROBABILITY = 0.15


def pick_device(device: str) -> str:
    """`auto` -> cuda when a GPU is present, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no GPU is available here; use --device cpu or auto")
    return device


def load_language_model(base: str, objective: str) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF folder: a masked-LM for `mlm` (a head the base lacks is newly
    initialized), a causal LM for `clm`."""
    import transformers

    path = Path(base)
    if not (path / "config.json").is_file():
        raise FormatError(f"{base}: not a model folder with config.json (BASE must be a Hugging Face model folder)")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise FormatError(f"{base}: no usable tokenizer ({str(e).splitlines()[0][:200]})") from None
    auto = transformers.AutoModelForMaskedLM if objective == "mlm" else transformers.AutoModelForCausalLM
    try:
        model = auto.from_pretrained(base)
    except ValueError as e:
        raise FormatError(f"{base}: cannot build a {objective.upper()} model from it "
                          f"({str(e).splitlines()[0][:200]})") from None
    if objective == "mlm" and tokenizer.mask_token_id is None:
        raise FormatError(f"{base}: the tokenizer has no mask token, so --objective mlm is impossible; try clm")
    return model, tokenizer


def read_blocks(path: str, tokenizer: Any, seq_len: int, objective: str) -> Any:
    """The corpus as a LongTensor [blocks, seq_len]: tokens packed back to back, each block framed
    by the tokenizer's special tokens ([CLS] … [SEP] for MLM, BOS … for CLM); the tail is dropped."""
    import torch

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: cannot read as UTF-8 text ({e.__class__.__name__})") from None
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
