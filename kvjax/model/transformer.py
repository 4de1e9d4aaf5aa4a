"""Llama-family / Qwen2 decoder as Flax NNX modules.

Modules only define parameters and the math of one forward pass. Everything stateful (the
KV cache) is passed in and returned, so `forward` below is a pure function of
(params, tokens, cache) that jit can trace once per shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.cache import compress, kv_cache
from kvjax.config import ModelConfig
from kvjax.methods import base as methods_base
from kvjax.model import attention, kernels, rope

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
    bias = lambda heads: (heads, hd) if cfg.qkv_bias else None
    self.q = Dense("btd,dhk->bthk", (d, h, hd), bias_shape=bias(h), dtype=dtype, rngs=rngs)
    self.k = Dense("btd,dhk->bthk", (d, k, hd), bias_shape=bias(k), dtype=dtype, rngs=rngs)
    self.v = Dense("btd,dhk->bthk", (d, k, hd), bias_shape=bias(k), dtype=dtype, rngs=rngs)
    self.o = Dense("bthk,hkd->btd", (h, hd, d), dtype=dtype, rngs=rngs)

  def __call__(self, x, positions, layer_cache, inv_freq, layer_index: int = 0,
               plan: compress.CompressionPlan | None = None, lengths=None):
    raw_q = self.q(x)
    q = rope.apply_rope(raw_q, positions, inv_freq)
    k = rope.apply_rope(self.k(x), positions, inv_freq).transpose(0, 2, 1, 3)  # [B, K, T, D]
    v = self.v(x).transpose(0, 2, 1, 3)
    method = getattr(plan, "method", None)  # a PlanSet (prefill only) has none
    decoding = x.shape[1] == 1
    if plan is not None and plan.compress:
      out, layer_cache = self._attend_and_compress(q, raw_q, k, v, positions, layer_cache,
                                                   layer_index, plan, lengths)
    elif isinstance(layer_cache, kv_cache.FlatLayerCache):
      layer_cache = kv_cache.write_flat(layer_cache, k, v, positions)
      attend_flat = (kernels.decode_attend_flat if decoding and kernels.use_pallas()
                     else attention.attend_flat)
      out = attend_flat(q, layer_cache.keys, layer_cache.values, positions,
                        layer_cache.positions, layer_cache.heads, k.shape[1])
    elif method is not None and method.decode_time and decoding:
      # Decode-time eviction: attend over the cache plus the new token, then let the method
      # pick which slot the new token overwrites.
      attend_new = (kernels.decode_attend_with_new_token if kernels.use_pallas()
                    else attention.attend_with_new_token)
      out, probs, own = attend_new(
          q, layer_cache.keys, layer_cache.values, positions, layer_cache.positions, k, v)
      layer_cache = compress.evict_and_insert(method, layer_cache, k, v, positions[:, 0],
                                              probs, own, lengths)
    else:
      accumulate = (layer_cache.scores is not None and method is not None
                    and method.needs_column_sums)
      layer_cache = kv_cache.write(layer_cache, k, v, positions)
      if decoding and not accumulate and kernels.use_pallas():
        out = kernels.decode_attend(q, layer_cache.keys, layer_cache.values, positions,
                                    layer_cache.positions)
      else:
        out = attention.attend(q, layer_cache.keys, layer_cache.values, positions,
                               layer_cache.positions, column_sums=accumulate)
      if accumulate:  # accumulated-attention state keeps counting appended queries
        out, sums = out
        layer_cache = layer_cache.replace(scores=method.accumulate(layer_cache.scores, sums))
    return self.o(out), layer_cache

  def _attend_and_compress(self, q, raw_q, k, v, positions, layer_cache, layer_index, plan,
                           lengths):
    """Attends over the kept slots plus this chunk, then compacts them to the layer budget.

    With a PlanSet the attention runs once and each plan compacts its own copy: the layer
    returns a tuple of caches, one per plan.
    """
    plans = plan.plans if isinstance(plan, compress.PlanSet) else (plan,)
    needs_sums = (plan.needs_column_sums if isinstance(plan, compress.PlanSet)
                  else plan.method.needs_column_sums)
    cand = compress.candidates(layer_cache, k, v, positions)
    out = attention.attend(q, cand.keys, cand.values, positions, cand.positions,
                           column_sums=needs_sums)
    sums = None
    if needs_sums:
      out, sums = out
    b, kv, s = cand.positions.shape
    inputs = methods_base.LayerInputs(
        config=self.config, layer=layer_index, queries=q, raw_queries=raw_q,
        query_positions=positions, keys=cand.keys, values=cand.values,
        key_positions=cand.positions, lengths=lengths, column_sums=sums,
        slot_scores=(cand.scores if cand.scores is not None
                     else jnp.zeros((b, kv, s), jnp.float32)),
        slot_history=cand.history)
    caches = []
    for p in plans:
      if p is None:  # the uncompressed cache (a PlanSet's full-cache baseline)
        caches.append(kv_cache.append_room(cand, plan.room))
        continue
      keep = p.budgets[layer_index]
      if p.method.headwise:
        new = compress.compress_headwise(p.method, cand, inputs, keep, p.method.safeguard(keep))
      else:
        new = compress.compress_dense(p.method, cand, inputs, keep)
      caches.append(kv_cache.append_room(new, p.room))
    return out, (tuple(caches) if isinstance(plan, compress.PlanSet) else caches[0])


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
    self.attn = Attention(cfg, dtype, rngs)
    self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.mlp = MLP(cfg, dtype, rngs)

  def __call__(self, x, positions, layer_cache, inv_freq, layer_index=0, plan=None,
               lengths=None):
    attn_out, layer_cache = self.attn(self.attn_norm(x), positions, layer_cache, inv_freq,
                                      layer_index, plan, lengths)
    x = x + attn_out
    return x + self.mlp(self.mlp_norm(x)), layer_cache


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

  def __call__(self, tokens, token_mask, cache: kv_cache.Cache, logits: str = "all",
               plan: compress.CompressionPlan | None = None):
    """tokens/token_mask [B, T] -> (logits, new cache).

    Masked-out tokens (padding) take no position and are stored as empty slots. New
    tokens continue each sequence at cache.lengths. logits="all" gives [B, T, V];
    "last" gives [B, V] at each row's last real token. `plan` (static) says how a
    compression method treats this chunk: compress to budgets, or append/evict.
    """
    token_mask = token_mask.astype(bool)
    positions = cache.lengths[:, None] + jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1
    positions = jnp.where(token_mask, positions, kv_cache.EMPTY_POSITION)
    inv_freq = rope.inverse_frequencies(self.config)
    lengths = cache.lengths + token_mask.sum(axis=1, dtype=jnp.int32)
    x = self.embed(tokens)
    new_layers = []
    for index, (block, layer_cache) in enumerate(zip(self.layers, cache.layers)):
      x, layer_cache = block(x, positions, layer_cache, inv_freq, index, plan, lengths)
      new_layers.append(layer_cache)
    if logits == "last":
      last = x.shape[1] - 1 - jnp.argmax(token_mask[:, ::-1], axis=1)
      x = jnp.take_along_axis(x, last[:, None, None], axis=1)
    elif logits != "all":
      raise ValueError(f"logits={logits!r}; allowed: 'all', 'last'")
    x = self.final_norm(x)
    out = (self.embed.attend(x) if self.lm_head is None
           else self.lm_head(x).astype(jnp.float32))
    if logits == "last":
      out = out[:, 0]
    if isinstance(plan, compress.PlanSet):  # one cache per plan
      return out, tuple(kv_cache.Cache(layers=tuple(layer[i] for layer in new_layers),
                                       lengths=lengths) for i in range(len(plan.plans)))
    return out, kv_cache.Cache(layers=tuple(new_layers), lengths=lengths)


def forward(graphdef, params, tokens, token_mask, cache, logits: str = "all", plan=None):
  """Pure forward pass: (params, tokens, cache) -> (logits, cache)."""
  return nnx.merge(graphdef, params)(tokens, token_mask, cache, logits, plan)
