"""One prefill compressed many ways, masked decode steps, and multi-turn cache reuse."""

import jax
import numpy as np
import pytest

import kvjax
from kvjax.cache import full_cache_nbytes
from kvjax.generation import context, conversation, engine, inputs
from tiny import tiny_chat_model, tiny_model

SWEEP = ["snapkv", "h2o", "adakv", "pyramidkv", "tova", "scissorhands", "knorm",
         "streaming_llm", "expected_attention"]


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _rows(seed, lengths):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(1, 256, n)] for n in lengths]


def _leaves(cache):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(cache)]


def test_prefill_many_equals_one_prefill_per_method(model):
  tokens, mask = inputs.left_pad(_rows(0, (170, 150)), 0)
  variants = [(kvjax.methods.get(None), None)] + [(kvjax.methods.get(n), 60) for n in SWEEP]
  many = context.prefill_many(model, tokens, mask, variants, room=16)
  assert len(many) == len(variants)
  for (method, keep), got in zip(variants, many):
    alone = context.prefill(model, tokens, mask, method, keep, 16)
    assert got.budgets == alone.budgets and got.decode_plan == alone.decode_plan
    assert got.context_cache_bytes == alone.context_cache_bytes
    assert [x.shape for x in _leaves(got.cache)] == [x.shape for x in _leaves(alone.cache)]
    if keep is None:  # attention over the unpadded chunk: equal up to float rounding
      for a, b in zip(_leaves(got.cache), _leaves(alone.cache)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    else:  # the same computation per compressed cache: bit-identical
      for a, b in zip(_leaves(got.cache), _leaves(alone.cache)):
        np.testing.assert_array_equal(a, b, err_msg=method.label)
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(alone.logits), atol=1e-5)


def test_prefill_many_splits_variants_over_a_cache_byte_limit(model, monkeypatch):
  """Under a byte limit the variants are prefilled in groups (one forward pass each) whose
  caches fit it; every result equals the one-pass result."""
  tokens, mask = inputs.left_pad(_rows(0, (170, 150)), 0)
  variants = [(kvjax.methods.get(n), keep) for n in SWEEP[:2] for keep in (40, 60, 80)]
  one_pass = context.prefill_many(model, tokens, mask, variants, room=16)
  sizes = [full_cache_nbytes(model.config, 2, keep + 16) for _, keep in variants]
  limit = sizes[0] + sizes[1]  # the first two fit together, then at most two at a time
  calls = []
  real = engine.STEPS.prefill
  monkeypatch.setattr(engine.STEPS, "prefill",
                      lambda *a, **k: calls.append(len(k["plan"].plans)) or real(*a, **k))
  grouped = context.prefill_many(model, tokens, mask, variants, room=16,
                                 max_cache_bytes=limit)
  assert calls == [len(g) for g in context._groups(sizes, limit)]
  assert len(calls) > 1 and all(
      sum(sizes[i] for i in g) <= limit for g in context._groups(sizes, limit))
  for a, b in zip(one_pass, grouped):
    for x, y in zip(_leaves(a.cache), _leaves(b.cache)):
      np.testing.assert_array_equal(x, y)


def test_groups_never_exceed_the_limit_and_keep_order():
  assert context._groups([3, 3, 3, 5, 1], 6) == [[0, 1], [2], [3, 4]]
  assert context._groups([9, 1], 4) == [[0], [1]]  # an item over the limit stands alone


@pytest.mark.parametrize("method", [None, "h2o", "scissorhands", "adakv"])
def test_masked_decode_step_leaves_the_cache_unchanged(model, method):
  tokens, mask = inputs.left_pad(_rows(1, (90, 70)), 0)
  method_obj = kvjax.methods.get(method)
  keep = None if method is None else 48
  # Decode-time methods get no room: every slot is taken, so a write would evict one.
  room = 0 if method_obj.decode_time else 16
  pre = context.prefill(model, tokens, mask, method_obj, keep, room=room)
  cache = pre.cache
  token = np.asarray(pre.logits.argmax(-1), np.int32)
  before = [(_visible(layer, 0), _visible(layer, 1)) for layer in cache.layers]
  active = np.array([True, False])
  _, _, after = engine.STEPS.decode(model, token, cache, jax.random.key(0), 1.0, 1.0, True,
                                    pre.decode_plan, active=active)
  lengths = np.asarray(after.lengths)
  assert lengths.tolist() == [int(mask[0].sum()) + 1, int(mask[1].sum())]
  for (old0, old1), new in zip(before, after.layers):  # (the decode step donated `cache`)
    assert _visible(new, 1) == old1   # the masked row: nothing it can see moved
    assert _visible(new, 0) != old0   # the active row took its token


def _visible(layer, row):
  """Every occupied slot of one row as (head, position, key, value, method state)."""
  positions = np.asarray(layer.positions)[row]
  if hasattr(layer, "heads"):  # head-wise flat layout: [N] slots tagged with their head
    heads = np.asarray(layer.heads)[row]
  else:
    heads = np.broadcast_to(np.arange(positions.shape[0])[:, None], positions.shape)
  keys, values = np.asarray(layer.keys)[row], np.asarray(layer.values)[row]
  state = [np.asarray(a)[row] for a in jax.tree_util.tree_leaves(layer.state)]
  out = []
  for index in zip(*np.nonzero(positions >= 0)):
    out.append((int(heads[index]), int(positions[index]), keys[index].tobytes(),
                values[index].tobytes(), [s[index].tolist() for s in state]))
  return sorted(out)


def _turn_tokens(seed):
  return [_rows(seed, (6, 9)), _rows(seed + 1, (7, 5)), _rows(seed + 2, (4, 8))]


def test_turns_reuse_the_cache_like_one_long_prompt(model):
  contexts = _rows(2, (60, 45))
  turns = _turn_tokens(10)
  tokens, mask = inputs.left_pad(contexts, 0)
  room = conversation.turn_room(turns, 8)
  # An end-of-turn token that row 0 produces early, so one row finishes before the other
  # and decodes masked steps that must not reach its cache.
  full = kvjax.methods.get(None)
  probe = conversation.run_turns(model, context.prefill(model, tokens, mask, full, None, room),
                                 turns, 8, room, eos_token_ids=[])
  eos = probe["token_ids"][0][0][3]
  pre = context.prefill(model, tokens, mask, full, None, room)
  out = conversation.run_turns(model, pre, turns, 8, room, eos_token_ids=[eos])
  assert len(out["token_ids"][0][0]) < 8
  assert len(out["turn_cache_bytes"]) == 3
  for row in range(2):
    history = list(contexts[row])
    for t in range(3):
      if t > 0:  # the previous answer (its end-of-turn token is never stored)
        history += out["token_ids"][row][t - 1]
      # Each turn's answer equals generating from the whole transcript prefilled at once.
      prompt = history + turns[t][row]
      alone = kvjax.generate(model, prompt, max_new_tokens=8, eos_token_ids=[eos])
      assert alone.token_ids[0] == out["token_ids"][row][t], (row, t)
      history = prompt


@pytest.fixture(scope="module")
def chat_model(smollm2_tokenizer):
  return tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)


def test_converse_answers_every_turn_and_keeps_its_cache(chat_model):
  context = " ".join(f"Fact {i}: the code word is word{i}." for i in range(40))
  result = kvjax.converse(chat_model, [context, context[:300]],
                          [["First?", "Second?", "Third?"], ["A?", "B?", "C?"]],
                          method="snapkv", compression_ratio=0.5, max_new_tokens=6)
  assert [len(row) for row in result.answers] == [3, 3]
  assert all(isinstance(a, str) for row in result.answers for a in row)
  stats = result.stats
  assert stats["turns"] == 3 and stats["method"] == "snapkv"
  # The compressed context is kept; turns only ever add slots for their own tokens.
  assert stats["turn_cache_bytes"] == sorted(stats["turn_cache_bytes"])
  full = kvjax.converse(chat_model, context, ["First?", "Second?"], max_new_tokens=6)
  # Both rows keep half the longest context: half of a full cache of two such rows.
  assert stats["context_cache_bytes"] < 0.6 * 2 * full.stats["context_cache_bytes"]


@pytest.mark.parametrize("contexts, questions, match", [
    (["a", "b"], [["q?"]], "2 contexts and 1 question lists"),
    (["a", "b"], [["q?"], ["q?", "r?"]], "same number"),
    (["a"], [[]], "same number"),
    (["a"], [[3]], "questions must be strings"),
])
def test_converse_rejects_mismatched_turns(chat_model, contexts, questions, match):
  with pytest.raises(kvjax.GenerationError, match=match):
    kvjax.converse(chat_model, contexts, questions, max_new_tokens=2)
