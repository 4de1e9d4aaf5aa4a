"""Cache-Craft: KV caches of retrieved chunks, reused across prompts with partial recompute.

    store = kvjax.systems.ChunkStore(model, max_bytes=1 << 30, directory="chunk-store")
    out = kvjax.systems.generate_from_chunks(model, store, [instructions, doc_a, doc_b],
                                             "Question: ...\\nAnswer:", max_new_tokens=32)

A retrieval-augmented prompt is a list of chunks (each tokenized on its own, so a chunk's
tokens are the same in every prompt) followed by a question that is never stored.
- Creation: a chunk the store does not hold (or one recomputed whole) is prefilled with
  the prompt, and its
  post-RoPE keys and values are stored with what Cache-Craft needs to judge a later reuse:
  the chunks that preceded it, its attention to each of them, each token's attention to
  the preceding chunks (inter-chunk attention), and per layer the normalised inter- and
  intra-chunk attention a_l = sum_j inter(C, C_j) / (|C| |C_j|), b_l = intra(C) / |C|^2,
  from which its Cache Context Impact CCI = sigmoid(mean a / mean b).
- Reuse: a stored chunk is placed at its new position by rotating its keys by the shift
  (RoPE rotations compose). Its old context is compared with the new one: the prefix
  overlap beta (the share of its attention to predecessors that precede it again) times
  1 - gamma (the normalised Kendall-tau distance of their order) gives beta'. Cache Fix
  Overhead CFO = alpha * CCI * (1 - beta') of its tokens, those with the highest
  inter-chunk attention, are recomputed: one forward over them, the question and the
  chunks the store lacks, each at its place (`positions`), attending to everything before
  it, reused or not. A chunk with several stored variants uses the one with the least CFO.
- The store is bounded by bytes (least recently used variants leave first), keeps at
  most `max_variants` variants per chunk, and persists each variant in its own file
  (written atomically) under a folder per model fingerprint.

The formulas follow the Cache-Craft paper (arXiv 2502.15734) as restated in
../shared/reference/methods_A.md §18 and in a public reimplementation; the paper text
itself was not available to check them against. Storage tiers beyond host memory and
disk, and layer-wise preloading, are not built.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import math
import os
import pathlib
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from kvjax import calibration, fileio, validation
from kvjax.cache import kv_cache
from kvjax.cache.kv_cache import EMPTY_POSITION, Cache
from kvjax.errors import GenerationError
from kvjax.generation import engine, inputs
from kvjax.generation.generate import (DECODE_CHUNK, ROOM_MULTIPLE, GenerationResult,
                                       _validate_sampling,
                                       check_context_length, complete, eos_ids)
from kvjax.model import transformer
from kvjax.ops import attention as attention_ops
from kvjax.ops import rope

FORMAT = 1


def chunk_hash(ids: Sequence[int]) -> str:
  """The key of a chunk: a hash of its token ids."""
  return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkVariant:
  """One chunk's KV as computed in one context."""
  keys: np.ndarray                  # [L, K, T, D] post-RoPE, token t at position start + t
  values: np.ndarray                # [L, K, T, Dv]
  start: int
  predecessors: tuple               # hashes of the chunks before it, in order
  predecessor_attention: np.ndarray  # [P] inter(C, C_j) summed over layers
  inter: np.ndarray                 # [L] a_l
  intra: np.ndarray                 # [L] b_l
  token_inter: np.ndarray           # [T] each token's attention to the preceding chunks

  @property
  def length(self) -> int:
    return self.keys.shape[2]

  @property
  def nbytes(self) -> int:
    return int(self.keys.nbytes + self.values.nbytes)

  @property
  def key(self) -> str:
    """Which context it was made in (its predecessors and start)."""
    return hashlib.sha256(repr((self.predecessors, self.start)).encode()).hexdigest()[:16]

  @property
  def cci(self) -> float:
    """Cache Context Impact: sigmoid of mean inter / mean intra attention (1 when the
    chunk attends only outside itself)."""
    a, b = float(np.mean(self.inter)), float(np.mean(self.intra))
    return 1.0 if b <= 0 else 1.0 / (1.0 + math.exp(-a / b))


def kendall_tau_distance(old: Sequence[str], new: Sequence[str]) -> float:
  """The share of pairs of chunks in both lists whose order differs (0 with < 2 shared)."""
  where = {h: i for i, h in enumerate(new)}
  shared = [h for h in old if h in where]
  pairs = len(shared) * (len(shared) - 1) // 2
  if not pairs:
    return 0.0
  swapped = sum(where[shared[i]] > where[shared[j]]
                for i in range(len(shared)) for j in range(i + 1, len(shared)))
  return swapped / pairs


def overlap(variant: ChunkVariant, predecessors: Sequence[str]) -> float:
  """beta' = beta (1 - gamma): the share of the variant's attention to its old
  predecessors that goes to chunks preceding it again, times 1 - the order change."""
  if not variant.predecessors:
    return 1.0
  new = set(predecessors)
  weights = np.asarray(variant.predecessor_attention, np.float64)
  total = float(weights.sum())
  if total <= 0:
    beta = sum(h in new for h in variant.predecessors) / len(variant.predecessors)
  else:
    beta = float(sum(w for h, w in zip(variant.predecessors, weights) if h in new)) / total
  return beta * (1.0 - kendall_tau_distance(variant.predecessors, predecessors))


def fix_overhead(variant: ChunkVariant, predecessors: Sequence[str], alpha: float) -> float:
  """CFO = alpha * CCI * (1 - beta'): the fraction of the chunk's tokens to recompute."""
  return alpha * variant.cci * (1.0 - overlap(variant, predecessors))


def recompute_indices(variant: ChunkVariant, fraction: float) -> np.ndarray:
  """The ceil(fraction * T) tokens with the most inter-chunk attention, sorted."""
  count = min(variant.length, math.ceil(max(0.0, fraction) * variant.length - 1e-9))
  if count <= 0:
    return np.zeros(0, np.int64)
  order = np.argsort(-np.asarray(variant.token_inter, np.float64), kind="stable")
  return np.sort(order[:count])


# ---------------------------------------------------------------------------- the store


class ChunkStore:
  """Chunk variants of one model, least recently used out beyond `max_bytes` (keys and
  values), at most `max_variants` per chunk; each kept in `directory`/<fingerprint>/ too
  when a directory is given, and read back from there when the store is made again."""

  def __init__(self, model, max_bytes: int = 1 << 30, directory=None, max_variants: int = 4):
    self.max_bytes = validation.integer("max_bytes", max_bytes, 1, error=GenerationError,
                                        what="bytes of chunk keys and values kept")
    self.max_variants = validation.integer("max_variants", max_variants, 1,
                                           error=GenerationError,
                                           what="contexts kept per chunk")
    self.fingerprint = calibration.model_fingerprint(model)
    self.dtype = jnp.dtype(model.config.dtype)
    self._entries: collections.OrderedDict = collections.OrderedDict()  # (chunk, variant)
    self.bytes = 0
    self.stats = collections.Counter()
    self.directory = None
    if directory is not None:
      self.directory = pathlib.Path(directory) / self.fingerprint
      self.directory.mkdir(parents=True, exist_ok=True)
      self._load()

  def __len__(self) -> int:
    return len(self._entries)

  def variants(self, chunk: str) -> list[ChunkVariant]:
    """The stored variants of `chunk` (a `chunk_hash`), most recently used last."""
    return [v for (c, _), v in self._entries.items() if c == chunk]

  def touch(self, chunk: str, variant: ChunkVariant) -> None:
    """Marks a variant used (it leaves last)."""
    key = (chunk, variant.key)
    if key in self._entries:
      self._entries.move_to_end(key)
      if self.directory is not None:
        try:
          os.utime(self._path(key), None)
        except OSError:   # another store on the folder removed it: this copy stays
          self.stats["unwritable"] += 1

  def put(self, chunk: str, variant: ChunkVariant) -> bool:
    """Stores a variant (replacing one made in the same context); False when it alone is
    larger than the store."""
    if variant.nbytes > self.max_bytes:
      self.stats["too_large"] += 1
      return False
    key = (chunk, variant.key)
    if key in self._entries:
      self._drop(key, replaced=True)
    self._entries[key] = variant
    self.bytes += variant.nbytes
    self.stats["stored"] += 1
    try:
      if self.directory is not None:
        self._save(key, variant)
    except OSError:   # a full or read-only disk costs persistence, not the generation
      self.stats["unwritable"] += 1
    finally:
      same = [k for k in self._entries if k[0] == chunk]
      for old in same[:max(0, len(same) - self.max_variants)]:
        self._drop(old)
      while self.bytes > self.max_bytes:
        self._drop(next(iter(self._entries)))
    return True

  def _drop(self, key, replaced: bool = False) -> None:
    variant = self._entries.pop(key)
    self.bytes -= variant.nbytes
    self.stats["replaced" if replaced else "evicted"] += 1
    if self.directory is not None:
      try:
        self._path(key).unlink(missing_ok=True)
      except OSError:
        self.stats["unwritable"] += 1

  def _path(self, key) -> pathlib.Path:
    return self.directory / f"{key[0]}-{key[1]}.npz"

  def _save(self, key, variant: ChunkVariant) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, format=FORMAT, chunk=key[0], dtype=str(variant.keys.dtype),
             keys=_raw(variant.keys), values=_raw(variant.values), start=variant.start,
             predecessors=np.asarray(variant.predecessors, dtype="<U64"),
             predecessor_attention=variant.predecessor_attention, inter=variant.inter,
             intra=variant.intra, token_inter=variant.token_inter)
    fileio.write_bytes_atomic(self._path(key), buffer.getvalue())

  def _load(self) -> None:
    for leftover in self.directory.glob(".*.tmp-*"):   # a writer killed mid-file
      leftover.unlink(missing_ok=True)
    files = sorted(self.directory.glob("*.npz"), key=lambda p: p.stat().st_mtime)
    for path in files:
      try:
        with np.load(path) as f:
          if int(f["format"]) != FORMAT:
            raise ValueError(f"format {int(f['format'])}")
          dtype = str(f["dtype"])
          variant = ChunkVariant(
              keys=_typed(f["keys"], dtype), values=_typed(f["values"], dtype),
              start=int(f["start"]), predecessors=tuple(str(h) for h in f["predecessors"]),
              predecessor_attention=f["predecessor_attention"], inter=f["inter"],
              intra=f["intra"], token_inter=f["token_inter"])
          chunk = str(f["chunk"])
      except Exception:   # noqa: BLE001 - any unreadable file is only lost work
        self.stats["unreadable"] += 1
        path.unlink(missing_ok=True)
        continue
      key = (chunk, variant.key)
      self._entries[key] = variant
      self.bytes += variant.nbytes
      self.stats["loaded"] += 1
    while self.bytes > self.max_bytes:
      self._drop(next(iter(self._entries)))


def _raw(array: np.ndarray) -> np.ndarray:
  """bfloat16 (which .npz cannot name) as its bits."""
  return array.view(np.uint16) if array.dtype == ml_dtypes.bfloat16 else array


def _typed(array: np.ndarray, dtype: str) -> np.ndarray:
  return array.view(ml_dtypes.bfloat16) if dtype == "bfloat16" else array.astype(dtype)


# ----------------------------------------------------------- attention to each chunk


@dataclasses.dataclass(frozen=True)
class RecordSegments:
  """A cache policy that stores every token (as the full cache) and records, as per-slot
  state [B, K, S, n], each new token's attention probability (mean over query heads)
  summed over the slots of each of n segments. Its parameters are the segments' start
  positions and the end of the last, [B, n + 1] (empty segments repeat a bound)."""

  def prepare(self, layer: int, layer_cache, new):
    del layer
    return layer_cache.append(new), None, frozenset()

  def update(self, layer: int, layer_cache, step, stats):
    del layer, stats
    bounds = step.params
    slot_positions = layer_cache.positions[:, 0]                              # [B, S]
    segment = (slot_positions[..., None] >= bounds[:, None, :]).sum(-1) - 1   # [B, S]
    one_hot = ((segment[..., None] == jnp.arange(bounds.shape[1] - 1))
               & (slot_positions[..., None] >= 0)).astype(jnp.float32)        # [B, S, n]

    def block(args):
      queries, positions = args
      probs = attention_ops.probabilities(queries, layer_cache.keys, positions,
                                          layer_cache.positions, upcast=True)  # [B,K,G,t,S]
      return jnp.einsum("bts,bsn->btn", probs.mean(axis=(1, 2)), one_hot,
                        precision=jax.lax.Precision.HIGHEST)
    # Queries in blocks, so the probabilities of a long prompt are never held at once.
    b, t, h, d = step.queries.shape
    size = min(t, QUERY_BLOCK)
    blocks = (step.queries.reshape(b, t // size, size, h, d).swapaxes(0, 1),
              step.new.positions.reshape(b, t // size, size).swapaxes(0, 1))
    rows = jax.lax.map(block, blocks).swapaxes(0, 1).reshape(b, t, -1)       # [B, T, n]
    k, t = layer_cache.keys.shape[1], rows.shape[1]
    put = jnp.broadcast_to(rows[:, None], (rows.shape[0], k) + rows.shape[1:])
    state = jax.lax.dynamic_update_slice(layer_cache.state, put.astype(jnp.float32),
                                         (0, 0, layer_cache.end - t, 0))
    return layer_cache.replace(state=state)

  def finish(self, layers: tuple, lengths: jax.Array) -> Cache:
    return Cache(layers=tuple(layers), lengths=lengths)


RECORD = RecordSegments()
QUERY_BLOCK = 512   # fresh widths are powers of two up to 512, then multiples of it


@functools.partial(jax.jit, static_argnames=("graphdef", "record"))
def _prefill_at(params, tokens, mask, positions, cache, bounds, *, graphdef, record: bool):
  return transformer.forward(graphdef, params, tokens, mask, cache, "last",
                             RECORD if record else None, bounds if record else None,
                             positions)


@functools.partial(jax.jit, static_argnames=("capacity", "segments"))
def _reused_cache(keys, values, positions, offsets, kept, inv_freq, *, capacity: int,
                  segments: int) -> Cache:
  """A one-row cache of `capacity` slots per layer whose first slots hold the reused
  tokens: keys [L, K, N, D] moved by offsets [N] positions, values, positions [N]; with
  zero per-slot state for `segments` segments when recording."""
  layers, kv, n, _ = keys.shape
  keys = rope.shift_rope(keys, offsets[None, None, :], inv_freq)
  pad = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, capacity - n), (0, 0)])[:, None]
  keys, values = pad(keys), pad(values)
  positions = jnp.broadcast_to(jnp.pad(positions, (0, capacity - n),
                                       constant_values=EMPTY_POSITION), (1, kv, capacity))
  layer = lambda l: kv_cache.LayerCache(
      keys=keys[l], values=values[l], positions=positions, end=jnp.int32(n),
      state=jnp.zeros((1, kv, capacity, segments), jnp.float32) if segments else None)
  return Cache(layers=tuple(layer(l) for l in range(layers)), lengths=kept[None])


@functools.partial(jax.jit, static_argnames=("width",))
def _in_position_order(cache: Cache, width: int) -> Cache:
  """Every layer's first `width` slots by position (empty slots last), state dropped: the
  cache a prefill of the whole prompt makes."""
  def sort(layer):
    pos = layer.positions
    order = jnp.argsort(jnp.where(pos < 0, jnp.iinfo(jnp.int32).max, pos), axis=-1)
    return layer.replace(state=None).select(order[..., :width].astype(jnp.int32))
  return cache.replace(layers=tuple(sort(layer) for layer in cache.layers))


# ------------------------------------------------------------------------- assembling


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """How one chunk of a prompt is made."""
  chunk: str
  start: int
  length: int
  variant: ChunkVariant | None      # None: prefilled (and stored)
  recompute: np.ndarray             # indices (within the chunk) prefilled again
  cci: float | None = None
  overlap: float | None = None
  fix_overhead: float | None = None

  @property
  def whole(self) -> bool:
    """Every token prefilled in this prompt: stored as a variant for this context."""
    return len(self.recompute) == self.length


def plan_chunks(store: ChunkStore, chunk_ids: Sequence[Sequence[int]],
                recompute_fraction: float | None, alpha: float) -> list[ChunkPlan]:
  """Each chunk's variant (the one needing the least recompute) and recomputed tokens."""
  hashes = [chunk_hash(ids) for ids in chunk_ids]
  plans, start = [], 0
  for i, ids in enumerate(chunk_ids):
    predecessors = hashes[:i]
    candidates = [v for v in store.variants(hashes[i]) if v.length == len(ids)]
    if not candidates:
      plans.append(ChunkPlan(hashes[i], start, len(ids), None, np.arange(len(ids))))
    else:
      # Least overhead first; among equals the most recently used (listed last).
      variant = min(reversed(candidates), key=lambda v: fix_overhead(v, predecessors, alpha))
      cfo = fix_overhead(variant, predecessors, alpha)
      fraction = cfo if recompute_fraction is None else recompute_fraction
      plans.append(ChunkPlan(hashes[i], start, len(ids), variant,
                             recompute_indices(variant, fraction), cci=variant.cci,
                             overlap=overlap(variant, predecessors), fix_overhead=cfo))
    start += len(ids)
  return plans


def _segment_bounds(plans: list[ChunkPlan]) -> np.ndarray:
  """[1, n + 1] chunk starts and the end, padded to a power of two of segments."""
  bounds = [p.start for p in plans] + [plans[-1].start + plans[-1].length]
  width = 1 << max(3, (len(plans) - 1).bit_length())
  return np.asarray([bounds + [bounds[-1]] * (width + 1 - len(bounds))], np.int32)


def prefill_chunks(model, store: ChunkStore, chunk_ids: Sequence[Sequence[int]],
                   question_ids: Sequence[int], *, recompute_fraction: float | None = None,
                   alpha: float = 1.0, room: int = 0, update_store: bool = True):
  """Prefills chunks + question reusing stored chunks: (logits [1, V] after the last
  token, cache in position order with `room` empty slots, stats). update_store=False
  leaves the store as it was (nothing stored, no use recorded)."""
  cfg = model.config
  plans = plan_chunks(store, chunk_ids, recompute_fraction, alpha)
  prompt = [t for ids in chunk_ids for t in ids] + list(question_ids)
  total = len(prompt)
  fresh = np.zeros(total, bool)
  for p in plans:
    fresh[p.start + p.recompute] = True
  fresh[plans[-1].start + plans[-1].length:] = True
  fresh[-1] = True   # its logits start decoding (counted in prefilled, not recomputed)
  reused = [p for p in plans if p.variant is not None]

  # The reused tokens, moved to their new positions, fill the first slots.
  kept_keys, kept_values, kept_positions, offsets = [], [], [], []
  for p in reused:
    keep = np.flatnonzero(~fresh[p.start:p.start + p.length])
    kept_keys.append(p.variant.keys[:, :, keep])
    kept_values.append(p.variant.values[:, :, keep])
    kept_positions.append(p.start + keep)
    offsets.append(np.full(len(keep), p.start - p.variant.start, np.int32))
  layers, kv, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  dv = cfg.values_per_key_head * d
  n_kept = sum(len(x) for x in kept_positions)
  kept_width = inputs.bucket(n_kept) if n_kept else 0
  fresh_index = np.flatnonzero(fresh)
  fresh_width = inputs.bucket(len(fresh_index))
  dtype = jnp.dtype(cfg.dtype)
  keys = np.zeros((layers, kv, kept_width, d), dtype)
  values = np.zeros((layers, kv, kept_width, dv), dtype)
  positions = np.full(kept_width, EMPTY_POSITION, np.int32)
  shift = np.zeros(kept_width, np.int32)
  if n_kept:
    keys[:, :, :n_kept] = np.concatenate(kept_keys, axis=2)
    values[:, :, :n_kept] = np.concatenate(kept_values, axis=2)
    positions[:n_kept] = np.concatenate(kept_positions)
    shift[:n_kept] = np.concatenate(offsets)
  record = update_store and any(p.whole for p in plans)
  segments = _segment_bounds(plans)
  capacity = kept_width + fresh_width
  cache = _reused_cache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions),
                        jnp.asarray(shift), jnp.int32(n_kept), rope.inverse_frequencies(cfg),
                        capacity=capacity, segments=segments.shape[1] - 1 if record else 0)
  tokens = np.zeros((1, fresh_width), np.int32)
  mask = np.zeros((1, fresh_width), bool)
  fresh_positions = np.full((1, fresh_width), EMPTY_POSITION, np.int32)
  tokens[0, :len(fresh_index)] = np.asarray(prompt)[fresh_index]
  mask[0, :len(fresh_index)] = True
  fresh_positions[0, :len(fresh_index)] = fresh_index
  logits, cache = _prefill_at(model.params, jnp.asarray(tokens), jnp.asarray(mask),
                              jnp.asarray(fresh_positions), cache, jnp.asarray(segments),
                              graphdef=model.graphdef, record=record)
  stored = _store_new_chunks(store, plans, cache, kept_width, fresh_index) if record else 0
  for p in reused if update_store else ():
    if not p.whole:   # a chunk recomputed whole used nothing stored
      store.touch(p.chunk, p.variant)
  cache = engine.STEPS.grow(_in_position_order(cache, min(capacity, inputs.bucket(total))),
                            room)
  recomputed = int(sum(len(p.recompute) for p in reused))
  stats = {
      "prompt_tokens": total, "chunk_tokens": plans[-1].start + plans[-1].length,
      "question_tokens": len(question_ids), "chunks": len(plans),
      "chunks_reused": len(reused), "chunks_prefilled": len(plans) - len(reused),
      "chunks_stored": stored, "recomputed_tokens": recomputed,
      "prefilled_tokens": int(fresh.sum()),
      "prefill_saved_fraction": 1 - int(fresh.sum()) / total,
      "chunk_plans": [{"chunk": p.chunk, "start": p.start, "length": p.length,
                       "reused": p.variant is not None, "recomputed": len(p.recompute)
                       if p.variant is not None else p.length, "cci": p.cci,
                       "overlap": p.overlap, "fix_overhead": p.fix_overhead}
                      for p in plans],
  }
  return logits, cache, stats


def _store_new_chunks(store: ChunkStore, plans: list[ChunkPlan], cache: Cache,
                      kept_width: int, fresh_index: np.ndarray) -> int:
  """Stores every chunk prefilled whole (unknown, or recomputed whole), with its attention
  statistics, as the variant of its context."""
  slot_of = {int(pos): kept_width + i for i, pos in enumerate(fresh_index)}
  keys = np.stack([np.asarray(layer.keys[0]) for layer in cache.layers])     # [L, K, S, D]
  values = np.stack([np.asarray(layer.values[0]) for layer in cache.layers])
  rows = np.stack([np.asarray(layer.state[0, 0]) for layer in cache.layers])  # [L, S, n]
  stored = 0
  for i, p in enumerate(plans):
    if not p.whole:
      continue
    slots = np.asarray([slot_of[p.start + t] for t in range(p.length)])
    own = rows[:, slots].astype(np.float64)                                   # [L, T, n]
    lengths = np.asarray([q.length for q in plans[:i]], np.float64)
    blocks = own[:, :, :i].sum(1)                                             # [L, i]
    inter = (blocks / (p.length * lengths)).sum(1) if i else np.zeros(len(own))
    intra = own[:, :, i].sum(1) / p.length ** 2
    variant = ChunkVariant(
        keys=keys[:, :, slots], values=values[:, :, slots], start=p.start,
        predecessors=tuple(q.chunk for q in plans[:i]),
        predecessor_attention=blocks.sum(0).astype(np.float32),
        inter=inter.astype(np.float32), intra=intra.astype(np.float32),
        token_inter=own[:, :, :i].sum(2).mean(0).astype(np.float32))
    stored += store.put(p.chunk, variant)
  return stored


def encode_chunks(model, chunks, question) -> tuple[list[list[int]], list[int]]:
  """Token ids of each chunk (tokenized alone) and of the question."""
  if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence) or not chunks:
    raise GenerationError(f"chunks must be a non-empty list of texts or token-id lists; "
                          f"got {validation.show(chunks)}")
  vocab = model.config.vocab_size
  out = []
  for i, chunk in enumerate(chunks):
    if isinstance(chunk, str):
      validation.text(f"chunks[{i}]", chunk, error=GenerationError)
      if model.tokenizer is None:
        raise GenerationError("the model has no tokenizer: pass chunks as token ids")
      ids = inputs.tokenizer_ids(model.tokenizer.encode(chunk, add_special_tokens=i == 0),
                                 vocab, f"chunks[{i}]")
    else:
      ids = validation.token_ids(f"chunks[{i}]", chunk, vocab, error=GenerationError)
    if not ids:
      raise GenerationError(f"chunks[{i}] is empty after tokenization")
    out.append(ids)
  if isinstance(question, str):
    validation.text("question", question, error=GenerationError)
    q = (inputs.tokenizer_ids(model.tokenizer.encode(question, add_special_tokens=False),
                              vocab, "question") if question else [])
  else:
    q = validation.token_ids("question", question, vocab, error=GenerationError)
  return out, q


def check_request(owner: str, model, store, recompute_fraction, alpha) -> None:
  """The model can assemble prompts from `store` (a ChunkStore made for its weights) with
  these recompute settings."""
  if not isinstance(store, ChunkStore):
    raise GenerationError(f"store must be a kvjax.systems.ChunkStore; got "
                          f"{validation.show(store)}")
  if store.fingerprint != calibration.model_fingerprint(model):
    raise GenerationError("store holds chunks of another model (fingerprint "
                          f"{store.fingerprint}); make a ChunkStore for this model")
  if recompute_fraction is not None:
    validation.number("recompute_fraction", recompute_fraction, 0, 1, error=GenerationError,
                      what="share of each reused chunk recomputed, or None for CFO")
  validation.number("alpha", alpha, 0, error=GenerationError, what="CFO scale")
  if model.config.latent is not None:
    raise GenerationError(f"{owner} stores dense keys and values; a latent-attention "
                          f"(X-EcoMLA) model caches latents")


def generate_from_chunks(model, store: ChunkStore, chunks, question="", max_new_tokens: int = 64,
                         *, recompute_fraction: float | None = None, alpha: float = 1.0,
                         update_store: bool = True, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int = 0,
                         eos_token_ids: Sequence[int] | None = None,
                         steps: engine.CompiledSteps = engine.STEPS) -> GenerationResult:
  """Generates after a prompt made of `chunks` then `question`, reusing the chunk caches
  `store` holds (Cache-Craft) and storing the chunks it lacks.

  chunks: texts or token-id lists, each tokenized alone (the first with the tokenizer's
  special tokens). recompute_fraction: None recomputes each reused chunk's CFO share of
  tokens; a number in [0, 1] recomputes that share of every reused chunk (1.0 = a full
  prefill of the prompt). alpha scales CFO. update_store=False only reads the store.
  stats: the plan of every chunk, the tokens prefilled and saved, seconds
  (prefill_seconds includes compiling a new prompt shape's prefill the first time).
  """
  start = time.perf_counter()
  compile_before = steps.compile_seconds
  _validate_sampling(max_new_tokens, temperature, top_p, seed, None)
  check_request("generate_from_chunks", model, store, recompute_fraction, alpha)
  if getattr(model, "placement", None) is not None:
    raise GenerationError("generate_from_chunks runs on one device; load the model without "
                          "a mesh")
  chunk_ids, question_ids = encode_chunks(model, chunks, question)
  total = sum(map(len, chunk_ids)) + len(question_ids)
  check_context_length(model, total + max_new_tokens,
                       f"the prompt ({total} tokens) with max_new_tokens={max_new_tokens}")
  room = -(-(max_new_tokens + DECODE_CHUNK) // ROOM_MULTIPLE) * ROOM_MULTIPLE
  logits, cache, stats = prefill_chunks(model, store, chunk_ids, question_ids,
                                        recompute_fraction=recompute_fraction, alpha=alpha,
                                        room=room, update_store=update_store)
  jax.block_until_ready(logits)   # dispatch is asynchronous: time the work, not its launch
  prefill_seconds = time.perf_counter() - start
  done = complete(model, logits, cache, None, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_p=top_p, seed=seed,
                  eos_token_ids=sorted(eos_ids(model, eos_token_ids)), steps=steps)
  stats.update(prefill_seconds=prefill_seconds,
               seconds=time.perf_counter() - start,
               compile_seconds=steps.compile_seconds - compile_before,
               cache_bytes=done.cache_bytes, store_bytes=store.bytes,
               store_variants=len(store))
  return GenerationResult(texts=done.texts, token_ids=done.token_ids, stats=stats)
