"""Helpers the importers and exporters share: canonical sparse entries, top-k over dense deltas,
names and shapes from a base, adapter folders."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .. import __version__
from ..algebra import sum_by_index
from ..checkpoint import Checkpoint
from ..diff import DenseEntry, DiffMeta, Entry, SparseDiff, SparseEntry
from ..errors import FormatError, UsageError, VerificationError
from ..names import NameMap
from ..select import TopK, per_tensor_count
from . import ADAPTER_CONFIG

ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


def canonical_sparse(shape: tuple[int, ...], indices: np.ndarray, values: np.ndarray, *,
                     what: str) -> SparseEntry | None:
    """A canonical entry from 1-D integer indices that may be unsorted, repeated or carry zeros and
    1-D floating-point values: repeats are summed (as applying them one after another would), zeros
    dropped. None if nothing is left."""
    numel = math.prod(shape)
    indices, values = np.asarray(indices), np.asarray(values)
    if indices.ndim != 1 or values.ndim != 1:
        raise FormatError(f"{what}: indices and values must be 1-D (got {indices.ndim}-D and {values.ndim}-D)")
    if indices.shape != values.shape:
        raise FormatError(f"{what}: {indices.size} indices but {values.size} values")
    if indices.dtype.kind not in "iu":
        raise FormatError(f"{what}: indices are {indices.dtype}, not integers")
    if values.dtype.kind != "f":
        raise FormatError(f"{what}: values are {values.dtype}, not floating point")
    with np.errstate(over="ignore"):  # F64 beyond float32's range becomes infinity, refused below
        values = values.astype(np.float32, copy=False)
    if indices.size == 0:
        return None
    if int(indices.min()) < 0 or int(indices.max()) >= numel:  # exact: Python ints, before any cast
        raise FormatError(f"{what}: index out of range [0, {numel}) for shape {list(shape)}")
    indices = indices.astype(np.int64, copy=False)
    if indices.size > 1 and not bool(np.all(indices[1:] > indices[:-1])):
        indices, sums = sum_by_index(indices, values)
        with np.errstate(over="ignore"):  # an overflow becomes infinity, refused just below
            values = sums.astype(np.float32)
    if not np.isfinite(values).all():  # after merging: summed repeats can overflow float32
        raise FormatError(f"{what}: values contain NaN or infinity")
    return SparseEntry.from_float(shape, indices, values)


def budget_k(total_numel: int, k: int | None, density: float | None) -> int:
    """The number of values to keep: -k as given, or density of the tensors' total size
    (density 1 keeps every nonzero). No budget at all also keeps every nonzero."""
    if k is not None and density is not None:
        raise UsageError("give at most one of -k N or --density D")
    if k is not None:
        if k < 0:
            raise UsageError("-k must be a non-negative integer")
        return int(k)
    if density is None or density >= 1:
        if density is not None and density > 1:
            raise UsageError("--density must be in (0, 1]")
        return total_numel
    if not density > 0:
        raise UsageError("--density must be in (0, 1]")
    return per_tensor_count(total_numel, density)  # round half up, as `create` does


def topk_from_dense(names: list[str], shape_of: Callable[[str], tuple[int, ...]],
                    delta_of: Callable[[str], np.ndarray], k: int | None, density: float | None
                    ) -> dict[str, SparseEntry]:
    """Global top-k over dense deltas computed one tensor at a time (twice: select, then gather),
    with `select.TopK`'s tie rule (tensor rank = position in sorted names)."""
    ordered = sorted(names)
    total = sum(int(np.prod(shape_of(n), dtype=np.int64)) for n in ordered)
    keep = budget_k(total, k, density)
    if keep >= total:
        chosen = None  # every nonzero: no selection pass needed
    else:
        top = TopK(keep)
        for rank, name in enumerate(ordered):
            top.offer(rank, np.abs(np.asarray(delta_of(name), dtype=np.float32)).reshape(-1))
        chosen = top.result()
    out: dict[str, SparseEntry] = {}
    for rank, name in enumerate(ordered):
        if chosen is not None and rank not in chosen:
            continue
        flat = np.asarray(delta_of(name), dtype=np.float32).reshape(-1)
        if not np.isfinite(flat).all():
            raise FormatError(f"{name}: delta contains NaN or infinity")
        idx = np.flatnonzero(flat) if chosen is None else chosen[rank]
        entry = SparseEntry.from_float(tuple(shape_of(name)), idx, flat[idx])
        if entry is not None:
            out[name] = entry
    return out


def topk_sparse(entries: Mapping[str, Entry], k: int | None, density: float | None) -> dict[str, Entry]:
    """Keep the top-k sparse values of a diff (dense entries stay); density is relative to the
    sparse entries' total size."""
    sparse = sorted(n for n, e in entries.items() if isinstance(e, SparseEntry))
    total = sum(entries[n].numel for n in sparse)
    keep = budget_k(total, k, density)
    out: dict[str, Entry] = {n: e for n, e in entries.items() if not isinstance(e, SparseEntry)}
    if keep >= sum(entries[n].nnz for n in sparse):
        out.update({n: entries[n] for n in sparse})
        return out
    top = TopK(keep)
    for rank, name in enumerate(sparse):
        top.offer(rank, np.abs(entries[name].values_f32()))
    for rank, positions in top.result().items():
        e = entries[sparse[rank]]
        out[sparse[rank]] = SparseEntry(e.shape, e.indices[positions], e.values[positions], e.dtype, e.base_dtype)
    return out


def base_names(shapes: Mapping[str, tuple[int, ...]], base: Checkpoint, *, source: str,
               replacements: Iterable[str] = ()) -> dict[str, str]:
    """Each name's spelling in the base, checking that the base has it with the same shape.

    `replacements` (dense entries) may name a parameter the base lacks (a new head: spelled as
    the base would, without a prefix it does not use) or has in another shape (a resized
    embedding): a replacement applies whatever the base holds (spec 3.2)."""
    names = NameMap(base.tensors, shapes)
    free = set(replacements)
    out: dict[str, str] = {}
    for name, shape in shapes.items():
        target = names.to_ref(name)
        if name in free:
            out[name] = target if target is not None else names.spell(name)
            continue
        if target is None:
            raise VerificationError(f"{source}: parameter {name!r} does not exist in the base {base.path}")
        if tuple(base.tensors[target].shape) != tuple(shape):
            raise VerificationError(
                f"{source}: {name!r} has shape {list(shape)} but the base's {target!r} is "
                f"{list(base.tensors[target].shape)}; is this the right base?"
            )
        out[name] = target
    return out


def rename_to_base(entries: Mapping[str, Entry], base: Checkpoint, *, source: str) -> dict[str, Entry]:
    """Entries keyed by the base's spelling of each name, shapes of sparse entries checked against
    the base (dense ones replace whatever it holds, or add a parameter it lacks)."""
    dense = [name for name, entry in entries.items() if isinstance(entry, DenseEntry)]
    targets = base_names({name: entry.shape for name, entry in entries.items()}, base, source=source,
                         replacements=dense)
    return {targets[name]: _with_base_dtype(entry, base.tensors[targets[name]].dtype
                                            if targets[name] in base.tensors else None)
            for name, entry in entries.items()}


def _with_base_dtype(entry: Entry, dtype: str | None) -> Entry:
    if isinstance(entry, SparseEntry):
        return SparseEntry(entry.shape, entry.indices, entry.values, entry.dtype, dtype)
    return DenseEntry(entry.values, entry.dtype, dtype)


def base_meta(base: Checkpoint | None, hint: str | None, names: Iterable[str]) -> dict[str, Any]:
    """The `base` metadata object: hint, and with a base at hand its fingerprint and digests."""
    if base is None:
        return {"hint": hint, "fingerprint": None}
    from ..fingerprint import base_record

    return base_record(base, names, hint or base.path)


def import_meta(fmt: str, source: str, base: Checkpoint | None, hint: str | None,
                names: Iterable[str], **extra: Any) -> DiffMeta:
    origin = {"tool": f"sftdiff {__version__}", "method": "convert", "from": fmt, "source": source}
    origin.update({k: v for k, v in extra.items() if v is not None})
    return DiffMeta(base=base_meta(base, hint, names), origin=origin)


def make_diff(entries: Mapping[str, Entry], fmt: str, source: str, base: Checkpoint | None,
              hint: str | None = None, **extra: Any) -> SparseDiff:
    """A diff from imported entries: names respelled as the base spells them when there is one."""
    if base is not None:
        entries = rename_to_base(entries, base, source=source)
    return SparseDiff(dict(entries), import_meta(fmt, source, base, hint, entries, **extra))


# ---------------------------------------------------------------- adapter folders


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8, bad JSON, huge ints
        raise FormatError(f"{path}: unreadable JSON ({e.__class__.__name__})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: must hold a JSON object")
    return config


def adapter_hint(config: Mapping[str, Any], folder: Path) -> str | None:
    """The config's base_model_name_or_path (None when absent)."""
    hint = config.get("base_model_name_or_path")
    if hint is not None and not isinstance(hint, str):
        raise FormatError(f"{folder / ADAPTER_CONFIG}: base_model_name_or_path must be a string")
    return hint


def read_adapter_weights(folder: Path) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32/int numpy arrays (safetensors preferred; .bin loaded with
    torch's weights_only loader)."""
    st_path, bin_path = folder / ADAPTER_SAFETENSORS, folder / ADAPTER_BIN
    if st_path.is_file():
        from ..dtypes import to_float32
        from ..safetensors_io import SafetensorsFile

        st = SafetensorsFile(st_path)
        return {name: (to_float32(st.array(name), t.dtype) if t.dtype in ("BF16", "F16") else st.array(name))
                for name, t in st.tensors.items()}
    if bin_path.is_file():
        ckpt = Checkpoint.open(bin_path)
        from ..dtypes import to_float32

        return {name: (to_float32(ckpt.array(name), t.dtype) if t.dtype in ("BF16", "F16") else ckpt.array(name))
                for name, t in ckpt.tensors.items()}
    raise FormatError(f"{folder}: no {ADAPTER_SAFETENSORS} or {ADAPTER_BIN}")


def adapter_base(config: Mapping[str, Any], base: Checkpoint | None, folder: Path,
                 *, needed_for: str) -> Checkpoint:
    """The base an adapter applies to: the one given, else its base_model_name_or_path if that
    resolves locally (a folder, or a Hub id in the local cache)."""
    if base is not None:
        return base
    hint = adapter_hint(config, folder)
    if hint:
        from .. import hub

        if os.path.exists(hint) or hub.looks_like_repo_id(hint):
            try:
                return Checkpoint.open(hint)
            except FormatError as e:
                raise FormatError(
                    f"{folder}: {needed_for} needs the base model, and its base_model_name_or_path "
                    f"{hint!r} did not resolve ({e}); pass --base"
                ) from None
    raise FormatError(f"{folder}: {needed_for} needs the base model's shapes; pass --base BASE")


def strip_peft_prefix(key: str, folder: Path) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise FormatError(f"{folder}: tensor {key!r} does not start with {PEFT_PREFIX!r}")
    return key[len(PEFT_PREFIX):]


def write_adapter(out: Path, config: dict[str, Any], tensors: Mapping[str, np.ndarray], *,
                  overwrite: bool) -> None:
    """An adapter folder (adapter_config.json + adapter_model.safetensors), written atomically."""
    from ..atomic import atomic_path
    from ..safetensors_io import StreamingWriter
    from ..checkpoint import numpy_dtype_name

    names = sorted(tensors)
    specs = [(n, numpy_dtype_name(np.asarray(tensors[n]).dtype), tuple(np.shape(tensors[n]))) for n in names]
    with atomic_path(out, overwrite=overwrite, directory=True) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        with open(tmp / ADAPTER_SAFETENSORS, "wb") as f:
            writer = StreamingWriter(f, specs, {"format": "pt"})
            for n in names:
                writer.write(n, tensors[n])
            writer.close()
