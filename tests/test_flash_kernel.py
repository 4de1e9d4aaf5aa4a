"""The prefill flash-attention kernel against `reference.attention` (interpret mode on CPU).

Export to TPU and CUDA at a realistic shape is in test_kernels.py's EXPORTS list.
"""

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

import kernel_inputs
from kernel_inputs import close, shuffled_positions

from kvjax.ops import attention as attention_ops
from pallas_kernels import flash_attention as fa
from pallas_kernels import reference


def _normal(rng, shape, dtype):
  return jnp.asarray(rng.normal(size=shape), dtype)


def _cache(rng, b, k, t, old, empty, pad):
  """Positions of a prefill chunk of t queries over a cache: `old` slots at positions
  0..old-1 before the chunk, the chunk's own slots, then `empty` slots; the first pad[r]
  tokens of row r are left padding (position -1 in both)."""
  qpos = np.tile(np.arange(old, old + t, dtype=np.int32), (b, 1))
  kpos = np.concatenate([np.arange(old + t), np.full(empty, -1)]).astype(np.int32)
  kpos = np.tile(kpos, (b, k, 1))
  for r, n in enumerate(pad):
    qpos[r, :n] = -1
    kpos[r, :, :n] = -1
  return jnp.asarray(qpos), kpos


def _inputs(rng, b, t, h, k, s, d, dtype):
  return (_normal(rng, (b, t, h, d), dtype), _normal(rng, (b, k, s, d), dtype),
          _normal(rng, (b, k, s, d), dtype))


CASES = {
    # T not a multiple of the blocks, one head per KV head, left padding in row 1.
    "g1_padding_f32": dict(b=2, t=37, h=3, k=3, old=0, empty=0, pad=(0, 9),
                           dtype=jnp.float32, blocks=dict(block_q=16, block_k=16)),
    # GQA with a group that is no power of two; old slots before, empty slots after.
    "g3_cache_bf16": dict(b=2, t=21, h=6, k=2, old=40, empty=19, pad=(0, 5),
                          dtype=jnp.bfloat16, blocks=dict(block_q=16, block_k=16)),
    # Several key chunks merged by their log-sum-exp (TPU's layout), platform row tiles.
    "g4_chunks_f32": dict(b=1, t=30, h=8, k=2, old=50, empty=33, pad=(3,),
                          dtype=jnp.float32, blocks=dict(block_k=16, key_chunk=32)),
    "g2_chunks_bf16": dict(b=2, t=45, h=4, k=2, old=7, empty=12, pad=(0, 20),
                           dtype=jnp.bfloat16, blocks=dict(block_q=32, block_k=16,
                                                           key_chunk=48)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_attention_matches_reference(name):
  c = CASES[name]
  rng = kernel_inputs.rng(len(name))
  s = c["old"] + c["t"] + c["empty"]
  q, keys, values = _inputs(rng, c["b"], c["t"], c["h"], c["k"], s, 32, c["dtype"])
  qpos, kpos = _cache(rng, c["b"], c["k"], c["t"], c["old"], c["empty"], c["pad"])
  kpos = jnp.asarray(kpos)
  got = fa.flash_attention(q, keys, values, qpos, kpos, **c["blocks"])
  want = reference.attention(q, keys, values, qpos, kpos)
  assert got.shape == q.shape and got.dtype == q.dtype
  assert np.isfinite(np.asarray(got, np.float32)).all()
  close(got, want, c["dtype"])
  # Padding queries see nothing: exactly zero.
  for r, n in enumerate(c["pad"]):
    assert (np.asarray(got[r, :n], np.float32) == 0).all()


def test_flash_attention_shuffled_slots():
  """A compressed cache: slots hold positions out of order, some empty, one head empty."""
  rng = kernel_inputs.rng(23)
  b, t, h, k, s, d = 2, 19, 4, 2, 70, 32
  q, keys, values = _inputs(rng, b, t, h, k, s, d, jnp.float32)
  kpos = shuffled_positions(rng, (b, k, s))
  kpos[1, 0] = -1
  qpos = jnp.asarray(np.stack([np.arange(40, 40 + t), np.arange(60, 60 + t)]), jnp.int32)
  got = fa.flash_attention(q, keys, values, qpos, jnp.asarray(kpos), block_q=16,
                           block_k=16)
  close(got, reference.attention(q, keys, values, qpos, jnp.asarray(kpos)), jnp.float32)
  assert (np.asarray(got[1, :, :2]) == 0).all()  # query heads 0-1 read the empty KV head


def test_flash_attention_skips_unseen_blocks():
  """NaN values in whole blocks no query can see (left padding, empty tail) never reach the
  output: those blocks are not read. The reference gets zeros there (they are invisible)."""
  rng = kernel_inputs.rng(29)
  b, t, h, k, d, bk = 2, 24, 4, 2, 32, 16
  qpos, kpos = _cache(rng, b, k, t, old=8, empty=32, pad=(0, 16))
  s = kpos.shape[-1]
  q, keys, values = _inputs(rng, b, t, h, k, s, d, jnp.float32)
  blocks = kpos.reshape(b, k, -1, bk)
  unseen = np.repeat((blocks < 0).all(-1), bk, axis=-1)  # [B, K, S]: whole empty blocks
  assert unseen[1, :, :16].all() and unseen[:, :, -32:].all()
  poisoned = [jnp.where(unseen[..., None], jnp.nan, x) for x in (keys, values)]
  got = fa.flash_attention(q, *poisoned, qpos, jnp.asarray(kpos), block_q=16, block_k=bk)
  assert np.isfinite(np.asarray(got)).all()
  close(got, reference.attention(q, keys, values, qpos, jnp.asarray(kpos)), jnp.float32)


def test_block_ranges_skip_above_the_diagonal():
  """Slots in position order: a row tile visits exactly the key blocks up to its last
  query's position, from the first block holding a non-empty slot."""
  b, k, bk, rows_per_tile = 1, 1, 16, 16
  kpos = np.arange(128, dtype=np.int32)
  kpos[:20] = -1  # left padding: block 0 is empty, block 1 partly
  qpos = np.arange(128, dtype=np.int32)
  lo, hi = fa.block_ranges(jnp.asarray(qpos[None]), jnp.asarray(kpos[None, None]),
                           rows_per_tile, bk)
  lo, hi = np.asarray(lo[0, 0]), np.asarray(hi[0, 0])
  # Tile 0 (queries 0-15) sees nothing: slots start at position 20.
  assert hi[0] <= lo[0]
  # Tile u (queries up to 16u + 15) visits blocks 1..u: block 0 is empty, the rest lie above.
  np.testing.assert_array_equal(lo[1:], 1)
  np.testing.assert_array_equal(hi[1:], np.arange(1, 8) + 1)
  # A tile of padding rows only (position -1) visits nothing.
  qpos[:16] = -1
  lo, hi = fa.block_ranges(jnp.asarray(qpos[None]), jnp.asarray(kpos[None, None]),
                           rows_per_tile, bk)
  assert hi[0, 0, 0] <= lo[0, 0, 0]


def test_flash_attention_tpu_interpreter():
  """TPU semantics (SMEM block ranges, (8, 128) blocks, key chunks) with TPU defaults."""
  rng = kernel_inputs.rng(31)
  b, t, h, k, d = 1, 24, 4, 2, 32
  qpos, kpos = _cache(rng, b, k, t, old=200, empty=90, pad=(0,))
  s = kpos.shape[-1]
  q, keys, values = _inputs(rng, b, t, h, k, s, d, jnp.float32)
  kpos = jnp.asarray(kpos)
  for blocks in (dict(), dict(block_k=128, key_chunk=128)):
    got = fa.flash_attention(q, keys, values, qpos, kpos, interpret=pltpu.InterpretParams(),
                             **blocks)
    close(got, reference.attention(q, keys, values, qpos, kpos), jnp.float32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=24), "block_q must be a positive power of two"),
    (dict(block_k=0), "block_k must be a positive power of two"),
    (dict(key_chunk=64), "key_chunk=64 must be a positive multiple of an explicit block_k"),
    (dict(block_k=16, key_chunk=40), "key_chunk=40 must be a positive multiple"),
])
def test_flash_attention_rejects_bad_blocks(kwargs, match):
  rng = kernel_inputs.rng(0)
  q, keys, values = _inputs(rng, 1, 4, 2, 1, 8, 16, jnp.float32)
  qpos, kpos = _cache(rng, 1, 1, 4, old=4, empty=0, pad=(0,))
  with pytest.raises(ValueError, match=match):
    fa.flash_attention(q, keys, values, qpos, jnp.asarray(kpos), **kwargs)


def test_attend_runs_the_kernel_when_pallas_is_on(monkeypatch):
  """ops.attend dispatches prefill to the kernel under KVJAX_PALLAS=1 (column sums stay
  on the reference, which computes them)."""
  rng = kernel_inputs.rng(37)
  qpos, kpos = _cache(rng, 1, 2, 12, old=5, empty=3, pad=(2,))
  q, keys, values = _inputs(rng, 1, 12, 4, 2, kpos.shape[-1], 16, jnp.float32)
  kpos = jnp.asarray(kpos)
  calls = []
  real = fa.flash_attention
  monkeypatch.setattr(fa, "flash_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
  monkeypatch.setenv("KVJAX_PALLAS", "1")
  got = attention_ops.attend(q, keys, values, qpos, kpos)
  out, sums = attention_ops.attend(q, keys, values, qpos, kpos, column_sums=True)
  assert calls == [1]
  want, want_sums = reference.attention(q, keys, values, qpos, kpos, column_sums=True)
  close(got, want, jnp.float32)
  close(out, want, jnp.float32)
  close(sums, want_sums, jnp.float32)
