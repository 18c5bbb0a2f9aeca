"""The .sft format v1: round trips, naming, lazy loading, and every reader rule of spec section 6."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from sftdiff.dtypes import from_float32, to_float32
from sftdiff.errors import FormatError, OutputError
from sftdiff.format import index_dtype_for

from sft_craft import raw_file, sft_meta, sparse_file

REPO = Path(__file__).resolve().parents[1]
AWKWARD_NAMES = [
    "encoder.layer.0.attention.self.query.weight",
    "values/x",  # looks like another prefix
    "indices/",
    "dense/dense/",
    "a/b/c",
    "with space and \"quotes\"",
    "ünïcødé.权重",
    "__metadata__",
    "x" * 300,
    "\\back\\slash\n",
]


def entry(shape, indices, values, dtype="F32"):
    return SparseEntry.from_float(tuple(shape), np.asarray(indices), np.asarray(values, np.float32), dtype, "F32")


def save_load(tmp_path, entries, meta=None):
    path = tmp_path / "d.sft"
    SparseDiff(entries, meta or DiffMeta()).save(path)
    loaded = SparseDiff.load(path)
    loaded.validate()
    return loaded


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_round_trip_every_value_dtype(tmp_path, dtype):
    values = np.array([1.5, -2.25, 3e-3, 1024.0], np.float32)
    e = entry((3, 5), [0, 4, 7, 14], values, dtype)
    got = save_load(tmp_path, {"w": e}).entries["w"]
    assert got.dtype == dtype and got.indices.dtype == np.int32
    np.testing.assert_array_equal(got.indices, [0, 4, 7, 14])
    np.testing.assert_array_equal(got.values_f32(), to_float32(from_float32(values, dtype), dtype))


@pytest.mark.parametrize("shape", [(), (7,), (3, 4), (2, 3, 2, 2)])
def test_round_trip_ranks(tmp_path, shape):
    numel = int(np.prod(shape))
    idx = np.arange(0, numel, 2)
    e = entry(shape, idx, np.arange(1, len(idx) + 1))
    dense = DenseEntry(np.full(shape, 0.25, np.float32))
    got = save_load(tmp_path, {"s": e, "d": dense})
    assert got.entries["s"].shape == shape and got.entries["d"].shape == shape
    expected = np.zeros(numel, np.float32)
    expected[idx] = np.arange(1, len(idx) + 1)
    np.testing.assert_array_equal(got.entries["s"].to_dense(), expected.reshape(shape))
    np.testing.assert_array_equal(got.entries["d"].values, dense.values)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64", "I64", "BOOL"])
def test_dense_entries_keep_their_dtype(tmp_path, dtype):
    from sftdiff.dtypes import STORAGE

    raw = np.arange(6).reshape(2, 3).astype(STORAGE[dtype])
    got = save_load(tmp_path, {"p": DenseEntry(raw, dtype, dtype)}).entries["p"]
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.values, raw)


def test_empty_diff(tmp_path):
    got = save_load(tmp_path, {}, DiffMeta(user={"description": "nothing"}))
    assert len(got.entries) == 0 and got.nnz == 0 and got.meta.user == {"description": "nothing"}


def test_awkward_names_are_unambiguous(tmp_path):
    entries = {name: entry((4,), [i % 4], [i + 1.0]) for i, name in enumerate(AWKWARD_NAMES)}
    entries["dense/"] = DenseEntry(np.ones(2, np.float32))
    got = save_load(tmp_path, entries)
    assert sorted(got.entries) == sorted(entries)
    for i, name in enumerate(AWKWARD_NAMES):
        np.testing.assert_array_equal(got.entries[name].indices, [i % 4])


def test_metadata_round_trip_and_unknown_fields_kept(tmp_path):
    meta = DiffMeta(base={"hint": "bert", "fingerprint": "sfp1:" + "0" * 32, "numel": 10},
                    origin={"tool": "x", "k": 3}, user={"kind": "task", "task": "ner"},
                    config_patch={"num_labels": 3}, provenance={"operation": "add"},
                    extra={"future_field": [1, 2]})
    got = save_load(tmp_path, {"w": entry((4,), [1], [1.0])}, meta).meta
    assert got == meta


def test_index_dtype_choice_without_allocating():
    assert index_dtype_for(2**31 - 1) == "I32"
    assert index_dtype_for(2**31) == "I64"


def test_int64_indices_for_huge_parameter(tmp_path):
    shape = (2**16, 2**16)  # 2^32 elements: only the few stored indices are allocated
    big = [0, 2**31 + 5, 2**32 - 1]
    e = entry(shape, big, [1.0, 2.0, 3.0])
    assert e.indices.dtype == np.int64
    got = save_load(tmp_path, {"huge": e}).entries["huge"]
    assert got.indices.dtype == np.int64
    np.testing.assert_array_equal(got.indices, big)


def test_from_float_drops_zeros_and_values_that_round_to_zero():
    e = SparseEntry.from_float((10,), np.array([1, 2, 3]), np.array([0.0, 1e-30, 2.0], np.float32), "F16")
    np.testing.assert_array_equal(e.indices, [3])
    assert SparseEntry.from_float((10,), np.array([1]), np.array([0.0], np.float32)) is None


def test_save_is_deterministic_and_refuses_overwrite(tmp_path):
    d = SparseDiff({"b": entry((4,), [1], [1.0]), "a": entry((4,), [2], [2.0])}, DiffMeta(origin={"z": 1, "a": 2}))
    d.save(tmp_path / "1.sft")
    d.save(tmp_path / "2.sft")
    assert (tmp_path / "1.sft").read_bytes() == (tmp_path / "2.sft").read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        d.save(tmp_path / "1.sft")
    d.save(tmp_path / "1.sft", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_writer_refuses_invalid_entries(tmp_path):
    bad = SparseEntry((4,), np.array([2, 1], np.int32), np.array([1.0, 2.0], np.float32))
    with pytest.raises(FormatError, match="strictly increasing"):
        SparseDiff({"w": bad}).save(tmp_path / "x.sft")
    assert list(tmp_path.iterdir()) == []


def test_reference_safetensors_reads_our_files(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    d = {"w": entry((3, 3), [0, 8], [1.0, -1.0], "BF16"), "d": DenseEntry(np.ones((2,), np.float32))}
    SparseDiff(d).save(tmp_path / "x.sft")
    with safe_open(tmp_path / "x.sft", framework="pt") as f:
        assert set(f.keys()) == {"indices/w", "values/w", "dense/d"}
        assert f.get_tensor("values/w").dtype == torch.bfloat16
        assert f.get_tensor("values/w").float().tolist() == [1.0, -1.0]
        assert json.loads(f.metadata()["sft"])["entries"]["w"]["shape"] == [3, 3]


def test_loading_is_lazy(tmp_path, monkeypatch):
    d = {f"p{i}": entry((100,), np.arange(0, 100, 3), np.arange(1, 35)) for i in range(5)}
    SparseDiff(d).save(tmp_path / "x.sft")
    from sftdiff import safetensors_io

    touched = []
    original = safetensors_io.SafetensorsFile.array
    monkeypatch.setattr(safetensors_io.SafetensorsFile, "array", lambda self, n: touched.append(n) or original(self, n))
    loaded = SparseDiff.load(tmp_path / "x.sft")
    assert loaded.nnz == 5 * 34 and touched == []  # header only
    loaded.entries["p3"]
    assert touched == ["indices/p3", "values/p3"]


def test_numpy_reader_reconstructs_library_files(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from read_sft_numpy import SftFile
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    entries = {}
    for dtype in ("F32", "BF16", "F16"):
        idx = np.sort(rng.choice(60, 20, replace=False))
        entries[f"m.{dtype}/w"] = entry((3, 4, 5), idx, rng.standard_normal(20), dtype)
    entries["head.bias"] = DenseEntry(rng.standard_normal(7).astype(np.float32))
    SparseDiff(entries).save(tmp_path / "x.sft")
    reader = SftFile(tmp_path / "x.sft")
    for name, e in entries.items():
        expected = e.to_dense() if isinstance(e, SparseEntry) else e.values
        np.testing.assert_array_equal(reader.reconstruct(name), expected)
    out = subprocess.run([sys.executable, str(REPO / "tools/read_sft_numpy.py"), str(tmp_path / "x.sft")],
                         capture_output=True, text=True, check=True)
    assert "sparse [3, 4, 5] m.BF16/w" in out.stdout


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    shape=st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple),
    dtype=st.sampled_from(["F32", "BF16", "F16"]),
    name=st.text(min_size=1, max_size=20),
)
def test_property_round_trip(tmp_path_factory, data, shape, dtype, name):
    numel = int(np.prod(shape))
    idx = data.draw(st.sets(st.integers(0, numel - 1), min_size=1, max_size=numel).map(sorted))
    vals = data.draw(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32).filter(lambda v: abs(v) > 1e-3),
                              min_size=len(idx), max_size=len(idx)))
    e = entry(shape, idx, vals, dtype)
    path = tmp_path_factory.mktemp("p") / "x.sft"
    SparseDiff({name: e}).save(path)
    got = SparseDiff.load(path).entries[name]
    np.testing.assert_array_equal(got.indices, e.indices)
    np.testing.assert_array_equal(got.values, e.values)
    assert got.shape == shape


# ---------------------------------------------------------------- rejection rules (spec section 6)


def _rejects(tmp_path, blob: bytes, match: str):
    path = tmp_path / "bad.sft"
    path.write_bytes(blob)
    with pytest.raises(FormatError, match=match) as info:
        SparseDiff.load(path).validate()
    assert str(path) in str(info.value)
    return info.value


BAD_FILES = {
    "truncated prefix": (b"\x01\x02", "shorter than its 8-byte"),
    "huge header": ((200 * 1024 * 1024).to_bytes(8, "little") + b"{}", "exceeds"),
    "header past end": ((500).to_bytes(8, "little") + b"{}", "runs past the end"),
    "not json": ((5).to_bytes(8, "little") + b"{abc}", "not valid UTF-8 JSON"),
    "not an object": ((2).to_bytes(8, "little") + b"[]", "does not start with"),
    "duplicate key": (raw_file({}, None, header_override=b'{"a":1,"a":2}'), "duplicate key"),
    "no format": (raw_file({}, {"x": "y"}), "not an .sft file"),
    "unknown major": (raw_file({}, sft_meta({}, version="2.0")), "not supported"),
    "bad version": (raw_file({}, sft_meta({}, version="one")), "MAJOR.MINOR"),
    "bad sft json": (raw_file({}, {"format": "sft", "format_version": "1.0", "sft": "{"}), "not valid JSON"),
    "nan in metadata": (raw_file({}, {"format": "sft", "format_version": "1.0",
                                      "sft": '{"entries": {}, "origin": {"k": NaN}}'}), "not valid JSON"),
    "no entries": (raw_file({}, {"format": "sft", "format_version": "1.0", "sft": "{}"}), "no 'entries'"),
    "metadata wrong type": (raw_file({}, sft_meta({}, user={"kind": 3})), "user.kind must be a string"),
    "metadata value not string": (raw_file({}, {"format": 1}), "must map strings to strings"),
    "unsorted": (sparse_file(indices=(5, 1)), "not strictly increasing"),
    "duplicated": (sparse_file(indices=(5, 5)), "not strictly increasing"),
    "out of range": (sparse_file(indices=(1, 16)), "out of range"),
    "negative": (sparse_file(indices=(-1, 3)), "out of range"),
    "length mismatch": (sparse_file(indices=(1, 2, 3)), "3 indices but 2 values"),
    "wrong index dtype": (sparse_file(index_dtype="I64"), "needs I32"),
    "int16 indices": (sparse_file(index_dtype="I16"), "needs I32"),
    "wrong value dtype": (sparse_file(value_dtype="F64"), "allowed: F32"),
    "zero value": (sparse_file(values=(0.0, 1.0)), "zero value"),
    "nan value": (sparse_file(values=(float("nan"), 1.0)), "NaN or infinity"),
    "inf value": (sparse_file(values=(1.0, float("inf"))), "NaN or infinity"),
    "more indices than elements": (sparse_file(shape=[1], indices=(0, 1)), "for a parameter of 1 elements"),
    "unknown tensor name": (raw_file({"w": ("F32", [1], b"\0\0\x80?")}, sft_meta({"w": [1]})), "is not named"),
    "only indices": (raw_file({"indices/w": ("I32", [1], b"\1\0\0\0")}, sft_meta({"w": [4]})), "needs either"),
    "undescribed entry": (raw_file({"dense/w": ("F32", [1], b"\0\0\x80?")}, sft_meta({})), "no description"),
    "described without tensors": (raw_file({}, sft_meta({"w": [1]})), "has no tensors"),
    "dense shape mismatch": (raw_file({"dense/w": ("F32", [1], b"\0\0\x80?")}, sft_meta({"w": [2]})), "metadata says"),
    "bad shape in metadata": (raw_file({}, sft_meta({"w": [-1]})), "shape must be a list"),
    "offsets gap": (raw_file({}, None, header_override=json.dumps(
        {"dense/w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()) + b"\0" * 8, "gap"),
    "trailing bytes": (raw_file({"dense/w": ("F32", [1], b"\0\0\x80?")}, sft_meta({"w": [1]})) + b"xx", "after the last"),
    "offsets outside": (raw_file({}, None, header_override=json.dumps(
        {"dense/w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4000]}}).encode()) + b"\0" * 4, "outside"),
    "size mismatch": (raw_file({"dense/w": ("F32", [2], b"\0\0\x80?")}, sft_meta({"w": [2]})), "do not hold shape"),
    "unknown dtype": (raw_file({"dense/w": ("F8", [1], b"\0")}, sft_meta({"w": [1]})), "unsupported dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_reader_rejects(tmp_path, case):
    blob, match = BAD_FILES[case]
    _rejects(tmp_path, blob, match)


def test_unknown_minor_version_and_fields_are_accepted(tmp_path):
    blob = sparse_file(version="1.7", future={"anything": True})
    path = tmp_path / "future.sft"
    path.write_bytes(blob)
    d = SparseDiff.load(path)
    d.validate()
    assert d.meta.extra == {"future": {"anything": True}}


def test_spec_worked_example_matches_library_bytes(tmp_path):
    """spec/format.md section 9 shows a file byte by byte; the library must write exactly it."""
    e = SparseEntry.from_float((2, 3), np.array([1, 5]), np.array([0.5, -2.0], np.float32), "F32", "F32")
    SparseDiff({"w": e}, DiffMeta(base={"hint": "tiny", "fingerprint": None})).save(tmp_path / "ex.sft")
    blob = (tmp_path / "ex.sft").read_bytes()
    spec = (REPO / "spec/format.md").read_text()
    assert f"The file is {len(blob)} bytes" in spec
    example = spec.split("## 9.")[1].split("```")[1]
    spaced = " ".join(example.split())
    for start, end in ((0, 8), (336, 344), (344, 352)):
        assert blob[start:end].hex(" ")[:11] in spaced and blob[start:end].hex(" ")[12:] in spaced
    header = blob[8:336].decode()
    assert header.endswith("   ") and " " not in header.rstrip()
    assert header.rstrip() in "".join(example.split())


# ---------------------------------------------------------------- edge cases both readers must agree on (issue 12)


def _numpy_reader():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import read_sft_numpy
    finally:
        sys.path.pop(0)
    return read_sft_numpy


def _padded(blob: bytes, pad: bytes) -> bytes:
    """`blob` with its header followed by `pad` (the length prefix adjusted)."""
    n = int.from_bytes(blob[:8], "little")
    header = blob[8:8 + n].rstrip(b" ") + pad
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def _with_sft_text(text: str) -> bytes:
    """A valid one-entry sparse file whose `sft` metadata string is `text` verbatim."""
    blob = sparse_file()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["__metadata__"]["sft"] = text
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n:]


_ENTRY_W = '"entries": {"w": {"shape": [4, 4], "base_dtype": "F32"}}'
EDGE_CASES = {
    "header padded with LF": (_padded(sparse_file(), b"\n"), "other than spaces"),
    "header padded with TAB": (_padded(sparse_file(), b"\t  "), "other than spaces"),
    "header padded with CRLF": (_padded(sparse_file(), b"\r\n"), "other than spaces"),
    "header padded with NUL": (_padded(sparse_file(), b"\0"), "other than spaces"),
    **{f"format_version {v!r}": (sparse_file(version=v), "MAJOR.MINOR")
       for v in (" 1.0", "1.0 ", "+1.0", "-1.0", "١.٠", "１.0", "01.0", "1.00", "1_0.0", "1.0\n", "1", "1.0.0",
                 "", "1.", ".0", "1e0.0")},
    "format_version 10.0 (grammar ok, unknown major)": (sparse_file(version="10.0"), "not supported"),
    "format_version 0.9": (sparse_file(version="0.9"), "not supported"),
    "duplicate top-level key in sft": (_with_sft_text('{' + _ENTRY_W + ', "user": {}, "user": {"kind": "x"}}'),
                                       "twice"),
    "duplicate entry in sft": (_with_sft_text('{"entries": {"w": {"shape": [4, 4]}, "w": {"shape": [16]}}}'), "twice"),
    "duplicate key in an entry": (_with_sft_text('{"entries": {"w": {"shape": [2], "shape": [4, 4]}}}'), "twice"),
    "duplicate user field": (_with_sft_text('{' + _ENTRY_W + ', "user": {"kind": "a", "kind": "b"}}'), "twice"),
    "lone surrogate in sft": (_with_sft_text('{' + _ENTRY_W + ', "user": {"kind": "\\ud800"}}'), "surrogate"),
    "lone surrogate in header": (raw_file({}, None, header_override=b'{"__metadata__": {"format": "\\udc00"}}'),
                                 "surrogate"),
    "negative base.numel": (sparse_file(base={"numel": -1}), "base.numel"),
    "boolean base.numel": (sparse_file(base={"numel": True}), "base.numel"),
    "float base.numel": (sparse_file(base={"numel": 3.0}), "base.numel"),
    "extra member in a tensor description": (raw_file({}, None, header_override=json.dumps(
        {"dense/w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}).encode()) + b"\0" * 4,
        "exactly dtype, shape and data_offsets"),
    "base_dtype a list (fuzz finding in the spec reader)": (
        _with_sft_text('{"entries": {"w": {"shape": [4, 4], "base_dtype": ["F32"]}}}'), "base_dtype"),
    "tensor dtype a list": (raw_file({}, None, header_override=json.dumps(
        {"dense/w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()) + b"\0" * 4, "dtype"),
    "metadata not an object": (raw_file({}, None, header_override=b'{"__metadata__": 0}'), "strings to strings"),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_are_refused_by_both_readers(tmp_path, case):
    blob, match = EDGE_CASES[case]
    _rejects(tmp_path, blob, match)
    reader = _numpy_reader()
    with pytest.raises(reader.SftReadError):
        reader.SftFile(tmp_path / "bad.sft")


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_numpy_reader_refuses_what_the_library_refuses(tmp_path, case):
    """The independent reader implements every rule of section 6 too (data rules on reconstruct)."""
    blob, _ = BAD_FILES[case]
    path = tmp_path / "bad.sft"
    path.write_bytes(blob)
    reader = _numpy_reader()
    with pytest.raises(reader.SftReadError):
        for name in reader.SftFile(path).entries:
            reader.SftFile(path).reconstruct(name)


@pytest.mark.parametrize("version,pad", [("1.0", b""), ("1.12", b"    "), ("1.0", b" ")])
def test_valid_versions_and_space_padding_are_read_by_both(tmp_path, version, pad):
    path = tmp_path / "ok.sft"
    path.write_bytes(_padded(sparse_file(version=version), pad))
    SparseDiff.load(path).validate()
    reader = _numpy_reader().SftFile(path)
    assert reader.reconstruct("w").reshape(-1)[[1, 5]].tolist() == [0.5, -2.0]


def test_f64_to_bf16_rounds_once():
    """1 + 2⁻⁸ + 2⁻³⁰ is just above the tie between BF16 1.0 and 1.0078125: through float32 it
    becomes the tie and rounds to even (1.0); rounded once it is 1.0078125."""
    from sftdiff.dtypes import convert

    x = np.array([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-8, 3.3961775e38, 2**-133 + 2**-160, 2**-134],
                 dtype=np.float64)
    got = to_float32(convert(x, "F64", "BF16"), "BF16")
    np.testing.assert_array_equal(got, np.array([1.0078125, -1.0078125, 1.0, 3.3895314e38, 2**-133, 0.0],
                                                dtype=np.float32))
    # F16: 623.2500159… is above the tie 623.25, so it rounds away to 623.5 (via float32: the tie, 623.0)
    assert float(convert(np.array([623.2500159975731]), "F64", "F16")[0]) == 623.5


def test_f64_to_bf16_matches_exact_rounding_on_random_values():
    from fractions import Fraction

    from sftdiff.dtypes import convert

    rng = np.random.default_rng(7)
    x = rng.standard_normal(3000) * 10.0 ** rng.integers(-40, 38, 3000)
    got = to_float32(convert(x, "F64", "BF16"), "BF16").astype(np.float64)
    lo = to_float32(from_float32(x.astype(np.float32), "BF16"), "BF16").astype(np.float64)
    for value, rounded, near in zip(x, got, lo):
        # the exact nearest BF16: compare against both neighbours of the candidate
        step = max(2.0 ** (np.floor(np.log2(abs(rounded))) - 7), 2.0**-133) if rounded else 2.0**-133
        for other in (rounded - step, rounded + step, near):
            assert abs(Fraction(rounded) - Fraction(value)) <= abs(Fraction(float(other)) - Fraction(value))


@pytest.mark.parametrize("scale", [1.0, 0.3, -1.7])
def test_f64_parameters_are_computed_in_float64(tmp_path, scale):
    """Spec 3.1: for an F64 parameter, W + s·v with product and sum in float64, in bake and in
    apply_to_model alike (the float32 product rounded the delta before it reached the weight)."""
    import torch

    import sftdiff
    from sftdiff.checkpoint import Checkpoint
    from sftdiff.safetensors_io import SafetensorsFile

    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 16))
    idx = np.sort(rng.choice(256, 60, replace=False))
    vals = rng.standard_normal(60).astype(np.float32) * np.float32(1e-3)
    diff = SparseDiff({"w": SparseEntry.from_float((16, 16), idx, vals, "F32", "F64")})
    expected = w.copy().reshape(-1)
    expected[idx] = expected[idx] + np.float64(scale) * vals.astype(np.float64)

    sftdiff.bake(Checkpoint.from_state_dict({"w": w.copy()}), [diff], tmp_path / "out", scales=[scale],
                 verify=False)
    baked = SafetensorsFile(tmp_path / "out" / "model.safetensors").array("w").reshape(-1)
    np.testing.assert_array_equal(baked, expected)

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.from_numpy(w.copy()))
    sftdiff.apply_to_model(model, diff, scale=scale)
    np.testing.assert_array_equal(model.w.detach().numpy().reshape(-1), expected)
    if scale != 1.0:  # the old rule (float32 product) differs at some position
        old = w.copy().reshape(-1)
        old[idx] = old[idx] + (vals * np.float32(scale)).astype(np.float64)
        assert not np.array_equal(old, expected)
