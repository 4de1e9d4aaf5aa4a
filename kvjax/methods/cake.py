"""CAKE: cascading and adaptive KV-cache eviction (Qin et al., ICLR 2025, arXiv 2503.12491;
official code antgroup/cakekv).

Each layer's last `window` prompt queries attend over the context (A, SnapKV's window
attention). Restricted to the keys before the window (A'), they give the layer's
preference P = H^(1/tau1) * V^(1/tau2): H the entropy of A' (spatial dispersion) and V its
variance over the window's queries (temporal shift), both summed over heads and keys. Each
key before the window gets the eviction indicator mean(A) + gamma * var(A) over the window's
queries, average-pooled (kernel 5, zero padding counted) along the keys and averaged over
each KV head's query heads.

Budgets: the context keeps (budget - window) * num_layers indicator-chosen tokens in all,
plus every layer's window. Cascading (the default, the paper's scheme): after each layer m
is prefilled, the total is shared among layers 0..m in proportion to their preferences
(`adjust_budgets`: capped at the tokens before the window, the excess spread evenly), and
every layer seen so far is re-evicted to its share by top-k of its stored indicator. A layer
never gets back what it lost, so its final budget is the least of its shares from its own
step to the last; that is how memory stays within the total while layers are prefilled.
`cascading=False` allocates once, after the last layer. Decode: each step the new query's
attention to the tokens before the window, pooled and group-averaged, picks the slot the new
token replaces, so every layer stays at its budget.

How kvjax runs it: the forward pass keeps every layer's chunk with its per-slot indicator and
preference terms; the cascade's budgets and the evictions are settled on the host once the
context is in (`finalize`; under chunked prefill also between chunks, so memory stays
bounded by the budgets plus one chunk and the padding below). Layers then really hold
different numbers of slots, padded in front with reserved slots to shared capacities
(`kv_cache.shared_capacities`; the padding is reported apart); in a batch, a row that keeps
fewer slots than another has its reserved slots in front too, so that its kept slots meet
the room appended after them, as alone (a row whose context is within its budget still
decodes differently from alone, as it did before).
Where kvjax differs from the code: preferences are per batch row (the code sums them over the
batch); a context no longer than budget + window is still compressed to the budget (the code
leaves it whole up to budget + window; a context within the budget is kept whole); kept
slots stay in position order (the code's top-k leaves them in score order, so its
decode-time pooling mixes neighbours in score order; kvjax pools in slot order too, which
after chunked prefill or decode-time overwrites also joins tokens that are not adjacent); a
layer whose share rises later does not regrow during decode. Defaults are the code's: window 32, gamma 200,
kernel 5, tau1 = tau2 = 1 (its fallback for models without tuned values in model2tau.json,
which SmolLM2 and Qwen2.5 lack). The code's LongBench script runs cascading only with
--cascading; kvjax defaults to it, as the paper presents it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import kv_cache
from kvjax.cache.kv_cache import (EMPTY_POSITION, RESERVED_POSITION, LayerCache,
                                  shared_capacities)
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.ops.dispatch import use_pallas
from kvjax.ops.host import host_array

ENTROPY_EPSILON = 1e-10
INDICATOR, DISPERSION, SHIFT = 0, 1, 2   # the per-slot state's last axis


def adjust_budgets(shares, total: int, cap: int) -> np.ndarray:
  """CAKE's integer budgets from float `shares`: truncated, capped at `cap` with the excess
  spread evenly over the layers below the cap (the first ones get the remainder), then the
  sum moved to `total` the same way (raised only below the cap, lowered only above 1)."""
  budget = np.asarray(shares, np.float64).astype(np.int64)
  excess = int(np.maximum(budget - cap, 0).sum())
  budget = np.minimum(budget, cap)

  def spread(amount: int, where: np.ndarray, sign: int) -> None:
    index = np.flatnonzero(where)
    if amount and len(index):
      budget[index] += sign * (amount // len(index))
      budget[index[:amount % len(index)]] += sign

  spread(excess, budget < cap, 1)
  diff = total - int(budget.sum())
  if diff > 0:
    spread(diff, budget < cap, 1)
  elif diff < 0:
    spread(-diff, budget > 1, -1)
  return budget


def cascade_budgets(preferences, total: int, cap: int, cascading: bool = True) -> np.ndarray:
  """Selected tokens (window excluded) each layer keeps: with `cascading`, the least of
  its shares over the steps from its own layer to the last, never above `cap`."""
  preferences = np.asarray(preferences, np.float64)
  n = len(preferences)
  final = np.full(n, max(cap, 0), np.int64)
  if total >= n * cap:   # the row fits its budget: every layer keeps it all
    return final
  for m in range(n) if cascading else [n - 1]:
    seen = preferences[:m + 1]
    weights = seen / seen.sum() if np.isfinite(seen).all() and seen.sum() > 0 else (
        np.full(m + 1, 1.0 / (m + 1)))
    final[:m + 1] = np.minimum(final[:m + 1], adjust_budgets(weights * total, total, cap))
  return np.maximum(final, 0)


# Evicted layers hold different data-dependent slot counts, so each is padded in front to
# a shared capacity (`kv_cache.shared_capacities`). SmolLM2, 700 tokens, ratio 0.5, a second
# prompt of that length: 25-29 s before (14-20 s of selection compiles, then the decode
# loop's 9-10 s), 8.6-10.2 s padded (decode loop 6.5-7.7 s); the allocation grew 9-11%,
# tokens unchanged. Sets reused across prompts (`shared_capacities`) may add up to a quarter.
@functools.partial(jax.jit, static_argnames="pallas")
def _select_filled(layer, index, real, fill, pallas: bool):
  """The layer's slots `index` [B, K, N], positions `fill` where not `real`. One compiled
  call per shape (`pallas`, read while tracing, keys the compiled calls)."""
  del pallas
  chosen = layer.select(index)
  return chosen.replace(positions=jnp.where(real, chosen.positions, fill))


def _before_window(key_positions, lengths, window: int, num_heads: int):
  """[B, H, S] the non-empty slots before each row's last `window` tokens, per query head."""
  before = (key_positions >= 0) & ~base.window_mask(key_positions, lengths, window)
  return jnp.repeat(before, num_heads // key_positions.shape[1], axis=1)


@registry.register
@dataclasses.dataclass(frozen=True)
class CAKE(base.Method):
  """Layer budgets from attention dispersion and shift, settled by a cascade; eviction by
  mean + gamma * variance of the window's attention; decode-time eviction to each layer's
  budget (see the module docstring). `mean_budget` is set by `fitted` (the compression
  ratio's budget per layer and KV head, window included)."""
  name: ClassVar[str] = "cake"
  decode_time: ClassVar[bool] = True
  pads_shapes: ClassVar[bool] = True
  layerwise_prefill: ClassVar[bool] = True   # `compact` reads no layer index or budget
  wrappable: ClassVar[bool] = False   # its budgets are settled after the forward pass
  window: int = 32
  kernel_size: int = 5
  gamma: float = 200.0
  tau1: float = 1.0
  tau2: float = 1.0
  cascading: bool = True
  mean_budget: int = 0

  def __post_init__(self):
    base.check_int("window", self.window, 1)
    base.check_int("kernel_size", self.kernel_size, 1)
    if self.kernel_size % 2 == 0:
      raise MethodError(f"kernel_size={self.kernel_size} must be odd (centred pooling)")
    base.check_number("gamma", self.gamma, 0)
    for name in ("tau1", "tau2"):
      value = getattr(self, name)
      base.check_number(name, value, 0)
      if value == 0:
        raise MethodError(f"cake {name}={value!r} must be > 0 (preferences take the 1/{name} "
                          f"power)")
    base.check_int("mean_budget", self.mean_budget, 0)

  def fitted(self, keep):
    """The budget recorded (the cascade shares it out after the forward pass); under a
    budget of at most the window, the window shrinks to budget - 1 (at least 1 query: one
    query's variance is 0, so its layers share the budget evenly)."""
    shrunk = base.shrink_protection(keep, window=(self.window, 1))
    if keep == self.mean_budget and not shrunk:
      return self
    return dataclasses.replace(self, mean_budget=keep, **shrunk)

  def decoding(self):
    # The budget is read on the host only (`finalize`, `between_chunks`).
    return dataclasses.replace(self, mean_budget=0) if self.mean_budget else self

  def budget_free_prefill(self):
    return self.decoding()   # prefill keeps every token (`compact`)

  def layer_budgets(self, config, keep, context_length):
    # Prefill keeps every token; `finalize` settles the cascade's budgets.
    return (max(keep, context_length),) * config.num_layers

  def protected_tokens(self, keep):
    return min(self.window, keep)

  def protected(self, key_positions, lengths, keep):
    return base.window_mask(key_positions, lengths, self.window)

  def init_state(self, shape):
    return jnp.zeros(tuple(shape) + (3,), jnp.float32)

  def prefill_state(self, x: base.LayerInputs):
    """[B, K, S, 3]: indicator, dispersion (entropy) and shift (variance) of each slot from
    this chunk's window; the two preference terms are zero in the window and on empty slots
    (A' leaves the window's keys out)."""
    w = min(self.window, x.queries.shape[1])
    probs = base.window_attention(x, w)                              # [B, H, W, S]
    real = (x.query_positions[:, -w:] >= 0)[:, None, :, None]        # [B, 1, W, 1]
    count = real.sum(2, keepdims=True).astype(jnp.float32)           # [B, 1, 1, 1]
    mean = probs.sum(2, keepdims=True) / jnp.maximum(count, 1)
    deviation = jnp.where(real, probs - mean, 0.0)
    variance = (deviation ** 2).sum(2) / jnp.maximum(count[:, :, 0] - 1, 1)   # unbiased
    entropy = -(probs * jnp.log(probs + ENTROPY_EPSILON)).sum(2)     # [B, H, S]
    k = x.keys.shape[1]
    before_h = _before_window(x.key_positions, x.lengths, w, x.queries.shape[2])  # [B, H, S]
    indicator = jnp.where(before_h, mean[:, :, 0] + self.gamma * variance, 0.0)
    indicator = base.reduce_groups(base.pool1d(indicator, self.kernel_size, "avg"), k, "mean")
    dispersion = base.reduce_groups(jnp.where(before_h, entropy, 0.0), k, "sum")
    shift = base.reduce_groups(jnp.where(before_h, variance, 0.0), k, "sum")
    return jnp.stack([indicator, dispersion, shift], -1)

  def score(self, x):
    return self.prefill_state(x)[..., INDICATOR]

  def compact(self, cand, x, keep):
    """Every candidate is kept with its state: the budgets depend on later layers."""
    del keep
    return cand.replace(state=self.prefill_state(x))

  def between_chunks(self, cache):
    return self._evicted(cache)

  def finalize(self, cache, config=None):
    del config
    return self._evicted(cache)

  def layer_token_budgets(self, cache) -> np.ndarray:
    """[L, B] selected tokens (window excluded) each layer keeps for each row."""
    lengths = host_array(cache.lengths)
    window = np.minimum(self.window, lengths)
    state = [host_array(layer.state).astype(np.float64) for layer in cache.layers]
    dispersion = np.stack([s[..., DISPERSION].sum((1, 2)) for s in state])   # [L, B]
    shift = np.stack([s[..., SHIFT].sum((1, 2)) for s in state])
    preference = dispersion ** (1 / self.tau1) * shift ** (1 / self.tau2)
    n = len(state)
    selected = max(self.mean_budget - self.window, 0) * n
    return np.stack([cascade_budgets(preference[:, row], selected,
                                     int(lengths[row] - window[row]), self.cascading)
                     for row in range(len(lengths))], axis=1)

  def _evicted(self, cache):
    """Each layer cut to its cascade budget per row: the window plus the top of the
    indicator; a layer holds the most any row keeps, rounded up to a shared capacity
    (`shared_capacities`). A row's other slots are reserved (`RESERVED_POSITION`: empty, and
    never written by decode, so each row stays at its own budget) and come first, except,
    for a row shorter than the budget, empty slots up to the budget after its kept ones."""
    if not self.mean_budget:
      raise MethodError("cake must be fitted to a budget first (method.fitted(keep))")
    budgets = self.layer_token_budgets(cache)
    lengths = host_array(cache.lengths)
    masks = [self._kept(layer, row_budgets, lengths)
             for layer, row_budgets in zip(cache.layers, budgets)]
    needed = [max(1, int(kept.sum(-1).max())) for kept in masks]
    padded = shared_capacities((self.decoding(),
                                tuple(layer.keys.shape for layer in cache.layers)),
                               needed, [layer.capacity for layer in cache.layers])
    out = []
    for layer, kept, capacity, capacity_padded in zip(cache.layers, masks, needed, padded):
      kept_first = np.argsort(~kept, axis=-1, kind="stable")[..., :capacity]
      # A row within its budget may still grow into its filler up to the budget (as alone,
      # where the rest of its budget is room): that filler follows its kept slots. The rest
      # is reserved, in front with the padding to a shared capacity (`shared_capacities`):
      # so a row's kept slots, in slot (position) order, meet the room appended after them,
      # as alone, and pooling in slot order reads the reserved slots' zeros as it reads the
      # zero padding before slot 0.
      count = kept.sum(-1, keepdims=True)                                  # [B, K, 1]
      growth = np.maximum(self.mean_budget - lengths, 0)[:, None, None]
      reserved = capacity_padded - count - np.minimum(growth, capacity - count)
      slot = np.arange(capacity_padded) - reserved                         # [B, K, C]
      index = np.take_along_axis(kept_first, np.clip(slot, 0, capacity - 1), axis=-1)
      real = (slot >= 0) & (slot < count)
      fill = np.where(slot < 0, RESERVED_POSITION, EMPTY_POSITION)
      out.append(_select_filled(layer.replace(state=None), jnp.asarray(index, jnp.int32),
                                jnp.asarray(real), jnp.asarray(fill, jnp.int32),
                                pallas=use_pallas()))
    return cache.replace(layers=tuple(out))

  def _kept(self, layer, row_budgets, lengths) -> np.ndarray:
    """[B, K, S] host mask of the slots a layer keeps: the window plus, per row, the top
    `row_budgets[row]` of the indicator before it."""
    if not isinstance(layer, LayerCache) or layer.state is None:
      raise MethodError(f"cake evicts dense layers carrying its state; got "
                        f"{type(layer).__name__}")
    positions = host_array(layer.positions)
    indicator = host_array(layer.state[..., INDICATOR]).astype(np.float64)
    in_window = (positions >= 0) & (
        positions >= (lengths - np.minimum(self.window, lengths))[:, None, None])
    before = (positions >= 0) & ~in_window
    prio = np.where(before, indicator, -np.inf)
    kept = in_window.copy()
    for row, budget in enumerate(row_budgets):
      order = np.argsort(-prio[row], axis=-1, kind="stable")[:, :budget]   # [K, budget]
      np.put_along_axis(kept[row], order, True, axis=-1)
    return kept & (positions >= 0)

  def kept_budgets(self, cache, budgets):
    """Real slots per KV head each layer keeps, averaged over the rows (a layer's slot
    count is the most any row keeps there; the other rows' extra slots are reserved)."""
    del budgets
    return tuple(int(round(float(np.mean(host_array(layer.positions)[:, 0] >= 0, axis=0).sum())))
                 for layer in cache.layers)

  def cache_stats(self, cache) -> dict:
    """Slots each layer holds per KV head (CAKE's layers keep different counts), without
    the reserved slots padded in front (`_evicted`), and with them."""
    return {"slots_per_layer": [int(layer.capacity) - kv_cache.shape_padding(layer)
                                for layer in cache.layers],
            "allocated_slots_per_layer": [int(layer.capacity) for layer in cache.layers]}

  # Decode: the new query's attention picks the slot to replace; no per-slot state.
  def decode_scores(self, state, probs, own_prob, key_positions, lengths):
    return None, None

  def eviction_priority(self, state, probs, key_positions, lengths, budget):
    k = key_positions.shape[1]
    before_h = _before_window(key_positions, lengths, self.window, probs.shape[1])
    pooled = base.pool1d(jnp.where(before_h, probs, 0.0), self.kernel_size, "avg")
    return base.reduce_groups(pooled, k, "mean")
