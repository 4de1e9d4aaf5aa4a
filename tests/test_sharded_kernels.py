"""Pallas kernels on a sharded model (kvjax.ops.sharded): under a placement each kernel runs
per shard through jax.shard_map (rows split like the batch, KV heads like the cache) and
gives the unsharded kernel's result; a sharded model generating with the kernels gives
the unsharded tokens. Kernels run interpreted on the 8 emulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kernel_inputs import close, rng, shuffled_positions
from kvjax import sharding
from kvjax.cache import gear as gear_cache
from kvjax.cache.kv_cache import LayerCache
from kvjax.ops import attention as ops
from kvjax.ops import channel_pruned as pruned_ops
from kvjax.ops import cross_layer as cross_ops
from kvjax.ops import gear as gear_ops
from kvjax.ops import merge as merge_ops
from kvjax.ops import quantization as quant_ops
from kvjax.ops import sharded as sharded_ops
from kvjax.ops.sharded import kernels_on
from tiny import random_prompts, tiny_model


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
  monkeypatch.setenv("KVJAX_PALLAS", "1")
  jax.clear_caches()   # traces made on the jnp path must not be replayed
  yield
  jax.clear_caches()


def _placement(spec):
  return sharding.Placement(sharding.make_mesh(spec))


def _run(fn, placement, *args):
  """fn(*args) jitted, traced under `placement` (None: unsharded); (result, jaxpr text)."""
  def traced(*a):
    with kernels_on(placement):
      return fn(*a)
  if placement is not None:
    args = [jax.device_put(x, placement.rows_sharding(x.shape)) for x in args]
  return jax.jit(traced)(*args), str(jax.make_jaxpr(traced)(*args))


def _record_shapes(monkeypatch, module, name, axes=(0, 1)):
  """Replaces module.name by a wrapper that records its first argument's `axes` sizes (the
  per-shard shape, when it runs inside shard_map)."""
  seen, real = [], getattr(module, name)

  def recording(*args, **kwargs):
    seen.append(tuple(args[0].shape[a] for a in axes))
    return real(*args, **kwargs)
  monkeypatch.setattr(module, name, recording)
  return seen


def _dense_inputs(seed, b=4, t=1, k=4, g=2, s=40, d=16):
  r = rng(seed)
  q = jnp.asarray(r.normal(size=(b, t, k * g, d)), jnp.float32)
  keys = jnp.asarray(r.normal(size=(b, k, s, d)), jnp.float32)
  values = jnp.asarray(r.normal(size=(b, k, s, d)), jnp.float32)
  kpos = jnp.asarray(shuffled_positions(r, (b, k, s)))
  qpos = jnp.asarray(np.tile(np.arange(s - t, s, dtype=np.int32), (b, 1)))
  return q, keys, values, qpos, kpos


# KV heads 4 split over model:4 and model:2; 3 KV heads stay whole on model:4 (replicated).
@pytest.mark.parametrize("spec, kv_heads", [("data:2,model:4", 4), ("data:4,model:2", 4),
                                            ("data:2,model:4", 3), ("data:8", 4)])
def test_decode_kernel_per_shard_equals_unsharded(spec, kv_heads, monkeypatch):
  q, keys, values, qpos, kpos = _dense_inputs(0, b=8, k=kv_heads)
  decode = lambda *a: ops.decode(*a, return_probs=True)
  want, plain = _run(decode, None, q, keys, values, qpos, kpos)
  seen = _record_shapes(monkeypatch, ops.decode_kernels, "decode_attention")
  got, jaxpr = _run(decode, _placement(spec), q, keys, values, qpos, kpos)
  assert "shard_map" in jaxpr and "shard_map" not in plain
  # Each shard's kernel sees its rows and, where the mesh divides them, its KV heads.
  sizes = sharding.parse_mesh_spec(spec, 8)
  model = sizes["model"] if kv_heads % sizes["model"] == 0 else 1
  assert set(seen) == {(8 // sizes["data"], kv_heads // model)}
  for a, b in zip(got, want):
    close(a, b, jnp.float32)
  ref = ops.reference.decode_attention(ops.group_heads(q, kv_heads)[..., 0, :], keys, values,
                                       kpos, qpos[:, 0])
  close(got[0][:, 0], np.asarray(ref[0]).reshape(got[0][:, 0].shape), jnp.float32)


@pytest.mark.parametrize("spec", ["data:2,model:4", "model:2"])
def test_flash_kernel_per_shard_equals_unsharded(spec, monkeypatch):
  q, keys, values, qpos, kpos = _dense_inputs(1, b=2, t=24, k=4, g=2, s=40)
  want, _ = _run(ops.attend, None, q, keys, values, qpos, kpos)
  seen = _record_shapes(monkeypatch, ops.flash_attention, "flash_attention", axes=(0, 2))
  got, jaxpr = _run(ops.attend, _placement(spec), q, keys, values, qpos, kpos)
  assert "shard_map" in jaxpr
  sizes = sharding.parse_mesh_spec(spec, 8)
  # Rows split over data, the 8 query heads with their 4 KV heads over model.
  assert set(seen) == {(2 // sizes["data"], 8 // sizes["model"])}
  close(got, want, jnp.float32)
  close(got, ops.reference.attention(q, keys, values, qpos, kpos), jnp.float32)


@pytest.mark.parametrize("spec", ["data:2,model:4", "model:2"])
def test_vertical_slash_kernel_per_shard_equals_unsharded(spec, monkeypatch):
  """LoopServe's sparse prefill kernel: each head's lines travel with its KV head."""
  q, keys, values, qpos, kpos = _dense_inputs(4, b=2, t=24, k=4, g=2, s=40)
  r = rng(5)
  vertical, slash = (jnp.asarray(r.random((2, 8, 40)) < 0.2) for _ in range(2))
  sparse = lambda *a: ops.vertical_slash(*a, vertical, slash, 16, 16, 128)
  want, _ = _run(sparse, None, q, keys, values, qpos, kpos)
  seen = _record_shapes(monkeypatch, ops.vs_kernels, "vertical_slash_attention", axes=(0, 2))
  got, jaxpr = _run(sparse, _placement(spec), q, keys, values, qpos, kpos)
  assert "shard_map" in jaxpr
  sizes = sharding.parse_mesh_spec(spec, 8)
  assert set(seen) == {(2 // sizes["data"], 8 // sizes["model"])}
  close(got, want, jnp.float32)
  close(got, ops.reference.vertical_slash_attention(q, keys, values, qpos, kpos, vertical,
                                                    slash, 16, 16), jnp.float32)


def test_flat_and_shared_decode_kernels_per_shard_equal_unsharded():
  r = rng(2)
  b, k, g, n, d = 4, 2, 2, 48, 16
  q = jnp.asarray(r.normal(size=(b, 1, k * g, d)), jnp.float32)
  keys = jnp.asarray(r.normal(size=(b, n, d)), jnp.float32)
  values = jnp.asarray(r.normal(size=(b, n, d)), jnp.float32)
  kpos = jnp.asarray(shuffled_positions(r, (b, n)))
  heads = jnp.asarray(r.integers(-1, k, size=(b, n)), jnp.int32)
  qpos = jnp.full((b, 1), n, jnp.int32)
  flat = lambda *a: ops.decode(*a[:5], return_probs=True, key_heads=a[5], num_kv_heads=k)
  args = (q, keys, values, qpos, kpos, heads)
  want, _ = _run(flat, None, *args)
  got, jaxpr = _run(flat, _placement("data:2,model:4"), *args)
  assert "shard_map" in jaxpr
  for a, c in zip(got, want):
    close(a, c, jnp.float32)
  dense_keys = jnp.asarray(r.normal(size=(b, k, n, d)), jnp.float32)
  dense_pos = jnp.asarray(shuffled_positions(r, (b, k, n)))
  want, _ = _run(ops.decode_shared, None, q, dense_keys, qpos, dense_pos)
  got, jaxpr = _run(ops.decode_shared, _placement("data:2,model:2"), q, dense_keys, qpos,
                    dense_pos)
  assert "shard_map" in jaxpr
  for a, c in zip(got, want):
    close(a, c, jnp.float32)


# ---------------------------------------------------------------- the other kernels
# Each case: (fn, its array arguments, [(module, kernel name, recorded axes)], the sizes each
# shard's kernel sees on those axes). B = 4 rows, K = 4 KV heads of G = 2 query heads, on
# data:2,model:4: rows split in two, KV heads in four (or whole where the op splits rows
# only). Unwrapped, a kernel would see all 4 rows and heads.
B, K, G, D = 4, 4, 2, 16


def _normal(r, shape, scale=1.0):
  return jnp.asarray(scale * r.normal(size=shape), jnp.float32)


def _after(r, shape, start):
  """Shuffled positions from `start` on (some slots empty)."""
  pos = shuffled_positions(r, shape)
  return jnp.asarray(np.where(pos >= 0, pos + start, -1))


def _window_case(r):
  q, keys, _, qpos, kpos = _dense_inputs(10, b=B, t=8, k=K, g=G, s=40, d=D)
  fn = lambda *a: ops.window_column_sums(*a, window=4)
  return fn, (q, keys, qpos, kpos), [(ops.window_scores, "window_scores")], (2, K * G // 4)


def _gather_case(r):
  # Rows only: [B * K, M, D] rows, split like the batch.
  src = _normal(r, (B * K, 24, D))
  index = jnp.asarray(r.integers(-1, 24, size=(B * K, 12)), jnp.int32)
  return ops.gather_slots, (src, index), [(ops.compaction, "gather_slots")], (B * K // 2,)


def _gather_heads_case(r):
  # A dense cache's select: rows and KV heads split (2 rows x 1 head = 2 folded rows).
  def select(keys, values, positions, index):
    return LayerCache(keys=keys, values=values, positions=positions,
                      end=jnp.int32(24)).select(index)
  args = (_normal(r, (B, K, 24, D)), _normal(r, (B, K, 24, D)),
          jnp.asarray(shuffled_positions(r, (B, K, 24))),
          jnp.asarray(r.integers(-1, 24, size=(B, K, 12)), jnp.int32))
  return select, args, [(ops.compaction, "gather_slots")], (2,)


def _pruned_case(r):
  s, dk, n = 24, 8, 16
  channels = np.stack([np.sort(r.permutation(D)[:dk]) for _ in range(B * K)])
  args = (_normal(r, (B, 1, K * G, D)), jnp.full((B, 1), s + n, jnp.int32),
          jnp.asarray(channels.reshape(B, K, dk), jnp.int32), _normal(r, (B, K, s, dk)),
          _normal(r, (B, K, s, D)), jnp.asarray(shuffled_positions(r, (B, K, s))),
          _normal(r, (B, K, n, D)), _normal(r, (B, K, n, D)),
          _after(r, (B, K, n), s))
  return (pruned_ops.decode, args, [(pruned_ops.kernels, "channel_pruned_decode_attention")],
          (2, 1))


def _lowrank_case(r):
  # Rows only: the coefficients hold every head on their last axis.
  s, rank = 24, 4
  inv_freq = jnp.asarray(1.0 / 10000.0 ** (np.arange(0, D, 2) / D), jnp.float32)
  leaves = (_normal(r, (B, s, rank)), _normal(r, (B, s, rank)),
            _normal(r, (B, rank, K * D), 0.5), _normal(r, (B, rank, K * D), 0.5))
  fn = lambda q, pos, qpos, *slots: cross_ops.lowrank_decode(
      q, cross_ops.LowRankSlots(*slots), pos, inv_freq, qpos)
  args = (_normal(r, (B, 1, K * G, D)), jnp.asarray(shuffled_positions(r, (B, s))),
          jnp.full((B, 1), s, jnp.int32)) + leaves
  return fn, args, [(cross_ops.kernels, "lowrank_decode_attention")], (2, K)


def _merged_case(r):
  s, kept = 24, 3
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  index = lambda: jnp.asarray(np.stack([np.sort(r.permutation(s)[:kept]) for _ in range(
      B * K)]).reshape(B, K, kept), jnp.int32).at[..., 1].set(-1)
  slots = cross_ops.MergedSlots(
      key_norms=jnp.asarray(r.uniform(0.5, 3.0, (B, K, s)), jnp.float32),
      value_norms=jnp.asarray(r.uniform(0.5, 3.0, (B, K, s)), jnp.float32),
      key_directions=jnp.asarray(unit(r.normal(size=(B, K, s, D))), jnp.float32),
      value_directions=jnp.asarray(unit(r.normal(size=(B, K, s, D))), jnp.float32),
      key_index=index(), key_vectors=_normal(r, (B, K, kept, D)),
      value_index=index(), value_vectors=_normal(r, (B, K, kept, D)))
  fn = lambda q, pos, qpos, *leaves: cross_ops.merged_decode(
      q, cross_ops.MergedSlots(*leaves), pos, qpos)
  args = (_normal(r, (B, 1, K * G, D)), jnp.asarray(shuffled_positions(r, (B, K, s))),
          jnp.full((B, 1), s, jnp.int32)) + tuple(slots)
  return fn, args, [(cross_ops.kernels, "merged_decode_attention")], (2, 1)


def _gear_case(r):
  n, bits, group = 16, 4, 8
  pos = jnp.asarray(shuffled_positions(r, (B, K, n)))
  part = gear_cache.kernel_part(gear_cache.compress_block(
      _normal(r, (B, K, n, D)), _normal(r, (B, K, n, D)), pos, bits=bits, group=group,
      rank=2, loops=2, outlier_ratio=0.1, dtype=jnp.float32))
  fn = lambda q, kpos, qpos, *leaves: gear_ops.decode_attention(
      q, gear_ops.GearPart(*leaves), kpos, qpos, bits=bits, group=group)
  args = (_normal(r, (B, 1, K * G, D)), pos, jnp.full((B, 1), n, jnp.int32)) + tuple(part)
  return fn, args, [(gear_ops.kernels, "gear_decode_attention")], (2, 1)


def _assign_case(r):
  # The kernels see rows R = B * K: each shard's 2 rows x 1 KV head.
  args = (_normal(r, (B, K, 6, D)), _normal(r, (B, K, 10, D)),
          jnp.asarray(r.random((B, K, 10)) < 0.7))
  return merge_ops.assign_to_centres, args, [(merge_ops.kernels, "assign_to_centres")], (2,)


def _scatter_case(r):
  m, e = 10, 6
  args = (_normal(r, (B, K, m, D)), _normal(r, (B, K, m, D)),
          jnp.asarray(r.integers(0, 3, (B, K, m)), jnp.float32), _normal(r, (B, K, e, D)),
          _normal(r, (B, K, e, D)), jnp.asarray(r.integers(0, 3, (B, K, e)), jnp.float32),
          jnp.asarray(r.integers(-1, m, (B, K, e)), jnp.int32))
  return merge_ops.scatter_mean, args, [(merge_ops.kernels, "scatter_mean")], (2,)


def _quantize_case(r):
  x = _normal(r, (B, K, 32, D))
  valid = jnp.asarray(r.random((B, K, 32)) < 0.8)
  keys = lambda x, valid: quant_ops.quantize(x, bits=4, group=8, axis="tokens", valid=valid)
  values = lambda x: quant_ops.quantize(x, bits=2, group=8, axis="channels")
  fn = lambda x, valid: (keys(x, valid), values(x))
  return fn, (x, valid), [(quant_ops.kernels, "quantize_pack")], (2, 1)


def _quantized(r, s, key_axis):
  qz = quant_ops.kernels
  return (qz.quantize(_normal(r, (B, K, s, D)), bits=4, group=8, axis=key_axis)
          + qz.quantize(_normal(r, (B, K, s, D)), bits=4, group=8, axis="channels"))


def _quantized_decode_case(r):
  s = 32
  fn = lambda q, pos, qpos, *cache: quant_ops.decode_attention(q, *cache, pos, qpos, bits=4,
                                                              group=8)
  args = (_normal(r, (B, 1, K * G, D)), jnp.asarray(shuffled_positions(r, (B, K, s))),
          jnp.full((B, 1), s, jnp.int32)) + _quantized(r, s, "tokens")
  return fn, args, [(quant_ops.kernels, "quantized_decode_attention")], (2, 1)


def _union_case(r):
  s, n = 32, 8
  # One quantized part (the dequantizing kernel) and one dense part (the decode kernel).
  def fn(q, pos, dense_keys, dense_values, dense_pos, qpos, kc, ks, kz, vc, vs, vz):
    parts = [quant_ops.DecodePart(q, kc, vc, pos, 4, 8, ks, kz, vs, vz),
             quant_ops.DecodePart(q, dense_keys, dense_values, dense_pos)]
    return quant_ops.union_decode_attention(parts, qpos, jnp.float32)
  args = (_normal(r, (B, K, G, D)), jnp.asarray(shuffled_positions(r, (B, K, s))),
          _normal(r, (B, K, n, D)), _normal(r, (B, K, n, D)),
          _after(r, (B, K, n), s), jnp.full((B,), s + n, jnp.int32))
  args += _quantized(r, s, "channels")
  return fn, args, [(quant_ops.kernels, "quantized_decode_attention"),
                    (quant_ops.decode_kernels, "decode_attention")], (2, 1)


_OTHER_KERNELS = {"window_column_sums": _window_case, "gather_slots": _gather_case,
                  "gather_head_slots": _gather_heads_case,
                  "channel_pruned": _pruned_case, "lowrank": _lowrank_case,
                  "merged": _merged_case, "gear": _gear_case, "assign": _assign_case,
                  "scatter_mean": _scatter_case, "quantize": _quantize_case,
                  "quantized_decode": _quantized_decode_case, "union": _union_case}


def _equal_trees(got, want):
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    if jnp.issubdtype(a.dtype, jnp.floating):
      close(a, b, jnp.float32)
    else:   # codes, slot targets: exactly
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", list(_OTHER_KERNELS))
def test_other_kernels_per_shard_equal_unsharded(name, monkeypatch):
  fn, args, kernels_at, per_shard_sizes = _OTHER_KERNELS[name](rng(20))
  want, plain = _run(fn, None, *args)
  seen = [_record_shapes(monkeypatch, module, kernel, axes=range(len(per_shard_sizes)))
          for module, kernel in kernels_at]
  got, jaxpr = _run(fn, _placement("data:2,model:4"), *args)
  assert "shard_map" in jaxpr and "shard_map" not in plain
  for sizes in seen:
    assert set(sizes) == {per_shard_sizes}
  _equal_trees(got, want)
  # The jnp reference (the op with the kernels off).
  monkeypatch.setenv("KVJAX_PALLAS", "0")
  _equal_trees(got, fn(*args))


@pytest.mark.parametrize("method, kwargs", [(None, {}), ("adakv", dict(compression_ratio=0.5))])
def test_sharded_model_generates_the_unsharded_tokens_with_kernels(method, kwargs,
                                                                    monkeypatch):
  model = tiny_model()
  prompts = random_prompts([30, 41, 12, 25], seed=3)
  want = kvjax.generate(model, prompts, method=method, max_new_tokens=5, **kwargs).token_ids
  # The sharded steps trace their kernels under the model's placement.
  placements = []
  real = ops.per_shard

  def spy(*args):
    placements.append(sharded_ops.current_placement())
    return real(*args)
  monkeypatch.setattr(ops, "per_shard", spy)
  sharded = sharding.shard_model(model, "data:2,model:2")
  got = kvjax.generate(sharded, prompts, method=method, max_new_tokens=5, **kwargs).token_ids
  assert got == want
  assert placements and all(p == sharded.placement for p in placements)
