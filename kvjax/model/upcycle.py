"""X-EcoMLA's initialisation: a GQA model upcycled into multi-head latent attention (MLA)
by SVD of its pretrained projections (Li et al., 2025, arXiv 2503.11132; official code
AMD-AGI/AMD-Hybrid-Models, `X-EcoMLA/mla/hybrid_mla_layer.py`: `re_init_q`, `re_init_kv`).

Reading, per layer, with W_q [H D, d], W_k and W_v [K D, d] acting on a token's hidden x:
  * decoupled RoPE (the paper's): W_k' and W_v' repeat each KV head for the G query heads
    that read it; W_kv = [W_k'; W_v'] = U S V^T; the latent is c = S_r V_r^T x (kv_down),
    every head's position-free key (its first D - d_r dimensions) and its value are rows
    of U_r (key_up, value_up), and the shared rotary key is the mean over the KV heads of
    W_k's last d_r rows of each head (kv_down's extra d_r outputs). The query keeps its
    first D - d_r dimensions position-free and rotates its last d_r (their own RoPE
    frequencies): the initial model is not the original one, so it is distilled
    (`kvjax.training.xecomla`). With a query rank r_q, W_q = U S V^T gives q_down =
    S_r V_r^T and q_up = U_r.
  * rebuilt RoPE (kvjax's exactness check): [W_k; W_v] = U S V^T without repeats; keys
    are rebuilt from the latent per KV head and rotated as the original: exact once the
    rank reaches [W_k; W_v]'s (2 K D when d >= 2 K D).
Biases (Qwen2): the query's move to q (q_up); the values' to value_up (sum_t p_t = 1, so
W_uv sum_t p_t c_t + b_v is exact); the shared rotary key takes the mean of the KV heads'
last d_r key biases; a decoupled head's position-free key bias is dropped (it adds one
logit to every key of a query: softmax-invariant), a rebuilt head keeps its key bias.
The paper's dynamic rank (an SVD energy threshold per layer) is not implemented: kvjax's
latent rank is one number for every layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvjax.config import LatentAttention
from kvjax.errors import ConfigError
from kvjax.model.model import Model, from_flat_params, to_flat_params
from kvjax.ops.host import host_array


def _top(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """(U_r [m, r], S_r V_r^T [r, n]) of `matrix` [m, n] (float64 SVD)."""
  u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
  if rank > len(s):
    raise ConfigError(f"rank {rank} exceeds the projection's {len(s)} singular values")
  return u[:, :rank], s[:rank, None] * vt[:rank]


def check_latent(config, spec: LatentAttention) -> None:
  """Refuses latent attention that this model cannot be upcycled into."""
  if config.latent is not None:
    raise ConfigError("the model already has latent attention")
  if config.num_value_heads is not None:
    raise ConfigError(f"latent attention upcycles one value head per key head; this model "
                      f"has num_value_heads={config.num_value_heads} (DiffQKV)")
  d, k, hd = config.hidden_size, config.num_kv_heads, config.head_dim
  full = min(d, 2 * k * hd)
  if spec.kv_rank > full:
    raise ConfigError(f"kv_rank={spec.kv_rank} exceeds the rank of the stacked key and "
                      f"value projections, min(hidden {d}, 2 x {k} KV heads x {hd}) = {full}")
  if spec.query_rank is not None and spec.query_rank > min(d, config.num_heads * hd):
    raise ConfigError(f"query_rank={spec.query_rank} exceeds min(hidden {d}, "
                      f"{config.num_heads} heads x {hd}) = {min(d, config.num_heads * hd)}")
  if spec.rope_dim >= hd:
    raise ConfigError(f"rope_dim={spec.rope_dim} must be below head_dim={hd}")


def upcycled_layer(config, spec: LatentAttention, attn: dict) -> dict:
  """One layer's latent-attention parameters from its GQA ones (`attn`: the flat names
  under `layers.i.attn.`, numpy arrays in the kvjax layout, kernels [d, heads, D])."""
  d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  g, r, dr = h // k, spec.kv_rank, spec.rope_dim
  rows = lambda kernel: kernel.reshape(d, -1).T                   # [heads D, d]
  wq, wk, wv = rows(attn["q.kernel"]), rows(attn["k.kernel"]), rows(attn["v.kernel"])
  out = {"o.kernel": attn["o.kernel"]}
  if spec.query_rank is None:
    out["q.kernel"] = attn["q.kernel"]
    query = "q"
  else:
    u, down = _top(wq, spec.query_rank)
    out["q_down.kernel"], out["q_up.kernel"] = down.T, u.T.reshape(spec.query_rank, h, hd)
    query = "q_up"
  if "q.bias" in attn:
    out[f"{query}.bias"] = attn["q.bias"]
  if spec.rope == "rebuilt":
    u, down = _top(np.concatenate([wk, wv]), r)
    out["kv_down.kernel"] = down.T
    out["key_up.kernel"] = u[:k * hd].T.reshape(r, k, hd)
    out["value_up.kernel"] = u[k * hd:].T.reshape(r, k, hd)
    if "k.bias" in attn:
      out["kv_down.bias"] = np.zeros((r,), np.float64)
      out["key_up.bias"], out["value_up.bias"] = attn["k.bias"], attn["v.bias"]
    return out
  repeat = lambda w: np.repeat(w.reshape(k, hd, d), g, axis=0).reshape(h * hd, d)
  u, down = _top(np.concatenate([repeat(wk), repeat(wv)]), r)     # u [2 H D, r]
  keys_u = u[:h * hd].reshape(h, hd, r)
  rope_key = wk.reshape(k, hd, d)[:, hd - dr:].mean(0)            # [d_r, d]
  out["kv_down.kernel"] = np.concatenate([down, rope_key]).T      # [d, r + d_r]
  out["key_up.kernel"] = keys_u[:, :hd - dr].transpose(2, 0, 1)  # [r, H, D - d_r]
  out["value_up.kernel"] = u[h * hd:].reshape(h, hd, r).transpose(2, 0, 1)
  if "k.bias" in attn:
    out["kv_down.bias"] = np.concatenate([np.zeros((r,)), attn["k.bias"][:, hd - dr:].mean(0)])
    out["value_up.bias"] = np.repeat(attn["v.bias"], g, axis=0)
  return out


def upcycle(model: Model, kv_rank: int, rope_dim: int = 0, rope: str = "decoupled",
            query_rank: int | None = None) -> Model:
  """The model with every attention layer replaced by latent attention initialised from
  its weights (the module docstring says how); MLPs, norms, embeddings and o_proj are
  copied. The config's name gets an "-mla" suffix with the ranks. The student is on one
  device: place it with kvjax.sharding.shard_model for a mesh."""
  spec = LatentAttention(kv_rank=kv_rank, rope_dim=rope_dim, rope=rope,
                         query_rank=query_rank)
  config = model.config
  check_latent(config, spec)
  # host_array: a teacher sharded over several processes is gathered, not refused.
  flat = {name: host_array(value).astype(np.float32)
          for name, value in to_flat_params(model).items()}
  out = {name: value for name, value in flat.items() if ".attn." not in name}
  for layer in range(config.num_layers):
    prefix = f"layers.{layer}.attn."
    attn = {name[len(prefix):]: value for name, value in flat.items()
            if name.startswith(prefix)}
    out.update({prefix + name: np.asarray(value, np.float32)
                for name, value in upcycled_layer(config, spec, attn).items()})
  suffix = f"-mla{kv_rank}+{rope_dim}" if rope == "decoupled" else f"-mla{kv_rank}"
  new_config = dataclasses.replace(config, latent=spec, name=config.name + suffix)
  return from_flat_params(new_config, out, model.tokenizer, source="X-EcoMLA upcycling")


def cache_numbers_per_token(config) -> int:
  """Numbers (keys, values, latents) one token caches per layer, positions aside."""
  if config.latent is not None:
    return config.latent.cached_width
  return config.num_kv_heads * config.head_dim * (1 + config.values_per_key_head)
