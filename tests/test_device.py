"""`create --device` (sftdiff/device_scan.py): pass 1's scan with torch on a device returns bit for bit
what create's numpy code returns, on every dtype pair, with ties at the floor, zeros of both signs,
subnormals, ±inf and NaN; whole diffs are byte-identical with and without it. Everything runs on
"cpu" (the same code as on a GPU) and again on "cuda" when a CUDA device is present."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers_models import run_cli  # noqa: E402
from sftdiff import device_scan  # noqa: E402
from sftdiff.errors import FormatError, UsageError  # noqa: E402
from sftdiff.select import TopK  # noqa: E402
from helpers_checkpoints import edge_values, stored, write_pair  # noqa: E402

create = importlib.import_module("sftdiff.create")  # the module (sftdiff.create is also the function)
DTYPES = ["BF16", "F16", "F32", "F64"]
NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False): the same tests run on 'cpu'"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]


def _numpy_scan(b: np.ndarray, bd: str, f: np.ndarray, fd: str, lo: int, hi: int, floor: float,
                monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    """The positions and magnitudes create's numpy code finds (the compiled kernel turned off)."""
    with monkeypatch.context() as m, np.errstate(invalid="ignore", over="ignore"):
        m.setenv("SFTDIFF_COMPILED", "0")
        t = create._Tensor(create.Pair("w", "w"), b, bd, f, fd, TopK(1, floor=floor), 0)
        return create._scan(t, lo, hi)[:2]


def _floors(b: np.ndarray, bd: str, f: np.ndarray, fd: str) -> list[float]:
    """0 (every nonzero), a magnitude many positions share (ties at the floor), its neighbours,
    the median magnitude, the smallest subnormal, and inf (only NaN and inf reach it)."""
    with np.errstate(invalid="ignore", over="ignore"):
        mags = np.concatenate([m.copy() for _, m in create.abs_delta_slices(b, bd, f, fd)])
    tie = np.float32(0.0078125)
    finite = mags[np.isfinite(mags) & (mags > 0)]
    return [0.0, float(tie), float(np.nextafter(tie, np.float32(1))), float(np.nextafter(tie, np.float32(0))),
            float(np.median(finite)), 1e-45, float("inf")]


def _assert_same(got, expect, context) -> None:
    assert got is not None, context
    got_idx, got_mag = got
    assert got_idx.dtype == np.int64 and got_mag.dtype == np.float32, context
    assert np.array_equal(got_idx, expect[0]), context
    assert np.array_equal(got_mag.view(np.uint32), expect[1].view(np.uint32)), context


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bd", DTYPES)
@pytest.mark.parametrize("fd", DTYPES)
def test_device_scan_matches_numpy_bit_for_bit(device, bd, fd, monkeypatch):
    base, ft = edge_values(5003, seed=len(bd) * 7 + len(fd), special=True)
    b, f = stored(base, bd), stored(ft, fd)
    monkeypatch.setattr(device_scan, "CPU_CHUNK", 1000)  # several chunks per range, odd chunk starts
    monkeypatch.setattr(device_scan, "CUDA_CHUNK", 1000)
    for floor in _floors(b, bd, f, fd):
        threshold = create._threshold_bits(floor)
        for lo, hi in [(0, b.size), (1, 4097), (2, 3), (777, 777 + 129)]:  # odd starts split BF16 pairs
            expect = _numpy_scan(b, bd, f, fd, lo, hi, floor, monkeypatch)
            got = device_scan.scan(b, bd, f, fd, lo, hi, threshold, device)
            _assert_same(got, expect, (bd, fd, floor, lo, hi))
        assert expect[0].size > 0  # the last range, at the largest floor, still has NaN/inf candidates


@pytest.mark.parametrize("device", DEVICES)
def test_nan_payloads_and_zero_signs_are_numpys(device, monkeypatch):
    """NaNs with payloads and signs, signalling ones included; +0 − (−0) passes no threshold."""
    words = np.array([0x7FC01234, 0xFFA00001, 0x7F800001, 0x00000000, 0x80000000, 0x3F800000], np.uint32)
    b = np.array([0x3F800000, 0x7FC00001, 0x7F800000, 0x80000000, 0x00000000, 0x7FC0ABCD], np.uint32)
    b, f = b.view(np.float32), words.view(np.float32)
    for floor in [0.0, 1.0, float("inf")]:
        expect = _numpy_scan(b, "F32", f, "F32", 0, b.size, floor, monkeypatch)
        _assert_same(device_scan.scan(b, "F32", f, "F32", 0, b.size, create._threshold_bits(floor), device),
                     expect, floor)
    assert 3 not in expect[0] and 4 not in expect[0]  # zeros never pass, whatever their signs


def test_canonical_nans_from_a_device_are_replaced_by_numpys():
    """A GPU returns one canonical NaN for every NaN result; the magnitudes handed back must be numpy's."""
    b = np.array([np.inf, 1.0, 0.5], np.float32)
    f = np.array([np.inf, np.nan, 0.25], np.float32)
    f.view(np.uint32)[1] = 0xFFC0BEEF
    idx = np.array([0, 1, 2], np.int64)
    mags = np.array([np.nan, np.nan, 0.25], np.float32)
    mags.view(np.uint32)[:2] = 0x7FFFFFFF  # what CUDA gives
    with np.errstate(invalid="ignore"):
        expect = np.concatenate([m.copy() for _, m in create.abs_delta_slices(b, "F32", f, "F32")])
    got = device_scan._numpy_nans(idx, mags, b, "F32", f, "F32")
    assert np.array_equal(got.view(np.uint32), expect.view(np.uint32))
    assert got.view(np.uint32)[1] == 0x7FC0BEEF  # the fine-tune's payload, sign cleared, as numpy keeps it


def test_inputs_it_does_not_take_fall_back_to_numpy():
    b = np.arange(10, dtype=">f4")
    threshold = create._threshold_bits(0.0)
    assert device_scan.scan(b, "F32", b, "F32", 0, 10, threshold, "cpu") is None  # big-endian
    i = np.arange(10, dtype=np.int32)
    assert device_scan.scan(i, "I32", i, "I32", 0, 10, threshold, "cpu") is None
    assert device_scan.scan(b.astype("<f4"), "F16", b.astype("<f4"), "F16", 0, 10, threshold, "cpu") is None


def test_resolve():
    assert device_scan.resolve("cpu") == torch.device("cpu")
    assert device_scan.resolve(" CPU ") == torch.device("cpu")
    assert device_scan.resolve("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="unknown device 'tpu'; use cpu, cuda, cuda:N or auto"):
        device_scan.resolve("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_resolve_cuda():
    assert device_scan.resolve("cuda:0") == torch.device("cuda", 0)
    assert device_scan.resolve("cuda").type == "cuda"
    with pytest.raises(UsageError, match="there are only"):
        device_scan.resolve(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: nothing to refuse")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_resolve_refuses_cuda_when_there_is_none(spec):
    with pytest.raises(UsageError) as e:
        device_scan.resolve(spec)
    message = str(e.value)
    assert "\n" not in message and "sees no CUDA device" in message and "--device cpu" in message
    assert e.value.exit_code == 2


def test_resolve_without_torch_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(UsageError, match="needs torch, which is not installed"):
        device_scan.resolve("cpu")


def test_out_of_device_memory_is_a_one_line_usage_error(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(device_scan, "_scan_chunk", oom)
    b = np.ones(10, np.float32)
    with pytest.raises(UsageError, match="out of memory in create's scan; .* leave --device out") as e:
        device_scan.scan(b, "F32", b, "F32", 0, 10, create._threshold_bits(0.0), "cpu")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- whole diffs, byte for byte


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("options", [dict(density=0.01), dict(k=4000), dict(density=0.05, scope="per-tensor"),
                                     dict(density=0.02, dtype="bf16")], ids=["density", "k", "per-tensor", "bf16"])
def test_create_output_byte_identical_with_and_without_device(device, dtype, options, tmp_path, monkeypatch):
    base, ft = write_pair(tmp_path, dtype, seed=3)
    monkeypatch.setattr(device_scan, "CPU_CHUNK", 4096)  # many chunks per task on these small tensors
    create.create_diff(base, ft, device=device, **options).save(tmp_path / "device.sft")
    monkeypatch.setenv("SFTDIFF_COMPILED", "0")  # the reference: numpy
    create.create_diff(base, ft, **options).save(tmp_path / "numpy.sft")
    assert (tmp_path / "device.sft").read_bytes() == (tmp_path / "numpy.sft").read_bytes()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_create_refuses_nan_and_inf_the_same_way(device, poison, tmp_path):
    base, ft = write_pair(tmp_path, "F32", seed=5, poison=poison)
    with pytest.raises(FormatError) as on_device:
        create.create_diff(base, ft, density=0.01, device=device)
    with pytest.raises(FormatError) as default:
        create.create_diff(base, ft, density=0.01)
    assert str(on_device.value) == str(default.value) and "NaN or infinity" in str(on_device.value)


@pytest.mark.parametrize("device", DEVICES)
def test_cli_create_device_output_byte_identical(device, tmp_path, capsys):
    base, ft = write_pair(tmp_path, "BF16", seed=7)
    code, out, err = run_cli(["create", base, ft, "-o", tmp_path / "default.sft", "--density", "0.02", "--quiet"],
                             capsys)
    assert code == 0, err
    code, out, err = run_cli(["create", base, ft, "-o", tmp_path / "device.sft", "--density", "0.02",
                              "--device", device, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["command"] == "create"
    assert (tmp_path / "device.sft").read_bytes() == (tmp_path / "default.sft").read_bytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: nothing to refuse")
def test_cli_create_device_cuda_without_cuda_exits_2(tmp_path, capsys):
    base, ft = write_pair(tmp_path, "F32", seed=9)
    code, out, err = run_cli(["create", base, ft, "-o", tmp_path / "x.sft", "--density", "0.02",
                              "--device", "cuda"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sftdiff: error: ") and "sees no CUDA device" in lines[0], err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "x.sft").exists() and not list(tmp_path.glob(".x.sft*"))


def test_cli_create_unknown_device_exits_2(tmp_path, capsys):
    base, ft = write_pair(tmp_path, "F32", seed=9)
    code, _, err = run_cli(["create", base, ft, "-o", tmp_path / "x.sft", "--density", "0.02",
                            "--device", "gpu"], capsys)
    assert code == 2 and "unknown device 'gpu'" in err and len(err.strip().splitlines()) == 1


def test_create_imports_torch_only_for_a_device(tmp_path):
    base, ft = write_pair(tmp_path, "F32", seed=11)
    script = ("import sys, sftdiff; sftdiff.create_diff(sys.argv[1], sys.argv[2], density=0.02, "
              "device=sys.argv[3] or None); print('torch' in sys.modules)")
    for device, imported in [("", "False"), ("cpu", "True")]:
        run = subprocess.run([sys.executable, "-c", script, str(base), str(ft), device],
                             capture_output=True, text=True, check=True)
        assert run.stdout.strip() == imported, run.stderr
