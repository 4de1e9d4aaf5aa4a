"""EpiCache's episodes: one compressed cache per topic of a long context, a question routed
to the nearest (see kvjax/methods/epicache.py for the method and its reading of the paper).

1. Windows: the context split into sentences (text ending in . ! or ? and whitespace), `c`
   consecutive sentences per window (EpiCache's windows of c utterances; a dialogue with one
   utterance per sentence is the same thing).
2. Embeddings: no sentence encoder is available offline, so a window (and a question) is
   embedded by the served model itself: its final hidden states (after the final norm),
   mean-pooled over the text's tokens, L2-normalised. The official code uses MiniLM or
   Qwen3-Embedding.
3. K-means (Euclidean, on the normalised embeddings, as sklearn on them in the official
   code) with E clusters, initialised deterministically at E chronologically evenly spaced
   windows (the official runs sklearn's k-means++ with 10 restarts, random_state 42); E is
   capped at the number of windows. Per cluster the M_med windows closest in cosine to the
   centroid, in chronological order, are the episode's text P_e.
4. Per episode, block-wise prefill of the whole context with eviction after every block,
   scored by the patched prompt [instruction + assistant opening + P_e] (`block_prefill`):
   peak cache slots per head are at most the layer budget plus one block (level "uniform";
   at "pair" a layer holds its fullest head rounded up to a multiple of its budget, up to
   the budget times the KV heads, plus one block). A context within one block is
   prefilled once for every episode (nothing is evicted before it is in), and the patched
   prompts are padded to a few lengths (`inputs.bucket`), so such a context costs one
   forward pass and episodes share compiled probes.
5. The episodes' caches wait in host memory (the official offloads them to the CPU): device
   memory holds one episode's cache while a question is answered. `answer`: argmax over
   episodes of <embed(question), centroid>; the question is answered from a device copy of
   that episode's cache, so later questions find it unchanged (EpiCache's protocol: each
   question is answered on its own, earlier answers are not kept).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import methods as methods_lib
from kvjax import validation
from kvjax.cache import cache_nbytes, init_cache
from kvjax.cache.kv_cache import EMPTY_POSITION, Cache, FlatLayerCache, LayerCache, host_nbytes
from kvjax.cache.policy import APPEND
from kvjax.errors import GenerationError, MethodError
from kvjax.generation import context as context_lib
from kvjax.generation import conversation, engine, inputs
from kvjax.generation.generate import check_context_length
from kvjax.methods import epicache
from kvjax.methods.kvzip import repeat_suffix
from kvjax.ops import rope
from kvjax.sharding.distributed import host_array

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
KMEANS_ITERATIONS = 300   # sklearn's default max_iter
EMBED_BATCH = 16          # windows embedded per forward pass


# ---------------------------------------------------------------------------- windows and
# embeddings


def split_windows(text: str, window: int) -> list[str]:
  """The text's sentences, `window` per window, in order (the last may hold fewer)."""
  sentences = [s for s in SENTENCE_END.split(text.strip()) if s]
  return [" ".join(sentences[i:i + window]) for i in range(0, len(sentences), window)]


def _pooled_hidden(params, tokens, mask, *, graphdef):
  """[B, D] float32: final hidden states (after the final norm) averaged over each row's
  real tokens. The model's own layers, run as its forward pass runs them, stopping before
  the output head (the forward pass returns logits only)."""
  net = nnx.merge(graphdef, params)
  mask = mask.astype(bool)
  positions = jnp.where(mask, jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, EMPTY_POSITION)
  lengths = mask.sum(axis=1, dtype=jnp.int32)
  cache = init_cache(net.config, tokens.shape[0], tokens.shape[1])
  inv_freq = rope.inverse_frequencies(net.config)
  x = net.embed(tokens)
  for index, block in enumerate(net.layers):
    x, _ = block(x, positions, cache.layers[index], inv_freq, index, APPEND, lengths)
  x = net.final_norm(x).astype(jnp.float32)
  return (x * mask[..., None]).sum(1) / jnp.maximum(lengths, 1)[:, None]


_pooled_hidden_jit = jax.jit(_pooled_hidden, static_argnames=("graphdef",))


def embed(model, texts: list[str]) -> np.ndarray:
  """[N, D] float32: each text's mean-pooled final hidden state, L2-normalised."""
  if model.tokenizer is None:
    raise GenerationError("epicache embeds text with the model's tokenizer; this model has none")
  rows = [model.tokenizer.encode(t, add_special_tokens=False) or [inputs.pad_id(model)]
          for t in texts]
  out = []
  for start in range(0, len(rows), EMBED_BATCH):
    group = rows[start:start + EMBED_BATCH]
    tokens, mask = inputs.left_pad(group, inputs.pad_id(model),
                                   inputs.bucket(max(len(r) for r in group)))
    out.append(host_array(_pooled_hidden_jit(model.params, jnp.asarray(tokens),
                                             jnp.asarray(mask), graphdef=model.graphdef)))
  vectors = np.concatenate(out)
  return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------- clustering


def kmeans(x: np.ndarray, k: int, iterations: int = KMEANS_ITERATIONS
           ) -> tuple[np.ndarray, np.ndarray]:
  """(centroids [k', D], labels [N]) of Lloyd's k-means on x [N, D], k' = min(k, N), started
  at the rows floor(i * N / k'); a cluster left empty keeps its centroid; ties go to the
  lower cluster. Stops when no label changes."""
  x = np.asarray(x, np.float64)
  k = min(k, len(x))
  centroids = x[(np.arange(k) * len(x)) // k].copy()
  labels = None
  for _ in range(iterations):
    distances = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    new = distances.argmin(1)
    if labels is not None and (new == labels).all():
      break
    labels = new
    for c in range(k):
      if (labels == c).any():
        centroids[c] = x[labels == c].mean(0)
  return centroids, labels


def medoid_windows(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, count: int
                   ) -> list[list[int]]:
  """Per cluster, its `count` windows of highest cosine similarity to the centroid (ties to
  the earlier window), in chronological order."""
  x = np.asarray(x, np.float64)
  unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  out = []
  for c, centroid in enumerate(np.asarray(centroids, np.float64)):
    members = np.flatnonzero(labels == c)
    cosine = unit[members] @ (centroid / max(np.linalg.norm(centroid), 1e-12))
    best = members[np.argsort(-cosine, kind="stable")[:count]]
    out.append(sorted(best.tolist()))
  return out


def route(question: np.ndarray, centroids: np.ndarray) -> int:
  """The episode whose centroid has the largest inner product with the (normalised) question
  embedding (the official router; ties to the lower episode)."""
  return int(np.argmax(np.asarray(centroids, np.float64) @ np.asarray(question, np.float64)))


# ---------------------------------------------------------------------------- block prefill


@dataclasses.dataclass
class BlockPrefill:
  logits: jax.Array     # [1, V] next-token logits after the context
  cache: object         # the compressed cache (no free slots)
  peak_slots: int       # most slots per head any layer held (after a block was appended)


@functools.partial(jax.jit, static_argnames=("budgets", "system_tokens", "level"))
def _evict(cache, scores, budgets, system_tokens, level):
  evict = epicache.evicted if level == "uniform" else epicache.evicted_pair
  layers = tuple(evict(layer, s, keep, system_tokens)
                 for layer, s, keep in zip(cache.layers, scores, budgets))
  return cache.replace(layers=layers)


def _pair_capacities(cache, budgets) -> tuple[int, ...]:
  """Host side, after a "pair" eviction: per layer, its fullest head rounded up to a
  multiple of the layer's budget (at most the budget x KV heads one head can keep): few
  shapes, so later blocks' prefills mostly reuse their executables, and memory near what
  the heads hold."""
  fullest = [int(n) for n in jax.device_get(
      [(layer.positions >= 0).sum(-1).max() for layer in cache.layers])]
  return tuple(min(layer.capacity, -(-n // keep) * keep)
               for layer, n, keep in zip(cache.layers, fullest, budgets))


@functools.partial(jax.jit, static_argnames=("capacities",))
def _cut(cache, capacities):
  """Each layer's live slots first (in slot order) and its capacity cut to `capacities`."""
  return cache.replace(layers=tuple(
      layer if n == layer.capacity else layer.live_first(n)
      for layer, n in zip(cache.layers, capacities)))


def _head_wise(layer: LayerCache):
  """A "pair"-level layer whose heads hold different numbers of slots, stored head-wise
  (each head exactly its own slots); a layer with no emptied slot stays dense."""
  real = layer.positions >= 0
  if bool(real.all()):
    return layer
  return FlatLayerCache.from_selection(layer, real, int(real.sum()))


def block_prefill(model, tokens, patched, budgets: tuple[int, ...], block_size: int,
                  system_tokens: int = 0, steps: engine.CompiledSteps = engine.STEPS,
                  level: str = "uniform") -> BlockPrefill:
  """One row's context `tokens` prefilled `block_size` tokens at a time; after each block,
  where a layer holds more than its budget, the `patched` prompt token ids are run over the
  cache (not stored) and every layer keeps its budget of the best-scored slots per KV head
  (level "uniform", `epicache.evicted`) or budget x KV heads over all its heads (level
  "pair", `epicache.evicted_pair`; the finished layer is stored head-wise). Positions below
  system_tokens are never evicted."""
  return next(block_prefill_episodes(model, tokens, [patched], budgets, block_size,
                                     system_tokens, steps, level))


def block_prefill_episodes(model, tokens, patched_prompts, budgets: tuple[int, ...],
                           block_size: int, system_tokens: int = 0,
                           steps: engine.CompiledSteps = engine.STEPS,
                           level: str = "uniform"):
  """`block_prefill` once per patched prompt (one per episode), yielded one by one (a caller
  that moves each away holds one episode's cache on the device). A context within one
  block is prefilled once for all of them: nothing is evicted before it is in, so every
  episode starts from the same cache (a longer context is prefilled per episode, so no
  block is held beside the one being read). Each patched prompt is left-padded to
  `inputs.bucket` of its length (padding is masked by position), so episodes of similar
  lengths share one compiled probe."""
  config = model.config
  validation.integer("block_size", block_size, 1, error=MethodError)
  validation.choice("level", level, epicache.LEVELS, error=MethodError)
  if not len(tokens) or not patched_prompts or not all(len(p) for p in patched_prompts):
    raise GenerationError(f"block_prefill needs a context ({len(tokens)} tokens) and "
                          f"patched prompts (lengths {[len(p) for p in patched_prompts]})")
  if len(budgets) != config.num_layers or min(budgets) <= system_tokens:
    raise MethodError(f"budgets {budgets} must give each of the {config.num_layers} layers "
                      f"more than the {system_tokens} system tokens it never evicts")
  tokens = np.asarray(tokens, np.int32)[None]
  pieces = [tokens[:, start:start + block_size]
            for start in range(0, tokens.shape[1], block_size)]
  read_first = lambda: _append_block(model, init_cache(config, 1, 0), pieces[0], steps)
  shared = read_first() if len(pieces) == 1 else None
  for patched in patched_prompts:
    probe = tuple(jnp.asarray(a) for a in inputs.left_pad([list(patched)],
                                                          inputs.pad_id(model)))
    logits, cache = shared or read_first()
    peak = max(layer.capacity for layer in cache.layers)
    for index, piece in enumerate(pieces):
      if index:
        logits, cache = _append_block(model, cache, piece, steps)
        peak = max(peak, max(layer.capacity for layer in cache.layers))
      if any(layer.capacity > keep for layer, keep in zip(cache.layers, budgets)):
        _, scores = steps.prefill(model, *probe, cache, plan=epicache.PatchedPromptProbe())
        cache = _evict(cache, scores, tuple(budgets), system_tokens, level)
        if level == "pair":
          cache = _cut(cache, _pair_capacities(cache, budgets))
    if level == "pair":
      cache = cache.replace(layers=tuple(_head_wise(layer) for layer in cache.layers))
    yield BlockPrefill(logits=logits, cache=cache, peak_slots=peak)
    del logits, cache   # the caller's to keep: not held while the next episode is read


def _append_block(model, cache, piece, steps):
  """(logits, cache) after the block `piece` [1, T] is prefilled into `cache`."""
  cache = steps.grow(cache, piece.shape[1], model.placement)
  return steps.prefill(model, jnp.asarray(piece), jnp.ones(piece.shape, bool), cache)


# ---------------------------------------------------------------------------- layer
# sensitivity (offline, once per model)

PROFILE_BLOCK, PROFILE_SINKS, PROFILE_OVERLAP, PROFILE_WINDOW = 4096, 128, 0.5, 100


def block_masked_keys(model, tokens, block: int = PROFILE_BLOCK, sinks: int = PROFILE_SINKS,
                      overlap: float = PROFILE_OVERLAP,
                      steps: engine.CompiledSteps = engine.STEPS):
  """(full, masked): each layer's keys [K, N, D] of one row of `tokens` under full causal
  attention, and under the official profile's block mask: a token of block j attends to
  the first `sinks` tokens, its own block causally and the last int(block * overlap) tokens
  of block j - 1. The mask is run block by block: block j is prefilled over a cache holding
  only those sink and overlap slots (as computed when their own block was prefilled), which
  is exactly what one masked forward pass computes for it."""
  config = model.config
  validation.integer("block", block, 1, error=MethodError)
  validation.integer("sinks", sinks, 0, error=MethodError)
  validation.number("overlap", overlap, 0, 1, error=MethodError)
  tokens = np.asarray(tokens, np.int32)[None]
  n = tokens.shape[1]
  _, cache = steps.prefill(model, jnp.asarray(tokens), jnp.ones(tokens.shape, bool),
                           init_cache(config, 1, n))
  full = [host_array(layer.keys[0]) for layer in cache.layers]
  keys = [np.zeros_like(k) for k in full]
  values = [np.zeros(layer.values.shape[1:], k.dtype)
            for layer, k in zip(cache.layers, full)]
  width = int(block * overlap)
  for start in range(0, n, block):
    end = min(start + block, n)
    seen = sorted(set(range(min(sinks, start))) | set(range(max(0, start - width), start)))
    index = np.asarray(seen, np.int32)
    positions = jnp.asarray(np.broadcast_to(index, (1, config.num_kv_heads, len(index))))
    layers = tuple(LayerCache(keys=jnp.asarray(k[None][:, :, index]),
                              values=jnp.asarray(v[None][:, :, index]), positions=positions,
                              end=jnp.int32(len(index))).grow(end - start)
                   for k, v in zip(keys, values))
    view = Cache(layers=layers, lengths=jnp.asarray([start], jnp.int32))
    _, view = steps.prefill(model, jnp.asarray(tokens[:, start:end]),
                            jnp.ones((1, end - start), bool), view)
    for k, v, layer in zip(keys, values, view.layers):
      k[:, start:end] = host_array(layer.keys[0, :, len(index):])
      v[:, start:end] = host_array(layer.values[0, :, len(index):])
  return full, keys


def windowed_key_similarity(full, masked, window: int = PROFILE_WINDOW) -> tuple[float, ...]:
  """Per layer: the cosine of the flattened keys of each `window` consecutive tokens of
  each KV head, full vs masked ([K, N, D] per layer), averaged over heads and windows."""
  out = []
  for a, b in zip(full, masked):
    heads, n, _ = a.shape
    sims = []
    for h in range(heads):
      for start in range(0, n, window):
        x = np.asarray(a[h, start:start + window], np.float64).ravel()
        y = np.asarray(b[h, start:start + window], np.float64).ravel()
        sims.append(float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-8)))
    out.append(float(np.mean(sims)))
  return tuple(out)


def layer_sensitivity(model, tokens, block: int = PROFILE_BLOCK, sinks: int = PROFILE_SINKS,
                      overlap: float = PROFILE_OVERLAP, window: int = PROFILE_WINDOW,
                      steps: engine.CompiledSteps = engine.STEPS) -> tuple[float, ...]:
  """EpiCache's offline layer profile (official data/layer_scores/layer_profile.py; the
  paper profiles one 16K BookSum sample): per layer, how similar its keys stay when the
  context is read block-wise. Pass the result as EpiCache(sensitivity=...)."""
  return windowed_key_similarity(*block_masked_keys(model, tokens, block, sinks, overlap,
                                                    steps), window)


# ---------------------------------------------------------------------------- episodes


HOST, DEVICE = jax.memory.Space.Host, jax.memory.Space.Device


@dataclasses.dataclass
class Episodes:
  prefilled: list                    # per episode: a PrefilledContext (no room), its cache
                                     # in host memory
  centroids: np.ndarray              # [E, D]
  windows: list[str]                 # the context's windows
  members: list[list[int]]           # per episode: its medoid windows (P_e), in order
  budgets: tuple[int, ...]           # kept slots per layer (per KV head)
  peak_slots: int                    # most slots per head held during any block prefill
  chat_template: bool

  @property
  def device_bytes(self) -> int:
    """Device bytes while a question is answered: the largest episode cache."""
    return max(p.context_cache_bytes for p in self.prefilled)

  @property
  def host_bytes(self) -> int:
    """Bytes of every episode's cache waiting in host memory."""
    return sum(p.context_cache_host_bytes for p in self.prefilled)


def system_prefix_tokens(model, context_ids: list[int], chat_template: bool) -> int:
  """How many leading tokens of an encoded context are the chat template's prefix (system
  prompt and user header): never evicted. 0 without a template."""
  if not chat_template:
    return 0
  before, _ = inputs.render_chat(model.tokenizer, "x")
  prefix = model.tokenizer.encode(before[:-1], add_special_tokens=False)
  n = 0
  while n < min(len(prefix), len(context_ids)) and prefix[n] == context_ids[n]:
    n += 1
  return n


def patched_prompt(tokenizer, text: str) -> list[int]:
  """[instruction + the template's opening of the assistant turn + P_e] token ids."""
  return (tokenizer.encode(epicache.INSTRUCTION, add_special_tokens=False)
          + repeat_suffix(tokenizer) + tokenizer.encode(text, add_special_tokens=False))


def prefill_episodes(model, context: str, method="epicache", compression_ratio=None,
                     budget=None, chat_template: bool | None = None,
                     steps: engine.CompiledSteps = engine.STEPS) -> Episodes:
  """EpiCache over one context: its windows clustered into episodes, and one compressed
  cache per episode (block-wise prefill scored by the episode's patched prompt).

  method: "epicache" (optionally with ':name=value' hyperparameters) or an EpiCache.
  compression_ratio / budget: as for generate (one of them; budget = slots per layer and KV
  head, which every episode's cache keeps).
  """
  method = methods_lib.get(method)
  if not isinstance(method, epicache.EpiCache):
    raise MethodError(f"prefill_episodes runs epicache; got {method.label!r}")
  if model.tokenizer is None:
    raise GenerationError("epicache needs a model with a tokenizer (windows and questions "
                          "are text)")
  validation.text("context", context, error=GenerationError)
  chat = inputs.use_chat_template(model, chat_template)
  ids = inputs.encode(model, [context], ["?"], chat).prompts[0]
  keep = methods_lib.validate_compression(method, [len(ids)], compression_ratio, budget)
  budgets = context_lib.layer_budgets(model, method, keep, len(ids))
  system = system_prefix_tokens(model, ids, chat)
  if min(budgets) <= system:
    raise MethodError(f"the budget ({min(budgets)} slots in the smallest layer) must exceed "
                      f"the {system} chat-template prefix tokens that epicache never evicts")
  windows = split_windows(context, method.window)
  if not windows:
    raise GenerationError("the context has no sentences to cluster into episodes")
  vectors = embed(model, windows)
  centroids, labels = kmeans(vectors, method.episodes)
  members = medoid_windows(vectors, labels, centroids, method.medoids)
  patched = [patched_prompt(model.tokenizer, "\n".join(windows[i] for i in chosen))
             for chosen in members]
  prefilled, peak = [], 0
  for done in block_prefill_episodes(model, ids, patched, budgets, method.block_size, system,
                                     steps, method.level):
    peak = max(peak, done.peak_slots)
    measured = cache_nbytes(done.cache)
    offloaded = jax.device_put(done.cache, HOST)
    logits = done.logits
    del done   # not held on the device while the next episode is prefilled
    prefilled.append(context_lib.PrefilledContext(
        logits=logits, cache=offloaded, context_cache_bytes=measured,
        context_cache_allocated_bytes=measured, decode_plan=None, budgets=budgets,
        context_cache_host_bytes=host_nbytes(offloaded)))
  return Episodes(prefilled=prefilled, centroids=centroids, windows=windows, members=members,
                  budgets=budgets, peak_slots=peak, chat_template=chat)


@dataclasses.dataclass
class Answer:
  text: str
  episode: int          # the episode whose cache answered
  token_ids: list[int]


def answer(model, episodes: Episodes, question: str, max_new_tokens: int = 64,
           steps: engine.CompiledSteps = engine.STEPS) -> Answer:
  """Greedy answer to `question` from the cache of its nearest episode, copied from host
  memory to the device (so the episode's cache serves later questions unchanged)."""
  validation.text("question", question, error=GenerationError)
  episode = route(embed(model, [question])[0], episodes.centroids)
  question_ids = inputs.encode(model, ["x"], [question], episodes.chat_template).questions[0]
  turns = [[question_ids]]
  room = conversation.turn_room(turns, max_new_tokens)
  prefilled = episodes.prefilled[episode]
  prefilled = dataclasses.replace(prefilled, cache=jax.device_put(prefilled.cache, DEVICE))
  check_context_length(model, int(prefilled.cache.lengths[0]) + room,
                       f"the context and question ({len(question_ids)} tokens)")
  out = conversation.run_turns(model, prefilled, turns, max_new_tokens, room, steps=steps)
  return Answer(text=out["answers"][0][0], episode=episode, token_ids=out["token_ids"][0][0])
