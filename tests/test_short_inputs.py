"""Short inputs degrade gracefully: a budget is a cap (a context not longer than it is kept
whole, in a batch too), and a budget smaller than a method's protected tokens (sinks,
recent window) shrinks them to fit instead of refusing the ratio."""

import numpy as np
import pytest

import kvjax
from kvjax import methods
from kvjax.generation import context as context_lib
from kvjax.generation import inputs
from kvjax.methods import base
from kvjax.methods import (ExpectedAttention, PyramidKV, Scissorhands, SinksWindow, SnapKV,
                           StreamingLLM)
from tiny import random_prompts, tiny_chat_model, tiny_model

SHORT, LONG = random_prompts([30, 90], seed=5, vocab=255)
SHORT = [t + 1 for t in SHORT]  # no pad id (0) inside a prompt
LONG = [t + 1 for t in LONG]


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _kept_positions(model, prompts, method, keep):
  """[layer][row][kv head] sorted original positions the compressed cache keeps."""
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context_lib.prefill(model, tokens, mask, methods.get(method), keep, room=0)
  out = []
  for layer in pre.cache.layers:
    positions = np.asarray(layer.positions)
    out.append([[sorted(p[p >= 0].tolist()) for p in row] for row in positions])
  return out


# ----------------------------------------------------------------------------- budget is a cap

@pytest.mark.parametrize("method", ["snapkv", "h2o", "streaming_llm", "adakv"])
def test_a_row_within_the_budget_keeps_every_token_in_a_mixed_batch(model, method):
  budget = 50
  result = kvjax.generate(model, [SHORT, LONG], method=method, budget=budget,
                          max_new_tokens=2)
  assert result.stats["kept_tokens_per_layer"] == [budget] * model.config.num_layers
  if methods.get(method).headwise:  # a flat layout: check the row's token count per layer
    tokens, mask = inputs.left_pad([SHORT, LONG], 0)
    pre = context_lib.prefill(model, tokens, mask, methods.get(method), budget, room=0)
    for layer in pre.cache.layers:
      positions = np.asarray(layer.positions)[0]
      assert sorted(positions[positions >= 0].tolist()) == sorted(
          list(range(30)) * model.config.num_kv_heads)
    return
  for layer in _kept_positions(model, [SHORT, LONG], method, budget):
    assert layer[0] == [list(range(30))] * model.config.num_kv_heads   # the short row: all
    assert [len(h) for h in layer[1]] == [budget] * model.config.num_kv_heads  # the long: 50


def test_a_row_within_the_budget_answers_as_the_full_cache(model):
  compressed = kvjax.generate(model, [SHORT, LONG], method=SnapKV(window=8), budget=50,
                              max_new_tokens=6)
  full = kvjax.generate(model, [SHORT, LONG], max_new_tokens=6)
  assert compressed.token_ids[0] == full.token_ids[0]
  np.testing.assert_allclose(
      kvjax.score(model, [SHORT, LONG], [[7, 8, 9]] * 2, method="snapkv", budget=50)[0],
      kvjax.score(model, [SHORT, LONG], [[7, 8, 9]] * 2)[0], rtol=1e-4, atol=1e-4)


def test_a_budget_above_every_context_is_the_full_cache(model):
  result = kvjax.generate(model, SHORT, method="snapkv", budget=10_000, max_new_tokens=6)
  assert result.stats["kept_tokens_per_layer"] == [30] * model.config.num_layers
  assert result.stats["budget"] == 10_000
  assert result.token_ids == kvjax.generate(model, SHORT, max_new_tokens=6).token_ids


@pytest.mark.parametrize("method", ["streaming_llm", "h2o"])
def test_a_decode_time_cache_grows_to_its_budget_before_evicting(model, method):
  """30 prompt + 20 generated tokens fit a budget of 64: nothing is evicted, so the tokens
  are the full cache's; the cache never holds more than the budget's slots plus the
  16-slot rounding of its room."""
  result = kvjax.generate(model, SHORT, method=method, budget=64, max_new_tokens=20)
  assert result.token_ids == kvjax.generate(model, SHORT, max_new_tokens=20).token_ids
  assert 30 + 19 <= result.stats["cache_capacity_tokens"] <= 64 + 15


# ----------------------------------------------------------------------------- protection shrinks

def test_shrink_protection_keeps_a_slot_for_the_scores():
  assert base.shrink_protection(48, window=(32, 1)) == {}
  assert base.shrink_protection(33, window=(32, 1)) == {}
  assert base.shrink_protection(32, window=(32, 1)) == {"window": 31}
  assert base.shrink_protection(5, window=(32, 1)) == {"window": 4}
  assert base.shrink_protection(1, window=(32, 1)) == {"window": 1}  # its minimum
  assert base.shrink_protection(1, sinks=(4, 0)) == {"sinks": 0}
  # In proportion: 9 slots over sinks 4 and recent 32 -> 1 and 8.
  assert base.shrink_protection(10, sinks=(4, 0), recent=(32, 1)) == {"sinks": 1, "recent": 8}
  assert base.shrink_protection(2, sinks=(4, 0), recent=(32, 1)) == {"sinks": 0, "recent": 1}


def test_fitted_methods():
  snap = SnapKV()
  assert snap.fitted(48) is snap                       # fits: the very same object
  assert snap.fitted(5) == SnapKV(window=4)
  assert PyramidKV(beta=10).fitted(10) == PyramidKV(beta=10, window=9)
  assert StreamingLLM().fitted(3) == StreamingLLM(sinks=2)
  assert Scissorhands().fitted(10) == Scissorhands(sinks=1, recent=8)
  assert ExpectedAttention().fitted(2) == ExpectedAttention(n_sink=1)
  wrapped = SinksWindow(press=SnapKV(window=16), sinks=4, window=12)
  assert wrapped.fitted(9) == SinksWindow(press=SnapKV(window=8), sinks=2, window=6)
  assert methods.get("adakv").fitted(5).press == SnapKV(window=4)
  assert methods.get("kivi:press=snapkv").fitted(5).press == SnapKV(window=4)
  for name in methods.available():
    method = methods.get(name)
    for keep in (1, 2, 5, 40):
      assert method.fitted(keep).protected_tokens(keep) <= max(keep - 1, 1)


def test_short_prompt_ratio_is_honoured_by_shrinking_the_window(model):
  """10 tokens at ratio 0.5 keep 5 per head: SnapKV's 32-token window (which used to refuse
  this) becomes 4, and one more slot goes to the votes."""
  prompt = SHORT[:10]
  result = kvjax.generate(model, prompt, method="snapkv", compression_ratio=0.5,
                          max_new_tokens=3)
  stats = result.stats
  assert stats["kept_tokens_per_layer"] == [5] * model.config.num_layers
  assert (stats["protected_tokens_configured"], stats["protected_tokens"]) == (32, 4)
  assert stats["context_cache_bytes"] < 0.55 * stats["full_context_cache_bytes"]
  for layer in _kept_positions(model, [prompt], "snapkv", 5):
    for head in layer[0]:
      assert len(head) == 5 and head[-4:] == [6, 7, 8, 9]
  untouched = kvjax.generate(model, LONG, method="snapkv", compression_ratio=0.5,
                             max_new_tokens=1).stats
  assert untouched["protected_tokens"] == untouched["protected_tokens_configured"] == 32


@pytest.mark.parametrize("method", ["streaming_llm", "scissorhands", "expected_attention",
                                    "pyramidkv", "adakv", "sinks_window", "per_layer", "h2o",
                                    "tova", "mikv"])
def test_every_method_takes_a_budget_of_one(model, method):
  result = kvjax.generate(model, SHORT[:8], method=method, budget=1, max_new_tokens=2)
  assert result.stats["kept_tokens_per_layer"] == [1] * model.config.num_layers
  assert result.stats["protected_tokens"] <= 1


def test_score_and_converse_on_one_short_sentence(smollm2_tokenizer):
  text_model = tiny_chat_model(smollm2_tokenizer)
  logprobs = kvjax.score(text_model, "The capital of France is", " Paris",
                         method="snapkv", compression_ratio=0.5)
  assert logprobs.shape[0] >= 1 and np.isfinite(logprobs).all() and (logprobs < 0).all()
  chat = kvjax.converse(text_model, "Paris is the capital of France.", ["Capital?", "Why?"],
                        method="snapkv", compression_ratio=0.5, max_new_tokens=3)
  assert len(chat.answers[0]) == 2
