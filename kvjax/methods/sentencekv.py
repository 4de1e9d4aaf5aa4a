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

Decode. The cache reads a sequence: the stored context tokens, then every token appended
after them (a question, generated tokens; on the device). Appended text is cut into
sentences as it arrives, from the token ids the model's forward pass gives each append: a
decode token joins the open sentence and closes it when it is a sentence end (the full
stop's key counted in the sentence's mean); a longer chunk (a question) closes the open
sentence, then each of its own sentences, the last at its end. A closed sentence's mean
key joins the index (`appended_means`, float32, with its first slot and length), kept
beside the context's. Each step compares the mean of the open sentence's queries (its
decode steps', the current one included, post-RoPE; `attend` keeps their float32 sum in
the layer it returns as `Stats.layer`) with every indexed sentence mean (dot product,
unscaled); sentences are taken in
order of similarity (the context's first on ties, then the appended in order) and their
tokens inside [start_budget, n - recent_budget) of the sequence gathered, sentence after
sentence, until B - start_budget - recent_budget tokens (the last sentence cut there).
Attention reads the first `start_budget` (32) tokens of the sequence, its last
`recent_budget` (32), which slide from the context into the appended text as it grows,
and the gathered tokens; only the context's are copied from host memory (sinks and the
context's part of the tail as one slice each, gathered tokens one slot at a time:
`kvjax.cache.paged.read_blocks`). While a row's open sentence holds at most
`length_threshold` (1) tokens, its step attends to every stored and appended token, as
the official code (a sentence end's own step, whose sentence has just closed, and the
step after it or after a question).
GQA: `gqa="mean"` compares the mean of a KV head's query heads (the mean of their
similarities), "max" the largest of their similarities; each KV head gathers one token set.

Differences from the official code:
- Storage and selection are per KV head (the official code runs `repeat_kv` first and
  selects per query head); SnapKV's pooled votes are reduced over the group by `gqa` too.
- In query-agnostic use the question is appended after compression: its sentences are
  indexed like generated ones (the official code compresses prompt and question together).
  A one-token question cannot be told from a decode step: it opens the first generated
  sentence instead of closing as its own.
- In a batch, a step where some rows attend densely (their open sentence is short) and
  others sparsely computes both for every row and keeps each row's own: such steps copy
  the whole stored context from host memory, as a step where every row is dense does.
- Appended tokens stay on the device (the official code moves them to the CPU cache); the
  device holds them plus a float32 mean key per closed sentence. Padding inside an appended
  chunk counts as sequence slots (it is never read).
- The gathered interval is [start_budget, n - recent_budget) (the official test
  `start_budget < index` also skips slot start_budget).
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
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.cache.kv_cache import (EMPTY_POSITION, LayerCache, NewTokens, PerHeadSlots, Stats,
                                  cache_nbytes, host_nbytes, shape_padding, shared_size)
from kvjax.cache.paged import DEVICE, HOST, read_blocks
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.methods.window import window_votes
from kvjax.ops import attention as attention_ops
from kvjax.ops.host import host_array

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


def gathered_slots(queries, means, starts, lengths, low, high, need: int, gqa: str,
                   limit=None):
  """(slots, valid) [B, K, need]: the stored slots a decode query gathers. Sentences, most
  similar first (sum_d q_d mean_d, reduced over each KV head's query heads by `gqa`; ties
  to the earlier sentence), give their slots inside [low, high) ([B] each) in slot order,
  until `need` (or the traced `limit` <= need, when given) are taken; `valid` is False
  past the last one."""
  k, count = means.shape[1], means.shape[2]
  q = attention_ops.group_heads(queries, k)[:, :, :, 0].astype(jnp.float32)   # [B, K, G, D]
  sims = jnp.einsum("bkgd,bknd->bkgn", q, means, precision=jax.lax.Precision.HIGHEST)
  sims = sims.mean(2) if gqa == "mean" else sims.max(2)
  first = jnp.maximum(starts, low[:, None, None])
  inside = jnp.maximum(jnp.minimum(starts + lengths, high[:, None, None]) - first, 0)
  # Most similar first, ties to the earlier sentence: top_k orders equal values by index,
  # as a stable argsort would, in 0.6x its time on XLA:CPU.
  order = jax.lax.top_k(jnp.where(inside > 0, sims, -jnp.inf), sims.shape[-1])[1]
  sizes = _take(inside, order)
  ends = jnp.cumsum(sizes, axis=-1)
  j = jnp.arange(need, dtype=jnp.int32)
  rank = jax.vmap(jax.vmap(lambda e: jnp.searchsorted(e, j, side="right")))(ends)
  rank = jnp.minimum(rank, count - 1)
  slot = _take(_take(first, order), rank) + j - _take(ends - sizes, rank)
  valid = j < ends[..., -1:]
  if limit is not None:
    valid &= j < limit
  return jnp.where(valid, slot, 0), valid


def _sentences(layer) -> int:
  """The most sentences any row and head of the layer's context holds (at least 1)."""
  return max(int((host_array(layer.lengths) > 0).sum(-1).max()), 1)


@jax.jit
def _runs(positions, sentence):
  """(`sentence_runs`, the largest run index)."""
  runs = sentence_runs(positions, sentence)
  return runs, runs.max()


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _tables(dense: LayerCache, runs, count: int, reserve: int, query_heads: int) -> dict:
  """A finalized layer's context (`reserve` reserved slots more, no state), its sentence
  table of `count` entries and empty appended tables, compiled once per shape (as eager
  ops, each compiled anew at every new prompt length, they cost more than the work)."""
  means, starts, lengths = sentence_table(dense.keys, runs, count)
  context = dense.replace(state=None).reserve(reserve)
  return dict(context=context, means=means, starts=starts, lengths=lengths,
              **_empty_tables(context, query_heads))


def _empty_like(dense: LayerCache) -> LayerCache:
  b, k, _, d = dense.keys.shape
  return LayerCache(keys=jnp.zeros((b, k, 0, d), dense.keys.dtype),
                    values=jnp.zeros((b, k, 0, dense.values.shape[-1]), dense.values.dtype),
                    positions=jnp.zeros((b, k, 0), jnp.int32), end=jnp.int32(0))


@struct.dataclass
class SentenceLayerCache(PerHeadSlots):
  """The stored context with its sentence table, plus the tokens appended after it with a
  table of their closed sentences.

  Before `finalized` (during prefill) the context's state holds each slot's sentence id and
  the tables are empty. Decode reads a sequence: the context's stored slots, then the
  appended slots; a selected slot is "virtual": a context slot i is i, appended slot a is
  C + a (C: the context's capacity)."""
  context: LayerCache          # stored context tokens in position order; K/V on the host
  means: jax.Array             # [B, K, N, D] float32 mean key of each sentence's stored tokens
  starts: jax.Array            # [B, K, N] int32 its first slot
  lengths: jax.Array           # [B, K, N] int32 its stored tokens (0: no sentence)
  appended: LayerCache         # questions and generated tokens, on the device
  appended_means: jax.Array    # [B, K, G, D] float32 mean key of each closed appended sentence
  appended_starts: jax.Array   # [B, G] int32 its first appended slot
  appended_lengths: jax.Array  # [B, G] int32 its tokens (0: none yet)
  closed: jax.Array            # [B] int32 appended sentences closed so far
  open_sum: jax.Array          # [B, K, D] float32 key sum of the open (partial) sentence
  open_count: jax.Array        # [B] int32 its tokens
  open_from: jax.Array         # [B] int32 its first appended slot
  open_queries: jax.Array      # [B, H, D] float32 query sum of its decode steps
  boundaries: jax.Array        # [B, E] int32 the sentence-end token ids (each row's copy)
  reads: jax.Array             # [] int32 slots a sparse step reads: the budget
  # The slots a sparse step is compiled for: `reads` rounded up by `shared_size` once
  # finalized, so that budgets of other prompt lengths share a compiled decode loop.
  budget: int = struct.field(pytree_node=False, default=1)
  start_budget: int = struct.field(pytree_node=False, default=32)
  recent_budget: int = struct.field(pytree_node=False, default=32)
  length_threshold: int = struct.field(pytree_node=False, default=1)
  gqa: str = struct.field(pytree_node=False, default="mean")
  offloaded: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def prefilled(cls, dense: LayerCache, budget: int, method: "SentenceKV", boundaries,
                query_heads: int, reads=None):
    """A prefill chunk's stored tokens (state: sentence ids), the tables not built yet;
    `reads`: the budget, when traced (a ranked prefill: `budget` is then the largest)."""
    b, k, _, d = dense.keys.shape
    reads = jnp.int32(budget) if reads is None else reads
    return cls(context=dense, means=jnp.zeros((b, k, 0, d), jnp.float32),
               starts=jnp.zeros((b, k, 0), jnp.int32), lengths=jnp.zeros((b, k, 0), jnp.int32),
               **_empty_tables(dense, query_heads), reads=reads, budget=budget,
               boundaries=jnp.broadcast_to(jnp.asarray(boundaries, jnp.int32).reshape(-1),
                                           (b, np.size(boundaries))),
               start_budget=method.start_budget, recent_budget=method.recent_budget,
               length_threshold=method.length_threshold, gqa=method.gqa)

  def finalized(self, offload: bool):
    """Host side: the padding cut, the sentence table built, K/V offloaded; a layer whose
    budget covers its stored tokens stays a dense LayerCache.

    Stored slots, sentences and the budget are rounded up by `shared_size` (reserved
    slots, empty sentences, gathered slots never valid): their counts follow the prompt's
    length, and each new count compiled the decode loop anew (SmolLM2, ratio 0.5, a new
    length after 520 tokens: 43.7-45.4 s, 20.6-22.0 s of it that compile; 17.0-17.6 s
    rounded)."""
    # Each head's real slots first: the slot ranges below count from slot 0.
    dense = self.context.trimmed()
    if self.budget >= dense.capacity:
      return dense.replace(state=None)
    runs, most = _runs(dense.positions, dense.state)
    # Rounded up (`shared_size`), the rest empty sentences (length 0, never gathered):
    # sentence counts are data dependent, and each new one compiled the table's ops and
    # the decode loop anew (SmolLM2, 500 tokens: a second prompt took 53 s, 2.6 s after).
    count = shared_size(max(int(most) + 1, 1))
    table = _tables(dense, runs, count, shared_size(dense.capacity) - dense.capacity,
                    self.open_queries.shape[1])
    dense = table.pop("context")
    if offload:
      dense = dense.replace(keys=jax.device_put(dense.keys, HOST),
                            values=jax.device_put(dense.values, HOST))
    return self.replace(context=dense, **table, budget=shared_size(self.budget),
                        offloaded=offload)

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
    rows = ("batch",)
    return {"context": self.context.logical_axes(), "means": sentence + ("head_dim",),
            "starts": sentence, "lengths": sentence, "appended": self.appended.logical_axes(),
            "appended_means": sentence + ("head_dim",), "appended_starts": rows + ("sentences",),
            "appended_lengths": rows + ("sentences",), "closed": rows,
            "open_sum": ("batch", "kv_heads", "head_dim"), "open_count": rows,
            "open_from": rows, "open_queries": ("batch", "heads", "head_dim"),
            "boundaries": ("batch", "boundaries"), "reads": ()}

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
    """A decode step (one query per row, its token appended) also adds its query to the
    open sentence's sum: the layer returned as `Stats.layer` holds it."""
    if queries.shape[1] != 1 or pending is not None:
      return self.on_device().attend(queries, query_positions, pending, want)
    stepped = self.observed(queries, query_positions)
    if want:
      out, stats = self.on_device().attend(queries, query_positions, None, want)
      return out, stats.replace(layer=stepped)
    # A row whose partial sentence is this short attends to every stored token. Each path
    # runs only when some row takes it, and is traced once: nested conds with a mixed
    # branch traced both twice, which doubled the decode loop's compile (SmolLM2, 500
    # tokens: 29.5 s, 15.2 s with one trace each).
    dense_rows = self.open_count <= self.length_threshold
    zeros = lambda: jnp.zeros(queries.shape, queries.dtype)
    dense = jax.lax.cond(dense_rows.any(),
                         lambda: self.on_device().attend(queries, query_positions)[0], zeros)
    sparse = jax.lax.cond(dense_rows.all(), zeros, lambda: self.decode(
        queries, query_positions, stepped.sentence_queries()))
    return jnp.where(dense_rows[:, None, None, None], dense, sparse), Stats(layer=stepped)

  def observed(self, queries, query_positions) -> "SentenceLayerCache":
    """The decode query [B, 1, H, D] added to its row's open sentence (a row whose real
    token has just closed one keeps an empty sum)."""
    joins = (query_positions[:, 0] >= 0) & (self.open_count > 0)
    return self.replace(open_queries=self.open_queries + jnp.where(
        joins[:, None, None], queries[:, 0].astype(jnp.float32), 0.))

  def sentence_queries(self) -> jax.Array:
    """[B, 1, H, D] float32: the mean query of each row's open sentence."""
    count = jnp.maximum(self.open_count, 1).astype(jnp.float32)
    return (self.open_queries / count[:, None, None])[:, None]

  @property
  def gathered_reads(self) -> jax.Array:
    """[] int32: the slots a sparse step gathers from sentences (the budget less its first
    start_budget and last recent_budget)."""
    return self.reads - self.start_budget - self.recent_budget

  def selected_slots(self, queries):
    """(slots, valid) [B, K, budget]: the virtual slots a decode step whose sentence query
    is `queries` [B, 1, H, D] reads: the first
    start_budget of the sequence, its last recent_budget (those not among the first) and
    the gathered sentences' (`gathered_slots` over the context's and the closed appended
    sentences, inside [start_budget, n - recent_budget) of the sequence)."""
    ctx, sinks, recent = self.context, self.start_budget, self.recent_budget
    b, k, c = ctx.positions.shape
    stored = (ctx.positions[:, 0] >= 0).sum(-1).astype(jnp.int32)             # [B]
    n = stored + self.appended.end                                            # [B]
    virtual = lambda i: jnp.where(i < stored[:, None], i, c + i - stored[:, None])
    per_head = lambda a: jnp.broadcast_to(a[:, None], (b, k) + a.shape[1:])
    gathered, valid = gathered_slots(
        queries, jnp.concatenate([self.means, self.appended_means], axis=2),
        jnp.concatenate([self.starts, per_head(c + self.appended_starts)], axis=2),
        jnp.concatenate([self.lengths, per_head(self.appended_lengths)], axis=2),
        virtual(jnp.full((b, 1), sinks, jnp.int32))[:, 0],
        virtual((n - recent)[:, None])[:, 0],
        self.budget - sinks - recent, self.gqa, self.gathered_reads)
    # A row storing fewer than start_budget tokens has appended ones among its first.
    first = jnp.broadcast_to(jnp.arange(sinks, dtype=jnp.int32), (b, sinks))    # [B, S]
    tail = n[:, None] - recent + jnp.arange(recent, dtype=jnp.int32)         # [B, R]
    slots = jnp.concatenate([per_head(virtual(first)), per_head(virtual(tail)), gathered],
                            axis=-1)
    valid = jnp.concatenate([per_head(first < n[:, None]), per_head(tail >= sinks), valid],
                            axis=-1)
    return slots, valid

  def _read(self, context: jax.Array, appended: jax.Array, slots: jax.Array) -> jax.Array:
    """Keys, values or positions of the selected virtual slots, on the device: context slots
    from host memory when offloaded (sinks and the context's tail as one slice each, every
    gathered slot alone), appended ones from the device."""
    c, size = context.shape[2], self.appended.capacity
    squeeze = context.ndim == 3
    if squeeze:
      context, appended = context[..., None], appended[..., None]
    in_context = (slots < c)[..., None]
    from_appended = (jnp.take_along_axis(appended, jnp.clip(slots - c, 0, size - 1)[..., None],
                                         axis=2) if size else jnp.zeros_like(context[:, :, :1]))
    if not self.offloaded or squeeze:
      out = jnp.take_along_axis(context, jnp.clip(slots, 0, c - 1)[..., None], axis=2)
    else:
      sinks, recent = self.start_budget, self.recent_budget
      tail, gathered = slots[..., sinks:sinks + recent], slots[..., sinks + recent:]
      parts = [read_blocks(context, jnp.zeros_like(slots[..., :1]), sinks) if sinks else None,
               _read_tail(context, tail, recent) if recent else None,
               # Gathered slots past the budget (`reads`) are never valid: not read.
               read_blocks(context, jnp.where(gathered < c, gathered, 0), 1,
                           self.gathered_reads)]
      out = jnp.concatenate([p for p in parts if p is not None], axis=2)
    out = jnp.where(in_context, out, from_appended.astype(out.dtype))
    return out[..., 0] if squeeze else out

  def decode(self, queries, query_positions, sentence_queries):
    """One new token per row over the virtual slots `sentence_queries` select."""
    slots, valid = self.selected_slots(sentence_queries)
    ctx, new = self.context, self.appended
    positions = jnp.where(valid, self._read(ctx.positions, new.positions, slots),
                          EMPTY_POSITION)
    out, _ = attention_ops.decode(queries, self._read(ctx.keys, new.keys, slots),
                                  self._read(ctx.values, new.values, slots),
                                  query_positions, positions, stored=False)
    return out

  def _indexed(self, at, means, starts, lengths) -> "SentenceLayerCache":
    """Closed sentences [B, S] (means [B, K, S, D], first appended slots, lengths) written
    to the appended table at rows' entries `at` [B, S] (G: not written)."""
    batch = jnp.arange(at.shape[0])[:, None]
    table = self.appended_means.transpose(0, 2, 1, 3).at[batch, at].set(
        means.transpose(0, 2, 1, 3), mode="drop").transpose(0, 2, 1, 3)
    return self.replace(
        appended_means=table,
        appended_starts=self.appended_starts.at[batch, at].set(starts, mode="drop"),
        appended_lengths=self.appended_lengths.at[batch, at].set(lengths, mode="drop"),
        closed=self.closed + (at < self.appended_lengths.shape[1]).sum(-1, dtype=jnp.int32))

  def _close(self, close: jax.Array) -> "SentenceLayerCache":
    """The open sentence of the rows `close` [B] (those with one) added to the table."""
    close = close & (self.open_count > 0)
    at = jnp.where(close, self.closed, self.appended_lengths.shape[1])
    mean = self.open_sum / jnp.maximum(self.open_count, 1)[:, None, None]
    return self._indexed(at[:, None], mean[:, :, None], self.open_from[:, None],
                         self.open_count[:, None]).replace(
        open_sum=jnp.where(close[:, None, None], 0., self.open_sum),
        open_count=jnp.where(close, 0, self.open_count),
        open_queries=jnp.where(close[:, None, None], 0., self.open_queries))

  def append(self, new: NewTokens) -> "SentenceLayerCache":
    """Stores the tokens after the context and indexes their sentences: a decode token
    extends the open sentence and closes it when it ends one; a longer chunk (a question)
    closes the open sentence and every sentence in it, the last at its end."""
    if new.tokens is None:
      raise MethodError("a sentencekv cache indexes the text appended to it and needs the "
                        "new tokens' ids (NewTokens.tokens); append through the model's "
                        "forward pass")
    slot = self.appended.end
    real = new.positions >= 0                                                  # [B, T]
    ends = (new.tokens[..., None] == self.boundaries[:, None, :]).any(-1) & real
    if new.keys.shape[2] == 1:
      starts = real[:, 0] & (self.open_count == 0)
      key = new.keys[:, :, 0].astype(jnp.float32)
      return self.replace(
          appended=self.appended.append(new),
          open_sum=self.open_sum + jnp.where(real[:, :1, None], key, 0.),
          open_count=self.open_count + real[:, 0],
          open_from=jnp.where(starts, slot, self.open_from))._close(ends[:, 0])
    cache = self._close(jnp.ones(real.shape[:1], bool)).replace(
        appended=self.appended.append(new))
    t = real.shape[1]
    # The chunk's sentences: runs of its real tokens, each ended by a sentence end.
    runs = jnp.where(real, jnp.cumsum(ends, axis=1) - ends, -1)                  # [B, T]
    means, starts, lengths = sentence_table(
        new.keys, jnp.broadcast_to(runs[:, None], new.keys.shape[:3]), t)
    lengths = lengths[:, 0]                                  # every head has the same runs
    at = jnp.where(lengths > 0, cache.closed[:, None] + jnp.arange(t)[None, :],
                   cache.appended_lengths.shape[1])
    return cache._indexed(at, means, slot + starts[:, 0], lengths)

  def candidates(self, new: NewTokens) -> LayerCache:
    """Dense candidates for the next prefill chunk (stored again by the method)."""
    return self.on_device().candidates(new)

  def select(self, index):
    raise NotImplementedError("a sentence cache is compacted through its dense candidates")

  def trimmed(self) -> "SentenceLayerCache":
    return self

  def grow(self, room: int) -> "SentenceLayerCache":
    """Room for `room` more appended tokens, and for as many closed sentences."""
    if room == 0:
      return self
    pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, room)])
    return self.replace(appended=self.appended.grow(room),
                        appended_means=jnp.pad(self.appended_means,
                                               [(0, 0), (0, 0), (0, room), (0, 0)]),
                        appended_starts=pad(self.appended_starts),
                        appended_lengths=pad(self.appended_lengths))


def _read_tail(context: jax.Array, tail: jax.Array, recent: int) -> jax.Array:
  """The context slots among the tail's virtual slots [B, K, R] (consecutive ones: one
  slice of `recent` from host memory), each at its place (others: any slot, unused)."""
  c = context.shape[2]
  first = jnp.clip(jnp.where(tail < c, tail, c).min(-1, keepdims=True), 0, c - recent)
  return jnp.take_along_axis(read_blocks(context, first, recent),
                             jnp.clip(tail - first, 0, recent - 1)[..., None], axis=2)


def _empty_tables(dense: LayerCache, query_heads: int) -> dict:
  """No appended tokens: their storage and sentence table empty, no open sentence."""
  b, k, _, d = dense.keys.shape
  rows = lambda dtype: jnp.zeros((b,), dtype)
  return dict(appended=_empty_like(dense), appended_means=jnp.zeros((b, k, 0, d), jnp.float32),
              appended_starts=jnp.zeros((b, 0), jnp.int32),
              appended_lengths=jnp.zeros((b, 0), jnp.int32), closed=rows(jnp.int32),
              open_sum=jnp.zeros((b, k, d), jnp.float32), open_count=rows(jnp.int32),
              open_from=rows(jnp.int32),
              open_queries=jnp.zeros((b, query_heads, d), jnp.float32))


@registry.register
@dataclasses.dataclass(frozen=True)
class SentenceKV(base.Method):
  """Sentence-level retrieval at decode over a SnapKV-filtered context (see the module
  docstring for the algorithm and every difference from the official code)."""
  name: ClassVar[str] = "sentencekv"
  family: ClassVar[str] = "paging"
  reads_context: ClassVar[bool] = True
  wrappable: ClassVar[bool] = False
  # Its prefill reads no layer index, and parameters (the context's sentence ids) that
  # are the same at every layer: one compiled layer serves every layer.
  layerwise_prefill: ClassVar[bool] = True
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
    ends = self.boundaries(tokenizer)
    return {"sentence": sentence_ids(np.asarray(tokens), np.asarray(mask), ends),
            "boundaries": np.asarray(ends, np.int32)}

  def score(self, x):
    return window_votes(x, self.window, self.kernel_size, self.pooling, self.gqa)

  def protected(self, key_positions, lengths, keep):
    return base.window_mask(key_positions, lengths, self.window)

  def prefill_state(self, x):
    """[B, K, S] each candidate's sentence id (-1 for empty slots)."""
    if x.params is None or not {"sentence", "boundaries"} <= set(x.params):
      raise MethodError("sentencekv needs the context's sentence ids and the sentence-end "
                        "ids (context_params); "
                        "prefill through kvjax.generate, kvjax.score or context.prefill")
    sentence = x.params["sentence"]
    pos = x.key_positions
    index = jnp.clip(pos, 0, sentence.shape[1] - 1).reshape(pos.shape[0], -1)
    ids = jnp.take_along_axis(sentence, index, axis=1).reshape(pos.shape)
    return jnp.where(pos >= 0, ids, -1)

  def compact(self, cand, x, keep):
    """The pre-filter's stored tokens (with their sentence ids), the budget kept static."""
    dense = base.Method.compact(self, cand, x, self.stored(keep))
    return SentenceLayerCache.prefilled(dense, keep, self, x.params["boundaries"],
                                        x.queries.shape[2])

  @property
  def compacts_ranked(self) -> bool:
    return True

  def traces_budget(self, keep):
    """The stored count of a traced budget is its float32 product: where it agrees."""
    return int(np.float32(keep) * np.float32(self.semantic_factor)) == self.stored(keep)

  def compact_ranked(self, cand, x, largest, keep):
    """`compact` for a traced budget `keep` <= `largest`: the pre-filter ranks the stored
    count of `largest` (at most every candidate), the slots past the stored count of
    `keep` empty, the budget traced (`reads`); `ranked_cut` then cuts it."""
    stored = jnp.floor(keep.astype(jnp.float32) * np.float32(self.semantic_factor))
    dense = base.Method.compact_ranked(self, cand, x, min(self.stored(largest), cand.capacity),
                                       stored.astype(jnp.int32))
    return SentenceLayerCache.prefilled(dense, largest, self, x.params["boundaries"],
                                        x.queries.shape[2], reads=keep)

  def ranked_cut(self, layer, keep):
    """The stored tokens of `keep`: the first slots, or every candidate and empty slots up
    to that count (as `compact` grows them), with the budget static again."""
    ctx, stored = layer.context, self.stored(keep)
    ctx = (ctx.first_slots(stored) if stored <= ctx.capacity
           else ctx.grow(stored - ctx.capacity))
    return layer.replace(context=ctx, budget=keep)

  def finalize(self, cache, config=None):
    del config
    return cache.replace(layers=tuple(
        layer.finalized(self.offload) if isinstance(layer, SentenceLayerCache)
        else layer.trimmed() for layer in cache.layers))

  def kept_budgets(self, cache, budgets):
    del budgets
    return tuple(int((layer.slot_positions() >= 0).sum(-1).max()) for layer in cache.layers)

  def decode_stats(self, cache) -> dict:
    """Sentences of the appended text (questions, generated tokens) closed into the index,
    per row (every sentence layer holds the same), and tokens of the open one."""
    layers = [layer for layer in cache.layers if isinstance(layer, SentenceLayerCache)]
    if not layers:
      return {}
    return {"appended_sentences": host_array(layers[0].closed).tolist(),
            "open_sentence_tokens": host_array(layers[0].open_count).tolist()}

  def content_nbytes(self, cache) -> int:
    """The device allocation less `shared_size`'s rounding: the tables' empty sentences
    past the most any head holds and the context's reserved slots."""
    padding = 0
    for layer in cache.layers:
      if isinstance(layer, SentenceLayerCache):
        per_sentence = sum(a.nbytes // a.shape[2]
                           for a in (layer.means, layer.starts, layer.lengths))
        padding += (layer.means.shape[2] - _sentences(layer)) * per_sentence
        ctx = layer.context
        padding += shape_padding(ctx) * sum(cache_nbytes(a) // ctx.capacity
                                            for a in (ctx.keys, ctx.values, ctx.positions))
    return cache_nbytes(cache) - padding

  def cache_stats(self, cache) -> dict:
    layers = [layer for layer in cache.layers if isinstance(layer, SentenceLayerCache)]
    if not layers:
      return {}
    return {"tokens_read_per_step": int(layers[0].reads),
            "stored_tokens": [int(layer.context.capacity) - shape_padding(layer.context)
                              for layer in layers],
            "allocated_stored_tokens": [int(layer.context.capacity) for layer in layers],
            "sentences": [_sentences(layer) for layer in layers],
            "allocated_sentences": [int(layer.means.shape[2]) for layer in layers],
            "dense_layers": len(cache.layers) - len(layers),
            "host_bytes": host_nbytes(cache)}
