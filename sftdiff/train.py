"""Sparse training: train only a diff's k selected values of a model, and the LT-SFT pipeline.

`attach` turns every selected parameter into base + a scattered k-sized delta (a
`torch.nn.utils.parametrize` parametrization), freezes everything else, and so makes the deltas the
model's only trainable tensors: an optimizer holds O(k) state, and data parallelism (DDP,
accelerate, transformers.Trainer) all-reduces O(k) gradients. `detach` reads the deltas back as a
`SparseDiff` and restores the plain module. `lottery_ticket_sft` is Ansell et al. (2022): full
fine-tuning, top-k of |Δ|, reset to the base, sparse retraining of those k values.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .checkpoint import Checkpoint, torch_to_numpy
from .diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from .errors import UsageError, VerificationError
from .names import infer_prefix, map_to_base, matches_any

if TYPE_CHECKING:
    import torch

Mask = Mapping[str, Any]  # parameter name (as the base spells it) -> flat indices
LossFn = Callable[[Any, Any], "torch.Tensor"]

_STATE = "_sftdiff_attached"


def model_loss(model: Any, batch: Any) -> "torch.Tensor":
    """Default loss: a transformers model called on a dict batch that includes `labels`."""
    return model(**batch).loss


def _delta_module_class() -> type:
    import torch

    class SparseDelta(torch.nn.Module):
        """Parametrization: weight = base with `delta` added at the flat positions `indices`."""

        def __init__(self, indices: torch.Tensor, init: torch.Tensor):
            super().__init__()
            self.register_buffer("indices", indices)
            self.delta = torch.nn.Parameter(init)  # float32 even for half-precision bases

        def forward(self, base: torch.Tensor) -> torch.Tensor:
            flat = base.reshape(-1).index_add(0, self.indices, self.delta.to(base.dtype))
            return flat.view_as(base)

    return SparseDelta


@dataclass
class _Attached:
    """What `detach` needs: the deltas, the densely trained parameters and the flags to restore."""

    sparse: dict[str, tuple[Any, list[tuple[Any, str]], tuple[int, ...], str]] = field(default_factory=dict)
    dense: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (parameter, value at attach)
    requires_grad: list[tuple[Any, bool]] = field(default_factory=list)
    meta: DiffMeta = field(default_factory=DiffMeta)


def base_spelling(model_names: Iterable[str], base_names: Iterable[str]) -> dict[str, str]:
    """Model parameter name -> the name a diff uses (the base's spelling; new parameters, such as
    a head the base lacks, keep the model's spelling minus any base-model prefix)."""
    model_names, base_names = list(model_names), list(base_names)
    mapped = map_to_base(base_names, model_names)
    added, _ = infer_prefix(base_names, model_names)
    out = {}
    for name in model_names:
        if mapped[name] is not None:
            out[name] = mapped[name]
        else:
            out[name] = name[len(added):] if added and name.startswith(added) else name
    return out


def _holders(model: Any) -> dict[int, list[tuple[Any, str]]]:
    """id(parameter) -> every (module, attribute) holding it; tied weights have several."""
    out: dict[int, list[tuple[Any, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, attr))
    return out


def attach(model: "torch.nn.Module", diff_or_mask: SparseDiff | Mask, *, dense: Sequence[str] = (),
           from_values: bool = False, base_names: Iterable[str] | None = None) -> "torch.nn.Module":
    """Make the selected values of `model` its only trainable tensors (in place; returns `model`).

    `diff_or_mask` is a `SparseDiff` or {name: flat indices}. Deltas start at zero, i.e. training
    starts from the model's current (base) weights as LT-SFT prescribes; `from_values=True` starts
    from the diff's values instead (continuing a diff). The diff's dense entries, and parameters
    matching a `dense` glob, are trained as ordinary parameters. Names may be spelled as the base
    spells them (`base_names`, default: the diff's own names, decide how prefixes map).
    """
    import torch
    from torch.nn.utils import parametrize

    if hasattr(model, _STATE):
        raise UsageError("model already has sparse deltas attached; call sftdiff.detach(model) first")
    diff = diff_or_mask if isinstance(diff_or_mask, SparseDiff) else None
    entries = dict(diff.entries) if diff is not None else {n: np.asarray(i) for n, i in diff_or_mask.items()}
    params = dict(model.named_parameters())
    spelling = base_spelling(params, base_names if base_names is not None else entries)
    by_base = {b: m for m, b in spelling.items()}
    missing = [n for n in entries if n not in by_base]
    if missing:
        raise VerificationError(f"the model has no parameter {missing[0]!r} (and {len(missing) - 1} more names of "
                                f"the diff); use the base model the diff was made for")

    state = _Attached(meta=diff.meta.copy() if diff is not None else DiffMeta())
    state.requires_grad = [(p, p.requires_grad) for p in params.values()]
    for p in params.values():
        p.requires_grad_(False)
    dense_names = {spelling[m] for m in params if matches_any(m, dense) or matches_any(spelling[m], dense)}
    dense_names |= {n for n, e in entries.items() if isinstance(e, DenseEntry)}
    for name in sorted(dense_names):
        p = params[by_base[name]]
        state.dense[name] = (p, p.detach().clone())
        entry = entries.get(name)
        if from_values and isinstance(entry, DenseEntry):
            _check_shape(name, entry.shape, p)
            with torch.no_grad():
                p.copy_(torch.from_numpy(entry.values_f32().copy()))
        p.requires_grad_(True)

    holders = _holders(model)
    SparseDelta = _delta_module_class()
    for name, entry in sorted(entries.items()):
        if name in dense_names:
            continue
        p = params[by_base[name]]
        if isinstance(entry, SparseEntry):
            _check_shape(name, entry.shape, p)
            indices = np.asarray(entry.indices, dtype=np.int64)
            init = entry.values_f32() if from_values else np.zeros(len(indices), np.float32)
        else:
            indices = np.unique(np.asarray(entry, dtype=np.int64).reshape(-1))
            init = np.zeros(len(indices), np.float32)
        if len(indices) and (indices[0] < 0 or indices[-1] >= p.numel()):
            raise VerificationError(f"mask of {name!r} has indices outside [0, {p.numel()}); it is not for this model")
        delta = SparseDelta(torch.from_numpy(indices).to(p.device), torch.from_numpy(init.copy()).to(p.device))
        for module, attr in holders[id(p)]:  # a tied weight gets the same delta wherever it is used
            parametrize.register_parametrization(module, attr, delta, unsafe=True)
        state.sparse[name] = (delta, holders[id(p)], tuple(p.shape), _dtype_name(p))
    setattr(model, _STATE, state)
    return model


def _dtype_name(p: Any) -> str:
    return torch_to_numpy(p.detach().reshape(-1)[:0])[0]


def _check_shape(name: str, shape: tuple[int, ...], p: Any) -> None:
    if tuple(shape) != tuple(p.shape):
        raise VerificationError(f"entry {name!r} has shape {list(shape)} but the model's parameter is "
                                f"{list(p.shape)}; use the base model the diff was made for")


def detach(model: "torch.nn.Module", *, keep_trained: bool = False) -> SparseDiff:
    """The trained values as a `SparseDiff` (the attached indices, zeros dropped), and the plain
    module back: its weights are the base again (`keep_trained=True`: base + trained deltas)."""
    import torch
    from torch.nn.utils import parametrize

    state: _Attached | None = getattr(model, _STATE, None)
    if state is None:
        raise UsageError("nothing to detach: call sftdiff.attach(model, diff) first")
    entries: dict[str, SparseEntry | DenseEntry] = {}
    for name, (delta, holders, shape, base_dtype) in state.sparse.items():
        indices = delta.indices.cpu().numpy()
        entry = SparseEntry.from_float(shape, indices, delta.delta.detach().float().cpu().numpy(), "F32", base_dtype)
        if entry is not None:
            entries[name] = entry
        for module, attr in holders:
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        if keep_trained:
            p = getattr(holders[0][0], holders[0][1])
            with torch.no_grad():
                p.view(-1).index_add_(0, delta.indices, delta.delta.detach().to(p.dtype))
    for name, (p, start) in state.dense.items():
        dtype, values = torch_to_numpy(p.detach())
        value_dtype = dtype if dtype in ("F32", "BF16", "F16") else "F32"
        if value_dtype != dtype:
            values = values.astype(np.float32)
        entries[name] = DenseEntry(values.copy(), value_dtype, dtype)
        if not keep_trained:
            with torch.no_grad():
                p.copy_(start)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    delattr(model, _STATE)
    return SparseDiff(entries, state.meta)


def train_steps(model: Any, batches: Iterable[Any], steps: int, *, lr: float, loss_fn: LossFn | None = None,
                penalty: Callable[[], "torch.Tensor"] | None = None, desc: str = "train",
                progress: bool = False) -> list[float]:
    """`steps` AdamW steps on the model's trainable tensors, cycling through `batches`.

    `penalty()` (e.g. an L1 pull towards the base) is added to the loss; returns each step's loss
    without it. Works on a DDP-wrapped model as well."""
    import torch
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # decay would pull towards 0, not the base
    device = params[0].device
    loss_fn = loss_fn or model_loss
    data = _forever(batches)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for _ in bar:
        loss = loss_fn(model, _to_device(next(data), device))
        total = loss + penalty() if penalty is not None else loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return losses


def evaluate(model: Any, batches: Iterable[Any], loss_fn: LossFn | None = None) -> float:
    """Mean loss over `batches` (one pass, eval mode, no gradients)."""
    import torch
    from torch.nn.utils import parametrize

    loss_fn = loss_fn or model_loss
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad(), parametrize.cached():
        for batch in batches:
            losses.append(loss_fn(model, _to_device(batch, device)).item())
    model.train(was_training)
    return float(np.mean(losses)) if losses else float("nan")


def _forever(batches: Iterable[Any]) -> Iterator[Any]:
    """Cycle a re-iterable (a list, a DataLoader: reshuffled each pass) or consume an iterator."""
    if iter(batches) is batches:
        yield from batches
        raise UsageError("the batch iterator ran out before the last training step; pass a re-iterable "
                         "(list, DataLoader) or an endless iterator")
    for _ in itertools.count():
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise UsageError("no training batches")


def _to_device(batch: Any, device: Any) -> Any:
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def sparse_retrain(model: Any, diff_or_mask: SparseDiff | Mask, batches: Iterable[Any], *, steps: int, lr: float,
                   dense: Sequence[str] = (), l1_reg: float = 0.0, loss_fn: LossFn | None = None,
                   base_names: Iterable[str] | None = None, keep_trained: bool = False,
                   progress: bool = False) -> tuple[SparseDiff, list[float]]:
    """Train exactly the selected values from the model's current weights; the diff and the losses."""
    attach(model, diff_or_mask, dense=dense, base_names=base_names)
    try:
        deltas = [d.delta for d, *_ in getattr(model, _STATE).sparse.values()]
        k = max(1, sum(d.numel() for d in deltas))
        penalty = (lambda: l1_reg * sum(d.abs().sum() for d in deltas) / k) if l1_reg and deltas else None
        losses = train_steps(model, batches, steps, lr=lr, loss_fn=loss_fn, penalty=penalty,
                             desc="sparse", progress=progress)
    finally:
        diff = detach(model, keep_trained=keep_trained)
    return diff, losses


def lottery_ticket_sft(model: Any, batches: Iterable[Any], *, k: int | None = None, density: float | None = None,
                       full_steps: int, sparse_steps: int, lr: float, sparse_lr: float | None = None,
                       sparse_globs: Sequence[str] = ("*",), dense_globs: Sequence[str] = (),
                       exclude_globs: Sequence[str] = (), full_l1_reg: float = 0.0, sparse_l1_reg: float = 0.0,
                       loss_fn: LossFn | None = None, base: str | Checkpoint | None = None,
                       keep_trained: bool = False, progress: bool = False) -> SparseDiff:
    """LT-SFT: fine-tune fully for `full_steps`, keep the k values that changed most, reset them to
    the start, retrain only those (and the dense parameters) for `sparse_steps`; returns the diff.

    Parameters matching `sparse_globs` (model or base spelling) compete for the k values (`density`:
    a fraction of them); `dense_globs`, and parameters `base` lacks (a new head), are trained
    densely through both phases (they are not reset) and stored as dense entries; `exclude_globs`
    stay frozen. The model is left as given (`keep_trained=True`: with the diff applied).
    `full_l1_reg`/`sparse_l1_reg` add that factor times mean |θ − θ_base| to the loss.
    """
    import torch

    from .create import create_diff

    ckpt = Checkpoint.open(base) if isinstance(base, (str, bytes)) or hasattr(base, "__fspath__") else base
    params = dict(model.named_parameters())
    spelling = base_spelling(params, ckpt.tensors if ckpt is not None else params)
    base_has = set(ckpt.tensors) if ckpt is not None else set(spelling.values())
    chosen = lambda m, globs: matches_any(m, globs) or matches_any(spelling[m], globs)  # noqa: E731
    trained = [m for m in params if not chosen(m, exclude_globs)]
    dense = [m for m in trained if chosen(m, dense_globs) or spelling[m] not in base_has]
    sparse = [m for m in trained if m not in dense and chosen(m, sparse_globs)]
    if not sparse:
        raise UsageError("no parameter matches the sparse globs; check --exclude/--dense patterns")
    n_sparse = sum(params[m].numel() for m in sparse)
    if (k is None) == (density is None):
        raise UsageError("give exactly one of k and density")
    k = int(np.floor(density * n_sparse + 0.5)) if density is not None else int(k)

    flags = {m: p.requires_grad for m, p in params.items()}
    start = {m: params[m].detach().clone() for m in sparse + dense}  # the base, to diff against and reset to
    for m, p in params.items():
        p.requires_grad_(m in start)
    penalty = None
    if full_l1_reg:
        penalty = lambda: full_l1_reg * sum((params[m] - start[m]).abs().sum() for m in sparse) / n_sparse  # noqa: E731
    full_losses = train_steps(model, batches, full_steps, lr=lr, loss_fn=loss_fn, penalty=penalty,
                              desc="full", progress=progress)

    picked = create_diff({spelling[m]: start[m] for m in sparse},
                         {spelling[m]: params[m].detach() for m in sparse}, k=k)
    mask = {n: e.indices for n, e in picked.entries.items() if isinstance(e, SparseEntry)}
    with torch.no_grad():  # the reset; dense parameters are no part of the ticket and keep training
        for m in sparse:
            params[m].copy_(start.pop(m))
    del picked
    for m, p in params.items():
        p.requires_grad_(flags[m])

    diff, sparse_losses = sparse_retrain(
        model, mask, batches, steps=sparse_steps, lr=sparse_lr or lr, dense=dense, l1_reg=sparse_l1_reg,
        loss_fn=loss_fn, base_names=spelling.values(), keep_trained=keep_trained, progress=progress)
    if not keep_trained:
        with torch.no_grad():
            for m, value in start.items():
                params[m].copy_(value)
    diff.meta = DiffMeta(base=base_info(ckpt, diff), origin={
        "tool": "sftdiff", "method": "lt-sft", "k": k, "density": density, "scope": "global",
        "full_steps": full_steps, "sparse_steps": sparse_steps, "lr": lr, "sparse_lr": sparse_lr or lr,
        "full_l1_reg": full_l1_reg, "sparse_l1_reg": sparse_l1_reg,
        "dense": sorted(spelling[m] for m in dense), "exclude": list(exclude_globs),
        "full_loss": loss_ends(full_losses), "sparse_loss": loss_ends(sparse_losses)})
    return diff


def loss_ends(losses: Sequence[float]) -> list[float]:
    """[mean of the first losses, mean of the last] over min(20, n/4) steps each (for the metadata)."""
    if not losses:
        return []
    window = min(20, max(1, len(losses) // 4))
    return [round(float(np.mean(losses[:window])), 5), round(float(np.mean(losses[-window:])), 5)]


def base_info(ckpt: Checkpoint | None, diff: SparseDiff) -> dict[str, Any]:
    """The `base` metadata of a trained diff: as `create` records it (fingerprint, and digests of
    the base tensors the diff changes, so `apply` can name one that differs)."""
    if ckpt is None:
        return {}
    from .fingerprint import base_record

    return base_record(ckpt, diff.entries)


__all__ = ["attach", "detach", "lottery_ticket_sft", "sparse_retrain", "train_steps", "evaluate", "model_loss"]
