"""Converted registry models in the cache: whole or built again, never loaded half.

An entry `<cache>/converted/<name>-v<N>/` holds
  kvjax_config.json                       the ModelConfig
  tokenizer.json, kvjax_tokenizer.json    the tokenizer
  params.safetensors                      canonical float32 tensors (tensor_file format)
  kvjax_entry.json                        written last: every other file's size and sha256
An entry without its `kvjax_entry.json`, or whose files do not match it (missing,
truncated, changed), is not whole: `ensure` builds it again.

Building streams: the GGUF is dequantized one tensor at a time and each tensor is appended
to params.safetensors before the next is read, so converting holds one tensor in memory
(Qwen2.5-0.5B peaks near 1.6 GB where building the whole model first took 10 GB).
It happens in a staging folder beside the entry and ends in a rename. Every builder of an
entry holds `<entry>.lock` (fcntl.flock), so two processes loading the same model at once
convert it once: the second waits, then finds the entry whole; staging folders found while
holding the lock belong to killed processes and are deleted.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable

import jax
import numpy as np
from absl import logging

from checkpoints_conversion import tensor_file
from checkpoints_conversion.gguf_reader import iter_gguf
from checkpoints_conversion.layout import canonical_specs
from kvjax import fileio
from kvjax.config import ModelConfig
from kvjax.errors import CheckpointError
from kvjax.loading import progress
from kvjax.loading.assets import file_sha256
from kvjax.loading.tokenizer import Tokenizer
from kvjax.model import from_flat_params

CONFIG_FILE = "kvjax_config.json"
PARAMS_FILE = "params.safetensors"
ENTRY_FILE = "kvjax_entry.json"
ENTRY_FORMAT = "kvjax-converted-entry"
_STAGING = ".staging-"
_OLD = ".old-"

OnTensor = Callable[[str, int], None]


def lock_path(entry: pathlib.Path) -> pathlib.Path:
  return entry.with_name(f".{entry.name}.lock")


def problem(entry) -> str | None:
  """Why `entry` is not a whole converted model (None when it is).

  Sizes are checked on every call; a file whose modification time differs from the one
  recorded is hashed again (a same-size edit cannot pass unnoticed).
  """
  entry = pathlib.Path(entry)
  if not entry.exists():
    return f"{entry} does not exist"
  manifest = fileio.read_json(entry / ENTRY_FILE)
  if manifest is None or manifest.get("format") != ENTRY_FORMAT:
    return f"no readable {ENTRY_FILE} (a conversion that did not finish)"
  files = manifest.get("files")
  if not isinstance(files, dict) or not files:
    return f"{ENTRY_FILE} lists no files"
  for name, record in files.items():
    path = entry / name
    if not path.is_file():
      return f"{path} is missing"
    stat = path.stat()
    if stat.st_size != record.get("size"):
      return f"{path} has {stat.st_size} bytes, expected {record.get('size')}"
    if stat.st_mtime_ns != record.get("mtime_ns") and file_sha256(path) != record.get("sha256"):
      return f"{path} was changed since it was written (sha256 differs)"
  return None


def ensure(entry, gguf_path: Callable[[], pathlib.Path], name: str,
           on_tensor: OnTensor | None = None) -> pathlib.Path:
  """Makes `entry` whole: returns at once if it is, else converts `gguf_path()` into it.

  `gguf_path` is called only when a conversion is needed (it may download).
  """
  entry = pathlib.Path(entry)
  if problem(entry) is None:  # The common case takes no lock (a read-only cache works).
    return entry
  with fileio.locked(lock_path(entry)):
    for leftover in fileio.remove_leftovers(entry.parent, f".{entry.name}{_STAGING}*"):
      logging.warning("removed %s, left by a conversion that was killed", leftover)
    fileio.remove_leftovers(entry.parent, f".{entry.name}{_OLD}*")
    why = problem(entry)
    if why is None:
      return entry
    if entry.exists():
      logging.warning("converted model %s is not whole (%s); converting it again", entry, why)
    build(entry, gguf_path(), name, on_tensor)
  return entry


def build(entry, gguf_path, name: str, on_tensor: OnTensor | None = None) -> pathlib.Path:
  """Converts the GGUF at `gguf_path` into `entry` (call it holding `lock_path(entry)`)."""
  entry = pathlib.Path(entry)
  entry.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{entry.name}{_STAGING}", dir=entry.parent))
  try:
    config, tensors = iter_gguf(gguf_path)
    config = config.replace(name=name)
    specs = canonical_specs(config)
    bar = None
    if on_tensor is None:
      bar = progress.ConversionProgress(
          f"kvjax: converting {name}", sum(int(np.prod(s)) * np.dtype(d).itemsize
                                           for s, d in specs.values()), len(specs))
    try:
      params_sha256 = tensor_file.write(staging / PARAMS_FILE, specs, tensors, on_tensor or bar)
    finally:
      if bar is not None:
        bar.close()
    (staging / CONFIG_FILE).write_text(config.to_json())
    Tokenizer.from_gguf(gguf_path).save(staging)
    _write_manifest(staging, {PARAMS_FILE: params_sha256})
    os.chmod(staging, 0o755)  # mkdtemp makes 0700; others sharing a cache must read it.
    if entry.exists():  # Not whole (ensure checked): move it aside, then swap in.
      os.replace(entry, entry.with_name(f".{entry.name}{_OLD}{os.getpid()}"))
    os.replace(staging, entry)
  except BaseException:
    fileio.remove_leftovers(entry.parent, staging.name)
    raise
  fileio.remove_leftovers(entry.parent, f".{entry.name}{_OLD}{os.getpid()}")
  return entry


def _write_manifest(directory: pathlib.Path, known_sha256: dict[str, str]) -> None:
  files = {}
  for path in sorted(directory.iterdir()):
    stat = path.stat()
    digest = known_sha256.get(path.name) or file_sha256(path)
    files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
  fileio.write_json_atomic(directory / ENTRY_FILE, {"format": ENTRY_FORMAT, "files": files},
                           indent=1, sort_keys=True)


def load(entry, *, dtype: str | None = None, put=None):
  """The Model in a whole entry, read one tensor at a time straight into JAX arrays:
  `put(name, host array)` (default: onto the default device; a sharded load puts each
  tensor straight into its shards, `Placement.put_param`)."""
  entry = pathlib.Path(entry)
  why = problem(entry)
  if why is not None:
    raise CheckpointError(f"{entry} is not a whole converted model ({why}); delete it and "
                          f"load the model again to rebuild it")
  config = ModelConfig.from_json((entry / CONFIG_FILE).read_text(), source=entry / CONFIG_FILE)
  if dtype is not None:
    config = config.replace(dtype=dtype)
  flat = {}
  for tensor_name, array in tensor_file.read(entry / PARAMS_FILE):
    # On CPU an aligned buffer is adopted, not copied.
    value = jax.device_put(array) if put is None else put(tensor_name, array)
    del array
    # (A host array `put` left, a tensor of another model, is for from_flat_params to name.)
    cast = isinstance(value, jax.Array) and value.dtype != config.dtype
    flat[tensor_name] = value.astype(config.dtype) if cast else value
  return from_flat_params(config, flat, tokenizer=Tokenizer.load(entry), source=str(entry))
