"""Plots: name parsing into layers and module types, the density grid, PNG output, and the message
when matplotlib is missing."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from helpers_models import run_main as run
from sftdiff.diff import DenseEntry, DiffMeta, SparseDiff, SparseEntry
from sftdiff.errors import SftError
from sftdiff.overlap import overlap
from sftdiff.plot import density_grid, layer_of, module_of, plot_density, plot_overlap

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name, layer, module", [
    ("bert.encoder.layer.3.attention.self.query.weight", 3, "query"),
    ("roberta.encoder.layer.11.attention.self.key.bias", 11, "key"),
    ("encoder.layer.0.attention.self.value.weight", 0, "value"),
    ("encoder.layer.2.attention.output.dense.weight", 2, "attn-out"),
    ("encoder.layer.2.attention.output.LayerNorm.weight", 2, "layernorm"),
    ("encoder.layer.2.intermediate.dense.weight", 2, "ffn-in"),
    ("encoder.layer.2.output.dense.weight", 2, "ffn-out"),
    ("bert.embeddings.word_embeddings.weight", None, "embeddings"),
    ("bert.embeddings.LayerNorm.bias", None, "layernorm"),
    ("classifier.weight", None, "head"),
    ("lm_head.dense.weight", None, "head"),
    ("model.layers.5.self_attn.q_proj.weight", 5, "query"),
    ("model.layers.5.self_attn.o_proj.weight", 5, "attn-out"),
    ("model.layers.5.mlp.gate_proj.weight", 5, "ffn-in"),
    ("model.layers.5.mlp.up_proj.weight", 5, "ffn-in"),
    ("model.layers.5.mlp.down_proj.weight", 5, "ffn-out"),
    ("model.layers.5.post_attention_layernorm.weight", 5, "layernorm"),
    ("model.norm.weight", None, "layernorm"),
    ("model.embed_tokens.weight", None, "embeddings"),
    ("transformer.h.7.attn.c_attn.weight", 7, "qkv"),
    ("transformer.h.7.mlp.c_proj.weight", 7, "ffn-out"),
    ("something.else", None, "other"),
])
def test_names_map_to_layers_and_modules(name, layer, module):
    assert (layer_of(name), module_of(name)) == (layer, module)


def test_density_grid_sums_per_cell():
    rows, modules, grid = density_grid([
        ("encoder.layer.0.attention.self.query.weight", 10, 100),
        ("encoder.layer.0.attention.self.query.bias", 0, 10),
        ("encoder.layer.1.output.dense.weight", 5, 50),
        ("embeddings.word_embeddings.weight", 1, 1000),
    ])
    assert rows == ["no layer", "0", "1"]
    assert modules == ["embeddings", "query", "ffn-out"]
    assert grid[1, 1] == pytest.approx(10 / 110) and grid[2, 2] == pytest.approx(0.1)
    assert grid[0, 0] == pytest.approx(0.001) and np.isnan(grid[0, 1])


def toy_diff(seed: int, layers: int = 4) -> SparseDiff:
    rng = np.random.default_rng(seed)
    entries = {}
    for layer in range(layers):
        for module in ("attention.self.query", "attention.self.key", "intermediate.dense", "output.dense"):
            idx = np.sort(rng.choice(400, size=rng.integers(4, 80), replace=False))
            entries[f"encoder.layer.{layer}.{module}.weight"] = SparseEntry.from_float(
                (20, 20), idx, rng.normal(size=len(idx)).astype(np.float32))
    entries["classifier.weight"] = DenseEntry(np.ones((2, 20), dtype=np.float32))
    return SparseDiff(entries, DiffMeta(base={"fingerprint": "sfp1:" + "0" * 32}))


def test_plots_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = toy_diff(0), toy_diff(1)
    plot_density(a, tmp_path / "d.png")
    plot_overlap(overlap(a, b), tmp_path / "o.png")
    for name in ("d.png", "o.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    plot_density(b, tmp_path / "d.png")  # a picture is replaced, not refused
    assert not [p for p in tmp_path.iterdir() if ".sftdiff-tmp-" in p.name]


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SftError, match=r"pip install 'sftdiff\[plot\]'"):
        plot_density(toy_diff(0), tmp_path / "d.png")
    assert not (tmp_path / "d.png").exists()




def test_cli_plot_options(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    toy_diff(0).save(tmp_path / "a.sft")
    toy_diff(1).save(tmp_path / "b.sft")
    a, b = str(tmp_path / "a.sft"), str(tmp_path / "b.sft")
    assert run(["inspect", a, "--plot", str(tmp_path / "d.png")]) == 0
    assert run(["overlap", a, b, "--plot", str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "d.png").read_bytes().startswith(PNG)
    assert (tmp_path / "o.png").read_bytes().startswith(PNG)
    assert run(["overlap", a, b, "--plot", str(tmp_path / "missing-dir" / "o.png")]) == 5
    capsys.readouterr()


@pytest.mark.parametrize("command", ["inspect", "overlap"])
def test_plot_without_matplotlib_fails_before_any_output(tmp_path, command):
    """One line, exit 2, and no table printed first (issue 12: it used to print the table, then exit 1)."""
    import subprocess

    toy_diff(0).save(tmp_path / "a.sft")
    toy_diff(1).save(tmp_path / "b.sft")
    files = [str(tmp_path / "a.sft")] + ([str(tmp_path / "b.sft")] if command == "overlap" else [])
    code = "import sys; sys.modules['matplotlib'] = None\nfrom sftdiff.cli import main\nmain(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, command, *files, "--plot", str(tmp_path / "p.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout)
    assert proc.stderr.count("\n") == 1 and "pip install 'sftdiff[plot]'" in proc.stderr
    assert not (tmp_path / "p.png").exists()
