"""Static model configuration (hashable: safe as a jit static argument)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kvjax.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 style frequency-dependent RoPE scaling ("llama3" rope_type)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Llama-family or Qwen2 decoder."""
  architecture: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False
  dtype: str = "float32"
  name: str = ""

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ConfigError(f"architecture={self.architecture!r} is not supported; "
                        f"allowed: {SUPPORTED_ARCHITECTURES}")
    if self.dtype not in SUPPORTED_DTYPES:
      raise ConfigError(f"dtype={self.dtype!r} is not supported; allowed: {SUPPORTED_DTYPES}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field}={value!r} must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} must be a multiple of "
                        f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
    data = dict(data)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ConfigError(f"unknown kvjax config fields {unknown}; allowed: {sorted(known)}")
    if data.get("rope_scaling") is not None:
      data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
    try:
      return cls(**data)
    except TypeError as e:
      raise ConfigError(f"incomplete kvjax config: {e}") from None

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    return cls.from_dict(json.loads(text))
