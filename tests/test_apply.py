"""`sftdiff apply` / `bake`, `apply_to_model` / `revert_from_model`, on tiny BERT and Llama models."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_models import (build, head_arrays, random_diff, rounded, run_cli, save, state_numpy,
                            tiny_bert_config, tiny_llama_config, tree_hashes)
import torch
import transformers

from sftdiff.bake import OutputTensor, bake, parse_size, plan_shards
from sftdiff.inplace import AppliedDiff, apply_to_model, revert_from_model
from sftdiff.checkpoint import Checkpoint
from sftdiff.diff import SparseDiff
from sftdiff.errors import UsageError, VerificationError
from sftdiff.safetensors_io import SafetensorsFile

REPO = Path(__file__).resolve().parents[1]
LABELS = {"id2label": {"0": "O", "1": "B", "2": "I"}, "label2id": {"O": 0, "B": 1, "I": 2}}
TASK_PATCH = {"architectures": ["BertForTokenClassification"], "num_labels": 3, **LABELS}


def leftovers(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}")]


@pytest.fixture(scope="module")
def apply_bert(tmp_path_factory):
    """A bare BertModel base with a tokenizer-like side file, a language diff and a task diff."""
    root = tmp_path_factory.mktemp("bert")
    base_dir = save(build(transformers.BertModel, tiny_bert_config()), root / "base")
    (base_dir / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    base = Checkpoint.open(base_dir)
    encoder = [n for n in base.tensors if n.startswith("encoder.")]
    lang = random_diff(base, seed=1, density=0.05, names=encoder)
    lang.save(root / "lang.sft")
    head = head_arrays({"classifier.weight": (3, 32), "classifier.bias": (3,)}, seed=2)
    task = random_diff(base, seed=3, density=0.02, dense=head, config_patch=TASK_PATCH)
    task.save(root / "task.sft")
    return root, base_dir


def bert_in_memory(base_dir: Path, diffs: list[SparseDiff], scales: list[float]):
    model = transformers.BertForTokenClassification.from_pretrained(base_dir, num_labels=3).eval()
    for d, s in zip(diffs, scales):
        record = apply_to_model(model, d, scale=s, strict=False)
        assert all(n.startswith("pooler.") for n in record.skipped)  # a token classifier has no pooler
    return model


def test_bake_equals_in_memory_and_task_head_loads(apply_bert, tmp_path, capsys):
    root, base_dir = apply_bert
    out = tmp_path / "merged"
    code, _, err = run_cli(["apply", base_dir, root / "lang.sft", root / "task.sft", "-o", out,
                            "--scale", "1.0", "--scale", "0.5", "-q"], capsys)
    assert code == 0, err
    merged = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    assert type(merged).__name__ == "BertForTokenClassification" and merged.config.num_labels == 3
    assert merged.config.id2label == {0: "O", 1: "B", 2: "I"}
    expected = bert_in_memory(base_dir, [SparseDiff.load(root / "lang.sft"), SparseDiff.load(root / "task.sft")],
                              [1.0, 0.5])
    got, want = state_numpy(merged), state_numpy(expected)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    ids = torch.tensor([[2, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, expected(ids).logits)
    assert (out / "vocab.txt").read_text() == "[PAD]\n[UNK]\nhello\n"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "vocab.txt"]  # README.md: the model card
    st = SafetensorsFile(out / "model.safetensors")
    assert st.metadata["format"] == "pt" and set(st.metadata) == {"format", "sftdiff.recipe"}  # tests/test_recipe.py
    # Base names kept as the base spells them; the head keeps its own names (mixed naming).
    base = Checkpoint.open(base_dir)
    assert set(st.tensors) == set(base.tensors) | {"classifier.weight", "classifier.bias"}
    assert all(st.tensors[n].dtype == base.tensors[n].dtype for n in base.tensors)


def test_skip_dense_drops_head_and_config_patch(apply_bert, tmp_path, capsys):
    root, base_dir = apply_bert
    out = tmp_path / "merged"
    task = str(root / "task.sft")
    code, _, err = run_cli(["apply", base_dir, task, "-o", out, "--skip-dense", task, "-q"], capsys)
    assert code == 0, err
    assert "classifier.weight" not in SafetensorsFile(out / "model.safetensors").tensors
    assert json.loads((out / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())
    code, _, err = run_cli(["apply", base_dir, task, "-o", tmp_path / "x", "--skip-dense", "other.sft"], capsys)
    assert code == 2 and "not one of the DIFF" in err


def test_prefixed_diff_applies_to_bare_base(apply_bert, tmp_path):
    """A diff made from BertForMaskedLM (`bert.` names) applied to a bare BertModel base."""
    root, base_dir = apply_bert
    base = Checkpoint.open(base_dir)
    diff = random_diff(base, seed=4, density=0.03, rename="bert.", record="fingerprint")
    assert all(n.startswith("bert.") for n in diff.entries)
    result = bake(base_dir, [diff], tmp_path / "m")
    assert result.changed == len(diff.entries) and not result.added
    out = SafetensorsFile(tmp_path / "m" / "model.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    entry = diff.entries["bert." + name]
    expect = base.array(name).reshape(-1).copy()
    expect[entry.indices] += entry.values_f32()
    np.testing.assert_array_equal(out.array(name).reshape(-1), expect)


@pytest.fixture(scope="module")
def apply_llama(tmp_path_factory):
    """A sharded bfloat16 LlamaForCausalLM base and two diffs (bf16 values for one of them)."""
    root = tmp_path_factory.mktemp("llama")
    model = build(transformers.LlamaForCausalLM, tiny_llama_config(), seed=5, dtype=torch.bfloat16)
    base_dir = save(model, root / "base", max_shard_size="20KB")
    (base_dir / "tokenizer.json").write_text("{}")
    base = Checkpoint.open(base_dir)
    assert len(base.weight_files) > 1
    d1 = random_diff(base, seed=6, density=0.05)
    d2 = random_diff(base, seed=7, density=0.05, value_dtype="BF16")
    d1.save(root / "a.sft")
    d2.save(root / "b.sft")
    return root, base_dir


def test_sharded_bf16_llama_two_diffs_rounds_once(apply_llama, tmp_path, capsys):
    root, base_dir = apply_llama
    out = tmp_path / "merged"
    code, _, err = run_cli(["apply", base_dir, root / "a.sft", root / "b.sft", "-o", out, "--scale", "2",
                            "--scale", "-1", "--shard-size", "30KB", "-q"], capsys)
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    sizes = [sum(t.nbytes for t in SafetensorsFile(out / s).tensors.values()) for s in shards]
    assert index["metadata"]["total_size"] == sum(sizes)
    assert (out / "tokenizer.json").exists()
    # In memory in float32, both diffs added, then rounded once to bf16 = the baked values.
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for name, scale in (("a.sft", 2.0), ("b.sft", -1.0)):
        apply_to_model(model, SparseDiff.load(root / name), scale=scale)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    want = {n: rounded(v, "BF16") for n, v in state_numpy(model).items()}
    got = state_numpy(merged)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    base = Checkpoint.open(base_dir)
    assert {n: (t.dtype, t.shape) for n, t in Checkpoint.open(out).tensors.items()} == \
        {n: (t.dtype, t.shape) for n, t in base.tensors.items()}


def test_bf16_single_diff_matches_in_memory_bf16(apply_llama, tmp_path):
    root, base_dir = apply_llama
    diff = SparseDiff.load(root / "b.sft")
    bake(base_dir, [diff], tmp_path / "m")
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    apply_to_model(model, diff)
    got = state_numpy(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m"))
    for name, want in state_numpy(model).items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


@pytest.mark.parametrize("base_dtype, out_dtype", [("F16", "float32"), ("F32", "bfloat16"), ("BF16", "float16")])
def test_output_dtype(tmp_path, capsys, base_dtype, out_dtype):
    torch_dtype = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}[base_dtype]
    base_dir = save(build(transformers.BertModel, tiny_bert_config(), seed=8, dtype=torch_dtype), tmp_path / "base")
    base = Checkpoint.open(base_dir)
    diff = random_diff(base, seed=9, density=0.1)
    diff.save(tmp_path / "d.sft")
    code, _, err = run_cli(["apply", base_dir, tmp_path / "d.sft", "-o", tmp_path / "m", "--dtype", out_dtype,
                            "-q"], capsys)
    assert code == 0, err
    model = transformers.BertModel.from_pretrained(base_dir, dtype=torch.float32)
    apply_to_model(model, SparseDiff.load(tmp_path / "d.sft"))
    target = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[out_dtype]
    out = Checkpoint.open(tmp_path / "m")
    for name, want in state_numpy(model).items():
        if out.tensors[name].dtype != "I64":
            assert out.tensors[name].dtype == target
            np.testing.assert_array_equal(out.array(name), rounded(want, target), err_msg=name)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == out_dtype
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "m")
    assert loaded.dtype == getattr(torch, out_dtype)


def test_bin_base_becomes_safetensors(tmp_path):
    model = build(transformers.BertModel, tiny_bert_config(), seed=10)
    (tmp_path / "base").mkdir()
    model.config.save_pretrained(tmp_path / "base")
    torch.save(model.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    base = Checkpoint.open(tmp_path / "base")
    diff = random_diff(base, seed=11)
    bake(tmp_path / "base", [diff], tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    apply_to_model(model, diff)
    got = state_numpy(transformers.BertModel.from_pretrained(tmp_path / "m"))
    for name, want in state_numpy(model).items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


# ---------------------------------------------------------------- refusals


def test_wrong_base_refused_nothing_written(apply_bert, tmp_path, capsys):
    root, base_dir = apply_bert
    other = save(build(transformers.BertModel, tiny_bert_config(), seed=99), tmp_path / "other")
    code, _, err = run_cli(["apply", other, root / "lang.sft", "-o", tmp_path / "m"], capsys)
    assert code == 4
    assert err.startswith("sftdiff: error: ") and "lang.sft" in err and "encoder." in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "m").exists() and not leftovers(tmp_path, "m")
    # --no-verify skips the digest check only: same shapes, other values, is applied.
    code, _, err = run_cli(["apply", other, root / "lang.sft", "-o", tmp_path / "m", "--no-verify", "-q"], capsys)
    assert code == 0, err


def test_fingerprint_fallback_and_unverifiable_warning(apply_bert, tmp_path, capsys):
    root, base_dir = apply_bert
    base = Checkpoint.open(base_dir)
    other = Checkpoint.open(save(build(transformers.BertModel, tiny_bert_config(), seed=98), tmp_path / "o"))
    random_diff(other, seed=12, record="fingerprint").save(tmp_path / "fp.sft")
    code, _, err = run_cli(["apply", base_dir, tmp_path / "fp.sft", "-o", tmp_path / "m"], capsys)
    assert code == 4 and "fingerprint" in err and "fp.sft" in err
    random_diff(base, seed=12, record="none").save(tmp_path / "none.sft")
    code, _, err = run_cli(["apply", base_dir, tmp_path / "none.sft", "-o", tmp_path / "m", "-q"], capsys)
    assert code == 0 and "warning" in err and "none.sft" in err


def test_wrong_shape_refused_even_without_verify(apply_bert, tmp_path, capsys):
    root, base_dir = apply_bert
    wide = Checkpoint.open(save(build(transformers.BertModel, tiny_bert_config(intermediate_size=48)), tmp_path / "w"))
    random_diff(wide, seed=13).save(tmp_path / "wide.sft")
    code, _, err = run_cli(["apply", base_dir, root / "lang.sft", tmp_path / "wide.sft", "-o", tmp_path / "m",
                            "--no-verify"], capsys)
    assert code == 4 and "wide.sft" in err and "shape" in err and "intermediate" in err
    assert not (tmp_path / "m").exists() and not leftovers(tmp_path, "m")


def test_output_location_rules(apply_bert, tmp_path, capsys):
    root, base_dir = apply_bert
    lang = root / "lang.sft"
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(["apply", base_dir, lang, "-o", tmp_path / "taken"], capsys)
    assert code == 5 and "--force" in err
    code, _, err = run_cli(["apply", base_dir, lang, "-o", base_dir, "--force"], capsys)
    assert code == 2 and "overlaps the base" in err
    code, _, err = run_cli(["apply", base_dir, lang, "-o", base_dir / "inner"], capsys)
    assert code == 2
    code, _, err = run_cli(["apply", base_dir, lang, "-o", root, "--force"], capsys)
    assert code == 2  # root holds the base and the diffs
    code, _, err = run_cli(["apply", base_dir, lang, "-o", tmp_path / "taken", "--force", "-q"], capsys)
    assert code == 0 and (tmp_path / "taken" / "model.safetensors").exists()


def test_inputs_unchanged(apply_bert, tmp_path):
    root, base_dir = apply_bert
    inputs = [base_dir, root / "lang.sft", root / "task.sft"]
    before = tree_hashes(*inputs)
    bake(base_dir, [root / "lang.sft", root / "task.sft"], tmp_path / "m", dtype="bfloat16", shard_size="40KB")
    assert tree_hashes(*inputs) == before


def test_interrupted_bake_leaves_no_output(apply_bert, tmp_path):
    """SIGKILL while shards are being written: no OUT; the next run removes the abandoned temporary."""
    root, base_dir = apply_bert
    out = tmp_path / "m"
    slow = (
        "import importlib, sys, time\n"
        "b = importlib.import_module(\"sftdiff.bake\")\n"
        "orig = b._write_tensor\n"
        "def slow(*a):\n"
        "    time.sleep(0.05)\n"
        "    return orig(*a)\n"
        "b._write_tensor = slow\n"
        "from sftdiff.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow, "apply", str(base_dir), str(root / "lang.sft"),
                             "-o", str(out), "-q"], cwd=tmp_path)
    deadline = time.time() + 30
    while time.time() < deadline:
        temps = leftovers(tmp_path, "m")
        if temps and any((tmp_path / temps[0]).glob("*.safetensors")):
            break
        time.sleep(0.005)
    else:
        proc.kill()
        pytest.fail("the temporary folder never appeared")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and leftovers(tmp_path, "m")
    bake(base_dir, [root / "lang.sft"], out)
    assert out.exists() and not leftovers(tmp_path, "m")


# ---------------------------------------------------------------- in memory


def test_apply_revert_float32_exact_with_dense_record(apply_bert):
    root, base_dir = apply_bert
    model = transformers.BertForTokenClassification.from_pretrained(base_dir, num_labels=3)
    before = state_numpy(model)
    task = SparseDiff.load(root / "task.sft")
    record = apply_to_model(model, task, scale=0.7, strict=False)
    changed = state_numpy(model)
    assert not np.array_equal(changed["bert.encoder.layer.0.output.dense.weight"],
                              before["bert.encoder.layer.0.output.dense.weight"])
    np.testing.assert_array_equal(changed["classifier.weight"], task.entries["classifier.weight"].values_f32())
    with pytest.raises(UsageError, match="dense entry"):
        revert_from_model(model, task, strict=False)
    revert_from_model(model, record)
    for name, want in before.items():
        np.testing.assert_array_equal(state_numpy(model)[name], want, err_msg=name)


def test_revert_plain_diff_within_one_rounding_bf16(apply_llama):
    root, base_dir = apply_llama
    diff = SparseDiff.load(root / "a.sft")
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    before = {n: t.float().clone() for n, t in model.state_dict().items()}
    record = apply_to_model(model, diff, scale=3.0)
    revert_from_model(model, record)  # the record restores bf16 exactly
    assert all(torch.equal(model.state_dict()[n].float(), before[n]) for n in before)
    apply_to_model(model, diff, scale=3.0)
    applied = {n: t.float().clone() for n, t in model.state_dict().items()}
    revert_from_model(model, diff, scale=3.0)  # without the record: subtraction
    changed = 0
    for name, want in before.items():
        got = model.state_dict()[name].float()
        # Two roundings to bf16 (8 significant bits): half an ulp of the applied value and of the result.
        bound = (torch.abs(applied[name]) + torch.abs(want)) * 2.0**-8
        assert torch.all(torch.abs(got - want) <= bound), name
        changed += int((got != want).sum())
    assert changed > 0  # bf16 subtraction is not exact, which is why apply returns a record


def test_revert_after_training_keeps_updates(apply_bert):
    """Values changed between apply and revert (a training step) get the delta subtracted."""
    root, base_dir = apply_bert
    model = transformers.BertModel.from_pretrained(base_dir)
    lang = SparseDiff.load(root / "lang.sft")
    name = "encoder.layer.1.attention.output.dense.weight"
    before = model.state_dict()[name].clone()
    record = apply_to_model(model, lang)
    with torch.no_grad():
        model.state_dict()[name].add_(1.0)
    revert_from_model(model, record)
    torch.testing.assert_close(model.state_dict()[name], before + 1.0)


def test_in_memory_shape_and_missing_parameter_errors(apply_bert):
    root, base_dir = apply_bert
    model = transformers.BertModel.from_pretrained(base_dir)
    with pytest.raises(VerificationError, match="classifier"):
        apply_to_model(model, SparseDiff.load(root / "task.sft"))
    with pytest.raises(VerificationError, match="pooler"):
        apply_to_model(transformers.BertForTokenClassification.from_pretrained(base_dir, num_labels=3),
                       SparseDiff.load(root / "task.sft"))
    record = apply_to_model(model, SparseDiff.load(root / "task.sft"), with_dense=False)
    assert isinstance(record, AppliedDiff) and not record.dense
    small = build(transformers.BertModel, tiny_bert_config(intermediate_size=48))
    with pytest.raises(VerificationError, match="shape"):
        apply_to_model(small, SparseDiff.load(root / "lang.sft"))


# ---------------------------------------------------------------- pieces


def test_parse_size_and_shard_plan():
    assert parse_size("50GB") == 50 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size("1e9B") == 10**9 and parse_size(4096) == 4096
    for bare in ("1000", "10", "0"):  # issue 12: `--shard-size 10` meant 10 bytes (41 shards)
        with pytest.raises(UsageError, match="no unit"):
            parse_size(bare)
    with pytest.raises(UsageError, match="minimum"):
        parse_size("10B")
    with pytest.raises(UsageError):
        parse_size("lots")
    ts = [OutputTensor(f"t{i}", "F32", (n,), f"t{i}", ()) for i, n in enumerate([10, 10, 30, 5])]
    assert [[t.name for t in s] for s in plan_shards(ts, 80)] == [["t0", "t1"], ["t2"], ["t3"]]
    assert len(plan_shards(ts, 10**9)) == 1


def test_quickstart_runs_end_to_end(tmp_path):
    env = dict(os.environ, EXAMPLE_OUT=str(tmp_path / "out"), HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", str(REPO / "examples" / "quickstart.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "BertForTokenClassification from" in done.stdout and "lisbon/CITY" in done.stdout
    assert "kind:        language" in done.stdout and "kind:        task" in done.stdout
    merged = tmp_path / "out" / "merged"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in merged.iterdir()}
    assert not any(n.startswith("cls.") for n in SafetensorsFile(merged / "model.safetensors").tensors)


def test_patched_slices_sum_overlapping_diffs_once(tmp_path, monkeypatch):
    """Touched values are patched slice by slice: with slices of 7 values (boundaries mid-row) and
    a flush after every tensor, three overlapping diffs give, for every dtype, the base plus the
    scaled deltas summed in order (float32; float64 for F64) and rounded once, the same bytes
    as default slices."""
    bake_module = importlib.import_module("sftdiff.bake")
    from sftdiff.dtypes import to_float32
    from sftdiff.safetensors_io import StreamingWriter

    rng = np.random.default_rng(21)
    shapes = {"w16": ("F16", (9, 13)), "w32": ("F32", (5, 31)), "w64": ("F64", (40,)), "wbf": ("BF16", (17, 6))}
    arrays = {}
    for name, (dtype, shape) in shapes.items():
        values = rng.normal(0, 0.3, size=shape).astype(np.float32)
        arrays[name] = values.astype(np.float64) if dtype == "F64" else rounded(values, dtype)
    (tmp_path / "base").mkdir()
    with open(tmp_path / "base" / "model.safetensors", "wb") as f:
        writer = StreamingWriter(f, [(n, d, s) for n, (d, s) in shapes.items()], {"format": "pt"})
        for name in shapes:
            writer.write(name, arrays[name])
        writer.close()
    base = Checkpoint.open(tmp_path / "base")
    diffs = [random_diff(base, seed=s, density=0.6, value_dtype=v) for s, v in ((22, "F32"), (23, "BF16"), (24, "F16"))]
    scales = [2.0, -1.0, 0.5]
    bake(tmp_path / "base", diffs, tmp_path / "default", scales=scales)
    monkeypatch.setattr(bake_module, "CHUNK_ELEMENTS", 7)
    monkeypatch.setattr(bake_module, "FLUSH_BYTES", 1)
    bake(tmp_path / "base", diffs, tmp_path / "small", scales=scales)
    assert (tmp_path / "small" / "model.safetensors").read_bytes() == \
        (tmp_path / "default" / "model.safetensors").read_bytes()
    out = SafetensorsFile(tmp_path / "small" / "model.safetensors")
    for name, (dtype, _) in shapes.items():
        wide = dtype == "F64"
        work = arrays[name].reshape(-1).astype(np.float64) if wide else to_float32(arrays[name], dtype).reshape(-1).copy()
        for diff, scale in zip(diffs, scales):
            entry = diff.entries[name]
            work[entry.indices] += entry.values_f32() * np.float32(scale)
        want = work if wide else rounded(work, dtype)
        np.testing.assert_array_equal(out.array(name).reshape(-1), want, err_msg=name)


def _in_writer_thread() -> bool:
    import threading

    return threading.current_thread().name == "sftdiff-write"


def test_lagging_writer_thread_writes_same_bytes(apply_llama, tmp_path, monkeypatch):
    """Slices are written by a background thread while the next ones are read into rotating
    buffers: with small slices and a writer slowed down so its queue stays full, no buffer is
    refilled before its slice is written (the bytes equal a run with default slices)."""
    bake_module = importlib.import_module("sftdiff.bake")

    root, base_dir = apply_llama
    diffs = [root / "a.sft", root / "b.sft"]
    bake(base_dir, diffs, tmp_path / "default", scales=[2.0, -1.0], shard_size="30KB")
    write_all = bake_module._write_all

    def slow_write_all(fd, array, **kw):
        if _in_writer_thread():
            time.sleep(0.0002)
        return write_all(fd, array, **kw)

    monkeypatch.setattr(bake_module, "CHUNK_ELEMENTS", 97)
    monkeypatch.setattr(bake_module, "_write_all", slow_write_all)
    bake(base_dir, diffs, tmp_path / "lagging", scales=[2.0, -1.0], shard_size="30KB")
    shards = sorted(p.name for p in (tmp_path / "default").glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "lagging").glob("*.safetensors"))
    for name in shards:  # the same tensor bytes (headers name their own folder in the recipe)
        lagging, default = SafetensorsFile(tmp_path / "lagging" / name), SafetensorsFile(tmp_path / "default" / name)
        assert list(lagging.tensors) == list(default.tensors), name
        for t in default.tensors:
            assert lagging.array(t).tobytes() == default.array(t).tobytes(), (name, t)


def test_write_error_in_writer_thread_fails_bake_nothing_left(apply_llama, tmp_path, monkeypatch):
    """A write that fails in the background thread (disk full) fails the bake like a write in the
    main thread: OutputError naming the cause, no OUT, no temporary, no thread left behind."""
    import errno
    import threading

    bake_module = importlib.import_module("sftdiff.bake")
    from sftdiff.errors import OutputError

    root, base_dir = apply_llama
    write_all = bake_module._write_all
    calls = []

    def failing_write_all(fd, array, **kw):
        if _in_writer_thread():
            calls.append(1)
            if len(calls) == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
        return write_all(fd, array, **kw)

    monkeypatch.setattr(bake_module, "CHUNK_ELEMENTS", 97)
    monkeypatch.setattr(bake_module, "_write_all", failing_write_all)
    out = tmp_path / "m"
    with pytest.raises(OutputError, match="no space left"):
        bake(base_dir, [root / "a.sft", root / "b.sft"], out, shard_size="30KB")
    assert len(calls) == 5  # later writes were skipped
    assert not out.exists() and not leftovers(tmp_path, "m")
    assert not any(t.name == "sftdiff-write" for t in threading.enumerate())


def test_flushes_start_within_a_large_tensor(tmp_path, monkeypatch):
    """Written data is handed to the disk slice by slice while apply computes: with one large
    tensor, fsyncs run while it is still being written (counted per tensor, the first flush waited
    for the whole tensor and the disk sat idle), and the bytes equal a run with default settings."""
    bake_module = importlib.import_module("sftdiff.bake")
    from sftdiff.safetensors_io import StreamingWriter

    values = np.random.default_rng(5).normal(0, 0.02, size=(200, 100)).astype(np.float32)
    (tmp_path / "base").mkdir()
    with open(tmp_path / "base" / "model.safetensors", "wb") as f:
        writer = StreamingWriter(f, [("w", "F32", values.shape)], {"format": "pt"})
        writer.write("w", values)
        writer.close()
    diff = random_diff(Checkpoint.open(tmp_path / "base"), seed=6, density=0.1)
    bake(tmp_path / "base", [diff], tmp_path / "default")
    write_all, fsync_file = bake_module._write_all, bake_module._fsync_file
    sizes = []

    def slow_write_all(fd, array, **kw):
        if _in_writer_thread():
            time.sleep(0.001)
        return write_all(fd, array, **kw)

    def recording_fsync(path):
        sizes.append(os.path.getsize(path))
        fsync_file(path)

    monkeypatch.setattr(bake_module, "CHUNK_ELEMENTS", 100)  # 200 slices of 400 bytes
    monkeypatch.setattr(bake_module, "FLUSH_BYTES", 1)
    monkeypatch.setattr(bake_module, "_write_all", slow_write_all)
    monkeypatch.setattr(bake_module, "_fsync_file", recording_fsync)
    bake(tmp_path / "base", [diff], tmp_path / "flushed")
    final = (tmp_path / "flushed" / "model.safetensors").stat().st_size
    assert sizes and min(sizes) < final - values.nbytes // 2, (sizes, final)
    assert (tmp_path / "flushed" / "model.safetensors").read_bytes() == \
        (tmp_path / "default" / "model.safetensors").read_bytes()


def test_failed_background_fsync_fails_bake_nothing_left(apply_llama, tmp_path, monkeypatch):
    """An fsync that fails in the background flush thread (an I/O error) fails the bake like a
    failed write: OutputError naming the cause, no OUT, no temporary, no thread left behind; later
    queued flushes are skipped."""
    import errno
    import threading

    bake_module = importlib.import_module("sftdiff.bake")
    from sftdiff.errors import OutputError

    root, base_dir = apply_llama
    fsync_file = bake_module._fsync_file
    calls = []

    def failing_fsync(path):
        if threading.current_thread().name == "sftdiff-fsync":
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.EIO, "Input/output error")
        return fsync_file(path)

    monkeypatch.setattr(bake_module, "CHUNK_ELEMENTS", 97)
    monkeypatch.setattr(bake_module, "FLUSH_BYTES", 1)
    monkeypatch.setattr(bake_module, "_fsync_file", failing_fsync)
    out = tmp_path / "m"
    with pytest.raises(OutputError, match="Input/output error"):
        bake(base_dir, [root / "a.sft", root / "b.sft"], out, shard_size="30KB")
    assert len(calls) == 2  # nothing was flushed after the failure
    assert not out.exists() and not leftovers(tmp_path, "m")
    assert not any(t.name.startswith("sftdiff-") for t in threading.enumerate())


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_commands_load_numpy_without_blas_threads():
    """numpy's OpenBLAS starts a spinning thread per core when it loads (~0.07 s of CPU); the CLI,
    whose commands do no linear algebra in numpy, loads it with one thread and leaves no trace of
    that in the environment (nor the garbage collector paused); a user's own OPENBLAS_NUM_THREADS is kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    plain_probe = "import os, numpy; print(len(os.listdir('/proc/self/task')), None)"
    cli_probe = ("import gc, os, sftdiff.cli as cli\n"
                 "try:\n    cli.main(['apply', '--help'])\nexcept SystemExit:\n    pass\n"
                 "assert gc.isenabled()\n"
                 "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))")

    def threads_after(probe: str, **extra: str) -> tuple[int, str]:
        out = subprocess.run([sys.executable, "-c", probe], env={**env, **extra},
                             capture_output=True, text=True, check=True).stdout.split()
        return int(out[-2]), out[-1]

    plain, _ = threads_after(plain_probe)
    if plain == 1:
        pytest.skip("numpy's BLAS starts no threads on this machine")
    assert threads_after(cli_probe) == (1, "None")
    assert threads_after(cli_probe, OPENBLAS_NUM_THREADS="2") == (min(plain, 2), "2")


# ---------------------------------------------------------------- inputs are never written
#
# Every API entry point and command is handed inputs of each kind (in-memory state dicts of torch
# tensors and of numpy arrays, `.bin` and safetensors checkpoints, in-memory diffs with dense
# entries, lazy algebra results), with a snapshot taken before and compared after.


def _snapshot_state(sd) -> dict[str, np.ndarray]:
    return {k: (v.detach().clone().numpy() if hasattr(v, "detach") else np.array(v, copy=True)) for k, v in sd.items()}


def _same_state(sd, snap) -> bool:
    now = _snapshot_state(sd)
    return now.keys() == snap.keys() and all(np.array_equal(now[k], snap[k]) for k in snap)


def _snapshot_diff(diff: SparseDiff) -> dict:
    out = {"meta": json.dumps(diff.meta.to_json({}), sort_keys=True, default=str)}
    for name in diff.entries:
        e = diff.entries[name]
        if hasattr(e, "indices"):
            out[name] = (np.array(e.indices, copy=True), np.array(e.values, copy=True))
        else:
            out[name] = (np.array(e.values, copy=True),)
    return out


def _same_diff(diff: SparseDiff, snap: dict) -> bool:
    now = _snapshot_diff(diff)
    return now.keys() == snap.keys() and now["meta"] == snap["meta"] and all(
        len(now[k]) == len(snap[k]) and all(np.array_equal(a, b) for a, b in zip(now[k], snap[k]))
        for k in snap if k != "meta")


@pytest.fixture(scope="module")
def inputs_kit(tmp_path_factory):
    """A BertForTokenClassification base, its torch and numpy state dicts, a `.bin` copy, and two
    in-memory diffs: one sparse, one with a dense entry on an existing parameter (the classifier)
    whose values are a writeable numpy array owned by the test."""
    root = tmp_path_factory.mktemp("inputs")
    model = build(transformers.BertForTokenClassification, tiny_bert_config(num_labels=3))
    base_dir = save(model, root / "base")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((base_dir / "config.json").read_text())
    base = Checkpoint.open(base_dir)
    sparse = random_diff(base, seed=11, density=0.05)
    head = {"classifier.weight": np.random.default_rng(5).normal(0, 0.2, (3, 32)).astype(np.float32)}
    with_dense = random_diff(base, seed=12, density=0.03, dense=head)
    sparse.save(root / "sparse.sft")
    with_dense.save(root / "dense.sft")
    return root, base_dir, bin_dir, model, sparse, with_dense


def _state_dicts(model) -> dict[str, dict]:
    torch_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    numpy_sd = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    return {"torch": torch_sd, "numpy": numpy_sd}


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_bake_never_writes_into_an_in_memory_base(inputs_kit, tmp_path, kind):
    """Issue 11: `bake(Checkpoint.from_state_dict(sd), [diff], out)` changed every tensor of `sd`.
    Also with two diffs (the summing path) and a dense entry (its values are not patched in place),
    and the result equals the bake of the same base on disk."""
    root, base_dir, _, model, sparse, with_dense = inputs_kit
    sd = _state_dicts(model)[kind]
    snap, diff_snaps = _snapshot_state(sd), [_snapshot_diff(sparse), _snapshot_diff(with_dense)]
    for i, diffs in enumerate([[sparse], [with_dense, sparse], [sparse, with_dense]]):
        bake(Checkpoint.from_state_dict(sd), diffs, tmp_path / f"m{i}", verify=False)
        assert _same_state(sd, snap), f"bake #{i} wrote into the {kind} state dict"
        bake(base_dir, diffs, tmp_path / f"disk{i}", verify=False)
        mem, disk = Checkpoint.open(tmp_path / f"m{i}"), Checkpoint.open(tmp_path / f"disk{i}")
        assert set(disk.tensors) <= set(mem.tensors)
        for name in disk.tensors:
            assert np.array_equal(mem.array(name), disk.array(name)), name
    assert _same_diff(sparse, diff_snaps[0]) and _same_diff(with_dense, diff_snaps[1])


def test_checkpoint_arrays_are_read_only_views(inputs_kit):
    """What Checkpoint hands out cannot be written, for every kind of source, and wrapping a state
    dict leaves the caller's own arrays writeable."""
    root, base_dir, bin_dir, model, *_ = inputs_kit
    sds = _state_dicts(model)
    for ckpt in [Checkpoint.open(base_dir), Checkpoint.open(bin_dir), Checkpoint.from_state_dict(sds["torch"]),
                 Checkpoint.from_state_dict(sds["numpy"])]:
        for name in ckpt.tensors:
            arr = ckpt.array(name)
            assert not arr.flags.writeable, (ckpt.path, name)
            with pytest.raises(ValueError):
                arr.reshape(-1)[:1] += 1
    assert all(a.flags.writeable for a in sds["numpy"].values())


def test_checkpoint_byte_reads_match_arrays(inputs_kit, tmp_path):
    """read / read_into / copy_to give the same bytes as `array`, for file and in-memory sources."""
    root, base_dir, bin_dir, model, *_ = inputs_kit
    for ckpt in [Checkpoint.open(base_dir), Checkpoint.open(bin_dir), Checkpoint.from_state_dict(model.state_dict())]:
        for name, t in ckpt.tensors.items():
            flat = ckpt.array(name).reshape(-1)
            lo, n = flat.size // 3, max(1, flat.size // 4)
            assert np.array_equal(ckpt.read(name, lo, n), flat[lo:lo + n])
            buf = np.empty(n, dtype=flat.dtype)
            assert ckpt.read_into(name, lo, buf) is buf and np.array_equal(buf, flat[lo:lo + n])
            ckpt.read_ahead(name)
            if ckpt.in_file(name):
                target = tmp_path / "copy.bin"
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                try:
                    os.write(fd, b"xx")
                    assert ckpt.copy_to(name, fd) == flat.nbytes
                finally:
                    os.close(fd)
                assert target.read_bytes() == b"xx" + flat.tobytes()
        ckpt.close()


def test_create_never_writes_into_its_inputs(inputs_kit):
    """create_diff with in-memory (torch, numpy) and `.bin` bases and fine-tunes: inputs unchanged,
    and the diff does not alias the fine-tune's memory (training it further leaves the diff as is)."""
    from sftdiff.create import create_diff

    root, base_dir, bin_dir, model, *_ = inputs_kit
    tuned = build(transformers.BertForTokenClassification, tiny_bert_config(num_labels=3))
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.01)
    before = tree_hashes(base_dir, bin_dir)
    for kind in ("torch", "numpy"):
        base_sd, ft_sd = _state_dicts(model)[kind], _state_dicts(tuned)[kind]
        snaps = _snapshot_state(base_sd), _snapshot_state(ft_sd)
        for base in (base_sd, Checkpoint.from_state_dict(base_sd), bin_dir, base_dir):
            diff = create_diff(base, ft_sd, k=500, dense=["classifier.*"])
            assert _same_state(base_sd, snaps[0]) and _same_state(ft_sd, snaps[1]), kind
        dense_before = np.array(diff.entries["classifier.weight"].values, copy=True)
        next(iter(ft_sd.values()))  # the fine-tune "trains on": its classifier changes in place
        if kind == "torch":
            ft_sd["classifier.weight"].add_(1.0)
        else:
            ft_sd["classifier.weight"] += 1.0
        assert np.array_equal(diff.entries["classifier.weight"].values, dense_before)
    assert tree_hashes(base_dir, bin_dir) == before


def test_lazy_algebra_results_and_their_operands_stay_unchanged(inputs_kit, tmp_path):
    """add/subtract/scale results (lazy) fed to bake, verify and apply_to_model: neither they nor
    their operands change, and baking the lazy sum equals baking the saved sum."""
    import sftdiff
    from sftdiff.verify import verify_against_base

    root, base_dir, _, model, sparse, with_dense = inputs_kit
    snaps = [_snapshot_diff(sparse), _snapshot_diff(with_dense)]
    base = Checkpoint.open(base_dir)
    results = [sftdiff.add(sparse, with_dense), sftdiff.scale(sparse, 0.5), sftdiff.subtract(with_dense, sparse)]
    for i, result in enumerate(results):
        snap = _snapshot_diff(result)
        verify_against_base(result, base)
        bake(base, [result], tmp_path / f"lazy{i}", verify=False)
        target = build(transformers.BertForTokenClassification, tiny_bert_config(num_labels=3))
        apply_to_model(target, result, strict=False)
        assert _same_diff(result, snap), f"result #{i} changed"
    assert _same_diff(sparse, snaps[0]) and _same_diff(with_dense, snaps[1])
    results[0].save(tmp_path / "sum.sft")
    bake(base, [tmp_path / "sum.sft"], tmp_path / "saved", verify=False)
    lazy, saved = Checkpoint.open(tmp_path / "lazy0"), Checkpoint.open(tmp_path / "saved")
    assert list(lazy.tensors) == list(saved.tensors)
    for name in lazy.tensors:  # (the headers' metadata may name the diffs differently)
        assert np.array_equal(lazy.array(name), saved.array(name)), name


def test_apply_to_model_leaves_the_diff_and_state_dict_copies_alone(inputs_kit):
    """apply_to_model changes the model (its purpose) but not the diff, nor a state dict taken
    from the model before (a detached copy)."""
    root, base_dir, _, model, sparse, with_dense = inputs_kit
    target = build(transformers.BertForTokenClassification, tiny_bert_config(num_labels=3))
    sd = _state_dicts(target)["torch"]
    snap, diff_snap = _snapshot_state(sd), _snapshot_diff(with_dense)
    record = apply_to_model(target, with_dense)
    assert _same_diff(with_dense, diff_snap) and _same_state(sd, snap)
    revert_from_model(target, record)
    assert _same_diff(with_dense, diff_snap)


def test_cli_commands_never_change_their_inputs(inputs_kit, tmp_path, capsys):
    """Every writing command (and inspect/verify-like readers) on safetensors and `.bin` bases:
    the bytes of every input file are the same after."""
    root, base_dir, bin_dir, *_ = inputs_kit
    sparse, dense = root / "sparse.sft", root / "dense.sft"
    before = tree_hashes(base_dir, bin_dir, sparse, dense)
    runs = [
        ["create", base_dir, bin_dir, "-k", "50", "-o", tmp_path / "c.sft", "-q"],
        ["create", bin_dir, base_dir, "-k", "50", "-o", tmp_path / "c2.sft", "-q"],
        ["apply", base_dir, sparse, dense, "-o", tmp_path / "a", "-q"],
        ["apply", bin_dir, sparse, "-o", tmp_path / "b", "-q", "--no-verify"],
        ["add", sparse, dense, "-o", tmp_path / "add.sft", "-q"],
        ["subtract", dense, sparse, "-o", tmp_path / "sub.sft", "-q"],
        ["scale", sparse, "0.5", "-o", tmp_path / "scale.sft", "-q"],
        ["prune", dense, "-k", "10", "-o", tmp_path / "prune.sft", "-q"],
        ["convert", sparse, "--to", "composable-sft", "-o", tmp_path / "comp", "-q"],
        ["filter", dense, "--exclude", "classifier.*", "-o", tmp_path / "filter.sft", "-q"],
        ["merge", sparse, dense, "-m", "ties", "-o", tmp_path / "merge.sft", "-q"],
        ["inspect", dense, "--base", base_dir],
    ]
    for args in runs:
        code, _, err = run_cli(args, capsys)
        assert code == 0, (args[0], err[-1500:])
        assert tree_hashes(base_dir, bin_dir, sparse, dense) == before, f"`sftdiff {args[0]}` changed an input"


# ---------------------------------------------------------------- command line (issue 12)


def test_skip_dense_matches_diffs_by_file_identity(apply_bert, tmp_path, capsys, monkeypatch):
    """`--skip-dense ./task.sft` (or an absolute path, or a symlink) names the DIFF `task.sft`."""
    root, base_dir = apply_bert
    monkeypatch.chdir(root)
    (tmp_path / "link.sft").symlink_to(root / "task.sft")
    for i, spelling in enumerate(["./task.sft", str(root / "task.sft"), str(tmp_path / "link.sft")]):
        code, _, err = run_cli(["apply", base_dir, "lang.sft", "task.sft", "--skip-dense", spelling,
                                "-o", tmp_path / f"m{i}", "-q"], capsys)
        assert code == 0, err
        assert "classifier.weight" not in Checkpoint.open(tmp_path / f"m{i}").tensors
    code, _, err = run_cli(["apply", base_dir, "lang.sft", "--skip-dense", "task.sft", "-o", tmp_path / "x"], capsys)
    assert code == 2 and "is not one of the DIFF arguments" in err and len(err.strip().splitlines()) == 1, err


def test_swapped_arguments_are_named(apply_bert, tmp_path, capsys):
    root, base_dir = apply_bert
    code, _, err = run_cli(["apply", root / "task.sft", base_dir, "-o", tmp_path / "x"], capsys)
    assert code == 2 and "look swapped" in err and f"sftdiff apply {base_dir} {root / 'task.sft'}" in err, err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["apply", root / "task.sft", root / "lang.sft", "-o", tmp_path / "x"], capsys)
    assert code == 2 and "is a diff, not a checkpoint" in err, err
    code, _, err = run_cli(["apply", base_dir, base_dir, "-o", tmp_path / "x"], capsys)
    assert code == 2 and "not a diff" in err and "sftdiff create" in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, expected", [
    (["--shard-size", "10"], "no unit"),
    (["--shard-size", "10B"], "minimum"),
    (["--scale", "1", "--scale", "2", "--scale", "3"], "--scale values"),
])
def test_apply_option_errors_are_one_line_exit_2(apply_bert, tmp_path, capsys, args, expected):
    root, base_dir = apply_bert
    code, out, err = run_cli(["apply", base_dir, root / "lang.sft", root / "task.sft", "-o", tmp_path / "x", *args],
                             capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1 and "Usage:" not in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["apply", "create"])
def test_output_under_a_file_says_it_is_a_file(apply_bert, tmp_path, capsys, command):
    """`-o tok/vocab.txt/x` used to say the folder does not exist although it is a file."""
    root, base_dir = apply_bert
    blocker = tmp_path / "vocab.txt"
    blocker.write_text("[PAD]\n")
    args = {"apply": ["apply", base_dir, root / "lang.sft"],
            "create": ["create", base_dir, base_dir, "-k", "5"]}[command]
    for out in (blocker / "x", blocker / "sub" / "x"):
        code, _, err = run_cli([*args, "-o", out], capsys)
        assert code == 5 and f"{blocker} is a file, not a folder" in err, err
    code, _, err = run_cli([*args, "-o", tmp_path / "nope" / "x"], capsys)
    assert code == 5 and "does not exist" in err, err
    assert blocker.read_text() == "[PAD]\n"


def test_apply_json_summary(apply_bert, tmp_path, capsys):
    root, base_dir = apply_bert
    code, out, err = run_cli(["apply", base_dir, root / "lang.sft", root / "task.sft", "--skip-dense",
                              root / "task.sft", "--scale", "0.5", "-o", tmp_path / "m", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["command"] == "apply" and summary["output"] == str(tmp_path / "m")
    assert summary["diffs"] == [str(root / "lang.sft"), str(root / "task.sft")]
    assert summary["with_dense"] == [True, False] and summary["scales"] == [0.5, 0.5]
    ckpt = Checkpoint.open(tmp_path / "m")
    assert summary["tensors"] == len(ckpt.tensors) and summary["shards"] == 1 and summary["added"] == []
    assert 0 < summary["changed"] <= summary["tensors"] and summary["bytes"] == sum(
        t.numel * 4 for t in ckpt.tensors.values()) and summary["verified"] is True
    assert isinstance(summary["warnings"], list) and "wrote" not in err
