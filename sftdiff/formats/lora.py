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
from .common import (PEFT_PREFIX, make_diff, read_adapter_config, read_adapter_weights, strip_peft_prefix,
                     topk_from_dense, write_adapter)

PEFT_TYPE = "LORA"
_LINEAR = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING = (".lora_embedding_A", ".lora_embedding_B")
# Parameter names that belong to embedding layers, which PEFT adapts with lora_embedding_A/B.
_EMBEDDING_NAME = re.compile(r"(^|\.)(\w*embed\w*|wte|wpe|shared)\.weight$")


def pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name or a dotted suffix."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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
                          f"{config.get('bias')!r}), which are full replacements not recorded as deltas")


@dataclass
class _Module:
    a: np.ndarray | None = None
    b: np.ndarray | None = None
    embedding: bool = False


def _scaling(config: Mapping[str, Any], module: str, rank: int, folder: Path) -> float:
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if r != rank:
        raise FormatError(f"{folder}: module {module!r} has rank {rank} but the config says r={r}")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _delta(m: _Module, scale: float, fan_in_fan_out: bool) -> np.ndarray:
    product = (m.b.astype(np.float32) @ m.a.astype(np.float32)) * np.float32(scale)
    return product.T if (m.embedding or fan_in_fan_out) else product


def read_lora(folder: Path) -> tuple[dict[str, Any], dict[str, _Module], dict[str, np.ndarray]]:
    """(config, module -> A/B, dense parameters from modules_to_save) of an adapter folder."""
    config = read_adapter_config(folder)
    if str(config.get("peft_type", "")).upper() != PEFT_TYPE:
        raise FormatError(f"{folder}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    _check_supported(config, folder)
    saved = [s for s in (config.get("modules_to_save") or [])]
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
                setattr(m, side, np.asarray(array, dtype=np.float32))
                break
        else:
            owner = name.rsplit(".", 1)[0]
            if any(owner == s or owner.endswith("." + s) for s in saved):
                dense[name] = np.asarray(array, dtype=np.float32)
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
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    scales = {m: _scaling(config, m, mod.a.shape[0], folder) for m, mod in modules.items()}
    names = {m + ".weight": m for m in modules}

    def shape_of(name: str) -> tuple[int, ...]:
        m = modules[names[name]]
        rows, cols = m.b.shape[0], m.a.shape[1]
        return (cols, rows) if (m.embedding or fan_in_fan_out) else (rows, cols)

    def delta_of(name: str) -> np.ndarray:
        return _delta(modules[names[name]], scales[names[name]], fan_in_fan_out)

    entries: dict[str, Entry] = dict(topk_from_dense(list(names), shape_of, delta_of, k, density))
    for name, values in dense.items():
        if name in entries:
            raise FormatError(f"{folder}: {name!r} is both LoRA-adapted and in modules_to_save")
        if not np.isfinite(values).all():
            raise FormatError(f"{folder}: {name!r} contains NaN or infinity")
        entries[name] = DenseEntry(values, "F32")
    return make_diff(entries, "lora", source, base, hint=config.get("base_model_name_or_path"),
                     k=k, density=density, lora_r=config.get("r"))


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
