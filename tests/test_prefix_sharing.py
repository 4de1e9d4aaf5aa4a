"""BatchLLM prefix sharing: the grouping, the wave planner, the shared-prefix attention and
generation against unshared `kvjax.generate`."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import kv_cache
from kvjax.errors import GenerationError
from kvjax.ops import attention as attention_ops
from kvjax.systems import prefix_sharing
from kvjax.systems.prefix_tree import group_by_prefix, saved_tokens
from pallas_kernels import reference
from tiny import tiny_model


def _shared_prompts(seed=0):
  """Two system prompts with several requests each, one with a nested longer prefix, and
  a request that shares nothing."""
  rng = np.random.default_rng(seed)
  draw = lambda n: rng.integers(0, 256, n).tolist()
  sys_a, sys_b, nested = draw(40), draw(25), draw(12)
  return ([sys_a + draw(n) for n in (5, 9, 3)] + [sys_a + nested + draw(n) for n in (4, 6)]
          + [sys_b + draw(n) for n in (7, 2)] + [draw(11)])


def _lcp(a, b):
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _best_saving_by_enumeration(prompts, min_prefix_tokens=1):
  """Every assignment of each request to a prefix length that is 0 or a common prefix
  length (at least min_prefix_tokens) with another request (capped at its length - 1); a
  group is the requests with the same prefix tokens. Returns the most tokens saved."""
  seqs = [tuple(p[:-1]) for p in prompts]
  options = [sorted({0} | {n for j, t in enumerate(seqs) if j != i
                           if (n := _lcp(s, t)) >= min_prefix_tokens})
             for i, s in enumerate(seqs)]
  best = 0
  for choice in itertools.product(*options):
    groups = {}
    for s, n in zip(seqs, choice):
      groups[s[:n]] = groups.get(s[:n], 0) + 1
    best = max(best, sum((count - 1) * len(prefix) for prefix, count in groups.items()))
  return best


@pytest.mark.parametrize("seed", range(6))
def test_grouping_saves_the_most_tokens_and_is_a_partition(seed):
  rng = np.random.default_rng(seed)
  # Prompts from a few shared stems, so prefixes nest and branch.
  stems = [rng.integers(0, 4, int(n)).tolist() for n in rng.integers(0, 6, 3)]
  prompts = [stems[int(rng.integers(3))] + rng.integers(0, 4, int(rng.integers(1, 5))).tolist()
             for _ in range(5)]
  for minimum in (1, 2, 3, 5):
    groups = group_by_prefix(prompts, min_prefix_tokens=minimum)
    assert sorted(m for g in groups for m in g.members) == list(range(len(prompts)))
    for g in groups:
      assert g.prefix_length == 0 or g.prefix_length >= minimum
      assert all(g.prefix_length <= len(prompts[m]) - 1 for m in g.members)
      assert all(prompts[m][:g.prefix_length] == prompts[g.members[0]][:g.prefix_length]
                 for m in g.members)
    assert saved_tokens(groups) == _best_saving_by_enumeration(prompts, minimum), minimum


def test_grouping_of_the_example_batch():
  groups = group_by_prefix(_shared_prompts())
  by_members = {g.members: g.prefix_length for g in groups}
  # Sharing 40 tokens among all five saves 4 * 40 = 160; giving the nested 52-token
  # prefix a group of its own would save 2 * 40 + 52 = 132.
  assert by_members == {(0, 1, 2, 3, 4): 40, (5, 6): 25, (7,): 0}
  # Too short to share: the 25-token prefix's requests join the group of nothing.
  groups = group_by_prefix(_shared_prompts(), min_prefix_tokens=26)
  assert {g.members: g.prefix_length for g in groups} == {(0, 1, 2, 3, 4): 40,
                                                          (5, 6, 7): 0}


def test_decode_over_prefix_equals_per_row_decode(monkeypatch):
  rng = np.random.default_rng(1)
  g, r, k, per_kv, p, d = 3, 4, 2, 3, 37, 16
  q = jnp.asarray(rng.normal(size=(g * r, 1, k * per_kv, d)), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(g, k, p, d)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(g, k, p, d)), jnp.float32)
  positions = np.broadcast_to(np.arange(p, dtype=np.int32), (g, k, p)).copy()
  positions[1, :, 30:] = -1   # a shorter prefix
  positions[2] = -1           # an empty one: its rows see nothing here
  positions = jnp.asarray(positions)
  repeat = lambda x: jnp.repeat(x, r, axis=0)
  want_out, want_lse = reference.decode_attention(
      q.reshape(g * r, k, per_kv, d), repeat(keys), repeat(values), repeat(positions),
      jnp.full((g * r,), 1000, jnp.int32))[:2]
  for pallas in ("0", "1"):
    monkeypatch.setenv("KVJAX_PALLAS", pallas)
    jax.clear_caches()
    out, lse = attention_ops.decode_over_prefix(q, keys, values, positions)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(lse[2 * r:] == attention_ops.EMPTY_LSE))
  jax.clear_caches()


@pytest.mark.parametrize("pallas,value_heads", [("0", None), ("1", None), ("0", 4)])
def test_shared_prefix_decoding_equals_unshared(monkeypatch, pallas, value_heads):
  # value_heads=4: DiffQKV, two value heads per key head (read per row, not folded).
  model = tiny_model(num_value_heads=value_heads)
  prompts = _shared_prompts()
  monkeypatch.setenv("KVJAX_PALLAS", pallas)
  jax.clear_caches()
  want = kvjax.generate(model, prompts, max_new_tokens=10)
  # rows_per_prefix=2 cuts the five-request group into three slices of one prefill.
  got = prefix_sharing.generate_shared(model, prompts, max_new_tokens=10, rows_per_prefix=2)
  jax.clear_caches()
  assert got.token_ids == want.token_ids
  stats = got.stats
  first = stats["waves"][0]
  assert first["prefixes_prefilled"] == 2 and first["slices"] == 4
  # Slices of 2 rows: the five-request group's third slice and the pair pad to 2 rows, the
  # odd one out repeating its first request's suffix (computed, so counted).
  padding = len(prompts[4]) - 40
  assert stats["prefilled_tokens"] == sum(map(len, prompts)) - (4 * 40 + 25) + padding
  assert all(w["cache_bytes"] == w["planned_cache_bytes"] for w in stats["waves"])


def test_memory_budget_splits_waves_and_is_never_exceeded():
  model = tiny_model()
  prompts = _shared_prompts()
  whole = prefix_sharing.generate_shared(model, prompts, max_new_tokens=6)
  budget = whole.stats["peak_cache_bytes"] // 3
  got = prefix_sharing.generate_shared(model, prompts, max_new_tokens=6,
                                       memory_budget_bytes=budget)
  assert len(got.stats["waves"]) > len(whole.stats["waves"])
  assert all(w["cache_bytes"] <= budget for w in got.stats["waves"])
  assert got.token_ids == whole.token_ids
  with pytest.raises(GenerationError, match="memory_budget_bytes=1000 cannot hold"):
    prefix_sharing.generate_shared(model, prompts, max_new_tokens=6, memory_budget_bytes=1000)


@pytest.mark.parametrize("seed", range(4))
def test_planned_waves_fit_the_budget_and_cover_every_request(seed):
  config = tiny_model().config
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 200, 30).tolist()
  prompts = [[int(rng.integers(3))] * int(rng.integers(0, n)) + [7] * (n - 1) + [1]
             for n in lengths]
  lengths = [len(p) for p in prompts]
  groups = group_by_prefix(prompts)
  one_row = prefix_sharing.wave_cache_bytes(config, 1, 1, 256, 256 + 16)
  budget = int(one_row * rng.uniform(1.5, 6))
  waves = prefix_sharing.plan_waves(config, groups, lengths, 16, int(rng.integers(1, 9)), budget)
  covered = sorted(m for w in waves for _, members in w.slices for m in members)
  assert covered == list(range(len(prompts)))
  for w in waves:
    assert w.cache_bytes <= budget
    assert all(len(members) <= w.rows_per_prefix for _, members in w.slices)
    # Requests that share nothing never ride in a wave with shared prefixes.
    assert len({p == 0 for p, _ in w.slices}) == 1


def test_a_compressed_shared_prefix_is_stored_once_at_its_budget():
  model = tiny_model()
  prompts = _shared_prompts()[:5]          # one group, a 40-token prefix
  full = prefix_sharing.generate_shared(model, prompts, max_new_tokens=4)
  kept_whole = prefix_sharing.generate_shared(model, prompts, max_new_tokens=4,
                                              method="snapkv", budget=64)
  assert kept_whole.token_ids == full.token_ids
  small = prefix_sharing.generate_shared(model, prompts, max_new_tokens=4, method="snapkv",
                                         budget=16)
  # One row per prefix copy reads the same compressed prefix without folding rows.
  unfolded = prefix_sharing.generate_shared(model, prompts, max_new_tokens=4, method="snapkv",
                                            budget=16, rows_per_prefix=1)
  assert small.token_ids == unfolded.token_ids
  wave, = small.stats["waves"]
  assert wave["compressed_prefixes"]
  prefix_layer_bytes = lambda slots: kv_cache.full_cache_nbytes(model.config, 1, slots)
  # One prefix of 16 slots instead of the 64-wide bucket: the cache shrinks by the difference.
  assert (full.stats["peak_cache_bytes"] - wave["cache_bytes"]
          == prefix_layer_bytes(64) - prefix_layer_bytes(16))


def test_edge_cases_equal_unshared_generation():
  """Identical prompts (a one-token suffix), a one-token prompt, more unrelated prompts
  than rows per prefix, one new token, and EOS mid-generation."""
  model = tiny_model()
  rng = np.random.default_rng(5)
  same = rng.integers(0, 256, 20).tolist()
  prompts = [same, same, [17]] + [rng.integers(0, 256, int(n)).tolist() for n in (3, 8, 5)]
  for max_new in (1, 9):
    want = kvjax.generate(model, prompts, max_new_tokens=max_new)
    got = prefix_sharing.generate_shared(model, prompts, max_new_tokens=max_new,
                                         rows_per_prefix=2)
    assert got.token_ids == want.token_ids
  eos = want.token_ids[3][4]   # ends row 3 early (and any row that emits it)
  want = kvjax.generate(model, prompts, max_new_tokens=9, eos_token_ids=[eos])
  got = prefix_sharing.generate_shared(model, prompts, max_new_tokens=9, rows_per_prefix=2,
                                       eos_token_ids=[eos])
  assert got.token_ids == want.token_ids and len(got.token_ids[3]) <= 4


def test_sampled_rows_draw_their_own_prompts_streams():
  """With temperature > 0 prompt i draws what generate draws for it alone with seed + i,
  across waves, slices and padding rows; a raised min_prefix_tokens regroups, same draws."""
  model = tiny_model()
  prompts = _shared_prompts()
  sampling = dict(temperature=0.9, top_p=0.9)
  whole = prefix_sharing.generate_shared(model, prompts, max_new_tokens=6)
  budget = whole.stats["peak_cache_bytes"] // 3
  got = prefix_sharing.generate_shared(model, prompts, max_new_tokens=6, rows_per_prefix=2,
                                       memory_budget_bytes=budget, seed=20, **sampling)
  assert len(got.stats["waves"]) > 1
  sampled_differs = 0
  for i, prompt in enumerate(prompts):
    want = kvjax.generate(model, [prompt], max_new_tokens=6, seed=20 + i, **sampling)
    assert got.token_ids[i] == want.token_ids[0], i
    sampled_differs += want.token_ids[0] != whole.token_ids[i]
  assert sampled_differs >= 5
  regrouped = prefix_sharing.generate_shared(model, prompts, max_new_tokens=6, seed=20,
                                             min_prefix_tokens=26, **sampling)
  assert len(regrouped.stats["groups"]) == 2
  assert regrouped.token_ids == got.token_ids


def test_methods_a_shared_prefix_cannot_hold_are_refused_before_any_work():
  model = tiny_model()
  for method in ("h2o", "adakv"):
    with pytest.raises(kvjax.KvjaxError, match="generate_shared"):
      prefix_sharing.generate_shared(model, _shared_prompts(), method=method, budget=16)


def test_bad_arguments_are_refused():
  model = tiny_model()
  with pytest.raises(GenerationError, match="rows_per_prefix=0"):
    prefix_sharing.generate_shared(model, [[1, 2, 3]], rows_per_prefix=0)
  with pytest.raises(GenerationError, match="memory_budget_bytes=-5"):
    prefix_sharing.generate_shared(model, [[1, 2, 3]], memory_budget_bytes=-5)
  with pytest.raises(kvjax.KvjaxError, match="compression_ratio"):
    prefix_sharing.generate_shared(model, [[1, 2, 3]], method="snapkv", compression_ratio=1.5)
  with pytest.raises(GenerationError, match="min_prefix_tokens=0"):
    prefix_sharing.generate_shared(model, [[1, 2, 3]], min_prefix_tokens=0)
  with pytest.raises(ValueError, match="prompt 1 must be a non-empty sequence of integer"):
    group_by_prefix([[1, 2], [1.5, 2]])
  with pytest.raises(ValueError, match="min_prefix_tokens=2.5"):
    group_by_prefix([[1, 2]], min_prefix_tokens=2.5)


def test_sharing_benchmark_reports_one_run_of_each(tmp_path):
  from kvjax.systems import benchmarks
  model = tiny_model()
  prompts = _shared_prompts()
  lines = []
  report = benchmarks.compare_sharing(model, prompts, max_new_tokens=4, repeats=1,
                                     log=lines.append)
  assert report["same_tokens"] and report["rows_with_same_tokens"] == len(prompts)
  assert len(report["shared_seconds"]) == len(report["unshared_seconds"]) == 1 == len(lines)
  assert report["throughput_ratio"] == pytest.approx(
      report["unshared_seconds"][0] / report["shared_seconds"][0])
  assert report["shared_prefilled_tokens"] < report["prompt_tokens_total"]
  assert report["unshared_batch_size"] == max(w["rows"] for w in report["waves"])
  path = benchmarks.write_sharing_plot(report, tmp_path / "sharing.png")
  assert (tmp_path / "sharing.png").stat().st_size > 1000 and str(path).endswith(".png")
