#!/usr/bin/env python3
"""Mutation fuzzer for every reader of untrusted files in sftdiff.

    python tools/fuzz.py --seconds 300 --seed 1 [--targets sft,composable] [--out fuzz-findings]

Each target starts from valid seed files (built here, deterministically) and runs its reader on
mutated copies: byte flips, truncation, splices, forged header lengths, structural edits of the
safetensors JSON header and of the `sft` metadata, poisoned tensor data (NaN, zeros, unsorted or
out-of-range indices), edits of torch pickles inside their zip archive, and regenerated
composable-sft objects with hostile contents. A case passes when the reader succeeds or raises an
`SftError` whose exit code is 3 (bad input) or 4 (verification); anything else (another
exception, a hang past --case-timeout, a MemoryError under the address-space limit) is a finding,
saved with a reproducer folder and its traceback. Prints cases tried per target.

The `sft-vs-spec-reader` target is differential: sftdiff's reader and tools/read_sft_numpy.py (written
from spec/format.md alone) must agree on every mutated file, both refusing it or both accepting it
with the same entries and values; a disagreement (two readers of one format that differ on what a
file means, e.g. a header padded with a newline, a `format_version` of " 1.0", a duplicate key in
the `sft` metadata) is a finding.

The module is importable: tests/test_fuzz.py drives the same targets and mutators with a fixed
seed and a bounded number of cases.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sftdiff.errors import FormatError, SftError, VerificationError  # noqa: E402

Files = dict[str, bytes]  # relative path -> content: one fuzz case


class CaseTimeout(BaseException):
    """Raised by the alarm when one case runs too long (a BaseException, so readers cannot swallow it)."""


# ====================================================================== seeds


def _sft_bytes(folder: Path, entries: dict[str, Any], **meta: Any) -> bytes:
    from sftdiff.diff import DiffMeta, SparseDiff

    path = folder / f"seed-{len(list(folder.iterdir()))}.sft"
    SparseDiff(entries, DiffMeta(**meta)).save(path)
    data = path.read_bytes()
    path.unlink()
    return data


def _toy_entries() -> dict[str, Any]:
    from sftdiff.diff import DenseEntry, SparseEntry

    rng = np.random.default_rng(0)
    return {
        "encoder.layer.0.attention.self.query.weight": SparseEntry.from_float(
            (8, 8), np.array([0, 3, 9, 17, 40, 63]), rng.normal(size=6).astype(np.float32), "F32", "F32"),
        "encoder.layer.0.output.dense.bias": SparseEntry.from_float(
            (8,), np.array([1, 6]), np.array([0.5, -0.25], np.float32), "F32", "F32"),
        "embeddings.word_embeddings.weight": SparseEntry.from_float(
            (16, 8), np.array([5, 77, 120]), np.array([1.0, -2.0, 3.0], np.float32), "F32", "F32"),
        "classifier.weight": DenseEntry(rng.normal(size=(3, 8)).astype(np.float32), "F32", None),
    }


def sft_seeds(work: Path) -> list[Files]:
    """Valid .sft files covering every value dtype, dense entries, 0-d parameters, odd names."""
    from sftdiff.diff import DenseEntry, SparseEntry

    entries = _toy_entries()
    meta = dict(base={"hint": "toy", "fingerprint": "sfp1:" + "0" * 32, "tensors": {"classifier.weight": "1" * 32},
                      "numel": 400},
                origin={"tool": "fuzz", "method": "topk", "k": 11, "density": 0.01},
                user={"description": "seed", "task": "x"}, config_patch={"num_labels": 3},
                provenance={"operation": "add", "operands": [{"name": "a"}]})
    seeds = [_sft_bytes(work, entries, **meta)]
    for dtype in ("BF16", "F16"):
        seeds.append(_sft_bytes(work, {"w": SparseEntry.from_float((4, 4), np.array([1, 5, 15]),
                                                                   np.array([0.5, -2.0, 7.0], np.float32), dtype, dtype)}))
    seeds.append(_sft_bytes(work, {"scalar": SparseEntry.from_float((), np.array([0]), np.array([2.0], np.float32)),
                                   "values/x": DenseEntry(np.arange(4, dtype=np.int64), "I64", "I64"),
                                   "ünï cødé/\"q\"": DenseEntry(np.ones((2, 2), np.uint16), "BF16", "BF16")}))
    return [{"d.sft": s} for s in seeds]


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None) -> None:
    from sftdiff.safetensors_io import StreamingWriter

    specs = [(n, dt, tuple(a.shape)) for n, (dt, a) in tensors.items()]
    with open(path, "wb") as f:
        w = StreamingWriter(f, specs, metadata)
        for n, (_, a) in tensors.items():
            w.write(n, a)
        w.close()


def _toy_checkpoint_tensors() -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return {
        "embeddings.word_embeddings.weight": ("F32", rng.normal(size=(16, 8)).astype(np.float32)),
        "encoder.layer.0.attention.self.query.weight": ("F32", rng.normal(size=(8, 8)).astype(np.float32)),
        "encoder.layer.0.output.dense.bias": ("F16", rng.normal(size=(8,)).astype(np.float16)),
        "encoder.layer.0.output.LayerNorm.weight": ("BF16", np.full((8,), 0x3F80, np.uint16)),
        "embeddings.position_ids": ("I64", np.arange(8, dtype=np.int64).reshape(1, 8)),
    }


CONFIG_JSON = json.dumps({"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 8}).encode()


def checkpoint_seeds(work: Path) -> list[Files]:
    path = work / "model.safetensors"
    _write_safetensors(path, _toy_checkpoint_tensors(), {"format": "pt"})
    data = path.read_bytes()
    path.unlink()
    return [{"model.safetensors": data, "config.json": CONFIG_JSON}]


def sharded_seeds(work: Path) -> list[Files]:
    tensors = _toy_checkpoint_tensors()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    files: Files = {"config.json": CONFIG_JSON}
    weight_map = {}
    for shard, members in shards.items():
        _write_safetensors(work / shard, {n: tensors[n] for n in members}, {"format": "pt"})
        files[shard] = (work / shard).read_bytes()
        (work / shard).unlink()
        weight_map.update({n: shard for n in members})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}).encode()
    return [files]


def bin_seeds(work: Path) -> list[Files]:
    import torch

    state = {name: torch.from_numpy(np.array(a)) for name, (dt, a) in _toy_checkpoint_tensors().items() if dt != "BF16"}
    state["tied.a"] = state["tied.b"] = torch.ones(3, 2)
    state["bf"] = torch.ones(4, dtype=torch.bfloat16)
    buf = io.BytesIO()
    torch.save(state, buf)
    return [{"pytorch_model.bin": buf.getvalue(), "config.json": CONFIG_JSON}]


def composable_object(rng: random.Random, hostile: bool) -> Any:
    """A composable-sft `{'diffs', 'abs'}` object; with `hostile`, its fields get odd contents."""
    import torch

    diffs: dict[Any, Any] = {}
    for i in range(rng.randint(1, 3)):
        shape = rng.choice([(4, 4), (6,), (2, 3, 2), ()])
        numel = int(np.prod(shape)) if shape else 1
        k = rng.randint(1, numel)
        idx = sorted(rng.sample(range(numel), k))
        steps = [idx[0]] + [b - a for a, b in zip(idx, idx[1:])]
        values = torch.randn(k, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        diffs[f"layer.{i}.weight"] = {"size": torch.Size(shape), "index_steps": steps, "values": values}
    abs_: dict[Any, Any] = {"head.weight": torch.ones(2, 3)}
    if hostile:
        name = rng.choice(list(diffs))
        d = diffs[name]
        choice = rng.randrange(14)
        if choice == 0:
            d["index_steps"] = [2**62, 2**62, 2**62][: max(1, len(d["index_steps"]))] + [1] * (len(d["index_steps"]) - 3)
        elif choice == 1:
            d["index_steps"] = [-1] + d["index_steps"][1:]
        elif choice == 2:
            d["size"] = torch.Size([2**32, 2**32])
        elif choice == 3:
            d["size"] = torch.Size([2**40])
        elif choice == 4:
            d["values"] = torch.tensor([float("nan")] * len(d["index_steps"]))
        elif choice == 5:
            d["values"] = torch.zeros(len(d["index_steps"]))
        elif choice == 6:
            d["values"] = torch.arange(len(d["index_steps"]))
        elif choice == 7:
            d["index_steps"] = d["index_steps"] + [0, 0]
        elif choice == 8:
            d["size"] = [4, 4]
        elif choice == 9:
            abs_[name] = torch.ones(1)
        elif choice == 10:
            abs_["head.weight"] = torch.tensor([float("inf")])
        elif choice == 11:
            d["index_steps"] = [2**63 - 1, 1]
        elif choice == 12:
            del d["values"]
        else:
            diffs[7] = {"size": torch.Size([2]), "index_steps": [0], "values": torch.ones(1)}
    return {"diffs": diffs, "abs": abs_}


def _torch_save_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def composable_seeds(work: Path) -> list[Files]:
    rng = random.Random(0)
    return [{"pytorch_diff.bin": _torch_save_bytes(composable_object(rng, hostile=False))} for _ in range(2)]


def _adapter_seed(work: Path, export: Callable[[Any, Path], Any]) -> Files:
    from sftdiff.diff import SparseDiff

    diff = SparseDiff({k: v for k, v in _toy_entries().items() if k.endswith(".weight") and k != "classifier.weight"})
    out = work / "adapter-seed"
    shutil.rmtree(out, ignore_errors=True)
    export(diff, out)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.rmtree(out)
    return files


def peft_sft_seeds(work: Path) -> list[Files]:
    from sftdiff.formats.peft_sft import export_peft_sft

    return [_adapter_seed(work, lambda d, out: export_peft_sft(d, out, overwrite=False))]


def lora_seeds(work: Path) -> list[Files]:
    from sftdiff.formats.lora import export_lora

    return [_adapter_seed(work, lambda d, out: export_lora(d, out, 2, overwrite=False))]


def adapter_bin_seeds(work: Path) -> list[Files]:
    """A PEFT-SFT adapter whose weights are in adapter_model.bin (torch pickle) instead of safetensors."""
    import torch

    from sftdiff.safetensors_io import SafetensorsFile

    seeds = []
    for files in peft_sft_seeds(work):
        (work / "adapter_model.safetensors").write_bytes(files.pop("adapter_model.safetensors"))
        st = SafetensorsFile(work / "adapter_model.safetensors")
        state = {n: torch.from_numpy(np.array(st.array(n))) for n in st.tensors}
        files["adapter_model.bin"] = _torch_save_bytes(state)
        (work / "adapter_model.safetensors").unlink()
        seeds.append(files)
    return seeds


# ====================================================================== runners


def _base_checkpoint(work: Path) -> Any:
    """The toy base the adapter targets resolve against (built once per work folder)."""
    from sftdiff.checkpoint import Checkpoint

    folder = work / "toy-base"
    if not folder.exists():
        folder.mkdir()
        _write_safetensors(folder / "model.safetensors", _toy_checkpoint_tensors(), {"format": "pt"})
        (folder / "config.json").write_bytes(CONFIG_JSON)
    return Checkpoint.open(folder)


def _use_diff(diff: Any) -> None:
    """Everything a command does with a loaded diff's data: validate, summarize, densify small entries."""
    from sftdiff.summary import render, summarize

    diff.validate()
    render(summarize(diff))
    for name in diff.entries:
        entry = diff.entries[name]
        if entry.numel <= 1 << 16:
            getattr(entry, "to_dense", entry.values_f32)()


def run_sft(case: Path) -> None:
    from sftdiff.diff import SparseDiff

    _use_diff(SparseDiff.load(case / "d.sft"))


_NUMPY_READER: Any = None


def _numpy_reader() -> Any:
    """tools/read_sft_numpy.py, the reader written from the spec alone."""
    global _NUMPY_READER
    if _NUMPY_READER is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("read_sft_numpy", REPO / "tools" / "read_sft_numpy.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _NUMPY_READER = module
    return _NUMPY_READER


def run_sft_vs_spec_reader(case: Path) -> None:
    """sftdiff and the independent spec reader must agree: both refuse a file, or both accept it
    and see the same entries with the same values. A disagreement is a finding (two readers of
    one format that differ on what a file means)."""
    from sftdiff.diff import SparseDiff, SparseEntry

    reader = _numpy_reader()
    path = case / "d.sft"
    ours: Any = None
    try:
        ours = SparseDiff.load(path)
        ours.validate()
    except FormatError as e:
        ours = e
    try:
        theirs = reader.SftFile(path)
        for name in theirs.entries:
            theirs.check(name)
    except reader.SftReadError as e:
        theirs = e
    if isinstance(ours, Exception) and isinstance(theirs, Exception):
        raise FormatError(f"both readers refuse: {ours}")
    if isinstance(ours, Exception) or isinstance(theirs, Exception):
        raise AssertionError(f"readers disagree: sftdiff {'refuses' if isinstance(ours, Exception) else 'accepts'}"
                             f" ({ours if isinstance(ours, Exception) else ''}), the spec reader "
                             f"{'refuses' if isinstance(theirs, Exception) else 'accepts'}"
                             f" ({theirs if isinstance(theirs, Exception) else ''})")
    if sorted(ours.entries) != sorted(theirs.entries):
        raise AssertionError("readers see different entries")
    for name in ours.entries:
        entry = ours.entries[name]
        if entry.numel > 1 << 16:
            continue
        mine = entry.to_dense() if isinstance(entry, SparseEntry) else entry.values_f32()
        other = np.asarray(theirs.reconstruct(name), np.float32).reshape(-1)
        if not np.array_equal(np.asarray(mine).reshape(-1), other):
            raise AssertionError(f"readers reconstruct entry {name!r} differently")


def run_inspect_cli(case: Path) -> None:
    """`sftdiff inspect FILE --json` in-process: exit 0, or exit 3 with exactly one stderr line."""
    from sftdiff.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["inspect", str(case / "d.sft"), "--json"])
        except SystemExit as e:
            code = e.code
    lines = err.getvalue().strip().splitlines()
    if code == 0:
        json.loads(out.getvalue())
        return
    if code not in (3, 4) or len(lines) != 1 or not lines[0].startswith("sftdiff: error: "):
        raise AssertionError(f"inspect exited {code!r} with stderr {err.getvalue()[:500]!r}")
    raise (FormatError if code == 3 else VerificationError)(lines[0])  # counted as the refusal it was


def _use_checkpoint(ckpt: Any) -> None:
    from sftdiff.fingerprint import checkpoint_digests, model_fingerprint

    for name in ckpt.tensors:
        np.asarray(ckpt.array(name)).reshape(-1)[:16].tolist()
    model_fingerprint(checkpoint_digests(ckpt))


def run_checkpoint(case: Path) -> None:
    from sftdiff.checkpoint import Checkpoint

    _use_checkpoint(Checkpoint.open(case))


def run_composable(case: Path) -> None:
    from sftdiff.formats.composable import read_composable
    from sftdiff.sources import open_diff

    read_composable(case / "pytorch_diff.bin")
    _use_diff(open_diff(str(case / "pytorch_diff.bin")))


def run_adapter(case: Path) -> None:
    from sftdiff.formats import load_foreign

    base = _base_checkpoint(case.parent)
    _use_diff(load_foreign(str(case), base=base))


@dataclass(frozen=True)
class Target:
    name: str
    seeds: Callable[[Path], list[Files]]
    run: Callable[[Path], None]
    needs_torch: bool = False


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("sft", sft_seeds, run_sft),
    Target("inspect-cli", sft_seeds, run_inspect_cli),
    Target("sft-vs-spec-reader", sft_seeds, run_sft_vs_spec_reader),
    Target("checkpoint-safetensors", checkpoint_seeds, run_checkpoint),
    Target("checkpoint-sharded", sharded_seeds, run_checkpoint),
    Target("checkpoint-bin", bin_seeds, run_checkpoint, needs_torch=True),
    Target("composable", composable_seeds, run_composable, needs_torch=True),
    Target("peft-sft", peft_sft_seeds, run_adapter),
    Target("peft-sft-bin", adapter_bin_seeds, run_adapter, needs_torch=True),
    Target("lora", lora_seeds, run_adapter),
]}


# ====================================================================== mutators

INTERESTING_JSON: list[Any] = [
    -1, 0, 1, 2, 7, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63, 10**30, 1.5, -0.0, 1e308,
    "", "x", "F32", "I64", "BF16", "sft", "1.0", None, True, False, [], {}, [1, 2], [-1], [0, 2**64], {"a": 1},
    "sfp1:" + "f" * 32, "é/\u0000",
]
INTERESTING_LENGTHS = [0, 1, 2, 7, 8, 2**31, 2**32 - 1, 2**63, 2**64 - 1, 100 * 1024 * 1024, 100 * 1024 * 1024 + 1]
FLOAT_POISON = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-45, 3.4e38, 65504.0]


def _split_safetensors(data: bytes) -> tuple[dict, bytes] | None:
    if len(data) < 10:
        return None
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        return None
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError):
        return None
    return (header, data[8 + n :]) if isinstance(header, dict) else None


def _join_safetensors(header: Any, body: bytes, rng: random.Random) -> bytes:
    text = json.dumps(header).encode()
    if rng.random() < 0.1:  # sometimes keep the length wrong
        return rng.choice(INTERESTING_LENGTHS + [len(text) + rng.randint(-3, 3)]).to_bytes(8, "little", signed=False) + text + body
    return len(text).to_bytes(8, "little") + text + body


def _mutate_json_node(node: Any, rng: random.Random, depth: int = 0) -> Any:
    """Replace, delete or add one member somewhere in a JSON value (returns the new value)."""
    if isinstance(node, dict) and node and rng.random() < 0.75 and depth < 6:
        key = rng.choice(list(node))
        roll = rng.random()
        if roll < 0.1:
            del node[key]
        elif roll < 0.2:
            node[rng.choice(["extra", "__metadata__", key + "x", ""])] = rng.choice(INTERESTING_JSON)
        else:
            node[key] = _mutate_json_node(node[key], rng, depth + 1)
        return node
    if isinstance(node, list) and node and rng.random() < 0.75 and depth < 6:
        i = rng.randrange(len(node))
        roll = rng.random()
        if roll < 0.15:
            del node[i]
        elif roll < 0.3:
            node.insert(i, rng.choice(INTERESTING_JSON))
        else:
            node[i] = _mutate_json_node(node[i], rng, depth + 1)
        return node
    if isinstance(node, str) and node.startswith("{") and rng.random() < 0.7:
        try:  # JSON inside a string (the `sft` metadata member): mutate structurally
            inner = json.loads(node)
            return json.dumps(_mutate_json_node(inner, rng, depth + 1))
        except ValueError:
            pass
    if isinstance(node, int) and not isinstance(node, bool) and rng.random() < 0.5:
        return node + rng.choice([-1, 1, -node - 1, node, 2**32, 2**64])
    return rng.choice(INTERESTING_JSON + [_deep_json(rng)])


def _deep_json(rng: random.Random) -> Any:
    depth = rng.choice([10, 100])
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def mutate_safetensors_header(data: bytes, rng: random.Random) -> bytes:
    parsed = _split_safetensors(data)
    if parsed is None:
        return mutate_bytes(data, rng)
    header, body = parsed
    names = [k for k in header if k != "__metadata__"]
    roll = rng.random()
    if names and roll < 0.45:
        name = rng.choice(names)
        info = header[name]
        if not isinstance(info, dict):
            header[name] = rng.choice(INTERESTING_JSON)
        else:
            field_ = rng.choice(["dtype", "shape", "data_offsets", "data_offsets", "extra"])
            if field_ == "dtype":
                info["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "I8", "BOOL", "U64",
                                            "F8_E4M3", "XX", "f32", "", None, 4, ["F32"], {"F32": 1}])
            elif field_ == "shape":
                shape = list(info.get("shape") or [])
                info["shape"] = rng.choice([[], [0], [-1], [2**63], [2**64], [1.0], ["1"], [True], shape + [1],
                                            shape[:-1], [x * 2 for x in shape], [10**30, 0], None, [2**31, 2**31]])
            elif field_ == "data_offsets":
                a, b = (info.get("data_offsets") or [0, 0]) + [0, 0][: 2 - len(info.get("data_offsets") or [])]
                info["data_offsets"] = rng.choice([[b, a], [a, b + 1], [a - 1, b], [0, 2**64], [-8, 0], [a, a],
                                                   [a + 4, b + 4], [a], [a, b, b], [str(a), str(b)], [a, 2**63],
                                                   [0, len(body)], None])
            else:
                info["extra"] = 1
    elif names and roll < 0.6:
        name = rng.choice(names)
        op = rng.randrange(4)
        if op == 0:
            del header[name]
        elif op == 1:  # same bytes under a second name: an overlap
            info = header[name]
            header[rng.choice(["dense/" + name, name + "2", "indices/" + name.split("/", 1)[-1]])] = (
                dict(info) if isinstance(info, dict) else info)
        elif op == 2:  # rename
            header[rng.choice(["w", "indices/", "values/", "dense/", "bogus", "indices/other", "values/other"])] = header.pop(name)
        else:  # swap two tensors' descriptions
            other = rng.choice(names)
            header[name], header[other] = header[other], header[name]
    elif roll < 0.9:
        meta = header.get("__metadata__")
        if isinstance(meta, dict) and meta and rng.random() < 0.85:
            key = rng.choice(list(meta))
            if key == "format_version" and rng.random() < 0.5:
                meta[key] = rng.choice(["2.0", "1", "1.0.0", "0.9", "01.0", " 1.0", "1.x", "1.99", "", "1.-1",
                                        "+1.0", "1.0 ", "1.0\n", "1_0.0", "1.00", "\u0661.\u0660", "\uff11.0",
                                        "1." + "9" * 5000, "1" * 5000 + ".0", "10.0", "1.12"])
            elif key == "sft" and rng.random() < 0.3 and isinstance(meta[key], str) and meta[key].startswith("{"):
                # the same key twice in one object of the sft JSON: readers must refuse, not pick one
                text = meta[key]
                meta[key] = rng.choice([
                    '{"entries": {}, ' + text[1:],
                    '{"user": {"kind": "x"}, ' + text[1:],
                    text.replace('"entries":{', '"entries":{"dup":{"shape":[1]},"dup":{"shape":[2]},', 1),
                    text.replace('"shape":', '"shape":[3],"shape":', 1),
                    text.replace('"user":{', '"user":{"\\ud800":"x",', 1),
                ])
            elif key == "sft" and rng.random() < 0.3:
                meta[key] = rng.choice(["", "{", "[]", "NaN", '{"entries": NaN}', "{\"entries\": {}}",
                                        "[" * 50000 + "]" * 50000, '{"entries": {}, "x": ' + "9" * 5000 + "}",
                                        '{"entries": {"w": {"shape": [1e400]}}}'])
            else:
                meta[key] = _mutate_json_node(meta[key], rng)
        else:
            header["__metadata__"] = _mutate_json_node(meta, rng) if meta is not None else rng.choice(INTERESTING_JSON)
    else:
        return _textual_header_edit(data, rng)
    return _join_safetensors(header, body, rng)


def _textual_header_edit(data: bytes, rng: random.Random) -> bytes:
    """Edits JSON cannot express: duplicate keys, huge numbers, non-UTF-8, deep nesting, padding."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if n > len(data) - 8 or n < 2:
        return mutate_bytes(data, rng)
    text, body = data[8 : 8 + n], data[8 + n :]
    op = rng.randrange(6)
    if op == 0:
        text = b'{"dup":1,"dup":2,' + text[1:]
    elif op == 1:
        text = text[:1] + b'"__metadata__":{"format":"sft"},' + text[1:]
    elif op == 2:
        text = text[:1] + b'"big":' + b"9" * rng.choice([400, 5000]) + b"," + text[1:]
    elif op == 3:
        text = text[:1] + b'"deep":' + b"[" * 100000 + b"]" * 100000 + b"," + text[1:]
    elif op == 4:
        i = rng.randrange(len(text))
        text = text[:i] + rng.choice([b"\xff", b"\xc3", b"\x00", b"\\ud800", b" " * 3]) + text[i:]
    else:  # padding: only spaces are allowed after the JSON object
        text = text.rstrip(b" ") + rng.choice([b" " * rng.randint(1, 64), b"\n", b"\t", b"\r\n", b" \n ", b"\x00",
                                               b"\x0c", b"\xc2\xa0"]) + rng.choice([b"", b"", b"x"])
    return len(text).to_bytes(8, "little") + text + body


def mutate_safetensors_data(data: bytes, rng: random.Random) -> bytes:
    """Write poison values (NaN, zero, out-of-range or repeated indices) into one tensor's data."""
    parsed = _split_safetensors(data)
    if parsed is None:
        return mutate_bytes(data, rng)
    header, body = parsed
    start = len(data) - len(body)
    tensors = [(k, v) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if not tensors:
        return mutate_bytes(data, rng)
    name, info = rng.choice(tensors)
    try:
        a, b = info["data_offsets"]
        dtype = info["dtype"]
    except (KeyError, TypeError, ValueError):
        return mutate_bytes(data, rng)
    out = bytearray(data)
    fmt = {"F32": "<f", "F64": "<d", "F16": "<e", "I32": "<i", "I64": "<q", "BF16": "<H", "U8": "<B"}.get(dtype)
    if fmt is None or type(a) is not int or type(b) is not int or not (0 <= a < b <= len(body)):
        return mutate_bytes(data, rng)
    size = struct.calcsize(fmt)
    count = (b - a) // size
    if count == 0:
        return mutate_bytes(data, rng)
    i = rng.randrange(count)
    where = start + a + i * size
    if fmt in ("<f", "<d", "<e"):
        value = rng.choice(FLOAT_POISON)
        struct.pack_into(fmt, out, where, value if fmt != "<e" or abs(value) < 7e4 or value != value else float("inf"))
    elif fmt == "<H":
        struct.pack_into(fmt, out, where, rng.choice([0x7FC0, 0x7F80, 0xFF80, 0x0000, 0x8000]))
    else:
        limit = {"<i": 2**31 - 1, "<q": 2**63 - 1, "<B": 255}[fmt]
        low = 0 if fmt == "<B" else -limit - 1
        prev = struct.unpack_from(fmt, out, where - size)[0] if i > 0 else 0
        nxt = struct.unpack_from(fmt, out, where + size)[0] if i + 1 < count else 0
        struct.pack_into(fmt, out, where, min(limit, max(low, rng.choice([-1, 0, prev, nxt, nxt + 1, limit, low, 10**6]))))
    return bytes(out)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Classic byte-level mutations, including forged 8-byte length prefixes."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 16)))
    out = bytearray(data)
    op = rng.randrange(8)
    i = rng.randrange(len(out))
    if op == 0:
        out[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        out[i] = rng.choice([0, 0xFF, 0x7F, 0x80, ord("{"), ord('"'), ord("-"), ord("9")])
    elif op == 2:
        del out[rng.randrange(len(out) + 1):]
    elif op == 3:
        out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    elif op == 4:
        del out[i : i + rng.randint(1, 64)]
    elif op == 5:
        j = rng.randrange(len(out))
        out[i:i] = out[j : j + rng.randint(1, 64)]
    elif op == 6 and len(out) >= 8:
        out[:8] = rng.choice(INTERESTING_LENGTHS + [len(data) - 8, len(data) - 7, len(data)]).to_bytes(8, "little")
    else:
        for _ in range(rng.randint(2, 10)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def mutate_zip(data: bytes, rng: random.Random) -> bytes:
    """Edit a torch.save archive's members (pickle bytes, storages, names) and re-zip it validly."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [(info.filename, z.read(info)) for info in z.infolist()]
    except (zipfile.BadZipFile, ValueError, EOFError, OSError):
        return mutate_bytes(data, rng)
    if not members:
        return mutate_bytes(data, rng)
    op = rng.randrange(6)
    i = rng.randrange(len(members))
    name, content = members[i]
    pkl = [j for j, (n, _) in enumerate(members) if n.endswith("data.pkl")]
    if op <= 1 and pkl:  # the pickle itself: byte edits, or a swapped integer opcode argument
        j = pkl[0]
        body = members[j][1]
        if op == 0:
            members[j] = (members[j][0], mutate_bytes(body, rng))
        else:
            members[j] = (members[j][0], _mutate_pickle_ints(body, rng))
    elif op == 2:  # a storage's bytes: shorter, longer or poisoned
        members[i] = (name, rng.choice([content[:-4], content + b"\0" * 4, mutate_bytes(content, rng),
                                        struct.pack("<f", float("nan")) * max(1, len(content) // 4)]))
    elif op == 3:
        del members[i]
    elif op == 4:
        members[i] = (rng.choice([name + "x", name.replace("data/", "data/../"), "/abs/" + name, name.upper()]), content)
    else:
        members.append((members[i][0].rsplit("/", 1)[0] + "/extra", b"x"))
    buf = io.BytesIO()
    compress = zipfile.ZIP_DEFLATED if rng.random() < 0.05 else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=compress) as z:
        for n, c in members:
            z.writestr(n, c)
    return buf.getvalue()


def _mutate_pickle_ints(body: bytes, rng: random.Random) -> bytes:
    """Change the argument of a BININT/BININT1/BININT2/LONG1 opcode: sizes, offsets, strides, numel."""
    out = bytearray(body)
    spots = [k for k, b in enumerate(out[:-5]) if b in (ord("J"), ord("K"), ord("M"))]
    if not spots:
        return mutate_bytes(body, rng)
    k = rng.choice(spots)
    op = out[k]
    if op == ord("J"):
        struct.pack_into("<i", out, k + 1, rng.choice([-1, 0, 1, 2**31 - 1, -2**31, 1 << 20, 3]))
    elif op == ord("K"):
        out[k + 1] = rng.choice([0, 1, 2, 255])
    else:
        struct.pack_into("<H", out, k + 1, rng.choice([0, 1, 65535]))
    return bytes(out)


def mutate_json_file(data: bytes, rng: random.Random) -> bytes:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return mutate_bytes(data, rng)
    if rng.random() < 0.15:
        return rng.choice([b"[" * 100000 + b"]" * 100000, b'{"weight_map": ' + b"9" * 5000 + b"}", b"\xff\xfe",
                           b'{"a": 1, "a": 2}', b"null", b""])
    return json.dumps(_mutate_json_node(value, rng)).encode()


def _kind(name: str) -> str:
    if name.endswith((".sft", ".safetensors")):
        return "safetensors"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".bin"):
        return "zip"
    return "bytes"


def mutate(files: Files, rng: random.Random, pool: list[Files] | None = None) -> Files:
    """A mutated copy of one case: 1-3 mutations on randomly chosen files."""
    with _quiet_warnings():
        try:
            return _mutate(files, rng, pool)
        except Exception:  # noqa: BLE001 - a structural mutator tripped on an odd input: fall back to bytes
            name = rng.choice(sorted(files))
            return {**files, name: mutate_bytes(files[name], rng)}


def _mutate(files: Files, rng: random.Random, pool: list[Files] | None) -> Files:
    out = dict(files)
    names = sorted(out)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        # weight the interesting files (weights, headers) over config.json
        name = rng.choice([n for n in names if n != "config.json"] * 3 + names)
        data = out[name]
        kind = _kind(name)
        roll = rng.random()
        if pool and roll < 0.05:  # splice with another seed's file of the same name
            others = [p[name] for p in pool if name in p]
            if others:
                other = rng.choice(others)
                cut = rng.randrange(min(len(data), len(other)) + 1)
                out[name] = data[:cut] + other[cut:]
                continue
        if kind == "safetensors":
            out[name] = (mutate_safetensors_header if roll < 0.55 else
                         mutate_safetensors_data if roll < 0.8 else mutate_bytes)(data, rng)
        elif kind == "json":
            out[name] = (mutate_json_file if roll < 0.8 else mutate_bytes)(data, rng)
        elif kind == "zip":
            out[name] = (mutate_zip if roll < 0.8 else mutate_bytes)(data, rng)
        else:
            out[name] = mutate_bytes(data, rng)
    return out


def generate(target: str, rng: random.Random) -> Files | None:
    """A freshly generated hostile case for targets that have a generator (composable-sft objects)."""
    if target == "composable":
        return {"pytorch_diff.bin": _torch_save_bytes(composable_object(rng, hostile=True))}
    return None


# ====================================================================== running cases


@dataclass
class Outcome:
    ok: bool  # passed: success, or an SftError with exit code 3/4
    result: str  # "accepted" | error class name | "TIMEOUT"
    error: BaseException | None = None
    trace: str = ""


def materialize(files: Files, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for rel, data in files.items():
        (folder / rel).write_bytes(data)
    return folder


def _on_alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout()


def run_case(target: Target, files: Files, folder: Path, timeout: float | None = 10.0) -> Outcome:
    """Run one case; an SftError with exit code 3 or 4 (or success) passes, anything else is a finding."""
    case = materialize(files, folder)
    use_alarm = timeout is not None and hasattr(signal, "setitimer")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with _quiet_warnings():
            target.run(case)
        return Outcome(True, "accepted")
    except SftError as e:
        ok = e.exit_code in (3, 4)
        return Outcome(ok, type(e).__name__, e, "" if ok else traceback.format_exc())
    except CaseTimeout as e:
        return Outcome(False, "TIMEOUT", e, traceback.format_exc())
    except Exception as e:  # noqa: BLE001 - anything else escaping a reader is exactly what we look for
        return Outcome(False, type(e).__name__, e, traceback.format_exc())
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _quiet_warnings() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            yield


def signature(outcome: Outcome) -> str:
    """Identify a finding by exception type and the innermost sftdiff frame (to de-duplicate)."""
    frames = [ln for ln in outcome.trace.splitlines() if ln.strip().startswith("File ") and "sftdiff" in ln]
    return f"{outcome.result} @ {frames[-1].strip() if frames else '?'}"


def save_reproducer(out: Path, target: str, files: Files, outcome: Outcome) -> Path:
    digest = hashlib.sha256(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()[:12]
    folder = out / f"{target}-{digest}"
    materialize(files, folder / "case")
    (folder / "traceback.txt").write_text(f"target: {target}\n{outcome.trace}", encoding="utf-8")
    return folder


@dataclass
class Stats:
    cases: int = 0
    accepted: int = 0
    results: dict[str, int] = field(default_factory=dict)
    findings: dict[str, Path] = field(default_factory=dict)


def fuzz(targets: list[str], seconds: float, seed: int, out: Path, case_timeout: float,
         log: Callable[[str], None] = print) -> dict[str, Stats]:
    """Round-robin over `targets` until `seconds` have passed; returns per-target statistics."""
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="sftdiff-fuzz-"))
    stats = {name: Stats() for name in targets}
    seeds: dict[str, list[Files]] = {}
    try:
        for name in targets:
            seeds[name] = TARGETS[name].seeds(work)
            for files in seeds[name]:  # the seeds themselves must pass
                outcome = run_case(TARGETS[name], files, work / "case", case_timeout)
                if not outcome.ok or outcome.result != "accepted":
                    log(f"[{name}] seed rejected: {outcome.result} {outcome.error}")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for name in targets:
                target = TARGETS[name]
                files = generate(name, rng) if rng.random() < 0.15 else None
                if files is None:
                    files = mutate(rng.choice(seeds[name]), rng, seeds[name])
                outcome = run_case(target, files, work / "case", case_timeout)
                s = stats[name]
                s.cases += 1
                s.accepted += outcome.result == "accepted"
                s.results[outcome.result] = s.results.get(outcome.result, 0) + 1
                if not outcome.ok:
                    sig = signature(outcome)
                    if sig not in s.findings:
                        s.findings[sig] = save_reproducer(out, name, files, outcome)
                        log(f"[{name}] FINDING {sig}\n    reproducer: {s.findings[sig]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return stats


def replay(folder: Path, target: str) -> Outcome:
    """Run a saved reproducer again (for checking a fix)."""
    files = {str(p.relative_to(folder / "case")): p.read_bytes() for p in (folder / "case").rglob("*") if p.is_file()}
    with tempfile.TemporaryDirectory() as tmp:
        return run_case(TARGETS[target], files, Path(tmp) / "case")


def _limit_address_space(extra_mb: int) -> None:
    """Cap virtual memory at what is mapped now plus `extra_mb`: an allocation sized by an
    untrusted number then fails as MemoryError (a finding) instead of swapping the machine."""
    import resource

    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    limit = pages * os.sysconf("SC_PAGE_SIZE") + extra_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="Total fuzzing time (default 60).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the mutation RNG (default 0).")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"Comma-separated targets (default all): {', '.join(TARGETS)}.")
    parser.add_argument("--out", type=Path, default=Path("fuzz-findings"),
                        help="Folder for reproducers of findings (default ./fuzz-findings).")
    parser.add_argument("--case-timeout", type=float, default=10.0, help="Seconds before a case counts as a hang.")
    parser.add_argument("--memory-mb", type=int, default=2048,
                        help="Address space allowed beyond start-up, in MiB (0: no limit).")
    parser.add_argument("--replay", type=Path, default=None, help="Re-run one saved reproducer folder and exit.")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets: {', '.join(unknown)}")
    if any(TARGETS[t].needs_torch for t in targets):
        import torch  # noqa: F401 - import before limiting memory (its libraries map a lot)
    import sftdiff.formats  # noqa: F401
    if args.replay is not None:
        target = (args.replay / "traceback.txt").read_text().splitlines()[0].split(": ", 1)[1]
        outcome = replay(args.replay, target)
        print(f"{target}: {outcome.result}\n{outcome.trace}")
        return 0 if outcome.ok else 1
    if args.memory_mb:
        _limit_address_space(args.memory_mb)
    started = time.monotonic()
    stats = fuzz(targets, args.seconds, args.seed, args.out, args.case_timeout)
    elapsed = time.monotonic() - started
    print(f"\nfuzzed {sum(s.cases for s in stats.values())} cases in {elapsed:.0f}s (seed {args.seed})")
    print(f"{'target':<24}{'cases':>8}{'accepted':>10}{'findings':>10}  results")
    for name, s in stats.items():
        results = ", ".join(f"{k} {v}" for k, v in sorted(s.results.items(), key=lambda kv: -kv[1]))
        print(f"{name:<24}{s.cases:>8}{s.accepted:>10}{len(s.findings):>10}  {results}")
    findings = [(n, sig, p) for n, s in stats.items() for sig, p in s.findings.items()]
    for name, sig, path in findings:
        print(f"FINDING [{name}] {sig}\n    reproducer: {path}  (replay: python tools/fuzz.py --replay {path})")
    if not findings:
        print("no unhandled exceptions, hangs or memory blow-ups")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
