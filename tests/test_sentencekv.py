"""SentenceKV: segmentation, the SnapKV pre-filter, the sentence table and each decode
step's sentence choice against slow numpy restatements; offloaded reads against the same
selection on the device; bytes against arithmetic; the method end to end and its errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernel_inputs
import kvjax
import method_inputs as mi
from kvjax.cache.kv_cache import RESERVED_POSITION, LayerCache, NewTokens, host_nbytes
from kvjax.cache.paged import HOST
from kvjax.errors import MethodError
from kvjax.methods import base, sentencekv
from kvjax.methods.sentencekv import (PUNCTUATION, SentenceKV, SentenceLayerCache,
                                      gathered_slots)
from tiny import assert_same_tree, random_prompts, tiny_model

ENDS = (1, 5, 9, 14)     # sentence-end ids of the random token rows (about one token in five)
VOCAB = 20


def np_sentences(ids, ends):
  """The sentence of every token: a sentence ends after each token whose id is an end."""
  out, sentence = [], 0
  for token in ids:
    out.append(sentence)
    if token in ends:
      sentence += 1
  return out


def np_pool_max(x, kernel):
  half = kernel // 2
  return np.array([x[max(0, i - half):i + half + 1].max() for i in range(len(x))])


def np_prefilter(data, stored, window, kernel, gqa):
  """{(row, kv head): sorted kept positions}: SnapKV over the row's real tokens (the last
  `window` queries' attention summed, window keys zeroed, max-pooled per query head, reduced
  over the group), the window plus the best stored - window others (ties: lower slot)."""
  b, t, h, d = data.q.shape
  k = data.k.shape[1]
  g = h // k
  kept = {}
  for row in range(b):
    n = data.lengths[row]
    s = data.k.shape[2]
    first = s - n                                   # rows are right-aligned
    window_slots = range(s - window, s)
    pooled = np.zeros((h, s))
    for head in range(h):
      kv = head // g
      sums = np.zeros(s)
      for i in window_slots:
        logits = np.array([data.k[row, kv, j] @ data.q[row, i, head] / np.sqrt(d)
                           if first <= j <= i else -np.inf for j in range(s)])
        p = np.exp(logits - logits.max())
        sums += p / p.sum()
      sums[s - window:] = 0.0
      pooled[head] = np_pool_max(sums, kernel)
    for kv in range(k):
      group = pooled[kv * g:(kv + 1) * g]
      score = group.mean(0) if gqa == "mean" else group.max(0)
      others = sorted(range(first, s - window), key=lambda j: (-score[j], j))
      chosen = list(window_slots) + others[:max(stored - window, 0)]
      kept[row, kv] = sorted(int(data.kpos[row, kv, j]) for j in chosen)
  return kept


def np_table(keys_by_slot, sentences):
  """[(sentence, first slot, slot count, mean key)] of the stored slots in slot order."""
  table = []
  for i, sentence in enumerate(sentences):
    if table and table[-1][0] == sentence:
      table[-1][2].append(i)
    else:
      table.append((sentence, i, [i]))
  return [(s, first, len(slots), keys_by_slot[slots].mean(0)) for s, first, slots in table]


def np_chosen_slots(q, keys_by_slot, sentences, budget, start, recent, gqa):
  """Stored slots one KV head's decode step reads: the first `start`, the last `recent`, and
  whole sentences by similarity of q [G, D] to their mean key (ties: earlier sentence),
  their slots in [start, n - recent), until budget - start - recent are taken."""
  n = len(sentences)
  low, high = start, n - recent
  ranked = []
  for index, (_, first, count, mean) in enumerate(np_table(keys_by_slot, sentences)):
    sims = [float(qq @ mean) for qq in q]
    sim = np.mean(sims) if gqa == "mean" else max(sims)
    inside = [i for i in range(first, first + count) if low <= i < high]
    if inside:
      ranked.append((-sim, index, inside))
  gathered = []
  for _, _, inside in sorted(ranked):
    for i in inside:
      if len(gathered) < budget - start - recent:
        gathered.append(i)
  return set(range(min(start, n))) | set(range(max(n - recent, 0), n)) | set(gathered)


def np_attend(q, keys, values):
  logits = keys @ q / np.sqrt(q.shape[-1])
  w = np.exp(logits - logits.max())
  return (w / w.sum()) @ values


METHOD = SentenceKV(semantic_factor=2.0, window=4, kernel_size=5, start_budget=2,
                    recent_budget=3, boundary_ids=ENDS, offload=False)
KEEP = 10    # 20 stored per head, 5 gathered


def _prefill(seed, gqa="mean", lengths=(48, 33)):
  """(data, token rows, x, the compacted layer) of one random prefill chunk."""
  data = mi.random_prefill(seed, lengths=lengths)
  rng = np.random.default_rng(seed + 100)
  s = data.k.shape[2]
  tokens = rng.integers(0, VOCAB, (len(lengths), s))
  sentence = np.zeros((len(lengths), s), np.int32)
  for row, n in enumerate(lengths):
    sentence[row, :n] = np_sentences(tokens[row, s - n:], ENDS)
  method = dataclasses.replace(METHOD, gqa=gqa)
  x = base.LayerInputs(config=mi.config(), layer=0, **mi.layer_arrays(data),
                       params={"sentence": jnp.asarray(sentence),
                               "boundaries": jnp.asarray(ENDS, jnp.int32)})
  cand = LayerCache(keys=x.keys, values=x.values, positions=x.key_positions, end=jnp.int32(s))
  return data, tokens, sentence, method, method.compact(cand, x, KEEP)


def test_equally_similar_sentences_are_gathered_earlier_first():
  # Five 3-slot sentences; 1 and 3 tie as the most similar to the query, 2 comes next.
  # Five slots are needed: all of sentence 1, then the first two of sentence 3.
  q = jnp.asarray([[[[1.0, 0.0]]]])                                      # [B, 1, H, D]
  means = jnp.asarray([[[[0., 0.], [1., 0.], [.5, 0.], [1., 0.], [-1., 0.]]]])
  starts = jnp.asarray([[[0, 3, 6, 9, 12]]], jnp.int32)
  lengths = jnp.full((1, 1, 5), 3, jnp.int32)
  slots, valid = gathered_slots(q, means, starts, lengths, jnp.asarray([0]),
                                jnp.asarray([15]), 5, "mean")
  assert slots.tolist() == [[[3, 4, 5, 9, 10]]] and bool(valid.all())
  # A sentence outside [low, high) is never gathered, however similar: with sentence 1
  # cut off by low = 6, sentence 3 comes first, then 2.
  slots, _ = gathered_slots(q, means, starts, lengths, jnp.asarray([6]), jnp.asarray([15]),
                            5, "mean")
  assert slots.tolist() == [[[9, 10, 11, 6, 7]]]


def test_sentence_ids_match_numpy():
  rng = np.random.default_rng(0)
  lengths = [30, 17, 1]
  tokens = np.zeros((3, 32), np.int64)
  mask = np.zeros((3, 32), bool)
  for row, n in enumerate(lengths):
    tokens[row, 32 - n:] = rng.integers(0, VOCAB, n)
    mask[row, 32 - n:] = True
  got = METHOD.context_params(None, tokens, mask)["sentence"]
  for row, n in enumerate(lengths):
    assert got[row, :n].tolist() == np_sentences(tokens[row, 32 - n:].tolist(), ENDS)


@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_prefilter_keeps_snapkv_tokens_with_their_sentences(gqa):
  data, _, sentence, method, layer = _prefill(1, gqa)
  want = np_prefilter(data, method.stored(KEEP), method.window, method.kernel_size, gqa)
  positions = np.asarray(layer.context.positions)
  ids = np.asarray(layer.context.state)
  for (row, kv), kept in want.items():
    real = positions[row, kv] >= 0
    assert positions[row, kv][real].tolist() == kept
    assert ids[row, kv][real].tolist() == [int(sentence[row, p]) for p in kept]


def test_sentence_table_matches_numpy():
  data, _, sentence, _, layer = _prefill(2)
  final = layer.finalized(offload=False)
  assert isinstance(final, SentenceLayerCache) and final.context.state is None
  # 20 stored slots per head, rounded up to 32 with reserved ones; 10 slots read per step,
  # compiled for 16.
  assert final.context.capacity == 32 and (final.budget, int(final.reads)) == (16, KEEP)
  for row in range(2):
    n = data.lengths[row]
    for kv in range(mi.K):
      pos = np.asarray(final.context.positions[row, kv])
      assert (pos[:20] >= 0).all() and (pos[20:] == RESERVED_POSITION).all()
      pos = pos[:20]
      keys = data.k[row, kv, pos - n + data.k.shape[2]]       # slot of each stored position
      table = np_table(keys, [int(sentence[row, p]) for p in pos])
      count = len(table)
      np.testing.assert_array_equal(np.asarray(final.starts[row, kv, :count]),
                                    [first for _, first, _, _ in table])
      np.testing.assert_array_equal(np.asarray(final.lengths[row, kv, :count]),
                                    [c for _, _, c, _ in table])
      np.testing.assert_allclose(np.asarray(final.means[row, kv, :count]),
                                 np.stack([m for *_, m in table]), rtol=1e-5, atol=1e-6)
      assert not np.asarray(final.lengths[row, kv, count:]).any()   # padding sentences


@pytest.mark.parametrize("gqa", ["mean", "max"])
@pytest.mark.parametrize("seed,lengths", [(3, (48, 33)), (4, (48, 33)), (5, (48, 33)),
                                          (3, (48, 12)), (4, (12, 48))])
def test_decode_choice_and_output_match_numpy(gqa, seed, lengths):
  # (48, 12): the short left-padded row stores fewer tokens than the long row; its slots
  # count from its own first stored token.
  data, _, sentence, method, layer = _prefill(seed, gqa, lengths)
  final = layer.finalized(offload=False)
  rng = np.random.default_rng(seed + 50)
  q = mi.f32(rng.normal(size=(2, 1, mi.H, mi.D)) * 2)
  qpos = jnp.asarray(data.lengths[:, None])
  slots, valid = final.selected_slots(jnp.asarray(q, jnp.float32))
  open_sentence = lambda n: final.replace(open_count=jnp.full((2,), n, jnp.int32))
  out, _ = open_sentence(2).attend(jnp.asarray(q, jnp.float32), qpos)
  dense, _ = open_sentence(1).attend(jnp.asarray(q, jnp.float32), qpos)
  for row in range(2):
    for kv in range(mi.K):
      pos = np.asarray(final.context.positions[row, kv])
      real = pos >= 0
      assert real[:real.sum()].all()                 # the real slots first
      pos = pos[real]
      keys = data.k[row, kv, pos - data.lengths[row] + data.k.shape[2]]
      values = data.v[row, kv, pos - data.lengths[row] + data.k.shape[2]]
      qg = q[row, 0, kv * mi.G:(kv + 1) * mi.G]
      want = np_chosen_slots(qg, keys, [int(sentence[row, p]) for p in pos], KEEP,
                             method.start_budget, method.recent_budget, gqa)
      got = np.asarray(slots[row, kv])[np.asarray(valid[row, kv])].tolist()
      assert len(got) == len(set(got)) and set(got) == want
      chosen = sorted(want)
      for g in range(mi.G):
        head = kv * mi.G + g
        np.testing.assert_allclose(np.asarray(out[row, 0, head]),
                                   np_attend(q[row, 0, head], keys[chosen], values[chosen]),
                                   rtol=1e-4, atol=1e-5)
        # A partial sentence of one token attends to every stored token.
        np.testing.assert_allclose(np.asarray(dense[row, 0, head]),
                                   np_attend(q[row, 0, head], keys, values),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("offload", [False, True])
def test_cpu_decode_at_batch_one_reads_the_selected_slots_through_dots(offload):
  # The slots a step reads are gathered in its program: the CPU reference reads them
  # through dots at batch 1 too (SmolLM2 decode steps 5-7% faster than products summed
  # over D and S, which XLA:CPU fused with the gather); row 0 alone equals row 0 of a
  # batch of two (dots there already).
  pair = _prefill(12)[-1].finalized(offload=False)
  # Compiled for the 10 slots read (not 16, the rounded budget, whose [1, 2, 16, 16] reads
  # the sentence means' dot would match too).
  pair = pair.replace(budget=int(pair.reads), open_count=jnp.full((2,), 2, jnp.int32),
                      open_queries=jnp.asarray(np.random.default_rng(14).normal(
                          size=pair.open_queries.shape), jnp.float32))
  alone = kernel_inputs.first_row(pair)
  if offload:
    host = lambda a: jax.device_put(a, HOST)
    pair, alone = (layer.replace(context=layer.context.replace(
        keys=host(layer.context.keys), values=host(layer.context.values)), offloaded=True)
                   for layer in (pair, alone))
  q = jnp.asarray(np.random.default_rng(13).normal(size=(2, 1, mi.H, mi.D)), jnp.float32)
  qpos = jnp.full((2, 1), 48, jnp.int32)
  decode = lambda layer, q, qpos: layer.decode(q, qpos, layer.sentence_queries())
  slots, _ = alone.selected_slots(alone.sentence_queries())
  assert kernel_inputs.dots_reading(decode, (alone, q[:1], qpos[:1]),
                                    slots.shape + (mi.D,)) == 2
  decode = jax.jit(decode)   # offloaded reads run in a program
  np.testing.assert_allclose(np.asarray(decode(alone, q[:1], qpos[:1])[0]),
                             np.asarray(decode(pair, q, qpos)[0]), rtol=1e-5, atol=1e-6)


def test_read_blocks_copies_each_block_and_stops_at_count():
  """Host blocks read by dynamic slices: each row's and head's blocks in order, and with a
  (traced) count only the first `count`, the rest zero."""
  from kvjax.cache.paged import read_blocks
  rng = np.random.default_rng(21)
  array = rng.normal(size=(2, 3, 12, 4)).astype(np.float32)
  starts = rng.integers(0, 10, size=(2, 3, 4)).astype(np.int32)
  want = np.stack([np.stack([np.concatenate([array[r, h, s:s + 2] for s in starts[r, h]])
                             for h in range(3)]) for r in range(2)])
  host = jax.device_put(jnp.asarray(array), HOST)
  np.testing.assert_array_equal(np.asarray(read_blocks(host, jnp.asarray(starts), 2)), want)
  counted = jax.jit(lambda a, s, n: read_blocks(a, s, 2, n))(host, jnp.asarray(starts),
                                                              jnp.int32(3))
  want[:, :, 6:] = 0
  np.testing.assert_array_equal(np.asarray(counted), want)


class NpSequence:
  """One row and KV head's decode sequence as the official code keeps it: the stored context
  with its sentences, then every appended token; a decode token joins the open sentence and
  closes it when it is a full stop; a longer chunk closes the open sentence and each of its
  own, the last at its end. Closed sentences join the index. A decode query joins the
  open sentence's queries (`sentence_cache`) before that close, and the sentences are
  ranked by the mean of those queries."""

  def __init__(self, keys, values, positions, sentences):
    self.keys, self.values = list(keys), list(values)
    self.positions = list(positions)
    self.labels = [("context", s) for s in sentences]
    self.open, self.queries, self.closed = [], [], 0

  def _close(self):
    if self.open:
      for i in self.open:
        self.labels[i] = ("appended", self.closed)
      self.closed += 1
    self.open, self.queries = [], []

  def append(self, keys, values, positions, tokens, ends):
    if len(tokens) > 1:
      self._close()
    for key, value, position, token in zip(keys, values, positions, tokens):
      self.keys.append(key)
      self.values.append(value)
      self.positions.append(position)
      self.labels.append(None)
      if position < 0:
        continue
      self.open.append(len(self.labels) - 1)
      if token in ends:
        self._close()
    if len(tokens) > 1:
      self._close()

  def chosen(self, q, budget, start, recent, threshold, gqa):
    """Sequence indices the decode step of the KV head's group queries q [G, D] (its token
    appended) attends to."""
    if self.open:
      self.queries.append(q)
    real = [i for i, p in enumerate(self.positions) if p >= 0]
    if len(self.open) <= threshold:
      return real
    q = np.mean(self.queries, axis=0)
    n = len(self.positions)
    low, high = start, n - recent
    members = {}
    for i, label in enumerate(self.labels):
      if label is not None and self.positions[i] >= 0:
        members.setdefault(label, []).append(i)
    ranked = []
    for order, slots in enumerate(members.values()):   # first appearance: table order
      mean = np.mean([self.keys[i] for i in slots], axis=0)
      sims = [float(qq @ mean) for qq in q]
      inside = [i for i in slots if low <= i < high]
      if inside:
        ranked.append((-(np.mean(sims) if gqa == "mean" else max(sims)), order, inside))
    gathered = [i for *_, inside in sorted(ranked) for i in inside][:budget - start - recent]
    keep = set(range(min(start, n))) | set(range(max(n - recent, start), n)) | set(gathered)
    return sorted(i for i in keep if self.positions[i] >= 0)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("gqa,lengths,start,recent", [
    ("mean", (48, 33), 2, 3), ("max", (48, 33), 2, 3),
    ("mean", (48, 3), 6, 3),     # row 1 stores 3 tokens: appended ones among the sinks
    ("max", (48, 33), 2, 0)])    # no recent window (a small budget's `fitted` gives it)
def test_generated_sentences_join_the_index(offload, gqa, lengths, start, recent):
  # A question (row 1 left-padded) then decode steps whose tokens end sentences about one
  # time in five: each step's reads and output against the official sequence restated.
  data, _, sentence, method, layer = _prefill(8, gqa, lengths)
  method = dataclasses.replace(method, start_budget=start, recent_budget=recent)
  layer = layer.replace(start_budget=start, recent_budget=recent)
  cache = layer.finalized(offload=offload).grow(24)
  rng = np.random.default_rng(9)
  seqs = {}
  for row in range(2):
    for kv in range(mi.K):
      pos = np.asarray(cache.context.positions[row, kv])
      pos = pos[pos >= 0]
      slot = pos - data.lengths[row] + data.k.shape[2]
      seqs[row, kv] = NpSequence(data.k[row, kv, slot], data.v[row, kv, slot], pos,
                                 [int(sentence[row, p]) for p in pos])

  @jax.jit
  def step(cache, new, q, qpos):
    out, stats = cache.append(new).attend(q, qpos)
    cache = stats.layer       # the step's query joined its open sentence
    return cache, out, cache.selected_slots(cache.sentence_queries())

  question = rng.integers(0, VOCAB, (2, 6))
  question[:, 2] = ENDS[0]
  mask = np.ones((2, 6), bool)
  mask[1, :2] = False
  chunks = [(question, mask)] + [(rng.integers(0, VOCAB, (2, 1)), np.ones((2, 1), bool))
                                 for _ in range(16)]
  seen, sparse_steps = np.asarray(data.lengths), 0
  for tokens, mask in chunks:
    t = tokens.shape[1]
    positions = np.where(mask, seen[:, None] + np.cumsum(mask, 1) - 1, -1).astype(np.int32)
    keys, values = mi.f32(rng.normal(size=(2, mi.K, t, mi.D))), mi.f32(
        rng.normal(size=(2, mi.K, t, mi.D)))
    new = NewTokens(keys=jnp.asarray(keys), values=jnp.asarray(values),
                    positions=jnp.asarray(positions), tokens=jnp.asarray(tokens, jnp.int32))
    for (row, kv), seq in seqs.items():
      seq.append(keys[row, kv], values[row, kv], positions[row], tokens[row].tolist(), ENDS)
    seen = seen + mask.sum(1)
    if t > 1:
      cache = cache.append(new)
      continue
    q = mi.f32(rng.normal(size=(2, 1, mi.H, mi.D)) * 2)
    cache, out, (slots, valid) = step(cache, new, jnp.asarray(q), jnp.asarray(positions))
    read = np.asarray(cache._read(cache.context.positions, cache.appended.positions, slots))
    for (row, kv), seq in seqs.items():
      qg = q[row, 0, kv * mi.G:(kv + 1) * mi.G]
      chosen = seq.chosen(qg, KEEP, method.start_budget, method.recent_budget,
                          method.length_threshold, gqa)
      sparse = len(seq.open) > method.length_threshold
      sparse_steps += sparse
      if sparse:
        got = read[row, kv][np.asarray(valid[row, kv]) & (read[row, kv] >= 0)]
        assert sorted(got.tolist()) == [seq.positions[i] for i in chosen], (row, kv)
      for g in range(mi.G):
        head = kv * mi.G + g
        np.testing.assert_allclose(
            np.asarray(out[row, 0, head]),
            np_attend(q[row, 0, head], np.stack([seq.keys[i] for i in chosen]),
                      np.stack([seq.values[i] for i in chosen])), rtol=1e-4, atol=1e-5)
  assert cache.closed.tolist() == [seqs[row, 0].closed for row in range(2)]
  assert min(cache.closed.tolist()) >= 4 and sparse_steps >= 20   # both paths exercised
  # The recent window has slid past the question: its tokens are read only when chosen.
  assert int(cache.appended.end) > method.recent_budget + 6


def test_offloaded_reads_equal_the_on_device_selection():
  _, _, _, _, layer = _prefill(6)
  here, moved = layer.finalized(offload=False), layer.finalized(offload=True)
  assert moved.context.keys.sharding.memory_kind == "pinned_host"
  assert moved.means.sharding.memory_kind == "device"
  kv = 2 * 2 * mi.K * 32 * mi.D * 4      # 20 stored slots, 32 allocated
  assert host_nbytes(moved) == kv and moved.nbytes == here.nbytes - kv
  rng = np.random.default_rng(7)
  steps = [(NewTokens(keys=jnp.asarray(rng.normal(size=(2, mi.K, 1, mi.D)), jnp.float32),
                      values=jnp.asarray(rng.normal(size=(2, mi.K, 1, mi.D)), jnp.float32),
                      positions=jnp.full((2, 1), position, jnp.int32),
                      tokens=jnp.full((2, 1), 2, jnp.int32)),
            jnp.asarray(rng.normal(size=(2, 1, mi.H, mi.D)), jnp.float32))
           for position in (48, 49, 50)]

  @jax.jit
  def step(cache, new, q):
    out, stats = cache.append(new).attend(q, new.positions)
    return stats.layer, out

  here, moved = here.grow(4), moved.grow(4)
  for new, q in steps:      # the first step attends to all, the others select
    here, want = step(here, new, q)
    moved, got = step(moved, new, q)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert moved.open_count.tolist() == [3, 3]         # no sentence end among the steps
  assert moved.context.keys.sharding.memory_kind == "pinned_host"
  question = NewTokens(keys=jnp.ones((2, mi.K, 2, mi.D)), values=jnp.ones((2, mi.K, 2, mi.D)),
                       positions=jnp.full((2, 2), 60, jnp.int32),
                       tokens=jnp.full((2, 2), 2, jnp.int32))
  # A question closes the open sentence and its own.
  asked = moved.grow(2).append(question)
  assert asked.open_count.tolist() == [0, 0] and asked.closed.tolist() == [2, 2]
  assert moved.open_queries.any() and not asked.open_queries.any()
  # Those steps read fewer tokens than the whole cache holds: the answer differs.
  q, qpos = steps[-1][1], jnp.full((2, 1), 50, jnp.int32)
  full, _ = here.on_device().attend(q, qpos)
  assert not np.allclose(np.asarray(full), np.asarray(want))


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0, num_layers=2)


TINY = SentenceKV(boundary_ids=(3, 7, 11, 13, 17, 19, 23), start_budget=4, recent_budget=4,
                  window=8)


def test_budget_covering_the_stored_tokens_is_the_full_cache(model):
  prompts = random_prompts([150, 120], seed=1)
  full = kvjax.generate(model, prompts, max_new_tokens=8)
  out = kvjax.generate(model, prompts, method=TINY, budget=150, max_new_tokens=8)
  assert out.token_ids == full.token_ids
  assert out.stats["method_stats"] == {}            # every layer stayed dense


def _layer_bytes(rows, kv, heads, stored, sentences, dim, boundaries=len(TINY.boundary_ids)):
  """Device bytes of an offloaded layer before decoding: positions per stored slot, the
  sentence table (float32 mean key, int32 start and length), the open sentence's float32
  key sum (per KV head) and query sum (per query head), three int32 counters and the int32
  sentence-end ids per row, the context's and appended tokens' ends and the slots read."""
  return (rows * kv * (stored * 4 + sentences * (dim * 4 + 8)) + rows * (kv + heads) * dim * 4
          + rows * (3 * 4 + boundaries * 4) + 3 * 4)


def test_device_bytes_follow_the_budget(model):
  cfg = model.config
  for length in (200, 400):
    prompts = random_prompts([length, length - 30], seed=2)
    out = kvjax.generate(model, prompts, method=TINY, budget=24, max_new_tokens=4)
    stats = out.stats["method_stats"]
    assert stats["stored_tokens"] == [72, 72] and stats["tokens_read_per_step"] == 24
    # Host memory holds the allocation: 72 slots rounded up to 80 (`shared_size`).
    assert stats["allocated_stored_tokens"] == [80, 80]
    kv_bytes = lambda slots: 2 * 2 * cfg.num_kv_heads * slots * cfg.head_dim * 4 * 2
    host = kv_bytes(72)   # layers, rows, K and V
    assert stats["host_bytes"] == out.stats["context_cache_host_bytes"] == kv_bytes(80)
    device = sum(_layer_bytes(2, cfg.num_kv_heads, cfg.num_heads, 72, n, cfg.head_dim)
                 for n in stats["sentences"])
    assert out.stats["context_cache_bytes"] == device + 2 * 4     # and the rows' lengths
    # However long the context, at most one sentence per stored token.
    assert device <= 2 * _layer_bytes(2, cfg.num_kv_heads, cfg.num_heads, 72, 72, cfg.head_dim)
    on_device = kvjax.generate(model, prompts, method=dataclasses.replace(TINY, offload=False),
                               budget=24, max_new_tokens=4)
    assert on_device.token_ids == out.token_ids
    assert on_device.stats["context_cache_bytes"] == device + 2 * 4 + host
    assert on_device.stats["context_cache_host_bytes"] == 0


def test_questions_and_generated_text_are_indexed_end_to_end(model):
  # Through the model's forward pass (the question's prefill and every decode step pass
  # their token ids): the sentences closed are those the token ids say.
  prompts = random_prompts([200, 170], seed=5)
  questions = random_prompts([9, 5], seed=6)
  out = kvjax.generate(model, prompts, questions=questions, method=TINY, budget=24,
                       max_new_tokens=24, chat_template=False)
  ends = set(TINY.boundary_ids)
  for row, stats in enumerate(zip(out.stats["decode_method_stats"]["appended_sentences"],
                                  out.stats["decode_method_stats"]["open_sentence_tokens"])):
    asked = list(questions[row])
    # The question's sentences, then the generated ones; the last token was fed only if
    # decoding ran past it (the final sampled token is never appended).
    fed = out.token_ids[row][:-1]
    closed = sum(t in ends for t in asked[:-1]) + 1
    open_count = 0
    for token in fed:
      open_count += 1
      if token in ends:
        closed, open_count = closed + 1, 0
    assert stats == (closed, open_count), row
  assert max(out.stats["decode_method_stats"]["appended_sentences"]) >= 3


def test_empty_sentences_change_nothing_but_the_allocation(model, monkeypatch):
  """Tables rounded up with empty sentences decode as exactly sized ones, through the
  question's and the generated sentences (sparse steps rank every sentence)."""
  prompts = random_prompts([200, 170], seed=7)
  kwargs = dict(questions=random_prompts([9, 5], seed=8), method=TINY, budget=24,
                max_new_tokens=24, chat_template=False)
  padded = kvjax.generate(model, prompts, **kwargs)
  monkeypatch.setattr(sentencekv, "shared_size", lambda count: count)
  exact = kvjax.generate(model, prompts, **kwargs)
  assert padded.token_ids == exact.token_ids
  assert padded.stats["context_cache_bytes"] == exact.stats["context_cache_bytes"]
  assert (padded.stats["context_cache_allocated_bytes"]
          > exact.stats["context_cache_allocated_bytes"] == exact.stats["context_cache_bytes"])
  stats, exact_stats = padded.stats["method_stats"], exact.stats["method_stats"]
  assert stats["sentences"] == exact_stats["sentences"] == exact_stats["allocated_sentences"]
  assert stats["allocated_sentences"] == [-(-n // 16) * 16 for n in stats["sentences"]]


def test_prompts_of_other_lengths_share_one_compiled_decode_loop(model, monkeypatch):
  """Stored slots, sentences and the budget rounded up (`shared_size`): contexts of 200 and
  220 tokens at ratio 0.5 (budgets 100 and 110, every token stored) compile one decode
  loop, and generate what exactly sized caches generate."""
  from tiny import generated_counting_loops
  prompts = [random_prompts((n, n - 7), seed=9) for n in (200, 220)]
  kwargs = dict(method=TINY, compression_ratio=0.5, max_new_tokens=12)
  loops, padded = generated_counting_loops(model, prompts, **kwargs)
  monkeypatch.setattr(sentencekv, "shared_size", lambda count: count)
  exact_loops, exact = generated_counting_loops(model, prompts, **kwargs)
  assert (loops, exact_loops) == (1, 2)
  assert [r.token_ids for r in padded] == [r.token_ids for r in exact]
  for r, budget in zip(padded, (100, 110)):
    assert r.stats["method_stats"]["tokens_read_per_step"] == budget
    assert r.stats["method_stats"]["allocated_stored_tokens"] == [224, 224]


def test_decode_steps_keep_their_sentence_queries(model):
  # Through the model's decode step: each layer's open sentence sums its steps' queries
  # (the policy keeps the layer attend returns), and a sentence end empties it.
  from kvjax.generation import context, engine, inputs
  tokens, mask = inputs.left_pad(random_prompts([200, 170], seed=8), 0)
  pre = context.prefill(model, tokens, mask, TINY, 24, room=8,
                        method_params=TINY.context_params(None, tokens, mask))
  cache = pre.cache
  sentence_layers = lambda: [layer for layer in cache.layers
                             if isinstance(layer, SentenceLayerCache)]
  for fed in ([2, 2], [4, 4], [3, 5]):   # 3 ends a sentence, 2, 4 and 5 do not
    _, _, cache = engine.STEPS.decode(model, np.asarray(fed, np.int32), cache,
                                      jax.random.key(0), 1.0, 1.0, True, pre.decode_plan)
  assert sentence_layers()
  for layer in sentence_layers():
    assert layer.open_count.tolist() == [0, 3] and layer.closed.tolist() == [1, 0]
    sums = np.abs(np.asarray(layer.open_queries)).sum((1, 2))
    assert sums[0] == 0 and sums[1] > 0
  # A finished row's step (padding) adds nothing to its sentence.
  before = [np.asarray(layer.open_queries[1]) for layer in sentence_layers()]
  _, _, cache = engine.STEPS.decode(model, np.asarray([2, 6], np.int32), cache,
                                    jax.random.key(0), 1.0, 1.0, True, pre.decode_plan,
                                    active=[True, False])
  for layer, want in zip(sentence_layers(), before):
    assert layer.open_count.tolist() == [1, 3]
    np.testing.assert_array_equal(np.asarray(layer.open_queries[1]), want)
    assert np.abs(np.asarray(layer.open_queries[0])).sum() > 0


def test_the_layer_by_layer_prefill_passes_token_ids(model, monkeypatch):
  # A plain prefill on a compressed cache runs one layer per call (engine): the appended
  # chunk's ids reach the cache there too.
  from kvjax.generation import context, engine
  tokens = np.asarray(random_prompts([200], seed=7) * 2, np.int32)
  mask = np.ones(tokens.shape, bool)
  mask[1, :40] = False
  cache = context.prefill(model, tokens, mask, TINY, 24, room=8,
                          method_params=TINY.context_params(None, tokens, mask)).cache
  # Layers of one shape run one layer's executable (here the first, twice).
  cache = cache.replace(layers=(cache.layers[0], jax.tree.map(jnp.copy, cache.layers[0])))
  by_layer = []
  run = engine.CompiledSteps._prefill_by_layer
  monkeypatch.setattr(engine.CompiledSteps, "_prefill_by_layer",
                      lambda *a: (by_layer.append(1), run(*a))[1])
  question = jnp.asarray([[1, 3, 5, 6], [3, 2, 2, 2]], jnp.int32)
  _, cache = engine.CompiledSteps().prefill(model, question, jnp.ones((2, 4), bool), cache)
  assert by_layer and cache.layers[0].closed.tolist() == [2, 2]


@pytest.mark.parametrize("chunk_size, factor", [(None, 3.0), (40, 3.0), (None, 2.5)])
def test_budgets_that_round_alike_share_one_compiled_prefill_layer(model, chunk_size, factor,
                                                                   monkeypatch):
  """The prefill compacts by one compiled layer for every layer and every budget that
  rounds alike (other prompt lengths at one ratio): the budget traced, the pre-filter's
  stored count its float32 product (2.5 x 11 = 27.5 stores 27). It keeps exactly what the
  prefill compiled with each budget as one program keeps; chunked too, where the first
  chunk stores every candidate under the largest budget (48 of 40) and fewer under the
  others."""
  from kvjax.generation import context, engine, inputs
  monkeypatch.setattr(engine, "RANK_MULTIPLE", 8)
  tokens, mask = inputs.left_pad(random_prompts([100, 83], seed=3), 0, 120)
  method = dataclasses.replace(TINY, semantic_factor=factor)
  steps = engine.CompiledSteps()
  for keep in (9, 11, 16):   # all ranked at 16
    got = context.prefill(model, tokens, mask, method, keep, room=0, chunk_size=chunk_size,
                          steps=steps)
    with monkeypatch.context() as one_program:
      one_program.setattr(engine, "_layer_plan", lambda *args: None)
      own = engine.CompiledSteps()
      want = context.prefill(model, tokens, mask, method, keep, room=0,
                             chunk_size=chunk_size, steps=own)
    assert "compress_layer" not in [key[0] for key in own._executables]
    assert_same_tree((got.logits, got.cache), (want.logits, want.cache))
    assert got.method_stats == want.method_stats
    assert got.method_stats["stored_tokens"] == [int(factor * keep)] * 2
    assert min(got.method_stats["sentences"]) > 1
  names = [key[0] for key in steps._executables]
  assert "prefill" not in names
  # Unchunked, one layer for all; chunked, the first chunk's, then one for each budget's
  # capacity (the second and third chunks see it).
  assert names.count("compress_layer") == (1 if chunk_size is None else 1 + 3), names
  # Where float32 would round the stored count otherwise, the budget is compiled in.
  assert not SentenceKV(semantic_factor=1.3).traces_budget(90)
  assert SentenceKV(semantic_factor=1.3).traces_budget(100)


def test_chunked_prefill_stores_the_same_budget(model):
  prompts = random_prompts([300, 250], seed=4)
  out = kvjax.generate(model, prompts, method=TINY, budget=24, max_new_tokens=3,
                       prefill_chunk_size=64)
  assert out.stats["method_stats"]["stored_tokens"] == [72, 72]
  assert [len(t) for t in out.token_ids] == [3, 3]


def test_a_model_without_tokenizer_needs_boundary_ids(model):
  with pytest.raises(MethodError, match="boundary_ids"):
    kvjax.generate(model, random_prompts([100], seed=3), method="sentencekv", budget=40,
                   max_new_tokens=2)


@pytest.mark.parametrize("spec, match", [
    ("sentencekv:semantic_factor=0.5", "semantic_factor"), ("sentencekv:window=0", "window"),
    ("sentencekv:kernel_size=4", "kernel_size"), ("sentencekv:pooling=mean", "pooling"),
    ("sentencekv:start_budget=-1", "start_budget"),
    ("sentencekv:recent_budget=-1", "recent_budget"),
    ("sentencekv:length_threshold=-1", "length_threshold"), ("sentencekv:gqa=sum", "gqa"),
    ("sentencekv:offload=2", "offload")])
def test_bad_hyperparameters(spec, match):
  with pytest.raises(MethodError, match=match):
    kvjax.methods.get(spec)


@pytest.mark.parametrize("ids", [(-1,), [1, 2], (1.5,)])
def test_bad_boundary_ids(ids):
  with pytest.raises(MethodError, match="boundary_ids"):
    SentenceKV(boundary_ids=ids)


@pytest.mark.slow
def test_real_tokenizer_cuts_at_its_punctuation(smollm2_tokenizer):
  tok = smollm2_tokenizer
  text = "It rained. Did it stop? No!\n\nThen... we waited.\nDone"
  ids = tok.encode(text, add_special_tokens=False)
  ends = SentenceKV().boundaries(tok)
  assert tok.encode(".", add_special_tokens=False)[0] in ends
  pieces = [tok.decode([i]) for i in ids]
  # Restated from the token texts: a sentence ends after a token that is punctuation.
  want = np_sentences(list(range(len(ids))),
                      {i for i, piece in enumerate(pieces) if piece in PUNCTUATION})
  got = SentenceKV().context_params(tok, np.asarray([ids]), np.ones((1, len(ids)), bool))
  assert got["sentence"][0].tolist() == want and max(want) >= 4
