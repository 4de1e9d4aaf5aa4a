"""Merging: tokens that leave the cache are averaged into tokens that stay (EMS, Elastic
Cache, KVMerger) instead of being dropped.

Every merged slot counts the tokens it stands for: the per-slot state of these methods is
`absorbed` [B, K, S] float32, the number of other tokens averaged into the slot (a plain
token has 0, which is also what a newly appended slot starts with), so a slot's weight is
1 + absorbed and later merges (the next prefill chunk) average by token counts. Merged keys
and values keep the slot of the token they were merged into: its position, hence its RoPE
rotation and its place in the causal mask. Attention reads a merged slot like any other
(none of these papers biases the logits by the count).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.cache.kv_cache import LayerCache
from kvjax.methods import base, registry
from kvjax.ops import attention as attention_ops
from kvjax.ops import merge as merge_ops


def slot_weights(layer: LayerCache) -> jax.Array:
  """[B, K, S] float32 tokens each slot stands for (0 for empty slots)."""
  absorbed = layer.state if layer.state is not None else 0.0
  return jnp.where(layer.positions >= 0, 1.0 + absorbed, 0.0).astype(jnp.float32)


def split_kept(cand: LayerCache, prio: jax.Array, keep: int):
  """(kept, leaving): the `keep` highest-priority slots per KV head and the other S - keep,
  each in slot order (ties go to the lower slot, as `lax.top_k`)."""
  s = cand.capacity
  _, index = jax.lax.top_k(prio, keep)
  chosen = jnp.zeros(prio.shape, bool).at[
      jnp.arange(prio.shape[0])[:, None, None], jnp.arange(prio.shape[1])[None, :, None],
      index].set(True)
  order = jnp.argsort(chosen.astype(jnp.int8), axis=-1, stable=True)  # leaving first
  return cand.select(order[..., s - keep:]), cand.select(order[..., :s - keep])


def merge_into(kept: LayerCache, leaving: LayerCache, targets: jax.Array,
               merged: jax.Array) -> LayerCache:
  """`kept` with every leaving slot for which `merged` [B, K, E] holds averaged (by token
  counts) into its target slot [B, K, E]; the other leaving slots are dropped."""
  weights = jnp.where(merged & (targets >= 0), slot_weights(leaving), 0.0)
  keys, values, total = merge_ops.scatter_mean(kept.keys, kept.values, slot_weights(kept),
                                               leaving.keys, leaving.values, weights, targets)
  absorbed = jnp.where(kept.positions >= 0, total - 1.0, 0.0)
  return kept.replace(keys=keys, values=values, state=absorbed)


def nearest_by_position(leaving: LayerCache, kept: LayerCache) -> jax.Array:
  """[B, K, E] int32 the kept slot positionally nearest to each leaving slot (the earlier
  on a tie; -1 where nothing is kept)."""
  gap = jnp.abs(leaving.positions[..., :, None] - kept.positions[..., None, :])
  gap = jnp.where(kept.positions[..., None, :] >= 0, gap, jnp.iinfo(jnp.int32).max)
  target = jnp.argmin(gap, axis=-1).astype(jnp.int32)
  return jnp.where((kept.positions >= 0).any(-1, keepdims=True), target, -1)


class MergingMethod(base.Method):
  """What the merging methods share: the `absorbed` count state and the budget check."""
  family: ClassVar[str] = "merging"

  def init_state(self, shape):
    return jnp.zeros(shape, jnp.float32)

  def keep_all(self, cand: LayerCache, keep: int) -> LayerCache:
    """Everything fits the budget: keep it all, with empty slots up to it."""
    return cand.grow(keep - cand.capacity).replace(end=jnp.int32(keep))

  def merge(self, cand: LayerCache, x: base.LayerInputs, keep: int) -> LayerCache:
    raise NotImplementedError

  def compact(self, cand, x, keep):
    if cand.state is None:
      cand = cand.replace(state=self.init_state(cand.positions.shape))
    if keep >= cand.capacity:
      return self.keep_all(cand, keep)
    return self.merge(cand, x, keep)


def causal_mean_attention(x: base.LayerInputs) -> jax.Array:
  """[B, H, S] each slot's attention summed over the chunk's queries divided by how many
  of them see it: the mean attention a token received, without the causal mask's bias
  towards early tokens (which more queries see)."""
  qpos = x.query_positions[:, None, None, :]                              # [B, 1, 1, T]
  seen_by = ((qpos >= 0) & (qpos >= x.key_positions[..., None]) & (
      x.key_positions[..., None] >= 0)).sum(-1)                           # [B, K, S]
  group = x.column_sums.shape[1] // x.keys.shape[1]
  return x.column_sums / jnp.maximum(jnp.repeat(seen_by, group, axis=1), 1)


def _by_max(x: jax.Array) -> jax.Array:
  """x / max over the last axis (a zero row stays zero)."""
  top = jnp.max(x, axis=-1, keepdims=True)
  return x / jnp.where(top > 0, top, 1.0)


@registry.register
@dataclasses.dataclass(frozen=True)
class EMS(MergingMethod):
  """EMS (Li et al., 2024, arXiv 2412.08521): a Global-Local score picks the tokens each KV
  head keeps; every other token joins the kept token whose key is most cosine-similar
  (averaged into it) when that similarity reaches `threshold`, and is evicted otherwise
  (the "zero class"). All heads are compressed in one batched step (the merge kernels of
  `pallas_kernels.merge` over [B * K] rows).

  Reading implemented (no public code; the paper's formulas could not be checked offline,
  so this is kvjax's reading of its description):
    global G_j: attention to token j summed over the chunk's queries and divided by the
      number of those queries that see it (the causal mask's count bias removed);
    local L_j: attention from the last `window` queries (SnapKV's observation window);
    score S_j = G_j / max G + L_j / max L per query head, averaged over each KV head's
      group; the last `window` tokens are always kept.
  `threshold` 0.5 is kvjax's choice (the paper's value is not known to us); 1.0 merges
  nothing but exact duplicates (EMS then reduces to Global-Local eviction), -1.0 merges
  every leaving token.
  """
  name: ClassVar[str] = "ems"
  needs: ClassVar[frozenset] = frozenset({"column_sums"})
  window: int = 32
  threshold: float = 0.5

  def __post_init__(self):
    base.check_int("window", self.window, 1)
    base.check_number("threshold", self.threshold, -1, 1,
                      what="the cosine similarity a leaving token needs to be merged")

  def protected_tokens(self, keep):
    return self.window

  def fitted(self, keep):
    shrunk = base.shrink_protection(keep, window=(self.window, 1))
    return dataclasses.replace(self, **shrunk) if shrunk else self

  def protected(self, key_positions, lengths, keep):
    return base.window_mask(key_positions, lengths, self.window)

  def score(self, x):
    local = attention_ops.window_column_sums(x.queries, x.keys, x.query_positions,
                                             x.key_positions, self.window)
    combined = _by_max(causal_mean_attention(x)) + _by_max(local)
    return base.reduce_groups(combined, x.keys.shape[1], "mean")

  def merge(self, cand, x, keep):
    kept, leaving = split_kept(cand, base.priorities(self, x, keep), keep)
    targets, similarity = merge_ops.assign_to_centres(leaving.keys, kept.keys,
                                                      kept.positions >= 0)
    return merge_into(kept, leaving, targets, similarity >= self.threshold)


@registry.register
@dataclasses.dataclass(frozen=True)
class ElasticCache(MergingMethod):
  """Elastic Cache (Liu et al., ECCV 2024; liuzuyan/ElasticCache): per layer, the tokens
  with the most attention (summed over the chunk's queries, averaged over all heads, so
  every KV head keeps the same tokens) are anchors; every other token is averaged into its
  positionally nearest anchor (the earlier on a tie). The first `sinks` tokens and the
  last token are always anchors.

  Implemented as the paper intends, not as `kv_cache.py` literally does (its kept set
  compares token indices with argsort ranks; see methods_A.md §13). The merge is the
  paper's unweighted mean of an anchor and its sources (by token counts across chunks).
  sinks=4 is the class default of the official code (its eval_ppl.py passes 1). The
  paper's decode-time fixed-point eviction is not implemented: decoding appends, as for
  every prefill-time method.
  """
  name: ClassVar[str] = "elastic_cache"
  needs: ClassVar[frozenset] = frozenset({"column_sums"})
  sinks: int = 4

  def __post_init__(self):
    base.check_int("sinks", self.sinks, 0)

  def protected_tokens(self, keep):
    return self.sinks + 1

  def fitted(self, keep):
    shrunk = base.shrink_protection(keep, sinks=(self.sinks, 0), last=(1, 1))
    if not shrunk:
      return self
    return dataclasses.replace(self, sinks=shrunk["sinks"])

  def protected(self, key_positions, lengths, keep):
    return base.sink_mask(key_positions, self.sinks) | base.window_mask(key_positions,
                                                                       lengths, 1)

  def score(self, x):
    mean = x.column_sums.mean(1, keepdims=True)                           # [B, 1, S]
    return jnp.broadcast_to(mean, x.key_positions.shape)

  def merge(self, cand, x, keep):
    kept, leaving = split_kept(cand, base.priorities(self, x, keep), keep)
    return merge_into(kept, leaving, nearest_by_position(leaving, kept),
                      leaving.positions >= 0)


def _per_set(values: jax.Array, set_id: jax.Array, how: str, fill) -> jax.Array:
  """[B, K, S] per-slot values reduced over each slot's set (sets are ids in [0, S) per
  head), returned at every slot of the set."""
  b, k, s = set_id.shape
  rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  table = jnp.full((b, k, s), fill, values.dtype)
  table = getattr(table.at[rows, heads, set_id], how)(values)
  return jnp.take_along_axis(table, set_id, axis=-1)


@registry.register
@dataclasses.dataclass(frozen=True)
class KVMerger(MergingMethod):
  """KVMerger (Wang et al., 2024, arXiv 2407.08454): per KV head, runs of consecutive
  tokens whose neighbouring keys are cosine-similar (>= `similarity`) form merging sets;
  each set becomes one slot at its pivot (the member with the most accumulated attention),
  holding the Gaussian-kernel weighted mean of the set's keys and values
  (w_i = exp(-||k_p - k_i||^2 / 2 sigma^2), normalised over the set). Sinks and the recent
  window are never merged. If more slots remain than the budget, the ones with the least
  accumulated attention (a set counts its pivot's) are evicted.

  Reading implemented (no public code; paper-only details marked there as unverified):
  similarity on post-RoPE keys (the keys kvjax stores); accumulated attention = the chunk's
  queries' attention summed over each KV head's group; sigma^2 = the set's mean squared
  distance to its pivot (a scale-free choice: the paper's sigma is not pinned down), so a
  member at the set's typical distance weighs exp(-1/2) of the pivot; a member's weight is
  also multiplied by the tokens it already stands for (chunked prefill). similarity=0.75
  follows third-party re-implementations; sinks=4 and window=32 are kvjax's choices (the
  paper protects both without fixing sizes).
  """
  name: ClassVar[str] = "kvmerger"
  needs: ClassVar[frozenset] = frozenset({"column_sums"})
  similarity: float = 0.75
  sinks: int = 4
  window: int = 32

  def __post_init__(self):
    base.check_number("similarity", self.similarity, -1, 1,
                      what="the cosine similarity of neighbouring keys that joins them")
    base.check_int("sinks", self.sinks, 0)
    base.check_int("window", self.window, 0)

  def protected_tokens(self, keep):
    return self.sinks + self.window

  def fitted(self, keep):
    shrunk = base.shrink_protection(keep, sinks=(self.sinks, 0), window=(self.window, 0))
    return dataclasses.replace(self, **shrunk) if shrunk else self

  def protected(self, key_positions, lengths, keep):
    return base.sink_mask(key_positions, self.sinks) | base.window_mask(
        key_positions, lengths, self.window)

  def score(self, x):
    return base.reduce_groups(x.column_sums, x.keys.shape[1], "sum")

  def merging_sets(self, cand: LayerCache, x: base.LayerInputs, keep: int) -> jax.Array:
    """[B, K, S] int32 set id of every slot: a slot joins its predecessor's set when both
    hold unprotected tokens whose keys are at least `similarity` cosine-similar."""
    unit = merge_ops.unit_rows(cand.keys)
    near = (unit[..., 1:, :] * unit[..., :-1, :]).sum(-1) >= self.similarity   # [B, K, S-1]
    free = (cand.positions >= 0) & ~self.protected(cand.positions, x.lengths, keep)
    joins = near & free[..., 1:] & free[..., :-1]
    starts = jnp.concatenate([jnp.ones(joins.shape[:2] + (1,), bool), ~joins], axis=-1)
    return jnp.cumsum(starts, axis=-1, dtype=jnp.int32) - 1

  def merge(self, cand, x, keep):
    s = cand.capacity
    score = self.score(x)
    set_id = self.merging_sets(cand, x, keep)
    slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), set_id.shape)
    best = _per_set(score, set_id, "max", -jnp.inf)
    pivot = _per_set(jnp.where(score == best, slot, s), set_id, "min", s)
    keys = cand.keys.astype(jnp.float32)
    pivot_keys = jnp.take_along_axis(keys, pivot[..., None], axis=2)
    dist2 = ((keys - pivot_keys) ** 2).sum(-1)
    spread = _per_set(dist2, set_id, "add", 0.0) / _per_set(jnp.ones_like(dist2), set_id,
                                                             "add", 0.0)
    kernel = jnp.where(spread > 0, jnp.exp(-dist2 / (2 * jnp.where(spread > 0, spread, 1.0))),
                       1.0)
    counts = slot_weights(cand)
    weight = kernel * counts
    norm = _per_set(weight, set_id, "add", 0.0)
    mean = lambda a: _per_set_rows(weight[..., None] * a.astype(jnp.float32), set_id) / (
        jnp.where(norm > 0, norm, 1.0)[..., None])
    is_pivot = slot == pivot
    merged = cand.replace(
        keys=jnp.where(is_pivot[..., None], mean(cand.keys), cand.keys).astype(cand.keys.dtype),
        values=jnp.where(is_pivot[..., None], mean(cand.values),
                         cand.values).astype(cand.values.dtype),
        positions=jnp.where(is_pivot, cand.positions, -1),
        state=jnp.where(is_pivot & (cand.positions >= 0),
                        _per_set(counts, set_id, "add", 0.0) - 1.0, 0.0))
    # A set competes for the budget with its pivot's score (the set's best); merged-away
    # members are empty now.
    prio = base.priorities(self, dataclasses.replace(x, key_positions=merged.positions), keep)
    _, index = jax.lax.top_k(prio, keep)
    return merged.select(jnp.sort(index, axis=-1))


def _per_set_rows(vectors: jax.Array, set_id: jax.Array) -> jax.Array:
  """[B, K, S, D] vectors summed over each slot's set, returned at every slot."""
  b, k, s, d = vectors.shape
  rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  table = jnp.zeros((b, k, s, d), vectors.dtype).at[rows, heads, set_id].add(vectors)
  return jnp.take_along_axis(table, set_id[..., None], axis=2)
