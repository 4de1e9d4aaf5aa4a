"""The blocked (flash) jnp attention against the one-matrix attention it replaces on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference

# (batch, queries, heads, kv heads, head dim, old slots, empty room, left padding per row,
#  block_q, block_k)
CASES = [
    (2, 200, 6, 2, 16, 0, 10, (0, 37), 64, 48),
    (1, 300, 4, 4, 8, 50, 7, (5,), 128, 64),
    (2, 129, 2, 1, 8, 0, 0, (0, 0), 512, 512),
    (3, 100, 6, 3, 8, 20, 40, (99, 3, 0), 32, 32),
]


def _inputs(batch, t, h, k, d, old, room, pads, seed=1):
  """A prefill chunk after `old` slots (arbitrary earlier positions) with `room` empty
  slots after it; row r left-padded by pads[r]."""
  rng = np.random.default_rng(seed)
  s = old + t + room
  q = rng.standard_normal((batch, t, h, d)).astype(np.float32)
  keys = rng.standard_normal((batch, k, s, d)).astype(np.float32)
  values = rng.standard_normal((batch, k, s, d)).astype(np.float32)
  qpos = np.zeros((batch, t), np.int32)
  kpos = np.full((batch, k, s), -1, np.int32)
  for r in range(batch):
    kpos[r, :, :old] = rng.permutation(old)
    pos = np.where(np.arange(t) >= pads[r], old + np.arange(t) - pads[r], -1)
    qpos[r] = pos
    kpos[r, :, old:old + t] = pos
  return q, keys, values, qpos, kpos


def _unblocked(q, keys, values, qpos, kpos):
  grouped = reference.group_heads(jnp.asarray(q), keys.shape[1])
  seen = reference.visible(jnp.asarray(qpos)[:, None, None, :], jnp.asarray(kpos)[:, :, None, :])
  return reference.grouped_attention(grouped, jnp.asarray(keys), jnp.asarray(values), seen)


def _check_against_unblocked(q, keys, values, qpos, kpos, block_q, block_k):
  """Blocked output, lse and column sums equal the one-matrix attention's."""
  want_out, want_lse, want_probs = _unblocked(q, keys, values, qpos, kpos)
  out, lse, sums = reference.blocked_attention(
      reference.group_heads(jnp.asarray(q), keys.shape[1]), jnp.asarray(keys),
      jnp.asarray(values), jnp.asarray(qpos), jnp.asarray(kpos), column_sums=True,
      block_q=block_q, block_k=block_k)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sums, want_probs.sum(3), rtol=1e-5, atol=2e-6)


def _empty_first(x, empty, value):
  """x [B, K, S, ...] after `empty` slots holding `value` (empty cache slots before a chunk)."""
  return np.concatenate([np.full(x.shape[:2] + (empty,) + x.shape[3:], value, x.dtype), x],
                        axis=2)


@pytest.mark.parametrize("case", CASES)
def test_blocked_equals_unblocked(case):
  *shape, block_q, block_k = case
  _check_against_unblocked(*_inputs(*shape), block_q, block_k)


def test_holes_padding_and_later_positions_inside_blocks():
  """Blocks where every query sees almost every slot: one empty slot (an evicted token),
  one padding query or one later position in a row must still be masked there."""
  q, keys, values, qpos, kpos = _inputs(2, 256, 4, 2, 8, 128, 0, (0, 0), seed=3)
  kpos[0, 1, 5] = -1                 # a hole in row 0's first old block, one head only
  qpos[1, 64] = kpos[1, :, 128 + 64] = -1   # a padding query inside row 1's prompt
  kpos[1, 0, 70] = 200               # a slot seen by no query before position 200
  _check_against_unblocked(q, keys, values, qpos, kpos, 32, 32)


@pytest.mark.parametrize("t", [96, 90])
def test_whole_blocks_beside_a_ragged_last_key_block(t):
  """Every query sees every slot here, so every block is whole but the ragged last key
  block: its window overlaps the block before, whose slots must not count twice (as they
  would unmasked). With 90 queries the last query block is part padding rows."""
  rng = np.random.default_rng(7)
  s = 100
  q = rng.standard_normal((1, t, 4, 8)).astype(np.float32)
  keys, values = (rng.standard_normal((1, 2, s, 8)).astype(np.float32) for _ in range(2))
  kpos = np.broadcast_to(rng.permutation(s).astype(np.int32), (1, 2, s)).copy()
  qpos = (200 + np.arange(t, dtype=np.int32))[None]
  _check_against_unblocked(q, keys, values, qpos, kpos, 32, 32)


def test_padding_queries_see_nothing():
  q, keys, values, qpos, kpos = _inputs(2, 200, 6, 2, 16, 0, 10, (0, 37))
  out, lse, _ = reference.blocked_attention(
      reference.group_heads(jnp.asarray(q), 2), jnp.asarray(keys), jnp.asarray(values),
      jnp.asarray(qpos), jnp.asarray(kpos), block_q=64, block_k=48)
  np.testing.assert_array_equal(np.asarray(out)[1, :, :, :37], 0.0)
  np.testing.assert_array_equal(np.asarray(lse)[1, :, :, :37], np.float32(reference.EMPTY_LSE))


def test_blocks_past_the_last_visible_one_are_never_read():
  """Key blocks after the causal diagonal and the empty room are skipped, not masked: NaN
  there would otherwise poison the online softmax."""
  t, block = 256, 64
  q, keys, values, qpos, kpos = _inputs(1, t, 4, 2, 8, 0, 3 * block, (0,))
  want_out = _unblocked(q, keys, values, qpos, kpos)[0]
  poisoned_k, poisoned_v = keys.copy(), values.copy()
  poisoned_k[:, :, t:] = np.nan
  poisoned_v[:, :, t:] = np.nan
  out, _, _ = reference.blocked_attention(
      reference.group_heads(jnp.asarray(q), 2), jnp.asarray(poisoned_k),
      jnp.asarray(poisoned_v), jnp.asarray(qpos), jnp.asarray(kpos), block_q=block,
      block_k=block)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=2e-6)


def test_a_ragged_last_block_reads_nothing_of_a_skipped_block():
  """The last key block of a cache that is not a whole number of blocks starts early,
  overlapping the block before it: when that block was skipped (empty), its slots must
  not reach the output (NaN there would poison p . v even at probability 0)."""
  t, empty, block = 20, 64, 32           # slots 0-63 empty, the chunk at 64-83: 84 slots
  q, keys, values, qpos, kpos = _inputs(1, t, 4, 2, 8, 0, 0, (0,), seed=6)
  want_out, _, want_probs = _unblocked(q, keys, values, qpos, kpos)
  out, _, sums = reference.blocked_attention(
      reference.group_heads(jnp.asarray(q), 2), jnp.asarray(_empty_first(keys, empty, np.nan)),
      jnp.asarray(_empty_first(values, empty, np.nan)), jnp.asarray(qpos),
      jnp.asarray(_empty_first(kpos, empty, -1)),
      column_sums=True, block_q=block, block_k=block)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(sums)[..., empty:], want_probs.sum(3), rtol=1e-5,
                             atol=2e-6)
  np.testing.assert_array_equal(np.asarray(sums)[..., :empty], 0.0)


def test_empty_blocks_before_the_chunk_are_never_read():
  """A compressing prefill attends over the cache's empty slots followed by the chunk: key
  blocks with no filled slot are skipped wherever they are (NaN there would poison)."""
  t, empty, block = 96, 64, 32
  q, keys, values, qpos, kpos = _inputs(1, t, 4, 2, 8, 0, 0, (0,), seed=5)
  want_out = _unblocked(q, keys, values, qpos, kpos)[0]
  out, _, _ = reference.blocked_attention(
      reference.group_heads(jnp.asarray(q), 2), jnp.asarray(_empty_first(keys, empty, np.nan)),
      jnp.asarray(_empty_first(values, empty, np.nan)), jnp.asarray(qpos),
      jnp.asarray(_empty_first(kpos, empty, -1)),
      block_q=block, block_k=block)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=2e-6)


def test_attention_takes_the_blocked_path_for_long_chunks(monkeypatch):
  """`attention` (what the model calls on CPU) runs blocked above BLOCKED_MIN_QUERIES and
  equals the unblocked attention either side of it."""
  jax.clear_caches()  # `attention` is jitted: a cached trace would not call the spy
  calls = []
  real = reference.blocked_attention
  monkeypatch.setattr(reference, "blocked_attention",
                      lambda *a, **k: calls.append(a[0].shape[3]) or real(*a, **k))
  short, long = reference.BLOCKED_MIN_QUERIES, reference.BLOCKED_MIN_QUERIES + 70
  for t in (short, long):
    q, keys, values, qpos, kpos = _inputs(2, t, 6, 3, 8, 5, 9, (3, 0))
    out, sums = reference.attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values),
                                    jnp.asarray(qpos), jnp.asarray(kpos), column_sums=True)
    want_out, _, want_probs = _unblocked(q, keys, values, qpos, kpos)
    np.testing.assert_allclose(out, reference.ungroup_heads(want_out), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(sums, want_probs.sum(3).reshape(2, 6, -1), rtol=1e-5,
                               atol=2e-6)
  assert calls == [long]


@pytest.mark.parametrize("rows", [1, 2])
def test_decode_products_equal_the_dot_at_highest_precision(rows):
  """One query per head runs as fused products at batch 1 and as dots (keys x queries,
  swapped) from batch 2 on; both must equal the plain einsum and numpy's softmax-weighted
  values."""
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((2, 3, 2, 16)), jnp.float32)
  keys = jnp.asarray(rng.standard_normal((2, 3, 40, 16)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((2, 3, 40, 16)), jnp.float32)
  kpos = jnp.asarray(np.where(np.arange(40) < 33, np.arange(40), -1)[None, None].repeat(3, 1)
                     .repeat(2, 0))
  qpos = jnp.asarray([32, 20])
  q, keys, values, kpos, qpos = q[:rows], keys[:rows], values[:rows], kpos[:rows], qpos[:rows]
  out, lse, probs = reference.decode_attention(q, keys, values, kpos, qpos, upcast=False)
  seen = reference.visible(qpos[:, None, None, None], kpos[:, :, None, :])
  q5 = q[:, :, :, None]
  logits = jnp.einsum("bkgtd,bksd->bkgts", q5, keys, precision="highest") * 16 ** -0.5
  want_probs = np.where(seen, np.exp(logits - logits.max(-1, keepdims=True)), 0)
  want_probs = want_probs / want_probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(probs, want_probs[:, :, :, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, np.einsum("bkgs,bksd->bkgd", want_probs[:, :, :, 0], values),
                             rtol=1e-5, atol=1e-5)


# Old slots, then a 90-token chunk, in 32 x 32 blocks: most blocks are whole (unmasked),
# the last key and query blocks are ragged.
WHOLE_BLOCKS_CASE = (1, 90, 4, 2, 8, 100, 0, (0,), 32, 32)


@pytest.mark.parametrize("case", [CASES[0], WHOLE_BLOCKS_CASE])
def test_blocked_attention_is_differentiable_like_the_unblocked(case):
  """Training runs through the model's attention (X-EcoMLA distillation, LoCoCo): the
  blocked path's gradients equal the one-matrix attention's, skipped and whole blocks
  included."""
  *shape, block_q, block_k = case
  q, keys, values, qpos, kpos = _inputs(*shape)
  weights = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)

  def loss(q, keys, values, blocked):
    if blocked:
      out = reference.blocked_attention(reference.group_heads(q, keys.shape[1]), keys, values,
                                        jnp.asarray(qpos), jnp.asarray(kpos),
                                        block_q=block_q, block_k=block_k)[0]
    else:
      out = _unblocked(q, keys, values, qpos, kpos)[0]
    out = jnp.where(jnp.asarray(qpos)[:, None, None, :, None] >= 0, out, 0.0)
    return jnp.sum(reference.ungroup_heads(out) * weights)

  args = tuple(jnp.asarray(x) for x in (q, keys, values))
  got = jax.grad(loss, argnums=(0, 1, 2))(*args, True)
  want = jax.grad(loss, argnums=(0, 1, 2))(*args, False)
  for g, w in zip(got, want):
    assert np.abs(np.asarray(w)).max() > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4)
