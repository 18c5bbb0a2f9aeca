"""The compiled pass-1 kernel (sftdiff/kernels.py, numba) against create's numpy code: the same candidates
bit for bit on every dtype pair, including ties at the floor, zeros of both signs, subnormals, ±inf and
NaN, and byte-identical `.sft` output from `create` with and without it.

Needs numba (the `fast` extra); without it `create` runs the numpy code these tests compare against."""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

from sftdiff import kernels  # noqa: E402
from sftdiff.dtypes import STORAGE  # noqa: E402
from sftdiff.errors import FormatError  # noqa: E402
from sftdiff.select import TopK  # noqa: E402
from helpers_checkpoints import edge_values, stored, write_pair  # noqa: E402

create = importlib.import_module("sftdiff.create")  # the module (sftdiff.create is also the function)
DTYPES = ["BF16", "F16", "F32", "F64"]


@pytest.fixture(autouse=True)
def _kernel_loaded():
    assert kernels.available(), "numba is installed, so the kernel must load"


def _numpy_scan(b: np.ndarray, bd: str, f: np.ndarray, fd: str, lo: int, hi: int, floor: float,
                monkeypatch: pytest.MonkeyPatch) -> "create.Candidates":
    with monkeypatch.context() as m:
        m.setattr(kernels, "_kernel", False)  # as without numba: create's numpy code
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
    monkeypatch.setattr(kernels, "_kernel", None)
    monkeypatch.setenv("SFTDIFF_NUMBA", "0")
    assert not kernels.available() and kernels._kernel is False  # decided once
    assert kernels.scan(b, "F32", b + 1, "F32", 0, 10, create._threshold_bits(0.0)) is None


def test_kernel_loads_only_for_big_scans(monkeypatch):
    """A small pass 1 never imports numba; a big one loads the kernel in the background while numpy works."""
    monkeypatch.setattr(kernels, "_kernel", None)
    monkeypatch.setattr(kernels, "MIN_VALUES", 25)
    b = np.arange(10, dtype=np.float32)
    threshold = create._threshold_bits(0.0)
    kernels.preload(24)
    assert kernels._kernel is None and kernels.scan(b, "F32", b + 1, "F32", 0, 10, threshold) is None
    loaded = threading.Event()
    original = kernels._compile
    monkeypatch.setattr(kernels, "_compile", lambda: (loaded.wait(10), original())[1])
    kernels.preload(25)
    assert kernels.scan(b, "F32", b + 1, "F32", 0, 10, threshold) is None  # still loading: numpy's turn
    loaded.set()
    assert kernels.available()  # waits for the loading thread
    got = kernels.scan(b, "F32", b + 1, "F32", 0, 10, threshold)
    assert got is not None and list(got[0]) == list(range(10))


def test_create_preloads_the_kernel_only_for_big_models(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "preload", calls.append)
    base = {"w": np.zeros((4, 8), np.float32)}
    ft = {"w": np.ones((4, 8), np.float32)}
    create.create_diff(base, ft, k=3)
    assert calls == [32]  # preload decides from the number of values pass 1 scans


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
    monkeypatch.setattr(kernels, "_kernel", False)
    without = _create_bytes(base, ft, tmp_path / "numpy.sft", **options)
    assert with_kernel == without


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_create_refuses_nan_and_inf_the_same_way(poison, tmp_path, monkeypatch):
    base, ft = write_pair(tmp_path, "F32", seed=5, poison=poison)
    with pytest.raises(FormatError) as fast:
        create.create_diff(base, ft, density=0.01)
    monkeypatch.setattr(kernels, "_kernel", False)
    with pytest.raises(FormatError) as slow:
        create.create_diff(base, ft, density=0.01)
    assert str(fast.value) == str(slow.value) and "NaN or infinity" in str(fast.value)


def test_storage_dtypes_cover_the_kernel_kinds():
    assert set(kernels._KIND) <= set(STORAGE)
