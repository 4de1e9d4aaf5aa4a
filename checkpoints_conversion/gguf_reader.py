"""GGUF files (llama.cpp) -> kvjax config and dequantized canonical params.

Facts about the format this relies on:
- A tensor's `ne` lists dimensions fastest-first; reversed it is the logical numpy shape,
  which for every tensor used here equals the Hugging Face tensor's shape ([out, in]).
- llama.cpp's converter permutes the Q and K rows of llama-architecture models so that
  rotary pairs sit next to each other (interleaved RoPE). kvjax uses Hugging Face's
  rotate-half RoPE, so those rows are permuted back. Qwen2 files are stored unpermuted.
- Llama-3.1-style ("llama3") RoPE scaling has no metadata keys: the converter stores only
  `rope_freqs.weight`, the per-frequency divisors. The RopeScaling is recovered from it
  and checked to reproduce every divisor.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import gguf
import numpy as np

from checkpoints_conversion.layout import iter_canonical_params
from kvjax.config import ModelConfig, RopeScaling
from kvjax.errors import CheckpointError, ConfigError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_MAGIC = b"GGUF"
_ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's converter assumes this original context when it writes rope_freqs.
_LLAMA3_ORIGINAL_CONTEXT = 8192
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}
_HF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_MISSING = object()
_SLAB_BYTES = 32 << 20  # dequantize this much float32 output at a time


# ----------------------------------------------------------------------------- names

def hf_name(gguf_name: str) -> str:
  """The Hugging Face name of a GGUF tensor; unknown names come back unchanged."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
  return gguf_name


def _gguf_name(name: str) -> str:
  if name in _HF_GLOBAL:
    return _HF_GLOBAL[name]
  parts = name.split(".", 3)
  if len(parts) == 4 and parts[:2] == ["model", "layers"]:
    layer = _HF_LAYER.get(parts[3])
    if layer is not None:
      return f"blk.{parts[2]}.{layer}"
  return name


# ----------------------------------------------------------------------------- reading

def _open(path: str) -> gguf.GGUFReader:
  if not os.path.isfile(path):
    raise CheckpointError(f"GGUF file {path!r} does not exist")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _MAGIC:
    raise CheckpointError(f"{path} is not a GGUF file: starts with {magic!r}, expected {_MAGIC!r}")
  try:
    return gguf.GGUFReader(path, "r")
  except Exception as e:  # gguf raises ValueError/IndexError/... on truncated files
    raise CheckpointError(f"{path}: truncated or corrupt GGUF file "
                          f"({type(e).__name__}: {e})") from None


def _meta(reader: gguf.GGUFReader, key: str, path: str, default=_MISSING):
  field = reader.get_field(key)
  if field is None:
    if default is _MISSING:
      raise ConfigError(f"{path}: GGUF metadata has no {key!r}, which the model needs")
    return default
  return field.contents()


def _scalar(reader: gguf.GGUFReader, key: str, path: str, default=_MISSING):
  value = _meta(reader, key, path, default)
  if isinstance(value, list):  # some exporters write per-layer arrays
    if len(set(value)) != 1:
      raise ConfigError(f"{path}: {key} varies per layer ({sorted(set(value))}); kvjax needs "
                        f"one value for all layers")
    value = value[0]
  return value


def _float32_value(value) -> float:
  # Metadata floats are float32: 1e-5 reads back as 9.99999974e-06; keep the short decimal.
  return float(str(np.float32(value)))


def _logical_shape(tensor) -> tuple[int, ...]:
  return tuple(int(n) for n in reversed(tensor.shape))


def _dequantize(tensor, path: str) -> np.ndarray:
  """A GGUF tensor as float32 in its logical shape, owning its memory.

  Quantized tensors are dequantized a slab of rows at a time into the output, so the
  dequantizer's temporaries stay near _SLAB_BYTES instead of several times the tensor.
  """
  shape = _logical_shape(tensor)
  block, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
  if tensor.data.nbytes != math.prod(shape) // block * type_size:
    raise CheckpointError(f"{path}: tensor {tensor.name} holds {tensor.data.nbytes} bytes; "
                          f"expected {math.prod(shape) // block * type_size} (truncated file?)")
  data = tensor.data.reshape(shape[0], -1) if len(shape) > 1 else tensor.data.reshape(1, -1)
  out = np.empty((data.shape[0], math.prod(shape) // data.shape[0]), np.float32)
  rows = max(1, _SLAB_BYTES // max(1, out.shape[1] * 4))
  try:
    for start in range(0, data.shape[0], rows):
      # F32 comes back as a view of the memory-mapped file; assigning copies it.
      out[start:start + rows] = gguf.quants.dequantize(data[start:start + rows],
                                                      tensor.tensor_type)
  except NotImplementedError:
    raise CheckpointError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
                          f"which gguf cannot dequantize") from None
  return out.reshape(shape)


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: per head, rows (x0,y0,x1,y1,...) -> (x..., y...)."""
  rows = weight.shape[0]
  if rows % (2 * heads):
    raise CheckpointError(f"cannot un-permute {rows} rows into {heads} heads of even size")
  return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


# ----------------------------------------------------------------------------- rope

def llama3_rope_factors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
  """Llama 3 divisor of each rotary inverse frequency (what rope_freqs.weight stores)."""
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * np.pi / inv_freq
  context = scaling.original_max_position_embeddings
  lo, hi, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
  smooth = (context / wavelen - lo) / (hi - lo)
  between = 1 / ((1 - smooth) / factor + smooth)
  return np.where(wavelen < context / hi, 1.0, np.where(wavelen > context / lo, factor, between))


def _snap(x: float) -> float:
  # The fit recovers 1.0 as 0.99999...; prefer the short decimal the config was written with.
  for decimals in range(4):
    if abs(round(x, decimals) - x) <= 1e-4 * max(1.0, abs(x)):
      return round(x, decimals)
  return x


def scaling_from_rope_freqs(factors: np.ndarray, theta: float, head_dim: int,
                            original_context: int = _LLAMA3_ORIGINAL_CONTEXT,
                            source: str = "rope_freqs") -> RopeScaling | None:
  """Recovers the llama3 RopeScaling whose divisors are `factors` (None if all are 1).

  The divisors depend only on factor, low_freq_factor / context and
  high_freq_factor / context, so `original_context` is taken as given. In the blended
  band 1/divisor is linear in the inverse frequency; a line fit there gives the two
  frequency factors.
  """
  factors = np.asarray(factors, dtype=np.float64).reshape(-1)
  if factors.shape != (head_dim // 2,):
    raise CheckpointError(f"{source}: rope_freqs has {factors.size} values; expected "
                          f"head_dim/2 = {head_dim // 2}")
  if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
    return None
  factor = float(factors.max())
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  band = (factors > 1 + 1e-4 * factor) & (factors < factor * (1 - 1e-4))
  if band.sum() >= 2:
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_freq[band], smooth, 1)
    span = original_context / (2 * np.pi * slope)  # high_freq_factor - low_freq_factor
    low = -intercept * span
    high = low + span
  else:
    low, high = 1.0, 4.0  # Llama 3 defaults; too few blended values to fit, so verify them
  scaling = RopeScaling(factor=_snap(factor), low_freq_factor=_snap(float(low)),
                        high_freq_factor=_snap(float(high)),
                        original_max_position_embeddings=int(original_context))
  rebuilt = llama3_rope_factors(scaling, theta, head_dim)
  if not np.allclose(rebuilt, factors, rtol=1e-4, atol=0):
    raise ConfigError(f"{source}: rope_freqs {np.round(factors, 4).tolist()} is not a llama3 "
                      f"RoPE scaling (closest fit {scaling} differs by up to "
                      f"{np.max(np.abs(rebuilt / factors - 1)):.2e} relative); only llama3 "
                      f"scaling is supported")
  return scaling


def _rope_scaling(reader, arch: str, tensors: dict, theta: float, head_dim: int,
                  path: str) -> RopeScaling | None:
  kind = _scalar(reader, f"{arch}.rope.scaling.type", path, "none")
  factor = float(_scalar(reader, f"{arch}.rope.scaling.factor", path, 1.0))
  if kind not in ("none", "linear") or (kind == "linear" and factor != 1.0):
    raise ConfigError(f"{path}: rope scaling type {kind!r} (factor {factor}) is not supported; "
                      f"allowed: none, or llama3 stored as {_ROPE_FREQS}")
  if _ROPE_FREQS not in tensors:
    return None
  context = int(_scalar(reader, f"{arch}.rope.scaling.original_context_length", path,
                        _LLAMA3_ORIGINAL_CONTEXT))
  factors = _dequantize(tensors[_ROPE_FREQS], path)
  return scaling_from_rope_freqs(factors, theta, head_dim, context, source=path)


# ----------------------------------------------------------------------------- config

def _head_dim(reader, arch: str, hidden: int, heads: int, path: str) -> int:
  key_length = _scalar(reader, f"{arch}.attention.key_length", path, None)
  value_length = _scalar(reader, f"{arch}.attention.value_length", path, key_length)
  rotary = _scalar(reader, f"{arch}.rope.dimension_count", path, None)
  head_dim = key_length or rotary or hidden // heads
  for key, value in (("attention.value_length", value_length), ("rope.dimension_count", rotary)):
    if value is not None and value != head_dim:
      raise ConfigError(f"{path}: {arch}.{key}={value} differs from head_dim={head_dim}; "
                        f"kvjax needs full-width rotary and equal key/value head sizes")
  return int(head_dim)


def _config(reader, arch: str, tensors: dict, path: str, dtype: str | None) -> ModelConfig:
  if "token_embd.weight" not in tensors:
    raise CheckpointError(f"{path}: missing tensor token_embd.weight")
  hidden = int(_scalar(reader, f"{arch}.embedding_length", path))
  heads = int(_scalar(reader, f"{arch}.attention.head_count", path))
  head_dim = _head_dim(reader, arch, hidden, heads, path)
  theta = _float32_value(_scalar(reader, f"{arch}.rope.freq_base", path, 10000.0))
  name = _meta(reader, "general.name", path, "") or os.path.splitext(os.path.basename(path))[0]
  return ModelConfig(
      architecture=arch,
      # The embedding's rows are the model's vocabulary (the token list may be shorter).
      vocab_size=_logical_shape(tensors["token_embd.weight"])[0],
      hidden_size=hidden,
      intermediate_size=int(_scalar(reader, f"{arch}.feed_forward_length", path)),
      num_layers=int(_scalar(reader, f"{arch}.block_count", path)),
      num_heads=heads,
      num_kv_heads=int(_scalar(reader, f"{arch}.attention.head_count_kv", path, heads)),
      head_dim=head_dim,
      max_position_embeddings=int(_scalar(reader, f"{arch}.context_length", path)),
      rope_theta=theta,
      rope_scaling=_rope_scaling(reader, arch, tensors, theta, head_dim, path),
      rms_norm_eps=_float32_value(
          _scalar(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
      tie_embeddings="output.weight" not in tensors,
      qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
      dtype=dtype or "float32",
      name=str(name))


def read_gguf(path: str, *, dtype: str | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """(config, canonical params) of a llama or qwen2 GGUF file, dequantized.

  dtype: None -> float32, or "bfloat16".
  """
  config, tensors = iter_gguf(path, dtype=dtype)
  return config, dict(tensors)


def iter_gguf(path: str, *, dtype: str | None = None
              ) -> tuple[ModelConfig, Iterator[tuple[str, np.ndarray]]]:
  """(config, canonical tensors one at a time) of a llama or qwen2 GGUF file.

  The file stays memory-mapped while the iterator runs; each tensor is dequantized only
  when the iterator reaches it, so a consumer that writes it away holds one tensor.
  """
  path = os.fspath(path)
  reader = _open(path)
  arch = _meta(reader, "general.architecture", path)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ConfigError(f"{path}: general.architecture={arch!r} is not supported; allowed: "
                      f"{SUPPORTED_ARCHITECTURES}")
  tensors = {t.name: t for t in reader.tensors}
  config = _config(reader, arch, tensors, path, dtype)
  by_hf_name = {hf_name(n): t for n, t in tensors.items() if n != _ROPE_FREQS}

  def get(name: str) -> np.ndarray:
    weight = _dequantize(by_hf_name[name], path)
    if arch == "llama" and ".self_attn.q_proj." in name:
      return unpermute_rows(weight, config.num_heads)
    if arch == "llama" and ".self_attn.k_proj." in name:
      return unpermute_rows(weight, config.num_kv_heads)
    return weight

  return config, iter_canonical_params(get, by_hf_name, config, source=path, shown=_gguf_name)
