"""Canonical parameters in one safetensors file, written and read one tensor at a time.

A converted model is written while it is converted: the header (every name, dtype, shape
and offset) comes from the config before the first tensor exists, then each tensor's bytes
are appended and the tensor is dropped, so memory holds one tensor, never the model. The
file is plain safetensors (any safetensors reader opens it). Reading fills one 64-byte
aligned buffer per tensor with ordinary reads (no memory map, whose touched pages would
count against the process until it is closed); on CPU, JAX adopts such a buffer without
copying it, so a loaded model costs its own bytes and no more.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import struct
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from kvjax.errors import CheckpointError

_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16)}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_ALIGN = 64  # JAX's CPU client adopts host buffers aligned to 64 bytes without a copy.
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header

Spec = tuple[tuple[int, ...], np.dtype]
OnTensor = Callable[[str, int], None]


def _header_bytes(specs: Mapping[str, Spec]) -> bytes:
  header, offset = {}, 0
  for name, (shape, dtype) in specs.items():
    dtype = np.dtype(dtype)
    if dtype not in _CODES:
      raise CheckpointError(f"tensor {name}: dtype {dtype} cannot be stored; allowed: "
                            f"{sorted(str(d) for d in _CODES)}")
    size = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  return blob + b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes


def write(path, specs: Mapping[str, Spec], tensors: Iterable[tuple[str, np.ndarray]],
          on_tensor: OnTensor | None = None) -> str:
  """Writes `tensors` (in the order of `specs`) to `path`; returns the file's sha256.

  Each tensor is checked against its spec, appended, and released before the next is
  read. `on_tensor(name, nbytes)` is called after each one (progress bars).
  """
  path = pathlib.Path(path)
  header = _header_bytes(specs)
  expected = iter(specs.items())
  digest = hashlib.sha256()
  with open(path, "wb") as f:

    def put(data) -> None:
      digest.update(data)
      f.write(data)

    put(struct.pack("<Q", len(header)) + header)
    for name, array in tensors:
      want_name, (shape, dtype) = next(expected, (None, (None, None)))
      if name != want_name:
        raise CheckpointError(f"{path}: got tensor {name} where {want_name} belongs")
      if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise CheckpointError(f"{path}: tensor {name} is {array.dtype}{list(array.shape)}; "
                              f"expected {np.dtype(dtype)}{list(shape)}")
      put(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
      if on_tensor is not None:
        on_tensor(name, array.nbytes)
      del array
    left = [name for name, _ in expected]
    if left:
      raise CheckpointError(f"{path}: {len(left)} tensors were never written, e.g. {left[:3]}")
    f.flush()
    os.fsync(f.fileno())
  return digest.hexdigest()


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  nbytes = math.prod(shape) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGN, np.uint8)
  start = -raw.ctypes.data % _ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_header(path) -> tuple[dict, int]:
  """(name -> entry, offset of the data) of a safetensors file, checked against its size."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) != 8:
      raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(_MAX_HEADER, size - 8):
      raise CheckpointError(f"{path}: header length {length} does not fit its {size} bytes")
    try:
      header = json.loads(f.read(length))
    except ValueError as e:
      raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
  header.pop("__metadata__", None)
  end = 0
  for name, entry in header.items():
    if entry.get("dtype") not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}; "
                            f"allowed: {sorted(_DTYPES)}")
    begin, stop = entry["data_offsets"]
    if stop - begin != math.prod(entry["shape"]) * _DTYPES[entry["dtype"]].itemsize:
      raise CheckpointError(f"{path}: tensor {name}'s offsets do not match its shape")
    end = max(end, stop)
  if 8 + length + end != size:
    raise CheckpointError(f"{path}: holds {size} bytes; its header describes "
                          f"{8 + length + end} (truncated or wrong file)")
  return header, 8 + length


def read(path) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) for every tensor of `path`, in file order, each in a fresh buffer."""
  path = pathlib.Path(path)
  header, start = read_header(path)
  ordered = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
  with open(path, "rb") as f:
    for name, entry in ordered:
      begin, _ = entry["data_offsets"]
      array = _aligned_empty(tuple(entry["shape"]), _DTYPES[entry["dtype"]])
      f.seek(start + begin)
      if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
        raise CheckpointError(f"{path}: truncated while reading tensor {name}")
      yield name, array
