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
from kvjax.cache import kv_cache
from kvjax.generation import context, engine, inputs
from kvjax.methods import budgets
from kvjax.methods.plan import CompressionPlan
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


def _kept(cache):
  """Per layer, row and KV head: the sorted positions of the real slots and their keys."""
  out = []
  for layer in cache.layers:
    positions, keys = np.asarray(layer.positions), np.asarray(layer.keys)
    if isinstance(layer, kv_cache.FlatLayerCache):   # [B, S]: each slot's owner in `heads`
      owners = np.asarray(layer.heads)
      per_head = [(positions[row][owners[row] == head], keys[row][owners[row] == head])
                  for row in range(positions.shape[0]) for head in range(layer.num_kv_heads)]
    else:
      per_head = [(positions[row, head], keys[row, head])
                  for row in range(positions.shape[0]) for head in range(positions.shape[1])]
    for head_positions, head_keys in per_head:
      real = np.flatnonzero(head_positions >= 0)
      order = np.argsort(head_positions[real])
      out.append((head_positions[real[order]], head_keys[real[order]]))
  return out


@pytest.mark.parametrize("method", DECODE_TIME + [
    methods_lib.get("per_layer", press="h2o", weights=(1.0, 3.0)),
    methods_lib.get("adakv", press="h2o")])
def test_reserved_capacity_and_traced_budgets_decode_as_exact_ones(model, method, monkeypatch):
  """A decode-time cache padded with reserved slots up to a rounded capacity, decoded by a
  plan that passes its budgets as data, keeps the same slots and samples the same tokens
  as the exact capacity decoded with the budgets compiled in: eviction never fills a
  reserved slot, so the cache stays at its budget plus room."""
  prompts = random_prompts([70, 55, 62], seed=5)
  tokens, mask = inputs.left_pad(prompts, 0, 80)
  prefill = lambda multiple: context.prefill(model, tokens, mask, methods_lib.get(method), 40,
                                             5, reserve_multiple=multiple)
  padded = prefill(64)
  assert engine.traces_budgets(padded.decode_plan)
  monkeypatch.setattr(type(padded.decode_plan.method), "traces_budget", lambda self, k: False)
  exact = prefill(64)   # nothing reserved where the budgets are compiled in
  assert not engine.traces_budgets(exact.decode_plan)
  capacities = lambda pre: [layer.capacity for layer in pre.cache.layers]
  if padded.decode_plan.method.pads_shapes:   # its own shared capacities (D2O, CAKE)
    assert capacities(padded) == capacities(exact)
  else:
    for got, want in zip(padded.cache.layers, exact.cache.layers, strict=True):
      reserved = (np.asarray(got.positions) == kv_cache.RESERVED_POSITION).sum(-1)
      assert got.capacity % 64 == 0 and got.capacity >= want.capacity
      assert (reserved >= got.capacity - want.capacity).all()
    assert sum(capacities(padded)) > sum(capacities(exact))
  reserved = [np.asarray(layer.positions) == kv_cache.RESERVED_POSITION
              for layer in padded.cache.layers]   # before decoding donates the cache
  want, want_cache = _step_by_step(model, exact, 20, [], True, False)
  monkeypatch.undo()
  got, got_cache = _looped(model, padded, 20, [], True, False, chunk=8)
  np.testing.assert_array_equal(got, want)
  for (got_pos, got_keys), (want_pos, want_keys) in zip(_kept(got_cache), _kept(want_cache),
                                                        strict=True):
    np.testing.assert_array_equal(got_pos, want_pos)
    np.testing.assert_allclose(got_keys, want_keys, rtol=1e-5, atol=1e-5)
  for got_layer, was_reserved in zip(got_cache.layers, reserved, strict=True):
    np.testing.assert_array_equal(
        np.asarray(got_layer.positions) == kv_cache.RESERVED_POSITION, was_reserved)


@pytest.mark.parametrize("method", DECODE_TIME)
def test_decode_plans_of_other_budgets_compile_as_one(model, method):
  """With its budgets passed as data, a decode-time method's decode plan is one for every
  budget: what `fitted` records for the prefill and `finalize` alone (D2O's keep, CAKE's
  mean budget) is left out (`Method.decoding`)."""
  tokens, mask = inputs.left_pad(random_prompts([70, 55, 62], seed=5), 0, 80)
  plans = [engine._traced_budgets(context.prefill(model, tokens, mask, methods_lib.get(method),
                                                  keep, 5).decode_plan)[0]
           for keep in (40, 44)]
  assert plans[0] == plans[1] and hash(plans[0]) == hash(plans[1])
  assert plans[0].budgets == ()


@pytest.mark.parametrize("method", [
    methods_lib.get("h2o"), methods_lib.get("tova"),
    methods_lib.get("per_layer", press="h2o", weights=(1.0, 3.0)),
    methods_lib.get("adakv", press="h2o")])
def test_an_evicting_context_of_another_length_decodes_with_the_same_compiled_loop(
    model, method):
  """Another prompt length gives a decode-time method other budgets; rounded to one
  reserved capacity and passed as data, they need no new decode loop."""
  rng = np.random.default_rng(5)
  prompts = [rng.integers(1, 256, n).tolist() for n in (100, 112)]
  decode_loops = lambda: {key for key in engine.STEPS._executables if key[0] == "decode_loop"}
  run = lambda prompt: kvjax.generate(model, prompt, method=method, compression_ratio=0.5,
                                      max_new_tokens=8)
  first = run(prompts[0])
  known = decode_loops()
  second = run(prompts[1])
  assert sum(first.stats["kept_tokens_per_layer"]) == 100
  assert sum(second.stats["kept_tokens_per_layer"]) == 112
  assert first.stats["cache_capacity_tokens"] == second.stats["cache_capacity_tokens"]
  assert known and decode_loops() <= known


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.3, 0.1, 1 / 3, 0.7])
def test_a_traced_share_equals_the_host_one_where_they_agree(ratio):
  """`budgets.share` in float32 (a traced budget) against the host's float64, for every
  budget up to 4096: where `shares_alike` says they agree they do, and where it says not,
  a method keeps its budgets compiled in (`traces_budget` is False)."""
  keeps = np.arange(4097)
  traced = np.asarray(jax.jit(lambda k: budgets.share(k, ratio))(jax.numpy.asarray(keeps)))
  host = np.array([budgets.share(int(k), ratio) for k in keeps])
  alike = np.array([budgets.shares_alike(int(k), ratio) for k in keeps])
  np.testing.assert_array_equal(traced == host, alike)
  if ratio in (0.5, 0.25):   # exact in float32: every budget traces
    assert alike.all()
  h2o = methods_lib.get("h2o", recent_ratio=ratio)
  assert [h2o.traces_budget(int(k)) for k in keeps] == alike.tolist()


@pytest.mark.parametrize("hh,recent", [(0.1, 0.1), (0.15, 0.45), (0.7, 0.1), (0.25, 0.45),
                                       (0.3, 0.3)])
def test_d2o_traced_recent_windows_equal_the_host_ones_where_it_traces(hh, recent):
  """D2O's window divides: computed as k x num / den in float32, XLA folds num / den first
  (one rounding fewer than numpy's), so `share` multiplies by that one constant; the
  jitted window equals the host's at every budget where `traces_budget` says so."""
  d2o = methods_lib.get("d2o", hh_ratio=hh, recent_ratio=recent)
  keeps = np.arange(1, 4097)
  traced = np.asarray(jax.jit(jax.vmap(d2o.recent))(jax.numpy.asarray(keeps, np.int32)))
  host = np.array([d2o.recent(int(k)) for k in keeps])
  claims = np.array([d2o.traces_budget(int(k)) for k in keeps])
  assert not (claims & (traced != host)).any(), keeps[claims & (traced != host)][:8]
  assert claims.mean() > 0.9


@pytest.mark.parametrize("keep", [50, 90])
def test_d2o_traced_budgets_decode_as_compiled_ones(model, keep, monkeypatch):
  """D2O at ratios whose window divides (0.45 / 0.6): traced budgets keep the slots and
  sample the tokens that compiled-in ones do."""
  d2o = methods_lib.get("d2o", hh_ratio=0.15, recent_ratio=0.45)
  tokens, mask = inputs.left_pad(random_prompts([120, 110, 115], seed=7), 0, 128)
  traced = context.prefill(model, tokens, mask, d2o, keep, 5)
  assert engine.traces_budgets(traced.decode_plan)
  monkeypatch.setattr(type(d2o), "traces_budget", lambda self, k: False)
  exact = context.prefill(model, tokens, mask, d2o, keep, 5)
  assert not engine.traces_budgets(exact.decode_plan)
  want, want_cache = _step_by_step(model, exact, 30, [], True, False)
  monkeypatch.undo()
  got, got_cache = _looped(model, traced, 30, [], True, False, chunk=8)
  np.testing.assert_array_equal(got, want)
  for (got_pos, _), (want_pos, _) in zip(_kept(got_cache), _kept(want_cache), strict=True):
    np.testing.assert_array_equal(got_pos, want_pos)


@pytest.mark.parametrize("wrapper", ["sinks_window", "per_layer", "adakv"])
def test_wrappers_keep_a_budget_float32_would_round_otherwise_compiled_in(wrapper):
  """A wrapper asks its press (`traces_budget`): H2O 0.3's budget 95 stays compiled in."""
  wrapped = methods_lib.get(wrapper, press=methods_lib.get("h2o", recent_ratio=0.3))
  assert not wrapped.traces_budget(95) and wrapped.traces_budget(96)
  plan = lambda budgets: CompressionPlan(method=wrapped, budgets=budgets, compress=False)
  assert not engine.traces_budgets(plan((95, 96)))
  assert engine.traces_budgets(plan((96, 96)))


def test_a_budget_float32_would_round_otherwise_stays_compiled_in(model):
  """H2O with recent_ratio 0.3 at a budget of 95: float64 makes 95 x 0.3 28.499... (28
  recent tokens), float32 28.500002 (29), so its decode plan keeps the budgets compiled
  in and its cache gets no reserved slots."""
  h2o = methods_lib.get("h2o", recent_ratio=0.3)
  traced = jax.jit(lambda k: budgets.share(k, 0.3))(jax.numpy.int32(95))
  assert h2o.recent(95) == 28 and int(traced) == 29 and not h2o.traces_budget(95)
  tokens, mask = inputs.left_pad(random_prompts([120], seed=2), 0, 128)
  pre = context.prefill(model, tokens, mask, h2o, 95, 0, reserve_multiple=64)
  assert pre.budgets == (95, 95) and not engine.traces_budgets(pre.decode_plan)
  assert all(layer.capacity == 95 for layer in pre.cache.layers)
  # A budget where both agree is passed as data, in a reserved capacity.
  pre = context.prefill(model, tokens, mask, h2o, 96, 0, reserve_multiple=64)
  assert engine.traces_budgets(pre.decode_plan)
  assert all(layer.capacity == 128 for layer in pre.cache.layers)
