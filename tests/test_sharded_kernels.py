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
from kvjax.ops import attention as ops
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
