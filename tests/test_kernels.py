"""Pallas kernels against their pure-jnp references, plus TPU/CUDA export checks.

Numerics run in interpret mode on CPU at small shapes (S not a multiple of the block,
several chunks per row); export tests lower at realistic shapes without executing.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

import kernel_inputs
from kernel_inputs import close, shuffled_positions

from pallas_kernels import backend
from pallas_kernels import compaction
from pallas_kernels import decode_attention as da
from pallas_kernels import flash_attention as fa
from pallas_kernels import reference
from pallas_kernels import vertical_slash as vs
from pallas_kernels import window_scores as ws

def _normal(rng, shape, dtype):
  return jnp.asarray(rng.normal(size=shape), dtype)


# ---------------------------------------------------------------------------- decode


@pytest.mark.parametrize("g,dtype,return_probs", [
    (1, jnp.float32, True), (3, jnp.float32, True), (4, jnp.bfloat16, True),
    (3, jnp.bfloat16, False)])
def test_decode_attention_matches_reference(g, dtype, return_probs):
  rng = kernel_inputs.rng(g)
  b, k, s, d = 3, 2, 100, 32
  q = _normal(rng, (b, k, g, d), dtype)
  keys, values = _normal(rng, (b, k, s, d), dtype), _normal(rng, (b, k, s, d), dtype)
  pos = shuffled_positions(rng, (b, k, s))
  pos[2, 1] = -1  # a head with no slot at all
  qpos = jnp.array([70, -1, 99], jnp.int32)  # row 1 is a padding query
  got = da.decode_attention(q, keys, values, jnp.asarray(pos), qpos,
                            return_probs=return_probs, block_k=16)
  want = reference.decode_attention(q, keys, values, jnp.asarray(pos), qpos)
  assert got[0].shape == (b, k, g, d) and got[0].dtype == dtype
  assert len(got) == (3 if return_probs else 2)
  for a, e in zip(got, want):
    assert np.isfinite(np.asarray(a, np.float32)).all()
    close(a, e, dtype)
  # Fully masked rows: zeros, EMPTY_LSE, zero probabilities.
  assert (np.asarray(got[0][1], np.float32) == 0).all() and (np.asarray(got[0][2, 1]) == 0).all()
  np.testing.assert_array_equal(got[1][1], np.float32(da.EMPTY_LSE))
  if return_probs:
    assert (np.asarray(got[2])[np.asarray(pos)[:, :, None, :].repeat(g, 2) < 0] == 0).all()


@pytest.mark.parametrize("key_chunk", [16, 64, 128])
def test_decode_attention_key_chunk_matches_reference(key_chunk):
  """Any chunking of the slots over grid programs (one block each up to the whole cache)
  merges to the same attention."""
  rng = kernel_inputs.rng(key_chunk)
  b, k, g, s, d = 2, 2, 4, 100, 32
  q, keys, values = (_normal(rng, sh, jnp.float32) for sh in
                     [(b, k, g, d), (b, k, s, d), (b, k, s, d)])
  pos = jnp.asarray(shuffled_positions(rng, (b, k, s)))
  qpos = jnp.array([60, 99], jnp.int32)
  got = da.decode_attention(q, keys, values, pos, qpos, return_probs=True, block_k=16,
                            key_chunk=key_chunk)
  for a, e in zip(got, reference.decode_attention(q, keys, values, pos, qpos)):
    close(a, e, jnp.float32)


@pytest.mark.parametrize("kwargs", [dict(key_chunk=64), dict(block_k=16, key_chunk=24),
                                    dict(block_k=16, key_chunk=0)])
def test_decode_attention_rejects_bad_key_chunk(kwargs):
  q, keys, values, pos, qpos = (jnp.zeros(sh, dt) for sh, dt in [
      ((1, 1, 1, 16), jnp.float32), ((1, 1, 64, 16), jnp.float32),
      ((1, 1, 64, 16), jnp.float32), ((1, 1, 64), jnp.int32), ((1,), jnp.int32)])
  with pytest.raises(ValueError, match="key.chunk"):
    da.decode_attention(q, keys, values, pos, qpos, **kwargs)


def test_key_tiling_takes_an_explicit_chunk_and_rejects_a_bad_one():
  tile = functools.partial(backend.tile_keys, default_block=da._DEFAULT_BLOCK,
                           chunk_blocks=da._CHUNK_BLOCKS)
  cuda = backend.Target("cuda")
  assert tile(cuda, 8192, None).chunk == 64 * da._CHUNK_BLOCKS["gpu"]  # the GPU default
  t = tile(cuda, 8000, 64, chunk=2048)
  assert (t.block, t.chunk, t.padded, t.num_chunks) == (64, 2048, 8192, 4)
  for chunk in (0, 96, 64.0):
    with pytest.raises(ValueError, match="multiple of the block size 64"):
      tile(cuda, 8192, 64, chunk=chunk)


def test_decode_attention_default_blocks_tpu_interpreter():
  """TPU semantics (block shapes, DMA) on the TPU interpreter with TPU block sizes."""
  rng = kernel_inputs.rng(7)
  b, k, g, s, d = 1, 2, 4, 200, 32
  q, keys, values = (_normal(rng, sh, jnp.float32) for sh in
                     [(b, k, g, d), (b, k, s, d), (b, k, s, d)])
  pos = jnp.asarray(shuffled_positions(rng, (b, k, s)))
  qpos = jnp.array([150], jnp.int32)
  got = da.decode_attention(q, keys, values, pos, qpos, return_probs=True,
                            interpret=pltpu.InterpretParams())
  for a, e in zip(got, reference.decode_attention(q, keys, values, pos, qpos)):
    close(a, e, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_flat_uneven_segments(dtype):
  rng = kernel_inputs.rng(11)
  b, k, g, d = 2, 3, 4, 32
  sizes = [(40, 5, 27), (12, 50, 3)]  # uneven per-head budgets per row
  n = max(sum(row) for row in sizes) + 7  # plus unowned slots
  heads = np.full((b, n), -1, np.int32)
  for r, row in enumerate(sizes):
    heads[r, :sum(row)] = np.repeat(np.arange(k), row)
  heads[1] = heads[1, rng.permutation(n)]  # row 1: slots interleaved across heads
  pos = shuffled_positions(rng, (b, n), empty=0.1)
  q = _normal(rng, (b, k, g, d), dtype)
  keys, values = _normal(rng, (b, n, d), dtype), _normal(rng, (b, n, d), dtype)
  qpos = jnp.array([60, 20], jnp.int32)
  args = (q, keys, values, jnp.asarray(pos), jnp.asarray(heads), qpos)
  got = da.decode_attention_flat(*args, return_probs=True, block_k=16)
  want = reference.decode_attention_flat(*args)
  assert got[2].shape == (b, k, g, n)
  for a, e in zip(got, want):
    assert np.isfinite(np.asarray(a, np.float32)).all()
    close(a, e, dtype)
  other = heads[:, None, None, :] != np.arange(k)[None, :, None, None]
  assert (np.asarray(got[2])[np.broadcast_to(other, got[2].shape)] == 0).all()


def test_merge_partials_equals_attention_over_concatenation():
  """Cache part through the kernel, the new token's key outside it, merged exactly."""
  rng = kernel_inputs.rng(3)
  b, k, g, s, d = 3, 2, 3, 100, 32
  q = _normal(rng, (b, k, g, d), jnp.float32)
  keys, values = (_normal(rng, (b, k, s + 1, d), jnp.float32) for _ in range(2))
  pos = shuffled_positions(rng, (b, k, s + 1))
  pos[..., s] = 100  # the new token
  pos[1, :, :s] = -1  # row 1: empty cache, only the new token
  qpos = jnp.array([100, 100, 100], jnp.int32)
  pos = jnp.asarray(pos)
  # Same shapes and options as a case above, so the compiled kernel is reused.
  out_a, lse_a, _ = da.decode_attention(q, keys[:, :, :s], values[:, :, :s], pos[..., :s],
                                        qpos, return_probs=True, block_k=16)
  out_b, lse_b, _ = reference.decode_attention(q, keys[:, :, s:], values[:, :, s:],
                                               pos[..., s:], qpos)
  out, lse = da.merge_partials(out_a, lse_a, out_b, lse_b)
  want_out, want_lse, _ = reference.decode_attention(q, keys, values, pos, qpos)
  close(out, want_out, jnp.float32)
  close(lse, want_lse, jnp.float32)
  # Merging with an empty side is the identity; two empty sides stay empty.
  empty = jnp.full_like(lse_a, da.EMPTY_LSE)
  same, same_lse = da.merge_partials(out_a, lse_a, jnp.zeros_like(out_a), empty)
  close(same, out_a, jnp.float32)
  close(same_lse, lse_a, jnp.float32)
  none, none_lse = da.merge_partials(jnp.zeros_like(out_a), empty, jnp.zeros_like(out_a), empty)
  assert (np.asarray(none) == 0).all()
  np.testing.assert_array_equal(none_lse, np.float32(da.EMPTY_LSE))


# ---------------------------------------------------------------------- window scores


def _window_inputs(rng, b, k, g, w, s, d, dtype):
  q = _normal(rng, (b, k * g, w, d), dtype)
  keys = _normal(rng, (b, k, s, d), dtype)
  pos = shuffled_positions(rng, (b, k, s))
  qpos = np.stack([np.arange(s - w, s) for _ in range(b)]).astype(np.int32)
  qpos[0] -= 40  # causal mask inside the window
  qpos[-1, :3] = -1  # padding queries
  return q, keys, jnp.asarray(pos), jnp.asarray(qpos)


@pytest.mark.parametrize("pooling,gqa,g,kernel_size,dtype", [
    ("max", "mean", 3, 7, jnp.float32),
    ("avg", "max", 4, 5, jnp.bfloat16),
    ("none", "sum", 1, 7, jnp.float32),
    ("max", "sum", 4, 71, jnp.float32),  # halo wider than the CPU pooling block
])
def test_window_scores_matches_reference(pooling, gqa, g, kernel_size, dtype):
  rng = kernel_inputs.rng(kernel_size + g)
  args = _window_inputs(rng, 2, 2, g, 12, 100, 32, dtype)
  got = ws.window_scores(*args, pooling=pooling, kernel_size=kernel_size, gqa=gqa,
                         block_k=16)
  want = reference.window_scores(*args, pooling=pooling, kernel_size=kernel_size, gqa=gqa)
  assert isinstance(got, ws.WindowScores)
  assert got.sums.shape == (2, 2 * g, 100) and got.scores.shape == (2, 2, 100)
  for a, e in zip(got, want):
    assert np.isfinite(np.asarray(a)).all()
    # Scores are sums of probabilities (up to W per slot): compare relative to scale.
    close(a / max(float(jnp.max(e)), 1e-6), e / max(float(jnp.max(e)), 1e-6), dtype)


def test_window_scores_all_padding_rows_and_tpu_interpreter():
  """A batch row with only padding queries gives zeros; TPU block sizes on the interpreter."""
  rng = kernel_inputs.rng(5)
  q, keys, pos, qpos = _window_inputs(rng, 2, 2, 2, 8, 200, 32, jnp.float32)
  qpos = qpos.at[1].set(-1)
  got = ws.window_scores(q, keys, pos, qpos, interpret=pltpu.InterpretParams())
  want = reference.window_scores(q, keys, pos, qpos)
  for a, e in zip(got, want):
    close(a, e, jnp.float32)
  assert all((np.asarray(x[1]) == 0).all() for x in got)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pooling="mean"), "pooling must be one of"),
    (dict(gqa="min"), "gqa must be one of"),
    (dict(kernel_size=4), "kernel_size must be an odd positive int, got 4"),
    (dict(kernel_size=0), "kernel_size must be an odd positive int, got 0"),
])
def test_window_scores_rejects_bad_arguments(kwargs, match):
  args = _window_inputs(kernel_inputs.rng(0), 1, 1, 1, 4, 16, 16, jnp.float32)
  with pytest.raises(ValueError, match=match):
    ws.window_scores(*args, **kwargs)


# ------------------------------------------------------------------------- compaction


@pytest.mark.parametrize("dtype,block_n", [(jnp.float32, None), (jnp.bfloat16, 16)])
def test_gather_slots_exact(dtype, block_n):
  rng = kernel_inputs.rng(13)
  r, m, n, d = 3, 300, 70, 24
  src = jnp.asarray(rng.normal(size=(r, m, d)) * 1e3, dtype)
  idx = np.stack([rng.permutation(m)[:n] for _ in range(r)]).astype(np.int32)
  idx[rng.random(idx.shape) < 0.2] = -1
  got = compaction.gather_slots(src, jnp.asarray(idx), block_n=block_n)
  assert got.dtype == dtype and got.shape == (r, n, d)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(reference.gather_slots(src, jnp.asarray(idx)),
                                           np.float32))
  pos = jnp.asarray(rng.integers(0, 1000, (r, m)), jnp.int32)
  taken = compaction.gather_slot_values(pos, jnp.asarray(idx), fill=-1)
  np.testing.assert_array_equal(taken, np.where(idx >= 0, np.take_along_axis(
      np.asarray(pos), np.maximum(idx, 0), 1), -1))


def test_gather_slots_tpu_interpreter():
  rng = kernel_inputs.rng(17)
  src = jnp.asarray(rng.normal(size=(2, 300, 128)), jnp.bfloat16)
  idx = jnp.asarray(np.stack([rng.permutation(300)[:40] for _ in range(2)]), jnp.int32)
  got = compaction.gather_slots(src, idx, interpret=pltpu.InterpretParams())
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(reference.gather_slots(src, idx), np.float32))


# ---------------------------------------------------------------------------- exports

B, K, G, S, D, W = 2, 8, 4, 4096, 128, 32
_BF = jnp.bfloat16
_I32 = jnp.int32
_SD = jax.ShapeDtypeStruct
_DENSE = (_SD((B, K, G, D), _BF), _SD((B, K, S, D), _BF), _SD((B, K, S, D), _BF),
          _SD((B, K, S), _I32), _SD((B,), _I32))
_N = K * S // 2
_FLAT = (_SD((B, K, G, D), _BF), _SD((B, _N, D), _BF), _SD((B, _N, D), _BF),
         _SD((B, _N), _I32), _SD((B, _N), _I32), _SD((B,), _I32))
# Prefill: a chunk of S/2 queries over a cache of S slots.
_FLASH = (_SD((B, S // 2, K * G, D), _BF), _SD((B, K, S, D), _BF), _SD((B, K, S, D), _BF),
          _SD((B, S // 2), _I32), _SD((B, K, S), _I32))
# LoopServe's sparse prefill: the flash shapes plus each head's chosen lines.
_LINES = _FLASH + (_SD((B, K * G, S), jnp.bool_), _SD((B, K * G, S), jnp.bool_))
_WINDOW = (_SD((B, K * G, W, D), _BF), _SD((B, K, S, D), _BF), _SD((B, K, S), _I32),
           _SD((B, W), _I32))

EXPORTS = {
    "decode": (da.decode_attention, _DENSE),
    "decode_probs": (functools.partial(da.decode_attention, return_probs=True), _DENSE),
    "decode_flat_probs": (functools.partial(da.decode_attention_flat, return_probs=True),
                          _FLAT),
    "flash": (fa.flash_attention, _FLASH),
    "vertical_slash": (functools.partial(vs.vertical_slash_attention, max_vertical=1000,
                                         max_slash=200), _LINES),
    "window_max_mean": (ws.window_scores, _WINDOW),
    "window_avg_max": (functools.partial(ws.window_scores, pooling="avg", gqa="max"),
                       _WINDOW),
    "window_none_sum": (functools.partial(ws.window_scores, pooling="none", gqa="sum"),
                        _WINDOW),
    "gather_dense": (compaction.gather_slots, (_SD((B * K, S, D), _BF),
                                               _SD((B * K, S // 2), _I32))),
    "gather_flat": (compaction.gather_slots, (_SD((B, K * S, D), _BF),
                                              _SD((B, K * S // 2), _I32))),
    "gather_f32": (compaction.gather_slots, (_SD((B * K, S, D), jnp.float32),
                                             _SD((B * K, S // 2), _I32))),
}
# Pallas' Triton custom call has no cross-version compatibility guarantee, so export
# refuses it unless told; the module still holds the lowered Triton kernel.
_TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
_MARKER = {"tpu": "tpu_custom_call", "cuda": "xla.gpu.triton"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_kernels_export(name, platform):
  fn, structs = EXPORTS[name]
  exported = jax.export.export(jax.jit(fn), platforms=[platform],
                               disabled_checks=[_TRITON])(*structs)
  # The real compiled kernel, not the CPU interpreter picked by jax.default_backend().
  assert _MARKER[platform] in exported.mlir_module()
