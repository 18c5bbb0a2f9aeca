"""Saving a diff: the direct path (entries held in memory) and the spooled path (entries computed on
access) write the same bytes, the right one is chosen, and reading back catches writer faults."""

from __future__ import annotations

import functools
import shutil
from typing import Iterator, Mapping

import numpy as np
import pytest

from sftdiff import diff as diff_mod
from sftdiff import format as fmt
from sftdiff import safetensors_io
from sftdiff.algebra import scale
from sftdiff.diff import DenseEntry, DiffMeta, Entry, SparseDiff, SparseEntry
from sftdiff.errors import FormatError, OutputError
from sftdiff.safetensors_io import SafetensorsFile, StreamingWriter, verify_written


class Computed(Mapping[str, Entry]):
    """Entries made on access, as algebra's results are; counts the accesses per name."""

    def __init__(self, entries: dict[str, Entry]):
        self._entries = entries
        self.accessed: dict[str, int] = {}

    def __getitem__(self, name: str) -> Entry:
        self.accessed[name] = self.accessed.get(name, 0) + 1
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def sparse(shape, idx, vals, dtype="F32", base_dtype="BF16"):
    return SparseEntry.from_float(tuple(shape), np.asarray(idx), np.asarray(vals, np.float32), dtype, base_dtype)


def mixed_entries(seed: int = 0) -> dict[str, Entry]:
    rng = np.random.default_rng(seed)
    out: dict[str, Entry] = {}
    for dtype in ("F32", "BF16", "F16"):
        idx = np.sort(rng.choice(2000, 300, replace=False))
        out[f"layers.{dtype}.weight"] = sparse((40, 50), idx, rng.standard_normal(300) + 0.5, dtype)
    out["one"] = sparse((), [0], [3.0], "F32", None)
    out["head.weight"] = DenseEntry(rng.standard_normal((7, 3)).astype(np.float32), "F32", "F32")
    out["bf16.bias"] = DenseEntry(np.arange(1, 12, dtype=np.uint16), "BF16", "BF16")
    out["zeros"] = DenseEntry(np.zeros(5, np.float16), "F16", None)  # dense entries may hold zeros
    out["int.buffer"] = DenseEntry(np.arange(6, dtype=np.int64).reshape(2, 3), "I64", "I64")
    return out


META = DiffMeta(base={"hint": "tiny", "fingerprint": None}, origin={"tool": "test", "k": 3},
                user={"description": "ünïcødé"})

CASES = {
    "sparse": lambda: {k: v for k, v in mixed_entries().items() if isinstance(v, SparseEntry)},
    "dense": lambda: {k: v for k, v in mixed_entries().items() if isinstance(v, DenseEntry)},
    "mixed": mixed_entries,
    "empty": dict,
}


class Recording:
    """Which writers `write_sft` constructs."""

    def __init__(self, monkeypatch):
        self.used: list[str] = []
        for name in ("SpooledWriter", "StreamingWriter"):
            original = getattr(diff_mod, name)

            def make(*args, _original=original, _name=name, **kwargs):
                self.used.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(diff_mod, name, make)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk_bytes", [64 << 20, 24])  # 24: several slices per tensor
def test_direct_and_spooled_paths_write_the_same_bytes(tmp_path, monkeypatch, case, chunk_bytes):
    monkeypatch.setattr(safetensors_io, "_write_chunked",
                        functools.partial(safetensors_io._write_chunked, chunk_bytes=chunk_bytes))
    writers = Recording(monkeypatch)
    entries = CASES[case]()
    SparseDiff(entries, META).save(tmp_path / "direct.sft")
    assert writers.used == ["StreamingWriter"]
    computed = Computed(entries)
    SparseDiff(computed, META).save(tmp_path / "spooled.sft")
    assert writers.used == ["StreamingWriter", "SpooledWriter"]
    assert all(n == 1 for n in computed.accessed.values()) and len(computed.accessed) == len(entries)
    direct, spooled = (tmp_path / "direct.sft").read_bytes(), (tmp_path / "spooled.sft").read_bytes()
    assert direct == spooled
    # ... and they are what the layout says: header, then each tensor's bytes in name order.
    specs, blobs = [], []
    for name in sorted(entries):
        e = entries[name]
        if isinstance(e, SparseEntry):
            idx_dtype = fmt.index_dtype_for(e.numel)
            specs += [(fmt.INDICES + name, idx_dtype, e.indices.shape), (fmt.VALUES + name, e.dtype, e.values.shape)]
            blobs += [e.indices.astype(safetensors_io.STORAGE[idx_dtype]).tobytes(), e.values.tobytes()]
        else:
            specs.append((fmt.DENSE + name, e.dtype, e.values.shape))
            blobs.append(e.values.tobytes())
    described = {n: {"shape": list(entries[n].shape), "base_dtype": entries[n].base_dtype} for n in entries}
    header = safetensors_io.header_bytes(specs, fmt.encode_metadata(META.to_json(described)))
    assert direct == header + b"".join(blobs)
    loaded = SparseDiff.load(tmp_path / "direct.sft")
    loaded.validate()
    assert sorted(loaded.entries) == sorted(entries)


def test_int64_indices_are_written_as_the_index_dtype_on_both_paths(tmp_path):
    e = SparseEntry((10,), np.array([1, 7], np.int64), np.array([1.0, -2.0], np.float32))
    SparseDiff({"w": e}).save(tmp_path / "a.sft")
    SparseDiff(Computed({"w": e})).save(tmp_path / "b.sft")
    assert (tmp_path / "a.sft").read_bytes() == (tmp_path / "b.sft").read_bytes()
    got = SparseDiff.load(tmp_path / "a.sft").entries["w"]
    assert got.indices.dtype == np.int32 and got.indices.tolist() == [1, 7]


def test_lazily_computed_results_go_through_the_spool(tmp_path, monkeypatch):
    base = SparseDiff(mixed_entries(), META)
    base.save(tmp_path / "a.sft")
    writers = Recording(monkeypatch)
    result = scale(SparseDiff.load(tmp_path / "a.sft"), 2.0)  # algebra: entries computed on access
    result.save(tmp_path / "scaled.sft")
    SparseDiff.load(tmp_path / "a.sft").save(tmp_path / "copy.sft")  # a loaded diff maps and checks on access
    assert writers.used == ["SpooledWriter", "SpooledWriter"]
    assert (tmp_path / "copy.sft").read_bytes() == (tmp_path / "a.sft").read_bytes()
    scaled = SparseDiff.load(tmp_path / "scaled.sft")
    np.testing.assert_array_equal(scaled.entries["layers.F32.weight"].values_f32(),
                                  2 * base.entries["layers.F32.weight"].values_f32())


class LazyDict(dict):
    def __getitem__(self, name):  # a dict subclass may compute on access: not "held"
        return super().__getitem__(name)


@pytest.mark.parametrize("entries, held", [
    ({}, True),
    ({"w": sparse((4,), [1], [1.0])}, True),
    ({"d": DenseEntry(np.ones(2, np.float32))}, True),
    (LazyDict({"w": sparse((4,), [1], [1.0])}), False),
    (Computed({"w": sparse((4,), [1], [1.0])}), False),
    ({"w": SparseEntry((4,), [1], np.ones(1, np.float32))}, False),  # a list is not an array held
])
def test_held_decides_the_direct_path(entries, held):
    assert diff_mod._held(entries) is held


@pytest.mark.parametrize("wrap", [dict, Computed], ids=["direct", "spooled"])
def test_invalid_entries_are_refused_before_anything_is_kept(tmp_path, wrap):
    good = sparse((4,), [1], [1.0])
    bad = SparseEntry((4,), np.array([2, 1], np.int32), np.array([1.0, 2.0], np.float32))
    with pytest.raises(FormatError, match="strictly increasing"):
        SparseDiff(wrap({"a": good, "z": bad})).save(tmp_path / "x.sft")
    assert list(tmp_path.iterdir()) == []


def test_save_checks_each_entry_data_once(tmp_path, monkeypatch):
    """The data rules run on the arrays before writing; reading back checks the layout, not the
    data again (that O(nnz) pass was redundant)."""
    calls: list[str] = []
    original = fmt.check_sparse

    def counting(name, *args, check_data=True, **kwargs):
        if check_data:
            calls.append(name)
        return original(name, *args, check_data=check_data, **kwargs)

    monkeypatch.setattr(fmt, "check_sparse", counting)
    entries = {k: v for k, v in mixed_entries().items() if isinstance(v, SparseEntry)}
    SparseDiff(entries).save(tmp_path / "x.sft")
    assert sorted(calls) == sorted(entries)


def test_a_spool_copy_fault_is_caught_and_nothing_is_kept(tmp_path, monkeypatch):
    """A writer bug that keeps the length right but shifts the data by one element (so every
    header check passes) is caught by the sampled bytes."""
    def shifted_copy(src, dst, length=0):
        data = src.read()
        dst.write(data[4:] + data[:4])

    monkeypatch.setattr(shutil, "copyfileobj", shifted_copy)
    with pytest.raises(OutputError, match="other bytes at offset"):
        SparseDiff(Computed(mixed_entries())).save(tmp_path / "x.sft")
    assert list(tmp_path.iterdir()) == []


def test_a_header_written_in_the_wrong_order_is_caught(tmp_path, monkeypatch):
    """Two same-sized tensors declared in swapped order: offsets still tile the file exactly."""
    original = safetensors_io.header_bytes

    def swapped(specs, metadata):
        specs = list(specs)
        specs[0], specs[1] = specs[1], specs[0]
        return original(specs, metadata)

    monkeypatch.setattr(safetensors_io, "header_bytes", swapped)
    entries = {"a": DenseEntry(np.ones(3, np.float32)), "b": DenseEntry(np.full(3, 2, np.float32))}
    with pytest.raises(OutputError, match="not the ones written, in the order written"):
        SparseDiff(entries).save(tmp_path / "x.sft")
    assert list(tmp_path.iterdir()) == []


def written_file(tmp_path):
    path = tmp_path / "t.safetensors"
    with open(path, "wb") as f:
        w = StreamingWriter(f, [("a", "F32", (1000,)), ("b", "I32", (3,))], {"format": "pt"})
        w.write("a", np.arange(1000, dtype=np.float32))
        w.write("b", np.array([1, 2, 3], np.int32))
        w.close()
    return path, w.written


def test_verify_written_accepts_the_file_as_written(tmp_path):
    path, written = written_file(tmp_path)
    verify_written(SafetensorsFile(path), written)
    a = written.tensors[0]
    assert [off for off, _ in a.samples] == [0, 500 * 4, 999 * 4]  # first, middle, last element


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_verify_written_catches_changed_sampled_bytes(tmp_path, where):
    path, written = written_file(tmp_path)
    st = SafetensorsFile(path)
    offset = dict(zip(["first", "middle", "last"], [o for o, _ in written.tensors[0].samples]))[where]
    raw = bytearray(path.read_bytes())
    raw[st.tensors["a"].start + offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(OutputError, match=f"tensor 'a' holds other bytes at offset {offset}"):
        verify_written(SafetensorsFile(path), written)


def test_verify_written_catches_metadata_dtype_and_shape_differences(tmp_path):
    path, written = written_file(tmp_path)
    st = SafetensorsFile(path)
    with pytest.raises(OutputError, match="metadata differs"):
        verify_written(st, safetensors_io.Written({"format": "other"}, written.tensors))
    b = written.tensors[1]
    for changed in (dict(dtype="U32"), dict(shape=(3, 1))):
        tensors = [written.tensors[0], safetensors_io.WrittenTensor(**{**b.__dict__, **changed})]
        with pytest.raises(OutputError, match="tensor 'b' is I32 \\[3\\]"):
            verify_written(st, safetensors_io.Written(written.metadata, tensors))
    with pytest.raises(OutputError, match="not the ones written"):
        verify_written(st, safetensors_io.Written(written.metadata, written.tensors[:1]))
