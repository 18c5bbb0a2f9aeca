"""Tiny transformers models and diffs for tests, built deterministically from configs.

Importing this module imports torch and transformers; tests that use it should set
HF_HUB_OFFLINE=1 (done here too, before transformers is imported).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from sftdiff.checkpoint import Checkpoint  # noqa: E402
from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry  # noqa: E402
from sftdiff.dtypes import FLOAT_DTYPES, from_float32  # noqa: E402
from sftdiff.fingerprint import checkpoint_digests, model_fingerprint, tensor_digest  # noqa: E402

transformers.logging.set_verbosity_error()


def tiny_bert_config(**overrides: Any) -> transformers.BertConfig:
    fields = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    fields.update(overrides)
    return transformers.BertConfig(**fields)


def tiny_llama_config(**overrides: Any) -> transformers.LlamaConfig:
    fields = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                  tie_word_embeddings=False)
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


def build(model_class: type, config: Any, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(seed)
    return model_class(config).to(dtype).eval()


def save(model: Any, folder: str | os.PathLike, max_shard_size: str | int | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


def random_diff(base: Checkpoint, seed: int, density: float = 0.05, *, names: Iterable[str] | None = None,
                dense: Mapping[str, np.ndarray] | None = None, config_patch: dict | None = None,
                record: str = "tensors", value_dtype: str = "F32", rename: str = "") -> SparseDiff:
    """A diff of random sparse deltas over `names` (default: every float tensor of `base`) plus
    `dense` entries (float32 arrays), recording base digests as `create` does (`record`:
    "tensors", "fingerprint" or "none"). `rename` prefixes entry names (a diff made from a
    checkpoint that spells names with the base-model prefix)."""
    rng = np.random.default_rng(seed)
    names = sorted(names if names is not None else
                   [n for n, t in base.tensors.items() if t.dtype in FLOAT_DTYPES and n not in base.aliases])
    entries: dict[str, Any] = {}
    for name in names:
        t = base.tensors[name]
        k = max(1, int(t.numel * density))
        idx = np.sort(rng.choice(t.numel, size=k, replace=False))
        values = rng.normal(0, 0.05, size=k).astype(np.float32)
        values[values == 0] = 0.01
        entry = SparseEntry.from_float(t.shape, idx, values, value_dtype, t.dtype)
        if entry is not None:
            entries[rename + name] = entry
    for name, array in (dense or {}).items():
        entries[name] = DenseEntry(np.asarray(array, dtype=np.float32), "F32", None)
    meta_base: dict[str, Any] = {"hint": base.path}
    if record in ("tensors", "fingerprint"):
        meta_base["fingerprint"] = model_fingerprint(checkpoint_digests(base))
    if record == "tensors":
        meta_base["tensors"] = {rename + n: tensor_digest(base.tensors[n].dtype, base.tensors[n].shape, base.array(n))
                                for n in names}
    meta = DiffMeta(base=meta_base, origin={"tool": "tests", "method": "random"}, config_patch=config_patch)
    return SparseDiff(entries, meta)


def head_arrays(names_shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, 0.2, size=s).astype(np.float32) for n, s in names_shapes.items()}


def state_numpy(model: Any) -> dict[str, np.ndarray]:
    """A model's state dict as numpy (bf16 as its uint16 bits), for exact comparisons."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().clone()  # a copy: later in-place changes must not show here
        out[name] = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def rounded(array_f32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded once to `dtype`'s storage (what a bake of a float32 sum writes)."""
    return from_float32(np.asarray(array_f32, dtype=np.float32), dtype)


def tree_hashes(*roots: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under the given files/folders (to show inputs are left unchanged)."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_main(args: list[str]) -> int:
    """Run the CLI in-process and return its exit code (the CLI ends with sys.exit on errors)."""
    from sftdiff.cli import main

    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def run_cli(args: list, capsys: Any) -> tuple[int, str, str]:
    """Run the CLI in-process on `args` (paths allowed): (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = run_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
