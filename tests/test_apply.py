"""`sftdiff apply` / `bake`, `apply_to_model` / `revert_from_model`, on tiny BERT and Llama models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_models import (build, head_arrays, random_diff, rounded, save, state_numpy, tiny_bert_config,
                            tiny_llama_config, tree_hashes)
import torch
import transformers

from sftdiff.bake import OutputTensor, bake, parse_size, plan_shards
from sftdiff.inplace import AppliedDiff, apply_to_model, revert_from_model
from sftdiff.checkpoint import Checkpoint
from sftdiff.cli import main
from sftdiff.diff import SparseDiff
from sftdiff.errors import UsageError, VerificationError
from sftdiff.safetensors_io import SafetensorsFile

REPO = Path(__file__).resolve().parents[1]
LABELS = {"id2label": {"0": "O", "1": "B", "2": "I"}, "label2id": {"O": 0, "B": 1, "I": 2}}
TASK_PATCH = {"architectures": ["BertForTokenClassification"], "num_labels": 3, **LABELS}


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


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
    assert files == ["config.json", "model.safetensors", "vocab.txt"]
    st = SafetensorsFile(out / "model.safetensors")
    assert st.metadata == {"format": "pt"}
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
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
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
        "import sys, time, sftdiff.bake as b\n"
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
    assert parse_size("500MB") == 5 * 10**8 and parse_size("1000") == 1000
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
    import sftdiff.bake as bake_module
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
    import sftdiff.bake as bake_module

    root, base_dir = apply_llama
    diffs = [root / "a.sft", root / "b.sft"]
    bake(base_dir, diffs, tmp_path / "default", scales=[2.0, -1.0], shard_size="30KB")
    write_all = bake_module._write_all

    def slow_write_all(fd, array):
        if _in_writer_thread():
            time.sleep(0.0002)
        return write_all(fd, array)

    monkeypatch.setattr(bake_module, "CHUNK_ELEMENTS", 97)
    monkeypatch.setattr(bake_module, "_write_all", slow_write_all)
    bake(base_dir, diffs, tmp_path / "lagging", scales=[2.0, -1.0], shard_size="30KB")
    shards = sorted(p.name for p in (tmp_path / "default").glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "lagging").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "lagging" / name).read_bytes() == (tmp_path / "default" / name).read_bytes(), name


def test_write_error_in_writer_thread_fails_bake_nothing_left(apply_llama, tmp_path, monkeypatch):
    """A write that fails in the background thread (disk full) fails the bake like a write in the
    main thread: OutputError naming the cause, no OUT, no temporary, no thread left behind."""
    import errno
    import threading

    import sftdiff.bake as bake_module
    from sftdiff.errors import OutputError

    root, base_dir = apply_llama
    write_all = bake_module._write_all
    calls = []

    def failing_write_all(fd, array):
        if _in_writer_thread():
            calls.append(1)
            if len(calls) == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
        return write_all(fd, array)

    monkeypatch.setattr(bake_module, "CHUNK_ELEMENTS", 97)
    monkeypatch.setattr(bake_module, "_write_all", failing_write_all)
    out = tmp_path / "m"
    with pytest.raises(OutputError, match="no space left"):
        bake(base_dir, [root / "a.sft", root / "b.sft"], out, shard_size="30KB")
    assert len(calls) == 5  # later writes were skipped
    assert not out.exists() and not leftovers(tmp_path, "m")
    assert not any(t.name == "sftdiff-write" for t in threading.enumerate())
