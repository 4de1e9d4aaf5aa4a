"""The multi-step decode loop against one compiled call per step.

`CompiledSteps.decode_loop` runs many steps in one call and stops at EOS; it must give the
step-by-step loop's tokens and, where finished rows are masked (conversations), its cache.
"""

import importlib
import re

import jax
import numpy as np
import pytest

import kvjax
from kvjax import methods as methods_lib
from kvjax.generation import context, engine, inputs
from tests.tiny import random_prompts, tiny_chat_model, tiny_model

# The module (kvjax.generation.generate is also the name of its function).
generate_lib = importlib.import_module("kvjax.generation.generate")
DECODE_TIME = sorted(name for name in methods_lib.available()
                     if methods_lib.get(name).decode_time)


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=3)


def _prefilled(model, method, rows=3, room=24):
  prompts = random_prompts([70, 55, 62][:rows], seed=5)
  tokens, mask = inputs.left_pad(prompts, 0, 80)
  keep = None if method == "full" else 48
  pre = context.prefill(model, tokens, mask, methods_lib.get(method), keep,
                        0 if keep is not None else room)
  return pre


def _step_by_step(model, pre, steps, eos, greedy, mask_finished):
  """The reference: one `STEPS.decode` call per token, the host tracking finished rows."""
  key = jax.random.key(7)
  tokens = np.asarray(jax.numpy.argmax(pre.logits, -1), np.int32)
  cache, finished, out = pre.cache, np.zeros(tokens.shape, bool), []
  for i in range(steps):
    active = ~finished if mask_finished else None
    sampled, _, cache = engine.STEPS.decode(model, jax.numpy.asarray(tokens), cache,
                                            jax.random.fold_in(key, i + 1), 0.7, 0.9, greedy,
                                            pre.decode_plan, active=active)
    sampled = np.asarray(sampled)
    out.append(np.where(finished, -2, sampled))
    tokens = np.where(finished & mask_finished, tokens, sampled)
    finished |= np.isin(sampled, eos)
    if finished.all():
      break
  return np.stack(out, 1), cache


def _looped(model, pre, steps, eos, greedy, mask_finished, chunk):
  key = jax.random.key(7)
  tokens = jax.numpy.argmax(pre.logits, -1).astype(jax.numpy.int32)
  cache, active, done, out = pre.cache, None, 0, []
  while done < steps:
    got, ran, cache, tokens, active = engine.STEPS.decode_loop(
        model, tokens, cache, key, done + 1, min(chunk, steps - done), 0.7, 0.9, greedy, eos,
        chunk, pre.decode_plan, active=active, mask_finished=mask_finished)
    assert (got[:, ran:] == -1).all()
    out.append(got[:, :ran])
    done += ran
    if not np.asarray(active).any():
      break
  return np.concatenate(out, 1), cache


def _finished_marked(tokens, eos):
  """Tokens after each row's first EOS replaced by -2 (the reference's marker)."""
  tokens = tokens.copy()
  for row in tokens:
    hit = np.flatnonzero(np.isin(row, eos))
    if hit.size:
      row[hit[0] + 1:] = -2
  return tokens


@pytest.mark.parametrize("method", ["full"] + DECODE_TIME)
@pytest.mark.parametrize("greedy", [True, False])
def test_loop_equals_step_by_step(model, method, greedy):
  pre = _prefilled(model, method)
  want, _ = _step_by_step(model, _prefilled(model, method), 10, [], greedy, False)
  got, _ = _looped(model, pre, 10, [], greedy, False, chunk=4)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("method", ["full"] + DECODE_TIME[:2])
def test_loop_stops_rows_at_eos_and_masks_them(model, method):
  free, _ = _step_by_step(model, _prefilled(model, method), 12, [], True, True)
  # An EOS that row 0 samples early on: that row stops, the others go on.
  eos = [int(free[0, 2])]
  want, want_cache = _step_by_step(model, _prefilled(model, method), 12, eos, True, True)
  got, got_cache = _looped(model, _prefilled(model, method), 12, eos, True, True, chunk=5)
  assert (want == -2).any(), "the EOS must finish a row before the others"
  np.testing.assert_array_equal(_finished_marked(got, eos)[:, :want.shape[1]], want)
  np.testing.assert_array_equal(got_cache.lengths, want_cache.lengths)
  for got_layer, want_layer in zip(got_cache.layers, want_cache.layers):
    positions = np.asarray(want_layer.positions)
    np.testing.assert_array_equal(got_layer.positions, positions)
    # Empty slots (masked rows' steps) hold whatever was computed; only filled ones count.
    filled = positions >= 0
    for name in ("keys", "values"):
      np.testing.assert_allclose(np.asarray(getattr(got_layer, name))[filled],
                                 np.asarray(getattr(want_layer, name))[filled],
                                 rtol=1e-5, atol=1e-5)


def test_loop_exits_when_every_row_is_done(model):
  pre = _prefilled(model, "full", rows=1)
  free, _ = _step_by_step(model, _prefilled(model, "full", rows=1), 6, [], True, False)
  eos = [int(free[0, 1])]
  got, ran, *_ = engine.STEPS.decode_loop(
      model, jax.numpy.argmax(pre.logits, -1).astype(jax.numpy.int32), pre.cache,
      jax.random.key(7), 1, 8, 1.0, 1.0, True, eos, 8, pre.decode_plan)
  assert ran == 2 and got[0, 1] == eos[0] and (got[0, 2:] == -1).all()


def test_loop_rejects_a_limit_outside_the_chunk(model):
  pre = _prefilled(model, "full", rows=1)
  with pytest.raises(ValueError, match="limit=9"):
    engine.STEPS.decode_loop(model, jax.numpy.zeros((1,), jax.numpy.int32), pre.cache,
                             jax.random.key(0), 1, 9, 1.0, 1.0, True, [], 8)


@pytest.mark.parametrize("method", ["full", "h2o"])
def test_generate_with_eos_and_stop_strings_matches_step_by_step(model, method, monkeypatch):
  """generate() decodes in chunks; one step per chunk must give the same tokens."""
  prompts = random_prompts([20, 13, 17], seed=5)
  kwargs = dict(method=method, compression_ratio=None if method == "full" else 0.5,
                max_new_tokens=21, temperature=0.8, seed=3)
  free = kvjax.generate(model, prompts, **kwargs).token_ids
  kwargs["eos_token_ids"] = [free[1][4]]
  chunked = kvjax.generate(model, prompts, **kwargs)
  monkeypatch.setattr(generate_lib, "DECODE_CHUNK", 1)
  one_by_one = kvjax.generate(model, prompts, **kwargs)
  assert chunked.token_ids == one_by_one.token_ids
  assert len(chunked.token_ids[1]) == 4 and chunked.token_ids[1] == free[1][:4]


@pytest.mark.parametrize("method", ["full", "tova"])
def test_stop_strings_give_the_same_text_chunked_and_one_by_one(smollm2_tokenizer, method,
                                                                 monkeypatch):
  """Stop strings are found on the host after each chunk; chunked decoding must cut every
  row where one-step-per-call decoding does."""
  chat = tiny_chat_model(smollm2_tokenizer)
  prompts = ["The river ran", "Numbers: one two", "Once upon a"]
  kwargs = dict(method=method, compression_ratio=None if method == "full" else 0.3,
                max_new_tokens=24, chat_template=False)
  free = kvjax.generate(chat, prompts, **kwargs).texts
  stop = free[0][len(free[0]) // 2:][:3]
  assert stop.strip(), free
  chunked = kvjax.generate(chat, prompts, stop=stop, **kwargs)
  monkeypatch.setattr(generate_lib, "DECODE_CHUNK", 1)
  one_by_one = kvjax.generate(chat, prompts, stop=stop, **kwargs)
  assert chunked.texts == one_by_one.texts
  assert chunked.token_ids == one_by_one.token_ids
  assert stop not in chunked.texts[0] and len(chunked.texts[0]) < len(free[0])


def _cache_sized_copies(model, method):
  """Shapes of the copies in `method`'s compiled decode loop as large as a layer's keys."""
  pre = _prefilled(model, method, rows=1)
  layer_size = pre.cache.layers[0].keys[0].size   # the loop donates the cache
  steps = engine.CompiledSteps()
  steps.decode_loop(model, jax.numpy.argmax(pre.logits, -1).astype(jax.numpy.int32),
                    pre.cache, jax.random.key(7), 1, 4, 1.0, 1.0, True, [], 4,
                    pre.decode_plan)
  (executable,) = steps._executables.values()
  return [shape for shape in re.findall(r"= \w+\[([\d,]+)\]\{[^}]*\} copy\(",
                                        executable.as_text())
          if np.prod([int(n) for n in shape.split(",")]) >= layer_size]


@pytest.mark.parametrize("method", DECODE_TIME)
def test_eviction_overwrites_the_cache_in_place(model, method):
  """A decode-time eviction writes the chosen slot in place: XLA would copy each layer's
  values (and StreamingLLM's keys too) twice per step, about 20% of a 2K-slot SmolLM2 H2O
  step, unless the write depends, as data, on the attention that reads them
  (`attention.after_reading`)."""
  assert _cache_sized_copies(model, method) == []
