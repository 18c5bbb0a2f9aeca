"""Dense task vectors (import with top-k, export) and the numpy .npz export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from sftdiff.errors import FormatError, UsageError
from sftdiff.formats import convert, load_foreign


def deltas(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"a.weight": rng.standard_normal((8, 6)), "b.bias": rng.standard_normal(5), "c.weight": rng.standard_normal((3, 4, 2))}
    out = {k: v.astype(np.float32) for k, v in out.items()}
    out["b.bias"][[1, 3]] = 0.0
    out["a.weight"][0, :3] = 0.5  # ties
    return out


def test_import_keeps_exact_top_k(tmp_path):
    tv = deltas()
    save_file(tv, str(tmp_path / "tv.safetensors"))
    k = 20
    diff = load_foreign(str(tmp_path / "tv.safetensors"), from_format="task-vector", k=k)
    assert diff.nnz == k
    # Reference: rank (magnitude desc, name asc, flat index asc), computed independently.
    names = sorted(tv)
    rows = [(-abs(float(v)), r, i) for r, n in enumerate(names) for i, v in enumerate(tv[n].reshape(-1)) if v != 0]
    chosen = sorted(rows)[:k]
    for r, name in enumerate(names):
        want = sorted(i for _, rr, i in chosen if rr == r)
        got = diff.entries[name].indices.tolist() if name in diff.entries else []
        assert got == want, name
        if want:
            np.testing.assert_array_equal(diff.entries[name].values_f32(), tv[name].reshape(-1)[want])


def test_density_one_keeps_every_nonzero(tmp_path):
    tv = deltas()
    save_file(tv, str(tmp_path / "tv.safetensors"))
    result = convert(str(tmp_path / "tv.safetensors"), tmp_path / "all.sft", from_format="task-vector", density=1.0)
    diff = SparseDiff.load(result.output)
    assert diff.nnz == sum(int(np.count_nonzero(v)) for v in tv.values())
    for name, v in tv.items():
        np.testing.assert_array_equal(diff.entries[name].to_dense(), v)
    half = convert(str(tmp_path / "tv.safetensors"), tmp_path / "half.sft", from_format="task-vector", density=0.5)
    assert half.nnz == int(np.floor(0.5 * sum(v.size for v in tv.values()) + 0.5))


def test_export_then_import_round_trips(tmp_path):
    tv = deltas(1)
    save_file(tv, str(tmp_path / "tv.safetensors"))
    convert(str(tmp_path / "tv.safetensors"), tmp_path / "a.sft", from_format="task-vector", density=1.0)
    out = convert(str(tmp_path / "a.sft"), tmp_path / "out.safetensors").output  # detected by extension
    written = load_file(str(out))
    assert set(written) == set(tv)
    for name, v in tv.items():
        np.testing.assert_array_equal(written[name], v)
    back = load_foreign(str(out))  # our exports are marked, so no --from is needed
    assert back.nnz == SparseDiff.load(tmp_path / "a.sft").nnz


def test_unmarked_safetensors_is_not_guessed(tmp_path):
    save_file(deltas(), str(tmp_path / "tv.safetensors"))
    with pytest.raises(FormatError, match="--from task-vector"):
        load_foreign(str(tmp_path / "tv.safetensors"))


def test_dense_entries_need_the_base_to_become_deltas(tmp_path):
    base = {"h.weight": np.full((2, 3), 0.25, np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    replacement = np.arange(6, dtype=np.float32).reshape(2, 3)
    SparseDiff({"h.weight": DenseEntry(replacement)}, DiffMeta()).save(tmp_path / "d.sft")
    with pytest.raises(UsageError, match="pass --base"):
        convert(str(tmp_path / "d.sft"), tmp_path / "tv.safetensors")
    convert(str(tmp_path / "d.sft"), tmp_path / "tv.safetensors", base=str(tmp_path / "base.safetensors"))
    np.testing.assert_array_equal(load_file(str(tmp_path / "tv.safetensors"))["h.weight"], replacement - 0.25)


def test_npz_export(tmp_path):
    rng = np.random.default_rng(3)
    entries = {
        "x.weight": SparseEntry.from_float((4, 5), np.array([1, 7, 19]), rng.standard_normal(3)),
        "y.bias": SparseEntry.from_float((3,), np.array([2]), np.array([0.5]), dtype="BF16"),
        "head.weight": DenseEntry(rng.standard_normal((2, 2)).astype(np.float32)),
    }
    SparseDiff(entries, DiffMeta(user={"task": "nli"})).save(tmp_path / "d.sft")
    proc = subprocess.run([sys.executable, "-m", "sftdiff", "convert", str(tmp_path / "d.sft"), "-o",
                           str(tmp_path / "d.npz")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "d.npz", allow_pickle=False) as z:
        assert set(z.files) == {"x.weight/indices", "x.weight/values", "y.bias/indices", "y.bias/values",
                                "head.weight/dense", "__metadata__"}
        np.testing.assert_array_equal(z["x.weight/indices"], entries["x.weight"].indices)
        np.testing.assert_array_equal(z["x.weight/values"], entries["x.weight"].values_f32())
        assert z["y.bias/values"].dtype == np.float32 and z["y.bias/values"][0] == 0.5
        np.testing.assert_array_equal(z["head.weight/dense"], entries["head.weight"].values)
        meta = json.loads(str(z["__metadata__"][0]))
    assert meta["entries"]["x.weight"]["shape"] == [4, 5] and meta["user"] == {"task": "nli"}
    with pytest.raises(FormatError, match="export-only"):
        load_foreign(str(tmp_path / "d.npz"))


def test_cli_errors_are_one_line(tmp_path):
    save_file(deltas(), str(tmp_path / "tv.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "sftdiff", "convert", str(tmp_path / "tv.safetensors"), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--to" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "exists.sft").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "sftdiff", "convert", str(tmp_path / "tv.safetensors"), "--from",
                           "task-vector", "-d", "1", "-o", str(tmp_path / "exists.sft")], capture_output=True, text=True)
    assert proc.returncode == 5 and "--force" in proc.stderr


def test_head_the_base_lacks_is_written_in_full_and_read_back_dense(tmp_path):
    """Issue 12: `convert task.sft --to task-vector --base base/` with a dense head the base lacks
    crashed with KeyError; the head has no delta, so its full value is written and marked."""
    base = {"bert.h.weight": np.full((2, 3), 0.25, np.float32), "bert.emb.weight": np.zeros((4, 2), np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    rng = np.random.default_rng(0)
    head_w, head_b = rng.standard_normal((3, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    resized = rng.standard_normal((6, 2)).astype(np.float32)  # the base's embedding has 4 rows
    entries = {"h.weight": DenseEntry(np.ones((2, 3), np.float32)), "classifier.weight": DenseEntry(head_w),
               "classifier.bias": DenseEntry(head_b), "emb.weight": DenseEntry(resized),
               "h.bias": SparseEntry.from_float((3,), np.array([1]), np.array([0.5], np.float32))}
    SparseDiff(entries, DiffMeta()).save(tmp_path / "d.sft")
    result = convert(str(tmp_path / "d.sft"), tmp_path / "tv.safetensors", base=str(tmp_path / "base.safetensors"))
    assert result.replacements == ["classifier.bias", "classifier.weight", "emb.weight"]
    assert any("holds the full value" in n for n in result.notes)
    written = load_file(str(tmp_path / "tv.safetensors"))
    np.testing.assert_array_equal(written["classifier.weight"], head_w)
    np.testing.assert_array_equal(written["emb.weight"], resized)
    np.testing.assert_array_equal(written["h.weight"], np.full((2, 3), 0.75, np.float32))  # a delta, named via bert.
    back = load_foreign(str(tmp_path / "tv.safetensors"))
    assert isinstance(back.entries["classifier.bias"], DenseEntry) and isinstance(back.entries["emb.weight"], DenseEntry)
    np.testing.assert_array_equal(back.entries["classifier.bias"].values_f32(), head_b)
    assert isinstance(back.entries["h.weight"], SparseEntry)  # deltas stay deltas

    proc = subprocess.run([sys.executable, "-m", "sftdiff", "convert", str(tmp_path / "d.sft"), "--to", "task-vector",
                           "--base", str(tmp_path / "base.safetensors"), "-o", str(tmp_path / "tv2.safetensors"),
                           "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["command"] == "convert" and summary["replacements"] == result.replacements
    assert summary["dropped_metadata"] == [] and summary["lora"] is None


def test_bad_replacements_metadata_is_refused(tmp_path):
    save_file(deltas(), str(tmp_path / "tv.safetensors"), metadata={"format": "task-vector", "replacements": "[\"zz\"]"})
    with pytest.raises(FormatError, match="replacements"):
        load_foreign(str(tmp_path / "tv.safetensors"))


def test_budget_larger_than_the_diff_is_said(tmp_path):
    """Issue 12's sibling of `prune -k 100000` on a small diff: convert -k says it keeps everything."""
    save_file(deltas(), str(tmp_path / "tv.safetensors"))
    total = sum(int(np.count_nonzero(v)) for v in deltas().values())
    result = convert(str(tmp_path / "tv.safetensors"), tmp_path / "a.sft", from_format="task-vector", k=10**6)
    assert result.nnz == total and any("more than the" in n and "all of them are kept" in n for n in result.notes)
    assert convert(str(tmp_path / "a.sft"), tmp_path / "b.sft", k=5).notes == []
