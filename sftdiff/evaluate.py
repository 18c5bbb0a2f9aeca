"""Measuring what a base plus diffs is worth on labelled data or text, without baking.

`evaluate` loads the base for the objective (token or sequence classification, masked or causal
LM), applies the diffs in memory with `apply_to_model`, and reports accuracy (a word's prediction is
its first subword's) or the mean token NLL and perplexity. The result equals evaluating the
checkpoint `bake` writes from the same inputs: the config is bake's merged config (the base's
config.json with the config patch of each diff applied with its dense entries, in order), diffs are
summed in float32 as bake sums them and each changed parameter is rounded once to the dtype bake
writes it in; evaluation itself runs in float32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from .diff import SparseDiff
from .errors import FormatError, UsageError
from .labelled import (TASK_OBJECTIVES, TOKEN_CLASSIFICATION, LabelSet, build_model, encode, load_tokenizer,
                       max_length, read_config, read_labelled, task_batches)

OBJECTIVES = TASK_OBJECTIVES + ("mlm", "clm")


@dataclass
class Evaluation:
    """What `evaluate` measured. `per_example` holds (correct, total) per sentence or example in
    file order (classification), for paired bootstrap comparisons of two systems."""

    objective: str
    data: str
    metrics: dict[str, Any]
    seq_len: int
    labels: list[str] | None = None
    per_example: list[tuple[int, int]] | None = None
    skipped: list[str] = field(default_factory=list)  # diff entries for parameters the model lacks

    def to_dict(self) -> dict[str, Any]:
        out = {"objective": self.objective, "data": self.data, "seq_len": self.seq_len, **self.metrics,
               "skipped_entries": list(self.skipped)}
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return out


def evaluate(base: str | os.PathLike, diffs: Sequence[str | os.PathLike | SparseDiff] = (), *, objective: str,
             data: str | os.PathLike, with_dense: Sequence[bool] | None = None,
             scales: Sequence[float] | None = None, batch_size: int = 16,
             seq_len: int | None = None, seed: int = 0, device: str = "cpu", format: str = "auto",
             label_column: str | int | None = None, text_column: str = "text", pair_column: str = "text_pair",
             verify: bool = True, warn: Callable[[str], None] | None = None) -> Evaluation:
    """Evaluate `base` (a model folder, maybe a baked one) with `diffs` applied in memory on `data`.

    `with_dense` gives one flag per diff (default True): False applies that diff without its dense
    entries and config patch (a language diff's MLM head), as `apply --skip-dense` does; `scales`
    one factor per diff (or one for all) for its sparse values, as `apply --scale`. `seq_len`
    defaults to (and is capped at) the longest input the model takes; MLM masking is seeded by
    `seed`, so the loss is reproducible. Diffs are checked against the base as `bake` checks them
    (`verify=False` skips only the fingerprint comparison).
    """
    from .text import lm_batches, pick_device, read_blocks

    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; use {', '.join(OBJECTIVES)}")
    device = pick_device(device)
    dataset = None
    if objective in TASK_OBJECTIVES:  # a bad file fails before the model loads
        dataset = read_labelled(data, objective, format=format, label_column=label_column, text_column=text_column,
                                pair_column=pair_column)
    model, tokenizer, config, skipped = load_model(base, diffs, objective, with_dense=with_dense, scales=scales,
                                                   verify=verify, warn=warn)
    model.to(device)
    limit = max_length(config, tokenizer)
    seq_len = min(seq_len or limit, limit)

    if dataset is not None:
        labels = LabelSet.from_config(config)
        encoded = encode(dataset, tokenizer, labels, seq_len)
        batches = task_batches(encoded, batch_size, tokenizer, seed, shuffle=False)
        per_example = _classify(model, batches, encoded.features, len(dataset), device)
        correct, total = sum(c for c, _ in per_example), sum(t for _, t in per_example)
        unit = "words" if objective == TOKEN_CLASSIFICATION else "examples"
        metrics = {"accuracy": correct / total if total else float("nan"), "correct": correct, "total": total,
                   "unit": unit, "examples": len(dataset), "inputs": len(encoded.features),
                   "split": encoded.windows_split, "truncated": encoded.truncated}
        return Evaluation(objective, str(data), metrics, seq_len, list(labels.labels), per_example, skipped)

    if objective == "mlm" and tokenizer.mask_token_id is None:
        raise FormatError(f"{base}: the tokenizer has no mask token, so mlm cannot be evaluated; try clm")
    blocks = read_blocks(str(data), tokenizer, seq_len, objective)
    batches = lm_batches(blocks, batch_size, objective, tokenizer, seed, shuffle=False)
    nll, tokens = _language_model_nll(model, batches, objective, device)
    loss = nll / tokens if tokens else float("nan")
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if loss == loss else loss, "tokens": tokens,
               "blocks": len(batches.blocks)}
    return Evaluation(objective, str(data), metrics, seq_len, None, None, skipped)


def load_model(base: str | os.PathLike, diffs: Sequence[str | os.PathLike | SparseDiff], objective: str, *,
               with_dense: Sequence[bool] | None = None, scales: Sequence[float] | None = None,
               verify: bool = True,
               warn: Callable[[str], None] | None = None) -> tuple[Any, Any, dict[str, Any], list[str]]:
    """(model, tokenizer, merged config, skipped entries): `base` loaded in float32 for
    `objective` with `diffs` applied in memory, equal to loading `bake(base, diffs)`.

    A parameter the model needs that neither the base nor a diff's dense entries provide (a head
    nobody trained) is an error rather than a silently random head."""
    import torch

    from .bake import Layer, _per_diff, merged_config, model_dtype
    from .checkpoint import Checkpoint
    from .inplace import apply_to_model
    from .sources import open_diff
    from .verify import BaseDigests, verify_against_base

    read_config(base)  # a clear error when BASE is not a model folder
    ckpt = Checkpoint.open(base)
    loaded = [d if isinstance(d, SparseDiff) else open_diff(os.fspath(d), base=ckpt) for d in diffs]
    flags = list(with_dense) if with_dense is not None else [True] * len(loaded)
    if len(flags) != len(loaded):
        raise UsageError(f"got {len(flags)} with_dense flags for {len(loaded)} diffs")
    factors = _per_diff(scales, 1.0, len(loaded), "scale")  # as bake reads them
    digests = BaseDigests(ckpt)
    layers = []
    for i, (sd, dense, factor) in enumerate(zip(loaded, flags, factors)):
        label = sd.path or f"diff #{i + 1}"
        match = verify_against_base(sd, ckpt, label=label, fingerprint=verify, digests=digests)
        for note in match.warnings:
            (warn or (lambda m: None))(note)
        layers.append(Layer(sd, float(factor), bool(dense), label, match))
    config = merged_config(ckpt.config, layers, None) or {}
    tokenizer = load_tokenizer(base, objective)
    model, missing = build_model(base, objective, config, dtype=torch.float32)
    model.eval()

    skipped: list[str] = []
    replaced: set[int] = set()
    changed: set[str] = set()
    for layer in layers:
        record = apply_to_model(model, layer.diff, layer.scale, with_dense=layer.with_dense, strict=False)
        skipped += [f"{layer.label}:{name}" for name in record.skipped]
        state = model.state_dict()
        replaced |= {state[name].data_ptr() for name in record.dense}
        changed |= set(record.dense) | set(record.sparse)
    state = model.state_dict()
    untrained = sorted(name for name in missing if name in state and state[name].data_ptr() not in replaced)
    if untrained:
        more = f" (and {len(untrained) - 1} more)" if len(untrained) > 1 else ""
        raise FormatError(f"{base}: the {objective} model needs {untrained[0]!r}{more}, which neither the base nor "
                          f"a diff's dense entries provide; give the diff that trained this head (without "
                          f"--skip-dense) or a model folder that has it")
    _round_like_bake(model, changed, ckpt, model_dtype(ckpt))
    return model, tokenizer, config, skipped


def _round_like_bake(model: Any, changed: set[str], ckpt: Any, default: str) -> None:
    """Round each changed parameter once to the dtype bake writes it in (the base tensor's, or the
    model dtype for a new one), as bake rounds its float32 sum."""
    import torch

    from .names import NameMap

    kinds = {"BF16": torch.bfloat16, "F16": torch.float16}
    if not changed:
        return
    state = model.state_dict()
    names = NameMap(ckpt.tensors, changed).lookup(changed)
    with torch.no_grad():
        for name in changed:
            target = names.get(name)
            dtype = ckpt.tensors[target].dtype if target is not None else default
            if dtype in kinds:
                t = state[name]
                t.copy_(t.to(kinds[dtype]).to(t.dtype))


def _classify(model: Any, batches: Any, features: Sequence[dict[str, Any]], examples: int,
              device: str) -> list[tuple[int, int]]:
    """(correct, total) per example, in example order (a split sentence's windows summed)."""
    per_example = [[0, 0] for _ in range(examples)]
    for at, (hit, n) in enumerate(_rows(model, batches, device)):
        record = per_example[features[at]["example"]]
        record[0] += hit
        record[1] += n
    return [(c, t) for c, t in per_example]


def accuracy(model: Any, batches: Any) -> float:
    """Accuracy of a classification model over `batches` (labelled positions: each word's first
    subword, or each example); e.g. a training command's held-out accuracy before and after."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        rows = list(_rows(model, batches, device))
    finally:
        model.train(was_training)
    total = sum(n for _, n in rows)
    return sum(hit for hit, _ in rows) / total if total else float("nan")


def _rows(model: Any, batches: Any, device: Any) -> Iterator[tuple[int, int]]:
    """(correct, labelled) for each input row of each batch, in batch order."""
    import torch

    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            predicted = model(**batch).logits.argmax(dim=-1)
            if labels.dim() == 1:  # sequence classification: one label per example
                hits, counted = (predicted == labels).long(), torch.ones_like(labels)
            else:
                counted = (labels != -100).long()
                hits = ((predicted == labels).long() * counted).sum(dim=1)
                counted = counted.sum(dim=1)
            yield from zip(hits.tolist(), counted.tolist())


def _language_model_nll(model: Any, batches: Any, objective: str, device: str) -> tuple[float, int]:
    """Summed NLL over the predicted tokens (masked ones for MLM, every next token for CLM), and their count."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if objective == "clm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            keep = labels != -100
            nll = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
            total += float(nll)
            count += int(keep.sum())
    return total, count


def describe(result: Evaluation) -> str:
    """One line for the terminal."""
    m = result.metrics
    if "accuracy" in m:
        return (f"accuracy {m['accuracy']:.4f} ({m['correct']}/{m['total']} {m['unit']}, "
                f"{m['examples']} {'sentences' if m['unit'] == 'words' else 'examples'})")
    return (f"loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f} ({m['tokens']} predicted tokens in "
            f"{m['blocks']} blocks of {result.seq_len})")


__all__ = ["evaluate", "load_model", "accuracy", "Evaluation", "describe"]
