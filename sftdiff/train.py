"""Sparse training: train only a diff's k selected values of a model, and the LT-SFT pipeline.

`attach` turns every selected parameter into base + a scattered k-sized delta (a
`torch.nn.utils.parametrize` parametrization), freezes everything else, and so makes the deltas the
model's only trainable tensors: an optimizer holds O(k) state, and data parallelism (DDP,
accelerate, transformers.Trainer) all-reduces O(k) gradients. `detach` reads the deltas back as a
`SparseDiff` and restores the plain module. `lottery_ticket_sft` is Ansell et al. (2022): full
fine-tuning, top-k of |Δ|, reset to the start, sparse retraining of those k values.

Training on top of other diffs (`on=[language_sft]`, and `Sources` for multi-source training):
those diffs are added to the weights only while a training step runs (`OnDiffs`), so at rest, where
the top-k is taken and the result is read, the weights are the base plus what training did, and the
trained diff is the difference from base + those diffs (it excludes them).
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .checkpoint import Checkpoint, torch_to_numpy
from .diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from .errors import UsageError, VerificationError
from .names import NameMap, matches_any

if TYPE_CHECKING:
    import torch

Mask = Mapping[str, Any]  # parameter name (as the base spells it) -> flat indices
OnDiffsArg = Sequence["SparseDiff | str | os.PathLike[str]"]  # diffs to train on top of, or their files
LossFn = Callable[[Any, Any], "torch.Tensor"]

SCHEDULES = ("linear", "constant")
# The defaults of lottery_ticket_sft (and `sftdiff train`/`retrain`): a constant rate per phase and
# the dense parameters (a new head) kept training through both phases, not the paper's linear
# decay and reset: it was better in both real cases measured, and it is what sftdiff did before
# the choice existed. The numbers, and how to get the paper's, are in docs/train.md ("Two procedures").
DEFAULT_SCHEDULE = "constant"
DEFAULT_RESET_DENSE = False
CLIP_NORM = 1.0  # gradients are clipped to this global norm, as transformers' Trainer does

_STATE = "_sftdiff_attached"


def model_loss(model: Any, batch: Any) -> "torch.Tensor":
    """Default loss: a transformers model called on a dict batch that includes `labels`."""
    return model(**batch).loss


def _delta_module_class() -> type:
    import torch

    class SparseDelta(torch.nn.Module):
        """Parametrization: weight = base with `delta` added at the flat positions `indices`, as
        `apply` adds a value (spec 3.1: in float32, float64 for F64, rounded once to the base dtype)."""

        def __init__(self, indices: torch.Tensor, init: torch.Tensor):
            super().__init__()
            self.register_buffer("indices", indices)
            self.delta = torch.nn.Parameter(init)  # float32 even for half-precision bases

        def forward(self, base: torch.Tensor) -> torch.Tensor:
            flat = base.reshape(-1)
            return flat.index_copy(0, self.indices, applied(flat[self.indices], self.delta)).view_as(base)

    return SparseDelta


def applied(weights: "torch.Tensor", delta: "torch.Tensor") -> "torch.Tensor":
    """`weights + delta` as `apply` computes it: in float32 (float64 for F64 weights), rounded once
    to the weights' dtype."""
    import torch

    wide = torch.float64 if weights.dtype == torch.float64 else torch.float32
    return (weights.to(wide) + delta.to(wide)).to(weights.dtype)


@dataclass
class _Attached:
    """What `detach` needs: the deltas, the densely trained parameters, the flags to restore, the
    metadata to keep and what training ran."""

    sparse: dict[str, tuple[Any, list[tuple[Any, str]], tuple[int, ...], str]] = field(default_factory=dict)
    dense: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (parameter, value at attach)
    requires_grad: list[tuple[Any, bool]] = field(default_factory=list)
    extra: list[Any] = field(default_factory=list)  # parameters of extra_modules (not in the model)
    modules: list[Any] = field(default_factory=list)  # the extra_modules themselves (their train/eval mode)
    meta: DiffMeta = field(default_factory=DiffMeta)  # base, user and config patch of the attached diff
    origin: dict[str, Any] = field(default_factory=dict)  # what attach knows of the run
    runs: list[dict[str, Any]] = field(default_factory=list)  # one record per train_steps call


@dataclass
class SourceBatch:
    """A batch of one source of a multi-source run, with the diffs to train it on top of."""

    batch: Any
    on: tuple[SparseDiff, ...]


class Sources:
    """Multi-source training data (composable-sft's multi-source training): an endless stream that
    takes one batch from each source in turn (round-robin, in the order given), each source with its
    own diffs (a language SFT) applied while the model trains on it. Each source's batches keep their
    own seeded order (pass a re-iterable such as `TaskBatches`)."""

    def __init__(self, sources: Sequence[tuple[Iterable[Any], OnDiffsArg]]):
        if not sources:
            raise UsageError("Sources needs at least one (batches, diffs) pair")
        self.sources = [(batches, as_diffs(on, "a Sources diff")) for batches, on in sources]

    def __iter__(self) -> Iterator[SourceBatch]:
        streams = [_forever(batches) for batches, _ in self.sources]
        while True:
            for stream, (_, on) in zip(streams, self.sources):
                yield SourceBatch(next(stream), on)

    def restart(self) -> None:
        """Every source back to its first pass (see `start_phase`)."""
        for batches, _ in self.sources:
            restart = getattr(batches, "restart", None)
            if callable(restart):
                restart()


class OnDiffs:
    """Which diffs are added to a model's weights right now: `use(diffs)` swaps to `diffs` (O(k):
    `apply_to_model`/`revert_from_model`), `off()` takes them all away. Dense entries are never
    applied (a language SFT's MLM head is no part of a task model) and entries for parameters the
    model lacks are skipped (`skipped`). Works while `attach` has parametrized the model: the diffs
    go onto the frozen base weights under the deltas."""

    def __init__(self, model: Any):
        self.view = _WeightView(getattr(model, "module", model))
        self.current: tuple[SparseDiff, ...] = ()
        self.records: list[Any] = []
        self.skipped: set[str] = set()

    def use(self, diffs: Sequence[SparseDiff]) -> None:
        from .inplace import apply_to_model

        diffs = tuple(diffs)
        if len(diffs) == len(self.current) and all(a is b for a, b in zip(diffs, self.current)):
            return
        self.off()
        for diff in diffs:
            record = apply_to_model(self.view, diff, with_dense=False, strict=False)
            self.skipped.update(record.skipped)
            self.records.append(record)
        self.current = diffs

    def off(self) -> None:
        from .inplace import revert_from_model

        for record in reversed(self.records):
            revert_from_model(self.view, record)  # trained values keep their training, minus the diff
        self.records, self.current = [], ()


class _WeightView:
    """The model's weights by their plain state-dict names, also while parametrized: the
    `....parametrizations.weight.original` tensor is the base weight `....weight`."""

    def __init__(self, model: Any):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        out = {}
        for name, t in self.model.state_dict(keep_vars=False).items():
            if ".parametrizations." not in name:
                out[name] = t
            elif name.endswith(".original"):
                module, rest = name.split(".parametrizations.", 1)
                out[f"{module}.{rest[: -len('.original')]}"] = t
        return out


def on_record(diffs: Sequence[SparseDiff]) -> list[dict[str, Any]]:
    """Provenance of diffs trained on top of: each one's file name and content fingerprint."""
    import os

    from .fingerprint import content_fingerprint

    return [{"diff": os.path.basename(d.path) if d.path else None, "content_fingerprint": content_fingerprint(d)[0]}
            for d in diffs]


def _provenance(on: Sequence[SparseDiff], batches: Any) -> dict[str, Any]:
    """What a trained diff's origin says about the diffs it was trained on top of."""
    out: dict[str, Any] = {}
    if on:
        out["on"] = on_record(on)
    if isinstance(batches, Sources):
        out["sources"] = [{"on": on_record(d)} for _, d in batches.sources]
    return out


def as_diffs(on: Any, what: str = "an on= diff") -> tuple[SparseDiff, ...]:
    """The diffs of an `on=` argument: a sequence of `SparseDiff`s or diff file paths (read as
    `apply_to_model` reads one); a single diff or path is taken as a list of one."""
    from .inplace import as_diff

    if isinstance(on, (SparseDiff, str, os.PathLike)):
        on = [on]
    return tuple(as_diff(d, what) for d in on)


def verify_on(base: Checkpoint, on: OnDiffsArg, batches: Any = None, *, verify: bool = True,
              warn: Callable[[str], None] | None = None, labels: Sequence[str] = ()) -> None:
    """Check that each diff to train on top of (`on`, and those of `batches` when it is a `Sources`)
    was made from `base`, as `apply` and the commands' `--on` check it (`verify.verify_against_base`:
    names, shapes, entry data, and with `verify` the base digests the diff recorded); a mismatch
    raises `VerificationError` naming the diff. A diff that records no digests cannot be checked:
    `warn` (default `warnings.warn`) says so. `labels` name the `on` diffs in messages (default: their
    paths, else `on[i]`)."""
    from .verify import BaseDigests, verify_against_base

    diffs = [(d, labels[i] if i < len(labels) else d.path or f"on[{i}]") for i, d in enumerate(as_diffs(on))]
    if isinstance(batches, Sources):
        diffs += [(d, d.path or f"Sources diff #{j + 1} of source #{i + 1}")
                  for i, (_, ds) in enumerate(batches.sources) for j, d in enumerate(ds)]
    digests = BaseDigests(base)  # each base tensor hashed once for all the diffs
    seen: set[int] = set()
    for diff, label in diffs:
        if id(diff) in seen:
            continue
        seen.add(id(diff))
        for note in verify_against_base(diff, base, label=label, fingerprint=verify, digests=digests).warnings:
            if warn is not None:
                warn(note)
            else:
                import warnings

                warnings.warn(note, stacklevel=3)


@contextmanager
def _modes(training: bool, roots: Iterable[Any]) -> Iterator[None]:
    """`roots` (modules) in train (or eval) mode inside the block; every module under them gets its
    own previous mode back after, also on an error, so a head the caller keeps in eval mode stays so."""
    roots = list(roots)
    saved = list({id(m): (m, m.training) for root in roots for m in root.modules()}.values())
    for root in roots:
        root.train(training)
    try:
        yield
    finally:
        for module, flag in saved:  # parents before children: train() of a parent does not undo a child
            module.train(flag)


def _extra(model: Any, extra_modules: Mapping[str, Any] | None) -> list[Any]:
    """The modules outside `model` that the loss uses: those given, else those `attach` was given."""
    if extra_modules is not None:
        return list(extra_modules.values())
    state: _Attached | None = getattr(getattr(model, "module", model), _STATE, None)
    return list(state.modules) if state is not None else []


def base_spelling(model_names: Iterable[str], base_names: Iterable[str]) -> dict[str, str]:
    """Model parameter name -> the name a diff uses (the base's spelling; new parameters, such as
    a head the base lacks, keep the model's spelling minus any base-model prefix)."""
    model_names = list(model_names)
    names = NameMap(base_names, model_names)
    return {name: names.spell(name) for name in model_names}


def _holders(model: Any) -> dict[int, list[tuple[Any, str]]]:
    """id(parameter) -> every (module, attribute) holding it; tied weights have several."""
    out: dict[int, list[tuple[Any, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, attr))
    return out


def _extra_parameters(model_params: Mapping[str, Any], extra_modules: Mapping[str, Any] | None) -> dict[str, Any]:
    """{"<prefix>.<name>": parameter} of modules that live outside the model (a separate head)."""
    out: dict[str, Any] = {}
    for prefix, module in (extra_modules or {}).items():
        for name, p in module.named_parameters():
            full = f"{prefix}.{name}"
            if full in model_params or full in out:
                raise UsageError(f"extra_modules: {full!r} is also a parameter of the model; give the module "
                                 f"another name than {prefix!r}")
            out[full] = p
    return out


def attach(model: "torch.nn.Module", diff_or_mask: SparseDiff | Mask, *, dense: Sequence[str] = (),
           extra_modules: Mapping[str, "torch.nn.Module"] | None = None, from_values: bool = False,
           base_names: Iterable[str] | None = None) -> "torch.nn.Module":
    """Make the selected values of `model` its only trainable tensors (in place; returns `model`).

    `diff_or_mask` is a `SparseDiff` or {name: flat indices}. Deltas start at zero, i.e. training
    starts from the model's current (base) weights as LT-SFT prescribes; `from_values=True` starts
    from the diff's values instead (continuing a diff). The diff's dense entries, and parameters
    matching a `dense` glob, are trained as ordinary parameters. `extra_modules` ({name: module},
    e.g. {"classifier": head}) are modules outside `model` that are trained densely too and stored
    as dense entries `name.<parameter>`; `trainable_parameters(model)` lists them with the rest.
    Names may be spelled as the base spells them (`base_names`, default: the diff's own names,
    decide how prefixes map).
    """
    import torch
    from torch.nn.utils import parametrize

    if hasattr(model, _STATE):
        raise UsageError("model already has sparse deltas attached; call sftdiff.detach(model) first")
    diff = diff_or_mask if isinstance(diff_or_mask, SparseDiff) else None
    entries = dict(diff.entries) if diff is not None else {n: np.asarray(i) for n, i in diff_or_mask.items()}
    params = dict(model.named_parameters())
    extras = _extra_parameters(params, extra_modules)
    spelling = base_spelling(params, base_names if base_names is not None else entries)
    by_base = {**{b: params[m] for m, b in spelling.items()}, **extras}
    missing = [n for n in entries if n not in by_base]
    if missing:
        raise VerificationError(f"the model has no parameter {missing[0]!r} (and {len(missing) - 1} more names of "
                                f"the diff); use the base model the diff was made for")

    state = _Attached(meta=diff.meta.copy(origin={}) if diff is not None else DiffMeta(), extra=list(extras.values()),
                      modules=list((extra_modules or {}).values()))
    state.origin = {"init": "diff values" if from_values else "zero"}
    if diff is not None and diff.meta.origin.get("method"):
        state.origin["mask_from"] = diff.meta.origin["method"]
    state.requires_grad = [(p, p.requires_grad) for p in [*params.values(), *extras.values()]]
    for p in params.values():
        p.requires_grad_(False)
    dense_names = {spelling[m] for m in params if matches_any(m, dense) or matches_any(spelling[m], dense)}
    dense_names |= {n for n, e in entries.items() if isinstance(e, DenseEntry)} | set(extras)
    for name in sorted(dense_names):
        p = by_base[name]
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
        p = by_base[name]
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
    state.origin["k"] = sum(int(d.indices.numel()) for d, *_ in state.sparse.values())
    setattr(model, _STATE, state)
    return model


def _dtype_name(p: Any) -> str:
    return torch_to_numpy(p.detach().reshape(-1)[:0])[0]


def _check_shape(name: str, shape: tuple[int, ...], p: Any) -> None:
    if tuple(shape) != tuple(p.shape):
        raise VerificationError(f"entry {name!r} has shape {list(shape)} but the model's parameter is "
                                f"{list(p.shape)}; use the base model the diff was made for")


def trainable_parameters(model: Any) -> list[Any]:
    """What an optimizer should hold after `attach`: the deltas, the densely trained parameters and
    those of `extra_modules` (for an un-attached model: its parameters that require grad)."""
    inner = getattr(model, "module", model)  # DDP and similar wrappers
    params = [p for p in model.parameters() if p.requires_grad]
    seen = {id(p) for p in params}
    state: _Attached | None = getattr(inner, _STATE, None)
    return params + [p for p in (state.extra if state else []) if p.requires_grad and id(p) not in seen]


def detach(model: "torch.nn.Module", *, keep_trained: bool = False, origin: Mapping[str, Any] | None = None
           ) -> SparseDiff:
    """The trained values as a `SparseDiff` (the attached indices, zeros dropped), and the plain
    module back: its weights are the base again (`keep_trained=True`: base + trained deltas).

    A value that does not change its weight when applied in the base's dtype (a delta below half a
    unit in the last place of the weight) is dropped too, and counted in `origin["unchanged_dropped"]`.
    The diff keeps the attached diff's `base`, `user` and `config_patch`; its `origin` says what
    was trained (method, k, nnz, and steps/lr/schedule/loss of each `train_steps` run); `origin`
    (e.g. {"seed": 0, "corpus": ...}) adds or overrides fields.
    """
    import torch
    from torch.nn.utils import parametrize

    from . import __version__

    state: _Attached | None = getattr(model, _STATE, None)
    if state is None:
        raise UsageError("nothing to detach: call sftdiff.attach(model, diff) first")
    entries: dict[str, SparseEntry | DenseEntry] = {}
    unchanged = 0
    for name, (delta, holders, shape, base_dtype) in state.sparse.items():
        for module, attr in holders:
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        p = getattr(holders[0][0], holders[0][1])  # the plain base weight again
        with torch.no_grad():
            before = p.reshape(-1)[delta.indices]
            after = applied(before, delta.delta.detach())
            changes = after != before
            unchanged += int(((delta.delta != 0) & ~changes).sum())
            if keep_trained:
                p.view(-1).index_copy_(0, delta.indices, after)
        keep = changes.cpu().numpy()
        entry = SparseEntry.from_float(shape, delta.indices.cpu().numpy()[keep],
                                       delta.delta.detach().float().cpu().numpy()[keep], "F32", base_dtype)
        if entry is not None:
            entries[name] = entry
    for name, (p, start) in state.dense.items():
        dtype, values = torch_to_numpy(p.detach())
        value_dtype = dtype if dtype in ("F32", "BF16", "F16") else "F32"
        if value_dtype != dtype:
            values = values.astype(np.float32)
        outside = any(p is e for e in state.extra)  # an extra module's parameter: no base has it
        entries[name] = DenseEntry(values.copy(), value_dtype, None if outside else dtype)
        if not keep_trained:
            with torch.no_grad():
                p.copy_(start)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    delattr(model, _STATE)
    diff = SparseDiff(entries, state.meta)
    runs = [dict(r) for r in state.runs]
    diff.meta.origin = {"tool": f"sftdiff {__version__}", "method": "sparse-training", **state.origin,
                        "nnz": diff.nnz, "unchanged_dropped": unchanged, "dense": sorted(state.dense),
                        **(runs[0] if len(runs) == 1 else {"runs": runs} if runs else {}), **(origin or {})}
    return diff


def lr_factor(step: int, steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """The learning-rate multiplier at 0-based `step` of `steps`: transformers' linear schedule
    (warmup from 0, then linear decay to 0) or its constant one (warmup, then 1)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    return max(0.0, (steps - step) / max(1, steps - warmup_steps))


def _check_schedule(schedule: str, warmup_steps: int) -> None:
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {schedule!r}; use 'linear' or 'constant'")
    if warmup_steps < 0:
        raise UsageError(f"warmup_steps must be >= 0, got {warmup_steps}")


def train_steps(model: Any, batches: Iterable[Any], steps: int, *, lr: float, schedule: str = DEFAULT_SCHEDULE,
                warmup_steps: int = 0, loss_fn: LossFn | None = None, parameters: Iterable[Any] | None = None,
                penalty: Callable[[], "torch.Tensor"] | None = None, desc: str = "train",
                progress: bool = False, on: OnDiffsArg = (),
                extra_modules: Mapping[str, "torch.nn.Module"] | None = None) -> list[float]:
    """`steps` AdamW steps (a fresh optimizer, `schedule` over these steps) on `parameters` (default:
    `trainable_parameters(model)`), cycling through `batches`; gradients clipped to norm 1.

    `penalty()` (e.g. an L1 pull towards the base) is added to the loss; returns each step's loss
    without it. `progress`: phase, step and loss on stderr. Works on a DDP-wrapped model as well.
    `on` diffs (and each `Sources` batch's own) are added to the weights for the steps and taken
    away after the last one (`OnDiffs`); they are not checked against a base here (`verify_on`).
    The model and `extra_modules` (modules outside it that `loss_fn` uses; default: those given
    to `attach`) are in train mode for the steps, and every module gets its previous mode back
    after, also when a step fails."""
    import torch

    from .progress import StepProgress

    _check_schedule(schedule, warmup_steps)
    on = as_diffs(on)
    params = list(parameters) if parameters is not None else trainable_parameters(model)
    if not params:
        raise UsageError("nothing to train: no parameter requires a gradient")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # decay would pull towards 0, not the base
    device, loss_fn, data = params[0].device, loss_fn or model_loss, _forever(batches)
    losses: list[float] = []
    bar = StepProgress(steps, desc, progress)
    switch = OnDiffs(model) if on or isinstance(batches, Sources) else None
    try:
        with _modes(True, [model, *_extra(model, extra_modules)]):
            for step in range(steps):
                optimizer.param_groups[0]["lr"] = lr * lr_factor(step, steps, schedule, warmup_steps)
                batch = next(data)
                if isinstance(batch, SourceBatch):  # multi-source: this source's diffs on top of `on`
                    switch.use(tuple(on) + batch.on)
                    batch = batch.batch
                elif switch is not None:
                    switch.use(on)
                loss = loss_fn(model, _to_device(batch, device))
                total = loss + penalty() if penalty is not None else loss
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update(float(np.mean(losses[-20:])), optimizer.param_groups[0]["lr"])
    finally:
        if switch is not None:
            switch.off()
        bar.close()
    state: _Attached | None = getattr(getattr(model, "module", model), _STATE, None)
    if state is not None:  # what detach will record
        state.runs.append({"steps": steps, "lr": lr, "schedule": schedule, "warmup_steps": warmup_steps,
                           "loss": loss_ends(losses)})
    return losses


def evaluate(model: Any, batches: Iterable[Any], loss_fn: LossFn | None = None,
             on: OnDiffsArg = (), extra_modules: Mapping[str, "torch.nn.Module"] | None = None) -> float:
    """Mean loss over `batches` (one pass, no gradients), with `on` diffs added meanwhile. The
    model and `extra_modules` (default: those given to `attach`) are in eval mode meanwhile and
    every module gets its previous mode back after, also on an error."""
    import torch
    from torch.nn.utils import parametrize

    loss_fn = loss_fn or model_loss
    device = next(model.parameters()).device
    losses = []
    with _modes(False, [model, *_extra(model, extra_modules)]), applied_on(model, on), torch.no_grad(), \
            parametrize.cached():
        for batch in batches:
            losses.append(loss_fn(model, _to_device(batch, device)).item())
    return float(np.mean(losses)) if losses else float("nan")


@contextmanager
def applied_on(model: Any, on: OnDiffsArg) -> Iterator[OnDiffs | None]:
    """`on` diffs added to the model's weights (without dense entries) inside the block, e.g. to
    evaluate a task model on top of the language SFT it was trained on."""
    on = as_diffs(on)
    if not on:
        yield None
        return
    switch = OnDiffs(model)
    switch.use(on)
    try:
        yield switch
    finally:
        switch.off()


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


def start_phase(seed: int | None, batches: Iterable[Any]) -> None:
    """Seed a training phase: torch's global generator (dropout, a DataLoader's shuffling), and
    batches with a `restart()` method (sftdiff's `LMBatches`) go back to their first pass, so every
    phase sees the same data order, as transformers' Trainer does when it is run once per phase."""
    if seed is None:
        return
    import torch

    torch.manual_seed(seed)
    restart = getattr(batches, "restart", None)
    if callable(restart):
        restart()


def sparse_retrain(model: Any, diff_or_mask: SparseDiff | Mask, batches: Iterable[Any], *, steps: int, lr: float,
                   schedule: str = DEFAULT_SCHEDULE, warmup_steps: int = 0, seed: int | None = None,
                   dense: Sequence[str] = (), extra_modules: Mapping[str, Any] | None = None, l1_reg: float = 0.0,
                   loss_fn: LossFn | None = None, base_names: Iterable[str] | None = None,
                   keep_trained: bool = False, progress: bool = False,
                   on: OnDiffsArg = (), base: str | os.PathLike | Checkpoint | None = None,
                   verify: bool = True) -> tuple[SparseDiff, list[float]]:
    """Train exactly the selected values from the model's current weights; the diff and the losses.
    `seed` (when given) seeds the run as `start_phase` does. `on` diffs (a language SFT; and, with
    `batches` a `Sources`, each source's) are added to the weights while training and taken away
    after: the diff is the difference from them, and its origin names them (`on`, `sources`).

    With `base` (the checkpoint the model was loaded from: a path or `Checkpoint`), the `on` diffs
    are first checked against it as `sftdiff apply` checks a diff (`verify_on`; `verify=False`
    skips only the digest comparison), names default to its spelling, and the diff's `base`
    records it. Without one, nothing says the `on` diffs were made from this model's base: only
    their shapes are checked (against the model's parameters), and their entries for parameters
    the model lacks are skipped."""
    _check_schedule(schedule, warmup_steps)
    on = as_diffs(on)
    ckpt = _checkpoint(base)
    if ckpt is not None:
        verify_on(ckpt, on, batches, verify=verify)
        base_names = ckpt.tensors if base_names is None else base_names
    attach(model, diff_or_mask, dense=dense, extra_modules=extra_modules, base_names=base_names)
    try:
        start_phase(seed, batches)
        deltas = [d.delta for d, *_ in getattr(model, _STATE).sparse.values()]
        k = max(1, sum(d.numel() for d in deltas))
        penalty = (lambda: l1_reg * sum(d.abs().sum() for d in deltas) / k) if l1_reg and deltas else None
        losses = train_steps(model, batches, steps, lr=lr, schedule=schedule, warmup_steps=warmup_steps,
                             loss_fn=loss_fn, penalty=penalty, desc="sparse", progress=progress, on=on)
    finally:
        diff = detach(model, keep_trained=keep_trained, origin={"method": "retrain", "seed": seed, "l1_reg": l1_reg,
                                                                **_provenance(on, batches)})
    if ckpt is not None:
        diff.meta.base = base_info(ckpt, diff)
    return diff, losses


def _checkpoint(base: str | os.PathLike | Checkpoint | None) -> Checkpoint | None:
    return Checkpoint.open(base) if isinstance(base, (str, bytes, os.PathLike)) else base


def lottery_ticket_sft(model: Any, batches: Iterable[Any], *, k: int | None = None, density: float | None = None,
                       full_steps: int, sparse_steps: int, lr: float, sparse_lr: float | None = None,
                       schedule: str = DEFAULT_SCHEDULE, warmup_steps: int = 0,
                       reset_dense: bool = DEFAULT_RESET_DENSE, seed: int | None = None,
                       sparse_globs: Sequence[str] = ("*",), dense_globs: Sequence[str] = (),
                       exclude_globs: Sequence[str] = (), extra_modules: Mapping[str, Any] | None = None,
                       full_l1_reg: float = 0.0, sparse_l1_reg: float = 0.0, loss_fn: LossFn | None = None,
                       base: str | os.PathLike | Checkpoint | None = None,
                       after_full: Callable[[Any], None] | None = None, keep_trained: bool = False,
                       progress: bool = False, on: OnDiffsArg = (), verify: bool = True) -> SparseDiff:
    """LT-SFT: fine-tune fully for `full_steps`, keep the k values that changed most, reset to the
    start, retrain only those (and the dense parameters) for `sparse_steps`; returns the diff.

    Each phase gets a fresh AdamW, `schedule` ("linear" decay to 0 or "constant", after
    `warmup_steps`) and, with `seed`, a reseed (`start_phase`). Parameters matching `sparse_globs`
    (model or base spelling) compete for the k values (`density`: a fraction of them);
    `dense_globs`, parameters `base` lacks (a new head) and `extra_modules` ({name: module} outside
    `model`) are trained densely and stored as dense entries; `reset_dense=True` resets them, with
    everything else, to their initial values before phase 2 (the paper), False keeps training them
    from where phase 1 left them. `exclude_globs` stay frozen. `after_full(model)` is called when
    phase 1 ends, with the fully fine-tuned weights in place (evaluate or copy them there). The
    model is left as given (`keep_trained=True`: with the diff applied). `full_l1_reg`/`sparse_l1_reg`
    add that factor times mean |θ − θ_start| to the loss.

    `on` (e.g. `[source_language_sft]`) trains on top of those diffs: they are added to the weights
    (sparse entries only) during each phase's steps and taken away after, so the top-k, `after_full`
    and the result see base + training only, and the diff is the difference from base + `on`,
    meant for base + another language's SFT. `batches` may be a `Sources` (multi-source: each
    source's batches with its own diffs on top of `on`). The origin names them (`on`, `sources`).
    With `base`, every such diff is first checked against it as `sftdiff apply` and `train --on`
    check a diff (`verify_on`: names, shapes, entry data and the base digests it recorded;
    `verify=False` skips only the digests): one made from another base raises `VerificationError`
    naming it, before any training. Without `base` nothing says they were made from the model's
    base: only their shapes are checked, against the model's parameters, and their entries for
    parameters the model lacks are skipped.
    """
    import torch

    _check_schedule(schedule, warmup_steps)
    if (k is None) == (density is None):
        raise UsageError("give exactly one of k=... and density=...")
    on = as_diffs(on)
    ckpt = _checkpoint(base)
    if ckpt is not None:
        verify_on(ckpt, on, batches, verify=verify)
    params = dict(model.named_parameters())
    extras = _extra_parameters(params, extra_modules)
    spelling = base_spelling(params, ckpt.tensors if ckpt is not None else params)
    base_has = set(ckpt.tensors) if ckpt is not None else set(spelling.values())
    chosen = lambda m, globs: matches_any(m, globs) or matches_any(spelling[m], globs)  # noqa: E731
    trained = [m for m in params if not chosen(m, exclude_globs)]
    dense = [m for m in trained if chosen(m, dense_globs) or spelling[m] not in base_has]
    sparse = [m for m in trained if m not in dense and chosen(m, sparse_globs)]
    if not sparse:
        raise UsageError("no parameter matches the sparse globs; check the exclude/dense patterns")
    n_sparse = sum(params[m].numel() for m in sparse)
    k = int(np.floor(density * n_sparse + 0.5)) if density is not None else int(k)
    everything = {**{m: params[m] for m in sparse + dense}, **extras}  # what phase 1 trains
    initial = {m: p.detach().clone() for m, p in everything.items()}  # to diff against and reset to
    flags = {m: p.requires_grad for m, p in {**params, **extras}.items()}
    for m, p in {**params, **extras}.items():
        p.requires_grad_(m in everything)

    # Phase 1: full fine-tuning.
    start_phase(seed, batches)
    penalty = None
    if full_l1_reg:
        penalty = lambda: full_l1_reg * sum((params[m] - initial[m]).abs().sum() for m in sparse) / n_sparse  # noqa: E731
    full_losses = train_steps(model, batches, full_steps, lr=lr, schedule=schedule, warmup_steps=warmup_steps,
                              loss_fn=loss_fn, parameters=everything.values(), penalty=penalty, desc="full",
                              progress=progress, on=on, extra_modules=extra_modules or {})
    if after_full is not None:
        after_full(model)

    # The ticket: the k values of the sparse parameters that moved most; then back to the start.
    mask = top_k_mask({spelling[m]: initial[m] for m in sparse}, {spelling[m]: params[m].detach() for m in sparse}, k)
    with torch.no_grad():
        for m in sparse + (dense + list(extras) if reset_dense else []):
            everything[m].copy_(initial[m])
    for m, p in {**params, **extras}.items():
        p.requires_grad_(flags[m])

    # Phase 2: sparse retraining of the k values (and the dense parameters).
    diff, sparse_losses = sparse_retrain(
        model, mask, batches, steps=sparse_steps, lr=sparse_lr or lr, schedule=schedule,
        warmup_steps=warmup_steps, seed=seed, dense=dense, extra_modules=extra_modules, l1_reg=sparse_l1_reg,
        loss_fn=loss_fn, base_names=spelling.values(), keep_trained=keep_trained, progress=progress, on=on)
    if not keep_trained:
        with torch.no_grad():
            for m, value in initial.items():
                everything[m].copy_(value)
    diff.meta = DiffMeta(base=base_info(ckpt, diff), origin={
        "tool": diff.meta.origin["tool"], "method": "lt-sft", "k": k, "nnz": diff.nnz, "density": density,
        "scope": "global", "full_steps": full_steps, "sparse_steps": sparse_steps, "lr": lr,
        "sparse_lr": sparse_lr or lr, "schedule": schedule, "warmup_steps": warmup_steps,
        "reset_dense": reset_dense, "seed": seed, "full_l1_reg": full_l1_reg, "sparse_l1_reg": sparse_l1_reg,
        "dense": sorted([spelling[m] for m in dense] + list(extras)), "exclude": list(exclude_globs),
        "unchanged_dropped": diff.meta.origin["unchanged_dropped"],
        "full_loss": loss_ends(full_losses), "sparse_loss": loss_ends(sparse_losses), **_provenance(on, batches)})
    return diff


def top_k_mask(start: Mapping[str, Any], trained: Mapping[str, Any], k: int) -> dict[str, np.ndarray]:
    """{name: flat indices} of the k values with the largest |trained − start| (ties as `create`
    breaks them: name, then index)."""
    from .create import create_diff

    picked = create_diff(dict(start), dict(trained), k=k)
    return {n: e.indices for n, e in picked.entries.items() if isinstance(e, SparseEntry)}


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


__all__ = ["attach", "detach", "lottery_ticket_sft", "sparse_retrain", "train_steps", "trainable_parameters",
           "Sources", "OnDiffs", "applied_on", "on_record", "evaluate", "model_loss", "lr_factor", "start_phase",
           "top_k_mask", "applied", "verify_on", "as_diffs"]
