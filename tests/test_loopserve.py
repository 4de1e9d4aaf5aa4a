"""LoopServe (decode part): the seed, the re-selection and the decode attention against a
slow numpy restatement, offloaded equal to on-device, device bytes against arithmetic, the
method end to end on a tiny model, and bad hyperparameters."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import method_inputs as mi
from kvjax.cache.kv_cache import (QUERIES, LayerCache, NewTokens, cache_nbytes,
                                  host_nbytes)
from kvjax.cache.policy import LayerStep
from kvjax.errors import MethodError
from kvjax.generation import context, conversation, inputs
from kvjax.methods import base
from kvjax.methods.loopserve import (LoopServe, LoopServeLayerCache, input_scores,
                                     line_masses, loopserve_layer, sample_rows,
                                     select_lines, sparse_prefill, top_slots)
from kvjax.ops import attention as attention_ops
from kvjax.methods.plan import CompressionPlan
from pallas_kernels import vertical_slash as vs_kernels
from pallas_kernels.reference import vertical_slash_attention
from tiny import random_prompts, tiny_config, tiny_model

# The module (kvjax.generation.generate is also the name of its function).
generate_lib = importlib.import_module("kvjax.generation.generate")

B, K, G, D = 2, 2, 3, 8
H = K * G


# ----------------------------------------------------------------------------- numpy


def np_softmax(logits: np.ndarray, seen: np.ndarray) -> np.ndarray:
  """Softmax over the seen entries (zeros elsewhere, all zeros when none is seen)."""
  if not seen.any():
    return np.zeros(logits.shape)
  e = np.where(seen, np.exp(np.where(seen, logits, -np.inf) - logits[seen].max()), 0.0)
  return e / e.sum()


def np_scores(keys, kpos, queries, qpos) -> np.ndarray:
  """[B, K, S] s_j = sum over the queries t and each KV head's query heads of the softmax
  over the input slots (0 <= position <= the query's) of q . k_j / sqrt(D)."""
  b, k, s, d = keys.shape
  g = queries.shape[2] // k
  out = np.zeros((b, k, s))
  for row in range(b):
    for kv in range(k):
      for t in range(queries.shape[1]):
        seen = (kpos[row, kv] >= 0) & (kpos[row, kv] <= qpos[row, t])
        for j in range(g):
          logits = keys[row, kv] @ queries[row, t, kv * g + j] / np.sqrt(d)
          out[row, kv] += np_softmax(logits, seen)
  return out


def np_top(scores, kpos, budget) -> np.ndarray:
  """[B, K, budget] slots of the highest scores, empty slots last, ties to the lower slot,
  in slot order."""
  b, k, s = scores.shape
  out = np.zeros((b, k, budget), int)
  for row in range(b):
    for kv in range(k):
      prio = np.where(kpos[row, kv] >= 0, scores[row, kv], -np.inf)
      order = sorted(range(s), key=lambda j: (-prio[j], j))
      out[row, kv] = sorted(order[:budget])
  return out


def np_attend(q, keys, values, kpos, qpos) -> np.ndarray:
  """[H, D] one query per head over the given slots (per KV head lists)."""
  out = np.zeros((H, D))
  for h in range(H):
    kv = h // G
    seen = (kpos[kv] >= 0) & (kpos[kv] <= qpos)
    logits = keys[kv] @ q[h] / np.sqrt(D)
    out[h] = np_softmax(logits, seen) @ values[kv]
  return out


class NumpyLoopServe:
  """The decode part restated: the active set (slot indices per row and KV head), the
  tokens after the prompt, the last n_d queries, re-selection once n_d have come."""

  def __init__(self, keys, values, kpos, active, interval):
    self.keys, self.values, self.kpos = keys, values, kpos
    self.active = active                                  # [B, K, budget] slot indices
    self.interval = interval
    self.gen_k = np.zeros((B, K, 0, D))
    self.gen_v = np.zeros((B, K, 0, D))
    self.gen_pos = np.zeros((B, K, 0), int)
    self.recent_q = np.zeros((B, 0, H, D))
    self.recent_pos = np.zeros((B, 0), int)
    self.since = 0

  def step(self, q, qpos, new_k, new_v, new_pos):
    """q [B, T, H, D], positions [B, T]; new keys/values [B, K, T, D]. Returns [B, T, H, D]."""
    t = q.shape[1]
    self.gen_k = np.concatenate([self.gen_k, new_k], 2)
    self.gen_v = np.concatenate([self.gen_v, new_v], 2)
    self.gen_pos = np.concatenate([self.gen_pos, np.repeat(new_pos[:, None], K, 1)], 2)
    out = np.zeros(q.shape)
    for row in range(B):
      if t == 1:   # decode: the active set and the tokens after the prompt
        act = self.active[row]
        keys = np.concatenate([np.take_along_axis(self.keys[row], act[..., None], 1),
                               self.gen_k[row]], 1)
        values = np.concatenate([np.take_along_axis(self.values[row], act[..., None], 1),
                                 self.gen_v[row]], 1)
        kpos = np.concatenate([np.take_along_axis(self.kpos[row], act, 1), self.gen_pos[row]], 1)
      else:        # a question: everything
        keys = np.concatenate([self.keys[row], self.gen_k[row]], 1)
        values = np.concatenate([self.values[row], self.gen_v[row]], 1)
        kpos = np.concatenate([self.kpos[row], self.gen_pos[row]], 1)
      for i in range(t):
        out[row, i] = np_attend(q[row, i], keys, values, kpos, qpos[row, i])
    self.recent_q = np.concatenate([self.recent_q, q], 1)[:, -self.interval:]
    self.recent_pos = np.concatenate([self.recent_pos, qpos], 1)[:, -self.interval:]
    self.since += t
    if self.since >= self.interval:
      scores = np_scores(self.keys, self.kpos, self.recent_q, self.recent_pos)
      self.active = np_top(scores, self.kpos, self.active.shape[-1])
      self.since = 0
    return out

  def active_positions(self):
    pos = np.take_along_axis(self.kpos, self.active, 2)
    return [[sorted(p[p >= 0].tolist()) for p in row] for row in pos]


# ----------------------------------------------------------------------------- helpers


def _inputs(seed, s=22, empty_back=(0, 5)):
  """Random input slots, row r's last empty_back[r] slots empty (as after `trimmed`)."""
  rng = np.random.default_rng(seed)
  pos = np.broadcast_to(np.arange(s), (B, K, s)).astype(np.int32).copy()
  for row, n in enumerate(empty_back):
    if n:
      pos[row, :, -n:] = -1
  f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)
  keys, values = f32(rng.normal(size=(B, K, s, D))), f32(rng.normal(size=(B, K, s, D)))
  return keys, values, pos


def _dense(keys, values, pos):
  return LayerCache(keys=jnp.asarray(keys, jnp.float32), values=jnp.asarray(values, jnp.float32),
                    positions=jnp.asarray(pos), end=jnp.int32(keys.shape[2]))


def _active_positions(layer: LoopServeLayerCache):
  pos = np.asarray(layer.active.positions)
  return [[sorted(p[p >= 0].tolist()) for p in row] for row in pos]


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("offloaded", [False, True])
def test_scores_and_choice_match_numpy(offloaded):
  keys, values, pos = _inputs(0, s=24)
  rng = np.random.default_rng(1)
  q = np.asarray(rng.normal(size=(B, 5, H, D)) * 1.5, np.float32).astype(np.float64)
  qpos = np.array([[30, 31, 32, 33, 34], [-1, -1, 10, 11, 30]], np.int32)   # some unused
  dense = _dense(keys, values, pos)
  layer = loopserve_layer(dense, jnp.asarray(pos >= 0), H, 5, offloaded, chunk=8)
  got = input_scores(layer.inputs, jnp.asarray(q, jnp.float32), jnp.asarray(qpos), 8,
                     offloaded)
  want = np_scores(keys, pos, q, qpos)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  for budget in (1, 7, 20, 24):
    np.testing.assert_array_equal(np.asarray(top_slots(got, dense.positions, budget)),
                                  np_top(want, pos, budget))


def test_seed_is_the_last_window_rule():
  """Prefill marks the top `keep` slots by the rule over the chunk's last n_d queries."""
  data = mi.random_prefill(3, lengths=(48, 33), s=48)
  x = base.LayerInputs(config=mi.config(), layer=0, **mi.layer_arrays(data))
  cand = LayerCache(keys=x.keys, values=x.values, positions=x.key_positions,
                    end=jnp.int32(48))
  method = LoopServe(interval=6)
  chosen = np.asarray(method.compact(cand, x, 20).state)
  h = data.q.shape[2]
  window_q, window_pos = data.q[:, -6:], data.qpos[:, -6:]
  want = np_scores(data.k, data.kpos, window_q, window_pos)
  assert want.shape == (2, mi.K, 48) and h == mi.H
  for row in range(2):
    for kv in range(mi.K):
      real = data.kpos[row, kv] >= 0
      order = sorted(np.flatnonzero(real), key=lambda j: (-want[row, kv, j], j))
      expected = np.zeros(48, bool)
      expected[order[:20]] = True
      np.testing.assert_array_equal(chosen[row, kv], expected)


def _plan_step(plan, layer, q, qpos, new_k, new_v, new_pos):
  """One forward step of a layer through the decode plan (what the model does)."""
  new = NewTokens(keys=new_k, values=new_v, positions=new_pos)
  layer, pending, want = plan.prepare(0, layer, new)
  assert want == frozenset({QUERIES})
  out, stats = layer.attend(q, qpos, pending, want)
  step = LayerStep(config=tiny_config(num_heads=H, num_kv_heads=K, head_dim=D), queries=q,
                   raw_queries=q, new=new, lengths=jnp.max(qpos, 1) + 1)
  return plan.update(0, layer, step, stats), out


def _run(offloaded, seed=4, budget=6, interval=4, steps=14):
  """(jax outputs, numpy outputs, jax active sets, numpy active sets, layer) per step:
  a 5-token question, then decode steps; row 1 finishes (masked) for the last three."""
  keys, values, pos = _inputs(seed)
  rng = np.random.default_rng(seed + 1)
  seed_scores = rng.random((B, K, keys.shape[2]))
  first = np_top(seed_scores, pos, budget)
  chosen = np.zeros(pos.shape, bool)
  np.put_along_axis(chosen, first, True, 2)
  chosen &= pos >= 0
  layer = loopserve_layer(_dense(keys, values, pos), jnp.asarray(chosen), H, interval,
                          offloaded, chunk=8).grow(5 + steps)
  ref = NumpyLoopServe(keys, values, pos, first, interval)
  plan = CompressionPlan(LoopServe(interval=interval, offload=offloaded), (budget,),
                         compress=False)
  step = jax.jit(lambda *a: _plan_step(plan, *a))
  outs, active = [], []
  next_pos = np.array([22, 17])
  for i in range(steps + 1):
    t = 5 if i == 0 else 1
    qpos = next_pos[:, None] + np.arange(t)
    if i >= steps - 2:
      qpos[1] = -1
    next_pos = next_pos + t
    f = lambda *shape: np.asarray(rng.normal(size=shape), np.float32).astype(np.float64)
    q, nk, nv = f(B, t, H, D) * 1.5, f(B, K, t, D), f(B, K, t, D)
    layer, out = step(layer, *(jnp.asarray(a, jnp.float32) for a in (q,)),
                      jnp.asarray(qpos, jnp.int32), jnp.asarray(nk, jnp.float32),
                      jnp.asarray(nv, jnp.float32), jnp.asarray(qpos, jnp.int32))
    want = ref.step(q, qpos, nk, nv, qpos)
    outs.append((np.asarray(out), want, qpos.copy()))
    active.append((_active_positions(layer), ref.active_positions()))
  return outs, active, layer


def test_decode_steps_match_numpy():
  outs, active, layer = _run(offloaded=False)
  assert isinstance(layer, LoopServeLayerCache)
  changed = 0
  for i, ((got, want, qpos), (got_set, want_set)) in enumerate(zip(outs, active)):
    valid = qpos >= 0
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-5, err_msg=str(i))
    assert got_set == want_set, i
    changed += i > 0 and got_set != active[i - 1][0]
  assert changed >= 2   # the set really moves (question, then every 4 steps)


def test_offloaded_equals_on_device():
  on_device, active_d, layer_d = _run(offloaded=False)
  offloaded, active_h, layer_h = _run(offloaded=True)
  assert layer_h.inputs.keys.sharding.memory_kind == "pinned_host"
  assert layer_h.inputs.positions.sharding.memory_kind == "device"
  assert layer_h.active.keys.sharding.memory_kind == "device"
  for (got, _, _), (want, _, _) in zip(offloaded, on_device):
    np.testing.assert_array_equal(got, want)
  assert active_h == active_d
  kv = 2 * B * K * 24 * D * 4    # keys and values, padded to whole chunks of 8
  assert host_nbytes(layer_h) == kv and layer_h.nbytes == layer_d.nbytes - kv


def _device_bytes(rows, kv_heads, heads, head_dim, inputs, budget, generated, interval):
  """Active set and generated slots (keys, values, positions), input positions, the recent
  queries and their positions, three fill counters and the query counter (float32)."""
  slots = rows * kv_heads * (budget + generated) * (2 * head_dim * 4 + 4)
  return (slots + rows * kv_heads * inputs * 4 + rows * interval * (heads * head_dim * 4 + 4)
          + 4 * 4)


@pytest.mark.parametrize("budget", [3, 9, 15])
def test_device_bytes_follow_the_budget(budget):
  keys, values, pos = _inputs(5, s=40, empty_back=(0, 0))
  chosen = np.zeros(pos.shape, bool)
  chosen[..., :budget] = True
  layer = loopserve_layer(_dense(keys, values, pos), jnp.asarray(chosen), H, 4, True,
                          chunk=16).grow(7)
  assert layer.active.capacity == budget and layer.inputs.capacity == 48
  assert layer.nbytes == _device_bytes(B, K, H, D, 48, budget, 7, 4)
  assert host_nbytes(layer) == 2 * B * K * 48 * D * 4


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0, num_layers=2)


PROMPTS = random_prompts([150, 120], seed=1)


def test_budget_of_the_whole_context_is_the_full_cache(model):
  full = kvjax.generate(model, PROMPTS, max_new_tokens=20)
  out = kvjax.generate(model, PROMPTS, method="loopserve", budget=1000, max_new_tokens=20)
  assert out.token_ids == full.token_ids
  assert out.stats["method_stats"] == {}   # every layer stayed dense


def test_generate_offloaded_and_on_device(model):
  half = kvjax.generate(model, PROMPTS, method="loopserve", compression_ratio=0.5,
                        max_new_tokens=20)
  cfg = model.config
  stats = half.stats["method_stats"]
  host = 2 * 2 * cfg.num_kv_heads * 150 * cfg.head_dim * 4 * 2   # layers, rows, K and V
  assert stats == {"active_tokens": 75, "interval": 16, "dense_layers": 0, "host_bytes": host}
  assert half.stats["context_cache_host_bytes"] == host
  assert half.stats["kept_tokens_per_layer"] == [75, 75]
  assert half.stats["context_cache_bytes"] == 2 * _device_bytes(
      2, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, 150, 75, 0, 16) + 2 * 4   # + lengths
  on_device = kvjax.generate(model, PROMPTS, method="loopserve:offload=False",
                             compression_ratio=0.5, max_new_tokens=20)
  assert on_device.token_ids == half.token_ids
  assert on_device.stats["context_cache_bytes"] - half.stats["context_cache_bytes"] == host
  # A question appended after compression is attended densely and re-chooses the set.
  asked = kvjax.generate(model, PROMPTS, questions=[[5] * 20, [7] * 18], method="loopserve",
                         compression_ratio=0.5, max_new_tokens=4)
  assert [len(t) for t in asked.token_ids] == [4, 4]


@pytest.mark.parametrize("spec, match", [
    ("loopserve:interval=0", "interval"), ("loopserve:interval=2.5", "interval"),
    ("loopserve:offload=yes", "offload"), ("loopserve:alpha=1.5", "alpha"),
    ("loopserve:prefill_rows=0", "prefill_rows"), ("loopserve:max_lines=0", "max_lines")])
def test_bad_hyperparameters(spec, match):
  with pytest.raises(MethodError, match=match):
    kvjax.methods.get(spec)


def test_cache_bytes_are_measured(model):
  tokens, mask = inputs.left_pad(PROMPTS, 0)
  pre = context.prefill(model, tokens, mask, LoopServe(), 40, 0)
  assert cache_nbytes(pre.cache) == pre.context_cache_bytes
  assert all(isinstance(layer, LoopServeLayerCache) for layer in pre.cache.layers)


# ----------------------------------------------------------------------------- prefill part


def np_line_masses(q, qpos, k, kpos):
  """(vertical [B, H, S] by key position, slash [B, H, S] by offset) of the rows' causal
  attention."""
  b, r, h, d = q.shape
  kvh, s = k.shape[1], k.shape[2]
  vertical, slash = np.zeros((b, h, s)), np.zeros((b, h, s))
  for row in range(b):
    for head in range(h):
      kv = head // (h // kvh)
      for i in range(r):
        seen = (kpos[row, kv] >= 0) & (kpos[row, kv] <= qpos[row, i])
        probs = np_softmax(k[row, kv] @ q[row, i, head] / np.sqrt(d), seen)
        for j in np.flatnonzero(seen):
          vertical[row, head, kpos[row, kv, j]] += probs[j]
          slash[row, head, qpos[row, i] - kpos[row, kv, j]] += probs[j]
  return vertical, slash


def np_select_lines(vertical, slash, sampled, alpha):
  """Column 0 and diagonal 0, then lines by decreasing mass (verticals, then slashes, lower
  index first at ties) while the chosen masses sum to less than alpha x sampled rows."""
  b, h, s = vertical.shape
  vmask, smask = np.zeros((b, h, s), bool), np.zeros((b, h, s), bool)
  for row in range(b):
    for head in range(h):
      lines = [(vertical[row, head, p], 0, p) for p in range(s)] + [
          (slash[row, head, o], 1, o) for o in range(s)]
      vmask[row, head, 0] = smask[row, head, 0] = True
      total = vertical[row, head, 0] + slash[row, head, 0]
      rest = sorted((line for line in lines if line[2] != 0),
                    key=lambda line: (-line[0], line[1], line[2]))
      for mass, kind, index in rest:
        if total >= alpha * sampled[row] or mass <= 0:
          break
        (vmask if kind == 0 else smask)[row, head, index] = True
        total += mass
  return vmask, smask


def np_line_attention(q, k, v, qpos, kpos, vmask, smask):
  """[B, T, H, D]: each query over the visible keys on its head's chosen lines."""
  b, t, h, d = q.shape
  kvh = k.shape[1]
  out = np.zeros(q.shape)
  for row in range(b):
    for head in range(h):
      kv = head // (h // kvh)
      for i in range(t):
        p = kpos[row, kv]
        seen = (p >= 0) & (p <= qpos[row, i])
        on_line = np.array([seen[j] and (vmask[row, head, p[j]] or
                                         smask[row, head, qpos[row, i] - p[j]])
                            for j in range(len(p))], bool)
        probs = np_softmax(k[row, kv] @ q[row, i, head] / np.sqrt(d), on_line)
        out[row, i, head] = probs @ v[row, kv]
  return out


def test_sample_rows_keep_the_last_rows():
  rows = sample_rows(100, 8, 4)
  assert set(range(92, 100)) <= set(rows.tolist()) and len(rows) == 12
  assert rows.tolist()[:4] == [0, 23, 46, 69]
  assert sample_rows(5, 8, 4).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("alpha", [0.3, 0.7, 0.95])
def test_line_selection_matches_numpy(alpha):
  data = mi.random_prefill(6, lengths=(48, 33), s=48, q_scale=2.5)
  rows = sample_rows(48, 6, 5)
  q, qpos = data.q[:, rows], data.qpos[:, rows]
  vertical, slash = line_masses(jnp.asarray(q, jnp.float32), jnp.asarray(qpos),
                                jnp.asarray(data.k, jnp.float32), jnp.asarray(data.kpos))
  want_v, want_s = np_line_masses(q, qpos, data.k, data.kpos)
  np.testing.assert_allclose(np.asarray(vertical), want_v, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(slash), want_s, rtol=1e-4, atol=1e-6)
  sampled = (qpos >= 0).sum(1)
  np.testing.assert_allclose(want_v.sum(-1), np.repeat(sampled[:, None], mi.H, 1), rtol=1e-9)
  vmask, smask = select_lines(vertical, slash, jnp.asarray(sampled), alpha)
  masses = (np.asarray(vertical, np.float64), np.asarray(slash, np.float64))
  want_vmask, want_smask = np_select_lines(*masses, sampled, alpha)
  np.testing.assert_array_equal(np.asarray(vmask), want_vmask)
  np.testing.assert_array_equal(np.asarray(smask), want_smask)
  covered = (masses[0] * want_vmask).sum(-1) + (masses[1] * want_smask).sum(-1)
  assert (covered >= alpha * sampled[:, None] - 1e-5).all()
  assert want_vmask.sum() + want_smask.sum() < 2 * 48 * mi.H * 2   # not every line


def test_line_attention_matches_numpy():
  data = mi.random_prefill(7, lengths=(48, 33), s=48, q_scale=2.5)
  rows = sample_rows(48, 6, 5)
  args = [jnp.asarray(a, jnp.float32) for a in (data.q[:, rows],)] + [
      jnp.asarray(data.qpos[:, rows]), jnp.asarray(data.k, jnp.float32),
      jnp.asarray(data.kpos)]
  masses = line_masses(*args)
  vmask, smask = select_lines(*masses, jnp.asarray((data.qpos[:, rows] >= 0).sum(1)), 0.8)
  nv, ns = int(vmask.sum(-1).max()), int(smask.sum(-1).max())
  got = vertical_slash_attention(*(jnp.asarray(a, jnp.float32) for a in (data.q, data.k,
                                                                         data.v)),
                                 jnp.asarray(data.qpos), jnp.asarray(data.kpos), vmask, smask,
                                 nv, ns)
  want = np_line_attention(data.q, data.k, data.v, data.qpos, data.kpos, np.asarray(vmask),
                           np.asarray(smask))
  real = data.qpos >= 0
  np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-4, atol=1e-5)


def np_most_massive(mask, mass, n):
  """Per head, line 0 if chosen, then the chosen lines by decreasing mass (lower index
  first at ties) up to n lines."""
  out = np.zeros(mask.shape, bool)
  for row in range(mask.shape[0]):
    for head in range(mask.shape[1]):
      chosen = [j for j in np.flatnonzero(mask[row, head]) if j != 0]
      chosen.sort(key=lambda j: (-mass[row, head, j], j))
      keep = ([0] if mask[row, head, 0] else []) + chosen
      out[row, head, keep[:n]] = True
  return out


def _count_kernel_calls(monkeypatch) -> list:
  """Records each call of the vertical-slash kernel (kvjax.ops dispatches to it)."""
  calls, real = [], vs_kernels.vertical_slash_attention
  monkeypatch.setattr(vs_kernels, "vertical_slash_attention",
                      lambda *a, **kw: calls.append(1) or real(*a, **kw))
  return calls


@pytest.mark.parametrize("max_lines,chunk", [(48, 48), (3, 48), (48, 20)])
def test_sparse_prefill_matches_numpy(max_lines, chunk, monkeypatch):
  """The chunk's sampled rows choose the lines (capped at the most massive), and every
  query attends over them, through the jnp gathers (in blocks of SPARSE_QUERY_BLOCK) and
  through the vertical-slash kernel (KVJAX_PALLAS=1, interpret mode); a chunk of the last
  20 tokens attends over the earlier chunks' keys too."""
  import kvjax.methods.loopserve as loopserve_lib
  data = mi.random_prefill(9, lengths=(48, 33), s=48, q_scale=2.5)
  f = lambda a: jnp.asarray(a, jnp.float32)
  queries, query_positions = data.q[:, -chunk:], data.qpos[:, -chunk:]
  rows, alpha = sample_rows(chunk, 5, 4), 0.8
  q, qpos = queries[:, rows], query_positions[:, rows]
  vmass, smass = np_line_masses(q, qpos, data.k, data.kpos)
  chosen = np_select_lines(vmass, smass, (qpos >= 0).sum(1), alpha)
  vmask, smask = (np_most_massive(chosen[0], vmass, max_lines),
                  np_most_massive(chosen[1], smass, max_lines))
  want = np_line_attention(queries, data.k, data.v, query_positions, data.kpos, vmask,
                           smask)
  # Several gather passes (the last one padded), one, and the kernel.
  kernel_calls = _count_kernel_calls(monkeypatch)
  for block, pallas in ((7, "0"), (128, "0"), (128, "1")):
    monkeypatch.setattr(loopserve_lib, "SPARSE_QUERY_BLOCK", block)
    monkeypatch.setenv("KVJAX_PALLAS", pallas)
    got = sparse_prefill(f(queries), jnp.asarray(query_positions), f(data.k), f(data.v),
                         jnp.asarray(data.kpos), alpha, 9, max_lines)
    real = query_positions >= 0
    np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-4, atol=1e-5)
    assert len(kernel_calls) == (pallas == "1")   # the kernel ran exactly in its case
    kernel_calls.clear()
  if max_lines < 48:   # the cap binds on both kinds of line
    assert min(chosen[0].sum(-1).max(), chosen[1].sum(-1).max()) > max_lines
    assert vmask.sum(-1).max() == smask.sum(-1).max() == max_lines


def test_sparse_prefill_runs_in_the_models_prefill(model, monkeypatch):
  """alpha > 0: every layer's prefill attention is the sparse one (and changes the
  result); alpha = 0 keeps the dense prefill; a sweep's shared prefill runs it alone."""
  import kvjax.methods.loopserve as loopserve_lib
  calls = []
  real = loopserve_lib.sparse_prefill

  def spy(*args):
    calls.append(args[0].shape)
    return real(*args)

  monkeypatch.setattr(loopserve_lib, "sparse_prefill", spy)
  tokens, mask = inputs.left_pad(PROMPTS, 0)
  dense = context.prefill(model, tokens, mask, LoopServe(), 40, 0)
  assert calls == []
  sparse_method = kvjax.methods.get("loopserve:alpha=0.5:max_lines=8")
  sparse = context.prefill(model, tokens, mask, sparse_method, 40, 0)
  assert len(calls) == model.config.num_layers and calls[0][1] == tokens.shape[1]
  assert not np.allclose(np.asarray(dense.logits), np.asarray(sparse.logits), atol=1e-4)
  # Shared with the dense variant, its logits would be the dense ones.
  many = context.prefill_many(model, tokens, mask, [(sparse_method, 40), (LoopServe(), 40)],
                              0)
  np.testing.assert_allclose(np.asarray(many[0].logits), np.asarray(sparse.logits),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(many[1].logits), np.asarray(dense.logits),
                             rtol=1e-5, atol=1e-6)
  out = kvjax.generate(model, PROMPTS, method=sparse_method, compression_ratio=0.5,
                       max_new_tokens=4)
  assert [len(t) for t in out.token_ids] == [4, 4]
  chunked = kvjax.generate(model, PROMPTS, method=sparse_method, compression_ratio=0.5,
                           max_new_tokens=4, prefill_chunk_size=64)
  assert [len(t) for t in chunked.token_ids] == [4, 4]


def test_sparse_prefill_with_the_kernel_equals_jnp(model, monkeypatch):
  """The model's sparse prefill (one chunk, and chunks of 64 over the kept keys) through
  the vertical-slash kernel (KVJAX_PALLAS=1, interpreted) gives the jnp path's logits: a
  prefill chunk's queries are in line, as the kernel requires."""
  tokens, mask = inputs.left_pad(PROMPTS, 0, 256)
  method = kvjax.methods.get("loopserve:alpha=0.5:max_lines=8")
  results, kernel_calls = {}, _count_kernel_calls(monkeypatch)
  for pallas in ("0", "1"):
    monkeypatch.setenv("KVJAX_PALLAS", pallas)
    jax.clear_caches()   # nested jitted references must be traced again
    results[pallas] = [context.prefill(model, tokens, mask, method, 40, 0, chunk).logits
                       for chunk in (None, 64)]
    # Traced once per layer and prefill program with the kernels, never without.
    assert (len(kernel_calls) > 0) == (pallas == "1")
  jax.clear_caches()
  for kernel, jnp_logits in zip(results["1"], results["0"]):
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(jnp_logits), rtol=1e-4,
                               atol=1e-4)


def test_every_line_is_dense_attention():
  data = mi.random_prefill(8, lengths=(48, 33), s=48)
  every = jnp.ones((2, mi.H, 48), bool)
  f = lambda a: jnp.asarray(a, jnp.float32)
  want = attention_ops.attend(f(data.q), f(data.k), f(data.v), jnp.asarray(data.qpos),
                              jnp.asarray(data.kpos))
  for vertical, slash, nv, ns in [(every, ~every, 48, 1), (~every, every, 1, 48),
                                  (every, every, 48, 48)]:
    got = vertical_slash_attention(f(data.q), f(data.k), f(data.v), jnp.asarray(data.qpos),
                                   jnp.asarray(data.kpos), vertical, slash, nv, ns)
    real = data.qpos >= 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5,
                               atol=1e-6)



def test_turns_reselect_within_the_inputs(model):
  """A conversation (LoopServe's setting): a turn's question (>= n_d tokens) re-chooses the
  active set, which stays B input tokens per head; the cache does not grow from turn to
  turn; a budget covering the context answers as the full cache does."""
  contexts = random_prompts([150, 120], seed=3)
  turns = [random_prompts([20, 17], seed=4), random_prompts([6, 9], seed=5)]
  tokens, mask = inputs.left_pad(contexts, 0)
  room = conversation.turn_room(turns, 10)
  pre = context.prefill(model, tokens, mask, LoopServe(), 60, room)
  seeds = [_active_positions(layer) for layer in pre.cache.layers]
  question, question_mask = inputs.left_pad(turns[0], 0)
  done = generate_lib.complete(model, pre.logits, pre.cache, pre.decode_plan, question,
                               question_mask, max_new_tokens=3, eos_token_ids=[])
  for layer, seed in zip(done.cache.layers, seeds):
    after = _active_positions(layer)
    assert after != seed
    for row, length in enumerate((150, 120)):
      assert all(len(head) == 60 and max(head) < length for head in after[row])
  pre = context.prefill(model, tokens, mask, LoopServe(), 60, room)   # `complete` donated it
  out = conversation.run_turns(model, pre, turns, 10, room, eos_token_ids=[])
  assert [len(t) for t in out["token_ids"][0]] == [10, 10]
  assert out["turn_cache_bytes"][0] == out["turn_cache_bytes"][1]
  full = conversation.run_turns(
      model, context.prefill(model, tokens, mask, kvjax.methods.get(None), None, room),
      turns, 10, room, eos_token_ids=[])
  covered = context.prefill(model, tokens, mask, LoopServe(), 1000, room)
  assert conversation.run_turns(model, covered, turns, 10, room,
                                eos_token_ids=[])["token_ids"] == full["token_ids"]
