"""LoopServe's decode part: an active set of input tokens re-chosen from the newest queries
(LoopServe, adaptive dual-phase inference for multi-turn dialogues; OpenReview iyIzaoDVrT,
ICLR 2026 submission; no public code, so the reading below is kvjax's).

Every input token's key and value is kept (in host memory by default, `offload`), nothing
is evicted for good. Per layer and KV head decoding attends over an active set I of B input
tokens (B = the compression ratio's budget, or `budget=1024` for the paper's setting) plus
every token after the prompt (appended questions, generated tokens). Every `interval` (n_d,
16) recorded queries, I is re-chosen:
s_j = sum over the last n_d queries t and the KV head's query heads of
softmax_j(q_t . K_input / sqrt(D)) (softmax over the input tokens only, post-RoPE), I = the
top B of s (ties to the earlier slot). The input keys are copied from the host chunk by
chunk (`SCORE_CHUNK` slots per copy, two passes: log-sum-exps, then probabilities), then a
third pass copies each chunk of keys and values and keeps its chosen slots (XLA reads host
memory by slice, not by gather): a re-selection moves the input keys three times and the
values once, every n_d steps. The device holds the active set, the tokens after the
prompt, the last n_d queries and 4 bytes of position per input token;
`method_stats["host_bytes"]` counts the offloaded input keys and values.

Readings and assumptions (no official code exists):
- Seed: before the first re-selection, I is the same rule applied to the prompt's last n_d
  queries (causal softmax over the prompt): a SnapKV-style last-window observation without
  pooling, an assumption (the paper does not say how decoding starts).
- The GQA reduction is a sum over the group (one set per KV head).
- An appended question's queries are recorded like generated ones (a question of n_d or more
  tokens re-chooses I from its last n_d queries before the answer starts), and its tokens,
  like generated ones, are always attended; questions (and the prefill when alpha = 0)
  attend densely.
- A layer whose budget covers its whole context stays a dense full layer.
- Re-selection runs inside the decode step that completes n_d queries (synchronously): the
  paper's overlap of the host reads with decoding is not modelled.
- The sparse prefill (`alpha` > 0; see the end of this module) replaces each compressing
  prefill chunk's attention (`Method.prefill_attention`): `line_masses` and `select_lines`
  choose each head's vertical and slash lines (column 0 and diagonal 0 always, then greedy
  by mass to a share `alpha` of a row sample, `sample_rows`: the last rows plus evenly
  spaced earlier ones, where the paper samples at random), at most `max_lines` of each kind
  (static shapes; the most massive stay), and `attention_ops.vertical_slash` attends over
  their union (a Pallas kernel on GPU/TPU, jnp gathers per query block on CPU). `alpha` =
  0 (the default) attends densely: on the multi-turn sweep (SmolLM2, 1K,
  docs/results/multiturn_loopserve) alpha 0.9 and 0.95 halved LoopServe's score at ratio
  0.5 (25.0 -> 12.5). The seed's scores (`score`) come from
  the chunk's own queries either way.

How the queries reach the layer: the method declares the QUERIES need; a LoopServe layer
then returns each decode step's (or question's) queries and positions in its Stats and
the policy hands them to `observe_queries`, which records them and re-selects.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache.kv_cache import (EMPTY_POSITION, QUERIES, LayerCache, NewTokens,
                                  PerHeadSlots, Stats, host_nbytes, init_layer_cache)
from kvjax.cache.paged import read_slots, to_device, to_host
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.ops import attention as attention_ops

SCORE_CHUNK = 512   # input slots per host-to-device copy when re-scoring (memory, not math)
F32 = jnp.float32


@struct.dataclass
class RecentQueries:
  """The last n_d queries of a layer (oldest first) and how many came since I was chosen."""
  queries: jax.Array     # [B, n_d, H, D]
  positions: jax.Array   # [B, n_d] int32, EMPTY_POSITION where none (yet, or padding)
  since: jax.Array       # int32 scalar

  def pushed(self, queries: jax.Array, positions: jax.Array) -> "RecentQueries":
    n = self.positions.shape[1]
    return RecentQueries(
        queries=jnp.concatenate([self.queries, queries.astype(self.queries.dtype)], 1)[:, -n:],
        positions=jnp.concatenate([self.positions, positions.astype(jnp.int32)], 1)[:, -n:],
        since=self.since + queries.shape[1])


def input_scores(inputs: LayerCache, queries: jax.Array, query_positions: jax.Array,
                 chunk: int, offloaded: bool) -> jax.Array:
  """[B, K, S] float32: s_j = sum over the queries and each KV head's query heads of the
  causal softmax over the input slots of q . k_j / sqrt(D). queries [B, T, H, D], query
  positions [B, T] (negative: no query). The keys are read `chunk` slots at a time (S a
  multiple of chunk), twice: once for the log-sum-exps, once for the probabilities."""
  b, k, s, d = inputs.keys.shape
  q = attention_ops.group_heads(queries, k).astype(F32)                  # [B, K, G, T, D]

  def logits(i):
    start = i * chunk
    keys = read_slots(inputs.keys, start, chunk, offloaded).astype(F32)
    pos = jax.lax.dynamic_slice_in_dim(inputs.positions, start, chunk, axis=2)
    seen = attention_ops.visible(query_positions[:, None, None, :], pos[:, :, None, :])
    scaled = jnp.einsum("bkgtd,bksd->bkgts", q, keys,
                        precision=jax.lax.Precision.HIGHEST) * d ** -0.5
    return jnp.where(seen, scaled, -jnp.inf)                            # [B, K, G, T, C]

  def chunk_lse(i, lse):
    part = logits(i)
    top = jnp.max(part, -1)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.logaddexp(lse, jnp.log(jnp.exp(part - safe[..., None]).sum(-1)) + safe)

  lse = jax.lax.fori_loop(0, s // chunk, chunk_lse, jnp.full(q.shape[:4], -jnp.inf, F32))
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)   # a query that sees nothing adds nothing

  def chunk_probs(i, scores):
    probs = jnp.exp(logits(i) - lse[..., None]).sum((2, 3))              # [B, K, C]
    return jax.lax.dynamic_update_slice_in_dim(scores, probs, i * chunk, axis=2)

  return jax.lax.fori_loop(0, s // chunk, chunk_probs, jnp.zeros((b, k, s), F32))


def top_slots(scores: jax.Array, positions: jax.Array, budget: int) -> jax.Array:
  """[B, K, budget] the input slots with the highest scores (empty slots last, ties to the
  earlier slot), in slot order."""
  _, index = jax.lax.top_k(jnp.where(positions >= 0, scores, -jnp.inf), budget)
  return jnp.sort(index, axis=-1)


def gather_inputs(inputs: LayerCache, index: jax.Array, chunk: int,
                  offloaded: bool) -> LayerCache:
  """The input slots `index` [B, K, n] as a dense device layer, copied chunk by chunk (each
  chunk's chosen slots picked out of its device copy)."""
  b, k, s, _ = inputs.keys.shape
  n = index.shape[-1]

  def body(i, kv):
    start = i * chunk
    local = index - start
    inside = ((local >= 0) & (local < chunk))[..., None]
    local = jnp.clip(local, 0, chunk - 1)[..., None]
    pick = lambda array, acc: jnp.where(
        inside, jnp.take_along_axis(read_slots(array, start, chunk, offloaded), local, 2), acc)
    return pick(inputs.keys, kv[0]), pick(inputs.values, kv[1])

  empty = lambda a: jnp.zeros((b, k, n, a.shape[-1]), a.dtype)
  keys, values = jax.lax.fori_loop(0, s // chunk, body, (empty(inputs.keys),
                                                         empty(inputs.values)))
  return LayerCache(keys=keys, values=values,
                    positions=jnp.take_along_axis(inputs.positions, index, 2),
                    end=jnp.int32(n))


@struct.dataclass
class LoopServeLayerCache(PerHeadSlots):
  """Every input token (`inputs`, in host memory when offloaded), the active set gathered
  from it, the tokens after the prompt and the last n_d queries."""
  inputs: LayerCache       # capacity a multiple of `chunk`; never appended to
  active: LayerCache       # [B, K, budget] on the device
  generated: LayerCache    # tokens after the prompt, on the device
  recent: RecentQueries
  chunk: int = struct.field(pytree_node=False, default=SCORE_CHUNK)
  offloaded: bool = struct.field(pytree_node=False, default=False)

  @property
  def state(self):
    return self.recent

  @property
  def capacity(self) -> int:
    return self.active.capacity + self.generated.capacity

  def slot_positions(self) -> jax.Array:
    """The slots a decode step reads: the active set, then the tokens after the prompt."""
    return jnp.concatenate([self.active.positions, self.generated.positions], axis=2)

  def free_slots(self) -> int:
    return self.generated.free_slots()

  def logical_axes(self) -> dict:
    return {"inputs": self.inputs.logical_axes(), "active": self.active.logical_axes(),
            "generated": self.generated.logical_axes(),
            "recent": {"queries": ("batch", None, "heads", "head_dim"),
                       "positions": ("batch", None), "since": ()}}

  def dense(self) -> LayerCache:
    """Every token (inputs, then the tokens after the prompt) on the device."""
    inputs = to_device(self.inputs) if self.offloaded else self.inputs
    cat = lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=2)
    return LayerCache(keys=cat(inputs.keys, self.generated.keys),
                      values=cat(inputs.values, self.generated.values),
                      positions=cat(inputs.positions, self.generated.positions),
                      end=jnp.int32(inputs.capacity + self.generated.capacity))

  def append(self, new: NewTokens) -> "LoopServeLayerCache":
    return self.replace(generated=self.generated.append(new))

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    """Decode: the active set plus the tokens after the prompt; longer chunks: dense. With
    QUERIES wanted, returns the queries and their positions for `observe_queries`."""
    if pending is not None:
      return self.candidates(pending).attend(queries, query_positions, None, want)
    if queries.shape[1] == 1:
      out = self.decode(queries, query_positions)
    else:
      out, _ = self.dense().attend(queries, query_positions)
    return out, Stats(queries=(queries, query_positions) if QUERIES in want else None)

  def decode(self, queries, query_positions) -> jax.Array:
    """[B, 1, H, D]: one query per row over the active set and the generated tokens, the
    two partial attentions merged by their log-sum-exps."""
    b, _, h, d = queries.shape
    k = self.active.keys.shape[1]
    parts = [attention_ops.decode(queries, part.keys, part.values, query_positions,
                                  part.positions)
             for part in (self.active, self.generated)]
    grouped = lambda out: out.reshape(b, k, h // k, d).astype(F32)
    out, _ = attention_ops.merge_partials(grouped(parts[0][0]), parts[0][1],
                                          grouped(parts[1][0]), parts[1][1])
    return out.reshape(b, 1, h, d).astype(queries.dtype)

  def candidates(self, new: NewTokens) -> LayerCache:
    return self.dense().candidates(new)

  def select(self, index):
    raise NotImplementedError("a LoopServe layer is compacted through its dense candidates")

  def trimmed(self) -> "LoopServeLayerCache":
    return self

  def grow(self, room: int) -> "LoopServeLayerCache":
    return self.replace(generated=self.generated.grow(room))

  # The decode policy's state hooks: LoopServe's state is the layer (re-selection rewrites
  # the active set).
  def state_view(self) -> "LoopServeLayerCache":
    return self

  def with_state_view(self, state: "LoopServeLayerCache") -> "LoopServeLayerCache":
    return state


def reselected(layer: LoopServeLayerCache) -> LoopServeLayerCache:
  """The active set re-chosen from the recorded queries (top `budget` of `input_scores`)."""
  recent = layer.recent
  scores = input_scores(layer.inputs, recent.queries, recent.positions, layer.chunk,
                        layer.offloaded)
  index = top_slots(scores, layer.inputs.positions, layer.active.capacity)
  return layer.replace(active=gather_inputs(layer.inputs, index, layer.chunk, layer.offloaded),
                       recent=recent.replace(since=jnp.zeros_like(recent.since)))


def recorded(layer: LoopServeLayerCache, queries: jax.Array,
             query_positions: jax.Array) -> LoopServeLayerCache:
  """The layer after queries [B, T, H, D] attended: they join the recent queries, and once
  n_d have come since the last choice the active set is re-chosen."""
  layer = layer.replace(recent=layer.recent.pushed(queries, query_positions))
  due = layer.recent.since >= layer.recent.positions.shape[1]
  return jax.lax.cond(due, reselected, lambda same: same, layer)


def loopserve_layer(dense: LayerCache, chosen: jax.Array, num_heads: int, interval: int,
                    offload: bool, chunk: int = SCORE_CHUNK) -> LoopServeLayerCache:
  """Host side: the layer decoding starts from, every token of `dense` kept (padded to whole
  score chunks), the `chosen` [B, K, S] slots active (a head with fewer chosen than the
  most chosen anywhere pads with empty slots)."""
  b, k, s, d = dense.keys.shape
  n = int(jnp.max(chosen.sum(-1)))
  index = jnp.argsort(~chosen, axis=-1, stable=True)[..., :n]
  active = dense.select(index)
  active = active.replace(positions=jnp.where(jnp.take_along_axis(chosen, index, 2),
                                              active.positions, EMPTY_POSITION))
  chunk = min(chunk, s)
  inputs = dense.grow(-s % chunk)
  generated = init_layer_cache(b, k, 0, d, dense.keys.dtype, dense.values.shape[-1])
  recent = RecentQueries(queries=jnp.zeros((b, interval, num_heads, d), dense.keys.dtype),
                         positions=jnp.full((b, interval), EMPTY_POSITION, jnp.int32),
                         since=jnp.zeros((), jnp.int32))
  return LoopServeLayerCache(inputs=to_host(inputs) if offload else inputs, active=active,
                             generated=generated, recent=recent, chunk=chunk,
                             offloaded=offload)


@registry.register
@dataclasses.dataclass(frozen=True)
class LoopServe(base.Method):
  """Decode over an active set of input tokens re-chosen every `interval` queries (see the
  module docstring)."""
  name: ClassVar[str] = "loopserve"
  family: ClassVar[str] = "paging"
  needs: ClassVar[frozenset] = frozenset({QUERIES})
  wrappable: ClassVar[bool] = False   # its set is re-chosen at decode, not a prefill score
  interval: int = 16
  offload: bool = True
  # The sparse prefill (0: dense, the default; see the module docstring): per layer
  # and head the vertical and slash lines carrying `alpha` of the attention of
  # `prefill_rows` sampled query rows, at most `max_lines` of each kind (the most massive).
  alpha: float = 0.0
  prefill_rows: int = 64
  max_lines: int = 256

  def __post_init__(self):
    base.check_int("interval", self.interval, 1)
    base.check_fraction("alpha", self.alpha)
    base.check_int("prefill_rows", self.prefill_rows, 1)
    base.check_int("max_lines", self.max_lines, 1)

  @property
  def attends_prefill(self) -> bool:
    return self.alpha > 0

  def prefill_attention(self, layer, queries, query_positions, pending, want):
    """A prefill chunk (more than one query) attends over its heads' chosen lines only:
    the layer's slots and the chunk (`sparse_prefill`). The scores that seed the active
    set are computed from the same queries, densely, by `score`."""
    if queries.shape[1] == 1:
      return layer.attend(queries, query_positions, pending, want)
    cand = layer.candidates(pending)
    out = sparse_prefill(queries, query_positions, cand.keys, cand.values, cand.positions,
                         self.alpha, self.prefill_rows, self.max_lines)
    return out, Stats()

  def init_state(self, shape):
    return jnp.zeros(shape, bool)   # per slot: in the seed's active set

  def score(self, x):
    """[B, K, S]: the seed's s_j from the chunk's last `interval` queries."""
    sums = attention_ops.window_column_sums(x.queries, x.keys, x.query_positions,
                                            x.key_positions, self.interval)
    return base.reduce_groups(sums, x.keys.shape[1], "sum")

  def compact(self, cand, x, keep):
    """Every candidate is kept; the state marks the top `keep` by `score` (the last
    chunk's marks are the seed)."""
    prio = base.priorities(self, x, keep)
    index = jax.lax.top_k(prio, min(keep, cand.capacity))[1]
    b, k, _ = prio.shape
    chosen = jnp.zeros(prio.shape, bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], index].set(True)
    return cand.replace(state=chosen & (cand.positions >= 0))

  def observe_queries(self, state, queries, query_positions):
    """Decode and questions: `state` is the layer, which records the queries."""
    return recorded(state, queries, query_positions)

  def finalize(self, cache, config=None):
    """Bucket padding cut; each layer becomes a LoopServe layer seeded with its marks, or
    stays dense where the budget covers its context."""
    if config is None:
      raise MethodError("loopserve.finalize needs the model config (its query heads)")
    layers = []
    for layer in cache.layers:
      dense = layer.trimmed()
      chosen, dense = dense.state, dense.replace(state=None)
      if bool(jnp.all(chosen == (dense.positions >= 0))):
        layers.append(dense)
      else:
        layers.append(loopserve_layer(dense, chosen, config.num_heads, self.interval,
                                      self.offload))
    return cache.replace(layers=tuple(layers))

  def kept_budgets(self, cache, budgets):
    """Per layer, the most input tokens a decode step reads per KV head."""
    del budgets
    read = lambda layer: layer.active if isinstance(layer, LoopServeLayerCache) else layer
    return tuple(int((read(layer).positions >= 0).sum(-1).max()) for layer in cache.layers)

  def cache_stats(self, cache) -> dict:
    layers = [layer for layer in cache.layers if isinstance(layer, LoopServeLayerCache)]
    if not layers:
      return {}
    return {"active_tokens": layers[0].active.capacity, "interval": self.interval,
            "dense_layers": len(cache.layers) - len(layers), "host_bytes": host_nbytes(cache)}


# ----------------------------------------------------------------------------- prefill part
# LoopServe's prefill: per head, the vertical (key position p) and slash (offset o = query
# position - key position) lines that carry a share `alpha` of a sample of rows' attention,
# and attention over their union (`sparse_prefill`, run by the model's prefill through
# `LoopServe.prefill_attention` when alpha > 0).

SPARSE_QUERY_BLOCK = 128   # queries per jnp gather pass: bounds the gathered keys' memory


def _most_massive(chosen: jax.Array, mass: jax.Array, n: int) -> jax.Array:
  """chosen [B, H, S] bool cut to its n most massive lines per head (line 0, the forced
  sink column or own diagonal, always kept)."""
  if n >= chosen.shape[-1]:
    return chosen
  score = jnp.where(chosen, mass, -1.0).at[..., 0].set(jnp.where(chosen[..., 0], jnp.inf, -1.0))
  index = jax.lax.top_k(score, n)[1]
  b, h, _ = chosen.shape
  kept = jnp.zeros(chosen.shape, bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], index].set(True)
  return kept & chosen


def sparse_prefill(queries, query_positions, keys, values, key_positions, alpha: float,
                   rows: int, max_lines: int):
  """[B, T, H, D]: each query attends over its head's chosen lines only. The lines carry
  `alpha` of the attention of `rows` sampled rows of the chunk (half its last rows, half
  spread evenly before them: `sample_rows`), at most `max_lines` vertical and `max_lines`
  slash lines per head (when more are chosen, the least massive go). The attention is the
  vertical-slash kernel where kernels run; the jnp one gathers SPARSE_QUERY_BLOCK queries'
  keys at a time."""
  t, s = queries.shape[1], keys.shape[2]
  picked = sample_rows(t, rows - rows // 2, rows // 2)
  sampled_positions = query_positions[:, picked]
  vmass, smass = line_masses(queries[:, picked], sampled_positions, keys, key_positions)
  vertical, slash = select_lines(vmass, smass, (sampled_positions >= 0).sum(1), alpha)
  lines = min(max_lines, s)
  vertical, slash = _most_massive(vertical, vmass, lines), _most_massive(slash, smass, lines)
  return attention_ops.vertical_slash(queries, keys, values, query_positions, key_positions,
                                      vertical, slash, lines, lines, SPARSE_QUERY_BLOCK)


def sample_rows(length: int, last: int, spread: int) -> np.ndarray:
  """Host side: the chunk rows (of `length`) whose attention picks the lines: the last
  `last` rows and `spread` evenly spaced earlier ones (the paper samples at random)."""
  last = min(last, length)
  earlier = np.linspace(0, length - last, spread, endpoint=False).astype(int) if (
      spread and length > last) else np.zeros(0, int)
  return np.unique(np.concatenate([earlier, np.arange(length - last, length)]))


def line_masses(queries: jax.Array, query_positions: jax.Array, keys: jax.Array,
                key_positions: jax.Array):
  """(vertical, slash) [B, H, S] float32: the sampled rows' causal attention summed per key
  position p (vertical[p]) and per offset o = query position - key position (slash[o]).
  queries [B, R, H, D] (the sampled rows), query_positions [B, R] (negative: padding)."""
  b, r, h, _ = queries.shape
  k, s = keys.shape[1], keys.shape[2]
  probs = attention_ops.probabilities(queries.astype(F32), keys.astype(F32), query_positions,
                                      key_positions).reshape(b, h, r, s)
  kpos = jnp.repeat(key_positions, h // k, axis=1)[:, :, None, :]          # [B, H, 1, S]
  offset = query_positions[:, None, :, None] - kpos                        # [B, H, R, S]
  rows, heads = jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None]
  # Invisible pairs have zero probability; their indices are sent out of range.
  put = lambda index: jnp.zeros((b, h, s), F32).at[
      rows, heads, jnp.where(probs > 0, index, s)].add(probs, mode="drop")
  return put(jnp.broadcast_to(kpos, probs.shape)), put(offset)


def select_lines(vertical: jax.Array, slash: jax.Array, sampled: jax.Array, alpha: float):
  """(vertical, slash) [B, H, S] bool: per head, column 0 and diagonal 0, then the other
  lines by decreasing mass (ties: verticals first, lower index first) until the chosen
  lines' masses sum to alpha x the sampled rows `sampled` [B] (each row's attention sums
  to 1; a key on a chosen column and a chosen diagonal counts for both, as the greedy pass
  of the reference notes does). Lines without mass are never chosen but the forced ones."""
  s = vertical.shape[-1]
  mass = jnp.concatenate([vertical, slash], axis=-1)                      # [B, H, 2S]
  forced = (jnp.arange(2 * s) == 0) | (jnp.arange(2 * s) == s)
  order = jnp.argsort(jnp.where(forced, -jnp.inf, -mass), axis=-1, stable=True)
  sorted_mass = jnp.take_along_axis(mass, order, -1)
  before = jnp.cumsum(sorted_mass, -1) - sorted_mass
  target = alpha * sampled.astype(F32)[:, None, None]
  take = forced[order] | ((before < target) & (sorted_mass > 0))
  chosen = jnp.zeros(mass.shape, bool).at[
      jnp.arange(mass.shape[0])[:, None, None], jnp.arange(mass.shape[1])[None, :, None],
      order].set(take)
  return chosen[..., :s], chosen[..., s:]
