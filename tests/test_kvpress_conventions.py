"""kvjax against kvpress's conventions, restated here from kvpress's source (not from kvjax).

- compression_ratio -> kept tokens: kvpress's ScorerPress.compress
  (kvpress/presses/scorer_press.py) keeps `int(k_len * (1 - compression_ratio))`.
- PyramidKV layer budgets: kvpress's PyramidKVPress.get_layer_budget
  (kvpress/presses/pyramidkv_press.py), offered in kvjax as PyramidKV(schedule="kvpress").
"""

import itertools

import numpy as np
import pytest

from kvjax import methods
from kvjax.errors import MethodError
from kvjax.methods import Knorm, PyramidKV
from tiny import tiny_config

# (context length, compression ratio). Marked rows are where round() and int() disagree.
RATIO_TABLE = [
    (1024, 0.5), (1024, 0.75), (1024, 0.9), (2048, 0.5), (2048, 0.75),
    (2048, 0.9),   # 204.79999999999995: kvpress keeps 204, round() gave 205
    (2047, 0.9),   # 204.69999999999996: 204 vs 205
    (30, 0.15),    # 25.5: 25 vs round-half-even 26
    (3, 0.5),      # 1.5: 1 vs 2
    (1000, 0.7),   # 300.00000000000006: 300 either way
    (129, 0.5),    # 64.5: 64 either way (round half to even)
    (4000, 0.1), (777, 0.33), (513, 0.875),
]


def kvpress_kept(length: int, ratio: float) -> int:
  """kvpress's rule, as its ScorerPress states it."""
  return int(length * (1 - ratio))


@pytest.mark.parametrize("length,ratio", RATIO_TABLE)
def test_ratio_to_budget_truncates_like_kvpress(length, ratio):
  assert methods.validate_compression(Knorm(), [length], ratio) == kvpress_kept(length, ratio)
  # The ratio applies to the longest context of a batch.
  assert methods.validate_compression(Knorm(), [length // 2, length, 1], ratio) == \
      kvpress_kept(length, ratio)


def test_the_table_holds_cases_where_rounding_differs():
  differ = [(n, r) for n, r in RATIO_TABLE if round(n * (1 - r)) != kvpress_kept(n, r)]
  assert (2048, 0.9) in differ and len(differ) >= 4


def test_ratio_never_keeps_zero_tokens():
  # kvpress would keep int(7 * 0.05) = 0 tokens (an empty cache); kvjax keeps 1.
  assert kvpress_kept(7, 0.95) == 0
  assert methods.validate_compression(Knorm(), [7], 0.95) == 1


def test_ratio_of_other_real_types_uses_the_float_expression():
  assert methods.validate_compression(Knorm(), [np.int64(2048)], np.float64(0.9)) == 204
  assert methods.validate_compression(Knorm(), 2048, 0.9) == 204


# -- PyramidKV: kvpress's schedule ------------------------------------------------------------


def kvpress_layer_budgets(num_layers, q_len, ratio, window, beta):
  """PyramidKVPress.get_layer_budget for every layer, restated from kvpress's formula.

  The mean budget is b = q_len (1 - ratio), window included (kvpress writes it as
  max_capacity_prompt - window_size with max_capacity_prompt = window + q_len (1 - ratio)).
  """
  b = q_len * (1 - ratio)
  smallest = b / beta
  largest = 2 * b - smallest
  if largest >= q_len - window:
    largest = q_len - window
    smallest = 2 * b - largest
  if not q_len >= largest >= smallest >= window:
    return [round(b)] * num_layers, None   # kvpress falls back to SnapKV
  step = (largest - smallest) / (num_layers - 1)
  exact = [largest - layer * step for layer in range(num_layers)]
  return [round(x) for x in exact], exact


# (layers, context length, ratio, window, beta): ratios where q_len (1 - ratio) is exact.
PYRAMID_CASES = [
    (30, 1024, 0.5, 64, 20),    # capped at n - w; kvpress's last layer keeps just its window
    (30, 4096, 0.5, 64, 20),    # uncapped pyramid
    (24, 2048, 0.75, 16, 10),   # uncapped, another beta
    (8, 200, 0.5, 8, 4),
    (6, 1000, 0.6, 16, 5),
    (32, 4096, 0.75, 64, 20),   # min = 51.2 < window: kvpress falls back to uniform
    (30, 1280, 0.75, 32, 20),   # min = 16 < window: uniform
]


@pytest.mark.parametrize("num_layers,q_len,ratio,window,beta", PYRAMID_CASES)
def test_kvpress_schedule_matches_kvpress(num_layers, q_len, ratio, window, beta):
  keep = methods.validate_compression(PyramidKV(window=window), [q_len], ratio)
  assert keep == q_len * (1 - ratio)  # the case list keeps b an integer
  method = PyramidKV(window=window, beta=beta, schedule="kvpress")
  got = np.asarray(method.layer_budgets(tiny_config(num_layers=num_layers), keep, q_len))
  want, exact = kvpress_layer_budgets(num_layers, q_len, ratio, window, beta)
  assert got.sum() == num_layers * keep
  assert (got > window).all() and (got <= q_len).all()
  if exact is None:
    assert got.tolist() == want
    return
  assert got[0] > got[-1] and (np.diff(got) <= 0).all()
  # Both are integers next to the same real pyramid: kvpress rounds each layer, kvjax keeps
  # the exact total (and one token more than the window where kvpress keeps just the window).
  assert np.abs(got - np.asarray(exact)).max() < 1 + 1e-9
  assert np.abs(got - np.asarray(want)).max() <= 1
  if min(want) == window:  # kvpress's last layer holds just its window; kvjax's one more
    assert want[-1] == window and got[-1] == window + 1
  if sum(want) == num_layers * keep and min(want) > window and \
      not any(abs(x - np.floor(x) - 0.5) < 1e-9 for x in exact):
    assert got.tolist() == want


def test_kvpress_schedule_is_not_the_pyramidkv_schedule():
  """kvpress's pyramid spans the whole budget; PyramidKV's spans budget - window."""
  cfg = tiny_config(num_layers=30)
  kvp = PyramidKV(window=64, schedule="kvpress").layer_budgets(cfg, 2048, 4096)
  pkv = PyramidKV(window=64).layer_budgets(cfg, 2048, 4096)
  want, _ = kvpress_layer_budgets(30, 4096, 0.5, 64, 20)
  assert kvp[0] == want[0] == 3994   # 2b - b/beta with b = 2048
  assert pkv[0] == round(2 * 1984 - 1984 / 20) + 64 == 3933  # b - w = 1984 selected
  assert kvp != pkv


def test_kvpress_fallback_rounds_where_the_ratio_truncates():
  """kvpress's own inconsistency: its SnapKV fallback keeps round(n (1 - r)) while its
  ScorerPress keeps int(n (1 - r)); kvjax's uniform fallback keeps the truncated budget."""
  keep = methods.validate_compression(PyramidKV(), [2048], 0.9)
  want, exact = kvpress_layer_budgets(30, 2048, 0.9, 32, 20)
  assert exact is None and want == [205] * 30 and keep == 204
  got = PyramidKV(schedule="kvpress").layer_budgets(tiny_config(num_layers=30), keep, 2048)
  assert got == (204,) * 30


@pytest.mark.parametrize("schedule", ["pyramidkv", "kvpress"])
def test_pyramid_budgets_sum_exactly_and_keep_more_than_the_window(schedule):
  rng = np.random.default_rng(0)
  checked = 0
  for num_layers, window, beta in itertools.product((2, 5, 30), (1, 8, 32), (1.0, 4.0, 20.0)):
    for _ in range(8):
      context = int(rng.integers(window + 2, 3000))
      keep = int(rng.integers(window + 1, context + 1))
      method = PyramidKV(window=window, beta=beta, schedule=schedule)
      got = np.asarray(method.layer_budgets(tiny_config(num_layers=num_layers), keep, context))
      assert len(got) == num_layers
      assert got.sum() == num_layers * keep, (num_layers, keep, window, context, beta)
      assert (got > window).all() and (got <= context).all(), (keep, window, context, got)
      assert (np.diff(got) <= 0).all()
      checked += 1
  assert checked == 27 * 8


def test_schedule_is_validated():
  with pytest.raises(MethodError, match=r"schedule='kv'; allowed: \['pyramidkv', 'kvpress'\]"):
    PyramidKV(schedule="kv")
  with pytest.raises(MethodError, match="schedule"):
    methods.get("pyramidkv", schedule="uniform")
