"""KVzip: query-agnostic eviction scored by context reconstruction (Kim et al., NeurIPS 2025,
arXiv 2505.23416; official code snu-mllab/KVzip, and kvpress's KVzipPress).

After the context is prefilled (every token kept), the model reads a prompt asking it to
repeat the context, followed by the context itself, over that cache. A cached KV pair
matters as much as the most any repeat query attends to it: score = max over the query
heads of its KV group and over the repeat tokens of the softmax probability, where each
repeat chunk's softmax runs over the `sinks` first tokens, the chunk's own slots and the
repeat tokens before it (KVzip's subsampled attention). Contexts longer than `chunk_size`
are repeated chunk by chunk; later chunks' prompts end with the previous chunk's last 8
tokens. The first `sinks` tokens score 1.

Selection (KVzip's default, `layerwise=False`): one ranking of every (layer, KV head, token)
of a row; the row keeps its `num_layers * num_kv_heads * keep` best, so layers and heads
keep different counts (head-wise flat layout, real savings). A batch shares each layer's
slot count: a layer holds the most any row's ranking gives it, and rows that got fewer have
empty slots there, so every row keeps what it would keep alone; the count is padded with
reserved slots (never attended) by `kv_cache.shared_capacities` (rounded up, or a set of
counts allocated for an earlier prompt), so that a new prompt mostly meets compiled shapes
(`method_stats`: `slots_per_layer` without them, `allocated_slots_per_layer` with them).
`layerwise=True`: every layer keeps `num_kv_heads * keep`, shared among its heads by score.

Reading of the paper and the code, where kvjax differs: kvpress excludes the chat-template
prefix from the repeated chunks (its tokens after the sinks score 0); kvjax does not know
where a template ends, so every context token is repeated. Ties in the ranking go to the
earlier layer, head and slot (kvpress prunes every score at or below a threshold).
The repeat prompt ends with the chat template's assistant turn when the tokenizer has one,
else with a newline, as in kvpress. Cost: one more forward pass over the context (and the
repeat prompt), the price the paper states for query-agnostic scores.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import kv_cache
from kvjax.cache.kv_cache import (EMPTY_POSITION, RESERVED_POSITION, FlatLayerCache, LayerCache,
                                  shared_capacities)
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.ops.dispatch import use_pallas
from kvjax.ops.attention import group_heads
from kvjax.ops.host import host_array

REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with"
PREVIOUS_TOKENS = 8   # the previous chunk's tail a later chunk's prompt ends with
SINK_SCORE = 1.0


def reconstruction_scores(queries, keys, key_positions, new_keys, query_positions, start, end,
                          sinks: int, block: int = 256):
  """[B, K, S] float32: the most any real query attends to each cached slot.

  queries [B, T, H, D] (post-RoPE) of the repeat tokens; keys [B, K, S, D] and
  key_positions [B, K, S] of the cache; new_keys [B, K, T, D] the repeat tokens' own keys,
  at query_positions [B, T] (negative = padding). Each query's softmax runs over the
  cached slots at positions below `sinks` or in [start, end) (per row) and the repeat tokens
  up to itself. Queries are taken `block` at a time (memory O(block * (S + T))).
  """
  allowed = (key_positions >= 0) & ((key_positions < sinks) | (
      (key_positions >= start[:, None, None]) & (key_positions < end[:, None, None])))
  return max_probabilities(queries, keys, allowed, new_keys, query_positions, block)


def max_probabilities(queries, keys, allowed, new_keys, query_positions, block: int = 256):
  """[B, K, S] float32: the largest softmax probability any real query of a KV head's group
  gives each cached slot, each query's softmax running over the `allowed` [B, K, S] cached
  slots and its own tokens (new_keys [B, K, T, D] at query_positions [B, T]) up to itself,
  or over the allowed slots only when new_keys is None; zero for the other slots. Queries
  are taken `block` at a time (memory O(block * (S + T)))."""
  b, t, h, d = queries.shape
  k = keys.shape[1]
  scale = d ** -0.5
  block = min(block, t)
  blocks = -(-t // block)
  pad = blocks * block - t
  q = jnp.pad(group_heads(queries, k).astype(jnp.float32),
              [(0, 0)] * 3 + [(0, pad), (0, 0)])                          # [B, K, G, T', D]
  qpos = jnp.pad(query_positions, [(0, 0), (0, pad)], constant_values=-1)
  keys32 = keys.astype(jnp.float32)
  new32 = None if new_keys is None else new_keys.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  candidates = allowed[:, :, None, None, :]

  def step(best, i):
    qi = jax.lax.dynamic_slice_in_dim(q, i * block, block, axis=3)
    pi = jax.lax.dynamic_slice_in_dim(qpos, i * block, block, axis=1)  # [B, bq]
    cached = jnp.einsum("bkgtd,bksd->bkgts", qi, keys32, precision=hi) * scale
    cached = jnp.where(candidates, cached, -jnp.inf)
    lse = jax.nn.logsumexp(cached, -1)
    if new32 is not None:
      own = jnp.einsum("bkgtd,bkud->bkgtu", qi, new32, precision=hi) * scale
      seen = (query_positions[:, None, :] >= 0) & (
          query_positions[:, None, :] <= pi[:, :, None])                # [B, bq, T]
      own = jnp.where(seen[:, None, None], own, -jnp.inf)
      lse = jnp.logaddexp(lse, jax.nn.logsumexp(own, -1))
    # Masked by `candidates` too: a query with no candidate at all has lse = -inf.
    real = (pi >= 0)[:, None, None, :, None] & candidates
    probs = jnp.where(real, jnp.exp(cached - lse[..., None]), 0.0)
    return jnp.maximum(best, probs.max(axis=(2, 3))), None

  best, _ = jax.lax.scan(step, jnp.zeros(keys.shape[:3], jnp.float32), jnp.arange(blocks))
  return best


class ScoringProbe:
  """A cache policy for a rescoring pass: attends over the (dense, full) cache plus the
  pass's tokens without storing them, and returns each layer's `scores` in place of its
  cache. What it returns is not the cache, so the engine must not donate the cache to it
  (`compress`)."""
  compress = True
  label = "this method"

  def prepare(self, layer, layer_cache, new):
    del layer
    return layer_cache, new, frozenset()

  def update(self, layer, layer_cache, step, stats):
    del layer, stats
    if not isinstance(layer_cache, LayerCache):
      raise MethodError(f"{self.label} scores a dense full cache; got "
                        f"{type(layer_cache).__name__}")
    return self.scores(layer_cache, step)

  def scores(self, layer_cache: LayerCache, step):
    raise NotImplementedError

  def finish(self, layers, lengths):
    del lengths
    return tuple(layers)


@dataclasses.dataclass(frozen=True)
class ReconstructionProbe(ScoringProbe):
  """KVzip's repeat pass: each layer's `reconstruction_scores`. Its traced parameters are
  {"start": [B], "end": [B]} (the chunk's positions)."""
  sinks: int
  label = "kvzip"

  def scores(self, layer_cache, step):
    return reconstruction_scores(step.queries, layer_cache.keys, layer_cache.positions,
                                 step.new.keys, step.new.positions, step.params["start"],
                                 step.params["end"], self.sinks)


def repeat_suffix(tokenizer) -> list[int]:
  """The tokens between the repeat instruction and the repeated text: the chat template's
  end of the user turn and start of the assistant's when there is a template, else '\\n'."""
  if not tokenizer.has_chat_template:
    return tokenizer.encode("\n", add_special_tokens=False)
  marker = "\n" + "#" * 13
  text = tokenizer.apply_chat_template([{"role": "user", "content": "dummy context" + marker}],
                                       add_generation_prompt=True)
  return tokenizer.encode(text.split(marker)[-1], add_special_tokens=False)


# A second prompt of the same length used to compile 30 eager selections anew (31 of its
# 43 s at 500 tokens on SmolLM2): the selection is one compiled call per shared capacity.
@functools.partial(jax.jit, static_argnames=("capacity", "pallas"))
def _select_ranked(layer: LayerCache, priorities, row_kept, total, capacity: int,
                   pallas: bool) -> FlatLayerCache:
  """The layer's `capacity` candidate slots of highest priorities [B, K, S] over all its heads
  (ties to the lower head and slot), laid out head-wise (`FlatLayerCache.from_selection`).
  With `row_kept` [B, K, S] (global ranking), a row's own picks come first and are real; the
  next best up to `total` are empty (the row's filler where another row keeps more) and the
  rest up to `capacity` reserved (shape padding). `pallas`, read while tracing, keys the
  compiled calls."""
  del pallas
  b, k, s = priorities.shape
  rows = jnp.arange(b)[:, None]
  if row_kept is not None:
    priorities = jnp.where(row_kept, jnp.inf, priorities)
  _, chosen = jax.lax.top_k(priorities.reshape(b, k * s), capacity)
  selected = jnp.zeros((b, k * s), bool).at[rows, chosen].set(True).reshape(b, k, s)
  positions = layer.positions
  if row_kept is not None:
    filler = jnp.where(jnp.arange(capacity) < total, EMPTY_POSITION, RESERVED_POSITION)
    fill = jnp.full((b, k * s), RESERVED_POSITION, jnp.int32).at[rows, chosen].set(
        jnp.broadcast_to(filler, (b, capacity))).reshape(b, k, s)
    positions = jnp.where(row_kept, positions, fill)
  flat = FlatLayerCache.from_selection(layer.replace(state=positions), selected, capacity)
  return flat.replace(positions=flat.state, state=None)


@registry.register
@dataclasses.dataclass(frozen=True)
class KVzip(base.Method):
  """Context-reconstruction scores (see the module docstring); defaults as the paper's
  code: 4 sinks, 2048-token repeat chunks, one ranking over all layers and heads."""
  name: ClassVar[str] = "kvzip"
  headwise: ClassVar[bool] = True
  rescores: ClassVar[bool] = True
  pads_shapes: ClassVar[bool] = True
  sinks: int = 4
  chunk_size: int = 2048
  layerwise: bool = False

  def __post_init__(self):
    base.check_int("sinks", self.sinks, 0)
    base.check_int("chunk_size", self.chunk_size, PREVIOUS_TOKENS + 1)

  def score(self, x):
    raise MethodError("kvzip scores the whole prefilled context by reconstruction; it has no "
                      "per-chunk score (use it as the method itself, not as a press)")

  def rescoring_policy(self) -> ReconstructionProbe:
    return ReconstructionProbe(self.sinks)

  def rescoring_passes(self, tokenizer, tokens: np.ndarray, mask: np.ndarray, draft=None):
    """[(rows: token ids per row, {"start": [B], "end": [B]} int32)] one repeat pass per
    chunk of the longest context; a row whose context is shorter has an empty row."""
    del draft
    if tokenizer is None:
      raise MethodError("kvzip builds its repeat prompt with the model's tokenizer; this "
                        "model has none")
    contexts = [np.asarray(t)[np.asarray(m, bool)].tolist() for t, m in zip(tokens, mask)]
    suffix = repeat_suffix(tokenizer)
    first = tokenizer.encode(REPEAT_FIRST, add_special_tokens=False)
    later = tokenizer.encode(REPEAT_NEXT, add_special_tokens=False)
    c = self.chunk_size
    passes = []
    for i in range(math.ceil(max(len(row) for row in contexts) / c)):
      rows, start, end = [], [], []
      for row in contexts:
        chunk = row[i * c:(i + 1) * c]
        prompt = first if i == 0 else later + row[i * c - PREVIOUS_TOKENS:i * c]
        rows.append(prompt + suffix + chunk if chunk else [])
        start.append(i * c)
        end.append(i * c + len(chunk))
      passes.append((rows, {"start": np.asarray(start, np.int32),
                            "end": np.asarray(end, np.int32)}))
    return passes

  def kept_budgets(self, cache, budgets):
    """Slots per KV head each layer holds on average (its flat slots, less the reserved
    ones of its shared size, over its heads)."""
    del budgets
    return tuple((layer.capacity - kv_cache.shape_padding(layer)) // layer.num_kv_heads
                 for layer in cache.layers)

  def cache_stats(self, cache) -> dict:
    """Slots each layer holds over all its KV heads (KVzip's layers keep different counts),
    without the reserved slots of its shared size, and with them."""
    return {"slots_per_layer": [layer.capacity - kv_cache.shape_padding(layer)
                                for layer in cache.layers],
            "allocated_slots_per_layer": [layer.capacity for layer in cache.layers]}

  def rescored(self, cache, scores, budgets):
    """The cache compressed by the passes' scores (a list, per pass, of per-layer [B, K, S])."""
    layers = cache.layers
    k = layers[0].keys.shape[1]
    positions = np.stack([host_array(layer.positions) for layer in layers])   # [L, B, K, S]
    best = np.max(np.stack([np.stack([host_array(s) for s in passes]) for passes in scores]),
                  axis=0)
    best = np.where(positions < self.sinks, SINK_SCORE, best)
    best = np.where(positions >= 0, best, -np.inf)
    n, b = best.shape[:2]
    if self.layerwise:
      totals = [min(k * keep, positions.shape[-1] * k) for keep in budgets]
      kept = [None] * n
    else:
      ranked = best.transpose(1, 0, 2, 3).reshape(b, -1)
      chosen = np.argsort(-ranked, axis=1, kind="stable")[:, :k * sum(budgets)]
      # Only real entries count: a row shorter than its quota keeps all it has.
      kept = np.zeros(ranked.shape, bool)
      for row, (c, r) in enumerate(zip(chosen, ranked)):
        kept[row, c[np.isfinite(r[c])]] = True
      kept = kept.reshape((b, n) + best.shape[2:]).transpose(1, 0, 2, 3)  # [L, B, K, S]
      totals = [max(1, int(t)) for t in kept.sum((2, 3)).max(1)]  # no layer of size 0
    # Padded to shared sizes with reserved slots, so that a new prompt's slot counts
    # mostly meet compiled shapes (layerwise totals are the budget's: no padding).
    capacities = totals if self.layerwise else shared_capacities(
        (self, tuple(layer.keys.shape for layer in layers)), totals, [p.size // b for p in best])
    out = []
    for layer, prio, row_kept, total, capacity in zip(layers, best, kept, totals, capacities):
      out.append(_select_ranked(layer.replace(state=None), jnp.asarray(prio),
                                None if row_kept is None else jnp.asarray(row_kept),
                                jnp.int32(total), capacity=capacity, pallas=use_pallas()))
    return cache.replace(layers=tuple(out))
