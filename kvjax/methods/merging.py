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
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.kv_cache import (EMPTY_POSITION, RESERVED_POSITION, LayerCache, shape_padding,
                                  shared_capacities)
from kvjax.methods import base, budgets, registry
from kvjax.ops import attention as attention_ops
from kvjax.ops import merge as merge_ops
from kvjax.ops.host import host_array


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
class EMS(base.RecentWindow, MergingMethod):
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
  `threshold` 0.5 is kvjax's choice (the paper's value is not known to us); above 1.0 is
  not allowed, 1.0 merges only keys parallel to a kept key (to float32 rounding; EMS is
  then Global-Local eviction), -1.0 merges every leaving token.
  """
  name: ClassVar[str] = "ems"
  layerwise_prefill: ClassVar[bool] = True
  needs: ClassVar[frozenset] = frozenset({"column_sums"})
  window: int = 32
  threshold: float = 0.5

  def __post_init__(self):
    base.check_int("window", self.window, 1)
    base.check_number("threshold", self.threshold, -1, 1,
                      what="the cosine similarity a leaving token needs to be merged")

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
  layerwise_prefill: ClassVar[bool] = True
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
  layerwise_prefill: ClassVar[bool] = True
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


def d2o_layer_budgets(scores: list[np.ndarray], valid: list[np.ndarray], keep: int,
                      lengths: np.ndarray, low: int) -> list[int]:
  """D2O's layer budgets from the variance of each head's accumulated attention.

  scores/valid: per layer [B, K, S] accumulated attention and real slots. Per head the
  variance over its real slots, averaged over the batch; min-max normalised over all
  heads of all layers; v_l the mean over the layer's heads; the layer's share of the
  cache softmax(-v)_l * L * rho with rho = keep / (longest context), clipped to
  [0.01, 1] (D2O's formula: flatter attention, more budget). Budgets are that share of
  the longest context, at least `low`, at most its length.
  """
  variances = []
  for s, ok in zip(scores, valid):
    count = np.maximum(ok.sum(-1), 1)
    mean = np.where(ok, s, 0).sum(-1) / count
    variances.append((np.where(ok, (s - mean[..., None]) ** 2, 0).sum(-1) / count).mean(0))
  v = np.stack(variances)                                                  # [L, K]
  spread = v.max() - v.min()
  v = (v - v.min()) / (spread if spread > 0 else 1.0)
  v_layer = v.mean(1)
  weights = np.exp(-v_layer - (-v_layer).max())
  weights = weights / weights.sum()
  n = int(lengths.max())
  rho = keep / n
  share = np.clip(weights * len(scores) * rho, 0.01, 1.0)
  return [int(min(n, max(low, round(r * n)))) for r in share]


@functools.partial(jax.jit, static_argnames=("capacity",))
def _d2o_compact(layer: LayerCache, lengths, keep, *, capacity: int, recent, sinks):
  """One layer's first D2O eviction: the `keep` (traced, as `recent` and `sinks`) highest
  accumulated-attention slots per head (sinks and the `recent` newest protected), in the
  first `capacity` slots, any past `keep` reserved (RESERVED_POSITION: padding to a
  shared capacity); every other real token averaged into its most cosine-similar kept one
  when that reaches the mean best similarity (tau's first value, per row)."""
  state = layer.state
  prio = jnp.where(base.sink_mask(layer.positions, sinks)
                   | base.window_mask(layer.positions, lengths, recent), base.PROTECTED,
                   state["score"])
  prio = jnp.where(layer.positions >= 0, prio, -jnp.inf)
  s = layer.capacity
  _, order = jax.lax.top_k(prio, s)
  rank = jnp.argsort(order, axis=-1)
  stays = (rank < keep) & (layer.positions >= 0)
  cand = layer.replace(state=state["absorbed"])
  kept = cand.select(order[..., :capacity])
  unused = jnp.where(jnp.arange(capacity) < keep, EMPTY_POSITION, RESERVED_POSITION)
  kept = kept.replace(positions=jnp.where(jnp.take_along_axis(stays, order[..., :capacity], -1),
                                          kept.positions, unused))
  leaving_index = jnp.argsort(stays.astype(jnp.int8), axis=-1, stable=True)  # leaving first
  leaving = cand.select(leaving_index)
  leaving = leaving.replace(positions=jnp.where(
      jnp.take_along_axis(stays, leaving_index, -1), -1, leaving.positions))
  targets, similarity = merge_ops.assign_to_centres(leaving.keys, kept.keys,
                                                    kept.positions >= 0)
  real = (leaving.positions >= 0) & (targets >= 0)
  tau = (jnp.where(real, similarity, 0).sum((1, 2))
         / jnp.maximum(real.sum((1, 2)), 1))                                # [B]
  merged = merge_into(kept, leaving, targets, similarity >= tau[:, None, None])
  score = jnp.where(merged.positions >= 0,
                    jnp.take_along_axis(state["score"], order[..., :capacity], -1), 0.0)
  b, k = merged.positions.shape[:2]
  return merged.replace(keys=jnp.where((merged.positions >= 0)[..., None], merged.keys, 0),
                        values=jnp.where((merged.positions >= 0)[..., None], merged.values, 0),
                        state={"score": score, "absorbed": merged.state,
                               "tau": jnp.broadcast_to(encode_tau(tau)[:, None, None],
                                                       (b, k, capacity))})


# tau is a per-row scalar kept in every slot of the per-slot state; slots appended later
# start at 0, so it is stored shifted to be positive (a cosine is >= -1) and read as the max.
def encode_tau(tau):
  return tau + 2.0


def decode_tau(stored):
  return stored.max(-1).max(-1) - 2.0


@registry.register
@dataclasses.dataclass(frozen=True)
class D2O(MergingMethod):
  """D2O (Wan et al., 2024; AIoT-MLSys-Lab/D2O): H2O-style eviction with layer budgets from
  the attention's flatness, where an evicted token is merged into its most similar kept
  token when that similarity clears a threshold tau tracked as a moving average.

  Prefill stores every token with its accumulated attention (summed over each KV head's
  query heads, across chunks). Once the context is in (`finalize`), the layer budgets come
  from the variance of each head's accumulated attention (`d2o_layer_budgets`) and every
  layer is compacted to its own budget: the highest accumulated attention, `sinks` (4) and
  a recent window (`recent_ratio / (hh_ratio + recent_ratio)` of the budget, D2O's
  heavy/recent split of 0.1/0.1) kept; each evicted token averaged into its most
  cosine-similar kept token if the similarity reaches tau, which starts as the mean best
  similarity. Each decode step then evicts the slot with the least accumulated attention,
  merges it the same way, and moves tau <- alpha tau + beta mean(best similarity)
  (alpha = beta = 0.5).

  Readings and departures: per KV head (the code hard-codes MHA and filters merges by the
  head-mean similarity); the merge is a token-count-weighted mean (the code scales the
  merged token by its similarity without renormalising: not a convex combination); the
  first eviction uses the prefill's attention only (the code adds the first decode step's);
  the code's uncompressed layers 0, 1 and L-1 are not special here. Layer budgets are data
  dependent, so the cache's size differs from the uniform budget's (reported as
  `method_stats["layer_budgets"]`); each layer is allocated with reserved slots past its
  budget up to a shared capacity (`allocated_slots_per_layer`), so that new prompts
  compile few new shapes.
  """
  name: ClassVar[str] = "d2o"
  decode_time: ClassVar[bool] = True
  pads_shapes: ClassVar[bool] = True
  layerwise_prefill: ClassVar[bool] = True   # `compact` reads no layer index or budget
  needs: ClassVar[frozenset] = frozenset({"column_sums"})
  hh_ratio: float = 0.1
  recent_ratio: float = 0.1
  alpha: float = 0.5
  beta: float = 0.5
  sinks: int = 4
  keep: int = 0   # the mean budget, set by `fitted` (finalize sizes the layers from it)

  def __post_init__(self):
    base.check_int("keep", self.keep, 0)
    base.check_fraction("hh_ratio", self.hh_ratio)
    base.check_fraction("recent_ratio", self.recent_ratio)
    if self.hh_ratio + self.recent_ratio <= 0:
      raise base.MethodError(f"d2o hh_ratio={self.hh_ratio} + recent_ratio="
                             f"{self.recent_ratio} must be > 0 (they split the budget)")
    base.check_fraction("alpha", self.alpha)
    base.check_fraction("beta", self.beta)
    base.check_int("sinks", self.sinks, 0)

  def recent(self, keep):
    return budgets.share(keep, self.recent_ratio, self.hh_ratio + self.recent_ratio)

  def traces_budget(self, keep):
    return budgets.shares_alike(keep, self.recent_ratio, self.hh_ratio + self.recent_ratio)

  def decoding(self):
    return dataclasses.replace(self, keep=0) if self.keep else self   # read by finalize

  def budget_free_prefill(self):
    return self.decoding()   # prefill keeps every token (`compact`)

  def protected_tokens(self, keep):
    return self.sinks + self.recent(keep)

  def fitted(self, keep):
    """Sinks shrunk to leave a slot beside the recent window, and the budget remembered
    for `finalize`."""
    sinks = min(self.sinks, max(0, keep - 1 - self.recent(keep)))
    fitted = self if sinks == self.sinks else dataclasses.replace(self, sinks=sinks)
    return fitted if fitted.keep == keep else dataclasses.replace(fitted, keep=keep)

  def protected(self, key_positions, lengths, keep):
    return base.sink_mask(key_positions, self.sinks) | base.window_mask(
        key_positions, lengths, self.recent(keep))

  def init_state(self, shape):
    zero = jnp.zeros(shape, jnp.float32)
    return {"score": zero, "absorbed": zero, "tau": zero}

  def score(self, x):
    return jnp.zeros(x.key_positions.shape, jnp.float32)   # prefill keeps every token

  def compact(self, cand, x, keep):
    """Prefill keeps every token (eviction starts once the context is in), accumulating
    its attention."""
    if cand.state is None:
      cand = cand.replace(state=self.init_state(cand.positions.shape))
    k = cand.keys.shape[1]
    sums = base.reduce_groups(x.column_sums, k, "sum")
    state = dict(cand.state, score=cand.state["score"] + sums)
    return cand.replace(state=state, end=jnp.int32(cand.capacity))

  def accumulate(self, state, column_sums):
    k = state["score"].shape[1]
    return dict(state, score=state["score"] + base.reduce_groups(column_sums, k, "sum"))

  def finalize(self, cache, config=None):
    del config
    layers = cache.layers
    lengths = host_array(cache.lengths)
    scores = [host_array(layer.state["score"]) for layer in layers]
    valid = [host_array(layer.positions) >= 0 for layer in layers]
    if self.keep < 1:
      raise base.MethodError("d2o needs its budget: run it through a plan (fitted(keep))")
    keep = self.keep
    budgets = d2o_layer_budgets(scores, valid, keep, lengths, self.protected_tokens(keep) + 1)
    # Budgets are data dependent: each layer is padded to a shared capacity, so that new
    # prompts of a length compile few new shapes. SmolLM2, 500 tokens, ratio 0.5, a
    # second prompt: 36-44 s before (its decode loop 23-25 s), 13.6-15.0 s padded
    # (12.1-13.4 s); the same tokens, the allocation 9-10% larger. Sets reused across
    # prompts (`shared_capacities`): 1.3-1.4 s from the fourth prompt, 1-5% larger still.
    # Keyed without the budget: prompts of other lengths (one padded width) share sets.
    key = (self.decoding(), tuple(layer.keys.shape for layer in layers))
    capacities = shared_capacities(key, budgets, [layer.capacity for layer in layers])
    out = []
    for layer, budget, capacity in zip(layers, budgets, capacities):
      compacted = _d2o_compact(layer, cache.lengths, jnp.int32(budget), capacity=capacity,
                               recent=jnp.int32(self.recent(budget)),
                               sinks=jnp.int32(self.sinks))
      out.append(compacted)
    return cache.replace(layers=tuple(out))

  def cache_stats(self, cache):
    return {"layer_budgets": [int(layer.capacity) - shape_padding(layer)
                              for layer in cache.layers],
            "allocated_slots_per_layer": [int(layer.capacity) for layer in cache.layers]}

  # Decode: evict the least accumulated attention, merge it, move tau.
  def decode_scores(self, state, probs, own_prob, key_positions, lengths):
    k = state["score"].shape[1]
    new_score = base.reduce_groups(own_prob[..., None], k, "sum")[..., 0]
    state = dict(state, score=state["score"] + base.reduce_groups(probs, k, "sum"))
    zero = jnp.zeros_like(new_score)
    return state, {"score": new_score, "absorbed": zero, "tau": zero}

  def eviction_priority(self, state, probs, key_positions, lengths, budget):
    return state["score"]

  def absorb(self, layer, victim, valid, new_state):
    """Before the victim slot [B, K] is overwritten: merge it into its most similar other
    slot if the similarity reaches tau; tau moves; the new slot inherits it."""
    b, k = victim.shape
    s = layer.capacity
    state = layer.state
    # a [B, K, S, ...] read at one slot [B, K] per row and head -> [B, K, ...]
    at = lambda a, slot: jnp.take_along_axis(
        a, slot.reshape(slot.shape + (1,) * (a.ndim - 2)), axis=2)[:, :, 0]
    victim_slot = jnp.minimum(victim, s - 1)   # victim >= s: a finished row (nothing leaves)
    own = jnp.arange(s)[None, None, :] == victim[..., None]
    targets, similarity = merge_ops.assign_to_centres(
        at(layer.keys, victim_slot)[:, :, None], layer.keys, (layer.positions >= 0) & ~own)
    tau = decode_tau(state["tau"])                                         # [B]
    victim_real = at(layer.positions, victim_slot) >= 0
    merge = (similarity[..., 0] >= tau[:, None]) & valid[:, None] & (victim < s) & victim_real
    weights = jnp.where(layer.positions >= 0, 1.0 + state["absorbed"], 0.0)
    source_weight = jnp.where(merge, at(weights, victim_slot), 0.0)               # [B, K]
    # Only the target slot changes, so only it is written, in place (`merge_ops.scatter_mean`
    # rewrote the whole layer's keys and values each step, which XLA then copied: 184 ms of
    # a 64-token SmolLM2 decode at 2K tokens, ratio 0.5). The target index depends on the
    # victim, itself on the attention (`after_reading`), so the write follows its reads.
    target = jnp.clip(targets[..., 0], 0, s - 1)
    # Out of bounds (the write is dropped) unless merged into a found target.
    slot = jnp.where(merge & (targets[..., 0] >= 0), target, s)
    target_weight = at(weights, target)
    total = target_weight + source_weight
    rows, heads = jnp.arange(b)[:, None], jnp.arange(k)[None, :]
    put = lambda a, v: a.at[rows, heads, slot].set(v.astype(a.dtype), mode="drop")

    def merged(a):
      # The weighted mean of the target and the victim, as `scatter_mean` computes it.
      summed = (target_weight[..., None] * at(a, target).astype(jnp.float32)
                + source_weight[..., None] * at(a, victim_slot).astype(jnp.float32))
      return put(a, summed / jnp.where(total > 0, total, 1.0)[..., None])

    # Only a real token leaving moves tau (an empty slot filled is no eviction).
    found = (targets[..., 0] >= 0) & victim_real & (victim < s)
    mean_best = jnp.where(found, similarity[..., 0], 0).sum(1) / jnp.maximum(found.sum(1), 1)
    new_tau = jnp.where(valid & found.any(1), self.alpha * tau + self.beta * mean_best, tau)
    tau_all = jnp.broadcast_to(encode_tau(new_tau)[:, None, None], state["tau"].shape)
    absorbed = jnp.where(layer.positions >= 0, state["absorbed"], 0.0)
    state = dict(state, absorbed=put(absorbed, total - 1.0), tau=tau_all)
    new_state = dict(new_state, tau=jnp.broadcast_to(encode_tau(new_tau)[:, None], (b, k)))
    return layer.replace(keys=merged(layer.keys), values=merged(layer.values),
                         state=state), new_state
