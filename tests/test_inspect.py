"""`sftdiff inspect`: text and JSON reports, clear errors, and a start-up that skips torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from sftdiff.cli import cli
from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry

from sft_craft import sparse_file


@pytest.fixture
def diff_path(tmp_path):
    e = SparseEntry.from_float((4, 5), np.array([0, 3, 19]), np.array([3.0, -4.0, 0.5], np.float32), "F32", "F32")
    meta = DiffMeta(base={"hint": "tiny-bert", "fingerprint": "sfp1:" + "ab" * 16, "numel": 100},
                    origin={"tool": "sftdiff 0.1.0", "method": "topk", "k": 3},
                    user={"kind": "language", "language": "bxr"}, config_patch={"num_labels": 3})
    path = tmp_path / "d.sft"
    SparseDiff({"enc.w": e, "cls.bias": DenseEntry(np.ones((2,), np.float32))}, meta).save(path)
    return path


def run(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def test_text_report(diff_path):
    r = run("inspect", diff_path)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "tiny-bert" in out and "sfp1:" in out and "language:    bxr" in out
    assert "entries:     2 (1 sparse, 1 dense)" in out
    assert "15% of the 20 values" in out and "3% of the base (100)" in out
    row = next(line for line in out.splitlines() if line.startswith("enc.w"))
    assert row.split() == ["enc.w", "sparse", "4x5", "3", "15%", "5.025", "4", "F32"]


def test_json_report(diff_path):
    r = run("inspect", "--json", diff_path)
    assert r.exit_code == 0
    report = json.loads(r.output)
    assert report["totals"]["nnz"] == 3 and report["totals"]["density_base"] == pytest.approx(0.03)
    assert report["totals"]["bytes_per_nonzero"] == pytest.approx(diff_path.stat().st_size / 3)
    rows = {t["name"]: t for t in report["tensors"]}
    assert rows["enc.w"]["l2"] == pytest.approx(np.sqrt(9 + 16 + 0.25))
    assert rows["enc.w"]["max_abs"] == 4.0 and rows["cls.bias"]["kind"] == "dense"
    assert report["config_patch"] == {"num_labels": 3}


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sftdiff", *map(str, args)], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("blob, message", [
    (sparse_file(indices=(5, 1)), "not strictly increasing"),
    (b"garbage!", "not a safetensors file"),
    (sparse_file(version="9.0"), "upgrade sftdiff"),
])
def test_bad_file_is_one_line_error(tmp_path, blob, message):
    path = tmp_path / "bad.sft"
    path.write_bytes(blob)
    r = _cli("inspect", path)
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("sftdiff: error: ") and str(path) in r.stderr and message in r.stderr
    debug = _cli("--debug", "inspect", path)
    assert debug.returncode == 3 and "Traceback" in debug.stderr


def test_missing_file(tmp_path):
    r = _cli("inspect", tmp_path / "nope.sft")
    assert r.returncode == 3 and "no such file" in r.stderr.lower()


def test_file_commands_do_not_import_torch_or_transformers(diff_path):
    code = ("import sys; from sftdiff.cli import main\n"
            "try:\n    main(['inspect', sys.argv[1]])\nexcept SystemExit: pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(diff_path)], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "False False"
