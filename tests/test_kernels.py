"""The compiled scan (sftdiff/_kernels.c through sftdiff/kernels.py) against create's numpy code: the same
candidates bit for bit on every dtype pair, including ties at the floor, zeros of both signs,
subnormals, ±inf and NaN, and byte-identical `.sft` output from `create` with and without it.

The extension is built by `pip install -e .` wherever a C compiler is; CI sets SFTDIFF_REQUIRE_COMPILED=1,
so there a missing build fails these tests instead of skipping them."""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from sftdiff import kernels
from sftdiff.dtypes import STORAGE
from sftdiff.errors import FormatError
from sftdiff.select import TopK
from helpers_checkpoints import edge_values, stored, write_pair

if kernels._compiled is None:
    if os.environ.get("SFTDIFF_REQUIRE_COMPILED") == "1":
        raise RuntimeError("sftdiff._kernels was not built, and SFTDIFF_REQUIRE_COMPILED=1 requires it")
    pytest.skip("sftdiff._kernels is not built (no C compiler at install time)", allow_module_level=True)

create = importlib.import_module("sftdiff.create")  # the module (sftdiff.create is also the function)
DTYPES = ["BF16", "F16", "F32", "F64"]


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    monkeypatch.delenv("SFTDIFF_COMPILED", raising=False)
    assert kernels.available()


def _numpy_scan(b: np.ndarray, bd: str, f: np.ndarray, fd: str, lo: int, hi: int, floor: float,
                monkeypatch: pytest.MonkeyPatch) -> "create.Candidates":
    with monkeypatch.context() as m:
        m.setenv("SFTDIFF_COMPILED", "0")  # as without the extension: create's numpy code
        t = create._Tensor(create.Pair("w", "w"), b, bd, f, fd, TopK(1, floor=floor), 0)
        return create._scan(t, lo, hi)


def _floors(b: np.ndarray, bd: str, f: np.ndarray, fd: str) -> list[float]:
    """0 (every nonzero), a magnitude many positions share (ties at the floor), the values just
    around it, and the median magnitude."""
    mags = np.concatenate([m.copy() for _, m in create.abs_delta_slices(b, bd, f, fd)])
    tie = float(np.float32(0.0078125))
    finite = mags[np.isfinite(mags) & (mags > 0)]
    return [0.0, tie, float(np.nextafter(np.float32(tie), np.float32(1))),
            float(np.nextafter(np.float32(tie), np.float32(0))), float(np.median(finite)), 1e-45]


@pytest.mark.parametrize("bd", DTYPES)
@pytest.mark.parametrize("fd", DTYPES)
def test_kernel_matches_numpy_scan_bit_for_bit(bd, fd, monkeypatch):
    base, ft = edge_values(5003, seed=len(bd) * 7 + len(fd))
    b, f = stored(base, bd), stored(ft, fd)
    for floor in _floors(b, bd, f, fd):
        threshold = create._threshold_bits(floor)
        for lo, hi in [(0, b.size), (1, 4097), (2, 3), (777, 777 + 129)]:  # odd starts: BF16 pairs split
            expect = _numpy_scan(b, bd, f, fd, lo, hi, floor, monkeypatch)
            got = create.Candidates(*kernels.scan(b, bd, f, fd, lo, hi, threshold))
            _assert_same_candidates(got, expect, b, f, (bd, fd, floor, lo, hi))


def _assert_same_candidates(got: "create.Candidates", expect: "create.Candidates", b: np.ndarray, f: np.ndarray,
                            context: tuple) -> None:
    """Same positions, magnitudes bit for bit, and the raw values there, in the inputs' own dtypes."""
    assert got.indices.dtype == np.int64 and got.mags.dtype == np.float32, context
    assert np.array_equal(got.indices, expect.indices), context
    assert np.array_equal(got.mags.view(np.uint32), expect.mags.view(np.uint32)), context
    for raw, got_raw, expect_raw in [(b, got.base, expect.base), (f, got.ft, expect.ft)]:
        assert got_raw.dtype == expect_raw.dtype == raw.dtype, context
        bits = f"u{raw.dtype.itemsize}"
        assert np.array_equal(got_raw.view(bits), raw.view(bits)[got.indices]), context
        assert np.array_equal(expect_raw.view(bits), raw.view(bits)[got.indices]), context


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_lets_nan_and_inf_through_like_numpy(dtype, monkeypatch):
    base = np.array([0.5, 0.25, 1.0, -2.0, np.inf, np.nan, 1.0], np.float32)
    ft = np.array([0.5, np.nan, -np.inf, np.inf, np.inf, 1.0, 1.0], np.float32)
    b, f = stored(base, dtype), stored(ft, dtype)
    threshold = create._threshold_bits(1000.0)  # a floor no finite |Δ| here reaches
    with np.errstate(invalid="ignore"):
        expect = _numpy_scan(b, dtype, f, dtype, 0, b.size, 1000.0, monkeypatch)
    got = create.Candidates(*kernels.scan(b, dtype, f, dtype, 0, b.size, threshold))
    assert list(got.indices) == [1, 2, 3, 4, 5]  # NaN, inf, inf, inf − inf = NaN, NaN
    _assert_same_candidates(got, expect, b, f, (dtype,))


def test_kernel_is_used_and_can_be_turned_off(monkeypatch):
    b = np.arange(10, dtype=np.float32)
    assert kernels.scan(b, "F32", b + 1, "F32", 0, 10, create._threshold_bits(0.0)) is not None
    monkeypatch.setenv("SFTDIFF_COMPILED", "0")
    assert not kernels.available()
    assert kernels.scan(b, "F32", b + 1, "F32", 0, 10, create._threshold_bits(0.0)) is None


def test_kernel_refuses_arguments_that_do_not_fit():
    """The extension checks sizes itself: a caller's mistake is a ValueError, never a read past a buffer."""
    b = np.zeros(10, np.float32)
    out = [np.empty(10, np.int64), np.empty(10, np.uint32), np.empty(10, np.float32), np.empty(10, np.float32)]
    with pytest.raises(ValueError, match="base holds 40 bytes"):
        kernels._compiled.scan(2, b, 2, b, 0, 11, 1, *out)
    with pytest.raises(ValueError, match="out_bits"):
        kernels._compiled.scan(2, b, 2, b, 0, 10, 1, out[0], out[1][:5], out[2], out[3])
    with pytest.raises(ValueError, match="unknown kinds"):
        kernels._compiled.scan(4, b, 2, b, 0, 10, 1, *out)
    with pytest.raises(ValueError, match="bad range"):
        kernels._compiled.scan(2, b, 2, b, 5, 4, 1, *out)
    read_only = np.zeros(10, np.float32)
    read_only.setflags(write=False)
    with pytest.raises(TypeError):
        kernels._compiled.scan(2, b, 2, b, 0, 10, 1, out[0], out[1], read_only, out[3])


def test_create_says_when_the_compiled_scan_is_missing(monkeypatch):
    """Without the extension a big create still works (numpy) and says why it is slow; a small one,
    or one where the user turned the kernel off, says nothing."""
    base, ft = {"w": np.zeros((4, 8), np.float32)}, {"w": np.ones((4, 8), np.float32)}
    monkeypatch.setattr(create, "NOTE_SLOW_SCAN_FROM", 32)
    with pytest.warns(create.CreateWarning, match="compiled scan is not installed.*C compiler"):
        monkeypatch.setattr(kernels, "_compiled", None)
        assert create.create_diff(base, ft, k=3).nnz == 3
    monkeypatch.setattr(create, "NOTE_SLOW_SCAN_FROM", 33)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create.create_diff(base, ft, k=3)  # below the size that is worth a note


def test_strided_and_misaligned_input_falls_back():
    assert kernels._as_kernel_array(np.arange(20, dtype=np.float32)[::2], "F32") is None
    misaligned = np.zeros(41, np.uint8)[1:].view(np.float32)  # 10 floats starting at an odd address
    assert not misaligned.flags.aligned
    assert kernels._as_kernel_array(misaligned, "F32") is None
    assert kernels.scan(misaligned, "F32", misaligned, "F32", 0, 10, create._threshold_bits(0.0)) is None


def test_big_endian_input_falls_back():
    b = np.arange(10, dtype=">f4")
    assert kernels.scan(b, "F32", b, "F32", 0, 10, create._threshold_bits(0.0)) is None


# ---------------------------------------------------------------- whole diffs, byte for byte


def _create_bytes(base: Path, ft: Path, out: Path, **kwargs) -> bytes:
    create.create_diff(base, ft, **kwargs).save(out)
    return out.read_bytes()


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("options", [dict(density=0.01), dict(k=4000), dict(density=0.05, scope="per-tensor"),
                                     dict(density=0.02, dtype="bf16")], ids=["density", "k", "per-tensor", "bf16"])
def test_create_output_byte_identical_with_and_without_kernel(dtype, options, tmp_path, monkeypatch):
    base, ft = write_pair(tmp_path, dtype, seed=3)
    with_kernel = _create_bytes(base, ft, tmp_path / "fast.sft", **options)
    monkeypatch.setenv("SFTDIFF_COMPILED", "0")
    without = _create_bytes(base, ft, tmp_path / "numpy.sft", **options)
    assert with_kernel == without


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_create_refuses_nan_and_inf_the_same_way(poison, tmp_path, monkeypatch):
    base, ft = write_pair(tmp_path, "F32", seed=5, poison=poison)
    with pytest.raises(FormatError) as fast:
        create.create_diff(base, ft, density=0.01)
    monkeypatch.setenv("SFTDIFF_COMPILED", "0")
    with pytest.raises(FormatError) as slow:
        create.create_diff(base, ft, density=0.01)
    assert str(fast.value) == str(slow.value) and "NaN or infinity" in str(fast.value)


def test_storage_dtypes_cover_the_kernel_kinds():
    assert set(kernels._KIND) <= set(STORAGE)
