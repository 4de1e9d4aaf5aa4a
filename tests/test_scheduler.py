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
