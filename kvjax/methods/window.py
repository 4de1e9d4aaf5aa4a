"""Observation-window voting: SnapKV and PyramidKV."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from kvjax.methods import base, budgets, registry
from kvjax.ops import attention as attention_ops


def window_votes(x: base.LayerInputs, window: int, kernel_size: int, pooling: str,
                 gqa: str) -> jnp.ndarray:
  """[B, K, S] SnapKV scores: the last `window` queries' attention summed per key, the window's
  own keys excluded (zeroed) before pooling per query head, then reduced over each group."""
  sums = attention_ops.window_column_sums(x.queries, x.keys, x.query_positions,
                                         x.key_positions, window)  # [B, H, S]
  in_window = base.window_mask(x.key_positions, x.lengths, window)  # [B, K, S]
  group = sums.shape[1] // in_window.shape[1]
  sums = jnp.where(jnp.repeat(in_window, group, axis=1), 0.0, sums)
  pooled = base.pool1d(sums, kernel_size, pooling)
  return base.reduce_groups(pooled, x.keys.shape[1], gqa)


@registry.register
@dataclasses.dataclass(frozen=True)
class SnapKV(base.RecentWindow, base.Method):
  """SnapKV: the last `window` prompt tokens vote for the earlier tokens each head keeps.

  The budget includes the window, which is always kept. GQA-aware: pooled scores are reduced
  over each group's query heads and every KV head selects its own tokens.

  Defaults (window=32, kernel_size=7, pooling="max") are SnapKV's shipped LongBench configs
  (FasterDecoding/SnapKV, `ablation_c{1024,2048,4096}_w32_k7_maxpool.json`); SnapKV's code
  falls back to w=32, k=5, avg pooling when no config is given. kvpress's SnapKVPress
  (kvpress/presses/snapkv_press.py) defaults to window_size=64, kernel_size=5, avg pooling
  (torch avg_pool1d, zero padding counted) and averages the pooled scores over each GQA
  group. To reproduce kvpress pass `SnapKV(window=64, kernel_size=5, pooling="avg",
  gqa="mean")` with the same compression_ratio (kvpress takes the mean of the window's
  attention where kvjax takes the sum: a constant factor, the same ranking).
  """
  name: ClassVar[str] = "snapkv"
  layerwise_prefill: ClassVar[bool] = True
  window: int = 32
  kernel_size: int = 7
  pooling: str = "max"
  gqa: str = "mean"

  def __post_init__(self):
    base.check_int("window", self.window, 1)
    base.check_int("kernel_size", self.kernel_size, 1)
    if self.kernel_size % 2 == 0:
      raise base.MethodError(f"kernel_size={self.kernel_size} must be odd (centred pooling)")
    base.check_choice("pooling", self.pooling, ("max", "avg", "none"))
    base.check_choice("gqa", self.gqa, ("mean", "max", "sum"))

  def score(self, x):
    return window_votes(x, self.window, self.kernel_size, self.pooling, self.gqa)


@registry.register
@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
  """SnapKV selection with pyramid-shaped layer budgets (more in lower layers).

  Budgets sum exactly to num_layers x budget, so the memory equals a uniform budget's.

  `schedule` picks how the pyramid treats the observation window:
  - "pyramidkv" (default), PyramidKV's own code (KVCache-Factory `PyramidKVCluster`): the
    pyramid spreads budget - window selected tokens over the layers and every layer adds
    its window back (`budgets.pyramid`).
  - "kvpress", kvpress's `PyramidKVPress.get_layer_budget`
    (kvpress/presses/pyramidkv_press.py): the pyramid spreads the whole budget, window
    included, and falls back to a uniform (SnapKV) budget unless the smallest layer still
    holds its window (`budgets.kvpress_pyramid`).

  Window, kernel and pooling defaults are SnapKV's (window=32, kernel_size=7, max pooling:
  SnapKV's shipped LongBench configs); beta=20 is PyramidKV's and kvpress's. KVCache-Factory's
  LongBench script uses window 8, max pooling with kernel 7. kvpress's PyramidKVPress defaults
  to window_size=64, kernel_size=5, avg pooling, beta=20; to reproduce it pass
  `PyramidKV(window=64, kernel_size=5, pooling="avg", gqa="mean", schedule="kvpress")`. Layer
  budgets then differ from kvpress's by at most a token or two per layer: kvpress rounds each
  layer separately from the unrounded float budget (so its layers do not sum to an exact
  total), and can leave its last layer exactly the window, where kvjax keeps at least one
  more token.
  """
  name: ClassVar[str] = "pyramidkv"
  # SnapKV's scores at every layer, only the budgets differ (kvjax.generation.engine).
  layerwise_prefill: ClassVar[bool] = True
  beta: float = 20.0
  schedule: str = "pyramidkv"

  def __post_init__(self):
    super().__post_init__()
    base.check_number("beta", self.beta, 1)
    base.check_choice("schedule", self.schedule, ("pyramidkv", "kvpress"))

  def layer_budgets(self, config, keep, context_length):
    schedule = budgets.pyramid if self.schedule == "pyramidkv" else budgets.kvpress_pyramid
    return schedule(config.num_layers, keep, self.window, context_length, self.beta)
