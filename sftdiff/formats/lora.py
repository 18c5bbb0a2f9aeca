"""PEFT LoRA adapters: import as the top-k of ΔW = scaling · B@A, export by truncated SVD.

Import refuses what a sparse diff cannot hold rather than dropping it: DoRA magnitudes, trained
biases, and any tensor this module does not understand. `modules_to_save` copies become dense
entries (they replace the base parameter outright, as PEFT does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..checkpoint import Checkpoint
from ..diff import DenseEntry, Entry, SparseDiff, SparseEntry
from ..errors import FormatError
from ..names import NameMap
from .common import (ADAPTER_CONFIG, PEFT_PREFIX, adapter_hint, base_names, make_diff, read_adapter_config,
                     read_adapter_weights, strip_peft_prefix, topk_from_dense, write_adapter)

PEFT_TYPE = "LORA"
_LINEAR = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")
# Parameter names that belong to embedding layers, which PEFT adapts with lora_embedding_A/B.
_EMBEDDING_NAME = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared)\.weight$")


def pattern_value(pattern: list[tuple[re.Pattern[str], Any]], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name or a dotted suffix."""
    for regex, value in pattern:
        if regex.match(module):
            return value
    return default


@dataclass(frozen=True)
class LoraConfig:
    """The parts of adapter_config.json that import uses, each checked for type and range."""

    r: int
    alpha: float
    rank_pattern: list[tuple[re.Pattern[str], int]]
    alpha_pattern: list[tuple[re.Pattern[str], float]]
    use_rslora: bool
    fan_in_fan_out: bool
    modules_to_save: list[str]
    hint: str | None

    @classmethod
    def parse(cls, config: Mapping[str, Any], folder: Path) -> "LoraConfig":
        where = folder / ADAPTER_CONFIG
        if str(config.get("peft_type", "")).upper() != PEFT_TYPE:
            raise FormatError(f"{folder}: peft_type is {config.get('peft_type')!r:.60}, expected 'LORA'")
        _check_supported(config, folder)
        saved = config.get("modules_to_save") or []
        if not isinstance(saved, list) or not all(isinstance(s, str) for s in saved):
            raise FormatError(f"{where}: modules_to_save must be a list of module names")
        return cls(
            r=_positive(config.get("r", 8), "r", where, integer=True),
            alpha=_positive(config.get("lora_alpha", 8), "lora_alpha", where, integer=False),
            rank_pattern=_pattern(config.get("rank_pattern"), "rank_pattern", where, integer=True),
            alpha_pattern=_pattern(config.get("alpha_pattern"), "alpha_pattern", where, integer=False),
            use_rslora=_flag(config, "use_rslora", where),
            fan_in_fan_out=_flag(config, "fan_in_fan_out", where),
            modules_to_save=saved,
            hint=adapter_hint(config, folder),
        )

    def scaling(self, module: str, rank: int, folder: Path) -> float:
        r = pattern_value(self.rank_pattern, module, self.r)
        alpha = pattern_value(self.alpha_pattern, module, self.alpha)
        if r != rank:
            raise FormatError(f"{folder}: module {module!r} has rank {rank} but the config says r={r}")
        return alpha / (math.sqrt(r) if self.use_rslora else r)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _positive(value: Any, key: str, where: Path, *, integer: bool) -> Any:
    """A positive int (`integer`) or positive finite number; booleans are not numbers here."""
    ok = type(value) is int if integer else type(value) in (int, float)
    if not ok or not (0 < value < math.inf):
        shown = f"{value!r}" if type(value) in (int, float) else _json_type(value)
        raise FormatError(f"{where}: {key} must be a positive {'integer' if integer else 'number'}, not {shown}")
    return value


def _pattern(value: Any, key: str, where: Path, *, integer: bool) -> list[tuple[re.Pattern[str], Any]]:
    """rank_pattern/alpha_pattern: module-name regexes (as PEFT matches them) → positive values."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise FormatError(f"{where}: {key} must be an object, not {_json_type(value)}")
    out = []
    for pattern, v in value.items():
        try:
            regex = re.compile(rf"(.*\.)?({pattern})$")
        except (re.error, RecursionError, OverflowError):
            raise FormatError(f"{where}: {key} key {pattern[:60]!r} is not a valid regular expression") from None
        out.append((regex, _positive(v, f"{key}[{pattern[:60]!r}]", where, integer=integer)))
    return out


def _flag(config: Mapping[str, Any], key: str, where: Path) -> bool:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise FormatError(f"{where}: {key} must be true or false, not {_json_type(value)}")
    return bool(value)


def _check_supported(config: Mapping[str, Any], folder: Path) -> None:
    refusals = {
        "use_dora": "DoRA adapters (use_dora) rescale whole weight columns, which no sparse delta represents",
        "lora_bias": "LoRA biases (lora_bias) are not supported",
        "target_parameters": "LoRA on parameters (target_parameters) is not supported",
        "trainable_token_indices": "trainable_token_indices are not supported",
        "layer_replication": "layer_replication changes the model's structure",
    }
    for key, why in refusals.items():
        if config.get(key):
            raise FormatError(f"{folder}: cannot import this LoRA adapter: {why}")
    if config.get("bias", "none") != "none":
        raise FormatError(f"{folder}: cannot import this LoRA adapter: it trains biases (bias="
                          f"{config.get('bias')!r:.60}), which are full replacements not recorded as deltas")


@dataclass
class _Module:
    a: np.ndarray | None = None
    b: np.ndarray | None = None
    embedding: bool = False


def _delta(m: _Module, scale: float, fan_in_fan_out: bool, module: str, folder: Path) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # refused just below
        product = (m.b @ m.a) * np.float32(scale)
    if not np.isfinite(product).all():
        raise FormatError(f"{folder}: module {module!r}: ΔW = scaling·B@A contains NaN or infinity")
    return product.T if (m.embedding or fan_in_fan_out) else product


def _float_tensor(array: np.ndarray, key: str, folder: Path) -> np.ndarray:
    if array.dtype.kind != "f":
        raise FormatError(f"{folder}: tensor {key!r} holds {array.dtype} values, expected floating point")
    with np.errstate(over="ignore"):  # F64 beyond float32's range becomes infinity, refused later
        return array.astype(np.float32, copy=False)


def read_lora(folder: Path) -> tuple[LoraConfig, dict[str, _Module], dict[str, np.ndarray]]:
    """(config, module -> A/B, dense parameters from modules_to_save) of an adapter folder."""
    config = LoraConfig.parse(read_adapter_config(folder), folder)
    saved = config.modules_to_save
    modules: dict[str, _Module] = {}
    dense: dict[str, np.ndarray] = {}
    for key, array in read_adapter_weights(folder).items():
        name = strip_peft_prefix(key, folder)
        for suffixes, embedding in ((_LINEAR, False), (_EMBEDDING, True)):
            if name.endswith(suffixes):
                side = "a" if name.endswith(suffixes[0]) else "b"
                module = name[: -len(suffixes[0])]
                m = modules.setdefault(module, _Module(embedding=embedding))
                if m.embedding != embedding:
                    raise FormatError(f"{folder}: module {module!r} mixes linear and embedding LoRA tensors")
                setattr(m, side, _float_tensor(array, key, folder))
                break
        else:
            owner = name.rsplit(".", 1)[0]
            if any(owner == s or owner.endswith("." + s) for s in saved):
                dense[name] = _float_tensor(array, key, folder)
            else:
                raise FormatError(f"{folder}: tensor {key!r} is neither a LoRA factor nor part of modules_to_save; "
                                  "it cannot be imported")
    for module, m in modules.items():
        if m.a is None or m.b is None:
            raise FormatError(f"{folder}: module {module!r} lacks its LoRA {'A' if m.a is None else 'B'} factor")
        if m.a.ndim != 2 or m.b.ndim != 2:
            raise FormatError(f"{folder}: module {module!r} is not a linear or embedding LoRA "
                              "(convolution LoRA is not supported)")
        if m.b.shape[1] != m.a.shape[0]:
            raise FormatError(f"{folder}: module {module!r}: A is {list(m.a.shape)}, B is {list(m.b.shape)}")
    return config, modules, dense


def load_lora(folder: Path, base: Checkpoint | None, source: str, *, k: int | None = None,
              density: float | None = None) -> SparseDiff:
    """The top-k of every module's ΔW (all nonzeros without a budget), plus modules_to_save."""
    config, modules, dense = read_lora(folder)
    scales = {m: config.scaling(m, mod.a.shape[0], folder) for m, mod in modules.items()}
    names = {m + ".weight": m for m in modules}
    for name in dense:
        if name in names:
            raise FormatError(f"{folder}: {name!r} is both LoRA-adapted and in modules_to_save")

    def shape_of(name: str) -> tuple[int, ...]:
        m = modules[names[name]]
        rows, cols = m.b.shape[0], m.a.shape[1]
        return (cols, rows) if (m.embedding or config.fan_in_fan_out) else (rows, cols)

    if base is not None:  # before any ΔW is multiplied out: its size comes from the file
        base_names({**{n: shape_of(n) for n in names}, **{n: v.shape for n, v in dense.items()}}, base,
                   source=source, replacements=dense)

    def delta_of(name: str) -> np.ndarray:
        return _delta(modules[names[name]], scales[names[name]], config.fan_in_fan_out, names[name], folder)

    entries: dict[str, Entry] = dict(topk_from_dense(list(names), shape_of, delta_of, k, density))
    for name, values in dense.items():
        if not np.isfinite(values).all():
            raise FormatError(f"{folder}: {name!r} contains NaN or infinity")
        entries[name] = DenseEntry(values, "F32")
    return make_diff(entries, "lora", source, base, hint=config.hint, k=k, density=density, lora_r=config.r)


# ---------------------------------------------------------------- export


@dataclass
class LoraTensor:
    """One row of a LoRA export's table: what became of one entry of the diff."""

    name: str
    kind: str  # "lora" (factorized), "saved" (modules_to_save, exact) or "dropped"
    error: float  # relative Frobenius error of this entry's delta: 0 exact, 1 lost entirely
    rank: int | None = None  # LoRA rank used (lora rows)
    reason: str | None = None  # why it was dropped, or a note


@dataclass
class LoraExport:
    """What exporting to LoRA kept: per entry (`tensors`), and the relative Frobenius error of all
    sparse deltas together (`total_error`; dense entries are kept exactly or listed as dropped)."""

    path: Path
    rank: int  # the adapter's r: the requested rank, capped at the largest matrix's smaller side
    requested_rank: int = 0
    tensors: list[LoraTensor] = field(default_factory=list)
    total_error: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    capped: dict[str, int] = field(default_factory=dict)  # module -> rank, where below the requested one
    notes: list[str] = field(default_factory=list)
    # the model class the keys are spelled for (the config patch's architecture); None: as the base
    # (or the diff) spells them
    target_model: str | None = None

    @property
    def errors(self) -> dict[str, float]:
        return {t.name: t.error for t in self.tensors}

    @property
    def unrepresented(self) -> list[str]:
        """Entries the adapter does not hold at all (sparse or dense)."""
        return [t.name for t in self.tensors if t.kind == "dropped"]

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "requested_rank": self.requested_rank, "total_error": self.total_error,
                "modules_to_save": self.modules_to_save, "capped_ranks": self.capped, "notes": self.notes,
                "target_model": self.target_model,
                "tensors": [{"name": t.name, "kind": t.kind, "rank": t.rank, "error": t.error, "reason": t.reason}
                            for t in self.tensors]}


def _factorize(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(B, A) with B@A the best rank-`rank` approximation, residual² and norm² of `delta`
    (`rank` is at most min(delta.shape))."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    b = (u[:, :rank] * root).astype(np.float32)
    a = (root[:, None] * vt[:rank]).astype(np.float32)
    return b, a, float(np.sum(s[rank:] ** 2)), float(np.sum(s ** 2))


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _lora_form(name: str, entry: Entry) -> bool:
    return isinstance(entry, SparseEntry) and len(entry.shape) == 2 and name.endswith(".weight")


def _saved_modules(diff: SparseDiff, base: Checkpoint | None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Modules the adapter keeps whole (PEFT `modules_to_save`): every module with a dense entry, and
    with a base also every module whose sparse entries have no LoRA form (biases, norms), since their
    full values base + delta are then known (a module with a dense entry and a sparse .weight is
    saved whole too, with a base, rather than adapted). Returns (module -> entry names, entry -> why
    dropped)."""
    by_module: dict[str, list[str]] = {}
    for name in sorted(diff.entries):
        by_module.setdefault(_module_of(name), []).append(name)
    saved: dict[str, list[str]] = {}
    dropped: dict[str, str] = {}
    for module, names in by_module.items():
        entries = {n: diff.entries[n] for n in names}
        has_dense = any(isinstance(e, DenseEntry) for e in entries.values())
        lora_able = [n for n, e in entries.items() if _lora_form(n, e)]
        if not has_dense and (lora_able or base is None):
            continue  # LoRA factors, and without a base no full values for the rest
        if not module:
            for n in names:
                dropped[n] = "a top-level parameter belongs to no module that modules_to_save could hold"
            continue
        if has_dense and lora_able and base is None:
            for n in names:
                dropped[n] = (f"module {module!r} has both a dense entry and a sparse .weight entry; PEFT cannot "
                              "both save a module whole and adapt it, and without --base the weight's full value "
                              "is unknown")
            continue
        saved[module] = names
    return saved, dropped


def _full_value(name: str, entry: Entry, base: Checkpoint | None,
                target: str | None) -> tuple[np.ndarray | None, str | None]:
    """The parameter's complete value for modules_to_save (in its dtype), or (None, why not)."""
    if isinstance(entry, DenseEntry):
        if base is not None and target is not None and tuple(base.tensors[target].shape) != entry.shape:
            return None, (f"its shape {list(entry.shape)} differs from the base's {list(base.tensors[target].shape)}; "
                          "a PEFT adapter cannot resize a module")
        return _exact_array(np.asarray(entry.values), entry.dtype), None
    if base is None:
        return None, "a sparse entry in a module saved whole needs --base to write its full value"
    if target is None:
        return None, "the base has no such parameter to add the delta to"
    from ..dtypes import from_float32, scaled_delta, to_float32

    t = base.tensors[target]
    if t.dtype not in ("F16", "BF16", "F32", "F64"):
        return None, f"the base's parameter is {t.dtype}, not floating point"
    wide = np.dtype(np.float64 if t.dtype == "F64" else np.float32)
    work = np.array(base.array(target), copy=True).reshape(-1)
    work = (work if t.dtype == "F64" else to_float32(work, t.dtype)).astype(wide)
    work[np.asarray(entry.indices, dtype=np.int64)] += scaled_delta(entry.values, entry.dtype, 1.0, wide)
    # as `bake` rounds it into the base's dtype, and kept exactly in that dtype
    value = work if t.dtype == "F64" else from_float32(work, t.dtype)
    return _exact_array(value, t.dtype).reshape(entry.shape), None


def _whole_module(module: str, names: list[str], diff: SparseDiff, base: Checkpoint | None,
                  mapping: dict[str, str | None]) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """Every parameter of `module` as modules_to_save stores it (keys as the diff spells them):
    the diff's entries as full values, and with a base its other parameters (and buffers) as they
    are, since PEFT loads a saved module only complete. (None, why) when some value is unknown."""
    values: dict[str, np.ndarray] = {}
    for name in names:
        value, why = _full_value(name, diff.entries[name], base, mapping.get(name))
        if value is None:
            return None, f"module {module!r} cannot be saved whole ({name.rsplit('.', 1)[-1]}: {why})"
        values[name] = value
    targets = [mapping.get(n) for n in names if mapping.get(n) is not None]
    if base is not None and targets:
        base_module = targets[0].rsplit(".", 1)[0] if "." in targets[0] else ""
        for other, t in base.tensors.items():
            parent, _, leaf = other.rpartition(".")
            key = f"{module}.{leaf}"
            if parent != base_module or key in values:
                continue
            values[key] = _exact_array(np.asarray(base.array(other)), t.dtype)
    return values, None


def _exact_array(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as a numpy array the adapter writer keeps exactly (BF16 widened to float32)."""
    from ..dtypes import to_float32

    return to_float32(raw, "BF16") if dtype == "BF16" else np.array(raw, copy=True)


def _target_architecture(diff: SparseDiff) -> str | None:
    """The model class the diff's config patch names (`architectures[0]`), if any."""
    patch = diff.meta.config_patch
    archs = patch.get("architectures") if isinstance(patch, dict) else None
    if isinstance(archs, list) and archs and isinstance(archs[0], str) and archs[0]:
        return archs[0]
    return None


def _architecture_prefix(arch: str) -> tuple[str | None, str | None]:
    """(`base_model_prefix` + ".", or "" for a bare model class; None and why when transformers
    does not know `arch`). Imported here only: the other exports never need transformers."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    except ImportError:
        return None, "transformers is not installed"
    try:
        cls = getattr(transformers, arch)
    except (AttributeError, ImportError, RuntimeError):
        return None, "transformers has no such model class (custom code?)"
    prefix = getattr(cls, "base_model_prefix", "")
    bare = {n for v in MODEL_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    if not isinstance(prefix, str) or not prefix or arch in bare:
        return "", None  # the bare model itself (or one without a prefix): names as the base has them
    return prefix + ".", None


def _spell_for_target(diff: SparseDiff, base: Checkpoint | None) -> tuple[SparseDiff, str | None, list[str]]:
    """The diff with names as the model the adapter is loaded onto spells them, that model's class
    (None if unknown), and notes. PEFT matches adapter keys against that model's own names and
    silently leaves unmatched LoRA weights at zero, so the spelling decides whether the adapter
    does anything. The target is the config patch's architecture (a head model: a bare base plus
    e.g. `classifier`); its base-model names are the bare base's names with the class's
    `base_model_prefix`, its head names stay bare. Without an architecture the names stay as the
    base (or the diff) spells them."""
    notes: list[str] = []
    if base is not None:  # first as the base spells them: the base-model names are the base's
        spelling = NameMap(base.tensors, diff.entries)
        diff = SparseDiff({spelling.spell(n): diff.entries[n] for n in diff.entries}, diff.meta)
    arch = _target_architecture(diff)
    if arch is None:
        return diff, None, notes
    prefix, why = _architecture_prefix(arch)
    if prefix is None:
        notes.append(f"the diff's config patch names {arch}, but {why}: keys are spelled as "
                     f"{'the base' if base is not None else 'the diff'} spells them; load the adapter onto a "
                     "model with those names")
        return diff, None, notes
    # The base model's names: the base's, else those whose base digests the diff recorded.
    recorded = diff.meta.base.get("tensors")
    model_names = set(base.tensors) if base is not None else set(recorded) if isinstance(recorded, dict) else set()
    if prefix and not model_names:
        notes.append(f"the adapter is for {arch}, but neither --base nor the diff's recorded base digests say "
                     "which entries belong to its base model (those take the prefix "
                     f"{prefix!r}) and which to its head: keys are spelled as the diff spells them; pass --base")
        return diff, None, notes
    if prefix and not any(n.startswith(prefix) for n in model_names):
        # a bare base: the head model holds it under the prefix (names of its heads stay bare)
        model_names = {prefix + n for n in model_names}
    spelling = NameMap(model_names, diff.entries)
    respelled = {spelling.spell(n): diff.entries[n] for n in diff.entries}
    if len(respelled) != len(diff.entries):
        raise FormatError(f"the diff spells one parameter of {arch} twice (with and without {prefix!r}); "
                          "combine those entries first")
    how = f" ({prefix!r} + the base model's names, heads bare)" if list(respelled) != list(diff.entries) else ""
    notes.append(f"the adapter is for {arch}, the model the diff's config patch names: keys are spelled as it "
                 f"spells them{how}; load it onto that model")
    return SparseDiff(respelled, diff.meta), arch, notes


def export_lora(diff: SparseDiff, out: Path, rank: int, *, overwrite: bool,
                base: Checkpoint | None = None) -> LoraExport:
    """A PEFT LoRA adapter: each 2-D sparse `.weight` entry by a truncated SVD of rank
    min(`rank`, its smaller side) (scaling 1), and modules with dense entries (a trained head)
    saved whole in `modules_to_save`, as PEFT holds them. Names are written as the model the adapter
    is loaded onto spells them: the config patch's architecture if it names one (`report.target_model`),
    else the base (with `base`), else the diff. With `base`, modules whose sparse entries have no LoRA
    form (biases, norms) are saved whole too, with their full values base + delta.
    Whatever remains (e.g. the bias of a LoRA-adapted linear layer) is dropped and reported."""
    from ..errors import UsageError

    if rank < 1:
        raise UsageError("--rank must be at least 1 to export a LoRA adapter")
    # PEFT matches keys against the model's own names: spell them as the model it is loaded onto does
    diff, target, notes = _spell_for_target(diff, base)
    report = LoraExport(out, rank, requested_rank=rank, target_model=target, notes=notes)
    tensors: dict[str, np.ndarray] = {}
    linear, embedding = [], []
    lost = total = 0.0
    saved, dropped = _saved_modules(diff, base)
    mapping = NameMap(base.tensors, diff.entries).lookup(diff.entries) if base is not None else {}
    kept: set[str] = set()
    for module, names in saved.items():
        values, why = _whole_module(module, names, diff, base, mapping)
        if values is None:
            dropped.update({n: why for n in names})
            continue
        tensors.update({PEFT_PREFIX + key: value for key, value in values.items()})
        kept.update(names)
        report.modules_to_save.append(module)
        if base is None:
            leaves = ", ".join(n[len(module) + 1:] for n in names)
            report.notes.append(f"{module}: saved from the diff's entries alone ({leaves}); PEFT needs every "
                                "parameter of a module in modules_to_save, so if it has others, export with --base")
    ranks: dict[str, int] = {}
    for name in sorted(diff.entries):
        entry = diff.entries[name]
        sparse_norm = (float(np.sum(entry.values_f32().astype(np.float64) ** 2))
                       if isinstance(entry, SparseEntry) else 0.0)
        if name in kept:
            report.tensors.append(LoraTensor(name, "saved", 0.0))
            total += sparse_norm
            continue
        if name in dropped or not _lora_form(name, entry):
            why = dropped.get(name) or "not a 2-D .weight: no LoRA form" + (
                "" if base is not None else " (with --base, a norm or a bias of a module without LoRA is saved whole)")
            report.tensors.append(LoraTensor(name, "dropped", 1.0, reason=why))
            lost, total = lost + sparse_norm, total + sparse_norm
            continue
        assert isinstance(entry, SparseEntry)
        module = name[: -len(".weight")]
        dense = entry.to_dense()
        is_embedding = bool(_EMBEDDING_NAME.search(name))
        r = min(rank, *dense.shape)
        b, a, residual, norm = _factorize(dense.T if is_embedding else dense, r)
        error = math.sqrt(residual / norm) if norm else 0.0
        report.tensors.append(LoraTensor(name, "lora", error, rank=r))
        ranks[module] = r
        lost, total = lost + residual, total + norm
        if is_embedding:
            embedding.append(module)
            tensors[PEFT_PREFIX + module + _EMBEDDING[0]] = a
            tensors[PEFT_PREFIX + module + _EMBEDDING[1]] = b
        else:
            linear.append(module)
            tensors[PEFT_PREFIX + module + _LINEAR[0]] = a
            tensors[PEFT_PREFIX + module + _LINEAR[1]] = b
    if not linear and not embedding:
        # PEFT needs some LoRA target (an adapter of only modules_to_save does not load): say so
        # rather than write one it cannot load.
        raise FormatError("the diff has no 2-D .weight sparse entries to adapt, so it makes no LoRA adapter "
                          "(PEFT needs at least one LoRA module); export to another format")
    report.total_error = math.sqrt(lost / total) if total else 0.0
    report.rank = max(ranks.values(), default=rank)
    report.capped = {m: r for m, r in sorted(ranks.items()) if r < rank}
    report.modules_to_save.sort()
    # Modules below the adapter's r get it through rank_pattern, with alpha = r so scaling stays 1.
    # PEFT reads pattern keys as regexes matched against the end of a module name.
    below = {re.escape(m): r for m, r in sorted(ranks.items()) if r < report.rank}
    config = {
        "peft_type": PEFT_TYPE, "base_model_name_or_path": diff.meta.base_hint, "task_type": None,
        "r": report.rank, "lora_alpha": report.rank, "use_rslora": False, "use_dora": False, "bias": "none",
        "fan_in_fan_out": False, "lora_dropout": 0.0, "inference_mode": True, "init_lora_weights": True,
        "target_modules": sorted(linear + embedding), "modules_to_save": report.modules_to_save or None,
        "rank_pattern": below, "alpha_pattern": dict(below),
    }
    write_adapter(out, config, tensors, overwrite=overwrite)
    return report
