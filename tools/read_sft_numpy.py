#!/usr/bin/env python3
"""An independent `.sft` reader, written from spec/format.md alone (numpy + standard library).

It does not import sftdiff or torch, and does not use the safetensors package (whose numpy backend
cannot read BF16). It checks the rules of spec section 6 and reconstructs the dense float32 delta
of a sparse entry, or the value of a dense entry.

    python tools/read_sft_numpy.py FILE                # list entries
    python tools/read_sft_numpy.py FILE NAME -o x.npy  # reconstruct NAME
"""

import argparse
import json
import math
import re
import sys

import numpy as np

MAX_HEADER = 100 * 1024 * 1024
DTYPES = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
    "U64": "<u8", "I64": "<i8", "F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8",
}
FLOATS = ("F16", "BF16", "F32", "F64")
PREFIXES = ("indices/", "values/", "dense/")
VERSION = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")  # section 4: ASCII digits only


class SftReadError(Exception):
    pass


def _unique_object(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise SftReadError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name):
    raise SftReadError(f"{name} in metadata")


def _finite(text):
    value = float(text)
    if math.isinf(value):
        raise SftReadError(f"number {text[:20]} overflows a double")
    return value


def _strict_json(text, what):
    """JSON as sections 1 and 4 allow it: no duplicate keys, no NaN/Infinity, no lone surrogates."""
    try:
        obj = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_no_constants, parse_float=_finite)
        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # a lone surrogate cannot be encoded
    except UnicodeEncodeError:
        raise SftReadError(f"{what} holds a lone surrogate escape") from None
    except (ValueError, RecursionError) as e:
        raise SftReadError(f"{what} is not valid JSON ({e})") from None
    return obj


def _is_int(x):
    return type(x) is int  # JSON true/false are not integers


def _shape_ok(shape):
    return isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)


def _check_sft(sft):
    """The `sft` object's fields (section 4 table): types and ranges."""
    if not isinstance(sft, dict) or "entries" not in sft:
        raise SftReadError("sft metadata is not an object with 'entries'")
    for key in ("entries", "base", "origin", "user", "config_patch", "provenance"):
        if key in sft and not isinstance(sft[key], dict):
            raise SftReadError(f"sft.{key} must be an object")
    for name, info in sft["entries"].items():
        if not isinstance(info, dict) or not _shape_ok(info.get("shape")):
            raise SftReadError(f"entries[{name!r}] needs a shape of non-negative integers")
        base_dtype = info.get("base_dtype")
        if base_dtype is not None and not (isinstance(base_dtype, str) and base_dtype in DTYPES):
            raise SftReadError(f"entries[{name!r}].base_dtype is not a dtype")
    base = sft.get("base", {})
    for key in ("hint", "fingerprint"):
        if base.get(key) is not None and not isinstance(base[key], str):
            raise SftReadError(f"base.{key} must be a string or null")
    tensors = base.get("tensors", {})
    if not isinstance(tensors, dict) or not all(isinstance(v, str) for v in tensors.values()):
        raise SftReadError("base.tensors must map names to strings")
    if "numel" in base and not (_is_int(base["numel"]) and base["numel"] >= 0):
        raise SftReadError("base.numel must be an integer >= 0")
    if not all(isinstance(v, str) for v in sft.get("user", {}).values()):
        raise SftReadError("user fields must be strings")


def as_float32(raw, dtype):
    if dtype == "BF16":  # the upper 16 bits of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


class SftFile:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.blob = f.read()
        if len(self.blob) < 8:
            raise SftReadError("shorter than 8 bytes")
        n = int.from_bytes(self.blob[:8], "little")
        if n > MAX_HEADER or n > len(self.blob) - 8:
            raise SftReadError(f"bad header length {n}")
        raw = self.blob[8 : 8 + n]
        text = raw.rstrip(b" ")  # section 1: only spaces (0x20) may follow the JSON object
        if raw[:1] != b"{" or text[-1:] != b"}":
            raise SftReadError("header is not a JSON object padded with spaces only")
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SftReadError("header is not UTF-8") from None
        header = _strict_json(decoded, "header")
        self.data = memoryview(self.blob)[8 + n :]
        meta = header.pop("__metadata__", None)
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise SftReadError("__metadata__ must map strings to strings")
        if meta.get("format") != "sft":
            raise SftReadError("not an sft file")
        version = VERSION.fullmatch(meta.get("format_version", ""))
        if version is None:
            raise SftReadError(f"format_version {meta.get('format_version')!r} is not MAJOR.MINOR")
        if version.group(1) != "1":
            raise SftReadError(f"unsupported major version {version.group(1)}")
        self.sft = _strict_json(meta.get("sft", ""), "sft metadata")
        _check_sft(self.sft)
        self.tensors = header
        for name, t in header.items():
            if not isinstance(t, dict) or sorted(t) != ["data_offsets", "dtype", "shape"]:
                raise SftReadError(f"tensor {name!r}: needs exactly dtype, shape and data_offsets")
            offsets = t["data_offsets"]
            if not isinstance(t["dtype"], str) or t["dtype"] not in DTYPES or not _shape_ok(t["shape"]):
                raise SftReadError(f"tensor {name!r}: bad dtype or shape")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                raise SftReadError(f"tensor {name!r}: bad data_offsets")
        spans = sorted((t["data_offsets"][0], t["data_offsets"][1], name) for name, t in header.items())
        cursor = 0
        for begin, end, name in spans:
            t = header[name]
            if begin != cursor:
                raise SftReadError(f"tensor {name!r}: bad offsets")
            if end - begin != np.dtype(DTYPES[t["dtype"]]).itemsize * math.prod(t["shape"]):
                raise SftReadError(f"tensor {name!r}: size does not match shape")
            cursor = end
        if cursor != len(self.data):
            raise SftReadError("data buffer not covered exactly")
        self.entries = {}
        for key in header:
            prefix = next((p for p in PREFIXES if key.startswith(p) and len(key) > len(p)), None)
            if prefix is None:
                raise SftReadError(f"tensor {key!r} has no entry prefix")
            self.entries.setdefault(key[len(prefix) :], {})[prefix[:-1]] = key
        if set(self.entries) != set(self.sft["entries"]):
            raise SftReadError("entries in metadata and tensors differ")
        for name in self.entries:  # rules 4-6 need only the header: check them all now
            self._check_header(name)

    def raw(self, key):
        t = self.tensors[key]
        begin, end = t["data_offsets"]
        return np.frombuffer(self.data[begin:end], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])

    def _check_header(self, name):
        parts = self.entries[name]
        shape = self.sft["entries"][name]["shape"]
        numel = math.prod(shape)
        if set(parts) == {"dense"}:
            if self.tensors[parts["dense"]]["shape"] != shape:
                raise SftReadError(f"{name}: dense shape differs from metadata")
            return
        if set(parts) != {"indices", "values"}:
            raise SftReadError(f"{name}: wrong set of tensors")
        ti, tv = self.tensors[parts["indices"]], self.tensors[parts["values"]]
        if ti["dtype"] != ("I32" if numel < 2**31 else "I64"):
            raise SftReadError(f"{name}: wrong index dtype")
        if tv["dtype"] not in ("F32", "BF16", "F16"):
            raise SftReadError(f"{name}: wrong value dtype")
        if len(ti["shape"]) != 1 or len(tv["shape"]) != 1 or ti["shape"] != tv["shape"]:
            raise SftReadError(f"{name}: bad index/value lengths")
        if not 0 < ti["shape"][0] <= numel:
            raise SftReadError(f"{name}: no values, or more than the parameter has")

    def check(self, name):
        """Rules 7 and 8 (the entry's data) without building the dense delta; returns
        (indices, float32 values) of a sparse entry, or the raw value of a dense one."""
        parts = self.entries[name]
        numel = math.prod(self.sft["entries"][name]["shape"])
        if set(parts) == {"dense"}:
            t = self.tensors[parts["dense"]]
            value = self.raw(parts["dense"])
            if t["dtype"] in FLOATS:
                wide = value if t["dtype"] == "F64" else as_float32(value, t["dtype"])
                if not np.all(np.isfinite(wide)):
                    raise SftReadError(f"{name}: non-finite dense values")
            return value
        tv = self.tensors[parts["values"]]
        idx, raw = self.raw(parts["indices"]), self.raw(parts["values"])
        if idx.min() < 0 or idx.max() >= numel or np.any(np.diff(idx.astype(np.int64)) <= 0):
            raise SftReadError(f"{name}: indices out of range or not strictly increasing")
        values = as_float32(raw, tv["dtype"])
        if not np.all(np.isfinite(values)) or np.any(values == 0):
            raise SftReadError(f"{name}: non-finite or zero values")
        return idx, values

    def reconstruct(self, name):
        """The dense float32 delta of a sparse entry, or the value of a dense entry."""
        checked = self.check(name)
        shape = self.sft["entries"][name]["shape"]
        if set(self.entries[name]) == {"dense"}:
            dtype = self.tensors[self.entries[name]["dense"]]["dtype"]
            return as_float32(checked, dtype) if dtype in ("BF16", "F16", "F32") else checked
        idx, values = checked
        out = np.zeros(math.prod(shape), dtype=np.float32)
        out[idx] = values
        return out.reshape(shape)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("name", nargs="?")
    ap.add_argument("-o", "--out", help="save the reconstructed tensor as .npy")
    args = ap.parse_args(argv)
    try:
        sft = SftFile(args.file)
        if args.name is None:
            for name in sorted(sft.entries):
                kind = "dense" if "dense" in sft.entries[name] else "sparse"
                print(f"{kind:6} {sft.sft['entries'][name]['shape']} {name}")
            return 0
        array = sft.reconstruct(args.name)
    except (SftReadError, KeyError, ValueError, TypeError) as e:
        print(f"read_sft_numpy: {args.file}: {e}", file=sys.stderr)
        return 1
    if args.out:
        np.save(args.out, array)
    else:
        print(array)
    return 0


if __name__ == "__main__":
    sys.exit(main())
