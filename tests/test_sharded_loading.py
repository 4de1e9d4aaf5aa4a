"""`kvjax.load(..., mesh=...)` reads GGUF files, Hugging Face directories and registry models
straight into their shards (8 emulated CPU devices): every tensor reaches the model already
placed by the rules, none whole on one device, and the loaded values equal an unsharded load."""

import dataclasses

import jax
import numpy as np
import pytest

import fake_gguf
import kvjax
from kvjax import sharding
from kvjax.errors import CheckpointError
from kvjax.model import model as model_lib
from kvjax.model import to_flat_params
from tiny import tiny_config

MESH = "data:2,model:4"


def _record_arrivals(monkeypatch):
  """Records, for every tensor handed to from_flat_params, whether it arrived as a device
  array placed as the mesh's rules say (name -> bool)."""
  placement = sharding.Placement(sharding.make_mesh(MESH))
  arrivals = {}
  real = model_lib.from_flat_params

  def recording(config, flat, *args, **kwargs):
    for name, value in flat.items():
      want = placement.sharding(sharding.param_axes(name), value.shape)
      arrivals[name] = isinstance(value, jax.Array) and value.sharding.is_equivalent_to(
          want, value.ndim)
    return real(config, flat, *args, **kwargs)

  for module in ("kvjax.model", "kvjax.loading.converted"):
    monkeypatch.setattr(f"{module}.from_flat_params", recording)
  # A tensor put whole onto one device first (then resharded) would end placed too: no
  # array may reach a device without a sharding while the sharded load runs.
  real_put = jax.device_put

  def put(x, *args, **kwargs):
    if not args and not kwargs and np.ndim(x) > 0:
      arrivals[f"whole put of a {np.shape(x)} array"] = False
    return real_put(x, *args, **kwargs)

  monkeypatch.setattr(jax, "device_put", put)
  return arrivals


def _assert_placed_and_equal(sharded, whole, arrivals):
  assert arrivals and all(arrivals.values()), [n for n, ok in arrivals.items() if not ok]
  placement = sharded.placement
  flat, want = to_flat_params(sharded), to_flat_params(whole)
  assert sorted(flat) == sorted(want)
  spread = 0
  for name, value in flat.items():
    assert value.sharding == placement.sharding(sharding.param_axes(name), value.shape), name
    spread += len({s.device for s in value.addressable_shards if s.data.size < value.size})
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]), err_msg=name)
  assert spread > 0   # some tensors really are split (kv heads, mlp, vocab over model:4)


def test_gguf_loads_straight_into_shards(tmp_path, monkeypatch):
  path = tmp_path / "tiny.gguf"
  fake_gguf.write_gguf(path, seed=3)
  whole = kvjax.load(path)
  arrivals = _record_arrivals(monkeypatch)
  _assert_placed_and_equal(kvjax.load(path, mesh=MESH), whole, arrivals)


def test_registry_model_loads_straight_into_shards(tmp_path, monkeypatch):
  wheel = fake_gguf.make_wheel(tmp_path / "wheel")
  undo = fake_gguf.install(*wheel)
  try:
    whole = kvjax.load(fake_gguf.NAME, cache=tmp_path / "cache")   # converts once
    arrivals = _record_arrivals(monkeypatch)
    sharded = kvjax.load(fake_gguf.NAME, cache=tmp_path / "cache", mesh=MESH,
                         dtype="bfloat16")
  finally:
    fake_gguf.uninstall(undo)
  # bfloat16 on the way in: converted shard by shard, the same values as a whole cast.
  whole = dataclasses.replace(whole, params=jax.tree_util.tree_map(
      lambda x: x.astype("bfloat16"), whole.params))
  _assert_placed_and_equal(sharded, whole, arrivals)


def test_hugging_face_directory_loads_straight_into_shards(tmp_path, monkeypatch):
  hf_models = pytest.importorskip("hf_models")
  directory = hf_models.save_tiny("qwen2", tmp_path / "qwen2", seed=1)
  whole = kvjax.load(directory)
  arrivals = _record_arrivals(monkeypatch)
  _assert_placed_and_equal(kvjax.load(directory, mesh=MESH), whole, arrivals)


def test_tensors_the_rules_do_not_place_stay_on_the_host_for_the_loader_to_name():
  """A tensor the architecture has no place for (or of another rank) is not put anywhere:
  from_flat_params then refuses it by name, as in an unsharded load."""
  from kvjax.loading.load import _putter
  put = _putter(sharding.Placement(sharding.make_mesh(MESH)))
  extra, flat_q = np.zeros((4, 4), np.float32), np.zeros((64,), np.float32)
  assert put("layers.0.attn.extra.kernel", extra) is extra
  assert put("layers.0.attn.q.kernel", flat_q) is flat_q
  placed = put("layers.0.mlp.up.kernel", np.ones((64, 128), np.float32))
  assert placed.sharding.spec == sharding.Placement(sharding.make_mesh(MESH)).sharding(
      ("embed", "mlp"), (64, 128)).spec and len(placed.sharding.device_set) == 8
  with pytest.raises(CheckpointError, match=r"unexpected tensors \['layers.0.attn.extra"):
    model_lib.from_flat_params(tiny_config(), {"layers.0.attn.extra.kernel": extra})
