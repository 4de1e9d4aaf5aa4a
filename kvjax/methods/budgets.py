"""Per-layer budget schedules: integer budgets that sum exactly to the uniform total."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kvjax.errors import MethodError


def distribute(total: int, weights, low: int, high: int) -> tuple[int, ...]:
  """Integers proportional to `weights`, each in [low, high], summing to `total`.

  Largest-remainder rounding, so memory is exactly what a uniform budget would use. Values
  that hit a bound are fixed and the rest is shared again among the others.
  """
  weights = np.asarray(weights, np.float64)
  n = len(weights)
  if not low * n <= total <= high * n:
    raise MethodError(f"cannot split {total} slots over {n} layers with each in "
                      f"[{low}, {high}]")
  if (weights < 0).any() or weights.sum() <= 0:
    raise MethodError(f"budget weights {weights.tolist()} must be >= 0 with a positive sum")
  fixed = np.full(n, -1.0)
  while True:
    free = fixed < 0
    remaining = total - fixed[~free].sum()
    w = weights[free]
    share = remaining * w / w.sum() if w.sum() > 0 else np.full(w.shape, remaining / len(w))
    over, under = share > high, share < low
    if not over.any() and not under.any():
      break
    idx = np.flatnonzero(free)
    fixed[idx[over]] = high
    fixed[idx[under]] = low
  exact = fixed.copy()
  exact[free] = share
  floor = np.floor(exact).astype(np.int64)
  short = int(total - floor.sum())
  order = np.argsort(-(exact - floor), kind="stable")
  floor[order[:short]] += 1
  return tuple(int(v) for v in floor)


def pyramid(num_layers: int, keep: int, window: int, context_length: int,
            beta: float) -> tuple[int, ...]:
  """PyramidKV: linearly decreasing budgets from the first to the last layer.

  keep includes the window. With b = keep - window, the selected part goes from
  max = 2b - b/beta down to b/beta, capped at the context (then min = 2b - max); contexts
  shorter than 2b get a uniform budget. The integer budgets sum exactly to
  num_layers * keep (PyramidKV's own integer division loses a few slots), and every layer
  selects at least one token besides its window (b/beta < 1 could otherwise round a layer
  down to its window alone, a budget kvjax's protection check rejects).
  """
  b = keep - window
  if b <= 0 or context_length < 2 * b or num_layers == 1:
    return (keep,) * num_layers
  low = b / beta
  high = 2 * b - low
  if high >= context_length - window:
    high = context_length - window
    low = 2 * b - high
  steps = np.arange(num_layers)
  selected = high - steps * (high - low) / (num_layers - 1)
  return tuple(v + window for v in distribute(num_layers * b, selected, 1,
                                              context_length - window))


def kvpress_pyramid(num_layers: int, keep: int, window: int, context_length: int,
                    beta: float) -> tuple[int, ...]:
  """kvpress's PyramidKV schedule: the pyramid spans the whole budget, window included.

  kvpress (`PyramidKVPress.get_layer_budget`, kvpress/presses/pyramidkv_press.py), with
  b = keep the mean budget per layer (window included) and n the context length: min = b/beta
  and max = 2b - min; if max >= n - window then max = n - window and min = 2b - max. Unless
  n >= max >= min >= window, every layer gets b (kvpress falls back to SnapKV); otherwise
  layer l keeps max - l (max - min) / (L - 1) tokens, its window included.

  kvpress rounds each layer separately, from b = n (1 - ratio) unrounded; here the integers
  come from `distribute`, so they sum exactly to num_layers * keep, and every layer keeps at
  least window + 1 tokens (kvpress can leave a layer exactly its window, e.g. at ratio 0.5
  whenever the cap applies, which kvjax's protection rule does not allow).
  """
  b = keep
  if num_layers == 1 or keep <= window:  # no layer could keep more than its window
    return (keep,) * num_layers
  low = b / beta
  high = 2 * b - low
  if high >= context_length - window:
    high = context_length - window
    low = 2 * b - high
  if not context_length >= high >= low >= window:
    return (keep,) * num_layers
  steps = np.arange(num_layers)
  totals = high - steps * (high - low) / (num_layers - 1)
  return distribute(num_layers * keep, totals, window + 1, context_length)


def share(keep, numerator: float, denominator: float = 1.0):
  """round(keep * numerator / denominator) (halves to even): a host int for an int `keep`;
  for a traced one (a decode step's budget, kvjax.generation.engine) an int32 computed as
  float32(keep) x float32(numerator / denominator): one multiplication, since XLA folds
  the constants of keep x a / b into one anyway; it equals the host value where
  `shares_alike` says so."""
  if isinstance(keep, (int, np.integer)):
    return int(round(keep * numerator / denominator))
  scaled = keep.astype(jnp.float32) * jnp.float32(numerator / denominator)
  return jnp.round(scaled).astype(jnp.int32)


def shares_alike(keep: int, numerator: float, denominator: float = 1.0) -> bool:
  """Whether `share` of a traced `keep` (its float32 multiplication, which numpy's float32
  does the same IEEE way) equals the host's float64 value."""
  scaled = np.float32(keep) * np.float32(numerator / denominator)
  return int(np.round(scaled)) == share(int(keep), numerator, denominator)
