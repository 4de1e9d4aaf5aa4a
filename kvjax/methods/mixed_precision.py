"""Mixed-precision caches: no token dropped, important tokens at high precision (MiKV, ZipVL).

Both store a prefilled context in `kvjax.cache.mixed.MixedPrecisionLayerCache`: a pool of
important tokens at `high_bits` (16 = the model's dtype) and a pool of all other tokens at
`low_bits`, quantized per token (groups of `group_size` channels; None = the whole head),
keys balanced by MiKV's per-channel outlier balancer. Tokens after the prefill (questions,
decode) are appended at full precision. After the last prefill chunk, `finalize` (host
side) trims each pool to what its fullest (row, KV head) holds, rounded up to 16 slots,
and drops the press's per-slot state, which decode does not read.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.kv_cache import Cache
from kvjax.cache.mixed import FULL_PRECISION, SLOT_BUCKET, MixedPrecisionLayerCache
from kvjax.methods import base, registry
from kvjax.ops import attention as attention_ops
from kvjax.ops.host import host_array

_HIGH_BITS = (4, 8, FULL_PRECISION)
_LOW_BITS = (2, 4, 8)


def balancer(queries, query_positions, keys, key_positions) -> jax.Array:
  """MiKV's outlier balancer [B, K, D] float32: b_c = sqrt(max_t |q_tc| / max_t |k_tc|)
  per KV head and channel, the query maximum over the group's query heads and the chunk's
  real queries, the key maximum over the filled slots. A channel where either maximum is
  zero gets 1 (nothing to balance)."""
  b, t, h, d = queries.shape
  k = keys.shape[1]
  q = jnp.where((query_positions >= 0)[:, :, None, None], jnp.abs(queries.astype(jnp.float32)),
                0.0)
  q_max = q.max(1).reshape(b, k, h // k, d).max(2)                       # [B, K, D]
  k_max = jnp.where((key_positions >= 0)[..., None], jnp.abs(keys.astype(jnp.float32)),
                    0.0).max(2)                                          # [B, K, D]
  ok = (q_max > 0) & (k_max > 0)
  return jnp.where(ok, jnp.sqrt(q_max / jnp.where(ok, k_max, 1.0)), 1.0)


@dataclasses.dataclass(frozen=True)
class _MixedPrecision(base.Method):
  """Shared checks, layout parameters, finalize and stats of the mixed-precision methods."""

  def _check_bits(self):
    base.check_choice("high_bits", self.high_bits, _HIGH_BITS)
    base.check_choice("low_bits", self.low_bits, _LOW_BITS)
    if self.low_bits >= self.high_bits:
      raise base.MethodError(f"low_bits={self.low_bits} must be below high_bits="
                             f"{self.high_bits}")
    if self.group_size is not None:
      base.check_int("group_size", self.group_size, 1)
      if self.group_size & (self.group_size - 1):
        raise base.MethodError(f"group_size={self.group_size} must be a power of two "
                               f"(or None: the whole head)")

  def group(self, head_dim: int) -> int:
    """Channels per scale/zero group for `head_dim`, checked against the packing."""
    group = head_dim if self.group_size is None else self.group_size
    for bits in (self.high_bits, self.low_bits):
      if bits != FULL_PRECISION and (head_dim % group or head_dim * bits % 32):
        raise base.MethodError(
            f"{self.name} group_size={self.group_size}, bits={bits} need a head_dim that is "
            f"a multiple of the group and of {32 // bits}; the model's head_dim is "
            f"{head_dim}")
    return group

  def _balance(self, x: base.LayerInputs) -> jax.Array:
    if not self.balance:
      return jnp.ones(x.keys.shape[:2] + x.keys.shape[3:], jnp.float32)
    return balancer(x.queries, x.query_positions, x.keys, x.key_positions)

  def _store(self, cand, x, high_index, low_index, important, state=None):
    return MixedPrecisionLayerCache.from_split(
        cand, high_index, low_index, self._balance(x), important, high_bits=self.high_bits,
        low_bits=self.low_bits, group=self.group(cand.keys.shape[-1]), state=state)

  def finalize(self, cache: Cache, config=None) -> Cache:
    del config
    return cache.replace(layers=tuple(
        layer.trimmed() if isinstance(layer, MixedPrecisionLayerCache) else layer
        for layer in cache.layers))

  def cache_stats(self, cache: Cache) -> dict:
    """Per layer: the important fraction chosen (mean over rows and KV heads of important
    tokens / context tokens), the fraction actually stored at high precision, and the
    pools' slots per head."""
    chosen, stored, high, low = [], [], [], []
    for layer in cache.layers:
      if not isinstance(layer, MixedPrecisionLayerCache):
        continue
      n_high = (host_array(layer.high.positions) >= 0).sum(-1)
      n = n_high + (host_array(layer.low.positions) >= 0).sum(-1)
      n = np.maximum(n, 1)
      chosen.append(float(np.mean(host_array(layer.important) / n)))
      stored.append(float(np.mean(n_high / n)))
      high.append(layer.high.capacity)
      low.append(layer.low.capacity)
    return {"important_ratio_per_layer": chosen, "high_precision_ratio_per_layer": stored,
            "high_precision_slots_per_layer": high, "low_precision_slots_per_layer": low,
            "high_bits": self.high_bits, "low_bits": self.low_bits}


@registry.register
@dataclasses.dataclass(frozen=True)
class MiKV(_MixedPrecision):
  """MiKV ("No Token Left Behind"): the tokens an eviction policy would drop are kept at
  `low_bits`; the ones it keeps stay at `high_bits` (16 = full precision).

  The press (any token-selecting scorer: h2o, snapkv, knorm, tova, pyramidkv, a
  sinks_window around one, ...) gives the priorities; the top `budget` slots per KV head
  (budget = compression_ratio / budget as for the press alone: "ratio 0.5" sends half the
  tokens to low precision instead of dropping them) form the high-precision pool, the rest
  the low-precision pool. Low-precision tokens are quantized per token, asymmetric
  min/max (the paper's alpha, beta); keys with the outlier balancer b_c =
  sqrt(max|q_c| / max|k_c|) per layer, KV head and channel from the prefill's queries (max
  over the group's query heads) and keys: k * b is stored, q / b is used, q.k unchanged.

  Differences from the paper: selection happens once, at prefill. The paper tracks
  importance H2O-style during decode and demotes tokens as they become unimportant; here
  decode tokens are appended at full precision and nothing is demoted, so a decode-time
  press (h2o, tova, scissorhands) only ranks the prefill. With chunked prefill, each chunk
  re-splits the stored tokens plus the chunk (a promoted token keeps its low-precision
  rounding) and the balancer comes from the latest chunk's queries.
  """
  name: ClassVar[str] = "mikv"
  family: ClassVar[str] = "mixed"
  press: base.Method | str = "h2o"
  high_bits: int = 8
  low_bits: int = 2
  group_size: int | None = None
  balance: bool = True

  def __post_init__(self):
    object.__setattr__(self, "press", registry.get(self.press))
    inner = self.press
    if (not inner.compresses or inner.headwise
        or type(inner).compact is not base.Method.compact):
      what = ("the full cache" if not inner.compresses else "a head-wise method"
              if inner.headwise else "a method with its own compaction")
      raise base.MethodError(
          f"mikv(press={inner.label!r}): the press must rank tokens for a top-k (not "
          f"{what}); e.g. h2o, snapkv, knorm, tova, pyramidkv")
    self._check_bits()

  @property
  def label(self) -> str:
    return base.spec_label(self)

  @property
  def needs(self):
    return self.press.needs

  @property
  def layerwise_prefill(self):
    # Splitting and storing are the same at every layer; ranking is when the press's is.
    return self.press.layerwise_prefill

  def layer_budgets(self, config, keep, context_length):
    return self.press.layer_budgets(config, keep, context_length)

  def protected_tokens(self, keep):
    return self.press.protected_tokens(keep)

  def protected(self, key_positions, lengths, keep):
    return self.press.protected(key_positions, lengths, keep)

  def score(self, x):
    return self.press.score(x)

  def init_state(self, shape):
    return self.press.init_state(shape)

  def prefill_state(self, x):
    return self.press.prefill_state(x)

  def accumulate(self, state, column_sums):
    return self.press.accumulate(state, column_sums)

  def split(self, x: base.LayerInputs, keep: int):
    """(high [B, K, min(keep, S)], low [B, K, S - that]) candidate slots, each in slot
    order: the press's top `keep` priorities and the rest."""
    s = x.keys.shape[2]
    _, order = jax.lax.top_k(base.priorities(self.press, x, keep), s)
    n_high = min(keep, s)
    return jnp.sort(order[..., :n_high], axis=-1), jnp.sort(order[..., n_high:], axis=-1)

  def compact(self, cand, x, keep):
    high, low = self.split(x, keep)
    important = (jnp.take_along_axis(cand.positions, high, axis=2) >= 0).sum(-1)
    return self._store(cand, x, high, low, important, state=self.press.prefill_state(x))


@registry.register
@dataclasses.dataclass(frozen=True)
class ZipVL(_MixedPrecision):
  """ZipVL (v1, mixed precision): per layer an adaptive important set, the smallest set
  of tokens holding a fraction `tau` of the normalized probe attention, at `high_bits`;
  every other token at `low_bits`.

  Importance: probe queries are the last `probe` fraction of the prompt plus a random
  `probe` fraction of the earlier real tokens (seeded by `seed` and the layer index; sized
  from the padded prompt width); s_j = the probes' attention to key j summed over the
  probes and the KV head's query heads, divided by how many probes can see j (the
  causal normalization). The important set of each (row, KV head) is the top p by
  normalized score, p the smallest count whose mass reaches tau of the total, capped at
  floor(max_ratio * context tokens) (the hard cap the paper lacks).

  Static shapes (a two-step prefill): under jit the pools have worst-case capacities
  (ceil(max_ratio * width) high slots, width low slots) and the layer's high-precision
  capacity is the largest p over its rows and heads rounded up to 16 slots (at most the
  cap); every (row, head) fills those slots with its top tokens, the tau-set first, so
  the bucket slack holds the next most important tokens at high precision rather than
  empty slots. After the forward pass the host reads the counts (`finalize`) and
  re-packs every layer to its own capacities: bytes are what is stored, and
  stats["method_stats"] report per layer the chosen (tau) ratio and the stored
  high-precision ratio.

  Differences from the paper: (1) importance and p are per (row, KV head) with the GQA
  group summed, the capacity per layer (the paper: one layer-wise ratio); (2) keys are
  quantized per token with MiKV's outlier balancer (`balance`), not per channel as in
  ZipCache, since a pool holds scattered tokens; (3) prefill attention stays dense and
  exact (the paper also uses the set for sparse prefill attention, a speed-up only);
  (4) decode tokens are appended at full precision and never re-compressed (ZipCache
  re-compresses every 100 tokens); (5) the max_ratio cap and bucketing are kvjax's.

  Chunked prefill (kvjax's extension; the paper prefills at once): each chunk re-splits
  the stored tokens (dequantized) plus the chunk, with probes drawn from the chunk as
  above, so the last chunk's probes -- the end of the prompt, as in the paper -- choose
  the final sets; a token promoted from the low pool keeps its low-precision rounding.
  Between chunks the host trims the pools (`between_chunks`), so the worst-case
  capacities do not compound.
  """
  name: ClassVar[str] = "zipvl"
  family: ClassVar[str] = "mixed"
  needs_budget: ClassVar[bool] = False
  tau: float = 0.95
  high_bits: int = 4
  low_bits: int = 2
  probe: float = 0.05
  max_ratio: float = 0.6
  group_size: int | None = None
  balance: bool = True
  seed: int = 0

  def __post_init__(self):
    base.check_fraction("tau", self.tau, low_open=True)
    base.check_fraction("probe", self.probe, low_open=True)
    if self.probe > 0.5:
      raise base.MethodError(f"probe={self.probe!r} must be in (0, 0.5]: recent and random "
                             f"probes each take that fraction of the prompt")
    base.check_fraction("max_ratio", self.max_ratio, low_open=True)
    base.check_int("seed", self.seed, 0)
    self._check_bits()

  @property
  def label(self) -> str:
    return base.spec_label(self)

  def probe_rows(self, x: base.LayerInputs) -> jax.Array:
    """[B, P] chunk rows used as probe queries: the last ceil(probe * T) rows, after
    min(that, earlier rows) distinct random earlier real rows (padding only where a row
    has fewer real tokens)."""
    t = x.queries.shape[1]
    recent = max(1, math.ceil(self.probe * t))
    earlier = t - recent
    n_random = min(recent, earlier)
    rows = jnp.broadcast_to(jnp.arange(earlier, t, dtype=jnp.int32), (x.queries.shape[0],
                                                                       recent))
    if n_random == 0:
      return rows
    key = jax.random.fold_in(jax.random.key(self.seed), x.layer)
    u = jax.random.uniform(key, (x.queries.shape[0], earlier))
    u = jnp.where(x.query_positions[:, :earlier] >= 0, u, -1.0)  # real tokens first
    _, picked = jax.lax.top_k(u, n_random)
    return jnp.concatenate([jnp.sort(picked, axis=-1).astype(jnp.int32), rows], axis=1)

  def importance(self, x: base.LayerInputs) -> jax.Array:
    """[B, K, S] float32 normalized probe attention (0 for keys no probe sees)."""
    rows = self.probe_rows(x)
    q = jnp.take_along_axis(x.queries, rows[:, :, None, None], axis=1)
    qpos = jnp.take_along_axis(x.query_positions, rows, axis=1)
    probs = attention_ops.probabilities(q.astype(jnp.float32), x.keys.astype(jnp.float32),
                                        qpos, x.key_positions)        # [B, K, G, P, S]
    mass = probs.sum((2, 3))
    seen = attention_ops.visible(qpos[:, None, :], x.key_positions).sum(2)  # [B, K, S]
    return jnp.where(seen > 0, mass / jnp.maximum(seen, 1), 0.0)

  def important_counts(self, score: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[B, K] int32: the smallest p whose top-p normalized mass reaches tau of the total,
    at most floor(max_ratio * context tokens) (and at least 1)."""
    valid = key_positions >= 0
    ranked = -jnp.sort(-jnp.where(valid, score, 0.0), axis=-1)
    before = jnp.cumsum(ranked, axis=-1) - ranked         # mass of the higher-ranked ones
    total = ranked.sum(-1, keepdims=True)
    n = valid.sum(-1)
    p = ((before < self.tau * total) & (jnp.arange(score.shape[-1]) < n[..., None])).sum(-1)
    cap = jnp.maximum(1, jnp.floor(self.max_ratio * n).astype(jnp.int32))
    return jnp.clip(p, 1, cap).astype(jnp.int32)

  def between_chunks(self, cache: Cache) -> Cache:
    return self.finalize(cache)  # no per-slot state to keep: trim as after the last chunk

  def compact(self, cand, x, keep):
    del keep  # the important set is adaptive
    s = cand.capacity
    valid = cand.positions >= 0
    score = self.importance(x)
    counts = self.important_counts(score, cand.positions)
    n = valid.sum(-1)
    cap = jnp.maximum(1, jnp.floor(self.max_ratio * n).astype(jnp.int32))
    capacity = jnp.minimum(-(-counts.max() // SLOT_BUCKET) * SLOT_BUCKET, cap.max())
    _, order = jax.lax.top_k(jnp.where(valid, score, -jnp.inf), s)
    static_high = max(1, min(s, math.ceil(self.max_ratio * s)))
    rank = jnp.arange(s, dtype=jnp.int32)
    high = jnp.where(rank[:static_high] < capacity, order[..., :static_high], -1)
    low_rank = capacity + rank
    low = jnp.where(low_rank < s, jnp.take_along_axis(
        order, jnp.broadcast_to(jnp.minimum(low_rank, s - 1), order.shape), axis=2), -1)
    return self._store(cand, x, high, low, counts)
