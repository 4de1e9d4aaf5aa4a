"""Static model configuration (hashable: safe as a jit static argument)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from kvjax import validation
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

  def __post_init__(self):
    # Only finite: the GGUF reader builds candidates from fitted values before verifying them.
    for field in ("factor", "low_freq_factor", "high_freq_factor"):
      object.__setattr__(self, field, validation.number(
          f"rope_scaling.{field}", getattr(self, field), error=ConfigError))
    object.__setattr__(self, "original_max_position_embeddings", validation.integer(
        "rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings,
        1, validation.INT32_MAX, error=ConfigError))


LATENT_ROPE_MODES = ("decoupled", "rebuilt")


@dataclasses.dataclass(frozen=True)
class LatentAttention:
  """Multi-head latent attention (MLA, as X-EcoMLA upcycles a GQA model into): each token
  caches one latent of `kv_rank` numbers per layer instead of its K key and value heads.

  rope="decoupled" (DeepSeek's, X-EcoMLA's): a head's query and key split into
  head_dim - rope_dim position-free dimensions, whose keys are up-projected from the latent
  (so the up-projection folds into the query: decode reads only the latent), and rope_dim
  rotary ones, whose key is one extra vector shared by every head and cached beside the
  latent: kv_rank + rope_dim numbers per token.
  rope="rebuilt" (rope_dim 0): every head's key is up-projected from the latent, then
  rotated as in the original model, so nothing folds into the query: attention rebuilds
  the keys from the cached latents (exact at full rank, kv_rank = 2 K head_dim).
  query_rank: a low-rank query projection (None: the full one)."""
  kv_rank: int
  rope_dim: int = 0
  rope: str = "decoupled"
  query_rank: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "kv_rank", validation.integer(
        "latent.kv_rank", self.kv_rank, 1, validation.INT32_MAX, error=ConfigError))
    object.__setattr__(self, "rope_dim", validation.integer(
        "latent.rope_dim", self.rope_dim, 0, validation.INT32_MAX, error=ConfigError))
    if self.rope not in LATENT_ROPE_MODES:
      raise ConfigError(f"latent.rope={self.rope!r}; allowed: {LATENT_ROPE_MODES}")
    if self.query_rank is not None:
      object.__setattr__(self, "query_rank", validation.integer(
          "latent.query_rank", self.query_rank, 1, validation.INT32_MAX, error=ConfigError))
    if self.rope == "rebuilt" and self.rope_dim:
      raise ConfigError(f"latent.rope_dim={self.rope_dim} must be 0 with rope='rebuilt' "
                        f"(every key dimension is rotated)")
    if self.rope == "decoupled" and (self.rope_dim < 2 or self.rope_dim % 2):
      raise ConfigError(f"latent.rope_dim={self.rope_dim} must be even and >= 2 with "
                        f"rope='decoupled' (rotary embeddings rotate pairs)")

  @property
  def cached_width(self) -> int:
    """Numbers cached per token and layer."""
    return self.kv_rank + self.rope_dim


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
  # More value heads than key heads (Sigma's DiffQKV; None = num_kv_heads): num_kv_heads
  # is then the key heads, the cache's head axis, and each stores the values of
  # num_value_heads / num_kv_heads heads side by side.
  num_value_heads: int | None = None
  # Multi-head latent attention (an X-EcoMLA student; None = the attention above).
  latent: LatentAttention | None = None

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ConfigError(f"architecture={self.architecture!r} is not supported; "
                        f"allowed: {SUPPORTED_ARCHITECTURES}")
    if self.dtype not in SUPPORTED_DTYPES:
      raise ConfigError(f"dtype={self.dtype!r} is not supported; allowed: {SUPPORTED_DTYPES}")
    # Checked, then stored as plain Python values (a numpy scalar would not serialize).
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings"):
      object.__setattr__(self, field, validation.integer(
          field, getattr(self, field), 1, validation.INT32_MAX, error=ConfigError))
    for field in ("rope_theta", "rms_norm_eps"):
      object.__setattr__(self, field, validation.number(
          field, getattr(self, field), 0, low_open=True, error=ConfigError))
    for field in ("tie_embeddings", "qkv_bias"):
      object.__setattr__(self, field, validation.boolean(field, getattr(self, field),
                                                         error=ConfigError))
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ConfigError(f"rope_scaling={validation.show(self.rope_scaling)} must be None or "
                        f"a RopeScaling")
    if not isinstance(self.name, str):
      raise ConfigError(f"name={validation.show(self.name)} must be a str")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} must be a multiple of "
                        f"num_kv_heads={self.num_kv_heads}")
    if self.num_value_heads is not None:
      object.__setattr__(self, "num_value_heads", validation.integer(
          "num_value_heads", self.num_value_heads, 1, validation.INT32_MAX, error=ConfigError))
      if self.num_value_heads % self.num_kv_heads or self.num_heads % self.num_value_heads:
        raise ConfigError(f"num_value_heads={self.num_value_heads} must be a multiple of "
                          f"num_kv_heads={self.num_kv_heads} (the key heads) and divide "
                          f"num_heads={self.num_heads}")
      if self.num_value_heads == self.num_kv_heads:   # one spelling per architecture
        object.__setattr__(self, "num_value_heads", None)
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.latent is not None:
      if not isinstance(self.latent, LatentAttention):
        raise ConfigError(f"latent={validation.show(self.latent)} must be None or a "
                          f"LatentAttention")
      if self.latent.rope_dim >= self.head_dim:
        raise ConfigError(f"latent.rope_dim={self.latent.rope_dim} must be below "
                          f"head_dim={self.head_dim} (the rest are position-free)")
      if self.num_value_heads is not None:
        raise ConfigError("latent attention upcycles one value head per key head; this "
                          f"config has num_value_heads={self.num_value_heads}")

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def value_heads(self) -> int:
    return self.num_kv_heads if self.num_value_heads is None else self.num_value_heads

  @property
  def values_per_key_head(self) -> int:
    """Value heads stored beside each key head (1 unless DiffQKV)."""
    return self.value_heads // self.num_kv_heads

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
    if not isinstance(data, dict):
      raise ConfigError(f"a kvjax config must be a JSON object of fields; got "
                        f"{type(data).__name__} {validation.show(data)}")
    data = dict(data)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ConfigError(f"unknown kvjax config fields {unknown}; allowed: {sorted(known)}")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in data and f.default is dataclasses.MISSING)
    if missing:
      raise ConfigError(f"incomplete kvjax config: missing fields {missing}")
    scaling = data.get("rope_scaling")
    if scaling is not None:
      allowed = sorted(f.name for f in dataclasses.fields(RopeScaling))
      if not isinstance(scaling, dict) or set(scaling) - set(allowed):
        raise ConfigError(f"rope_scaling={validation.show(scaling)} must be null or an "
                          f"object with fields from {allowed}")
      data["rope_scaling"] = RopeScaling(**scaling)
    latent = data.get("latent")
    if latent is not None:
      allowed = sorted(f.name for f in dataclasses.fields(LatentAttention))
      if not isinstance(latent, dict) or set(latent) - set(allowed):
        raise ConfigError(f"latent={validation.show(latent)} must be null or an object "
                          f"with fields from {allowed}")
      data["latent"] = LatentAttention(**latent)
    return cls(**data)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str, source: str | os.PathLike = "") -> "ModelConfig":
    """The config in JSON `text`; errors name `source` (the file it came from), if given."""
    where = f"{os.fspath(source)}: " if source else ""
    try:
      data = json.loads(text)
    except ValueError as e:
      raise ConfigError(f"{where}not valid JSON ({e})") from None
    try:
      return cls.from_dict(data)
    except ConfigError as e:
      raise ConfigError(f"{where}{e}") from None
