"""Continuous batching of generation requests under a bound on device cache memory.

    server = kvjax.systems.Server(model, max_prompt_tokens=1024, max_new_tokens=64,
                                  memory_budget_bytes=256 << 20, method="snapkv", budget=128)
    ids = [server.submit(p) for p in prompts]
    done = server.run()            # one ServedRequest per id, in submission order

The server keeps one batch cache of `rows` rows. A row's size is fixed by the server's
limits (its prompt's kept tokens, at most `max_prompt_tokens` or the method's budget, plus
`max_new_tokens` and one decode chunk of slack), so admission is by cache bytes: `rows` is
the most rows whose cache fits `memory_budget_bytes`, and compression, by shrinking a row,
admits more of them. Waiting requests are prefilled together (compressed by the method)
whenever rows are free and written into those rows; decoding runs DECODE_CHUNK steps per
compiled call for every row at once; a finished row takes the next request at once.

Rows append at one shared slot index, so a row that joins late leaves empty slots behind
it; when the shared index nears the end, every row's live slots are moved to the front
(one fixed-shape compiled step). Tokens equal `kvjax.generate` of each prompt alone: greedy
ones, and with temperature > 0 those of `generate(..., seed=)` with the request's seed (each
row samples from its own key stream, `Server.submit`).

With `prefix_cache_bytes` (full cache), prompts that share a prefix (a system prompt, few-shot
examples, a document asked several questions) prefill it once: admission looks for shared
prefixes among the requests it admits and those still waiting, keeps each prefilled prefix
in a bounded store for later admissions, and prefills only each row's suffix over a copy
of it (the tokens equal generating each prompt alone up to float rounding).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import calibration
from kvjax import methods as methods_lib
from kvjax import validation
from kvjax.cache import kv_cache
from kvjax.cache.kv_cache import Cache, LayerCache
from kvjax.errors import GenerationError
from kvjax.generation import context, engine, inputs, map_limit, sampling
from kvjax.generation.generate import (DECODE_CHUNK, _sample_jit, _validate_sampling,
                                       check_context_length, eos_ids)
from kvjax.systems import chunk_cache
from kvjax.systems.prefix_sharing import check_prefill_method, take_rows
from kvjax.systems.prefix_store import PrefixStore
from kvjax.systems.prefix_tree import group_by_prefix


# Waiting requests the prefix tree looks at when an admission picks shared prefixes (it is
# rebuilt at every admission, so its cost stays bounded however long the queue grows).
PREFIX_LOOKAHEAD = 256


@dataclasses.dataclass
class ServedRequest:
  id: int
  text: str
  token_ids: list[int]            # generated, EOS excluded
  prompt_tokens: int
  queued_seconds: float           # submission to admission (prefill start)
  latency_seconds: float          # submission to its last token (or to its failure)
  error: str | None = None        # why its own prefill failed (nothing generated); None: served


@dataclasses.dataclass
class _Row:
  request: int
  generated: list
  key: jax.Array      # the request's own key: sampling.key_of(its seed)
  sampled: int = 1    # tokens drawn so far (the first at admission): the next step's index
  done: bool = False


@dataclasses.dataclass(frozen=True)
class _Request:
  tokens: list
  max_new_tokens: int
  seed: int
  submitted_at: float


def _layer_bytes(config, capacities: Sequence[int], rows: int, dtype) -> int:
  shapes = jax.eval_shape(lambda: _empty_cache(config, rows, tuple(capacities), dtype))
  return kv_cache.nbytes(shapes)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _empty_cache(config, rows: int, capacities: tuple, dtype) -> Cache:
  layers = tuple(kv_cache.init_layer_cache(rows, config.num_kv_heads, c, config.head_dim, dtype,
                                           config.values_per_key_head * config.head_dim)
                 for c in capacities)
  return Cache(layers=layers, lengths=jnp.zeros((rows,), jnp.int32))


def _stacked_rows(caches: list) -> Cache:
  """The rows of `caches` (same layers and capacities) in one cache; each layer's shared
  append index `end` (the only scalar leaf) is the largest, so a row with fewer live
  slots has empty ones before it."""
  return jax.tree_util.tree_map(
      lambda *leaves: jnp.concatenate(leaves) if leaves[0].ndim else jnp.max(
          jnp.stack(leaves)), *caches)


def _live_first(layer: LayerCache, capacity: int | None = None) -> tuple[LayerCache, jax.Array]:
  """`layer.live_first(capacity)` without method state, and the most live slots any row
  and head holds."""
  count = jnp.max((layer.positions >= 0).sum(-1)).astype(jnp.int32)
  return layer.live_first(capacity).replace(state=None), count


# The batch cache is donated: an admission or compaction never holds two copies of it.
@functools.partial(jax.jit, donate_argnums=(0,))
def _compacted(cache: Cache) -> Cache:
  layers = []
  for layer in cache.layers:
    moved, count = _live_first(layer)
    layers.append(moved.replace(end=count))
  return cache.replace(layers=tuple(layers))


@functools.partial(jax.jit, static_argnames=("capacities", "kept"))
def _fitted_rows(cache: Cache, *, capacities: tuple, kept: tuple) -> tuple[Cache, jax.Array]:
  """A prefilled cache's rows with each layer at `capacities` slots: live slots first, then
  cut or padded (and whether any row kept more slots than its layer was sized for)."""
  layers, over = [], jnp.bool_(False)
  for layer, capacity, most in zip(cache.layers, capacities, kept):
    moved, count = _live_first(layer, min(capacity, layer.capacity))
    over = over | (count > most)
    moved = moved.grow(capacity - moved.capacity)
    layers.append(moved.replace(end=count))
  return cache.replace(layers=tuple(layers)), over


@functools.partial(jax.jit, donate_argnums=(0,))
def _inserted(batch: Cache, rows: Cache, targets: jax.Array) -> Cache:
  """`rows` (n rows) written over rows `targets` [n] of `batch` (a target past the last row
  drops its row: admissions are padded to few shapes); each layer's shared append index
  becomes the larger of the two."""
  put = lambda big, small: big.at[targets].set(small.astype(big.dtype), mode="drop")
  layers = tuple(b.replace(keys=put(b.keys, r.keys), values=put(b.values, r.values),
                           positions=put(b.positions, r.positions),
                           end=jnp.maximum(b.end, r.end))
                 for b, r in zip(batch.layers, rows.layers))
  return Cache(layers=layers, lengths=put(batch.lengths, rows.lengths))


@functools.partial(jax.jit, donate_argnums=(0,))
def _released(cache: Cache, freed: jax.Array) -> Cache:
  """Rows `freed` [B] bool emptied: their slots no longer count as live for compaction."""
  empty = lambda p: jnp.where(freed[:, None, None], kv_cache.EMPTY_POSITION, p)
  return cache.replace(layers=tuple(layer.replace(positions=empty(layer.positions))
                                    for layer in cache.layers))


def _padded_count(n: int, limit: int) -> int:
  """Admissions are prefilled at a power-of-two row count (at most `limit`), so a server
  compiles a few prefill shapes, not one per count."""
  return min(1 << (n - 1).bit_length(), max(limit, n))


class Server:
  """Continuous batching under a cache-memory bound (see the module docstring)."""

  def __init__(self, model, *, max_prompt_tokens: int, max_new_tokens: int = 64,
               memory_budget_bytes: int | None = None, max_rows: int | None = None,
               method=None, budget: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, eos_token_ids=None,
               chat_template: bool | None = None, on_finish=None,
               prefix_cache_bytes: int | None = None, min_prefix_tokens: int = 16,
               steps: engine.CompiledSteps = engine.STEPS):
    """on_finish: called with each ServedRequest as soon as it is done (from the thread
    that runs `run`); `submit` may be called from other threads meanwhile, and a request
    submitted while `run` is serving is admitted by that run.

    prefix_cache_bytes: share prompt prefixes (full cache only; None: off). A request is
    prefilled from the longest prefix of it that is stored, or that it shares with
    another request being admitted or still waiting (BatchLLM's prefix tree over the
    queue, the first PREFIX_LOOKAHEAD of it), whichever is longer and at least
    `min_prefix_tokens` long: such a prefix is prefilled once, kept in a `PrefixStore` of
    at most `prefix_cache_bytes` device bytes (on top of `memory_budget_bytes`; least
    recently used out), and only each row's suffix is prefilled over it. A new prefix is
    itself prefilled over the longest stored prefix of it (at least `min_prefix_tokens`)."""
    _validate_sampling(max_new_tokens, temperature, top_p, seed, None)
    validation.integer("max_prompt_tokens", max_prompt_tokens, 1, error=GenerationError,
                       what="the longest prompt the server admits, in tokens")
    if memory_budget_bytes is None and max_rows is None:
      raise GenerationError("give memory_budget_bytes (the batch cache's bound) or max_rows")
    if memory_budget_bytes is not None:
      validation.integer("memory_budget_bytes", memory_budget_bytes, 1, error=GenerationError,
                         what="bytes the batch cache may allocate")
    if max_rows is not None:
      validation.integer("max_rows", max_rows, 1, error=GenerationError,
                         what="rows decoded together")
    if getattr(model, "placement", None) is not None:
      raise GenerationError("the server runs on one device; load the model without a mesh")
    check_context_length(model, max_prompt_tokens + max_new_tokens,
                         f"max_prompt_tokens={max_prompt_tokens} with max_new_tokens="
                         f"{max_new_tokens}")
    self.model, self.steps = model, steps
    self.method = calibration.bind(method, model)
    check_prefill_method("Server", self.method)
    self.min_prefix_tokens = validation.integer(
        "min_prefix_tokens", min_prefix_tokens, 1, error=GenerationError,
        what="the shortest prompt prefix that is shared")
    self.prefixes = None
    if prefix_cache_bytes is not None:
      if self.method.compresses:
        raise GenerationError(f"prefix_cache_bytes={prefix_cache_bytes}: prefix sharing needs "
                              f"the server's full cache; this one compresses with "
                              f"{self.method.label!r} (use systems.generate_shared to "
                              f"compress shared prefixes once)")
      self.prefixes = PrefixStore(prefix_cache_bytes)
    if self.method.needs_budget and budget is None:
      raise GenerationError(f"method {self.method.label!r} needs budget= (tokens kept per "
                            f"layer): a row's size must not depend on its prompt")
    self.keep = methods_lib.validate_compression(self.method, [max_prompt_tokens], None,
                                                 budget)
    if self.method.compresses and self.keep is not None:
      kept = context.layer_budgets(model, self.method, self.keep, max_prompt_tokens)
    else:
      # Live slots are moved to the front of a row: padding of the prompt bucket is cut.
      kept = (max_prompt_tokens,) * model.config.num_layers
    self.kept = tuple(int(k) for k in kept)
    self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
    # Overshoot: rows decode whole chunks, so one may run up to a chunk past its end.
    self.capacities = tuple(k + max_new_tokens + DECODE_CHUNK for k in kept)
    dtype = jnp.dtype(model.config.dtype)
    one = _layer_bytes(model.config, self.capacities, 1, dtype)
    self.row_bytes = _layer_bytes(model.config, self.capacities, 2, dtype) - one
    fixed = one - self.row_bytes
    rows = max_rows or 1 << 30
    if memory_budget_bytes is not None:
      rows = min(rows, (memory_budget_bytes - fixed) // self.row_bytes)
      if rows < 1:
        raise GenerationError(
            f"memory_budget_bytes={memory_budget_bytes} cannot hold one row: a row takes "
            f"{self.row_bytes} bytes ({self.method.label}, {max_prompt_tokens} prompt and "
            f"{max_new_tokens} new tokens); raise the budget or compress")
    self.rows = int(rows)
    self.memory_budget_bytes = memory_budget_bytes
    # A prefill holds its prompts' uncompressed cache until it is compressed: admit at
    # most as many prompts at once as the budget holds uncompressed.
    prompt_bytes = kv_cache.full_cache_nbytes(model.config, 1, inputs.bucket(max_prompt_tokens))
    self.admit_rows = self.rows if memory_budget_bytes is None else max(
        1, min(self.rows, memory_budget_bytes // prompt_bytes))
    self.sampling = dict(temperature=temperature, top_p=top_p, greedy=temperature == 0)
    self.seed = seed
    self.eos = sorted(eos_ids(model, eos_token_ids))
    self.chat_template = chat_template
    self._queue: collections.deque = collections.deque()
    self._requests: dict = {}       # request -> _Request
    self._next_request = 0
    self._lock = threading.Lock()
    self._results: dict = {}
    self._decoding: set = set()     # requests in a row of the running `run`
    self._chunked: dict = {}        # request -> (store, chunk ids, question ids, options)
    self.chunk_stats: dict = {}     # request -> prefill_chunks' stats
    self.on_finish = on_finish
    self._failed = 0                # requests of the running `run` that failed alone
    # Plain prompts' tokens admitted by the running `run`, and those it computed.
    self._token_counts = {"prompt": 0, "prefilled": 0}
    self.stats: dict = {}

  def submit(self, prompt, max_new_tokens: int | None = None, *,
             seed: int | None = None) -> int:
    """Queues a prompt (text or token ids); returns its id.

    With temperature > 0 the request draws its tokens from its own `seed` (default: the
    server's seed plus the request's id) exactly as `kvjax.generate(model, [prompt],
    seed=seed)` does, whatever it is batched with."""
    request = self._register(prompt, max_new_tokens, seed)
    with self._lock:   # an admission may be reading the queue (_prefix_starts)
      self._queue.append(request)
    return request

  def _register(self, prompt, max_new_tokens: int | None, seed: int | None) -> int:
    """A new request's id, checked and recorded but not yet queued."""
    max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
    validation.integer("max_new_tokens", max_new, 1, self.max_new_tokens,
                       error=GenerationError, what="tokens to generate, up to the server's")
    if seed is not None:
      validation.integer("seed", seed, validation.INT64_MIN, validation.INT64_MAX,
                         error=GenerationError)
    tokens = inputs.encode(self.model, [prompt], None, self.chat_template).prompts[0]
    if len(tokens) > self.max_prompt_tokens:
      raise GenerationError(f"prompt of {len(tokens)} tokens is longer than the server's "
                            f"max_prompt_tokens={self.max_prompt_tokens}")
    with self._lock:   # ids stay unique when several threads submit
      request = self._next_request
      self._next_request += 1
      if seed is None:
        seed = sampling.offset_seed(self.seed, request)
      self._requests[request] = _Request(list(tokens), max_new, seed, time.perf_counter())
    return request

  def forget(self, request: int) -> None:
    """Drops what the server keeps of a request that is not waiting: its prompt, its
    result (`run` no longer returns it) and its chunk statistics. A long-lived server
    (the HTTP endpoint) forgets each request once its answer is handed out, so its memory
    does not grow with the requests it has served. Call it between runs or from
    `on_finish`."""
    with self._lock:
      if request in self._queue or request in self._decoding:
        raise GenerationError(f"request {request} is still queued or decoding; only a "
                              f"request that is not waiting can be forgotten")
      self._requests.pop(request, None)
      self._results.pop(request, None)
      self._chunked.pop(request, None)
      self.chunk_stats.pop(request, None)

  def submit_chunks(self, store, chunks, question="", max_new_tokens: int | None = None, *,
                    recompute_fraction: float | None = None, alpha: float = 1.0,
                    update_store: bool = True, seed: int | None = None) -> int:
    """Queues a retrieval-augmented prompt made of cached chunks (Cache-Craft, see
    `kvjax.systems.generate_from_chunks`): it is prefilled alone when admitted, reusing
    `store`'s chunk caches, and decoded with the batch. Needs the server's full cache (a
    row sized for a compressed prompt cannot hold an assembled one)."""
    if self.method.compresses:
      raise GenerationError(f"submit_chunks needs a server with the full cache; this one "
                            f"compresses with {self.method.label!r}")
    chunk_cache.check_request("submit_chunks", self.model, store, recompute_fraction, alpha)
    ids, question_ids = chunk_cache.encode_chunks(self.model, chunks, question)
    request = self._register([t for c in ids for t in c] + question_ids, max_new_tokens,
                             seed)
    # Known as chunked before it is queued: a running `run` may admit it at once.
    self._chunked[request] = (store, ids, question_ids,
                              dict(recompute_fraction=recompute_fraction, alpha=alpha,
                                   update_store=update_store))
    with self._lock:
      self._queue.append(request)
    return request

  def _admit(self, cache, rows: list, free: list):
    """Prefills waiting requests into free rows: plain prompts together (compressed by the
    method), prompts of cached chunks one by one. A request whose own prefill fails ends
    with its `error` and leaves its row free; the others are admitted."""
    take = [self._queue.popleft()
            for _ in range(min(len(free), len(self._queue), self.admit_rows))]
    targets = free[:len(take)]
    plain = [(r, t) for r, t in zip(take, targets) if r not in self._chunked]
    first = {}
    if plain:
      cache, tokens = self._prefill_plain(cache, plain)
      first.update(tokens)
    for request, target in zip(take, targets):
      if request in self._chunked:
        try:
          cache, first[request] = self._prefill_chunks(cache, request, target)
        except Exception as err:   # a bad chunk store or prompt fails only its request
          self._fail(request, err)
    admitted = [(r, t) for r, t in zip(take, targets) if r in first]
    now = time.perf_counter()
    for request, row in admitted:
      self._decoding.add(request)
      rows[row] = _Row(request=request, generated=[],
                       key=sampling.key_of(self._requests[request].seed))
      self._results[request] = {"admitted_at": now}
      self._accept(rows[row], int(first[request]))
    return (cache, np.array([first[r] for r, _ in admitted], np.int32),
            [t for _, t in admitted])

  def _prefill_plain(self, cache, plain: list):
    """Prefills (request, row) pairs together; when that fails, each alone, so a prompt
    that cannot be prefilled fails only its own request. Returns (cache, {request: its
    first token})."""
    try:
      cache, tokens = self._prefill_prompts(cache, [r for r, _ in plain],
                                            [t for _, t in plain])
      return cache, dict(zip((r for r, _ in plain), tokens))
    except Exception as err:
      if len(plain) == 1:
        self._fail(plain[0][0], err)
        return cache, {}
    first = {}
    for pair in plain:
      cache, tokens = self._prefill_plain(cache, [pair])
      first.update(tokens)
    return cache, first

  def _fail(self, request: int, err: Exception) -> None:
    """Ends `request` unserved: its result carries the error (and on_finish sees it)."""
    record = self._requests[request]
    waited = time.perf_counter() - record.submitted_at   # its admission was its end
    self._results[request] = ServedRequest(
        id=request, text="", token_ids=[], prompt_tokens=len(record.tokens),
        queued_seconds=waited, latency_seconds=waited, error=f"{type(err).__name__}: {err}")
    self._failed += 1
    if self.on_finish is not None:
      self.on_finish(self._results[request])

  def _first_tokens(self, logits, requests: list) -> np.ndarray:
    """Each request's first token, drawn with step 0 of its own key stream."""
    keys = sampling.step_key(sampling.keys_of([self._requests[r].seed for r in requests]), 0)
    # generate's own jitted sampler: the same rounding, so the same draws.
    return np.asarray(_sample_jit(logits, keys, jnp.float32(self.sampling["temperature"] or 1),
                                  jnp.float32(self.sampling["top_p"]),
                                  greedy=self.sampling["greedy"]))

  def _fitted(self, prompt_cache) -> Cache:
    for index, layer in enumerate(prompt_cache.layers):
      if not isinstance(layer, LayerCache):
        raise GenerationError(f"method {self.method.label!r} stores layer {index} as a "
                              f"{type(layer).__name__}; the server batches dense layers")
    fitted, over = _fitted_rows(prompt_cache, capacities=self.capacities, kept=self.kept)
    if bool(over):
      raise GenerationError(f"a prompt kept more slots than the server sized its rows for "
                            f"({self.kept}): method {self.method.label!r} keeps more of a "
                            f"shorter prompt")
    return fitted

  def _prefill_prompts(self, cache, take: list, targets: list):
    """Prefills requests `take` into rows `targets`: whole prompts together, and with
    prefix sharing those with a shared prefix from it. Returns (cache, first tokens)."""
    starts = self._prefix_starts(take) if self.prefixes is not None else [0] * len(take)
    parts, rows, first, computed = [], [], np.zeros(len(take), np.int32), 0
    for shared in (False, True):
      part = [i for i, start in enumerate(starts) if bool(start) == shared]
      if part:
        prefill_part = self._prefilled_suffixes if shared else self._prefilled_rows
        fitted, tokens, padded, count = prefill_part([take[i] for i in part],
                                                     [starts[i] for i in part])
        first[part] = tokens
        computed += count
        parts.append(fitted)
        rows += [targets[i] for i in part] + [self.rows] * padded
    fitted = parts[0] if len(parts) == 1 else _stacked_rows(parts)
    # Last, and once: inserting donates the batch cache, so whatever can fail comes before.
    cache = _inserted(cache, fitted, jnp.asarray(rows, jnp.int32))
    self._token_counts["prompt"] += sum(len(self._requests[r].tokens) for r in take)
    self._token_counts["prefilled"] += computed
    return cache, first

  def _padded(self, items: list) -> list:
    """`items` padded to a power-of-two count by repeating the first (few shapes compile);
    the padding rows' results are dropped."""
    return items + items[:1] * (_padded_count(len(items), self.admit_rows) - len(items))

  def _prefilled_rows(self, take: list, _starts=None):
    """Whole prompts prefilled together (compressed by the method): (their rows at the
    server's capacities, first tokens, padding rows, prompt tokens computed). `_starts`
    (all 0) keeps `_prefilled_suffixes`' signature."""
    prompts = self._padded([self._requests[r].tokens for r in take])
    tokens, mask = inputs.left_pad(prompts, inputs.pad_id(self.model))
    prefilled = context.prefill(self.model, tokens, mask, self.method,
                                self.keep if self.method.compresses else None, room=0,
                                steps=self.steps)
    logits, prompt_cache = prefilled.logits, prefilled.cache
    del prefilled  # the prompts' cache goes as soon as its rows are in the batch cache
    fitted = self._fitted(prompt_cache)
    del prompt_cache
    first = self._first_tokens(logits, self._padded(take))[:len(take)]
    return fitted, first, len(prompts) - len(take), sum(map(len, prompts[:len(take)]))

  def _prefix_starts(self, take: list) -> list:
    """Per request, the length of the prefix it is prefilled from (0: none): the longest
    stored one, or the one the prefix tree gives it among the requests being admitted and
    those waiting, whichever is longer, if at least `min_prefix_tokens`."""
    prompts = [self._requests[r].tokens for r in take]
    with self._lock:   # `submit` may append from another thread meanwhile
      queued = list(itertools.islice(self._queue, PREFIX_LOOKAHEAD))
    waiting = [self._requests[r].tokens for r in queued if r not in self._chunked]
    grouped = {m: g.prefix_length
               for g in group_by_prefix(prompts + waiting, self.min_prefix_tokens)
               for m in g.members}
    starts = []
    for i, tokens in enumerate(prompts):
      most = len(tokens) - 1   # a suffix of one token at least gives the next logits
      start = max(grouped.get(i, 0), self.prefixes.longest(tokens, most))
      starts.append(start if start >= self.min_prefix_tokens else 0)
    return starts

  def _prefix_caches(self, prefixes: list) -> tuple[dict, int]:
    """({prefix tokens: its one-row cache, live slots first}, tokens prefilled): stored
    prefixes, and the others prefilled now and stored: over the longest stored prefix of
    each (at least `min_prefix_tokens`; an instruction stored earlier is not computed
    again under a new paragraph), else whole, together."""
    caches = {p: self.prefixes.get(p) for p in prefixes}   # counts hits and misses
    missing = [p for p, cache in caches.items() if cache is None]
    if not missing:
      return caches, 0
    starts = [self.prefixes.longest(p, len(p) - 1) for p in missing]
    starts = [s if s >= self.min_prefix_tokens else 0 for s in starts]
    computed, prefilled = 0, {}
    extended = [i for i, s in enumerate(starts) if s]
    if extended:
      # Their stored prefixes are taken before anything new is stored (and may evict).
      bases = {missing[i][:starts[i]]: self.prefixes.base(missing[i][:starts[i]])
               for i in extended}
      _, rows = self._prefilled_over([list(missing[i]) for i in extended],
                                     [starts[i] for i in extended], bases)
      prefilled.update({missing[i]: (rows, j) for j, i in enumerate(extended)})
      computed += sum(len(missing[i]) - starts[i] for i in extended)
    whole = [i for i, s in enumerate(starts) if not s]
    if whole:
      padded = self._padded([list(missing[i]) for i in whole])
      tokens, mask = inputs.left_pad(padded, inputs.pad_id(self.model))
      rows = context.prefill(self.model, tokens, mask, self.method, None, room=0,
                             steps=self.steps).cache
      prefilled.update({missing[i]: (rows, j) for j, i in enumerate(whole)})
      computed += sum(len(missing[i]) for i in whole)
    for prefix in missing:
      rows, j = prefilled[prefix]
      # Stored at a multiple of 64 slots, not the prompt bucket: less padding held.
      width = (-(-len(prefix) // 64) * 64,) * len(rows.layers)
      caches[prefix], _ = _fitted_rows(take_rows(rows, np.array([j])), capacities=width,
                                       kept=width)
      self.prefixes.put(prefix, caches[prefix])
    return caches, computed

  def _prefilled_over(self, prompts: list, starts: list, caches: dict):
    """(last logits, cache) of `prompts` (padded rows) prefilled over their prefixes
    (`caches` by prefix tokens, one row each): each row's prefix copied out of its cache,
    then every row's suffix prefilled over it together."""
    keys = [tuple(t[:s]) for t, s in zip(prompts, starts)]
    distinct = list(dict.fromkeys(keys))
    suffixes = self._padded([t[s:] for t, s in zip(prompts, starts)])
    suffix_width = inputs.bucket(max(map(len, suffixes)))
    # Every prefix at one capacity (live slots first, the shortest followed by empty
    # slots up to the longest's end), room for the suffixes after them.
    capacity = (inputs.bucket(max(starts)) + suffix_width,) * self.model.config.num_layers
    stacked = _stacked_rows([_fitted_rows(caches[p], capacities=capacity, kept=capacity)[0]
                             for p in distinct])
    rows = take_rows(stacked, np.array(self._padded([distinct.index(k) for k in keys])))
    del stacked   # only the rows' copies stay while their suffixes are prefilled
    tokens, mask = inputs.left_pad(suffixes, inputs.pad_id(self.model), suffix_width)
    return self.steps.prefill(self.model, jnp.asarray(tokens), jnp.asarray(mask), rows,
                              logits="last")

  def _prefilled_suffixes(self, take: list, starts: list):
    """Requests prefilled from their prefixes (`_prefix_caches`, `_prefilled_over`).
    Returns what `_prefilled_rows` does."""
    prompts = [self._requests[r].tokens for r in take]
    caches, computed = self._prefix_caches(
        list(dict.fromkeys(tuple(t[:s]) for t, s in zip(prompts, starts))))
    logits, rows = self._prefilled_over(prompts, starts, caches)
    computed += sum(len(t) - s for t, s in zip(prompts, starts))
    fitted_rows = self._fitted(rows)
    del rows
    first = self._first_tokens(logits, self._padded(take))[:len(take)]
    return fitted_rows, first, len(self._padded(take)) - len(take), computed

  def _prefill_chunks(self, cache, request: int, target: int):
    store, ids, question_ids, options = self._chunked.pop(request)
    logits, prompt_cache, stats = chunk_cache.prefill_chunks(self.model, store, ids,
                                                             question_ids, **options)
    self.chunk_stats[request] = stats
    fitted, first = self._fitted(prompt_cache), int(self._first_tokens(logits, [request])[0])
    return _inserted(cache, fitted, jnp.asarray([target], jnp.int32)), first

  def _accept(self, row: _Row, token: int) -> None:
    if row.done:
      return
    if token in self.eos:
      row.done = True
      return
    row.generated.append(token)
    if len(row.generated) >= self._requests[row.request].max_new_tokens:
      row.done = True

  def _finish(self, row: _Row) -> None:
    request = self._requests[row.request]
    tokens, submitted = request.tokens, request.submitted_at
    tokenizer = self.model.tokenizer
    now = time.perf_counter()
    admitted = self._results[row.request]["admitted_at"]
    self._results[row.request] = ServedRequest(
        id=row.request, text=tokenizer.decode(row.generated) if tokenizer else "",
        token_ids=row.generated, prompt_tokens=len(tokens),
        queued_seconds=admitted - submitted, latency_seconds=now - submitted)
    if self.on_finish is not None:
      self.on_finish(self._results[row.request])

  def run(self) -> list[ServedRequest]:
    """Serves every queued request; returns all served so far (and not forgotten), in
    submission order. A request whose own prefill failed (a bad chunk store, a prompt the
    method cannot fit) is returned with its `error` and nothing generated, and the run
    goes on; a failure of the batch's decoding fails the run."""
    try:
      return self._serve()
    finally:   # a failed run's rows are gone: their requests can be forgotten
      self._decoding.clear()

  def _serve(self) -> list[ServedRequest]:
    steps = self.steps
    compile_before = steps.compile_seconds
    start = time.perf_counter()
    cache = _empty_cache(self.model.config, self.rows, self.capacities,
                         jnp.dtype(self.model.config.dtype))
    rows: list = [None] * self.rows
    idle_key = jax.random.key(0)
    last = np.zeros(self.rows, np.int32)
    decode_calls = compactions = admissions = generated = served = 0
    peak_rows = 0
    self._failed = 0
    self._token_counts = {"prompt": 0, "prefilled": 0}
    while self._queue or any(r is not None for r in rows):
      freed = np.array([r is not None and r.done for r in rows])
      if freed.any():
        for i in np.flatnonzero(freed):
          self._decoding.discard(rows[i].request)
          self._finish(rows[i])
          generated += len(rows[i].generated)
          served += 1
          rows[i] = None
        cache = _released(cache, jnp.asarray(freed))
      free = [i for i, r in enumerate(rows) if r is None]
      if free and self._queue:
        # Admissions compile new prompt shapes: a long-lived server (the endpoint) would
        # otherwise run out of memory mappings (see map_limit).
        map_limit.release_if_near_limit()
        cache, first, targets = self._admit(cache, rows, free)
        last[targets] = first[:len(targets)]
        admissions += 1
        continue  # a request may finish with its first token
      if not any(r is not None for r in rows):
        break
      peak_rows = max(peak_rows, sum(r is not None for r in rows))
      room = min(c - int(layer.end) for c, layer in zip(self.capacities, cache.layers))
      if room < DECODE_CHUNK:
        cache = _compacted(cache)
        compactions += 1
        room = min(c - int(layer.end) for c, layer in zip(self.capacities, cache.layers))
      active = np.array([r is not None and not r.done for r in rows])
      limit = min(DECODE_CHUNK, room, max(self._requests[r.request].max_new_tokens
                                          - len(r.generated)
                                          for r in rows if r is not None and not r.done))
      # Each row continues its own request's key stream (an empty row's draws are unused).
      keys = jnp.stack([idle_key if r is None else r.key for r in rows])
      sampled = np.array([0 if r is None else r.sampled for r in rows], np.int32)
      tokens, ran, cache, next_tokens, _ = steps.decode_loop(
          self.model, jnp.asarray(last), cache, keys, sampled, limit,
          self.sampling["temperature"] or 1.0, self.sampling["top_p"],
          self.sampling["greedy"], self.eos, DECODE_CHUNK, active=active, mask_finished=True)
      decode_calls += 1
      last = np.array(next_tokens)
      for i, row in enumerate(rows):
        if row is not None:
          row.sampled += ran
          for step in range(ran):
            self._accept(row, int(tokens[i, step]))
    seconds = time.perf_counter() - start - (steps.compile_seconds - compile_before)
    self.stats = {
        "rows": self.rows, "row_bytes": self.row_bytes,
        "cache_bytes": kv_cache.nbytes(cache), "memory_budget_bytes": self.memory_budget_bytes,
        "method": self.method.label, "budget": self.keep if self.method.compresses else None,
        "requests": served, "failed_requests": self._failed, "generated_tokens": generated,
        "seconds": seconds, "tokens_per_second": generated / seconds if seconds > 0 else None,
        "decode_calls": decode_calls, "admissions": admissions, "compactions": compactions,
        "peak_active_rows": peak_rows,
        "prompt_tokens": self._token_counts["prompt"],
        "prefilled_tokens": self._token_counts["prefilled"],
        "prefill_saved_fraction": (1 - self._token_counts["prefilled"]
                                   / self._token_counts["prompt"]
                                   if self._token_counts["prompt"] else None),
        # Over the server's life: the store outlives a run.
        "prefix_store": None if self.prefixes is None else self.prefixes.stats(),
        "compile_seconds": steps.compile_seconds - compile_before}
    return [self._results[i] for i in sorted(self._results)
            if isinstance(self._results[i], ServedRequest)]

