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
                   source=source)

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
class LoraExport:
    """What exporting to LoRA kept: relative Frobenius error per tensor and over all of them."""

    path: Path
    rank: int
    errors: dict[str, float] = field(default_factory=dict)
    total_error: float = 0.0
    unrepresented: list[str] = field(default_factory=list)  # non-2-D deltas, lost entirely


def _factorize(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(B, A) with B@A the best rank-`rank` approximation, residual² and norm² of `delta`."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    r = min(rank, len(s))
    root = np.sqrt(s[:r])
    b = np.zeros((delta.shape[0], rank), dtype=np.float32)
    a = np.zeros((rank, delta.shape[1]), dtype=np.float32)
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vt[:r]
    return b, a, float(np.sum(s[r:] ** 2)), float(np.sum(s ** 2))


def export_lora(diff: SparseDiff, out: Path, rank: int, *, overwrite: bool) -> LoraExport:
    """A PEFT LoRA adapter approximating each 2-D sparse entry by a rank-`rank` SVD (scaling 1).

    Deltas that are not 2-D (biases, norms) have no LoRA form: they are reported in
    `unrepresented` and count fully towards the total error. Dense entries are refused."""
    if rank < 1:
        raise FormatError("--rank must be at least 1 to export a LoRA adapter")
    report = LoraExport(out, rank)
    tensors: dict[str, np.ndarray] = {}
    linear, embedding = [], []
    lost = total = 0.0
    for name in sorted(diff.entries):
        entry = diff.entries[name]
        if isinstance(entry, DenseEntry):
            raise FormatError(f"entry {name!r} is a dense replacement, which a LoRA adapter cannot express; "
                              "remove it or export to another format")
        assert isinstance(entry, SparseEntry)
        values = entry.values_f32().astype(np.float64)
        if len(entry.shape) != 2 or not name.endswith(".weight"):
            report.unrepresented.append(name)
            report.errors[name] = 1.0
            norm = float(values @ values)
            lost, total = lost + norm, total + norm
            continue
        module = name[: -len(".weight")]
        dense = entry.to_dense()
        is_embedding = bool(_EMBEDDING_NAME.search(name))
        b, a, residual, norm = _factorize(dense.T if is_embedding else dense, rank)
        report.errors[name] = math.sqrt(residual / norm) if norm else 0.0
        lost, total = lost + residual, total + norm
        if is_embedding:
            embedding.append(module)
            tensors[PEFT_PREFIX + module + _EMBEDDING[0]] = a
            tensors[PEFT_PREFIX + module + _EMBEDDING[1]] = b
        else:
            linear.append(module)
            tensors[PEFT_PREFIX + module + _LINEAR[0]] = a
            tensors[PEFT_PREFIX + module + _LINEAR[1]] = b
    if not tensors:
        raise FormatError("the diff has no 2-D .weight entries, so there is nothing a LoRA adapter can hold")
    report.total_error = math.sqrt(lost / total) if total else 0.0
    config = {
        "peft_type": PEFT_TYPE, "base_model_name_or_path": diff.meta.base_hint, "task_type": None,
        "r": rank, "lora_alpha": rank, "use_rslora": False, "use_dora": False, "bias": "none",
        "fan_in_fan_out": False, "lora_dropout": 0.0, "inference_mode": True, "init_lora_weights": True,
        "target_modules": sorted(linear + embedding), "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    write_adapter(out, config, tensors, overwrite=overwrite)
    return report
