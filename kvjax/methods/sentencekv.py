"""SentenceKV: sentence-level semantic KV caching (Zhu et al., 2025, arXiv 2504.00970;
official code zzbright1998/SentenceKV, `models/sentencekv/custom_llama_sentencekv.py`
`LlamaFlashAttention2.forward`, `_parallel_sentence_mean_k`, `_batch_similarity_computation`;
defaults from `LongBench/run_longbench.py`).

A Quest-like retrieval whose pages are the context's sentences. With a budget of B tokens
per layer and KV head:

Prefill. A SnapKV pre-filter (the last `window` (32) queries' attention summed over the
window's rows, the window's own keys left out, max-pooled with `kernel_size` (7)) stores
int(`semantic_factor` (3) x B) tokens, the window included (the official
`k_value = semantic_budget - window_size`). The context is cut into sentences after every
token whose id is a sentence end (`PUNCTUATION`, found in the tokenizer, or `boundary_ids`);
a token's sentence is the number of ends before it in the whole context, so an evicted
full stop still ends its sentence. Per KV head and sentence the cache keeps, on the device,
the mean post-RoPE key of the sentence's stored tokens, the first slot of its run (stored
tokens are kept in position order, so each sentence is one run of slots) and its length.
The stored tokens' keys and values live in host memory (`offload`, the default), so the
device holds per stored slot only its position (4 bytes) plus the sentence table.

Decode. Each step the query is compared (dot product, post-RoPE, unscaled) with every
sentence mean; sentences are taken in order of similarity and their stored tokens inside
slots [start_budget, n - recent_budget) (n: the row's stored tokens) gathered, sentence
after sentence, until B - start_budget - recent_budget tokens (the last sentence cut
there). Attention reads the first `start_budget` (32) slots, the last `recent_budget` (32)
stored slots, the gathered tokens and every token appended after the context; only those
are copied from host memory (sinks and tail as one slice each, gathered tokens one slot at
a time: `kvjax.cache.paged.read_blocks`). While the partial sentence holds at most
`length_threshold` (1) tokens the step attends to every stored token, as the official code.
GQA: `gqa="mean"` compares the mean of a KV head's query heads (the mean of their
similarities), "max" the largest of their similarities; each KV head gathers one token set.

Differences from the official code:
- Storage and selection are per KV head (the official code runs `repeat_kv` first and
  selects per query head); SnapKV's pooled votes are reduced over the group by `gqa` too.
- Decode cannot see generated token ids, and a layer cache sees a step's query only in
  `attend` (which cannot update the cache), so: the partial sentence is the run of
  single-token steps since the context (or a question) was appended, never closed by a
  generated full stop; the similarity uses the step's own query, not the mean query of
  the partial sentence; generated sentences are never added to the index: every token
  appended after the context (questions, generated tokens; on the device) is attended at
  every step instead, so a step reads B + generated tokens, where the official recent
  window slides into the generated text.
- The gathered interval is [start_budget, n - recent_budget) (the official test
  `start_budget < index` also skips slot start_budget) and the recent window is the
  context's last stored tokens, not the last of context + generated.
- Similarity ties go to the earlier sentence (torch.sort is not stable on GPU); sentence
  token lists are not truncated (the official index keeps at most
  max(100, 2 x mean length + 50) tokens per sentence); means are float32.
- Sentence ends are found by encoding each punctuation string and keeping those that are
  one token (the official `convert_tokens_to_ids` misses '\\n\\n' and '. ' on byte-level
  BPE tokenizers, whose tokens spell spaces and newlines differently).
- A budget that covers a layer's stored tokens keeps it dense (the full cache's reads);
  start/recent budgets shrink to leave one gathered token under a small budget.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache.kv_cache import (EMPTY_POSITION, LayerCache, NewTokens, PerHeadSlots, Stats,
                                  host_nbytes)
from kvjax.cache.paged import DEVICE, HOST, read_blocks
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.methods.window import window_votes
from kvjax.ops import attention as attention_ops

# The official LongBench script's sentence ends.
PUNCTUATION = (".", "!", "?", ". ", "! ", "? ", "...", "\n\n", "\n\n\n", "。", "！", "？", "。。")
GQA_MODES = ("mean", "max")


def punctuation_ids(tokenizer) -> tuple[int, ...]:
  """The ids of the `PUNCTUATION` strings that the tokenizer encodes as one token."""
  ids = set()
  for text in PUNCTUATION:
    encoded = tokenizer.encode(text, add_special_tokens=False)
    if len(encoded) == 1:
      ids.add(int(encoded[0]))
  return tuple(sorted(ids))


def sentence_ids(tokens: np.ndarray, mask: np.ndarray, ends) -> np.ndarray:
  """[B, T] int32: the sentence of each position (index = position, not column) of the
  left-padded rows `tokens` / `mask`: the number of sentence-end tokens before it."""
  out = np.zeros(tokens.shape, np.int32)
  for row in range(tokens.shape[0]):
    ids = np.asarray(tokens[row])[np.asarray(mask[row], bool)]
    is_end = np.isin(ids, np.asarray(ends, np.int64)).astype(np.int32)
    sentence = np.cumsum(is_end) - is_end
    out[row, :len(sentence)] = sentence
    out[row, len(sentence):] = sentence[-1] if len(sentence) else 0
  return out


def sentence_runs(positions: jax.Array, sentence: jax.Array) -> jax.Array:
  """[B, K, S] int32: each stored slot's sentence run (0, 1, ... per head; -1 for empty
  slots), for slots in position order with the real ones first."""
  real = positions >= 0
  before = jnp.concatenate([jnp.full(sentence.shape[:2] + (1,), -1, sentence.dtype),
                            sentence[..., :-1]], axis=-1)
  run = jnp.cumsum(real & (sentence != before), axis=-1, dtype=jnp.int32) - 1
  return jnp.where(real, run, -1)


def sentence_table(keys: jax.Array, runs: jax.Array, count: int):
  """(means [B, K, N, D] float32, starts [B, K, N], lengths [B, K, N] int32) of the `count`
  runs: the mean key of each run's slots, its first slot and its slot count (a head with
  fewer runs has empty ones: start S, length 0)."""
  b, k, s, _ = keys.shape
  index = jnp.where(runs >= 0, runs, count)   # empty slots fall outside and are dropped
  rows, heads = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  at = lambda a: a.at[rows, heads, index]
  sums = at(jnp.zeros((b, k, count, keys.shape[-1]), jnp.float32)).add(
      keys.astype(jnp.float32), mode="drop")
  lengths = at(jnp.zeros((b, k, count), jnp.int32)).add(1, mode="drop")
  slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), runs.shape)
  starts = at(jnp.full((b, k, count), s, jnp.int32)).min(slots, mode="drop")
  return sums / jnp.maximum(lengths, 1)[..., None], starts, lengths


def _take(a: jax.Array, index: jax.Array) -> jax.Array:
  return jnp.take_along_axis(a, index, axis=-1)


def gathered_slots(queries, means, starts, lengths, low, high, need: int, gqa: str):
  """(slots, valid) [B, K, need]: the stored slots a decode query gathers. Sentences, most
  similar first (sum_d q_d mean_d, reduced over each KV head's query heads by `gqa`; ties
  to the earlier sentence), give their slots inside [low, high) ([B] each) in slot order,
  until `need` are taken; `valid` is False past the last one."""
  k, count = means.shape[1], means.shape[2]
  q = attention_ops.group_heads(queries, k)[:, :, :, 0].astype(jnp.float32)   # [B, K, G, D]
  sims = jnp.einsum("bkgd,bknd->bkgn", q, means, precision=jax.lax.Precision.HIGHEST)
  sims = sims.mean(2) if gqa == "mean" else sims.max(2)
  first = jnp.maximum(starts, low[:, None, None])
  inside = jnp.maximum(jnp.minimum(starts + lengths, high[:, None, None]) - first, 0)
  order = jnp.argsort(jnp.where(inside > 0, -sims, jnp.inf), axis=-1, stable=True)
  sizes = _take(inside, order)
  ends = jnp.cumsum(sizes, axis=-1)
  j = jnp.arange(need, dtype=jnp.int32)
  rank = jax.vmap(jax.vmap(lambda e: jnp.searchsorted(e, j, side="right")))(ends)
  rank = jnp.minimum(rank, count - 1)
  slot = _take(_take(first, order), rank) + j - _take(ends - sizes, rank)
  valid = j < ends[..., -1:]
  return jnp.where(valid, slot, 0), valid


def _empty_like(dense: LayerCache) -> LayerCache:
  b, k, _, d = dense.keys.shape
  return LayerCache(keys=jnp.zeros((b, k, 0, d), dense.keys.dtype),
                    values=jnp.zeros((b, k, 0, dense.values.shape[-1]), dense.values.dtype),
                    positions=jnp.zeros((b, k, 0), jnp.int32), end=jnp.int32(0))


@struct.dataclass
class SentenceLayerCache(PerHeadSlots):
  """The stored context with its sentence table, plus the tokens appended after it.

  Before `finalized` (during prefill) the context's state holds each slot's sentence id and
  the table is empty."""
  context: LayerCache          # stored context tokens in position order; K/V on the host
  means: jax.Array             # [B, K, N, D] float32 mean key of each sentence's stored tokens
  starts: jax.Array            # [B, K, N] int32 its first slot
  lengths: jax.Array           # [B, K, N] int32 its stored tokens (0: no sentence)
  appended: LayerCache         # questions and generated tokens, on the device
  run: jax.Array               # int32: single-token steps since the last longer append
  budget: int = struct.field(pytree_node=False, default=1)
  start_budget: int = struct.field(pytree_node=False, default=32)
  recent_budget: int = struct.field(pytree_node=False, default=32)
  length_threshold: int = struct.field(pytree_node=False, default=1)
  gqa: str = struct.field(pytree_node=False, default="mean")
  offloaded: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def prefilled(cls, dense: LayerCache, budget: int, method: "SentenceKV"):
    """A prefill chunk's stored tokens (state: sentence ids), the table not built yet."""
    b, k, _, d = dense.keys.shape
    return cls(context=dense, means=jnp.zeros((b, k, 0, d), jnp.float32),
               starts=jnp.zeros((b, k, 0), jnp.int32), lengths=jnp.zeros((b, k, 0), jnp.int32),
               appended=_empty_like(dense), run=jnp.int32(0), budget=budget,
               start_budget=method.start_budget, recent_budget=method.recent_budget,
               length_threshold=method.length_threshold, gqa=method.gqa)

  def finalized(self, offload: bool):
    """Host side: the padding cut, the sentence table built, K/V offloaded; a layer whose
    budget covers its stored tokens stays a dense LayerCache."""
    # Each head's real slots first: the slot ranges below count from slot 0.
    dense = self.context.trimmed()
    if self.budget >= dense.capacity:
      return dense.replace(state=None)
    runs = sentence_runs(dense.positions, dense.state)
    means, starts, lengths = sentence_table(dense.keys, runs, max(int(runs.max()) + 1, 1))
    dense = dense.replace(state=None)
    if offload:
      dense = dense.replace(keys=jax.device_put(dense.keys, HOST),
                            values=jax.device_put(dense.values, HOST))
    return self.replace(context=dense, means=means, starts=starts, lengths=lengths,
                        appended=_empty_like(dense), run=jnp.int32(0), offloaded=offload)

  @property
  def state(self):
    return None

  @property
  def capacity(self) -> int:
    return self.context.capacity + self.appended.capacity

  @property
  def positions(self) -> jax.Array:
    return self.slot_positions()

  def slot_positions(self) -> jax.Array:
    return jnp.concatenate([self.context.positions, self.appended.positions], axis=-1)

  def free_slots(self) -> int:
    return self.appended.free_slots()

  def logical_axes(self) -> dict:
    sentence = ("batch", "kv_heads", "sentences")
    return {"context": self.context.logical_axes(), "means": sentence + ("head_dim",),
            "starts": sentence, "lengths": sentence, "appended": self.appended.logical_axes(),
            "run": ()}

  def on_device(self) -> LayerCache:
    """Context and appended tokens as one dense layer on the device (a copy when
    offloaded)."""
    ctx, new = self.context, self.appended
    move = (lambda a: jax.device_put(a, DEVICE)) if self.offloaded else (lambda a: a)
    cat = lambda a, b: jnp.concatenate([move(a), b.astype(a.dtype)], axis=2)
    return LayerCache(keys=cat(ctx.keys, new.keys), values=cat(ctx.values, new.values),
                      positions=cat(ctx.positions, new.positions),
                      end=jnp.int32(ctx.capacity) + new.end)

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    if queries.shape[1] != 1 or pending is not None or want:
      return self.on_device().attend(queries, query_positions, pending, want)
    dense = lambda: self.on_device().attend(queries, query_positions)[0]
    sparse = lambda: self.decode(queries, query_positions)
    return jax.lax.cond(self.run <= self.length_threshold, dense, sparse), Stats()

  def selected_slots(self, queries):
    """(slots, valid) [B, K, budget]: the stored slots a decode query reads: the first
    start_budget, the last recent_budget stored (those not among the first) and the
    gathered sentences' (`gathered_slots`)."""
    ctx = self.context
    b, k, s = ctx.positions.shape
    stored = (ctx.positions[:, 0] >= 0).sum(-1).astype(jnp.int32)             # [B]
    tail = jnp.clip(stored - self.recent_budget, 0, s - self.recent_budget)    # [B]
    need = self.budget - self.start_budget - self.recent_budget
    gathered, valid = gathered_slots(queries, self.means, self.starts, self.lengths,
                                     jnp.full((b,), self.start_budget, jnp.int32),
                                     stored - self.recent_budget, need, self.gqa)
    recent = tail[:, None] + jnp.arange(self.recent_budget, dtype=jnp.int32)   # [B, R]
    slots = jnp.concatenate([
        jnp.broadcast_to(jnp.arange(self.start_budget, dtype=jnp.int32),
                         (b, k, self.start_budget)),
        jnp.broadcast_to(recent[:, None], (b, k, self.recent_budget)), gathered], axis=-1)
    valid = jnp.concatenate([jnp.ones((b, k, self.start_budget), bool),
                             jnp.broadcast_to(recent[:, None] >= self.start_budget,
                                              (b, k, self.recent_budget)), valid], axis=-1)
    return slots, valid

  def _read(self, array, slots):
    """Keys or values of the selected slots, on the device."""
    if not self.offloaded:
      return jnp.take_along_axis(array, slots[..., None], axis=2)
    sinks, recent = self.start_budget, self.recent_budget
    parts = [read_blocks(array, slots[..., :1], sinks) if sinks else None,
             read_blocks(array, slots[..., sinks:sinks + 1], recent) if recent else None,
             read_blocks(array, slots[..., sinks + recent:], 1)]
    return jnp.concatenate([p for p in parts if p is not None], axis=2)

  def decode(self, queries, query_positions):
    """One new token per row over the selected stored slots and every appended token."""
    slots, valid = self.selected_slots(queries)
    ctx, new = self.context, self.appended
    positions = jnp.where(valid, jnp.take_along_axis(ctx.positions, slots, axis=2),
                          EMPTY_POSITION)
    cat = lambda a, b: jnp.concatenate([a, b.astype(a.dtype)], axis=2)
    out, _ = attention_ops.decode(queries, cat(self._read(ctx.keys, slots), new.keys),
                                  cat(self._read(ctx.values, slots), new.values),
                                  query_positions, cat(positions, new.positions))
    return out

  def append(self, new: NewTokens) -> "SentenceLayerCache":
    """Stores the tokens after the context; a decode token extends the partial sentence,
    a longer chunk (a question) starts a new one."""
    run = self.run + 1 if new.keys.shape[2] == 1 else jnp.int32(0)
    return self.replace(appended=self.appended.append(new), run=run)

  def candidates(self, new: NewTokens) -> LayerCache:
    """Dense candidates for the next prefill chunk (stored again by the method)."""
    return self.on_device().candidates(new)

  def select(self, index):
    raise NotImplementedError("a sentence cache is compacted through its dense candidates")

  def trimmed(self) -> "SentenceLayerCache":
    return self

  def grow(self, room: int) -> "SentenceLayerCache":
    return self if room == 0 else self.replace(appended=self.appended.grow(room))


@registry.register
@dataclasses.dataclass(frozen=True)
class SentenceKV(base.Method):
  """Sentence-level retrieval at decode over a SnapKV-filtered context (see the module
  docstring for the algorithm and every difference from the official code)."""
  name: ClassVar[str] = "sentencekv"
  family: ClassVar[str] = "paging"
  reads_context: ClassVar[bool] = True
  wrappable: ClassVar[bool] = False
  semantic_factor: float = 3.0
  window: int = 32
  kernel_size: int = 7
  pooling: str = "max"
  start_budget: int = 32
  recent_budget: int = 32
  length_threshold: int = 1
  gqa: str = "mean"
  boundary_ids: tuple = ()
  offload: bool = True

  def __post_init__(self):
    base.check_number("semantic_factor", self.semantic_factor, 1,
                      what="stored tokens per budget token")
    base.check_int("window", self.window, 1)
    base.check_int("kernel_size", self.kernel_size, 1)
    if self.kernel_size % 2 == 0:
      raise MethodError(f"kernel_size={self.kernel_size} must be odd (centred pooling)")
    base.check_choice("pooling", self.pooling, ("max", "avg"))
    base.check_int("start_budget", self.start_budget, 0)
    base.check_int("recent_budget", self.recent_budget, 0)
    base.check_int("length_threshold", self.length_threshold, 0)
    base.check_choice("gqa", self.gqa, GQA_MODES)
    if not isinstance(self.boundary_ids, tuple):
      raise MethodError(f"boundary_ids={self.boundary_ids!r} must be a tuple of token ids")
    for i, token in enumerate(self.boundary_ids):
      base.check_int(f"boundary_ids[{i}]", token, 0)

  def stored(self, keep: int) -> int:
    """Tokens stored per KV head for a budget of `keep` (the window included)."""
    return int(self.semantic_factor * keep)

  def protected_tokens(self, keep):
    del keep
    return self.start_budget + self.recent_budget

  def fitted(self, keep):
    """Under a small budget the sinks and recent window shrink to leave one gathered token,
    and the pre-filter's window to leave one stored token to the votes."""
    shrunk = base.shrink_protection(keep, start_budget=(self.start_budget, 0),
                                    recent_budget=(self.recent_budget, 0))
    shrunk.update(base.shrink_protection(self.stored(keep), window=(self.window, 1)))
    return dataclasses.replace(self, **shrunk) if shrunk else self

  def boundaries(self, tokenizer) -> tuple[int, ...]:
    if self.boundary_ids:
      return self.boundary_ids
    if tokenizer is None:
      raise MethodError("sentencekv cuts sentences at the tokenizer's punctuation ids, and "
                        "this model has no tokenizer; pass boundary_ids=(id, ...)")
    ids = punctuation_ids(tokenizer)
    if not ids:
      raise MethodError(f"sentencekv: none of {list(PUNCTUATION)} is a single token of this "
                        f"tokenizer; pass boundary_ids=(id, ...)")
    return ids

  def context_params(self, tokenizer, tokens, mask):
    return {"sentence": sentence_ids(np.asarray(tokens), np.asarray(mask),
                                     self.boundaries(tokenizer))}

  def score(self, x):
    return window_votes(x, self.window, self.kernel_size, self.pooling, self.gqa)

  def protected(self, key_positions, lengths, keep):
    return base.window_mask(key_positions, lengths, self.window)

  def prefill_state(self, x):
    """[B, K, S] each candidate's sentence id (-1 for empty slots)."""
    if x.params is None or "sentence" not in x.params:
      raise MethodError("sentencekv needs the context's sentence ids (context_params); "
                        "prefill through kvjax.generate, kvjax.score or context.prefill")
    sentence = x.params["sentence"]
    pos = x.key_positions
    index = jnp.clip(pos, 0, sentence.shape[1] - 1).reshape(pos.shape[0], -1)
    ids = jnp.take_along_axis(sentence, index, axis=1).reshape(pos.shape)
    return jnp.where(pos >= 0, ids, -1)

  def compact(self, cand, x, keep):
    """The pre-filter's stored tokens (with their sentence ids), the budget kept static."""
    dense = base.Method.compact(self, cand, x, self.stored(keep))
    return SentenceLayerCache.prefilled(dense, keep, self)

  def finalize(self, cache, config=None):
    del config
    return cache.replace(layers=tuple(
        layer.finalized(self.offload) if isinstance(layer, SentenceLayerCache)
        else layer.trimmed() for layer in cache.layers))

  def kept_budgets(self, cache, budgets):
    del budgets
    return tuple(int((layer.slot_positions() >= 0).sum(-1).max()) for layer in cache.layers)

  def cache_stats(self, cache) -> dict:
    layers = [layer for layer in cache.layers if isinstance(layer, SentenceLayerCache)]
    if not layers:
      return {}
    return {"tokens_read_per_step": layers[0].budget,
            "stored_tokens": [int(layer.context.capacity) for layer in layers],
            "sentences": [int(layer.means.shape[2]) for layer in layers],
            "dense_layers": len(cache.layers) - len(layers),
            "host_bytes": host_nbytes(cache)}
