"""CompressKV: the selection (semantic heads' SnapKV votes, shared by every KV head) and the
error-aware layer budgets against slow numpy restatements written here from the paper and
the official code's description; the calibration file (round trip, determinism, refusal
for another model's weights) on tiny random models; bad hyperparameters."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax import calibration
from kvjax.cache import kv_cache, policy
from kvjax.calibration import compresskv as ckv
from kvjax.errors import MethodError
from kvjax.methods import base
from kvjax.methods.compresskv import CompressKV, error_aware_budgets, top_heads
from tiny import tiny_chat_model

UNIFORM2 = (0.5, 0.5)


def _mask(heads):
  return sum(1 << h for h in heads)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path))


# ------------------------------------------------------------------------------ selection


def _np_kept(data, heads, keep, window, kernel, pooling):
  """Per row, the kept positions: the row's prefix (all but its last `window` tokens)
  scored by the window queries' attention summed per key, pooled along the prefix with
  zero padding, averaged over `heads`; the top keep - window of the prefix (ties to the
  earlier position) and the window. A row within the budget keeps everything."""
  probs = mi.attention(data.q, data.k, data.qpos, data.kpos)          # [B, H, T, S]
  kept = []
  for row, n in enumerate(data.lengths):
    n = int(n)
    if n <= keep:
      kept.append(set(range(n)))
      continue
    slot = {int(p): i for i, p in enumerate(data.kpos[row, 0]) if p >= 0}
    query = {int(p): i for i, p in enumerate(data.qpos[row]) if p >= 0}
    prefix = n - window
    score = np.zeros(prefix)
    for h in heads:
      sums = np.zeros(prefix)
      for j in range(prefix):
        for i in range(prefix, n):
          sums[j] += probs[row, h, query[i], slot[j]]
      pooled = np.zeros(prefix)
      half = kernel // 2
      for j in range(prefix):
        around = [sums[j + o] if 0 <= j + o < prefix else 0.0 for o in range(-half, half + 1)]
        pooled[j] = sum(around) / kernel if pooling == "avg" else max(
            sums[j + o] for o in range(-half, half + 1) if 0 <= j + o < prefix)
      score += pooled / len(heads)
    order = sorted(range(prefix), key=lambda j: (-score[j], j))
    kept.append(set(order[:keep - window]) | set(range(prefix, n)))
  return kept


def _compress(method, data, keep, layer):
  """kvjax's compaction of one layer's candidates to `keep` slots per KV head."""
  def run(arrays):
    x = base.LayerInputs(config=mi.config(), layer=layer, **arrays)
    cand = kv_cache.LayerCache(keys=x.keys, values=x.values, positions=x.key_positions,
                               end=jnp.int32(x.keys.shape[2]))
    return method.compact(cand, x, keep)
  return jax.jit(run)(mi.layer_arrays(data))


@pytest.mark.parametrize("layer,keep,pooling,kernel,window", [
    (0, 20, "avg", 5, 8), (1, 20, "avg", 5, 8), (1, 30, "max", 3, 4), (0, 12, "avg", 1, 8)])
def test_selection_matches_numpy(layer, keep, pooling, kernel, window):
  data = mi.random_prefill(3 + layer, lengths=(48, 33, 14), s=48)
  heads = ((3, 0), (1, 2, 3))
  method = CompressKV(heads=tuple(map(_mask, heads)), layer_weights=UNIFORM2, pooling=pooling,
                      kernel_size=kernel, window=window)
  out = _compress(method, data, keep, layer)
  assert out.capacity == keep
  positions = np.asarray(out.positions)
  want = _np_kept(data, heads[layer], keep, window, kernel, pooling)
  for row in range(len(data.lengths)):
    for head in range(mi.K):
      got = positions[row, head]
      assert set(got[got >= 0].tolist()) == want[row], (row, head)
    # The same indices for every KV head, keys and values moved with them.
    np.testing.assert_array_equal(positions[row, 0], positions[row, 1])
    for h in range(mi.K):
      real = positions[row, h] >= 0
      slots = [list(data.kpos[row, h]).index(p) for p in positions[row, h][real]]
      np.testing.assert_array_equal(np.asarray(out.keys)[row, h][real],
                                    np.asarray(data.k[row, h, slots], np.float32))


def test_selection_uses_only_the_semantic_heads():
  """Heads with other votes change the choice; the other heads' attention does not."""
  data = mi.random_prefill(8, lengths=(48,), s=48)
  pick = lambda heads: np.asarray(_compress(
      CompressKV(heads=(_mask(heads),) * 2, layer_weights=UNIFORM2), data, 16, 0).positions)[0, 0]
  base_choice = pick((0,))
  altered = mi.random_prefill(8, lengths=(48,), s=48)
  altered.q[:, :, 3] = mi.f32(np.random.default_rng(1).normal(size=altered.q[:, :, 3].shape))
  again = np.asarray(_compress(
      CompressKV(heads=(1, 1), layer_weights=UNIFORM2), altered, 16, 0).positions)[0, 0]
  np.testing.assert_array_equal(base_choice, again)
  assert set(pick((0,)).tolist()) != set(pick((2,)).tolist())


# -------------------------------------------------------------------------------- budgets


def _np_budgets(u, mean, low, high):
  """The official allocation, restated with plain loops."""
  n = len(u)
  total = n * mean
  b = [min(max(low + round(u[l] * (total - low * n)), low), high) for l in range(n)]
  first_diff = total - sum(b)
  diff = first_diff
  while diff != 0:
    if diff > 0:
      for l in sorted(range(n), key=lambda l: (-u[l], l)):
        if diff and b[l] < high:
          b[l] += 1
          diff -= 1
    else:
      for l in sorted(range(n), key=lambda l: (u[l], l)):
        if diff and b[l] > low:
          b[l] -= 1
          diff += 1
  return b, first_diff


def test_budgets_match_numpy():
  rng = np.random.default_rng(0)
  signs = set()
  for case in range(200):
    n = int(rng.integers(2, 12))
    mean = int(rng.integers(32, 300))
    u = rng.dirichlet(np.full(n, [0.2, 1.0, 5.0][case % 3]))
    if case % 7 == 0:
      u[rng.integers(n)] += 5.0                  # one layer far above 3B: clipped
      u /= u.sum()
    u = [float(x) for x in u]
    high = 3 * mean
    want, diff = _np_budgets(u, mean, 32, high)
    signs.add(int(np.sign(diff)))
    got = error_aware_budgets(u, n * mean, 32, high)
    assert list(got) == want, (u, mean)
    assert sum(got) == n * mean and min(got) >= 32 and max(got) <= high
  assert signs == {-1, 0, 1}, "cases must exercise both adjustments"


def test_layer_budgets_cap_and_fallback():
  cfg = mi.config(num_layers=8)
  u = [0.93] + [0.01] * 7
  method = CompressKV(heads=(1,) * 8, layer_weights=tuple(u))
  want, _ = _np_budgets(u, 64, 32, 192)
  assert list(method.layer_budgets(cfg, 64, 1000)) == want and max(want) == 192
  capped = method.layer_budgets(cfg, 64, 100)             # no layer above the context
  assert list(capped) == _np_budgets(u, 64, 32, 100)[0]
  assert max(capped) == 100 and sum(capped) == 8 * 64
  assert method.layer_budgets(cfg, 20, 1000) == (20,) * 8   # below min_budget: uniform
  # A budget at or above the context keeps it whole in every layer (no impossible split).
  assert method.layer_budgets(cfg, 64, 50) == (64,) * 8
  assert method.layer_budgets(cfg, 64, 64) == (64,) * 8


def test_top_heads():
  scores = [[0.1, 0.5, 0.5, 0.9, 0.0], [3.0, 2.0, 1.0, 0.0, 4.0]]
  assert top_heads(scores, 3) == (_mask((3, 1, 2)), _mask((4, 0, 1)))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs", [
    dict(window=0), dict(kernel_size=4), dict(pooling="mean"), dict(first_k=0),
    dict(min_budget=0), dict(min_budget=7), dict(window=33), dict(max_factor=0.5), dict(max_factor=float("nan")),
    dict(heads=(3, -1), layer_weights=UNIFORM2), dict(heads=(3, 0), layer_weights=UNIFORM2),
    dict(heads="a,b", layer_weights=UNIFORM2), dict(heads=(1.5, 2), layer_weights=UNIFORM2),
    dict(heads=((0,), (1,)), layer_weights=UNIFORM2),
    dict(heads=(1, 2), layer_weights=(1.0, float("nan"))),
    dict(heads=(1, 2), layer_weights=(-1.0, 2.0)),
    dict(heads=(1, 2), layer_weights=(0.0, 0.0)),
    dict(heads=(1, 2), layer_weights=(1.0,)),
    dict(heads=(1, 2)), dict(layer_weights=UNIFORM2),
])
def test_bad_hyperparameters_raise(kwargs):
  with pytest.raises(MethodError, match="|".join(kwargs)):
    CompressKV(**kwargs)


def test_command_line_forms_and_model_checks():
  method = kvjax.methods.get("compresskv:heads=9,6:layer_weights=0.25,0.75")
  assert method.heads == (9, 6) and method.layer_weights == (0.25, 0.75)
  assert kvjax.methods.get("compresskv:heads=5:layer_weights=1").heads == (5,)
  with pytest.raises(MethodError, match="bind it to a model"):
    CompressKV().layer_budgets(mi.config(), 16, 48)
  with pytest.raises(MethodError, match="another model"):
    CompressKV(heads=(1,) * 3, layer_weights=(1.0,) * 3).layer_budgets(mi.config(), 16, 48)
  with pytest.raises(MethodError, match="another model"):
    CompressKV(heads=(1, 16), layer_weights=UNIFORM2).layer_budgets(mi.config(), 16, 48)


@pytest.mark.parametrize("kwargs", [dict(prompts=0), dict(prompt_tokens=100),
                                    dict(min_recall=1.5), dict(budget=0)])
def test_bad_calibration_settings_raise(kwargs):
  with pytest.raises(MethodError, match=list(kwargs)[0]):
    ckv.Settings(**kwargs)


# ---------------------------------------------------------------------------- calibration

SMALL = ckv.Settings(prompts=2, answer_steps=3, error_steps=2, budget=32)


@pytest.fixture(scope="module")
def chat_models(smollm2_tokenizer):
  return (tiny_chat_model(smollm2_tokenizer), tiny_chat_model(smollm2_tokenizer, seed=1))


def test_needle_prompts_locate_the_needle(smollm2_tokenizer):
  for prompt in ckv.needle_prompts(smollm2_tokenizer, SMALL):
    needle = smollm2_tokenizer.decode(prompt.ids[prompt.start:prompt.end])
    assert needle.strip().startswith("One of the special magic numbers for ")
    assert needle.strip().endswith(f" is: {prompt.answer}.")
  assert ckv.answer_recall("5793496", "The number is 5793496.") == 1.0
  assert ckv.answer_recall("5793496", "The number is 579349.") == 0.0
  assert ckv.answer_recall("sweet falcon", "a falcon") == 0.5


def test_calibration_file_round_trip_determinism_and_model_check(chat_models, tmp_path,
                                                                 monkeypatch):
  model, other = chat_models
  fp, other_fp = calibration.model_fingerprint(model), calibration.model_fingerprint(other)
  assert fp != other_fp
  result = ckv.calibration(model, fp, SMALL)
  path = ckv.path_for(fp, SMALL)
  assert path.exists() and json.loads(path.read_text()) == result
  cfg = model.config
  assert np.shape(result["head_scores"]) == (cfg.num_layers, cfg.num_heads)
  assert result["model_hash"] == fp and result["settings"]["budget"] == SMALL.budget
  weights = np.asarray(result["layer_weights"])
  errors = np.asarray(result["layer_errors"])
  assert (errors > 0).all()
  np.testing.assert_allclose(weights, errors / errors.sum())
  first = path.read_bytes()

  # Reloaded from disk, not recomputed; recomputed, the same bytes.
  monkeypatch.setattr(ckv, "calibrate", lambda *a, **k: pytest.fail("recalibrated"))
  assert ckv.calibration(model, fp, SMALL) == result
  monkeypatch.undo()
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "again"))
  ckv.calibration(model, fp, SMALL)
  assert ckv.path_for(fp, SMALL).read_bytes() == first

  # Another model's weights: the file is refused, by name and when found at its path.
  with pytest.raises(MethodError, match="belongs to model"):
    ckv.load(path, other, other_fp)
  stolen = ckv.path_for(other_fp, SMALL)
  stolen.write_bytes(first)
  with pytest.raises(MethodError, match="belongs to model"):
    ckv.calibration(other, other_fp, SMALL)
  with pytest.raises(MethodError, match="no compresskv calibration"):
    ckv.load(tmp_path / "missing.json", model, fp)


def test_needle_mass_matches_numpy():
  """The head probe: each query head's attention probability of its (last) query summed
  over the slots whose positions lie in [start, end), against numpy attention."""
  data = mi.random_prefill(5, lengths=(48, 40), s=48)
  start, end = np.array([10, 3]), np.array([17, 30])
  layer, step = _layer_and_step(data, slice(-1, None), start=jnp.asarray(start),
                                end=jnp.asarray(end))
  _, got = ckv.NeedleMass().update(0, layer, step, None)
  probs = mi.attention(data.q[:, -1:], data.k, data.qpos[:, -1:], data.kpos)[:, :, 0]
  want = np.zeros((2, mi.H))
  for row in range(2):
    for h in range(mi.H):
      for slot, p in enumerate(data.kpos[row, h // mi.G]):
        if start[row] <= p < end[row]:
          want[row, h] += probs[row, h, slot]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


def _layer_and_step(data, queries=slice(None), **params):
  x = base.LayerInputs(config=mi.config(), layer=0, **mi.layer_arrays(data))
  layer = kv_cache.LayerCache(keys=x.keys, values=x.values, positions=x.key_positions,
                              end=jnp.int32(x.keys.shape[2]))
  new = kv_cache.NewTokens(keys=x.keys[:, :, queries], values=x.values[:, :, queries],
                           positions=x.query_positions[:, queries])
  return layer, policy.LayerStep(config=x.config, queries=x.queries[:, queries],
                                 raw_queries=x.raw_queries[:, queries], new=new,
                                 lengths=x.lengths, params=params or None)


def test_selection_probe_marks_what_compresskv_drops():
  """The layer-error calibration's prefill marks as dropped exactly the prompt slots the
  selection at the calibration budget leaves out (numpy restatement)."""
  data = mi.random_prefill(11, lengths=(48, 37), s=48)
  heads = ((2, 1), (0,))
  method = CompressKV(heads=tuple(map(_mask, heads)), layer_weights=UNIFORM2)
  layer, step = _layer_and_step(data)
  out = ckv.Selection(method, 24).update(0, layer, step, None)
  dropped = np.asarray(out.state) > 0
  want = _np_kept(data, heads[0], 24, 8, 5, "avg")
  for row in range(2):
    for h in range(mi.K):
      real = data.kpos[row, h] >= 0
      assert set(data.kpos[row, h][real & ~dropped[row, h]].tolist()) == want[row]
      assert not dropped[row, h][~real].any()


def test_output_error_matches_numpy():
  """The decode probe and the relative error after o_proj: ||(O_kept - O_full) W_o|| /
  (||O_full W_o|| + 1e-5) per layer and row, with numpy attention over all visible slots
  and over the slots not marked dropped."""
  rng = np.random.default_rng(2)
  data = mi.random_prefill(12, lengths=(48, 30), s=48)
  dropped = rng.random((2, mi.K, 48)) < 0.5
  layer, step = _layer_and_step(data, slice(-1, None))
  layer = layer.replace(state=jnp.asarray(dropped, jnp.float32))
  _, (full, kept) = ckv.OutputError().update(0, layer, step, None)
  wo = mi.f32(rng.normal(size=(mi.H, mi.D, 8)))
  got = np.asarray(ckv.relative_errors(full[None], kept[None],
                                       jnp.asarray(wo[None], jnp.float32)))
  q, qpos = data.q[:, -1:], data.qpos[:, -1:]
  kept_pos = np.where(dropped, -1, data.kpos)
  for row in range(2):
    outs = []
    for kpos in (data.kpos, kept_pos):
      probs = mi.attention(q, data.k, qpos, kpos)[row, :, 0]          # [H, S]
      attn = np.stack([probs[h] @ data.v[row, h // mi.G] for h in range(mi.H)])   # [H, D]
      outs.append(np.einsum("hk,hkd->d", attn, wo))
    want = np.linalg.norm(outs[1] - outs[0]) / (np.linalg.norm(outs[0]) + 1e-5)
    np.testing.assert_allclose(got[0, row], want, rtol=1e-4)


def test_bind_and_generate_hold_the_layer_budgets(chat_models):
  model, _ = chat_models
  bound = calibration.bind("compresskv", model)
  assert len(bound.heads) == model.config.num_layers
  assert all(bin(h).count("1") == bound.first_k for h in bound.heads)
  np.testing.assert_allclose(sum(bound.layer_weights), 1.0)
  prompt = list(np.random.default_rng(0).integers(100, 5000, 120))
  keep = 40
  out = kvjax.generate(model, [prompt], method=bound, budget=keep, max_new_tokens=3)
  full = kvjax.generate(model, [prompt], max_new_tokens=3)
  budgets = bound.layer_budgets(model.config, keep, len(prompt))
  assert out.stats["kept_tokens_per_layer"] == list(budgets)
  assert sum(budgets) == keep * model.config.num_layers
  per_slot = full.stats["context_cache_bytes"] / (len(prompt) * model.config.num_layers)
  assert out.stats["context_cache_bytes"] == pytest.approx(per_slot * sum(budgets), rel=0.02)
  chunked = kvjax.generate(model, [prompt], method=bound, budget=keep, max_new_tokens=3,
                           prefill_chunk_size=32)
  assert chunked.stats["kept_tokens_per_layer"] == list(budgets)
  assert chunked.stats["context_cache_bytes"] == out.stats["context_cache_bytes"]
