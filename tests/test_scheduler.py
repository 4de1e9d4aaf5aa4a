"""Continuous batching under a cache-memory bound (kvjax.systems.scheduler)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import kv_cache
from kvjax.errors import GenerationError
from kvjax.systems import scheduler
from tiny import random_prompts, tiny_model

LENGTHS = [5, 30, 12, 70, 3, 44, 9, 20, 60, 17, 33, 8]
NEW = [6, 20, 3, 11, 20, 1, 8, 15, 5, 20, 12, 20]


def _served(model, copies=1, **server_args):
  server = scheduler.Server(model, max_prompt_tokens=max(LENGTHS), max_new_tokens=20,
                            **server_args)
  prompts = random_prompts(LENGTHS * copies, seed=1)
  ids = [server.submit(p, n) for p, n in zip(prompts, NEW * copies)]
  assert ids == list(range(len(prompts)))
  return prompts, server.run(), server


def test_continuous_batching_equals_generating_each_prompt_alone():
  model = tiny_model()
  prompts, served, server = _served(model, copies=2, max_rows=2)
  assert [s.id for s in served] == list(range(len(prompts)))
  for s, prompt, n in zip(served, prompts, NEW * 2):
    want = kvjax.generate(model, [prompt], max_new_tokens=n).token_ids[0]
    assert s.token_ids == want
    assert s.prompt_tokens == len(prompt) and s.latency_seconds >= s.queued_seconds >= 0
  stats = server.stats
  # Two rows for 24 requests: rows are refilled, and the shared append index wraps
  # round through the live-slot compaction.
  assert stats["rows"] == 2 and stats["admissions"] > 2 and stats["compactions"] > 0
  assert stats["generated_tokens"] == sum(len(s.token_ids) for s in served)


def test_admission_by_cache_bytes_and_compression_admits_more_rows():
  model = tiny_model()
  full = scheduler.Server(model, max_prompt_tokens=70, max_new_tokens=20, max_rows=1)
  budget = 3 * full.row_bytes + full.row_bytes // 2
  _, served_full, server_full = _served(model, memory_budget_bytes=budget)
  assert server_full.rows == 3
  assert server_full.stats["cache_bytes"] <= budget
  # The row's bytes are what one more row of the batch cache measures.
  one_layer = kv_cache.init_layer_cache(1, 2, server_full.capacities[0], 16, jnp.float32)
  assert server_full.row_bytes == model.config.num_layers * (
      one_layer.keys.nbytes + one_layer.values.nbytes + one_layer.positions.nbytes) + 4
  prompts, served, server = _served(model, memory_budget_bytes=budget, method="snapkv",
                                    budget=16)
  assert server.rows > server_full.rows
  assert server.stats["cache_bytes"] <= budget
  for s, prompt, n in zip(served, prompts, NEW):
    want = kvjax.generate(model, [prompt], max_new_tokens=n, method="snapkv",
                          budget=16).token_ids[0]
    assert s.token_ids == want
  assert len(served_full) == len(served) == len(LENGTHS)


def test_eos_and_one_token_requests_end_their_rows():
  model = tiny_model()
  prompts = random_prompts(LENGTHS[:6], seed=3)
  alone = kvjax.generate(model, [prompts[2]], max_new_tokens=12).token_ids[0]
  eos = alone[5]
  server = scheduler.Server(model, max_prompt_tokens=70, max_new_tokens=12, max_rows=2,
                            eos_token_ids=[eos])
  news = [12, 1, 12, 3, 12, 12]
  for p, n in zip(prompts, news):
    server.submit(p, n)
  for s, p, n in zip(server.run(), prompts, news):
    assert s.token_ids == kvjax.generate(model, [p], max_new_tokens=n,
                                         eos_token_ids=[eos]).token_ids[0]
    assert eos not in s.token_ids and len(s.token_ids) <= n


def test_sampled_requests_draw_from_their_own_seeds():
  """With temperature > 0 a request draws what generate draws for its prompt alone with
  the request's seed, whatever shares its batch and whenever it is admitted; without a
  seed it takes the server's seed plus its id (wrapped into int64)."""
  model = tiny_model()
  prompts = random_prompts(LENGTHS[:6], seed=7)
  news = [12, 5, 20, 9, 14, 3]
  seeds = [None, 5, None, -3, 2**63 - 1, 5]
  sampling = dict(temperature=0.9, top_p=0.95)
  server = scheduler.Server(model, max_prompt_tokens=70, max_new_tokens=20, max_rows=2,
                            seed=11, **sampling)
  for p, n, seed in zip(prompts, news, seeds):
    server.submit(p, n, seed=seed)
  served = server.run()
  greedy_differs = 0
  for i, (s, p, n, seed) in enumerate(zip(served, prompts, news, seeds)):
    want = kvjax.generate(model, [p], max_new_tokens=n, seed=11 + i if seed is None else seed,
                          **sampling).token_ids[0]
    assert s.token_ids == want, i
    greedy_differs += want != kvjax.generate(model, [p], max_new_tokens=n).token_ids[0]
  assert greedy_differs >= 4   # the draws are really sampled
  wrapped = scheduler.Server(model, max_prompt_tokens=70, max_new_tokens=4, max_rows=1,
                             seed=2**63 - 1, **sampling)
  for p in prompts[:2]:
    wrapped.submit(p)
  for s, p, seed in zip(wrapped.run(), prompts, [2**63 - 1, -2**63]):
    assert s.token_ids == kvjax.generate(model, [p], max_new_tokens=4, seed=seed,
                                         **sampling).token_ids[0]


def test_int64_seeds_are_distinct_streams():
  """jax.random.key keeps a seed's low 32 bits; kvjax folds the high half in, and keeps
  jax's own key where the high half is a sign extension."""
  from kvjax.generation import sampling
  data = lambda seed: tuple(np.asarray(jax.random.key_data(sampling.key_of(seed))).tolist())
  for seed in (0, 5, -1, -7, 2**32 - 1, -2**31):
    assert data(seed) == tuple(np.asarray(jax.random.key_data(jax.random.key(seed))).tolist())
  seeds = [0, 2**32, 2**40, 2**63 - 1, -1, -2**63, -2**32 - 1]
  assert len({data(s) for s in seeds}) == len(seeds)


def test_bad_requests_and_limits_are_refused():
  model = tiny_model()
  with pytest.raises(GenerationError, match="memory_budget_bytes=100 cannot hold one row"):
    scheduler.Server(model, max_prompt_tokens=64, memory_budget_bytes=100)
  with pytest.raises(GenerationError, match="memory_budget_bytes"):
    scheduler.Server(model, max_prompt_tokens=64)
  with pytest.raises(GenerationError, match="needs budget="):
    scheduler.Server(model, max_prompt_tokens=64, max_rows=2, method="snapkv")
  for method in ("h2o", "adakv", "kvzip"):
    with pytest.raises(kvjax.KvjaxError, match="Server"):
      scheduler.Server(model, max_prompt_tokens=64, max_rows=2, method=method, budget=16)
  server = scheduler.Server(model, max_prompt_tokens=8, max_new_tokens=4, max_rows=2)
  with pytest.raises(GenerationError, match="longer than the server's max_prompt_tokens=8"):
    server.submit(list(range(9)))
  with pytest.raises(GenerationError, match="max_new_tokens=5"):
    server.submit([1, 2], max_new_tokens=5)
  for seed in (2**63, 1.5, "7"):
    with pytest.raises(GenerationError, match="seed="):
      server.submit([1, 2], seed=seed)


def test_forgotten_requests_leave_nothing_behind():
  """A long-lived server forgets answered requests: ids stay unique, the next run serves
  only what is new, and a queued request cannot be forgotten."""
  model = tiny_model()
  prompts = random_prompts([5, 9, 7], seed=4)
  server = scheduler.Server(model, max_prompt_tokens=16, max_new_tokens=4, max_rows=2)
  first = [server.submit(p, 3) for p in prompts[:2]]
  assert [s.id for s in server.run()] == first
  for request in first:
    server.forget(request)
  third = server.submit(prompts[2], 3)
  assert third == 2
  with pytest.raises(GenerationError, match="request 2 is still queued"):
    server.forget(third)
  (served,) = server.run()
  assert served.id == third and server.stats["requests"] == 1
  assert served.token_ids == kvjax.generate(model, [prompts[2]], max_new_tokens=3).token_ids[0]
  server.forget(third)
  assert server._requests == {} and server._results == {} and server.run() == []


def test_a_request_still_decoding_cannot_be_forgotten(monkeypatch):
  """From on_finish a finished request may be forgotten, one still decoding may not; after
  a failed run its requests can be."""
  model = tiny_model()
  prompts = random_prompts([5, 9], seed=6)
  server = scheduler.Server(model, max_prompt_tokens=16, max_new_tokens=4, max_rows=2)
  short, long = server.submit(prompts[0], 1), server.submit(prompts[1], 4)
  refused = []

  def on_finish(served):
    if served.id == short:
      with pytest.raises(GenerationError, match="request 1 is still queued or decoding"):
        server.forget(long)
      refused.append(short)
    server.forget(served.id)

  server.on_finish = on_finish
  assert server.run() == [] and refused == [short]
  assert server._requests == {} and server._decoding == set()
  server.on_finish = None
  failing = server.submit(prompts[1], 4)

  def boom(*args, **kwargs):
    raise RuntimeError("device lost")

  monkeypatch.setattr(server.steps, "decode_loop", boom)
  with pytest.raises(RuntimeError, match="device lost"):
    server.run()
  server.forget(failing)     # admitted into a row of the failed run: gone with it
  assert server._requests == {} and server._results == {}


def test_a_request_whose_prefill_fails_fails_alone(monkeypatch):
  """A prompt that cannot be prefilled (here: a poisoned token) or a chunked prompt whose
  store fails ends with its error; the prompts batched with it are prefilled again without
  it and give generate's tokens, and the run serves everything else."""
  from kvjax.systems import chunk_cache
  model = tiny_model()
  poison = 255
  real_prefill, real_chunks = scheduler.context.prefill, chunk_cache.prefill_chunks

  def prefill(model, tokens, *args, **kwargs):
    if (np.asarray(tokens) == poison).any():
      raise RuntimeError("poisoned prompt")
    return real_prefill(model, tokens, *args, **kwargs)

  def prefill_chunks(model, store, chunks, question, **kwargs):
    if question == [poison]:
      raise OSError("chunk store unreadable")
    return real_chunks(model, store, chunks, question, **kwargs)

  monkeypatch.setattr(scheduler.context, "prefill", prefill)
  monkeypatch.setattr(chunk_cache, "prefill_chunks", prefill_chunks)
  prompts = [[t % 200 for t in p] for p in random_prompts([12, 30, 7, 21, 9], seed=8)]
  prompts[1] = prompts[1][:10] + [poison] + prompts[1][10:]
  finished = []
  server = scheduler.Server(model, max_prompt_tokens=40, max_new_tokens=6, max_rows=4,
                            on_finish=lambda s: finished.append((s.id, s.error)))
  ids = [server.submit(p, 6) for p in prompts[:4]]
  store = chunk_cache.ChunkStore(model)
  ids.append(server.submit_chunks(store, [prompts[2], prompts[4]], [poison], 6))
  ids.append(server.submit(prompts[4], 6))
  served = {s.id: s for s in server.run()}
  assert sorted(served) == ids
  assert served[ids[1]].error == "RuntimeError: poisoned prompt"
  assert served[ids[4]].error == "OSError: chunk store unreadable"
  for request in (ids[1], ids[4]):
    assert served[request].token_ids == [] and served[request].text == ""
    assert (request, served[request].error) in finished
  for request, prompt in zip(ids[:4] + ids[5:], prompts[:4] + prompts[4:]):
    if request == ids[1]:
      continue
    assert served[request].error is None
    want = kvjax.generate(model, [prompt], max_new_tokens=6).token_ids[0]
    assert served[request].token_ids == want, request
  assert server.stats["failed_requests"] == 2 and server.stats["requests"] == 4
  server.forget(ids[1])   # a failed request is not waiting: it can be forgotten


def test_serving_benchmark_compares_under_one_bound(tmp_path):
  from kvjax.systems import benchmarks
  model = tiny_model()
  full = scheduler.Server(model, max_prompt_tokens=70, max_new_tokens=4, max_rows=1)
  budget = 2 * full.row_bytes + 100
  lines = []
  report = benchmarks.compare_serving(model, random_prompts(LENGTHS[:6], seed=2), budget,
                                      "snapkv", 16, max_new_tokens=4, repeats=1,
                                      log=lines.append)
  assert len(lines) == 1 and report["full"]["rows"] == 2
  assert report["compressed"]["rows"] > report["full"]["rows"]
  assert report["compressed"]["cache_bytes"] <= budget >= report["full"]["cache_bytes"]
  assert report["throughput_ratio"] == pytest.approx(
      (report["compressed"]["generated_tokens"] / report["compressed"]["seconds"][0])
      / (report["full"]["generated_tokens"] / report["full"]["seconds"][0]))
  benchmarks.write_serving_plot(report, tmp_path / "serving.png")
  assert (tmp_path / "serving.png").stat().st_size > 1000


def test_prompts_of_cached_chunks_join_the_batch():
  """Cache-Craft requests (prefilled alone from a chunk store) and plain prompts decode in
  one batch; each gives generate_from_chunks' (resp. generate's) tokens."""
  from kvjax.systems import chunk_cache
  model = tiny_model()
  chunks = random_prompts([14, 22, 9, 30], seed=3)
  store = chunk_cache.ChunkStore(model)
  chunk_cache.prefill_chunks(model, store, chunks, [5])      # fills the store
  orders = [[0, 1, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0]]
  plain = random_prompts([25, 7], seed=4)
  server = scheduler.Server(model, max_prompt_tokens=90, max_new_tokens=10, max_rows=2)
  ids = []
  for k, order in enumerate(orders):
    ids.append(server.submit_chunks(store, [chunks[i] for i in order], [7, 8 + k], 10,
                                    update_store=False))
    if k < len(plain):
      ids.append(server.submit(plain[k], 10))
  served = {s.id: s for s in server.run()}
  for k, order in enumerate(orders):
    want = chunk_cache.generate_from_chunks(model, store, [chunks[i] for i in order],
                                            [7, 8 + k], 10, update_store=False)
    assert served[ids[2 * k]].token_ids == want.token_ids[0]
    assert server.chunk_stats[ids[2 * k]]["prefilled_tokens"] < 75   # chunks were reused
  for k, prompt in enumerate(plain):
    want = kvjax.generate(model, [prompt], max_new_tokens=10).token_ids[0]
    assert served[ids[2 * k + 1]].token_ids == want
  with pytest.raises(GenerationError, match="full cache"):
    scheduler.Server(model, max_prompt_tokens=90, max_new_tokens=10, max_rows=2,
                     method="snapkv", budget=16).submit_chunks(store, chunks)
  with pytest.raises(GenerationError, match="max_prompt_tokens"):
    server.submit_chunks(store, chunks + chunks)


def _shared_prompts(seed: int = 5) -> list[list[int]]:
  """An instruction shared by all, then one of three documents, then a question: 12
  prompts that share 40 tokens with every other and 40 + 30 with three others."""
  instruction, *documents = random_prompts([40, 30, 30, 30], seed=seed)
  questions = random_prompts([3, 9, 5, 12, 4, 7, 11, 6, 2, 8, 10, 1], seed=seed + 1)
  return [instruction + documents[i % 3] + q for i, q in enumerate(questions)]


def test_prefix_sharing_prefills_each_shared_prefix_once_and_keeps_the_tokens():
  """With a prefix store the server prefills a prefix shared with admitted or waiting
  requests once, keeps it for later admissions, and every request gets the tokens of
  generating its prompt alone (greedy and with its own seed)."""
  model = tiny_model()
  prompts = _shared_prompts()
  for temperature in (0.0, 0.8):
    server = scheduler.Server(model, max_prompt_tokens=120, max_new_tokens=8, max_rows=2,
                              prefix_cache_bytes=1 << 30, min_prefix_tokens=8,
                              temperature=temperature, seed=3)
    ids = [server.submit(p) for p in prompts]
    served = server.run()
    for s, prompt in zip(served, prompts):
      want = kvjax.generate(model, [prompt], max_new_tokens=8, temperature=temperature,
                            seed=scheduler.sampling.offset_seed(3, s.id)).token_ids[0]
      assert s.token_ids == want, (temperature, s.id)
    assert [s.id for s in served] == ids
  stats = server.stats
  # Two rows at a time. The prefix tree over the admitted and waiting prompts gives each
  # its instruction and document (70 tokens shared by four prompts saves more than the
  # instruction shared by all), so each document's prefix is computed once, the first
  # two in the first admission and the third when its first request comes, and then only
  # each request's question.
  assert stats["prompt_tokens"] == sum(map(len, prompts))
  questions = sum(len(p) - 70 for p in prompts)
  assert stats["prefilled_tokens"] == 3 * 70 + questions
  assert stats["prefix_store"]["prefixes"] == 3 and stats["prefix_store"]["hits"] > 0
  assert 0 < stats["prefix_store"]["bytes"] <= 1 << 30
  unshared = scheduler.Server(model, max_prompt_tokens=120, max_new_tokens=8, max_rows=2)
  for p in prompts:
    unshared.submit(p)
  unshared.run()
  assert unshared.stats["prefilled_tokens"] == unshared.stats["prompt_tokens"] == sum(
      map(len, prompts))
  assert unshared.stats["prefix_store"] is None


def test_a_prefix_store_too_small_for_a_prefix_still_shares_within_an_admission():
  model = tiny_model()
  prompts = _shared_prompts(seed=9)
  server = scheduler.Server(model, max_prompt_tokens=120, max_new_tokens=4, max_rows=4,
                            prefix_cache_bytes=1, min_prefix_tokens=8)
  for p in prompts:
    server.submit(p)
  served = server.run()
  for s, prompt in zip(served, prompts):
    assert s.token_ids == kvjax.generate(model, [prompt], max_new_tokens=4).token_ids[0]
  stats = server.stats
  assert stats["prefix_store"]["prefixes"] == 0 and stats["prefix_store"]["bytes"] == 0
  # Nothing is kept between admissions, yet each admission prefilled a shared prefix once.
  assert sum(map(len, prompts)) > stats["prefilled_tokens"]


def test_prefix_store_keeps_least_recently_used_out_within_its_bytes():
  from kvjax.systems.prefix_store import PrefixStore
  one = kv_cache.init_cache(tiny_model().config, 1, 16)
  size = kv_cache.nbytes(one)
  store = PrefixStore(2 * size + size // 2)
  assert store.put((1, 2, 3), one) and store.put((1, 2), one)
  assert store.longest([1, 2, 3, 4], most=3) == 3
  assert store.longest([1, 2, 3, 4], most=2) == 2      # a suffix token must remain
  assert store.longest([1, 5], most=1) == 0
  assert store.get((1, 2, 3)) is one                   # now (1, 2) is the oldest
  assert store.put((7,), one) and (1, 2) not in store and (1, 2, 3) in store
  assert store.nbytes == 2 * size and store.stats()["evictions"] == 1
  assert store.get((1, 2)) is None and store.stats()["misses"] == 1
  # A base taken to prefill a longer prefix is marked used and counted apart from hits.
  assert store.base((7,)) is one and store.put((9, 9), one) and (7,) in store
  assert (1, 2, 3) not in store
  assert {k: store.stats()[k] for k in ("hits", "misses", "extensions")} == dict(
      hits=1, misses=1, extensions=1)
  with pytest.raises(GenerationError, match="no stored prefix of 2 tokens to extend"):
    store.base((1, 2))
  assert not PrefixStore(size - 1).put((1,), one)      # larger than the whole store
  with pytest.raises(GenerationError, match="prefix_cache_bytes=0"):
    PrefixStore(0)


def test_prefix_sharing_refuses_a_compressing_server_and_bad_limits():
  model = tiny_model()
  with pytest.raises(GenerationError, match="full cache.*snapkv"):
    scheduler.Server(model, max_prompt_tokens=70, max_rows=2, method="snapkv", budget=16,
                     prefix_cache_bytes=1 << 20)
  with pytest.raises(GenerationError, match="min_prefix_tokens=0"):
    scheduler.Server(model, max_prompt_tokens=70, max_rows=2, prefix_cache_bytes=1 << 20,
                     min_prefix_tokens=0)
  with pytest.raises(GenerationError, match="prefix_cache_bytes=-1"):
    scheduler.Server(model, max_prompt_tokens=70, max_rows=2, prefix_cache_bytes=-1)


def test_server_sharing_benchmark_compares_without_and_with_the_store(tmp_path):
  from kvjax.systems import benchmarks
  model = tiny_model()
  prompts = _shared_prompts(seed=11)[:6]
  lines = []
  budget = 3 * scheduler.Server(model, max_prompt_tokens=max(map(len, prompts)),
                                max_new_tokens=3, max_rows=1).row_bytes + 100   # 3 rows
  report = benchmarks.compare_server_sharing(model, prompts, budget, 1 << 30,
                                             max_new_tokens=3, min_prefix_tokens=8,
                                             repeats=1, log=lines.append)
  assert len(lines) == 1 and report["same_tokens"] and report["rows_with_same_tokens"] == 6
  assert report["unshared"]["rows"] == report["shared"]["rows"] == 3
  plain, shared = report["unshared"], report["shared"]
  assert plain["prompt_tokens"] == shared["prompt_tokens"] == plain["prefilled_tokens"]
  assert shared["prefilled_tokens"] < plain["prefilled_tokens"]
  assert shared["prefix_store"]["prefixes"] > 0
  assert report["throughput_ratio"] == pytest.approx(
      shared["generated_tokens"] / shared["seconds"][0]
      / (plain["generated_tokens"] / plain["seconds"][0]))
  benchmarks.write_server_sharing_plot(report, tmp_path / "sharing.png")
  assert (tmp_path / "sharing.png").stat().st_size > 1000


def test_server_chunks_benchmark_serves_cached_chunks_against_plain_prompts(tmp_path):
  """Cache-Craft through the server: with recompute fraction 1 the answers equal the plain
  server's; with 0 only the questions are prefilled."""
  from kvjax.systems import benchmarks
  model = tiny_model()
  chunks = random_prompts([14, 22, 9, 30, 17], seed=12)
  first = [([chunks[0], chunks[1], chunks[2]], [5, 6], ["a"]),
           ([chunks[0], chunks[3], chunks[4]], [7], ["b"])]
  second = [([chunks[0], chunks[2], chunks[1]], [8, 9, 10], ["a"]),
            ([chunks[0], chunks[4], chunks[3]], [11], ["b"]),
            ([chunks[0], chunks[1], chunks[4]], [12, 13], ["c"])]
  longest = max(sum(map(len, c)) + len(q) for c, q, _ in second)
  budget = 2 * scheduler.Server(model, max_prompt_tokens=longest, max_new_tokens=4,
                                max_rows=1).row_bytes + 100   # 2 rows
  reports = {f: benchmarks.compare_server_chunks(model, (first, second), budget,
                                                 max_new_tokens=4, recompute_fraction=f,
                                                 repeats=1, log=lambda line: None)
             for f in (1.0, 0.0)}
  prompt_tokens = sum(sum(map(len, c)) + len(q) for c, q, _ in second)
  for f, report in reports.items():
    assert report["recompute"]["rows"] == report["chunks"]["rows"] == 2
    assert report["prompt_tokens"] == prompt_tokens
    assert report["recompute"]["prefilled_tokens"] == prompt_tokens
    assert len(report["chunks"]["seconds"]) == len(report["recompute"]["seconds"]) == 1
  assert reports[1.0]["answers_equal"] == 3
  # Fraction 0: the stored chunks are only re-rotated; the questions are prefilled.
  assert reports[0.0]["chunks"]["prefilled_tokens"] == sum(len(q) for _, q, _ in second)
  assert reports[0.0]["prefill_saved_fraction"] > 0.9
  benchmarks.write_server_chunks_plot(reports[0.0], tmp_path / "chunks.png")
  assert (tmp_path / "chunks.png").stat().st_size > 1000


def _serve_each_as_alone(server, model, prompts, max_new_tokens):
  """Submits `prompts`, runs the server and checks each one's tokens against generating it
  alone."""
  for p in prompts:
    server.submit(p)
  served = server.run()[-len(prompts):]
  for got, prompt in zip(served, prompts):
    want = kvjax.generate(model, [prompt], max_new_tokens=max_new_tokens).token_ids[0]
    assert got.token_ids == want


def test_shared_prefixes_of_different_lengths_and_unshared_prompts_in_one_admission():
  """One admission prefills two prefixes of different lengths (stacked at one append
  index) and an unshared prompt (inserted with them in one step); a second run prefills
  only what the store does not hold."""
  model = tiny_model()
  short, long, alone = random_prompts([20, 50, 30], seed=21)
  long = [200 + t % 50 for t in long]                 # no first token in common
  alone = [100 + t % 50 for t in alone]
  questions = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
  prompts = [short + questions[0], short + questions[1], long + questions[2],
             long + questions[3], alone]
  server = scheduler.Server(model, max_prompt_tokens=60, max_new_tokens=6, max_rows=5,
                            prefix_cache_bytes=1 << 30, min_prefix_tokens=8)
  for run in range(2):
    _serve_each_as_alone(server, model, prompts, 6)
    stats = server.stats
    assert stats["admissions"] == 1 and stats["prompt_tokens"] == sum(map(len, prompts))
    computed = sum(map(len, questions)) + len(alone)
    assert stats["prefilled_tokens"] == computed + (20 + 50 if run == 0 else 0), run
  assert stats["prefix_store"]["prefixes"] == 2
  assert stats["prefix_store"]["hits"] == 2 and stats["prefix_store"]["misses"] == 2
  assert stats["prefix_store"]["extensions"] == 0


def test_a_new_shared_prefix_is_prefilled_over_the_longest_stored_one():
  """An instruction stored when requests shared only it is not computed again under a new
  document: the next group's prefix (instruction + document) is prefilled over it, and
  every request's tokens equal generating it alone."""
  model = tiny_model()
  rng = np.random.default_rng(31)
  instruction = rng.integers(0, 100, 24).tolist()
  docs = [rng.integers(low, low + 50, n).tolist() for low, n in ((100, 30), (150, 40),
                                                                  (200, 35))]
  questions = [[1, 2, 3], [4, 5], [6, 7], [8]]
  rounds = [[instruction + docs[0] + questions[0], instruction + docs[1] + questions[1]],
            [instruction + docs[2] + questions[2], instruction + docs[2] + questions[3]]]
  server = scheduler.Server(model, max_prompt_tokens=80, max_new_tokens=5, max_rows=2,
                            prefix_cache_bytes=1 << 30, min_prefix_tokens=8)
  for prompts in rounds:
    _serve_each_as_alone(server, model, prompts, 5)
  stats = server.stats
  # The second admission computes the third document and its two questions only.
  assert stats["prompt_tokens"] == sum(map(len, rounds[1]))
  assert stats["prefilled_tokens"] == 35 + 2 + 1
  store = stats["prefix_store"]
  assert store["prefixes"] == 2          # the instruction, and it with the third document
  # Both were prefilled (misses), the second over the first (an extension, not a hit).
  assert (store["hits"], store["misses"], store["extensions"]) == (0, 2, 1)


def test_the_server_drops_compiled_code_near_the_mapping_limit(monkeypatch):
  """Before an admission the server checks the process's memory mappings; past the share
  it drops the compiled code and serves on with the same tokens."""
  from kvjax.generation import map_limit
  model = tiny_model()
  prompts = random_prompts([12, 30, 7], seed=13)
  monkeypatch.setattr(map_limit, "mappings", lambda: 40_000)
  monkeypatch.setattr(map_limit, "_limit", lambda: 65_530)
  released = []
  real = map_limit.release_if_near_limit
  monkeypatch.setattr(map_limit, "release_if_near_limit",
                      lambda: released.append(real()))
  server = scheduler.Server(model, max_prompt_tokens=30, max_new_tokens=5, max_rows=1)
  for p in prompts:
    server.submit(p)
  served = server.run()
  assert released == [True] * 3          # one admission per request (one row)
  for s, prompt in zip(served, prompts):
    assert s.token_ids == kvjax.generate(model, [prompt], max_new_tokens=5).token_ids[0]
