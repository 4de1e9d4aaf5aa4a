"""Hugging Face checkpoints (config.json + *.safetensors) -> kvjax config and params."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from checkpoints_conversion.layout import canonical_params, expected_shapes  # noqa: F401
from kvjax import validation
from kvjax.config import ModelConfig, RopeScaling
from kvjax.errors import CheckpointError, ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
_ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")
# Checkpoint dtypes kvjax computes in when asked for dtype="auto" (float16 widens).
_AUTO_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}
INDEX_FILE = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- config

def _required(hf_config: dict, key: str) -> Any:
  value = hf_config.get(key)
  if value is None:
    raise ConfigError(f"config.json has no {key!r}; a {hf_config.get('model_type')} "
                      f"config needs it")
  return value


def _count(hf_config: dict, key: str, default: int | None = None) -> int:
  """A positive int field (a float or a string there is an error, never truncated)."""
  value = hf_config.get(key)
  if value is None and default is not None:
    return default
  return validation.integer(key, _required(hf_config, key), 1, validation.INT32_MAX,
                            error=ConfigError)


def _flag(hf_config: dict, key: str) -> bool:
  """A true/false field, false when absent (the string "false" is an error, not true)."""
  value = hf_config.get(key)
  return False if value is None else validation.boolean(key, value, error=ConfigError)


def _rope_parameters(hf_config: dict) -> tuple[float, dict]:
  """(rope_theta, scaling parameters) from a transformers-5 or an older config.json."""
  params = hf_config.get("rope_parameters")
  if params is not None:  # transformers >= 5
    if not isinstance(params, dict):
      raise ConfigError(f"rope_parameters={validation.show(params)} must be an object")
    if any(isinstance(v, dict) for v in params.values()):
      raise ConfigError(f"per-layer-type rope_parameters {sorted(params)} are not supported; "
                        f"expected one flat dict")
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    return theta, dict(params)
  scaling = hf_config.get("rope_scaling") or {}
  if not isinstance(scaling, dict):
    raise ConfigError(f"rope_scaling={validation.show(scaling)} must be null or an object")
  return hf_config.get("rope_theta", 10000.0), dict(scaling)


def _rope_scaling(params: dict) -> RopeScaling | None:
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ConfigError(f"rope_type={rope_type!r} is not supported; allowed: "
                      f"{SUPPORTED_ROPE_TYPES}")
  if rope_type == "default":
    return None
  missing = [k for k in _LLAMA3_KEYS if params.get(k) is None]
  if missing:
    raise ConfigError(f"llama3 rope scaling is missing {missing}; it needs {_LLAMA3_KEYS}")
  return RopeScaling(**{k: params[k] for k in _LLAMA3_KEYS})  # which checks their types


def _check_full_attention(hf_config: dict, model_type: str, max_positions: int) -> None:
  # kvjax attends over the whole context in every layer; a window smaller than the
  # context would silently change the model, so refuse it.
  layer_types = hf_config.get("layer_types")
  if layer_types and any(t != "full_attention" for t in layer_types):
    raise ConfigError(f"layer_types={sorted(set(layer_types))}: sliding-window layers are "
                      f"not supported; kvjax needs all 'full_attention'")
  window = hf_config.get("sliding_window")
  uses_window = (_flag(hf_config, "use_sliding_window") if "use_sliding_window" in hf_config
                 else model_type == "mistral")
  if uses_window and window is not None and validation.integer(
      "sliding_window", window, 1, error=ConfigError) < max_positions:
    raise ConfigError(f"sliding_window={window} is smaller than max_position_embeddings="
                      f"{max_positions}; sliding-window attention is not supported "
                      f"(expected sliding_window null or >= the context)")


def _check_llama_extras(hf_config: dict) -> None:
  # Llama's attention_bias also adds an o_proj bias, which the kvjax layout lacks.
  for key in ("attention_bias", "mlp_bias"):
    if _flag(hf_config, key):
      raise ConfigError(f"{key}=true is not supported for model_type "
                        f"{hf_config.get('model_type')!r}; expected false")


def _resolve_dtype(dtype: str | None, hf_config: dict) -> str:
  if dtype is None:
    return "float32"
  if dtype != "auto":
    return dtype  # ModelConfig validates it
  stored = hf_config.get("dtype", hf_config.get("torch_dtype")) or "float32"
  if stored not in _AUTO_DTYPE:
    raise ConfigError(f"checkpoint dtype {stored!r} has no kvjax equivalent; pass dtype="
                      f"'float32' or 'bfloat16'")
  return _AUTO_DTYPE[stored]


def config_from_hf(hf_config: dict, *, dtype: str | None = None, name: str = "") -> ModelConfig:
  """ModelConfig from a parsed Hugging Face config.json.

  dtype: None -> float32; "float32" / "bfloat16"; "auto" -> the checkpoint's own dtype
  (float16 widens to float32, which kvjax supports).
  """
  model_type = hf_config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ConfigError(f"model_type={model_type!r} is not supported; allowed: "
                      f"{SUPPORTED_MODEL_TYPES}")
  act = hf_config.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"hidden_act={act!r} is not supported; expected 'silu'")
  if model_type != "qwen2":
    _check_llama_extras(hf_config)
  max_positions = _count(hf_config, "max_position_embeddings")
  _check_full_attention(hf_config, model_type, max_positions)
  hidden = _count(hf_config, "hidden_size")
  heads = _count(hf_config, "num_attention_heads")
  if hf_config.get("head_dim") is None and hidden % heads:
    raise ConfigError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                      f"and config.json has no head_dim")
  theta, rope_params = _rope_parameters(hf_config)
  return ModelConfig(
      architecture=_ARCHITECTURE[model_type],
      vocab_size=_count(hf_config, "vocab_size"),
      hidden_size=hidden,
      intermediate_size=_count(hf_config, "intermediate_size"),
      num_layers=_count(hf_config, "num_hidden_layers"),
      num_heads=heads,
      num_kv_heads=_count(hf_config, "num_key_value_heads", heads),
      head_dim=_count(hf_config, "head_dim", hidden // heads),
      max_position_embeddings=max_positions,
      rope_theta=theta,
      rope_scaling=_rope_scaling(rope_params),
      rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
      tie_embeddings=_flag(hf_config, "tie_word_embeddings"),
      qkv_bias=model_type == "qwen2",
      dtype=_resolve_dtype(dtype, hf_config),
      name=name)


# ----------------------------------------------------------------------------- tensors

def _shard_files(directory: str) -> list[str]:
  """The safetensors files of a checkpoint, from its index when it has one."""
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index_path}: unreadable safetensors index ({e}); expected JSON "
                            f"with a 'weight_map'") from None
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if absent:
      raise CheckpointError(f"{index_path} lists shard {absent[0]!r}, which is not in "
                            f"{directory}")
  else:
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise CheckpointError(f"{directory} holds no *.safetensors files")
  return [os.path.join(directory, f) for f in files]


def _header(path: str) -> tuple[dict, int]:
  """A safetensors file's JSON header and where its data starts (8-byte length prefix)."""
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(length)), 8 + length


class _SafetensorsFiles:
  """Lazy tensor access across shards; bf16 read from raw bytes (numpy lacks bfloat16)."""

  def __init__(self, paths: list[str], stack: contextlib.ExitStack):
    self.handles, self.location, self.headers = {}, {}, {}
    for path in paths:
      try:
        handle = stack.enter_context(safe_open(path, framework="numpy"))
      except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
      self.handles[path] = handle
      for name in handle.keys():
        if name in self.location:
          raise CheckpointError(f"tensor {name} is stored twice: in {self.location[name]} "
                                f"and {path}")
        self.location[name] = path

  def get(self, name: str) -> np.ndarray:
    path = self.location[name]
    handle = self.handles[path]
    if handle.get_slice(name).get_dtype() == "BF16":
      return self._bfloat16(path, name)
    try:
      return handle.get_tensor(name)
    except (TypeError, SafetensorError) as e:
      raise CheckpointError(f"{path}: cannot read tensor {name} "
                            f"(dtype {handle.get_slice(name).get_dtype()}): {e}") from None

  def _bfloat16(self, path: str, name: str) -> np.ndarray:
    if path not in self.headers:
      self.headers[path] = _header(path)
    header, start = self.headers[path]
    begin, end = header[name]["data_offsets"]
    with open(path, "rb") as f:
      f.seek(start + begin)
      raw = f.read(end - begin)
    if len(raw) != end - begin:
      raise CheckpointError(f"{path}: truncated safetensors file (tensor {name})")
    return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(header[name]["shape"])


def params_from_safetensors(directory: str, config: ModelConfig) -> dict[str, np.ndarray]:
  """Reads a Hugging Face safetensors checkpoint into kvjax's canonical params.

  One or many *.safetensors files (with or without model.safetensors.index.json);
  every tensor is checked against `config` and cast to config.dtype.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory!r} is not a directory; expected a Hugging Face "
                          f"checkpoint directory with *.safetensors")
  with contextlib.ExitStack() as stack:
    files = _SafetensorsFiles(_shard_files(directory), stack)
    return canonical_params(files.get, files.location, config, source=directory)


def read_hf_config(directory: str, *, dtype: str | None = None) -> ModelConfig:
  """ModelConfig from `directory`/config.json."""
  directory = os.fspath(directory)
  path = os.path.join(directory, "config.json")
  try:
    with open(path) as f:
      hf_config = json.load(f)
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read the Hugging Face config ({e})") from None
  except ValueError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(hf_config, dict):
    raise ConfigError(f"{path}: must be a JSON object of fields; got "
                      f"{type(hf_config).__name__}")
  try:
    return config_from_hf(hf_config, dtype=dtype,
                          name=os.path.basename(os.path.normpath(directory)))
  except ConfigError as e:  # name the file the bad field is in
    raise ConfigError(f"{path}: {e}") from None


def read_hf_checkpoint(directory: str, *,
                       dtype: str | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """(config, canonical params) of a Hugging Face checkpoint directory."""
  config = read_hf_config(directory, dtype=dtype)
  return config, params_from_safetensors(directory, config)
