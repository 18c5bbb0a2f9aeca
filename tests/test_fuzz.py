"""Hostile inputs: every reader of untrusted files ends in a FormatError (exit 3, one line).

Three layers:
- a fixed-seed, bounded mutation fuzz of every target of tools/fuzz.py (the long run is
  `python tools/fuzz.py --seconds N`), driven by hypothesis so a failure shrinks and replays;
- property tests that generate safetensors headers, `sft` metadata and sparse entries directly;
- targeted files for each rule (truncation at every byte, forged lengths, overlaps, poison data,
  wrong metadata types) and for each bug the fuzzer found, plus memory bounds: a hostile number in
  a file must never size an allocation (checked with tracemalloc and, in a subprocess, RLIMIT_AS).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import random
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftdiff.checkpoint import Checkpoint
from sftdiff.diff import SparseDiff
from sftdiff.errors import FormatError

from reliability_fixtures import child_env
from sft_craft import raw_file, sft_meta, sparse_file

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("sftdiff_fuzz_tool", REPO / "tools" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_tool()

# Cases per target in the suite's fixed-seed run (the whole module stays well under a minute).
CASES = {"sft": 250, "inspect-cli": 120, "sft-vs-spec-reader": 250, "checkpoint-safetensors": 150, "checkpoint-sharded": 120,
         "checkpoint-bin": 80, "composable": 120, "peft-sft": 120, "peft-sft-bin": 60, "lora": 120}
FUZZ_SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                            HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def seeds(work):
    cache: dict[str, list] = {}

    def get(target: str) -> list:
        if target not in cache:
            folder = work / f"seeds-{target}"
            folder.mkdir()
            cache[target] = fuzz.TARGETS[target].seeds(folder)
        return cache[target]

    return get


def _assert_handled(target: str, files: dict[str, bytes], folder: Path) -> None:
    outcome = fuzz.run_case(fuzz.TARGETS[target], files, folder, timeout=20.0)
    assert outcome.ok, f"[{target}] {fuzz.signature(outcome)}\n{outcome.trace}"


@pytest.mark.parametrize("target", list(fuzz.TARGETS))
def test_seeds_are_accepted(target, seeds, work):
    """The starting points are valid files: the fuzz mutates things readers really accept."""
    for files in seeds(target):
        outcome = fuzz.run_case(fuzz.TARGETS[target], files, work / f"seed-case-{target}")
        assert outcome.result == "accepted", outcome.trace


@pytest.mark.parametrize("target", list(fuzz.TARGETS))
def test_mutation_fuzz(target, seeds, work):
    """Fixed-seed mutation fuzz: success or a one-line FormatError/VerificationError, nothing else."""
    pool = seeds(target)

    @settings(max_examples=CASES[target], **FUZZ_SETTINGS)
    @given(rng=st.randoms(use_true_random=False))
    def case(rng: random.Random) -> None:
        files = fuzz.generate(target, rng) if rng.random() < 0.15 else None
        if files is None:
            files = fuzz.mutate(rng.choice(pool), rng, pool)
        _assert_handled(target, files, work / f"case-{target}")

    case()


# ---------------------------------------------------------------- generated headers and entries

DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E5M2", "f32", ""]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False,
                         allow_infinity=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=12)


@settings(max_examples=200, **FUZZ_SETTINGS)
@given(tensors=st.dictionaries(
    st.sampled_from(["indices/w", "values/w", "dense/w", "dense/b", "w", "indices/", "values/x"]),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(-2, 2**40), max_size=3),
              st.tuples(st.integers(-8, 80), st.integers(-8, 80)) | st.lists(st.integers(0, 2**64), max_size=3)),
    max_size=4),
    body=st.binary(max_size=64), shape=st.lists(st.integers(-1, 20), max_size=3))
def test_generated_headers(tmp_path_factory, tensors, body, shape):
    """Arbitrary tensor descriptions over an arbitrary data buffer: loaded fully, or FormatError."""
    header = {"__metadata__": sft_meta({"w": shape, "b": [2]})}
    for name, (dtype, dims, offsets) in tensors.items():
        header[name] = {"dtype": dtype, "shape": dims, "data_offsets": list(offsets)}
    path = tmp_path_factory.mktemp("gen") / "g.sft"
    path.write_bytes(raw_file({}, None, header_override=json.dumps(header).encode()) + body)
    try:
        d = SparseDiff.load(path)
        d.validate()
    except FormatError:
        pass


@settings(max_examples=200, **FUZZ_SETTINGS)
@given(sft=st.dictionaries(st.sampled_from(["entries", "base", "origin", "user", "config_patch", "provenance", "x"]),
                           json_values, max_size=5),
       entries=st.one_of(json_values, st.just({"w": {"shape": [4, 4], "base_dtype": "F32"}})))
def test_generated_metadata(tmp_path_factory, sft, entries):
    """Any JSON in the `sft` member: accepted only when the types of spec section 4 hold."""
    sft = dict(sft, entries=entries) if not isinstance(entries, (int, float)) or entries is None else sft
    data = sparse_file()
    header, body = fuzz._split_safetensors(data)
    header["__metadata__"]["sft"] = json.dumps(sft)
    path = tmp_path_factory.mktemp("meta") / "m.sft"
    path.write_bytes(raw_file({}, None, header_override=json.dumps(header).encode()) + body)
    try:
        d = SparseDiff.load(path)
        d.validate()
    except FormatError:
        return
    assert isinstance(d.meta.base, dict) and isinstance(d.meta.user, dict)
    assert all(isinstance(v, str) for v in d.meta.user.values())


@settings(max_examples=250, **FUZZ_SETTINGS)
@given(indices=st.lists(st.integers(-2**31, 2**31 - 1), min_size=0, max_size=6),
       values=st.lists(st.floats(width=32), min_size=0, max_size=6),
       shape=st.lists(st.integers(0, 5), max_size=3), index_dtype=st.sampled_from(["I32", "I64"]))
def test_generated_sparse_entries(tmp_path_factory, indices, values, shape, index_dtype):
    """Accepted sparse entries always satisfy spec 3.1; every other combination is a FormatError."""
    path = tmp_path_factory.mktemp("entry") / "e.sft"
    path.write_bytes(sparse_file(shape=shape, indices=indices, values=values, index_dtype=index_dtype))
    try:
        entry = SparseDiff.load(path).entries["w"]
    except FormatError:
        return
    numel = int(np.prod(shape)) if shape else 1
    idx, val = np.asarray(entry.indices), entry.values_f32()
    assert index_dtype == "I32" and len(idx) == len(val) >= 1
    assert idx[0] >= 0 and idx[-1] < numel and np.all(np.diff(idx) > 0)
    assert np.all(np.isfinite(val)) and np.all(val != 0)


# ---------------------------------------------------------------- targeted hostile files


def _valid_sft() -> bytes:
    return sparse_file(shape=(4, 4), indices=(1, 5, 9), values=(0.5, -2.0, 3.0))


def _with_length(data: bytes, n: int) -> bytes:
    return n.to_bytes(8, "little") + data[8:]


def _edit_header(data: bytes, edit) -> bytes:
    header, body = fuzz._split_safetensors(data)
    edit(header)
    return raw_file({}, None, header_override=json.dumps(header).encode()) + body


def _set(path: list, value):
    def edit(header):
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _edit_sft_meta(edit):
    def outer(header):
        sft = json.loads(header["__metadata__"]["sft"])
        edit(sft)
        header["__metadata__"]["sft"] = json.dumps(sft)
    return outer


HOSTILE_SFT = {
    "empty": lambda d: b"",
    "length-only": lambda d: d[:8],
    "header-length-huge": lambda d: _with_length(d, 2**64 - 1),
    "header-length-negative-as-i64": lambda d: _with_length(d, 2**63 + 5),
    "header-length-over-100MiB": lambda d: _with_length(d, 100 * 1024 * 1024 + 1),
    "header-length-past-end": lambda d: _with_length(d, len(d)),
    "header-length-zero": lambda d: _with_length(d, 0),
    "not-json": lambda d: raw_file({}, None, header_override=b"\xff\xfe garbage"),
    "json-array": lambda d: raw_file({}, None, header_override=b"[1, 2]"),
    "deep-nesting": lambda d: raw_file({}, None, header_override=b"{\"a\":" + b"[" * 200000 + b"]" * 200000 + b"}"),
    "giant-integer": lambda d: raw_file({}, None, header_override=b'{"a": ' + b"9" * 5000 + b"}"),
    "duplicate-tensor-name": lambda d: raw_file({}, None, header_override=d[8:8 + int.from_bytes(d[:8], "little")]
                                                .replace(b'{"__metadata__"', b'{"values/w": {}, "__metadata__"', 1)),
    "offset-outside-file": lambda d: _edit_header(d, _set(["values/w", "data_offsets"], [12, 12 + 2**40])),
    "offset-negative": lambda d: _edit_header(d, _set(["values/w", "data_offsets"], [-4, 8])),
    "offsets-reversed": lambda d: _edit_header(d, _set(["values/w", "data_offsets"], [24, 12])),
    "overlapping-tensors": lambda d: _edit_header(d, _set(["values/w", "data_offsets"], [0, 12])),
    "trailing-bytes": lambda d: d + b"\0\0\0\0",
    "truncated-data": lambda d: d[:-1],
    "unknown-dtype": lambda d: _edit_header(d, _set(["values/w", "dtype"], "F8_E4M3")),
    "dtype-not-string": lambda d: _edit_header(d, _set(["values/w", "dtype"], 7)),
    "shape-negative": lambda d: _edit_header(d, _set(["values/w", "shape"], [-3])),
    "shape-huge": lambda d: _edit_header(d, _set(["values/w", "shape"], [2**62, 2**62])),
    "shape-float": lambda d: _edit_header(d, _set(["values/w", "shape"], [3.0])),
    "metadata-not-object": lambda d: _edit_header(d, _set(["__metadata__"], ["sft"])),
    "metadata-value-not-string": lambda d: _edit_header(d, _set(["__metadata__", "format_version"], 1.0)),
    "wrong-major": lambda d: _edit_header(d, _set(["__metadata__", "format_version"], "2.0")),
    "sft-not-json": lambda d: _edit_header(d, _set(["__metadata__", "sft"], "{entries")),
    "sft-nan-constant": lambda d: _edit_header(d, _set(["__metadata__", "sft"], '{"entries": {}, "x": NaN}')),
    "entries-not-object": lambda d: _edit_header(d, _edit_sft_meta(_set(["entries"], []))),
    "entry-shape-string": lambda d: _edit_header(d, _edit_sft_meta(_set(["entries", "w", "shape"], "4x4"))),
    "entry-shape-huge-needs-i64": lambda d: _edit_header(d, _edit_sft_meta(_set(["entries", "w", "shape"], [2**40]))),
    "user-not-strings": lambda d: _edit_header(d, _edit_sft_meta(_set(["user"], {"task": 3}))),
    "base-hint-number": lambda d: _edit_header(d, _edit_sft_meta(_set(["base"], {"hint": 5}))),
    "base-tensors-not-object": lambda d: _edit_header(d, _edit_sft_meta(_set(["base"], {"tensors": [1, 2]}))),
    "base-numel-string": lambda d: _edit_header(d, _edit_sft_meta(_set(["base"], {"numel": "many"}))),
    "undescribed-entry": lambda d: _edit_header(d, _edit_sft_meta(_set(["entries"], {}))),
    "index-dtype-i16": lambda d: sparse_file(indices=(1, 2), index_dtype="I16"),
    "value-dtype-int": lambda d: sparse_file(values=(1, 2), value_dtype="I32"),
    "nan-value": lambda d: sparse_file(values=(float("nan"), 1.0)),
    "inf-value": lambda d: sparse_file(values=(1.0, float("-inf"))),
    "zero-value": lambda d: sparse_file(values=(0.0, 1.0)),
    "negative-index": lambda d: sparse_file(indices=(-1, 3)),
    "index-out-of-range": lambda d: sparse_file(indices=(3, 16)),
    "unsorted-indices": lambda d: sparse_file(indices=(5, 1)),
    "duplicate-indices": lambda d: sparse_file(indices=(5, 5)),
    "mismatched-lengths": lambda d: raw_file(
        {"indices/w": ("I32", [3], np.array([1, 2, 3], "<i4").tobytes()),
         "values/w": ("F32", [2], np.array([1, 2], "<f4").tobytes())}, sft_meta({"w": [4, 4]})),
    "too-many-indices": lambda d: sparse_file(shape=(2,), indices=(0, 1, 2), values=(1, 2, 3)),
    "values-2d": lambda d: raw_file(
        {"indices/w": ("I32", [2], np.array([1, 2], "<i4").tobytes()),
         "values/w": ("F32", [1, 2], np.array([1, 2], "<f4").tobytes())}, sft_meta({"w": [4, 4]})),
}


@pytest.mark.parametrize("case", list(HOSTILE_SFT))
def test_hostile_sft_is_a_format_error(tmp_path, case):
    path = tmp_path / "h.sft"
    path.write_bytes(HOSTILE_SFT[case](_valid_sft()))
    with pytest.raises(FormatError) as info:
        SparseDiff.load(path).validate()
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_every_truncation_is_a_format_error(tmp_path):
    """Cut a valid file after every byte: always the documented error, never another exception."""
    data = _valid_sft()
    path = tmp_path / "t.sft"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            SparseDiff.load(path).validate()


def test_hostile_files_through_the_cli_exit_3_with_one_line(tmp_path):
    """`sftdiff inspect` on every hostile file: exit 3, exactly one line on stderr, no traceback."""
    from sftdiff.cli import main

    for case, make in HOSTILE_SFT.items():
        path = tmp_path / f"{case}.sft"
        path.write_bytes(make(_valid_sft()))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            with pytest.raises(SystemExit) as info:
                main(["inspect", str(path)])
        lines = err.getvalue().strip().splitlines()
        assert info.value.code == 3, (case, err.getvalue())
        assert len(lines) == 1 and lines[0].startswith("sftdiff: error: "), (case, lines)


def test_json_floats_overflowing_to_infinity_are_refused(tmp_path):
    """`1e400` is standard JSON but parses to infinity, which spec 4 forbids in metadata."""
    data = _edit_header(_valid_sft(), _set(["__metadata__", "sft"],
                                           '{"entries": {"w": {"shape": [4, 4]}}, "origin": {"density": 1e400}}'))
    path = tmp_path / "inf.sft"
    path.write_bytes(data)
    with pytest.raises(FormatError):
        SparseDiff.load(path)


# ---------------------------------------------------------------- checkpoints


def _checkpoint_folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "ckpt"
    fuzz.materialize(files, folder)
    return folder


HOSTILE_CHECKPOINT_JSON = {
    "config-deep": ("config.json", b"[" * 100000 + b"]" * 100000),
    "config-giant-int": ("config.json", b'{"hidden_size": ' + b"9" * 5000 + b"}"),
    "config-not-utf8": ("config.json", b"\xff\xfe{}"),
    "index-deep": ("model.safetensors.index.json", b'{"weight_map": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "index-giant-int": ("model.safetensors.index.json", b'{"weight_map": ' + b"9" * 5000 + b"}"),
    "index-not-object": ("model.safetensors.index.json", b"[]"),
    "index-shard-outside": ("model.safetensors.index.json", json.dumps({"weight_map": {"a": "../x.safetensors"}}).encode()),
    "index-shard-absolute": ("model.safetensors.index.json", json.dumps({"weight_map": {"a": "/etc/passwd"}}).encode()),
    "index-shard-missing": ("model.safetensors.index.json", json.dumps({"weight_map": {"a": "nope.safetensors"}}).encode()),
    "index-shard-number": ("model.safetensors.index.json", json.dumps({"weight_map": {"a": 3}}).encode()),
}


@pytest.mark.parametrize("case", list(HOSTILE_CHECKPOINT_JSON))
def test_hostile_checkpoint_json_is_a_format_error(tmp_path, seeds, case):
    name, content = HOSTILE_CHECKPOINT_JSON[case]
    files = dict(seeds("checkpoint-sharded")[0])
    files[name] = content
    with pytest.raises(FormatError):
        fuzz.run_checkpoint(_checkpoint_folder(tmp_path, files))


def test_duplicate_tensor_across_shards_is_a_format_error(tmp_path, seeds):
    files = dict(seeds("checkpoint-sharded")[0])
    index = json.loads(files["model.safetensors.index.json"])
    first, second = sorted(set(index["weight_map"].values()))
    files[second] = files[first]  # both shards now hold the first shard's tensors
    with pytest.raises(FormatError, match="also appears"):
        fuzz.run_checkpoint(_checkpoint_folder(tmp_path, files))


@pytest.mark.parametrize("cut", [0, 1, 8, 100, 500, -1])
def test_truncated_bin_checkpoint_is_a_format_error(tmp_path, seeds, cut):
    files = dict(seeds("checkpoint-bin")[0])
    files["pytorch_model.bin"] = files["pytorch_model.bin"][:cut]
    with pytest.raises(FormatError):
        fuzz.run_checkpoint(_checkpoint_folder(tmp_path, files))


# ---------------------------------------------------------------- importers: bugs the fuzzer found

def _zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def _rezip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, content in members:
            z.writestr(name, content)
    return buf.getvalue()


def _composable_bytes(obj) -> bytes:
    return fuzz._torch_save_bytes(obj)


def _composable_cases() -> dict:
    import torch

    def diff(**fields):
        d = {"size": torch.Size([4, 4]), "index_steps": [1, 4], "values": torch.tensor([0.5, -1.0])}
        d.update(fields)
        return {"diffs": {"w": {k: v for k, v in d.items() if v is not None}}, "abs": {}}

    return {
        "missing-index-steps": lambda: _composable_bytes(diff(index_steps=None, extra=1)),
        "missing-size": lambda: _composable_bytes(diff(size=None, extra=1)),
        "missing-values": lambda: _composable_bytes(diff(values=None, extra=1)),
        "zip-version-unsupported": lambda: _zip_version(_composable_bytes(diff()), 137),
        "index-steps-overflow-int64": lambda: _composable_bytes(diff(index_steps=[2**62, 2**62, 2**62],
                                                                     values=torch.ones(3))),
        "index-step-int64-max": lambda: _composable_bytes(diff(index_steps=[2**63 - 1, 1], values=torch.ones(2))),
        "size-overflows-int64": lambda: _composable_bytes(diff(size=torch.Size([2**32, 2**32]))),
        "size-not-ints": lambda: _composable_bytes(diff(size=("a", 2))),
        "values-not-tensor": lambda: _composable_bytes(diff(values=[1.0, 2.0])),
        "values-length-mismatch": lambda: _composable_bytes(diff(values=torch.ones(5))),
        "values-nan": lambda: _composable_bytes(diff(values=torch.tensor([float("nan"), 1.0]))),
        "byteorder-member-corrupt": lambda: _corrupt_member(_composable_bytes(diff()), "byteorder"),
        "bad-member-name-utf8": lambda: _composable_bytes(diff()).replace(b"archive/byteorder", b"archive/byteord\xb8r"),
        "central-directory-offset-negative": lambda: _bad_central_directory(_composable_bytes(diff())),
        "truncated": lambda: _composable_bytes(diff())[:300],
    }


def _corrupt_member(data: bytes, suffix: str) -> bytes:
    """Damage the local header of one member so only reading that member fails (BadZipFile)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    out = bytearray(data)
    out[info.header_offset : info.header_offset + 4] = b"XXXX"
    return bytes(out)


def _bad_central_directory(data: bytes) -> bytes:
    """Point the end-of-central-directory record before the start of the file."""
    out = bytearray(data)
    eocd = out.rfind(b"PK\x05\x06")
    out[eocd + 16 : eocd + 20] = (0xFFFFFFF0).to_bytes(4, "little")
    return bytes(out)


def _zip_version(data: bytes, version: int) -> bytes:
    """Claim a zip format version zipfile does not implement in every central-directory entry."""
    out = bytearray(data)
    start = 0
    while (at := out.find(b"PK\x01\x02", start)) >= 0:
        out[at + 6] = version  # "version needed to extract"
        start = at + 4
    return bytes(out)


COMPOSABLE_CASES = ["missing-index-steps", "missing-size", "missing-values", "zip-version-unsupported", "index-steps-overflow-int64", "index-step-int64-max", "size-overflows-int64",
                    "size-not-ints", "values-not-tensor", "values-length-mismatch", "values-nan",
                    "byteorder-member-corrupt", "bad-member-name-utf8", "central-directory-offset-negative", "truncated"]


@pytest.mark.parametrize("case", COMPOSABLE_CASES)
def test_hostile_composable_diff_is_a_format_error(tmp_path, case):
    """pytorch_diff.bin through the importer (sources.open_diff → formats.load_foreign)."""
    from sftdiff.sources import open_diff

    path = tmp_path / "pytorch_diff.bin"
    path.write_bytes(_composable_cases()[case]())
    with pytest.raises(FormatError):
        open_diff(str(path)).validate()


def _adapter_files(seeds, target: str) -> dict[str, bytes]:
    return dict(seeds(target)[0])


ADAPTER_CONFIG_CASES = {
    "deep": b'{"peft_type": "SFT", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "giant-int": b'{"peft_type": "SFT", "r": ' + b"9" * 5000 + b"}",
    "not-object": b'["SFT"]',
}


@pytest.mark.parametrize("case", list(ADAPTER_CONFIG_CASES))
@pytest.mark.parametrize("target", ["peft-sft", "lora"])
def test_hostile_adapter_config_is_a_format_error(tmp_path, seeds, target, case):
    files = _adapter_files(seeds, target)
    content = ADAPTER_CONFIG_CASES[case]
    if target == "lora":
        content = content.replace(b'"SFT"', b'"LORA"')
    files["adapter_config.json"] = content
    _assert_handled(target, files, tmp_path / "case")


LORA_CONFIG_EDITS = {
    "alpha-pattern-string": {"alpha_pattern": "x"},
    "rank-pattern-list": {"rank_pattern": [1, 2]},
    "lora-alpha-string": {"lora_alpha": "x"},
    "lora-alpha-list": {"lora_alpha": [1]},
    "rank-zero": {"r": 0},
    "modules-to-save-number": {"modules_to_save": 3},
}


@pytest.mark.parametrize("case", list(LORA_CONFIG_EDITS))
def test_hostile_lora_config_values_are_format_errors(tmp_path, seeds, case):
    files = _adapter_files(seeds, "lora")
    config = json.loads(files["adapter_config.json"])
    config.update(LORA_CONFIG_EDITS[case])
    files["adapter_config.json"] = json.dumps(config).encode()
    _assert_handled("lora", files, tmp_path / "case")


# ---------------------------------------------------------------- memory bounds


def _huge_claims() -> dict[str, bytes]:
    """Small files whose numbers claim enormous sizes."""
    big_entry = _edit_header(_valid_sft(), _edit_sft_meta(_set(["entries", "w", "shape"], [2**20, 2**20])))
    big_shape = raw_file({"w": ("F32", [2**30, 2**30], b"")}, None)
    return {
        "header-100MiB-claimed.sft": _with_length(_valid_sft(), 100 * 1024 * 1024),
        "entry-claims-2^40-elements.sft": big_entry,
        "tensor-claims-4-EiB.sft": big_shape,
        "offsets-claim-1-TiB.sft": _edit_header(_valid_sft(), _set(["values/w", "data_offsets"], [12, 12 + 2**40])),
    }


def test_hostile_numbers_never_size_an_allocation(tmp_path):
    """Peak traced memory stays small while each file claiming a huge size is refused."""
    for name, data in _huge_claims().items():
        path = tmp_path / name
        path.write_bytes(data)
        tracemalloc.start()
        try:
            with contextlib.suppress(FormatError):
                d = SparseDiff.load(path)
                d.validate()
                for entry_name in d.entries:
                    d.entries[entry_name].values_f32()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, f"{name}: peak {peak / 2**20:.1f} MiB"


def test_hostile_numbers_under_an_address_space_limit(tmp_path):
    """The same files (and a composable pickle claiming a 2^40-element storage) in a subprocess
    limited to its start-up size + 256 MiB: each is a FormatError, never a MemoryError."""
    for name, data in _huge_claims().items():
        (tmp_path / name).write_bytes(data)
    members = _zip_members(_composable_bytes({"diffs": {}, "abs": {"w": __import__("torch").ones(2)}}))
    pkl = next(i for i, (n, _) in enumerate(members) if n.endswith("data.pkl"))
    # numel 2 -> 2^40 inside the storage persistent id ('storage', FloatStorage, '0', 'cpu', 2)
    huge = b"\x8a\x06\x00\x00\x00\x00\x00\x01"  # LONG1 opcode: 2^40
    patched = members[pkl][1].replace(b"cpuq\nK\x02", b"cpuq\n" + huge).replace(b"QK\x00K\x02\x85", b"QK\x00" + huge + b"\x85")
    assert patched.count(huge) == 2, "torch.save's pickle layout changed; update the patch"
    members[pkl] = (members[pkl][0], patched)
    (tmp_path / "pytorch_diff.bin").write_bytes(_rezip(members))
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        import numpy
        from sftdiff.diff import SparseDiff
        from sftdiff.errors import FormatError
        from sftdiff.formats.composable import read_composable
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20),) * 2)
        for p in sorted(Path({str(tmp_path)!r}).iterdir()):
            try:
                if p.suffix == ".sft":
                    SparseDiff.load(p).validate()
                else:
                    read_composable(p)
                print("ACCEPTED", p.name)
            except FormatError:
                print("refused", p.name)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=child_env())
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.split("\n")
    assert sum(ln.startswith("refused") for ln in lines) == len(_huge_claims()) + 1, result.stdout


def test_checkpoint_reader_rejects_huge_shapes_without_allocating(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(raw_file({"w": ("F32", [2**31, 2**31], b"")}, None))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            Checkpoint.open(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
