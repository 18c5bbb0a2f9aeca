"""The hot-swap path of `apply_to_model` / `revert_from_model` (sftdiff/swap.py): the numpy CPU path and
the torch path give the committed torch arithmetic bit for bit, revert is exact, and an entry's arrays
are converted once per diff."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sftdiff import swap  # noqa: E402
from sftdiff.diff import DiffMeta, SparseDiff, SparseEntry  # noqa: E402
from sftdiff.inplace import apply_to_model, revert_from_model  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
VALUE_DTYPES = ["F32", "BF16", "F16"]


def _model(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 20))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
        model[0].weight[0, :4] = torch.tensor([0.0, -0.0, 1e-30, 65000.0])  # zeros, tiny, near f16 max
    return model.to(dtype)


def _diff(model: torch.nn.Module, value_dtype: str, seed: int = 1) -> SparseDiff:
    rng = np.random.default_rng(seed)
    entries = {}
    for name, p in model.state_dict().items():
        n = p.numel()
        idx = np.unique(rng.integers(0, n, n // 3))
        values = rng.standard_normal(len(idx)).astype(np.float32) * np.float32(0.5)
        if name == "0.weight":  # the edge positions, with a delta that overflows float16 at 65000
            idx = np.unique(np.concatenate([idx, [0, 1, 2, 3]]))
            values = rng.standard_normal(len(idx)).astype(np.float32)
            values[:4] = [1.5, -2.0, 1e-30, 600.0]
        entry = SparseEntry.from_float(tuple(p.shape), idx, values, value_dtype)
        if entry is not None:
            entries[name] = entry
    return SparseDiff(entries, DiffMeta())


def _reference_apply(model: torch.nn.Module, diff: SparseDiff, scale: float) -> dict[str, torch.Tensor]:
    """The committed torch formula: round(wide(w) + wide(v) × scale), wide float32 (float64 for F64)."""
    out = {}
    for name, t in model.state_dict().items():
        flat = t.detach().clone().reshape(-1)
        entry = diff.entries.get(name)
        if entry is not None:
            wide = torch.float64 if t.dtype == torch.float64 else torch.float32
            idx = torch.from_numpy(np.asarray(entry.indices, dtype=np.int64))
            delta = torch.from_numpy(np.array(entry.values_f32(), dtype=np.float32)).to(wide)
            if scale != 1.0:
                delta = delta * scale
            flat[idx] = (flat[idx].to(wide) + delta).to(t.dtype)
        out[name] = flat.reshape(t.shape)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.detach().contiguous().view(ints[t.element_size()])


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: _bits(t).clone() for n, t in model.state_dict().items()}


def _same_bits(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(_bits(t), _bits(expected[n]) if expected[n].is_floating_point() else expected[n])
               for n, t in model.state_dict().items())


@pytest.fixture(params=["numpy", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch":  # the path other devices take, exercised on the CPU
        monkeypatch.setattr(swap, "_numpy_path", lambda t: False)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
@pytest.mark.parametrize("scale", [1.0, 0.7, -3.0])
def test_apply_matches_committed_formula_and_revert_is_exact(dtype, value_dtype, scale, path):
    model = _model(dtype)
    before = _snapshot(model)
    diff = _diff(model, value_dtype)
    expected = _reference_apply(model, diff, scale)
    with np.errstate(over="ignore"):
        record = apply_to_model(model, diff, scale=scale)
    assert _same_bits(model, expected)
    revert_from_model(model, record)
    assert _same_bits(model, before)
    with np.errstate(over="ignore"):  # again, from the cache this time
        record = apply_to_model(model, diff, scale=scale)
    assert _same_bits(model, expected)
    revert_from_model(model, record)
    assert _same_bits(model, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_revert_after_training_keeps_changed_values(dtype, path):
    """Values changed since the apply get the delta subtracted; untouched ones their exact original."""
    model = _model(dtype)
    before = _snapshot(model)
    diff = _diff(model, "F32")
    record = apply_to_model(model, diff)
    weight = model[1].weight
    entry = diff.entries["1.weight"]
    changed = int(entry.indices[0])
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.no_grad():
        weight.view(-1)[changed] += 1.0  # a training step on one touched value
        stepped = weight.view(-1)[changed].clone()
    revert_from_model(model, record)
    delta = torch.tensor(float(entry.values_f32()[0]), dtype=torch.float32).to(wide)
    assert torch.equal(weight.view(-1)[changed], (stepped.to(wide) - delta).to(dtype))
    mask = torch.ones(weight.numel(), dtype=torch.bool)
    mask[changed] = False
    assert torch.equal(_bits(weight).view(-1)[mask], before["1.weight"].view(-1)[mask])
    others = {n: t for n, t in before.items() if n != "1.weight"}
    assert all(torch.equal(_bits(t), others[n]) for n, t in model.state_dict().items() if n in others)


def test_plain_diff_revert_subtracts_like_the_committed_formula(path):
    model = _model(torch.bfloat16)
    diff = _diff(model, "F32")
    apply_to_model(model, diff, scale=0.7)
    expected = {}
    for name, t in model.state_dict().items():
        flat = t.detach().clone().reshape(-1)
        entry = diff.entries[name]
        idx = torch.from_numpy(np.asarray(entry.indices, dtype=np.int64))
        delta = torch.from_numpy(np.array(entry.values_f32())) * 0.7
        flat[idx] = (flat[idx].float() - delta).to(t.dtype)
        expected[name] = flat.reshape(t.shape)
    revert_from_model(model, diff, scale=0.7)
    assert _same_bits(model, expected)


def test_indices_and_values_are_converted_once_per_diff(tmp_path, monkeypatch):
    model = _model(torch.bfloat16)
    _diff(model, "F32").save(tmp_path / "d.sft")
    diff = SparseDiff.load(tmp_path / "d.sft")
    conversions = []
    calls = {"n": 0}
    original_prepared = swap._prepared

    def counting(*args, **kwargs):
        before = len(swap._PREPARED[args[0]][1]) if args[0] in swap._PREPARED else 0
        out = original_prepared(*args, **kwargs)
        calls["n"] += 1
        conversions.append(len(swap._PREPARED[args[0]][1]) - before)
        return out

    monkeypatch.setattr(swap, "_prepared", counting)
    for _ in range(3):
        revert_from_model(model, apply_to_model(model, diff))
    assert calls["n"] == 3 * len(diff.entries)
    assert sum(conversions) == len(diff.entries)  # converted on the first apply only
    first = swap._PREPARED[diff][1]
    record = apply_to_model(model, diff)
    for name in diff.entries:  # the record holds the cached arrays themselves, not copies
        idx, delta, original = record.sparse[name]
        assert any(idx is hit[1] and delta is hit[2] for hit in first.values())
        assert original.size == diff.entries[name].nnz
    revert_from_model(model, record)


def test_cache_follows_a_changed_in_memory_entry():
    model = _model(torch.float32)
    before = _snapshot(model)
    diff = _diff(model, "F32")
    revert_from_model(model, apply_to_model(model, diff))
    diff.entries["1.bias"] = SparseEntry.from_float((20,), np.array([3]), np.array([2.0], np.float32))
    apply_to_model(model, diff)
    assert float(model[1].bias.detach()[3]) == float(before["1.bias"].view(torch.float32)[3] + 2.0)
    swap.forget(diff)
    assert diff not in swap._PREPARED


def test_non_contiguous_parameter_goes_through_torch():
    model = _model(torch.bfloat16)
    with torch.no_grad():
        model[0].weight = torch.nn.Parameter(model[0].weight.detach().t().contiguous().t())
    assert not model[0].weight.is_contiguous()
    before = _snapshot(model)
    diff = _diff(model, "F32")
    expected = _reference_apply(model, diff, 1.0)
    record = apply_to_model(model, diff)
    assert _same_bits(model, expected)
    revert_from_model(model, record)
    assert _same_bits(model, before)


def test_numpy_writes_are_seen_by_autograd():
    """A swap between forward and backward must not silently corrupt gradients."""
    model = _model(torch.float32)
    diff = _diff(model, "F32")
    x = torch.randn(2, 40)
    loss = (model(x) ** 2).sum()
    apply_to_model(model, diff)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
