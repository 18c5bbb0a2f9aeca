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
import sys

import numpy as np

MAX_HEADER = 100 * 1024 * 1024
DTYPES = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
    "U64": "<u8", "I64": "<i8", "F16": "<f2", "BF16": "<u2", "F32": "<f4", "F64": "<f8",
}
PREFIXES = ("indices/", "values/", "dense/")


class SftReadError(Exception):
    pass


def _unique_object(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise SftReadError(f"duplicate key {k!r}")
        out[k] = v
    return out


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
        header = json.loads(self.blob[8 : 8 + n].decode("utf-8"), object_pairs_hook=_unique_object)
        self.data = memoryview(self.blob)[8 + n :]
        meta = header.pop("__metadata__", {})
        if meta.get("format") != "sft":
            raise SftReadError("not an sft file")
        major, _minor = (int(x) for x in meta["format_version"].split("."))
        if major != 1:
            raise SftReadError(f"unsupported major version {major}")

        def no_constants(name):
            raise SftReadError(f"{name} in metadata")

        self.sft = json.loads(meta["sft"], parse_constant=no_constants)
        self.tensors = header
        spans = sorted((t["data_offsets"][0], t["data_offsets"][1], name) for name, t in header.items())
        cursor = 0
        for begin, end, name in spans:
            t = header[name]
            if begin != cursor or t["dtype"] not in DTYPES:
                raise SftReadError(f"tensor {name!r}: bad offsets or dtype")
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

    def raw(self, key):
        t = self.tensors[key]
        begin, end = t["data_offsets"]
        return np.frombuffer(self.data[begin:end], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])

    def reconstruct(self, name):
        """The dense float32 delta of a sparse entry, or the value of a dense entry."""
        parts = self.entries[name]
        shape = self.sft["entries"][name]["shape"]
        numel = math.prod(shape)
        if set(parts) == {"dense"}:
            t = self.tensors[parts["dense"]]
            if t["shape"] != shape:
                raise SftReadError(f"{name}: dense shape differs from metadata")
            value = self.raw(parts["dense"])
            return as_float32(value, t["dtype"]) if t["dtype"] in ("BF16", "F16", "F32") else value
        if set(parts) != {"indices", "values"}:
            raise SftReadError(f"{name}: wrong set of tensors")
        ti, tv = self.tensors[parts["indices"]], self.tensors[parts["values"]]
        if ti["dtype"] != ("I32" if numel < 2**31 else "I64"):
            raise SftReadError(f"{name}: wrong index dtype")
        if tv["dtype"] not in ("F32", "BF16", "F16"):
            raise SftReadError(f"{name}: wrong value dtype")
        idx, raw = self.raw(parts["indices"]), self.raw(parts["values"])
        if idx.ndim != 1 or raw.ndim != 1 or len(idx) != len(raw) or len(idx) == 0:
            raise SftReadError(f"{name}: bad index/value lengths")
        if idx.min() < 0 or idx.max() >= numel or np.any(np.diff(idx.astype(np.int64)) <= 0):
            raise SftReadError(f"{name}: indices out of range or not strictly increasing")
        values = as_float32(raw, tv["dtype"])
        if not np.all(np.isfinite(values)) or np.any(values == 0):
            raise SftReadError(f"{name}: non-finite or zero values")
        out = np.zeros(numel, dtype=np.float32)
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
