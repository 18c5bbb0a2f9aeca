"""composable-sft pytorch_diff.bin: reference fixtures, remapping, round trips, refusing code."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from sftdiff.errors import FormatError
from sftdiff.formats import convert, load_foreign
from sftdiff.formats.composable import read_composable

from shared_fixtures import composable_fixtures as fixtures_root


FIXTURES = sorted(p.name for p in fixtures_root().iterdir() if (p / "pytorch_diff.bin").is_file())


def test_fixtures_present():
    assert set(FIXTURES) >= {"lang-sft-small", "task-sft-small"}


def expected_entries(folder: Path) -> tuple[dict, dict, dict]:
    raw = load_file(str(folder / "expected.safetensors"))
    shapes = {k: tuple(v) for k, v in json.loads((folder / "shapes.json").read_text()).items()}
    sparse = {k[len("diff/"): -len("/c_order_indices")]: (raw[k], raw[k.replace("c_order_indices", "values")])
              for k in raw if k.endswith("/c_order_indices")}
    dense = {k[len("abs/"):]: raw[k] for k in raw if k.startswith("abs/")}
    return sparse, dense, shapes


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_imports_to_expected_tensors(name):
    folder = fixtures_root() / name
    sparse, dense, shapes = expected_entries(folder)
    entries = read_composable(folder / "pytorch_diff.bin")
    assert set(entries) == set(sparse) | set(dense)
    for param, (indices, values) in sparse.items():
        e = entries[param]
        assert isinstance(e, SparseEntry) and e.shape == shapes[param]
        np.testing.assert_array_equal(e.indices, indices)
        np.testing.assert_array_equal(e.values_f32(), values)
    for param, values in dense.items():
        e = entries[param]
        assert isinstance(e, DenseEntry) and e.shape == shapes[param]
        np.testing.assert_array_equal(e.values_f32(), values)


def test_import_needs_no_torch(tmp_path):
    bin_path = fixtures_root() / FIXTURES[0] / "pytorch_diff.bin"
    code = ("import sys; from sftdiff.formats import load_foreign; d = load_foreign(sys.argv[1]); "
            "d.save(sys.argv[2]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(bin_path), str(tmp_path / "a.sft")],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", FIXTURES)
def test_export_then_import_round_trips(name, tmp_path):
    import torch

    src = fixtures_root() / name
    original = load_foreign(str(src))  # a folder holding pytorch_diff.bin
    sft = tmp_path / "a.sft"
    convert(str(src / "pytorch_diff.bin"), sft)
    result = convert(str(sft), tmp_path / "exported", to_format="composable-sft")
    exported = result.output
    assert exported == tmp_path / "exported" / "pytorch_diff.bin"

    # What composable-sft's own loader (torch.load) sees: the same layout and numbers as the original.
    ours = torch.load(exported, weights_only=False)
    theirs = torch.load(src / "pytorch_diff.bin", weights_only=False)
    assert set(ours["diffs"]) == set(theirs["diffs"]) and set(ours["abs"]) == set(theirs["abs"])
    for param, d in theirs["diffs"].items():
        assert ours["diffs"][param]["size"] == d["size"]
        assert isinstance(ours["diffs"][param]["index_steps"][0], np.int64)
        np.testing.assert_array_equal(np.cumsum(ours["diffs"][param]["index_steps"]), np.cumsum(d["index_steps"]))
        torch.testing.assert_close(ours["diffs"][param]["values"], d["values"], rtol=0, atol=0)
    for param, t in theirs["abs"].items():
        torch.testing.assert_close(ours["abs"][param], t, rtol=0, atol=0)

    back = load_foreign(str(exported))
    assert set(back.entries) == set(original.entries)
    for param, e in original.entries.items():
        np.testing.assert_array_equal(back.entries[param].values_f32(), e.values_f32())
        if isinstance(e, SparseEntry):
            np.testing.assert_array_equal(back.entries[param].indices, e.indices)


def _composable_file(path: Path, dense_by_name: dict[str, np.ndarray]) -> None:
    """Write a pytorch_diff.bin as composable-sft does, its indices counted first-dimension-fastest."""
    import torch

    diffs = {}
    for name, dense in dense_by_name.items():
        column_major = dense.reshape(-1, order="F")
        idx = np.flatnonzero(column_major)
        steps = np.diff(idx, prepend=0)
        diffs[name] = {"size": torch.Size(dense.shape), "index_steps": [np.int64(steps[0])] + steps[1:].tolist(),
                       "values": torch.from_numpy(column_major[idx].copy())}
    torch.save({"diffs": diffs, "abs": {}}, path)


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 5), (2, 3, 4, 5)])
def test_any_rank_is_remapped_to_row_major(shape, tmp_path):
    rng = np.random.default_rng(len(shape))
    dense = np.where(rng.random(shape) < 0.3, rng.standard_normal(shape), 0).astype(np.float32)
    _composable_file(tmp_path / "pytorch_diff.bin", {"w": dense})
    entry = read_composable(tmp_path / "pytorch_diff.bin")["w"]
    assert bool(np.all(np.diff(entry.indices) > 0))
    np.testing.assert_array_equal(entry.to_dense(), dense)
    # And back: the export puts every value at the same coordinate again.
    convert(str(tmp_path / "pytorch_diff.bin"), tmp_path / "rt.bin", to_format="composable-sft")
    np.testing.assert_array_equal(read_composable(tmp_path / "rt.bin")["w"].to_dense(), dense)


# ---------------------------------------------------------------- hostile files


def _archive(path: Path, pickled: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _SubclassReduce(dict):
    """A dict subclass whose __reduce__ names the subprocess machinery."""

    def __init__(self, marker: Path):
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.parametrize("payload,named", [(_RunsShell, "system"), (_Exec, "exec"), (_SubclassReduce, "call")])
def test_pickle_that_runs_code_is_refused(payload, named, tmp_path):
    marker = tmp_path / "pwned"
    obj = {"diffs": {"w": {"size": (3,), "index_steps": [0], "values": payload(marker)}}, "abs": {}}
    bad = _archive(tmp_path / "pytorch_diff.bin", pickle.dumps(obj, protocol=2))
    with pytest.raises(FormatError, match=rf"refused to load: the pickle names .*{named}"):
        load_foreign(str(bad))
    assert not marker.exists()
    # Through the CLI: one line, exit code 3, still nothing ran.
    proc = subprocess.run([sys.executable, "-m", "sftdiff", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 3 and "refused to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_storage_size_must_match_the_archive(tmp_path):
    import torch

    good = tmp_path / "good.bin"
    torch.save({"diffs": {}, "abs": {"b": torch.ones(4)}}, good)
    with zipfile.ZipFile(good) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    prefix = next(n for n in members if n.endswith("data.pkl"))[: -len("data.pkl")]
    bad = tmp_path / "bad.bin"
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data[:8] if name == prefix + "data/0" else data)
    with pytest.raises(FormatError, match="holds 8 bytes, the pickle says 16"):
        read_composable(bad)


def test_tensor_view_past_its_storage_is_refused(tmp_path):
    import torch

    t = torch.arange(6, dtype=torch.float32)
    buf = io.BytesIO()
    torch.save({"diffs": {}, "abs": {"b": t}}, buf)
    with zipfile.ZipFile(buf) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    pkl_name = next(n for n in members if n.endswith("data.pkl"))
    # The tensor claims 6 elements from offset 3 of a 6-element storage.
    members[pkl_name] = members[pkl_name].replace(b"K\x00K\x06\x85", b"K\x03K\x06\x85")
    bad = tmp_path / "view.bin"
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(FormatError, match="past the end of its storage"):
        read_composable(bad)


def test_legacy_and_garbage_files_are_refused_clearly(tmp_path):
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(FormatError, match="legacy .* not supported"):
        read_composable(legacy)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(FormatError, match="not a torch.save archive"):
        read_composable(junk)


def test_cli_convert_and_inspect(tmp_path):
    folder = fixtures_root() / "lang-sft-small"
    out = tmp_path / "lang.sft"
    proc = subprocess.run([sys.executable, "-m", "sftdiff", "convert", str(folder / "pytorch_diff.bin"), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    diff = SparseDiff.load(out)
    diff.validate()
    assert diff.meta.origin["from"] == "composable-sft"
    sparse, dense, _ = expected_entries(folder)
    assert diff.nnz == sum(len(i) for i, _ in sparse.values())
    proc = subprocess.run([sys.executable, "-m", "sftdiff", "inspect", "--json", str(folder)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["totals"]["dense_entries"] == len(dense)


# ---------------------------------------------------------------- hostile structure (fuzzer findings)


def _diff_file(path: Path, **fields) -> Path:
    """A one-entry pytorch_diff.bin whose fields can be replaced (None: left out)."""
    import torch

    d = {"size": torch.Size([4, 4]), "index_steps": [1, 4], "values": torch.tensor([0.5, -1.0])}
    d.update(fields)
    torch.save({"diffs": {"w": {k: v for k, v in d.items() if v is not None}}, "abs": {}}, path)
    return path


def _hostile_fields() -> dict:
    import torch

    return {
        "missing-key-with-extra-key": (dict(values=None, extra=1), "needs 'size', 'index_steps' and 'values'"),
        "size-of-strings": (dict(size=("a", 2)), "non-negative integers"),
        "size-negative": (dict(size=(-4, 4)), "non-negative integers"),
        "size-over-int64": (dict(size=torch.Size([2**32, 2**32])), "more than"),
        "first-step-negative": (dict(index_steps=[-1, 4]), "start at >= 0"),
        "later-step-zero": (dict(index_steps=[1, 0]), "strictly increasing"),
        "step-float": (dict(index_steps=[1, 2.0]), "list of integers"),
        "step-nested-list": (dict(index_steps=[1, [2, 3]]), "list of integers"),
        "step-over-64-bits": (dict(index_steps=[1, 2**64]), "fit in 64 bits"),
        "steps-past-the-end": (dict(index_steps=[1, 15]), "out of range"),
        # every step is in range, but the int64 running sum wraps: 2^62 + 2^62 = 2^63 -> negative
        "steps-sum-wraps-int64": (dict(size=torch.Size([2**63 - 1]), index_steps=[2**62, 2**62, 2**62],
                                       values=torch.ones(3)), "out of range"),
        "values-integers": (dict(values=torch.tensor([1, 2])), "expected floating point"),
        "values-too-many": (dict(values=torch.ones(3)), "2 indices but 3 values"),
    }


@pytest.mark.parametrize("case", list(_hostile_fields()))
def test_hostile_diff_fields_are_format_errors(case, tmp_path):
    fields, match = _hostile_fields()[case]
    path = _diff_file(tmp_path / "pytorch_diff.bin", **fields)
    with pytest.raises(FormatError, match=match) as info:
        read_composable(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _rewrite_member_headers(data: bytes, name_suffix: str, *, compress: int | None = None,
                            flags: int | None = None) -> bytes:
    """Set the compression method or flag bits of one member in both its local and central header."""
    import struct

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(name_suffix))
    out = bytearray(data)
    central = out.find(b"PK\x01\x02")
    while central >= 0:  # find this member's central header by its name
        name_len = struct.unpack_from("<H", out, central + 28)[0]
        if bytes(out[central + 46 : central + 46 + name_len]).decode() == info.filename:
            break
        central = out.find(b"PK\x01\x02", central + 4)
    for header, flag_at, method_at in ((info.header_offset, 6, 8), (central, 8, 10)):
        if flags is not None:
            struct.pack_into("<H", out, header + flag_at, flags)
        if compress is not None:
            struct.pack_into("<H", out, header + method_at, compress)
    return bytes(out)


@pytest.mark.parametrize("member", ["byteorder", "data.pkl", "data/0"])
@pytest.mark.parametrize("edit", [dict(flags=1), dict(compress=zipfile.ZIP_DEFLATED), dict(compress=99)])
def test_encrypted_or_compressed_members_are_refused(member, edit, tmp_path):
    """zipfile would raise RuntimeError (password needed), zlib.error or NotImplementedError."""
    data = _diff_file(tmp_path / "good.bin").read_bytes()
    bad = tmp_path / "pytorch_diff.bin"
    bad.write_bytes(_rewrite_member_headers(data, member, **edit))
    with pytest.raises(FormatError, match="compressed or encrypted"):
        read_composable(bad)


def test_damaged_archives_are_format_errors(tmp_path):
    data = _diff_file(tmp_path / "good.bin").read_bytes()
    eocd = data.rfind(b"PK\x05\x06")
    cases = {
        # zipfile trusts the zip64 record and silently ignores a contradicting classic offset
        "classic-offset-contradicts-zip64": data[: eocd + 16] + (0xFFFFFFF0).to_bytes(4, "little") + data[eocd + 20:],
        "member-name-not-utf8": data.replace(b"/byteorder", b"/byteord\xb8r"),
        "zip-version-unsupported": _needs_zip_version(data, 137),
        "local-header-damaged": _damage_local_header(data, "byteorder"),
        "directory": None,
    }
    for case, content in cases.items():
        path = tmp_path / case
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        with pytest.raises(FormatError) as info:
            read_composable(path)
            raise AssertionError(f"{case} was accepted")
        assert str(path) in str(info.value) and "\n" not in str(info.value), case


def _damage_local_header(data: bytes, suffix: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    return data[: info.header_offset] + b"XXXX" + data[info.header_offset + 4 :]


def _needs_zip_version(data: bytes, version: int) -> bytes:
    """Claim a zip version zipfile does not implement in every central-directory entry."""
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        out[at + 6] = version
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


def test_export_says_what_composable_sft_cannot_hold(tmp_path):
    """Issue 12: the export dropped the config patch and user fields without a word."""
    entry = SparseEntry.from_float((4, 4), np.array([1, 5]), np.array([0.5, -2.0], np.float32))
    meta = DiffMeta(base={"hint": "b", "fingerprint": "sfp1:" + "0" * 32}, user={"task": "ner"},
                    config_patch={"architectures": ["BertForTokenClassification"], "num_labels": 5})
    SparseDiff({"w": entry}, meta).save(tmp_path / "d.sft")
    result = convert(str(tmp_path / "d.sft"), tmp_path / "out.bin")
    assert result.dropped_metadata == ["config_patch", "user", "base.fingerprint"]
    assert len(result.notes) == 1 and "architectures, num_labels" in result.notes[0] and "task" in result.notes[0]
    proc = subprocess.run([sys.executable, "-m", "sftdiff", "convert", str(tmp_path / "d.sft"), "-o",
                           str(tmp_path / "out2.bin"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.startswith("note: composable-sft has no place for the config patch")
    # formats that carry the whole metadata lose nothing
    assert convert(str(tmp_path / "d.sft"), tmp_path / "out.npz").notes == []


@pytest.mark.parametrize("layout", ["state_dict", "ordered_with_metadata", "training_checkpoint"])
def test_model_checkpoint_given_as_a_diff_is_named_as_such(tmp_path, layout):
    """Issue 12: a model's pytorch_model.bin as a diff said `malformed pickle (AttributeError ...)`, and a
    plain state dict read as an empty diff (apply then changed nothing, exit 0)."""
    import collections

    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    sd = model.state_dict()  # an OrderedDict with a _metadata attribute
    obj = {"state_dict": dict(sd)} if layout == "training_checkpoint" else (
        sd if layout == "ordered_with_metadata" else collections.OrderedDict((k, v.clone()) for k, v in sd.items()))
    torch.save(obj, tmp_path / "pytorch_model.bin")
    with pytest.raises(FormatError, match="this is a model checkpoint .*not a diff; use it as BASE"):
        load_foreign(str(tmp_path / "pytorch_model.bin"))
    proc = subprocess.run([sys.executable, "-m", "sftdiff", "inspect", str(tmp_path / "pytorch_model.bin")],
                          capture_output=True, text=True)
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1
    assert "sftdiff create BASE FINETUNED" in proc.stderr


def test_model_folder_given_as_a_diff_is_named_as_such(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "m").mkdir()
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="model checkpoint folder, not a diff"):
        load_foreign(str(tmp_path / "m"))
    with pytest.raises(FormatError, match="model checkpoint's weights, not a diff"):
        load_foreign(str(tmp_path / "m" / "model.safetensors"))


def test_import_with_a_base_that_lacks_the_head(tmp_path):
    """A composable-sft diff's dense head ('abs') for a parameter the base lacks was refused with --base
    ("does not exist in the base"), so `apply base composable-diff/` failed; dense entries replace or
    add whatever the base holds (spec 3.2), only sparse entries must match the base."""
    from safetensors.numpy import save_file

    from sftdiff.checkpoint import Checkpoint

    base = {"bert.w": np.zeros((4, 4), np.float32), "bert.emb": np.zeros((3, 2), np.float32)}
    save_file(base, str(tmp_path / "base.safetensors"))
    rng = np.random.default_rng(0)
    entries = {"w": SparseEntry.from_float((4, 4), np.array([1, 5]), np.array([0.5, -2.0], np.float32)),
               "classifier.weight": DenseEntry(rng.standard_normal((2, 4)).astype(np.float32)),
               "emb": DenseEntry(rng.standard_normal((5, 2)).astype(np.float32))}  # resized
    SparseDiff(entries).save(tmp_path / "d.sft")
    convert(str(tmp_path / "d.sft"), tmp_path / "d.bin")
    diff = load_foreign(str(tmp_path / "d.bin"), base=Checkpoint.open(tmp_path / "base.safetensors"))
    assert sorted(diff.entries) == ["bert.emb", "bert.w", "classifier.weight"]
    assert diff.entries["classifier.weight"].base_dtype is None and diff.entries["bert.emb"].base_dtype == "F32"
    np.testing.assert_array_equal(diff.entries["bert.emb"].values_f32(), entries["emb"].values)
    # a sparse entry must still match the base
    SparseDiff({"w": SparseEntry.from_float((8,), np.array([1]), np.array([1.0], np.float32))}).save(tmp_path / "e.sft")
    convert(str(tmp_path / "e.sft"), tmp_path / "e.bin")
    from sftdiff.errors import VerificationError

    with pytest.raises(VerificationError, match="shape"):
        load_foreign(str(tmp_path / "e.bin"), base=Checkpoint.open(tmp_path / "base.safetensors"))
