"""Merging methods (EMS, Elastic Cache, KVMerger) and the merge kernels: each method's kept
and merged slots against a float64 numpy restatement, the kernels against their jnp
references (interpreted) and numpy, the slot-weight invariants, and every phase (chunked
prefill, questions, score, conversations, the kernel path) through a merged cache."""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax.cache import LayerCache
from kvjax.generation import context, inputs
from kvjax.methods import EMS, ElasticCache, KVMerger, base
from pallas_kernels import merge, reference
from tiny import (jnp_and_kernel_tokens, padded_and_exact, random_prompts, tiny_config,
                  tiny_model)

K, G = mi.K, mi.G


@pytest.fixture(scope="module")
def model():
  return tiny_model()


# ------------------------------------------------------------------------------ kernels


def _np_assign(src, centres, valid):
  """float64 cosine argmax (lowest index on ties) and its similarity; -1 / 0 if none."""
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  sims = np.einsum("red,rmd->rem", unit(src), unit(centres))
  target = np.full(src.shape[:2], -1)
  best = np.zeros(src.shape[:2])
  for r in range(src.shape[0]):
    if not valid[r].any():
      continue
    masked = np.where(valid[r][None, :], sims[r], -np.inf)
    target[r] = masked.argmax(-1)
    best[r] = masked.max(-1)
  return target, best


def _np_scatter_mean(ck, cv, cw, sk, sv, sw, targets):
  keys, values, weights = ck.copy(), cv.copy(), cw.copy()
  for r in range(ck.shape[0]):
    for m in range(ck.shape[1]):
      members = (targets[r] == m) & (sw[r] > 0)
      total = cw[r, m] + sw[r][members].sum()
      weights[r, m] = total
      if total > 0:
        keys[r, m] = (cw[r, m] * ck[r, m] + (sw[r][members, None] * sk[r][members]).sum(0)) / total
        values[r, m] = (cw[r, m] * cv[r, m] + (sw[r][members, None] * sv[r][members]).sum(0)) / total
  return keys, values, weights


def _kernel_inputs(seed, r=3, e=100, m=37, d=16, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  sk, sv = rng.normal(size=(r, e, d)), rng.normal(size=(r, e, d))
  ck, cv = rng.normal(size=(r, m, d)), rng.normal(size=(r, m, d))
  valid = rng.random((r, m)) < 0.7
  valid[-1] = False                                  # a row with no centre at all
  cw = np.where(valid, rng.integers(1, 4, (r, m)), 0).astype(np.float64)
  sw = rng.integers(0, 3, (r, e)).astype(np.float64)  # 0: not merged
  as_j = lambda a: jnp.asarray(a, dtype)
  return (as_j(sk), as_j(sv), as_j(ck), as_j(cv), jnp.asarray(valid), jnp.asarray(cw, jnp.float32),
          jnp.asarray(sw, jnp.float32))


@pytest.mark.parametrize("seed,dtype,block", [(0, jnp.float32, 16), (1, jnp.float32, None),
                                              (2, jnp.bfloat16, 32)])
def test_merge_kernels_match_reference_and_numpy(seed, dtype, block):
  sk, sv, ck, cv, valid, cw, sw = _kernel_inputs(seed, dtype=dtype)
  f64 = lambda a: np.asarray(a, np.float64)
  target, sim = merge.assign_to_centres(sk, ck, valid, block_e=block, block_m=block)
  want_t, want_s = reference.assign_to_centres(sk, ck, valid)
  np_t, np_s = _np_assign(f64(sk), f64(ck), np.asarray(valid))
  np.testing.assert_array_equal(np.asarray(target), np.asarray(want_t))
  np.testing.assert_array_equal(np.asarray(target), np_t)
  assert (np_t[-1] == -1).all() and (np_t[0] >= 0).all()
  np.testing.assert_allclose(np.asarray(sim), np_s, atol=1e-5)
  np.testing.assert_allclose(np.asarray(want_s), np_s, atol=1e-5)

  got = merge.scatter_mean(ck, cv, cw, sk, sv, sw, target, block_e=block, block_m=block)
  ref = reference.scatter_mean(ck, cv, cw, sk, sv, sw, target)
  np_out = _np_scatter_mean(f64(ck), f64(cv), f64(cw), f64(sk), f64(sv), f64(sw), np_t)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b, c in zip(got, ref, np_out):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(f64(a), f64(b), atol=tol, rtol=tol)
    np.testing.assert_allclose(f64(a), c, atol=tol, rtol=tol)
  # Weights are token counts: every merged source and every centre is counted once.
  merged_sources = np.where(np_t >= 0, f64(sw), 0).sum()
  np.testing.assert_allclose(f64(got[2]).sum(), f64(cw).sum() + merged_sources)


def test_merge_kernels_tpu_interpreter():
  sk, sv, ck, cv, valid, cw, sw = _kernel_inputs(5, r=2, e=200, m=150, d=64)
  interp = pltpu.InterpretParams()
  target, sim = merge.assign_to_centres(sk, ck, valid, interpret=interp)
  want_t, want_s = reference.assign_to_centres(sk, ck, valid)
  np.testing.assert_array_equal(np.asarray(target), np.asarray(want_t))
  np.testing.assert_allclose(np.asarray(sim), np.asarray(want_s), atol=1e-5)
  got = merge.scatter_mean(ck, cv, cw, sk, sv, sw, target, interpret=interp)
  for a, b in zip(got, reference.scatter_mean(ck, cv, cw, sk, sv, sw, target)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


_SD = jax.ShapeDtypeStruct
_TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
_R, _E, _M, _D = 6, 2000, 2048, 64
_ASSIGN = (_SD((_R, _E, _D), jnp.bfloat16), _SD((_R, _M, _D), jnp.bfloat16),
           _SD((_R, _M), jnp.bool_))
_SCATTER = (_SD((_R, _M, _D), jnp.bfloat16), _SD((_R, _M, _D), jnp.bfloat16),
            _SD((_R, _M), jnp.float32), _SD((_R, _E, _D), jnp.bfloat16),
            _SD((_R, _E, _D), jnp.bfloat16), _SD((_R, _E), jnp.float32),
            _SD((_R, _E), jnp.int32))


@pytest.mark.parametrize("fn,args", [(merge.assign_to_centres, _ASSIGN),
                                     (merge.scatter_mean, _SCATTER)])
@pytest.mark.parametrize("platform,marker", [("tpu", "tpu_custom_call"),
                                             ("cuda", "xla.gpu.triton")])
def test_merge_kernels_export(fn, args, platform, marker):
  exported = jax.export.export(jax.jit(fn), platforms=[platform],
                               disabled_checks=[_TRITON])(*args)
  assert marker in exported.mlir_module()


def test_merge_kernel_errors():
  sk, sv, ck, cv, valid, cw, sw = _kernel_inputs(0)
  with pytest.raises(ValueError, match="centre_valid must be"):
    merge.assign_to_centres(sk, ck, valid[:, :5])
  with pytest.raises(ValueError, match="block_e must be a positive power of two"):
    merge.assign_to_centres(sk, ck, valid, block_e=12)
  with pytest.raises(ValueError, match="sources must be"):
    merge.scatter_mean(ck, cv, cw, sk, sv, sw[:, :3], sw.astype(jnp.int32))


# ----------------------------------------------------------------- numpy restatements


@functools.partial(jax.jit, static_argnames=("method", "keep"))
def _compact(arrays, method, keep):
  x = base.LayerInputs(config=mi.config(), layer=0, **arrays)
  cand = LayerCache(keys=x.keys, values=x.values, positions=x.key_positions,
                    end=jnp.int32(x.keys.shape[2]), state=x.slot_state)
  return method.compact(cand, x, keep)


def _merged_slots(data, kept, targets, merged, weights=None):
  """Per row and head: {kept position: (key, value, tokens)} after averaging each merged
  leaving slot into its target (weights: per-slot token counts, default 1)."""
  b, k, s = data.kpos.shape
  weights = np.ones((b, k, s)) if weights is None else weights
  out = []
  for row in range(b):
    heads = []
    for kv in range(k):
      acc = {i: [weights[row, kv, i] * data.k[row, kv, i], weights[row, kv, i] * data.v[row, kv, i],
                 weights[row, kv, i]] for i in kept[row, kv] if data.kpos[row, kv, i] >= 0}
      for e, t in targets[row][kv].items():
        if merged[row][kv][e]:
          acc[t][0] = acc[t][0] + weights[row, kv, e] * data.k[row, kv, e]
          acc[t][1] = acc[t][1] + weights[row, kv, e] * data.v[row, kv, e]
          acc[t][2] += weights[row, kv, e]
      heads.append({int(data.kpos[row, kv, i]): (a[0] / a[2], a[1] / a[2], a[2])
                    for i, a in acc.items()})
    out.append(heads)
  return out


def _assert_layer_matches(layer, expected, atol=1e-5):
  keys, values = np.asarray(layer.keys, np.float64), np.asarray(layer.values, np.float64)
  positions, state = np.asarray(layer.positions), np.asarray(layer.state)
  for row, heads in enumerate(expected):
    for kv, slots in enumerate(heads):
      real = positions[row, kv] >= 0
      assert sorted(positions[row, kv][real]) == sorted(slots), (row, kv)
      for i in np.flatnonzero(real):
        key, value, tokens = slots[int(positions[row, kv, i])]
        np.testing.assert_allclose(keys[row, kv, i], key, atol=atol)
        np.testing.assert_allclose(values[row, kv, i], value, atol=atol)
        assert state[row, kv, i] == tokens - 1
      assert (state[row, kv][~real] == 0).all()


def _np_ems(data, keep, window, threshold):
  sums = mi.column_sums(data)                                           # [B, H, S]
  qpos = data.qpos[:, None, None, :]
  kpos = data.kpos[..., None]
  seen_by = ((qpos >= 0) & (qpos >= kpos) & (kpos >= 0)).sum(-1)        # [B, K, S]
  glob = sums / np.maximum(np.repeat(seen_by, G, axis=1), 1)
  local = mi.attention(data.q[:, -window:], data.k, data.qpos[:, -window:], data.kpos).sum(2)
  by_max = lambda x: x / np.where(x.max(-1, keepdims=True) > 0, x.max(-1, keepdims=True), 1)
  score = mi.group(by_max(glob) + by_max(local), "mean")
  prio = mi.priorities(score, mi.window_protected(data, window), data.kpos)
  mi.assert_separated(prio, keep)
  kept = mi.select(prio, keep)
  targets, merged = [], []
  unit = lambda x: x / np.linalg.norm(x)
  for row in range(data.k.shape[0]):
    t_row, m_row = [], []
    for kv in range(K):
      centres = [i for i in kept[row, kv] if data.kpos[row, kv, i] >= 0]
      t, m = {}, {}
      for e in range(data.k.shape[2]):
        if e in kept[row, kv] or data.kpos[row, kv, e] < 0:
          continue
        sims = np.array([unit(data.k[row, kv, e]) @ unit(data.k[row, kv, c]) for c in centres])
        order = np.sort(sims)
        assert order[-1] - order[-2] > 1e-6 and abs(order[-1] - threshold) > 1e-6
        t[e], m[e] = centres[int(sims.argmax())], sims.max() >= threshold
      t_row.append(t)
      m_row.append(m)
    targets.append(t_row)
    merged.append(m_row)
  return kept, targets, merged


@pytest.mark.parametrize("seed,keep,window,threshold", [
    (0, 20, 8, 0.5), (1, 12, 4, 0.2), (2, 30, 16, 0.7), (3, 20, 8, -1.0)])
def test_ems_matches_numpy(seed, keep, window, threshold):
  data = mi.random_prefill(seed)
  method = EMS(window=window, threshold=threshold)
  arrays = mi.layer_arrays(data, column_sums=mi.column_sums(data),
                           slot_state=np.zeros(data.kpos.shape))
  layer = _compact(arrays, method, keep)
  kept, targets, merged = _np_ems(data, keep, window, threshold)
  expected = _merged_slots(data, kept, targets, merged)
  _assert_layer_matches(layer, expected)
  n_merged = sum(v for row in merged for head in row for v in head.values())
  assert n_merged > 0 and (threshold == -1.0 or n_merged < sum(
      len(head) for row in merged for head in row)), "both classes should occur"


def _np_elastic(data, keep, sinks, sums):
  score = np.broadcast_to(sums.mean(1, keepdims=True), data.kpos.shape)
  protected = mi.sinks_protected(data.kpos, sinks) | mi.window_protected(data, 1)
  prio = mi.priorities(score, protected, data.kpos)
  mi.assert_separated(prio, keep)
  kept = mi.select(prio, keep)
  targets, merged = [], []
  for row in range(data.k.shape[0]):
    t_row, m_row = [], []
    for kv in range(K):
      anchors = [i for i in kept[row, kv] if data.kpos[row, kv, i] >= 0]
      t, m = {}, {}
      for e in range(data.k.shape[2]):
        if e in kept[row, kv] or data.kpos[row, kv, e] < 0:
          continue
        gaps = [abs(int(data.kpos[row, kv, e]) - int(data.kpos[row, kv, a])) for a in anchors]
        t[e], m[e] = anchors[int(np.argmin(gaps))], True
      t_row.append(t)
      m_row.append(m)
    targets.append(t_row)
    merged.append(m_row)
  return kept, targets, merged


@pytest.mark.parametrize("seed,keep,sinks", [(0, 20, 4), (1, 9, 1), (2, 30, 0)])
def test_elastic_cache_matches_numpy(seed, keep, sinks):
  data = mi.random_prefill(seed)
  sums = mi.column_sums(data)
  # Earlier merges: some slots already stand for several tokens (a later prefill chunk).
  tokens = np.random.default_rng(seed).integers(1, 4, data.kpos.shape).astype(np.float64)
  arrays = mi.layer_arrays(data, column_sums=sums, slot_state=tokens - 1)
  layer = _compact(arrays, ElasticCache(sinks=sinks), keep)
  kept, targets, merged = _np_elastic(data, keep, sinks, sums)
  _assert_layer_matches(layer, _merged_slots(data, kept, targets, merged, weights=tokens))
  # Every token is merged somewhere: the kept slots stand for all of them.
  state = np.asarray(layer.state)
  real = np.asarray(layer.positions) >= 0
  for row, n in enumerate(data.lengths):
    for kv in range(K):
      assert (1 + state[row, kv][real[row, kv]]).sum() == tokens[row, kv][
          data.kpos[row, kv] >= 0].sum()


def _runs_prefill(seed):
  """Keys in runs of near-identical directions (what KVMerger merges)."""
  data = mi.random_prefill(seed)
  rng = np.random.default_rng(seed + 100)
  b, k, s, d = data.k.shape
  keys = data.k.copy()
  for row in range(b):
    for kv in range(k):
      i = 0
      while i < s:
        n = int(rng.integers(1, 6))
        direction = rng.normal(size=d)
        for j in range(i, min(i + n, s)):
          keys[row, kv, j] = direction * rng.uniform(0.5, 2.0) + 0.2 * rng.normal(size=d)
        i += n
  data.k = mi.f32(keys)
  return data


def _np_kvmerger(data, keep, similarity, sinks, window, sums):
  score = mi.group(sums, "sum")
  protected = mi.sinks_protected(data.kpos, sinks) | mi.window_protected(data, window)
  unit = lambda x: x / np.linalg.norm(x)
  out = []
  for row in range(data.k.shape[0]):
    heads = []
    for kv in range(K):
      pos, keys, values = data.kpos[row, kv], data.k[row, kv], data.v[row, kv]
      free = (pos >= 0) & ~protected[row, kv]
      sets, current = [], [0]
      for i in range(1, len(pos)):
        cos = unit(keys[i - 1]) @ unit(keys[i]) if free[i] and free[i - 1] else -2
        assert abs(cos - similarity) > 1e-6
        if cos >= similarity:
          current.append(i)
        else:
          sets.append(current)
          current = [i]
      sets.append(current)
      entries = []   # (priority, pivot position, key, value, tokens)
      for members in sets:
        if pos[members[0]] < 0:
          continue
        pivot = members[int(np.argmax(score[row, kv, members]))]
        d2 = np.array([((keys[pivot] - keys[i]) ** 2).sum() for i in members])
        spread = d2.mean()
        w = np.exp(-d2 / (2 * spread)) if spread > 0 else np.ones(len(members))
        w = w / w.sum()
        prio = np.inf if protected[row, kv, pivot] else score[row, kv, pivot]
        entries.append((prio, pos[pivot], (w[:, None] * keys[members]).sum(0),
                        (w[:, None] * values[members]).sum(0), len(members)))
      ranked = sorted(entries, key=lambda e: -e[0])
      if len(ranked) > keep:
        assert ranked[keep - 1][0] - ranked[keep][0] > 1e-6
      heads.append({int(e[1]): e[2:] for e in ranked[:keep]})
    out.append(heads)
  return out


@pytest.mark.parametrize("seed,keep,similarity,sinks,window", [
    (0, 20, 0.75, 4, 8), (1, 12, 0.5, 2, 4), (2, 40, 0.9, 0, 0)])
def test_kvmerger_matches_numpy(seed, keep, similarity, sinks, window):
  data = _runs_prefill(seed)
  sums = mi.column_sums(data)
  arrays = mi.layer_arrays(data, column_sums=sums, slot_state=np.zeros(data.kpos.shape))
  layer = _compact(arrays, KVMerger(similarity=similarity, sinks=sinks, window=window), keep)
  expected = _np_kvmerger(data, keep, similarity, sinks, window, sums)
  _assert_layer_matches(layer, expected, atol=2e-5)
  assert (np.asarray(layer.state) > 0).any(), "some sets should have merged"


# --------------------------------------------------------------------------- the model

_METHODS = [EMS(window=8), ElasticCache(), KVMerger(window=8)]


@pytest.mark.parametrize("method", _METHODS, ids=lambda m: m.name)
def test_budget_above_the_context_is_the_full_cache(model, method):
  prompts = random_prompts((90, 120))
  full = kvjax.generate(model, prompts, max_new_tokens=5)
  got = kvjax.generate(model, prompts, method=method, budget=500, max_new_tokens=5)
  assert got.token_ids == full.token_ids


@pytest.mark.parametrize("method", _METHODS, ids=lambda m: m.name)
def test_chunked_prefill_counts_every_token(model, method):
  """After chunked prefill each kept slot's count of tokens is consistent: never more
  tokens than the context had, exactly all of them for Elastic Cache (it drops nothing),
  and the cache holds the budget."""
  prompts = random_prompts((90, 120))
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context.prefill(model, tokens, mask, method, 40, room=0, chunk_size=32)
  for layer in pre.cache.layers:
    assert layer.capacity == 40
    real = np.asarray(layer.positions) >= 0
    counted = np.where(real, 1 + np.asarray(layer.state), 0).sum(-1)      # [B, K]
    for row, n in enumerate((90, 120)):
      if isinstance(method, ElasticCache):
        assert (counted[row] == n).all(), counted[row]
      else:
        assert (counted[row] <= n).all() and (counted[row] >= 40).all()
  got = kvjax.generate(model, prompts, method=method, budget=40, prefill_chunk_size=32,
                       max_new_tokens=3)
  assert len(got.token_ids[0]) == 3


@pytest.mark.parametrize("method", _METHODS, ids=lambda m: m.name)
def test_questions_score_and_kernel_path(model, method, monkeypatch):
  prompts = random_prompts((70, 80))
  got = kvjax.generate(model, prompts, questions=[[5, 6, 7], [8, 9]], method=method,
                       compression_ratio=0.5, max_new_tokens=3)
  assert len(got.token_ids[1]) == 3
  assert got.stats["context_cache_bytes"] < 0.6 * got.stats["full_context_cache_bytes"]
  scores = kvjax.score(model, prompts, [[1, 2, 3]] * 2, method=method, compression_ratio=0.5)
  assert all(np.isfinite(s).all() for s in scores)
  want, kernel = jnp_and_kernel_tokens(model, prompts, monkeypatch, method=method,
                                       compression_ratio=0.5, max_new_tokens=4)
  assert kernel == want


def test_conversation_reuses_the_merged_cache(smollm2_tokenizer):
  from tiny import tiny_chat_model
  chat = tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)
  text = " ".join(f"Fact {i}: the code word is word{i}." for i in range(12))
  turns = ["First?", "Second?"]
  full = kvjax.converse(chat, text, turns, max_new_tokens=4)
  for method in _METHODS:
    same = kvjax.converse(chat, text, turns, method=method, budget=10_000, max_new_tokens=4)
    assert same.answers == full.answers
    half = kvjax.converse(chat, text, turns, method=method, compression_ratio=0.5,
                          max_new_tokens=4)
    assert len(half.answers[0]) == 2
    assert half.stats["context_cache_bytes"] < 0.6 * full.stats["context_cache_bytes"]


@pytest.mark.parametrize("build,match", [
    (lambda: EMS(threshold=1.5), r"threshold=1.5"),
    (lambda: EMS(window=0), r"window=0 must be an integer >= 1"),
    (lambda: ElasticCache(sinks=-1), r"sinks=-1 must be an integer >= 0"),
    (lambda: KVMerger(similarity=float("nan")), r"similarity=nan"),
    (lambda: KVMerger(window=-2), r"window=-2"),
    (lambda: kvjax.methods.get("adakv", press="ems"), "merging method"),
    (lambda: kvjax.methods.get("kivi", press="kvmerger"), "not a merging method"),
])
def test_merging_errors(build, match):
  with pytest.raises(kvjax.KvjaxError, match=match):
    build()


# ------------------------------------------------------------------------------ KVCrush


def _np_kvcrush(data, keep, share, anchor, window=8):
  prio = mi.snapkv(data, keep, window, 7, "max", "mean")
  scores = mi.snapkv_scores(data, window, 7, "max", "mean")
  fixed = {"alternate": np.arange(K) % 2 == 0, "zeros": np.zeros(K, bool)}
  tiers = mi.kvcrush(data, keep, share, fixed.get(anchor, anchor), prio, scores, window)
  mi.assert_separated(tiers, keep)
  kept = mi.select(tiers, keep)
  return [[sorted(int(p) for p in data.kpos[row, kv, kept[row, kv]] if p >= 0)
           for kv in range(K)] for row in range(data.k.shape[0])]


@pytest.mark.parametrize("seed,keep,share,anchor", [
    (0, 20, 0.3, "mean"), (1, 16, 0.5, "alternate"), (2, 30, 0.1, "zeros"), (3, 12, 0.9, "mean")])
def test_kvcrush_matches_numpy(seed, keep, share, anchor):
  from kvjax.methods import KVCrush, SnapKV
  data = mi.random_prefill(seed)
  method = KVCrush(press=SnapKV(window=8), share=share, anchor=anchor)
  layer = _compact(mi.layer_arrays(data), method, keep)
  want = _np_kvcrush(data, keep, share, anchor)
  positions = np.asarray(layer.positions)
  for row in range(2):
    for kv in range(K):
      assert sorted(p for p in positions[row, kv] if p >= 0) == want[row][kv], (row, kv)
  snap = _compact(mi.layer_arrays(data), SnapKV(window=8), keep)
  assert (np.sort(np.asarray(snap.positions), -1) != np.sort(positions, -1)).any(), \
      "representatives should replace some of SnapKV's own choices"


def test_kvcrush_errors_and_composition(model):
  from kvjax.methods import KVCrush
  with pytest.raises(kvjax.KvjaxError, match="decode-time"):
    KVCrush(press="h2o")
  with pytest.raises(kvjax.KvjaxError, match=r"anchor='x'"):
    KVCrush(anchor="x")
  with pytest.raises(kvjax.KvjaxError, match=r"share=1.0"):
    KVCrush(share=1.0)
  prompts = random_prompts((90, 120))
  # Composes under a quantizer (eviction family); the random anchor is seeded.
  a = kvjax.generate(model, prompts, method="kivi:bits=4:group_size=8:press=kvcrush", compression_ratio=0.5,
                     max_new_tokens=4)
  b = kvjax.generate(model, prompts, method="kivi:bits=4:group_size=8:press=kvcrush", compression_ratio=0.5,
                     max_new_tokens=4)
  assert a.token_ids == b.token_ids


# ---------------------------------------------------------------------------------- D2O


def _np_cos(a, b):
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def _d2o_layer(seed, b=2, k=2, s=40, d=16):
  """A prefilled dense layer with D2O's state: accumulated scores, no merges yet."""
  rng = np.random.default_rng(seed)
  pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, k, s)).copy()
  pos[1, :, :6] = -1
  pos[1, :, 6:] -= 6
  keys, values = rng.normal(size=(b, k, s, d)), rng.normal(size=(b, k, s, d))
  keys[pos < 0], values[pos < 0] = 0, 0
  score = np.where(pos >= 0, rng.random((b, k, s)), 0)
  lengths = np.array([s, s - 6], np.int32)
  return keys, values, pos, score, lengths


def _np_d2o_compact(keys, values, pos, score, lengths, keep, recent, sinks):
  """{(row, head): {position: (key, value, tokens)}} and tau per row."""
  b, k, s, _ = keys.shape
  protected = ((pos >= 0) & (pos < sinks)) | ((pos >= 0) & (pos >= lengths[:, None, None] - recent))
  prio = np.where(pos >= 0, np.where(protected, np.inf, score), -np.inf)
  out, taus = {}, []
  for row in range(b):
    best_sims, plans = [], {}
    for kv in range(k):
      kept = [i for i in mi.top(prio[row, kv], keep) if pos[row, kv, i] >= 0]
      leaving = [i for i in range(s) if pos[row, kv, i] >= 0 and i not in kept]
      assign = {}
      for e in leaving:
        sims = [_np_cos(keys[row, kv, e], keys[row, kv, c]) for c in kept]
        assign[e] = (kept[int(np.argmax(sims))], max(sims))
        best_sims.append(max(sims))
      plans[kv] = (kept, assign)
    tau = np.mean(best_sims) if best_sims else 0.0
    taus.append(tau)
    for kv, (kept, assign) in plans.items():
      acc = {c: [keys[row, kv, c].copy(), values[row, kv, c].copy(), 1.0] for c in kept}
      for e, (t, m) in assign.items():
        assert abs(m - tau) > 1e-6, "near tie with tau: change the seed"
        if m >= tau:
          acc[t][0] += keys[row, kv, e]
          acc[t][1] += values[row, kv, e]
          acc[t][2] += 1
      out[row, kv] = {int(pos[row, kv, c]): (a[0] / a[2], a[1] / a[2], a[2])
                      for c, a in acc.items()}
  return out, np.array(taus)


@pytest.mark.parametrize("seed,keep,recent,sinks", [(0, 12, 3, 4), (1, 20, 5, 0), (2, 8, 2, 2)])
def test_d2o_first_eviction_matches_numpy(seed, keep, recent, sinks):
  from kvjax.methods.merging import _d2o_compact, decode_tau
  keys, values, pos, score, lengths = _d2o_layer(seed)
  zero = jnp.zeros(pos.shape, jnp.float32)
  layer = LayerCache(keys=jnp.asarray(keys, jnp.float32), values=jnp.asarray(values, jnp.float32),
                     positions=jnp.asarray(pos), end=jnp.int32(pos.shape[2]),
                     state={"score": jnp.asarray(score, jnp.float32), "absorbed": zero,
                            "tau": zero})
  got = _d2o_compact(layer, jnp.asarray(lengths), jnp.int32(keep), capacity=keep,
                     recent=recent, sinks=sinks)
  want, tau = _np_d2o_compact(keys, values, pos, score, lengths, keep, recent, sinks)
  assert got.capacity == keep
  np.testing.assert_allclose(np.asarray(decode_tau(got.state["tau"])), tau, atol=1e-5)
  gk, gv, gp = (np.asarray(a, np.float64) for a in (got.keys, got.values, got.positions))
  absorbed = np.asarray(got.state["absorbed"])
  for (row, kv), slots in want.items():
    real = gp[row, kv] >= 0
    assert sorted(gp[row, kv][real].astype(int)) == sorted(slots)
    for i in np.flatnonzero(real):
      key, value, n = slots[int(gp[row, kv, i])]
      np.testing.assert_allclose(gk[row, kv, i], key, atol=1e-5)
      np.testing.assert_allclose(gv[row, kv, i], value, atol=1e-5)
      assert absorbed[row, kv, i] == n - 1


def test_d2o_first_eviction_pads_with_reserved_slots():
  """Past the budget, a shared capacity's slots are reserved (decode never fills them);
  a row holding fewer tokens than the budget keeps its empty slots up to the budget (it
  grows into them while decoding, as unpadded); the rest equals the exact capacity's."""
  from kvjax.methods.merging import _d2o_compact
  keys, values, pos, score, lengths = _d2o_layer(4)
  pos[1, :, :-8] = -1                  # row 1 holds 8 tokens (positions 26..33), under keep
  keys[pos < 0], values[pos < 0], score[pos < 0] = 0, 0, 0
  zero = jnp.zeros(pos.shape, jnp.float32)
  layer = LayerCache(keys=jnp.asarray(keys, jnp.float32), values=jnp.asarray(values, jnp.float32),
                     positions=jnp.asarray(pos), end=jnp.int32(pos.shape[2]),
                     state={"score": jnp.asarray(score, jnp.float32), "absorbed": zero,
                            "tau": zero})
  run = lambda capacity: _d2o_compact(layer, jnp.asarray(lengths), jnp.int32(12),
                                      capacity=capacity, recent=jnp.int32(3),
                                      sinks=jnp.int32(2))
  exact, padded = run(12), run(16)
  got = np.asarray(padded.positions)
  np.testing.assert_array_equal(got[..., :12], np.asarray(exact.positions))
  assert (got[..., 12:] == -2).all()
  assert (got[0] >= 0).sum() == 2 * 12 and (got[1] >= 0).sum() == 2 * 8
  assert (got[1, :, 8:12] == -1).all()
  for a, b in ((padded.keys, exact.keys), (padded.values, exact.values),
               (padded.state["absorbed"], exact.state["absorbed"]),
               (padded.state["score"], exact.state["score"]),
               (padded.state["tau"], exact.state["tau"])):
    np.testing.assert_allclose(np.asarray(a)[:, :, :12], np.asarray(b), atol=1e-6)
  assert int(padded.end) == 16 and int(exact.end) == 12


def test_d2o_shape_padding_changes_nothing_but_the_allocation(model, monkeypatch):
  from kvjax.methods import merging
  prompts = random_prompts((90, 120), seed=3)
  kwargs = dict(method="d2o", compression_ratio=0.5, max_new_tokens=40,
                questions=[[5, 6, 7], [8, 9]])
  padded, exact = padded_and_exact(model, prompts, merging, monkeypatch, **kwargs)
  budgets = padded.stats["method_stats"]["layer_budgets"]
  assert budgets == exact.stats["method_stats"]["layer_budgets"] and len(set(budgets)) > 1
  allocated = padded.stats["method_stats"]["allocated_slots_per_layer"]
  assert all(a >= b for a, b in zip(allocated, budgets)) and allocated != budgets


def test_d2o_reused_capacity_sets_change_nothing_but_the_allocation(model, monkeypatch):
  from kvjax.methods import merging
  kwargs = dict(method="d2o", compression_ratio=0.5, max_new_tokens=40,
                questions=[[5, 6, 7], [8, 9]])
  padded_and_exact(model, random_prompts((90, 120), seed=3), merging, monkeypatch,
                   reused=True, **kwargs)


def test_d2o_later_prompts_reuse_capacity_sets_and_decode_the_same(model, monkeypatch):
  """Prompts of one length, one after another, take capacity sets allocated before
  (`kv_cache.shared_capacities`) where those hold their layers within the slack, so fewer
  decode loops compile; each decodes the tokens and keeps the bytes it does alone (with
  only its own rounded counts)."""
  from kvjax.cache import kv_cache
  from kvjax.generation import engine
  # The tiny model's two layers swing between 48 and 80 slots from prompt to prompt (a
  # union is up to 67% over a prompt's own): a wider slack lets sets be shared here.
  monkeypatch.setattr(kv_cache, "SHAPE_REUSE_SLACK", 1.0)
  prompts = [[p] for p in random_prompts((100,) * 5, seed=11)]
  kwargs = dict(method="d2o", compression_ratio=0.5, max_new_tokens=6)

  def run(prompt):
    out = kvjax.generate(model, prompt, **kwargs)
    return (out.token_ids, out.stats["context_cache_bytes"],
            tuple(out.stats["method_stats"]["allocated_slots_per_layer"]))

  alone = []
  for prompt in prompts:
    kv_cache.forget_capacities()
    alone.append(run(prompt))
  kv_cache.forget_capacities()
  engine.STEPS.clear()
  in_turn = [run(prompt) for prompt in prompts]
  loops = [key for key in engine.STEPS._executables if key[0] == "decode_loop"]
  for (tokens, nbytes, own), (got_tokens, got_nbytes, got) in zip(alone, in_turn):
    assert got_tokens == tokens and got_nbytes == nbytes
    assert all(a <= b for a, b in zip(own, got))
    assert sum(got) <= (1 + kv_cache.SHAPE_REUSE_SLACK) * sum(own)
  own_sets, sets = {a[2] for a in alone}, {a[2] for a in in_turn}
  assert len(sets) < len(own_sets) and len(loops) == len(sets)


def test_d2o_layer_budgets_favour_flat_attention():
  from kvjax.methods.merging import d2o_layer_budgets
  rng = np.random.default_rng(0)
  flat = np.full((1, 2, 100), 1.0) + 0.01 * rng.random((1, 2, 100))
  peaked = np.zeros((1, 2, 100))
  peaked[..., :3] = 30.0
  valid = [np.ones((1, 2, 100), bool)] * 3
  budgets = d2o_layer_budgets([flat, peaked, (flat + peaked) / 2], valid, 20,
                              np.array([100]), 5)
  assert budgets[0] > budgets[2] > budgets[1] >= 5
  # softmax(-v) * L * rho of the longest context, v min-max normalised over all heads.
  v = np.array([np.var(x[0], axis=-1).mean() for x in (flat, peaked, (flat + peaked) / 2)])
  v = (v - v.min()) / (v.max() - v.min())
  share = np.clip(np.exp(-v) / np.exp(-v).sum() * 3 * 0.2, 0.01, 1)
  assert budgets == [max(5, round(r * 100)) for r in share]


@pytest.mark.parametrize("tau_row0", [-0.2, 0.99])
def test_d2o_decode_step_merges_the_victim(model, tau_row0):
  """One decode step: the least-scored unprotected slot is overwritten by the new token
  after being averaged into its most similar slot when the similarity reaches tau; tau
  moves by alpha/beta."""
  from kvjax.cache.kv_cache import NewTokens
  from kvjax.methods import D2O
  from kvjax.methods.merging import decode_tau, encode_tau
  from kvjax.methods.plan import evict_and_insert
  keys, values, pos, score, lengths = _d2o_layer(3, s=16)
  b, k, s, d = keys.shape
  tau0 = np.array([tau_row0, 0.1])
  absorbed0 = np.where(pos >= 0, np.random.default_rng(5).integers(0, 4, pos.shape), 7.0)
  state = {"score": jnp.asarray(score, jnp.float32),
           "absorbed": jnp.asarray(absorbed0, jnp.float32),
           "tau": jnp.broadcast_to(jnp.asarray(encode_tau(tau0), jnp.float32)[:, None, None],
                                   pos.shape)}
  layer = LayerCache(keys=jnp.asarray(keys, jnp.float32), values=jnp.asarray(values, jnp.float32),
                     positions=jnp.asarray(pos), end=jnp.int32(s), state=state)
  rng = np.random.default_rng(9)
  new = NewTokens(keys=jnp.asarray(rng.normal(size=(b, k, 1, d)), jnp.float32),
                  values=jnp.asarray(rng.normal(size=(b, k, 1, d)), jnp.float32),
                  positions=jnp.asarray(lengths[:, None]))
  probs = jnp.zeros((b, 4, s))          # no attention this step: scores stay as they are
  method = D2O(sinks=2, alpha=0.5, beta=0.5)
  got = evict_and_insert(method, layer, new, probs, jnp.zeros((b, 4)),
                         jnp.asarray(lengths + 1), 10)
  recent = method.recent(10)
  best = []
  for row in range(b):
    row_best = []
    for kv in range(k):
      p = pos[row, kv]
      protected = (p >= 0) & ((p < 2) | (p >= lengths[row] + 1 - recent))
      prio = np.where(p >= 0, np.where(protected, np.inf, score[row, kv]), -np.inf)
      victim = int(np.argmin(prio)) if (p < 0).sum() == 0 else int(np.flatnonzero(p < 0)[0])
      others = [i for i in range(s) if p[i] >= 0 and i != victim]
      if p[victim] < 0:     # an empty slot takes the new token: nothing leaves
        for got_a, a in ((got.keys, keys), (got.values, values)):
          np.testing.assert_allclose(np.asarray(got_a)[row, kv, others], a[row, kv, others],
                                     atol=1e-6)
        want_abs = np.where(p >= 0, absorbed0[row, kv], 0.0)
        want_abs[victim] = 0
        np.testing.assert_array_equal(np.asarray(got.state["absorbed"])[row, kv], want_abs)
        continue
      sims = [_np_cos(keys[row, kv, victim], keys[row, kv, i]) for i in others]
      target = others[int(np.argmax(sims))]
      row_best.append(max(sims))
      merged = max(sims) >= tau0[row]
      wt, wv = 1 + absorbed0[row, kv, target], (1 + absorbed0[row, kv, victim]) * merged
      mean = lambda a: (wt * a[row, kv, target] + wv * a[row, kv, victim]) / (wt + wv)
      np.testing.assert_allclose(np.asarray(got.keys)[row, kv, target], mean(keys), atol=1e-5)
      np.testing.assert_allclose(np.asarray(got.values)[row, kv, target], mean(values), atol=1e-5)
      rest = [i for i in others if i != target]
      for got_a, a in ((got.keys, keys), (got.values, values)):   # nothing else moves
        np.testing.assert_allclose(np.asarray(got_a)[row, kv, rest], a[row, kv, rest], atol=1e-6)
      want_abs = np.where(pos[row, kv] >= 0, absorbed0[row, kv], 0.0)
      want_abs[target] += wv
      want_abs[victim] = 0
      np.testing.assert_array_equal(np.asarray(got.state["absorbed"])[row, kv], want_abs)
      np.testing.assert_allclose(np.asarray(got.keys)[row, kv, victim],
                                 np.asarray(new.keys)[row, kv, 0], atol=1e-6)
    best.append(0.5 * tau0[row] + 0.5 * np.mean(row_best) if row_best else tau0[row])
  np.testing.assert_allclose(np.asarray(decode_tau(got.state["tau"])), best, atol=1e-5)


def test_d2o_decode_step_without_a_target_writes_nothing_else(model):
  """The victim is its head's only real token (the other slots reserved) and tau is 0: no
  target, so no slot but the victim's changes (no write to a clipped index)."""
  from kvjax.cache.kv_cache import RESERVED_POSITION, NewTokens
  from kvjax.methods import D2O
  from kvjax.methods.plan import evict_and_insert
  b, k, s, d = 1, 1, 4, 8
  rng = np.random.default_rng(1)
  pos = np.full((b, k, s), RESERVED_POSITION, np.int32)
  pos[0, 0, 2] = 5
  keys, values = rng.normal(size=(b, k, s, d)), rng.normal(size=(b, k, s, d))
  zero = jnp.zeros(pos.shape, jnp.float32)
  layer = LayerCache(keys=jnp.asarray(keys, jnp.float32), values=jnp.asarray(values, jnp.float32),
                     positions=jnp.asarray(pos), end=jnp.int32(s),
                     state={"score": zero, "absorbed": zero, "tau": zero})
  new = NewTokens(keys=jnp.ones((b, k, 1, d)), values=jnp.ones((b, k, 1, d)),
                  positions=jnp.asarray([[6]]))
  got = evict_and_insert(D2O(sinks=0), layer, new, jnp.zeros((b, 2, s)), jnp.zeros((b, 2)),
                         jnp.asarray([7]), 4)
  rest = [0, 1, 3]
  for got_a, a in ((got.keys, keys), (got.values, values)):
    np.testing.assert_array_equal(np.asarray(got_a)[0, 0, rest], a[0, 0, rest].astype(np.float32))
  np.testing.assert_array_equal(np.asarray(got.state["absorbed"]), 0)
  np.testing.assert_array_equal(np.asarray(got.keys)[0, 0, 2], 1)


def test_d2o_through_every_phase(model, smollm2_tokenizer):
  from kvjax.methods import D2O
  prompts = random_prompts((90, 120))
  got = kvjax.generate(model, prompts, method="d2o", compression_ratio=0.5, max_new_tokens=8)
  budgets = got.stats["method_stats"]["layer_budgets"]
  assert len(set(budgets)) > 1, "layers get different budgets"
  chunked = kvjax.generate(model, prompts, questions=[[5, 6, 7], [8, 9]], method="d2o",
                           compression_ratio=0.5, prefill_chunk_size=32, max_new_tokens=4)
  assert len(chunked.token_ids[0]) == 4
  scores = kvjax.score(model, prompts, [[1, 2, 3]] * 2, method="d2o", compression_ratio=0.5)
  assert all(np.isfinite(s).all() for s in scores)
  from tiny import tiny_chat_model
  chat = tiny_chat_model(smollm2_tokenizer, max_position_embeddings=2048)
  text = " ".join(f"Fact {i}: the code word is word{i}." for i in range(12))
  talk = kvjax.converse(chat, text, ["First?", "Second?"], method=D2O(), compression_ratio=0.5,
                        max_new_tokens=4)
  assert len(talk.answers[0]) == 2
  with pytest.raises(kvjax.KvjaxError, match=r"hh_ratio=0.0 \+ recent_ratio=0.0"):
    D2O(hh_ratio=0.0, recent_ratio=0.0)


def test_merged_layer_bytes_match_the_analytic_size():
  """A merging method's layer: the kept slots plus a float32 token count per slot (SmolLM2's
  KV shape, bf16, 4K tokens at ratio 0.5)."""
  b, k, s, d = 1, 3, 4096, 64
  rng = np.random.default_rng(0)
  arrays = dict(keys=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                values=jnp.asarray(rng.normal(size=(b, k, s, d)), jnp.bfloat16),
                positions=jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, k, s)))
  cand = LayerCache(**arrays, end=jnp.int32(s), state=jnp.zeros((b, k, s), jnp.float32))
  x = base.LayerInputs(config=tiny_config(num_heads=9, num_kv_heads=3, head_dim=d), layer=0,
                       queries=None, raw_queries=None, query_positions=None, keys=cand.keys,
                       values=cand.values, key_positions=cand.positions,
                       lengths=jnp.asarray([s]),
                       column_sums=jnp.asarray(rng.random((b, 9, s)), jnp.float32))
  kept = ElasticCache().merge(cand, x, s // 2)
  by_hand = k * (s // 2) * (2 * d * 2 + 4 + 4) + 4
  assert abs(kept.nbytes - by_hand) <= 0.05 * by_hand
  assert 0.5 < kept.nbytes / (2 * k * s * d * 2) < 0.52
