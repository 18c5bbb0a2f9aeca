"""Read-only access to model checkpoints, one tensor at a time: the only reader of a base's bytes.

A `Checkpoint` lists every tensor (name, dtype, shape) from headers alone and hands out raw numpy
arrays on request: memory-mapped for safetensors, `torch.load(weights_only=True, mmap=True)` for
`.bin` files (torch is imported only then), views of the caller's tensors for in-memory state
dicts. BF16 tensors come back as their uint16 bit patterns, as everywhere in sftdiff.

Every array handed out is read-only (a file mapped read-only, or a read-only view of the caller's
memory), so no code path can write into an input: code that changes values works on buffers it
allocated itself (`read_into` fills one).

For tensors stored in safetensors files it also gives the byte-level access that `create` and
`bake` need beside the memory map: `read` (pread of a flat range: on a cold page cache a fault on
the map reads a whole read-around window, often megabytes, and waits for it), `read_into` (the same
into a caller's reused buffer, so the pages do not count towards the process's resident memory as
mapped ones would), `read_ahead` (posix_fadvise WILLNEED) and `copy_to` (`copy_file_range` of a
tensor's bytes to an output file). Other checkpoints fall back to their arrays.
"""

from __future__ import annotations

import json
import math
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from .dtypes import STORAGE
from .errors import FormatError
from .safetensors_io import SafetensorsFile

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    file: str | None  # the file holding it (None for in-memory state dicts)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Checkpoint:
    """Tensors of a checkpoint, by name, without loading them all."""

    def __init__(self, tensors: dict[str, TensorMeta], loader: Callable[[str], np.ndarray],
                 path: str | None = None, weight_files: Iterable[str] = (), config: dict | None = None,
                 aliases: Mapping[str, str] | None = None, releaser: Callable[[str], None] | None = None,
                 spans: Mapping[str, tuple[str, int, int]] | None = None):
        self.tensors = tensors
        self._loader = loader
        self.path = path
        self.weight_files = list(weight_files)  # paths of the files that hold weights
        self.config = config
        self.aliases = dict(aliases or {})  # name -> name it shares storage with (tied weights)
        self._releaser = releaser
        self._spans = dict(spans or {})  # name -> (file, first byte, end byte) in a safetensors file
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        # Descriptors opened for byte-range reads close with the checkpoint (or on `close`).
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def array(self, name: str) -> np.ndarray:
        """Raw values of a tensor, shaped (BF16 as uint16), read-only."""
        arr = self._loader(name)
        if arr.flags.writeable:  # a view, so the caller's own array keeps its flags
            arr = arr.view()
            arr.setflags(write=False)
        return arr

    # -- byte-level access (safetensors files; other checkpoints fall back to `array`)

    def in_file(self, name: str) -> bool:
        """Whether the tensor's bytes lie in a safetensors file (so `copy_to` can copy them)."""
        return name in self._spans

    def read(self, name: str, offset: int, count: int) -> np.ndarray:
        """`count` flat values of a tensor from value `offset`, raw (BF16 as uint16), read-only;
        read with pread (only these bytes) when the tensor is in a file."""
        fd = self._fd(name)
        if fd is None:
            return self.array(name).reshape(-1)[offset:offset + count]
        dtype = STORAGE[self.tensors[name].dtype]
        start = self._spans[name][1] + offset * dtype.itemsize
        data = os.pread(fd, count * dtype.itemsize, start)
        if len(data) != count * dtype.itemsize:
            raise FormatError(f"{self.tensors[name].file}: {name}: short read (file changed?)")
        return np.frombuffer(data, dtype=dtype)

    def read_into(self, name: str, offset: int, out: np.ndarray) -> np.ndarray:
        """Fill the caller's buffer `out` (of the tensor's storage dtype) with flat values from
        `offset` and return it: the way to get values one may change."""
        count = out.size
        fd = self._fd(name)
        if fd is None:
            np.copyto(out, self.array(name).reshape(-1)[offset:offset + count])
            return out
        view = memoryview(out.reshape(-1)).cast("B")
        start = self._spans[name][1] + offset * out.itemsize
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], start + got)
            if n == 0:
                raise FormatError(f"{self.tensors[name].file}: {name}: unexpected end of file (file changed?)")
            got += n
        return out

    def read_ahead(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes into the page cache (no wait)."""
        fd = self._fd(name)
        if fd is not None and hasattr(os, "posix_fadvise"):
            _, start, end = self._spans[name]
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)

    def copy_to(self, name: str, dst: int) -> int:
        """Append the tensor's stored bytes to the file `dst` at its offset (the kernel copies
        where it can) and return their number; the tensor must be `in_file`."""
        fd = self._fd(name)
        if fd is None:
            raise ValueError(f"{name!r} is not stored in a safetensors file")
        _, start, end = self._spans[name]
        done = 0
        while done < end - start:
            n = _copy_range(fd, dst, start + done, end - start - done)
            if n == 0:
                raise FormatError(f"{self.tensors[name].file}: {name}: unexpected end of file (file changed?)")
            done += n
        return done

    def close(self) -> None:
        """Close the descriptors byte-range reads opened (arrays already handed out stay valid)."""
        with self._fd_lock:
            _close_fds(self._fds)

    def _fd(self, name: str) -> int | None:
        where = self._spans.get(name)
        if where is None or not hasattr(os, "pread"):
            return None
        with self._fd_lock:
            fd = self._fds.get(where[0])
            if fd is None:
                fd = self._fds[where[0]] = os.open(where[0], os.O_RDONLY)
            return fd

    def release(self, name: str) -> None:
        """Let go of the memory a tensor's earlier `array` calls mapped (a no-op where nothing is
        mapped); arrays already handed out stay valid."""
        if self._releaser is not None:
            self._releaser(name)

    @property
    def hint(self) -> str | None:
        return self.path

    def tied_copies(self, keep: Callable[[str], bool] | None = None) -> set[str]:
        """Names sharing storage with another name that is kept instead (each tied group once).

        The kept member is the first name in code point order (as fingerprints count them), or
        the first for which `keep(name)` is true when a predicate is given."""
        groups: dict[str, set[str]] = {}
        for name, target in self.aliases.items():
            while target in self.aliases:
                target = self.aliases[target]
            groups.setdefault(target, {target}).add(name)
        copies: set[str] = set()
        for group in groups.values():
            ordered = sorted(group)
            preferred = [n for n in ordered if keep is None or keep(n)]
            kept = preferred[0] if preferred else ordered[0]
            copies.update(n for n in group if n != kept)
        return copies

    def float_names(self) -> list[str]:
        """Floating-point tensors, tied weights once: what fingerprints and densities count."""
        from .dtypes import FLOAT_DTYPES

        copies = self.tied_copies()
        return [n for n, t in self.tensors.items() if t.dtype in FLOAT_DTYPES and n not in copies]

    def float_numel(self) -> int:
        return sum(self.tensors[n].numel for n in self.float_names())

    # -- constructors

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """A Hugging Face checkpoint folder (single or sharded safetensors or .bin), or one file."""
        p = Path(path)
        if not p.exists():
            from . import hub

            if not hub.looks_like_repo_id(str(path)):
                raise FormatError(f"{p}: no such file or folder")
            p = hub.resolve(str(path))
        if p.is_file():
            if p.suffix == ".safetensors":
                return _from_safetensors([p], str(p), None)
            if p.suffix in (".bin", ".pt", ".pth"):
                return _from_bin([p], str(p), None)
            raise FormatError(f"{p}: not a checkpoint (expected .safetensors or .bin, or a model folder)")
        config = _read_json(p / "config.json") if (p / "config.json").is_file() else None
        if (p / SAFETENSORS_INDEX).is_file():
            return _from_safetensors(_shards(p, SAFETENSORS_INDEX), str(p), config)
        if (p / SAFETENSORS_SINGLE).is_file():
            return _from_safetensors([p / SAFETENSORS_SINGLE], str(p), config)
        if (p / BIN_INDEX).is_file():
            return _from_bin(_shards(p, BIN_INDEX), str(p), config)
        if (p / BIN_SINGLE).is_file():
            return _from_bin([p / BIN_SINGLE], str(p), config)
        raise FormatError(
            f"{p}: no model weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
            f"{BIN_SINGLE} or {BIN_INDEX})"
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], name: str | None = None) -> "Checkpoint":
        """Wrap an in-memory state dict of torch tensors or numpy arrays (tied entries detected)."""
        arrays: dict[str, np.ndarray] = {}
        tensors: dict[str, TensorMeta] = {}
        for key, value in state_dict.items():
            if hasattr(value, "untyped_storage"):
                dtype, arr = torch_to_numpy(value)
            else:
                arr = np.asarray(value)
                dtype = numpy_dtype_name(arr.dtype)
            arrays[key] = arr  # `array` hands out read-only views: the caller's tensors are never written
            tensors[key] = TensorMeta(key, dtype, tuple(arr.shape), None)
        return cls(tensors, arrays.__getitem__, name, (), None, tied_aliases(state_dict))


def _close_fds(fds: dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


_KERNEL_COPY = hasattr(os, "copy_file_range")


def _copy_range(src: int, dst: int, offset: int, count: int) -> int:
    """Append up to `count` bytes of `src` from `offset` to `dst`; the kernel copies when it can."""
    global _KERNEL_COPY
    if _KERNEL_COPY:
        try:
            return os.copy_file_range(src, dst, min(count, 1 << 30), offset)
        except OSError:  # older kernels, some filesystems: fall back to reading and writing
            _KERNEL_COPY = False
    data = os.pread(src, min(count, 64 << 20), offset)
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.write(dst, view[done:done + (1 << 20)])
    return done


def tied_aliases(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """name -> earlier name for torch tensors that are the same memory (tied weights)."""
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, t in state_dict.items():
        if not hasattr(t, "untyped_storage"):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
    return aliases


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad UTF-8/JSON, or a 4300+-digit integer
        raise FormatError(f"{path}: unreadable JSON ({e.__class__.__name__}: {str(e)[:200]})") from None


def _shards(folder: Path, index_name: str) -> list[Path]:
    index = _read_json(folder / index_name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{folder / index_name}: no valid weight_map")
    shards = []
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = folder / shard
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise FormatError(f"{folder / index_name}: shard name {shard!r} points outside the folder")
        if not shard_path.is_file():
            raise FormatError(f"{shard_path}: shard listed in {index_name} is missing")
        shards.append(shard_path)
    return shards


def _from_safetensors(files: list[Path], path: str, config: dict | None) -> Checkpoint:
    opened: dict[str, SafetensorsFile] = {}
    tensors: dict[str, TensorMeta] = {}
    spans: dict[str, tuple[str, int, int]] = {}
    for file in files:
        st = SafetensorsFile(file)
        for name, t in st.tensors.items():
            if name in tensors:
                raise FormatError(f"{file}: tensor {name!r} also appears in {tensors[name].file}")
            tensors[name] = TensorMeta(name, t.dtype, t.shape, str(file))
            spans[name] = (str(file), t.start, t.end)
            opened[name] = st
    return Checkpoint(tensors, lambda name: opened[name].array(name), path, [str(f) for f in files], config,
                      releaser=lambda name: opened[name].release(name), spans=spans)


_TORCH_TO_ST = {
    "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
    "torch.uint8": "U8", "torch.bool": "BOOL",
}


def torch_to_numpy(t: Any) -> tuple[str, np.ndarray]:
    """(safetensors dtype, numpy array) sharing memory with a CPU torch tensor where possible."""
    import torch

    dtype = _TORCH_TO_ST.get(str(t.dtype))
    if dtype is None:
        raise FormatError(f"unsupported tensor dtype {t.dtype}")
    t = t.detach().cpu()
    if dtype == "BF16":
        return dtype, t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return dtype, t.contiguous().numpy()


def numpy_dtype_name(dtype: np.dtype) -> str:
    from .dtypes import STORAGE

    for name, storage in STORAGE.items():
        if storage == dtype and name not in ("BF16",):
            return name
    raise FormatError(f"unsupported array dtype {dtype}")


def _from_bin(files: list[Path], path: str, config: dict | None) -> Checkpoint:
    import pickle

    import torch

    state: dict[str, Any] = {}
    tensors: dict[str, TensorMeta] = {}
    for file in files:
        try:
            try:
                loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Files from the legacy (pre-zip) torch.save format cannot be mapped.
                loaded = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
            raise FormatError(f"{file}: refused to load: it is not a plain tensor file ({first[:200]})") from None
        except Exception as e:  # torch raises RuntimeError/ValueError/EOFError/... for corrupt files
            raise FormatError(f"{file}: not a readable PyTorch checkpoint ({e.__class__.__name__})") from None
        if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise FormatError(f"{file}: expected a mapping of parameter names to tensors")
        for name, t in loaded.items():
            if name in tensors:
                raise FormatError(f"{file}: tensor {name!r} also appears in {tensors[name].file}")
            dtype = _TORCH_TO_ST.get(str(t.dtype))
            if dtype is None:
                raise FormatError(f"{file}: tensor {name!r} has unsupported dtype {t.dtype}")
            tensors[name] = TensorMeta(name, dtype, tuple(t.shape), str(file))
            state[name] = t
    return Checkpoint(tensors, lambda name: torch_to_numpy(state[name])[1], path,
                      [str(f) for f in files], config, tied_aliases(state))
