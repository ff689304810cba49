"""Read a `torch.save` file into numpy without torch, refusing any code the pickle names.

`torch.load` of an untrusted pickle can run arbitrary code (every GLOBAL the pickle names is
imported and may be called). Community files (textual-inversion `.pt` embeddings) are
untrusted, so this reader accepts only what `torch.save` writes for plain tensors in
containers:

  archive.zip/<prefix>/data.pkl     the pickle (protocol 2), tensors as
      torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])
      torch._utils._rebuild_parameter(tensor, requires_grad, hooks)          (nn.Parameter)
      storages as persistent ids ("storage", torch.<Type>Storage, key, location, numel)
  archive.zip/<prefix>/data/<key>   each storage's raw bytes (little-endian unless `byteorder` says big)

plus `collections.OrderedDict` (the hooks argument, state dicts). Any other global is a
`TorchPickleError` naming it, raised before anything is called. The legacy (pre-1.6,
non-zip) format is refused too. Tensors come back as numpy arrays of their own dtype
(bfloat16 as `ml_dtypes.bfloat16`); every view is bounds-checked against its storage.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any

import numpy as np

from dynamicid_jax.errors import UserError


class TorchPickleError(UserError, ValueError):
    """A file that is not a torch.save archive of plain tensors (names the file and why)."""


def _bfloat16():
    import ml_dtypes  # a jax dependency

    return ml_dtypes.bfloat16


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "BFloat16Storage": None,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands in for torch.<Type>Storage: only its dtype is used."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_bfloat16() if name == "BFloat16Storage" else _STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size, stride, requires_grad=False, hooks=None,
                       metadata=None) -> np.ndarray:
    """A strided view of a 1-D storage array, checked to stay inside it, copied out."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"bad tensor geometry: offset {offset}, size {size}, stride {stride}")
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise pickle.UnpicklingError(f"tensor of size {size} reaches element {last} of a {storage.size}-element storage")
    view = np.lib.stride_tricks.as_strided(storage[offset:] if storage.size else storage, shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, requires_grad=False, hooks=None) -> np.ndarray:
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
        super().__init__(file)
        self.archive, self.prefix, self.big_endian = archive, prefix, big_endian
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refuses the global {module}.{name} (only plain tensors are read)")

    def persistent_load(self, pid) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        if key not in self.storages:
            dtype = kind.dtype.newbyteorder(">") if self.big_endian and kind.dtype.itemsize > 1 else kind.dtype
            name, wanted = f"{self.prefix}data/{key}", int(numel) * dtype.itemsize
            if self.archive.getinfo(name).file_size < wanted:  # checked before anything is read
                raise pickle.UnpicklingError(f"storage {key} holds {self.archive.getinfo(name).file_size} bytes, "
                                             f"{numel} {kind.name} elements expected")
            with self.archive.open(name) as f:
                data = f.read(wanted)
            self.storages[key] = np.frombuffer(data, dtype, count=int(numel)).astype(kind.dtype.newbyteorder("="))
        return self.storages[key]


# Deflate expands at most ~1032:1; torch.save stores entries uncompressed (1:1). An entry that
# claims more than that over the whole archive is a zip bomb or a corrupt directory.
_MAX_EXPANSION = 1032


def _check_sizes(archive: zipfile.ZipFile, archive_size: int, path) -> None:
    """Every entry's claimed size is possible for an archive of `archive_size` bytes."""
    for info in archive.infolist():
        ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _MAX_EXPANSION
        if info.file_size > archive_size * ratio:
            raise TorchPickleError(f"{path}: archive entry {info.filename} claims {info.file_size} bytes in a "
                                   f"{archive_size}-byte file (corrupt or a zip bomb)")


def load(path: str | os.PathLike) -> Any:
    """The object a torch.save file holds, its tensors as numpy arrays (see the module docstring).

    Raises TorchPickleError naming the file for a legacy or malformed archive and for any
    global other than tensor rebuilding (nothing the pickle names is ever imported).
    """
    if not zipfile.is_zipfile(path):
        raise TorchPickleError(f"{path}: not a torch.save zip archive (a legacy pre-1.6 pickle, or not a torch file); "
                               "re-save it with a recent torch or use a .safetensors file")
    try:
        with zipfile.ZipFile(path) as archive:
            _check_sizes(archive, os.path.getsize(path), path)
            pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise TorchPickleError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
            prefix = pickles[0][: -len("data.pkl")]
            names = set(archive.namelist())
            big_endian = f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() == b"big"
            with archive.open(pickles[0]) as f:
                return _Unpickler(f, archive, prefix, big_endian).load()
    except TorchPickleError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, TypeError, ValueError, IndexError,
            AttributeError, RecursionError, OverflowError) as e:
        # a malformed file, never a bug of ours: name it
        raise TorchPickleError(f"{path}: {e}") from None
