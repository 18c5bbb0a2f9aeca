"""Reading `torch.save` zip archives without torch and without running code from the file.

A torch pickle names Python callables (`torch._utils._rebuild_tensor_v2`, `numpy.dtype`, ...) that
`pickle` would import and call. `SafeTorchUnpickler` allows exactly the globals that plain tensor
containers (and composable-sft's numpy index scalars) need and maps each to a stand-in defined
here, which builds numpy arrays from the archive's storage members; any other global is refused
with a `FormatError` naming it, before anything is imported. Every size in the pickle is checked
against the archive's member sizes before anything is allocated.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import FormatError

MAX_PICKLE_BYTES = 256 << 20  # the pickle describes structure only; tensors live in data/ members


@dataclass(frozen=True)
class StorageType:
    """Stand-in for `torch.FloatStorage` & co.: only the element type matters."""

    name: str
    dtype: np.dtype


_STORAGE_TYPES = {
    name: StorageType(name, np.dtype(dt))
    for name, dt in {
        "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
        "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
        "ByteStorage": "u1", "BoolStorage": "?",
    }.items()
}


@dataclass(frozen=True)
class TorchArray:
    """A tensor read from a torch pickle: numpy values plus the storage type (BF16 as uint16)."""

    array: np.ndarray
    storage: str

    @property
    def bfloat16(self) -> bool:
        return self.storage == "BFloat16Storage"


class _NumpyDType:
    """Stand-in for `numpy.dtype(name, align, copy)` followed by BUILD with its pickled state."""

    _ALLOWED = {"i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "b1", "?"}

    def __init__(self, name: Any, align: Any = False, copy: Any = False):
        if not isinstance(name, str) or name not in self._ALLOWED:
            raise FormatError(f"numpy dtype {name!r} is not allowed in this file")
        self.name = name
        self.order = "<"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = "<" if state[1] in ("|", "=") else state[1]

    def numpy(self) -> np.dtype:
        return np.dtype(self.order + self.name) if self.name not in ("i1", "u1", "b1", "?") else np.dtype(self.name)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Stand-in for `numpy.core.multiarray.scalar(dtype, bytes)`: a numeric numpy scalar."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise FormatError("malformed numpy scalar in the pickle")
    dt = dtype.numpy()
    if len(data) != dt.itemsize:
        raise FormatError("malformed numpy scalar in the pickle (wrong byte count)")
    return np.frombuffer(data, dtype=dt)[0]


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use to spell bytes objects."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise FormatError("malformed bytes object in the pickle")
    return text.encode("latin1")


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int and d >= 0 for d in dims):
        raise FormatError("malformed torch.Size in the pickle")
    return tuple(dims)


class _OrderedDict(dict):
    """A dict that takes the attribute state `state_dict()` results carry (`_metadata`, pickled with
    BUILD) and drops it, so a model's state dict unpickles far enough to be recognized."""

    def __setstate__(self, state: Any) -> None:
        pass


def _ordered_dict(*args: Any) -> dict:
    """Stand-in for `collections.OrderedDict()` (torch pickles an empty one as backward hooks, and
    state dicts as one filled by SETITEMS)."""
    if args:
        raise FormatError("unexpected OrderedDict contents in the pickle")
    return _OrderedDict()


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       hooks: Any = None, metadata: Any = None) -> TorchArray:
    """Stand-in for `torch._utils._rebuild_tensor_v2`: a bounds-checked copy out of the storage."""
    if not isinstance(storage, _Storage):
        raise FormatError("tensor in the pickle does not refer to a storage")
    dims = _torch_size(size)
    strides = _torch_size(stride)
    if type(offset) is not int or offset < 0 or len(strides) != len(dims):
        raise FormatError("malformed tensor layout in the pickle")
    numel = 1
    for d in dims:
        numel *= d
    data = storage.data
    if numel:
        last = offset + sum((d - 1) * s for d, s in zip(dims, strides))
        if last >= len(data) or numel > len(data):
            raise FormatError("tensor in the pickle reaches past the end of its storage")
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(data[offset:], shape=dims, strides=[s * item for s in strides])
        array = np.array(view, copy=True)
    else:
        array = np.empty(dims, dtype=data.dtype)
    return TorchArray(array, storage.type.name)


@dataclass(frozen=True)
class _Storage:
    type: StorageType
    data: np.ndarray


_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch", "Size"): _torch_size,
    ("collections", "OrderedDict"): _ordered_dict,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _NumpyDType,
    ("_codecs", "encode"): _codecs_encode,
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


class SafeTorchUnpickler(pickle.Unpickler):
    """Unpickles a torch archive's data.pkl, resolving only allow-listed globals to stand-ins."""

    def __init__(self, data: bytes, read_storage: Callable[[str, StorageType, int], np.ndarray]):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            if module.startswith(("transformers.", "torch.nn.")):
                raise FormatError(
                    f"refused to load: the pickle holds a whole model object ({module}.{name}), not tensors; "
                    "if it is a model, save its state_dict (or save_pretrained) and use it as BASE"
                ) from None
            raise FormatError(
                f"refused to load: the pickle names {module}.{name}, which a tensor file never needs "
                "(it could run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise FormatError(f"unsupported persistent id in the pickle: {str(pid)[:80]}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise FormatError("malformed storage reference in the pickle")
        if key not in self._storages:
            self._storages[key] = _Storage(stype, self._read_storage(key, stype, numel))
        storage = self._storages[key]
        if storage.type != stype:
            raise FormatError(f"storage {key!r} is referenced with two element types")
        return storage


# What zipfile raises on a damaged archive, besides BadZipFile: negative or huge offsets (OSError,
# ValueError), truncation (EOFError), undecodable member names (UnicodeDecodeError, a ValueError),
# unsupported zip versions or encryption (NotImplementedError).
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError)
MAX_BYTEORDER_BYTES = 16


def load_torch_zip(path: str | os.PathLike) -> Any:
    """The object a `torch.save` zip archive holds, with tensors as `TorchArray`s. No torch needed."""
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        if _is_legacy_torch(path):
            raise FormatError(
                f"{path}: legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it with "
                "torch.save in PyTorch >= 1.6"
            ) from None
        raise FormatError(f"{path}: not a torch.save archive (not a zip file)") from None
    except OSError as e:  # missing or unreadable, or a seek out of range
        raise FormatError(f"{path}: cannot read as a zip archive ({e.strerror or _describe(e)})") from None
    except _ZIP_ERRORS as e:
        raise FormatError(f"{path}: damaged zip archive ({_describe(e)})") from None
    with archive:
        try:
            _check_directory_offset(path, archive)
            return _load_archive(archive)
        except FormatError as e:  # raised without the path, which is only known here
            raise FormatError(f"{path}: {e}") from None


def _describe(e: BaseException) -> str:
    return f"{e.__class__.__name__}: {' '.join(str(e).split())[:120]}"


def _check_directory_offset(path: str, archive: zipfile.ZipFile) -> None:
    """The classic end record must point where the central directory is. zipfile prefers the zip64
    record (which torch always writes too) and ignores a contradicting classic one; it also accepts
    data prepended to the archive, which torch never writes."""
    eocd_size = 22  # the classic end-of-central-directory record, followed by the archive comment
    try:
        with open(path, "rb") as f:
            f.seek(-(eocd_size + len(archive.comment)), os.SEEK_END)
            record = f.read(eocd_size)
    except OSError as e:
        raise FormatError(f"cannot read ({e.strerror or _describe(e)})") from None
    offset = int.from_bytes(record[16:20], "little") if record[:4] == b"PK\x05\x06" else None
    if offset is None or offset not in (archive.start_dir, 0xFFFFFFFF):
        raise FormatError("damaged zip archive (inconsistent central directory offset)")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """A member's bytes: the one place the archive's contents are read. torch stores every member
    uncompressed and unencrypted, so anything else is refused before zipfile acts on it."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise FormatError(f"member {info.filename!r} is compressed or encrypted (torch never does that)")
    try:
        data = archive.read(info)
    except _ZIP_ERRORS as e:
        raise FormatError(f"member {info.filename!r} is damaged ({_describe(e)})") from None
    if len(data) != info.file_size:
        raise FormatError(f"member {info.filename!r} is truncated")
    return data


def _load_archive(archive: zipfile.ZipFile) -> Any:
    members = {info.filename: info for info in archive.infolist()}
    pkl = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise FormatError("not a torch.save archive (expected one <name>/data.pkl)")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = members.get(prefix + "byteorder")
    if byteorder is not None:
        if byteorder.file_size > MAX_BYTEORDER_BYTES:
            raise FormatError("malformed byteorder member")
        if _read_member(archive, byteorder).strip() not in (b"little", b""):
            raise FormatError("big-endian torch archives are not supported")

    def read_storage(key: str, stype: StorageType, numel: int) -> np.ndarray:
        info = members.get(f"{prefix}data/{key}")
        if info is None or "/" in key or key in ("", ".", ".."):
            raise FormatError(f"storage {key!r} is missing from the archive")
        nbytes = numel * stype.dtype.itemsize
        if info.file_size != nbytes:
            raise FormatError(f"storage {key!r} holds {info.file_size} bytes, the pickle says {nbytes}")
        return np.frombuffer(_read_member(archive, info), dtype=stype.dtype)

    info = members[pkl[0]]
    if info.file_size > MAX_PICKLE_BYTES:
        raise FormatError(f"{pkl[0]} is larger than {MAX_PICKLE_BYTES} bytes")
    data = _read_member(archive, info)
    try:
        return SafeTorchUnpickler(data, read_storage).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, RecursionError, MemoryError) as e:
        raise FormatError(f"malformed pickle ({_describe(e)})") from None


def _is_legacy_torch(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head[:1] == b"\x80"  # a bare pickle protocol marker, as the legacy format starts
