"""Llama-family / Qwen2 decoder as Flax NNX modules.

Modules only define parameters and the math of one forward pass. Everything stateful (the
KV cache) is passed in and returned, so `forward` below is a pure function of
(params, tokens, cache) that jit can trace once per shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.cache.kv_cache import EMPTY_POSITION, Cache, NewTokens
from kvjax.cache.cross_layer import own_layer, view_layer
from kvjax.cache.policy import APPEND, LayerStep, begin as policy_begin
from kvjax.config import ModelConfig
from kvjax.ops import rope
from kvjax.ops.pieces import token_chunked

_init = nnx.initializers.normal(0.02)


class Dense(nnx.Module):
  """x @ kernel (+ bias), with an einsum so kernels keep head axes, e.g. [d, heads, head_dim]."""

  def __init__(self, equation: str, kernel_shape, *, bias_shape=None, dtype, rngs: nnx.Rngs):
    self.equation = equation
    self.kernel = nnx.Param(_init(rngs.params(), kernel_shape, dtype))
    self.bias = nnx.Param(jnp.zeros(bias_shape, dtype)) if bias_shape else None

  def __call__(self, x):
    y = jnp.einsum(self.equation, x, self.kernel[...])
    return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...] * normed.astype(x.dtype)  # cast before scaling, as HF does


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    self.config = cfg
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    v = cfg.value_heads
    bias = lambda heads: (heads, hd) if cfg.qkv_bias else None
    self.q = Dense("btd,dhk->bthk", (d, h, hd), bias_shape=bias(h), dtype=dtype, rngs=rngs)
    self.k = Dense("btd,dhk->bthk", (d, k, hd), bias_shape=bias(k), dtype=dtype, rngs=rngs)
    self.v = Dense("btd,dhk->bthk", (d, v, hd), bias_shape=bias(v), dtype=dtype, rngs=rngs)
    self.o = Dense("bthk,hkd->btd", (h, hd, d), dtype=dtype, rngs=rngs)

  def __call__(self, x, positions, layer_cache, inv_freq, layer_index: int, policy,
               lengths, method_params=None, tokens=None):
    """Projects q/k/v, lets the layer cache attend and the policy store the new tokens
    (with their ids, `tokens` [B, T], for caches that index text: SentenceKV)."""
    raw_q = self.q(x)
    q = rope.apply_rope(raw_q, positions, inv_freq)
    k = rope.apply_rope(self.k(x), positions, inv_freq).transpose(0, 2, 1, 3)  # [B, K, T, D]
    v = self.v(x)
    # DiffQKV: the value heads of key head j (j*r ... j*r + r-1) stored side by side.
    v = v.reshape(v.shape[:2] + (k.shape[1], -1)).transpose(0, 2, 1, 3)  # [B, K, T, r * D]
    new = NewTokens(keys=k, values=v, positions=positions, tokens=tokens)
    layer_cache, pending, want = policy.prepare(layer_index, layer_cache, new)
    out, stats = layer_cache.attend(q, positions, pending, want)
    step = LayerStep(config=self.config, queries=q, raw_queries=raw_q, new=new,
                     lengths=lengths, params=method_params)
    return self.o(out), policy.update(layer_index, layer_cache, step, stats)


class LatentAttentionLayer(nnx.Module):
  """Multi-head latent attention (an X-EcoMLA student; `ModelConfig.latent`): the layer
  caches one latent per token (kvjax.cache.latent). Parameters:
    q [d, H, D] (or q_down [d, r_q] and q_up [r_q, H, D] with a query rank), kv_down
    [d, r + d_r], key_up [r, H, D - d_r] (decoupled) or [r, K, D] (rebuilt), value_up
    [r, H or K, D], o [H, D, d]. Biases (Qwen2): on the query, on the shared rotary key
    (kv_down's last d_r), on value_up, and on key_up when rebuilt; a decoupled head's
    position-free key bias would add the same logit to every key of a query (softmax-
    invariant), so it has none.
  Decoupled: query head h scores a slot by q_h,nope . W_uk,h c + RoPE(q_h,rope) .
  RoPE(k_rope), the first folded into the query (W_uk,h^T q_h,nope), scaled by D^-1/2 as
  the original; its output is W_uv,h sum_t p_t c_t + b_v,h. RoPE here rotates d_r
  dimensions with their own frequencies (theta^(-2i/d_r), as DeepSeek's MLA)."""

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    self.config = cfg
    spec = cfg.latent
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    r, dr = spec.kv_rank, spec.rope_dim
    decoupled = spec.rope == "decoupled"
    up = h if decoupled else k
    bias = lambda shape: shape if cfg.qkv_bias else None
    if spec.query_rank is None:
      self.q = Dense("btd,dhk->bthk", (d, h, hd), bias_shape=bias((h, hd)), dtype=dtype,
                     rngs=rngs)
    else:
      self.q_down = Dense("btd,dr->btr", (d, spec.query_rank), dtype=dtype, rngs=rngs)
      self.q_up = Dense("btr,rhk->bthk", (spec.query_rank, h, hd), bias_shape=bias((h, hd)),
                        dtype=dtype, rngs=rngs)
    self.kv_down = Dense("btd,dr->btr", (d, r + dr), bias_shape=bias((r + dr,)), dtype=dtype,
                         rngs=rngs)
    self.key_up = Dense("btr,rhk->bthk", (r, up, hd - dr),
                        bias_shape=None if decoupled else bias((k, hd)), dtype=dtype,
                        rngs=rngs)
    self.value_up = Dense("bthr,rhk->bthk", (r, up, hd), bias_shape=bias((up, hd)), dtype=dtype,
                          rngs=rngs)
    self.o = Dense("bthk,hkd->btd", (h, hd, d), dtype=dtype, rngs=rngs)

  def _queries(self, x):
    if self.config.latent.query_rank is None:
      return self.q(x)
    return self.q_up(self.q_down(x))

  def __call__(self, x, positions, layer_cache, inv_freq, layer_index: int, policy,
               lengths, method_params=None, tokens=None):
    del tokens   # a latent cache stores no text index
    spec, hd = self.config.latent, self.config.head_dim
    raw_q = self._queries(x)
    latent = self.kv_down(x)                                              # [B, T, r + d_r]
    if spec.rope == "rebuilt":
      q = rope.apply_rope(raw_q, positions, inv_freq)
      new = NewTokens(keys=latent[:, None], values=latent[:, None], positions=positions)
      layer_cache, pending, want = policy.prepare(layer_index, layer_cache, new)
      check_latent_policy(pending)
      view = layer_cache.rebuilt(self.key_up.kernel[...], _value(self.key_up.bias),
                                 self.value_up.kernel[...], _value(self.value_up.bias),
                                 inv_freq)
      out, stats = view.attend(q, positions, None, want)
    else:
      rope_freq = rope.inverse_frequencies(self.config, spec.rope_dim)
      r = spec.kv_rank
      q_rope = rope.apply_rope(raw_q[..., hd - spec.rope_dim:], positions, rope_freq)
      k_rope = rope.apply_rope(latent[:, :, None, r:], positions, rope_freq)[:, :, 0]
      folded = jnp.einsum("bthn,rhn->bthr", raw_q[..., :hd - spec.rope_dim],
                          self.key_up.kernel[...])
      # The cache scales logits by width^-1/2; the original model by D^-1/2.
      q = jnp.concatenate([folded, q_rope], axis=-1) * ((r + spec.rope_dim) / hd) ** 0.5
      stored = jnp.concatenate([latent[..., :r], k_rope], axis=-1)[:, None]
      new = NewTokens(keys=stored, values=stored, positions=positions)
      layer_cache, pending, want = policy.prepare(layer_index, layer_cache, new)
      check_latent_policy(pending)
      weighted, stats = layer_cache.attend(q.astype(x.dtype), positions, None, want)
      out = self.value_up(weighted[..., :r])
    step = LayerStep(config=self.config, queries=q, raw_queries=raw_q, new=new,
                     lengths=lengths, params=method_params)
    return self.o(out), policy.update(layer_index, layer_cache, step, stats)


def _value(param):
  return None if param is None else param[...]


def check_latent_policy(pending) -> None:
  """Latent layers store every token before attending (the uncompressed cache policy)."""
  if pending is not None:
    raise NotImplementedError("a latent-attention (X-EcoMLA) model runs the full latent "
                              "cache; compression policies that hold new tokens outside "
                              "the cache are not supported on it")


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate = Dense("btd,df->btf", (d, f), dtype=dtype, rngs=rngs)
    self.up = Dense("btd,df->btf", (d, f), dtype=dtype, rngs=rngs)
    self.down = Dense("btf,fd->btd", (f, d), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.attn = (Attention(cfg, dtype, rngs) if cfg.latent is None
                 else LatentAttentionLayer(cfg, dtype, rngs))
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.mlp = MLP(cfg, dtype, rngs)

  def __call__(self, x, positions, layer_cache, inv_freq, layer_index, policy, lengths,
               method_params=None, tokens=None):
    attn_out, layer_cache = self.attn(self.attn_norm(x), positions, layer_cache, inv_freq,
                                      layer_index, policy, lengths, method_params, tokens)
    x = x + attn_out
    return token_chunked(lambda y: y + self.mlp(self.mlp_norm(y)), x), layer_cache


class Embed(nnx.Module):

  def __init__(self, vocab: int, dim: int, dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(_init(rngs.params(), (vocab, dim), dtype))

  def __call__(self, tokens):
    return jnp.take(self.embedding[...], tokens, axis=0)

  def attend(self, x):
    return jnp.einsum("btd,vd->btv", x, self.embedding[...]).astype(jnp.float32)


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.config = cfg
    self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype, rngs)
    self.layers = nnx.List([Block(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.lm_head = (None if cfg.tie_embeddings else
                    Dense("btd,dv->btv", (cfg.hidden_size, cfg.vocab_size), dtype=dtype,
                          rngs=rngs))

  def __call__(self, tokens, token_mask, cache: Cache, logits: str = "all", policy=None,
               method_params=None, positions=None):
    """tokens/token_mask [B, T] -> (logits, new cache).

    Masked-out tokens (padding) take no position and are stored as empty slots. New
    tokens continue each sequence at cache.lengths, unless `positions` [B, T] int32 places
    them (tokens filling holes of a reassembled cache, kvjax.systems.chunk_cache; the
    cache then counts them as seen, lengths + their number). logits="all" gives
    [B, T, V]; "last" gives [B, V] at each row's last real token. `policy` (static; None =
    store everything) decides what each layer's cache keeps (see kvjax.cache.policy);
    `method_params` is its traced parameter pytree, if it has one.
    """
    policy = APPEND if policy is None else policy
    x, positions, lengths = self.embed_chunk(tokens, token_mask, cache.lengths, positions)
    inv_freq = rope.inverse_frequencies(self.config)
    layers = policy_begin(policy, cache.layers, tokens.shape[1])
    new_layers = []
    for index, block in enumerate(self.layers):
      # Layers may share storage across layers (MiniCache): each attends through its view
      # and stores back only what it owns.
      x, layer_cache = block(x, positions, view_layer(layers, index), inv_freq, index,
                             policy, lengths, method_params, tokens)
      new_layers.append(own_layer(layer_cache))
    return self.chunk_logits(x, token_mask, logits), policy.finish(tuple(new_layers), lengths)

  def embed_chunk(self, tokens, token_mask, cache_lengths, positions=None):
    """(hidden states [B, T, d], positions [B, T] (EMPTY_POSITION for padding), tokens seen
    after the chunk [B]) of a chunk continuing rows that have seen `cache_lengths` [B]."""
    token_mask = token_mask.astype(bool)
    if positions is None:
      positions = cache_lengths[:, None] + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1
    positions = jnp.where(token_mask, positions, EMPTY_POSITION)
    lengths = cache_lengths + token_mask.sum(axis=1, dtype=jnp.int32)
    return self.embed(tokens), positions, lengths

  def chunk_logits(self, x, token_mask, logits: str = "all"):
    """The last layer's hidden states [B, T, d] -> logits, as `__call__` returns them."""
    check_logits(logits)
    if logits == "last":
      last = x.shape[1] - 1 - jnp.argmax(token_mask.astype(bool)[:, ::-1], axis=1)
      x = jnp.take_along_axis(x, last[:, None, None], axis=1)
    x = self.final_norm(x)
    out = (self.embed.attend(x) if self.lm_head is None
           else self.lm_head(x).astype(jnp.float32))
    return out[:, 0] if logits == "last" else out


def check_logits(logits) -> None:
  """Refuses a `logits` choice other than "all" (every position) or "last"."""
  if logits not in ("all", "last"):
    raise ValueError(f"logits={logits!r}; allowed: 'all', 'last'")


def forward(graphdef, params, tokens, token_mask, cache, logits: str = "all", policy=None,
            method_params=None, positions=None):
  """Pure forward pass: (params, tokens, cache) -> (logits, cache)."""
  return nnx.merge(graphdef, params)(tokens, token_mask, cache, logits, policy,
                                     method_params, positions)


# The uncompressed forward pass one layer per call (kvjax.generation.engine compiles a
# layer once and runs it for every layer whose weights and cache have the same shapes, so
# a new prompt length compiles one layer instead of all of them).

def embed_chunk(graphdef, params, tokens, token_mask, cache_lengths):
  """`Transformer.embed_chunk` as a pure function of the whole model's params."""
  return nnx.merge(graphdef, params).embed_chunk(tokens, token_mask, cache_lengths)


def layer_forward(graphdef, params, x, positions, layer_cache, lengths, tokens=None,
                  policy=None, method_params=None):
  """One decoder layer (graphdef/params: a Block's) over a chunk of `tokens`: (x, layer
  cache). The tokens are stored uncompressed (the APPEND policy, the same at every layer),
  or by `policy`, a one-layer plan run as layer 0 (one whose work is the same at every
  layer: `Method.layerwise_prefill`), reading `method_params` (the same at every layer)."""
  block = nnx.merge(graphdef, params)
  inv_freq = rope.inverse_frequencies(block.attn.config)
  if policy is None:
    return block(x, positions, layer_cache, inv_freq, None, APPEND, lengths, None, tokens)
  return block(x, positions, layer_cache, inv_freq, 0, policy, lengths, method_params, tokens)


def chunk_logits(graphdef, params, x, token_mask, logits: str):
  """`Transformer.chunk_logits` as a pure function of the whole model's params."""
  return nnx.merge(graphdef, params).chunk_logits(x, token_mask, logits)


def layer_graphdef(graphdef, params):
  """The graph definition every decoder layer of the model shares (its params are
  `params["layers"][i]`)."""
  return nnx.split(nnx.merge(graphdef, params).layers[0])[0]
