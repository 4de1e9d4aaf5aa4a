"""CompressKV: semantic retrieval heads choose the tokens, error-aware budgets size the layers.

Reading: the official code (TUDa-HWAI/CompressKV), `methods/compresskv/snapkv_utils.py`
(`compresskvCluster.update_kv`) for the selection and `longbench/pred_compresskv.py`
(`error_aware_layer_budget_allocation`) for the budgets. The per-model head scores and
layer error profile come from `kvjax.calibration.compresskv`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from kvjax import validation
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.ops import attention as attention_ops


def semantic_votes(x: base.LayerInputs, heads: tuple[int, ...], window: int,
                   kernel_size: int, pooling: str) -> jnp.ndarray:
  """[B, K, S] the same score for every KV head: SnapKV votes (the last `window` queries'
  causal attention summed per key, window keys zeroed, pooled along the keys) of the
  query heads `heads` only, averaged over them."""
  sums = attention_ops.window_column_sums(x.queries, x.keys, x.query_positions,
                                         x.key_positions, window)       # [B, H, S]
  in_window = base.window_mask(x.key_positions, x.lengths, window)[:, :1]   # [B, 1, S]
  chosen = jnp.where(in_window, 0.0, sums[:, jnp.asarray(heads)])      # [B, n, S]
  pooled = base.pool1d(chosen, kernel_size, pooling).mean(1)            # [B, S]
  return jnp.broadcast_to(pooled[:, None], x.key_positions.shape)


def error_aware_budgets(weights, total: int, low: int, high: int) -> tuple[int, ...]:
  """The official allocation: low + round(u_l (total - L low)) per layer, clipped to
  [low, high], then moved to `total` one slot at a time: slots are added to layers below
  `high` in decreasing weight order, removed from layers above `low` in increasing weight
  order, sweeping the layers until the sum is `total` (ties to the earlier layer)."""
  weights = np.asarray(weights, np.float64)
  n = len(weights)
  if not low * n <= total <= high * n:
    raise MethodError(f"cannot split {total} slots over {n} layers with each in "
                      f"[{low}, {high}]")
  budget = np.clip(low + np.round(weights * (total - low * n)), low, high).astype(np.int64)
  grow_order = np.argsort(-weights, kind="stable")
  shrink_order = np.argsort(weights, kind="stable")
  diff = int(total - budget.sum())
  while diff:
    order, step, room = ((grow_order, 1, budget < high) if diff > 0
                         else (shrink_order, -1, budget > low))
    for layer in order:
      if room[layer] and diff:
        budget[layer] += step
        diff -= step
  return tuple(int(b) for b in budget)


def top_heads(head_scores, first_k: int) -> tuple[int, ...]:
  """Per layer, a bitmask of the `first_k` query heads of highest score (ties to the lower
  head id), from scores [L][H]."""
  scores = np.asarray(head_scores, np.float64)
  return tuple(int(sum(1 << int(h) for h in np.lexsort((np.arange(len(row)), -row))[:first_k]))
               for row in scores)


def mask_heads(mask: int) -> tuple[int, ...]:
  """The query head ids set in a bitmask."""
  return tuple(h for h in range(mask.bit_length()) if (mask >> h) & 1)


def _parse(value, convert):
  """A tuple from a comma-separated string (the command line) or a sequence, else None."""
  if isinstance(value, str):
    value = [item for item in value.split(",") if item.strip()]
  elif validation.is_number(value):   # one layer, as the command line parses "5"
    value = (value,)
  try:
    return tuple(convert(item) for item in value)
  except (TypeError, ValueError, OverflowError):
    return None


def _mask(item) -> int:
  if isinstance(item, bool) or not float(item).is_integer():
    raise ValueError(item)
  return int(item)


@registry.register
@dataclasses.dataclass(frozen=True)
class CompressKV(base.RecentWindow, base.Method):
  """CompressKV (TUDa-HWAI/CompressKV): per layer, SnapKV votes (window 8, causal inside the
  window, summed over the window's queries, average pooling with kernel 5) computed only
  on the layer's `first_k` semantic retrieval query heads and averaged over them; the top
  budget - window tokens plus the last `window` are kept, the same indices for every KV
  head. Layer budgets are error-aware: B_l = min_budget + round(u_l (L B - L min_budget)),
  clipped to [min_budget, max_factor B], moved by +-1 in weight order until they sum to
  L B (`error_aware_budgets`), so the cache holds exactly as many slots as a uniform B.

  heads: per layer, a bitmask of the query heads that vote (bit h: head h; calibration sets
  the `first_k` best; on the command line "9,6,..."); layer_weights: u_l, the
  L1-normalised layer error profile. Both () mean "calibrate for the model"
  (`kvjax.calibration.bind`, which generate, score, converse and the sweep call; see
  `kvjax.calibration.compresskv` for how they are measured). Defaults are the code's:
  window 8, kernel 5, avg pooling, first_k 4, budgets in [32, 3B]. GQA: the votes are
  per query head and the chosen indices are shared by every KV head, as in the code.

  Differences from the official code: a layer's budget is also capped at the context length
  (the code's layer would keep its whole, shorter prompt and leave the rest of its share
  unused; here the rest goes to the other layers, so the bytes follow the budget); under a
  mean budget below min_budget every layer keeps the mean budget (the code's formula would
  give negative extras); kept tokens stay in position order (the code's gather leaves them
  in score order, which only matters to later pooling; attention is order-free); a context
  within a layer's budget is kept whole, as in the code. Prefill in chunks re-selects
  among the kept slots and the new chunk at each chunk's end (the code compresses once).
  """
  name: ClassVar[str] = "compresskv"
  calibration: ClassVar[str] = "compresskv"
  window: int = 8
  kernel_size: int = 5
  pooling: str = "avg"
  first_k: int = 4
  min_budget: int = 32
  max_factor: float = 3.0
  heads: tuple = ()
  layer_weights: tuple = ()

  def __post_init__(self):
    base.check_int("window", self.window, 1)
    base.check_int("kernel_size", self.kernel_size, 1)
    if self.kernel_size % 2 == 0:
      raise MethodError(f"compresskv kernel_size={self.kernel_size} must be odd (centred "
                        f"pooling)")
    base.check_choice("pooling", self.pooling, ("avg", "max"))
    base.check_int("first_k", self.first_k, 1)
    base.check_int("min_budget", self.min_budget, 1)
    if self.min_budget < self.window:
      # A layer can get min_budget slots, and every layer keeps its window.
      raise MethodError(f"compresskv min_budget={self.min_budget} must be at least "
                        f"window={self.window}: every layer keeps its last window tokens")
    base.check_number("max_factor", self.max_factor, 1, what="the largest layer budget as "
                      "a multiple of the mean budget")
    heads = _parse(self.heads, _mask)
    if heads is None or any(h < 1 for h in heads):
      raise MethodError(f"compresskv heads={self.heads!r} must be per-layer bitmasks (ints "
                        f">= 1, bit h set: query head h votes), or () to calibrate")
    weights = _parse(self.layer_weights, float)
    if weights is None or any(not np.isfinite(w) or w < 0 for w in weights) or (
        weights and sum(weights) <= 0):
      raise MethodError(f"compresskv layer_weights={self.layer_weights!r} must be per-layer "
                        f"finite numbers >= 0 with a positive sum, or () to calibrate")
    if len(heads) != len(weights):
      raise MethodError(f"compresskv heads ({len(heads)} layers) and layer_weights "
                        f"({len(weights)} layers) come from one calibration: give both for "
                        f"every layer, or neither")
    object.__setattr__(self, "heads", heads)
    object.__setattr__(self, "layer_weights", weights)

  def needs_calibration(self) -> bool:
    return not self.heads

  def calibrated(self, result: dict) -> "CompressKV":
    """The method with a calibration's head scores ([L][H]) and layer weights ([L])."""
    return dataclasses.replace(self, heads=top_heads(result["head_scores"], self.first_k),
                               layer_weights=tuple(float(w) for w in result["layer_weights"]))

  def _check_model(self, num_layers: int, num_heads: int) -> None:
    if not self.heads:
      raise MethodError("compresskv has no semantic heads or layer weights: bind it to a "
                        "model first (kvjax.calibration.bind(method, model) calibrates it)")
    if len(self.heads) != num_layers or max(self.heads) >> num_heads:
      raise MethodError(f"compresskv heads={self.heads} (bitmasks per layer) do not fit this "
                        f"model's {num_layers} layers of {num_heads} query heads: calibrated "
                        f"for another model?")

  def layer_budgets(self, config, keep, context_length):
    self._check_model(config.num_layers, config.num_heads)
    n = config.num_layers
    if keep >= context_length:
      # Every layer keeps its whole context (the cap below would leave no room for L x keep).
      return (keep,) * n
    low = min(self.min_budget, keep)
    high = max(low, min(int(self.max_factor * keep), context_length))
    return error_aware_budgets(self.layer_weights, n * keep, low, high)

  def score(self, x):
    self._check_model(x.config.num_layers, x.config.num_heads)
    return semantic_votes(x, mask_heads(self.heads[x.layer]), self.window, self.kernel_size,
                          self.pooling)

  def cache_stats(self, cache):
    return {"layer_budgets": [int(layer.capacity) for layer in cache.layers]}
