"""Synthetic checkpoints for the benchmarks (tools/bench_create.py, bench_apply.py): the two workloads of
issue 14's table, generated with numpy only, seeded, so every run and every script measures the same bytes.

  llama  TinyLlama-1.1B shapes, bfloat16, 3 shards (save_pretrained layout with an index)
  bert   BERT-base shapes (110M), float32, one model.safetensors
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np

from sftdiff.dtypes import from_float32
from sftdiff.safetensors_io import StreamingWriter

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
             intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
             max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16",
             hidden_act="silu", rope_theta=10000.0)
BERT = dict(architectures=["BertForMaskedLM"], model_type="bert", vocab_size=30522, hidden_size=768,
            num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
            type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, torch_dtype="float32")
WORKLOADS = {
    "llama": dict(config=LLAMA, dtype="BF16", shards=3, label="1.1B bf16 Llama-shape, 3 shards"),
    "bert": dict(config=BERT, dtype="F32", shards=1, label="110M fp32 BERT-base shape, 1 file"),
}


def llama_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, m, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    out = [("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (m, h)), (p + "mlp.up_proj.weight", (m, h)),
                (p + "mlp.down_proj.weight", (h, m))]
    return out


def bert_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, m = c["hidden_size"], c["intermediate_size"]
    out = [("bert.embeddings.word_embeddings.weight", (c["vocab_size"], h)),
           ("bert.embeddings.position_embeddings.weight", (c["max_position_embeddings"], h)),
           ("bert.embeddings.token_type_embeddings.weight", (c["type_vocab_size"], h)),
           ("bert.embeddings.LayerNorm.weight", (h,)), ("bert.embeddings.LayerNorm.bias", (h,))]
    for i in range(c["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out += [(p + part + ".weight", (h, h)), (p + part + ".bias", (h,))]
        out += [(p + "attention.output.LayerNorm.weight", (h,)), (p + "attention.output.LayerNorm.bias", (h,)),
                (p + "intermediate.dense.weight", (m, h)), (p + "intermediate.dense.bias", (m,)),
                (p + "output.dense.weight", (h, m)), (p + "output.dense.bias", (h,)),
                (p + "output.LayerNorm.weight", (h,)), (p + "output.LayerNorm.bias", (h,))]
    out += [("cls.predictions.bias", (c["vocab_size"],)), ("cls.predictions.transform.dense.weight", (h, h)),
            ("cls.predictions.transform.dense.bias", (h,)),
            ("cls.predictions.transform.LayerNorm.weight", (h,)), ("cls.predictions.transform.LayerNorm.bias", (h,))]
    return out


def shapes(workload: str) -> list[tuple[str, tuple[int, ...]]]:
    config = WORKLOADS[workload]["config"]
    return llama_shapes(config) if config["model_type"] == "llama" else bert_shapes(config)


def numel(workload: str) -> int:
    return sum(int(np.prod(s)) for _, s in shapes(workload))


def _split(items: list[tuple[str, tuple[int, ...]]], count: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    total = sum(int(np.prod(s)) for _, s in items)
    parts: list[list] = [[]]
    filled = 0
    for name, shape in items:
        if parts[-1] and filled >= total * len(parts) / count and len(parts) < count:
            parts.append([])
        parts[-1].append((name, shape))
        filled += int(np.prod(shape))
    return parts


def generate(folder: Path, workload: str, seed: int = 0, perturb: float = 0.0) -> None:
    """Weights N(0, 0.02) (norm weights 1, biases 0); with `perturb`, every value moved by
    N(0, perturb) from the same base: a full fine-tune that changes nearly every value."""
    spec = WORKLOADS[workload]
    dtype = spec["dtype"]
    folder.mkdir(parents=True)
    parts = _split(shapes(workload), spec["shards"])
    files = ["model.safetensors"] if len(parts) == 1 else \
        [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    weight_map = {}
    for file, part in zip(files, parts):
        with open(folder / file, "wb") as f:
            writer = StreamingWriter(f, [(n, dtype, s) for n, s in part], {"format": "pt"})
            for name, shape in part:
                rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
                if len(shape) == 1:
                    values = np.full(shape, 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0,
                                     np.float32)
                else:
                    values = rng.standard_normal(shape, dtype=np.float32)
                    values *= np.float32(0.02)
                if perturb:
                    noise = np.random.default_rng([seed + 1, zlib.crc32(name.encode())])
                    values += noise.standard_normal(shape, dtype=np.float32) * np.float32(perturb)
                writer.write(name, from_float32(values, dtype))
                weight_map[name] = file
            writer.close()
    if len(files) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(spec["config"], indent=2))


def ensure_pair(root: Path, workload: str) -> tuple[Path, Path]:
    """The base and a perturbed full fine-tune of `workload` under root (made once)."""
    base, ft = root / workload / "base", root / workload / "ft"
    if not (base.exists() and ft.exists()):
        shutil.rmtree(root / workload, ignore_errors=True)
        start = time.perf_counter()
        generate(base, workload, seed=0)
        generate(ft, workload, seed=0, perturb=0.002)
        print(f"generated {workload} base and fine-tune in {time.perf_counter() - start:.0f} s", flush=True)
    return base, ft


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def warm(paths: list[Path]) -> None:
    """Read files into the page cache."""
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cached_bytecode_env(root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a timed `sftdiff` child: its bytecode cached under root/pycache, as an
    installed package's is (pip compiles it at install time). Without this, PYTHONDONTWRITEBYTECODE
    (set on these machines) makes every run recompile every module, ~75 ms no user pays."""
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    return env
