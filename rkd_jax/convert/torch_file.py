"""Reading PyTorch's `torch.save` files without torch: state dicts of tensors as numpy arrays.

Two formats exist, both a pickle whose tensors point at separately stored raw buffers
("storages") through the pickle's persistent ids:

- the zip format (torch >= 1.6): `<name>/data.pkl` plus one raw file per storage,
  `<name>/data/<key>`, in the byte order of `<name>/byteorder` (little when absent);
- the legacy format (`_use_new_zipfile_serialization=False`, and every file of torch < 1.6,
  e.g. EfficientNet-Lite0's ImageNet weights): five pickles in a row (magic number, protocol
  version, system info, the object, the list of storage keys), then each storage as a
  little-endian int64 element count followed by its raw bytes, in the order of that list.

A tensor in the pickle is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, hooks[, metadata])`; a parameter wraps one in `_rebuild_parameter`. The reader is
a restricted unpickler: those functions, the storage types and `collections.OrderedDict` are
the only globals it resolves, anything else (a pickled module, code to run) is refused, as
torch.load(weights_only=True) refuses it.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# Storage type name -> numpy dtype (bfloat16 is read as uint16 and widened to float32).
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a torch.save file this reader can read; the message says why."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
    """One raw buffer: filled when its bytes are read (after the pickle, in the legacy format)."""

    def __init__(self, stype: _StorageType, numel: int):
        self.stype, self.numel = stype, numel
        self.array: np.ndarray | None = None


class _Tensor:
    """A tensor of the pickle, materialised once every storage is read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def to_numpy(self, source: str) -> np.ndarray:
        flat = self.storage.array
        if flat is None:
            raise TorchFileError(f"{source}: a tensor's storage was never written in the file")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if any(n == 0 for n in self.size):
            out = np.zeros(self.size, flat.dtype)
        elif self.offset < 0 or min(self.stride, default=0) < 0 or last >= flat.size:
            raise TorchFileError(
                f"{source}: a tensor of size {self.size} and stride {self.stride} at offset "
                f"{self.offset} reaches past its storage of {flat.size} elements"
            )
        else:
            strides = tuple(s * flat.itemsize for s in self.stride)
            view = np.lib.stride_tricks.as_strided(flat[self.offset :], self.size, strides)
            out = np.array(view)  # a copy: tensors sharing a storage stay independent
        if self.storage.stype.name == "BFloat16Storage":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, source: str, storage):
        super().__init__(file)
        self.source, self.storage = source, storage

    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchFileError(
            f"{self.source}: holds {module}.{name}, not a plain state dict of tensors; save "
            "the model's state_dict() (or convert the file to .safetensors)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchFileError(f"{self.source}: unknown persistent id {pid!r}")
        return self.storage(*pid[1:])


def _materialise(obj, source: str):
    if isinstance(obj, _Tensor):
        return obj.to_numpy(source)
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v, source)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, source) for v in obj)
    return obj


def _load_zip(path: Path, source: str):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise TorchFileError(f"{source}: a zip file without one <name>/data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        order = "little"
        if prefix + "byteorder" in names:
            order = z.read(prefix + "byteorder").decode().strip()
        if order not in ("little", "big"):
            raise TorchFileError(f"{source}: unknown byte order {order!r}")
        storages: dict[str, _Storage] = {}

        def storage(stype, key, location, numel, *_):
            if not isinstance(stype, _StorageType):
                raise TorchFileError(f"{source}: storage {key} has no known element type")
            if key not in storages:
                s = _Storage(stype, numel)
                try:
                    raw = z.read(f"{prefix}data/{key}")
                except KeyError:
                    raise TorchFileError(f"{source}: storage file data/{key} is missing") from None
                dtype = stype.dtype.newbyteorder("<" if order == "little" else ">")
                if len(raw) % dtype.itemsize:
                    raise TorchFileError(f"{source}: storage data/{key} is truncated")
                s.array = np.frombuffer(raw, dtype).astype(stype.dtype.newbyteorder("="))
                storages[key] = s
            return storages[key]

        obj = _Unpickler(io.BytesIO(z.read(pkl[0])), source, storage).load()
        return _materialise(obj, source)


def _load_legacy(path: Path, source: str):
    with open(path, "rb") as f:

        def no_storage(*_):
            raise TorchFileError(f"{source}: a storage outside the object pickle")

        try:
            header = [_Unpickler(f, source, no_storage).load() for _ in range(3)]
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            if isinstance(e, TorchFileError):
                raise
            raise TorchFileError(f"{source}: not a torch.save file ({e})") from None
        if header[0] != LEGACY_MAGIC or header[1] != LEGACY_PROTOCOL:
            raise TorchFileError(f"{source}: not a torch.save file (no legacy magic number)")
        if not (isinstance(header[2], dict) and header[2].get("little_endian", True)):
            raise TorchFileError(f"{source}: a big-endian legacy file")
        storages: dict[str, _Storage] = {}
        views = []

        def storage(stype, key, location, numel, view=None):
            if not isinstance(stype, _StorageType):
                raise TorchFileError(f"{source}: storage {key} has no known element type")
            root = storages.setdefault(key, _Storage(stype, int(numel)))
            if view is None:
                return root
            _, offset, size = view
            v = _Storage(stype, int(size))
            views.append((v, root, int(offset)))
            return v

        obj = _Unpickler(f, source, storage).load()
        keys = _Unpickler(f, source, no_storage).load()
        for key in keys:
            if key not in storages:
                raise TorchFileError(f"{source}: storage {key} is listed but never used")
            s = storages[key]
            head = f.read(8)
            if len(head) < 8:
                raise TorchFileError(f"{source}: truncated before storage {key}")
            numel = int.from_bytes(head, "little")
            raw = f.read(numel * s.stype.dtype.itemsize)
            if len(raw) < numel * s.stype.dtype.itemsize:
                raise TorchFileError(f"{source}: storage {key} is truncated")
            s.array = np.frombuffer(raw, s.stype.dtype.newbyteorder("<")).astype(s.stype.dtype)
        for v, root, offset in views:
            if root.array is not None:
                v.array = root.array[offset : offset + v.numel]
        return _materialise(obj, source)


def load(path: str | Path):
    """The object a `torch.save` file holds, with numpy arrays for tensors (float32 for
    bfloat16). TorchFileError names the file and what it holds that cannot be read."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path, str(path))
    return _load_legacy(path, str(path))
