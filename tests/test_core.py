"""The core's contracts: methods and layouts defined outside kvjax plug in through the
policy and layer-cache protocols; parameters are traced; cache-wide steps run; the model
imports no method and imports flow one way."""

import ast
import dataclasses
import pathlib
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import kvjax
from kvjax.cache import LayerCache
from kvjax.generation import context, engine, inputs
from kvjax.methods import base
from tiny import tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
  return tiny_model()


def _prompts(seed=3, lengths=(40, 57)):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, n).tolist() for n in lengths]


# ----------------------------------------------------------------- traced method parameters


@dataclasses.dataclass(frozen=True)
class LinearKeyScore(base.Method):
  """A toy trained selector: priority = keys . w[layer], w given as a parameter pytree."""
  name: ClassVar[str] = "linear_key_score"

  def score(self, x):
    w = x.params["w"][x.layer]                                  # [D]
    return jnp.einsum("bksd,d->bks", x.keys.astype(jnp.float32), w)


def test_method_parameters_are_traced_not_compiled_in(model):
  tokens, mask = inputs.left_pad(_prompts(), 0)
  d, layers = model.config.head_dim, model.config.num_layers
  method, keep = LinearKeyScore(), 16
  steps = engine.CompiledSteps()
  kept = []
  for seed in (0, 1):
    w = jax.random.normal(jax.random.key(seed), (layers, d))
    pre = context.prefill(model, tokens, mask, method, keep, room=0, steps=steps,
                          method_params={"w": w})
    layer = pre.cache.layers[0]
    positions = np.asarray(layer.positions)
    # The kept slots are the top `keep` of keys . w, computed here from the full cache.
    full = context.prefill(model, tokens, mask, kvjax.methods.get("full"), None, room=0,
                           steps=steps)
    keys = np.asarray(full.cache.layers[0].keys, np.float64)
    full_pos = np.asarray(full.cache.layers[0].positions)
    scores = np.where(full_pos >= 0, keys @ np.asarray(w[0], np.float64), -np.inf)
    for row in range(2):
      for head in range(model.config.num_kv_heads):
        best = np.sort(full_pos[row, head][np.argsort(-scores[row, head])[:keep]])
        assert positions[row, head].tolist() == best.tolist()
    kept.append(positions)
  assert not np.array_equal(kept[0], kept[1]), "new weights must change the selection"
  names = [key[0] for key in steps._executables]
  assert names.count("prefill") == 1, "one compile for the method"
  assert names.count("prefill_layer") == 1, "one for the full cache's layers"


# --------------------------------------------------------------------- cache-wide step


@dataclasses.dataclass(frozen=True)
class LayerZeroDecides(base.Method):
  """A toy cross-layer method: knorm per layer, then every layer drops the positions that
  layer 0 did not keep (a cache-wide step after the forward pass)."""
  name: ClassVar[str] = "layer_zero_decides"

  def score(self, x):
    return -jnp.linalg.norm(x.keys.astype(jnp.float32), axis=-1)

  def cache_step(self, layers, lengths):
    first = layers[0].positions                                   # [B, K, S0]
    out = [layers[0]]
    for layer in layers[1:]:
      shared = (layer.positions[..., :, None] == first[..., None, :]).any(-1)
      out.append(layer.replace(positions=jnp.where(shared, layer.positions, -1)))
    return tuple(out)


def test_cache_wide_step_sees_every_layer(model):
  tokens, mask = inputs.left_pad(_prompts(), 0)
  pre = context.prefill(model, tokens, mask, LayerZeroDecides(), 20, room=0)
  first = np.asarray(pre.cache.layers[0].positions)
  later = np.asarray(pre.cache.layers[1].positions)
  plain = context.prefill(model, tokens, mask, kvjax.methods.Knorm(), 20, room=0)
  plain_later = np.asarray(plain.cache.layers[1].positions)
  dropped = 0
  for row in range(2):
    for head in range(model.config.num_kv_heads):
      kept = set(later[row, head][later[row, head] >= 0].tolist())
      assert kept <= set(first[row, head].tolist())
      dropped += len(set(plain_later[row, head].tolist()) - set(first[row, head].tolist()))
  assert dropped > 0, "the step must have had something to drop"
  assert (later == -1).sum() >= dropped


# ----------------------------------------------------------------- a layout from outside


@struct.dataclass
class HalfPrecisionLayer:
  """A layer cache defined here, not in kvjax: keys and values stored as float16."""
  dense: LayerCache

  def _view(self):
    return self.dense.replace(keys=self.dense.keys.astype(jnp.float32),
                              values=self.dense.values.astype(jnp.float32))

  def attend(self, queries, query_positions, pending=None, want=frozenset()):
    return self._view().attend(queries, query_positions, pending, want)

  def append(self, new):
    return HalfPrecisionLayer(self.dense.append(new))

  def grow(self, room):
    return HalfPrecisionLayer(self.dense.grow(room))

  def free_slots(self):
    return self.dense.free_slots()

  def slots_per_head(self, num_kv_heads):
    return self.dense.slots_per_head(num_kv_heads)


@dataclasses.dataclass(frozen=True)
class HalfPrecision(base.Method):
  name: ClassVar[str] = "half_precision"
  needs_budget: ClassVar[bool] = False

  def compact(self, cand, x, keep):
    kept = base.Method.compact(self, cand, x, keep)
    return HalfPrecisionLayer(kept.replace(keys=kept.keys.astype(jnp.float16),
                                           values=kept.values.astype(jnp.float16)))

  def score(self, x):
    return x.key_positions.astype(jnp.float32)


def test_layout_defined_outside_kvjax_plugs_in(model):
  prompts = _prompts(seed=5)
  full = kvjax.generate(model, prompts, max_new_tokens=8)
  half = kvjax.generate(model, prompts, method=HalfPrecision(), max_new_tokens=8)
  assert half.token_ids == full.token_ids
  assert half.stats["context_cache_bytes"] < 0.6 * full.stats["context_cache_bytes"]


# ------------------------------------------------------------------- uniform slot metadata


@pytest.mark.parametrize("method, keep", [
    (kvjax.methods.Full(), None), (kvjax.methods.SnapKV(window=8), 24),
    (kvjax.methods.AdaKV(press=kvjax.methods.SnapKV(window=8)), 24),
    (kvjax.methods.KIVI(bits=2, group_size=16, residual=16), None),
    (kvjax.methods.GEAR(group_size=16, residual=16), None),
    (kvjax.methods.MiKV(), 24), (kvjax.methods.ThinK(), None)],  # MiKV's keep: high precision
    ids=["dense", "snapkv", "flat", "kivi", "gear", "mikv", "think"])
def test_every_layout_reports_its_slot_positions(model, method, keep):
  """slot_positions() lists one entry per slot (per head; flat: all heads' slots) and every
  kept token exactly once, whatever the layout stores them in."""
  prompts = _prompts()
  tokens, mask = inputs.left_pad(prompts, 0)
  pre = context.prefill(model, tokens, mask, method, keep, room=4)
  k = model.config.num_kv_heads
  for layer in pre.cache.layers:
    positions = np.asarray(layer.slot_positions())
    if positions.ndim == 2:   # flat: [B, N] with each slot's owning head
      assert positions.shape[1] == layer.capacity
      heads = np.asarray(layer.heads)
      per_head = [[positions[row][(heads[row] == h)] for h in range(k)] for row in range(2)]
    else:
      assert positions.shape == (2, k, layer.capacity)
      per_head = [[positions[row, h] for h in range(k)] for row in range(2)]
    for row, length in enumerate(len(p) for p in prompts):
      held = []
      for kept in per_head[row]:
        kept = kept[kept >= 0].tolist()
        assert len(kept) == len(set(kept)), "a token is stored once"
        assert set(kept) <= set(range(length))
        held.append(len(kept))
      drops = keep is not None and not isinstance(method, kvjax.methods.MiKV)
      want = min(keep, length) if drops else length
      if positions.ndim == 2:   # head-wise budgets: only the layer's total is fixed
        assert sum(held) == k * want and len(set(held)) > 1
      else:
        assert held == [want] * k


# ------------------------------------------------------------------------- architecture


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
  """(module, inside a function) for every kvjax/pallas_kernels import in a file."""
  tree = ast.parse(path.read_text())
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.ImportFrom) and child.module in ("kvjax", "pallas_kernels"):
        found.extend((f"{child.module}.{alias.name}", nested) for alias in child.names)
      elif isinstance(child, ast.ImportFrom) and child.module:
        found.append((child.module, nested))
      elif isinstance(child, ast.Import):
        found.extend((alias.name, nested) for alias in child.names)
      visit(child, nested)

  visit(tree, False)
  return [(m, f) for m, f in found if m.split(".")[0] in ("kvjax", "pallas_kernels")]


LAYERS = {"ops": 0, "cache": 1, "model": 2, "methods": 2, "calibration": 3}


def test_imports_flow_one_way():
  """model -> cache -> ops, methods -> cache -> ops and calibration -> methods, model, never
  upwards; no import hidden
  in a function to dodge a cycle in these layers; the model knows no method."""
  for package, level in LAYERS.items():
    for path in sorted((ROOT / "kvjax" / package).glob("*.py")):
      for module, in_function in _imports(path):
        assert not in_function, f"{path.name} imports {module} inside a function"
        parts = module.split(".")
        if parts[0] == "pallas_kernels" or parts[1] not in LAYERS or parts[1] == package:
          continue
        assert LAYERS[parts[1]] < level, f"kvjax/{package}/{path.name} imports {module}"
  source = (ROOT / "kvjax" / "model" / "transformer.py").read_text()
  assert "isinstance" not in source and "method" not in source.replace("method_params", "")


def test_trimmed_puts_each_heads_real_slots_first():
  """A left-padded short row next to a row that fills the capacity: after `trimmed` the
  short row's real slots come first in slot order (sinks read by slot index are real),
  and each slot keeps its own key, value and state."""
  positions = jnp.array([[[0, 1, 2, 3]], [[-1, -1, 0, 1]]], jnp.int32)   # [B=2, K=1, S=4]
  keys = jnp.arange(2 * 4 * 2, dtype=jnp.float32).reshape(2, 1, 4, 2)
  layer = LayerCache(keys=keys, values=-keys, positions=positions, end=jnp.int32(4),
                     state=keys[..., 0])
  out = layer.trimmed()
  np.testing.assert_array_equal(out.positions, [[[0, 1, 2, 3]], [[0, 1, -1, -1]]])
  np.testing.assert_array_equal(out.keys[1, 0, :2], keys[1, 0, 2:])
  np.testing.assert_array_equal(out.values[1, 0, :2], -keys[1, 0, 2:])
  np.testing.assert_array_equal(out.state[1, 0, :2], keys[1, 0, 2:, 0])
  np.testing.assert_array_equal(out.keys[0], keys[0])
  # Already in order: the same object back (no copy on the common path).
  assert out.trimmed() is out


def test_live_first_keeps_slot_order_and_cuts_under_jit():
  """`live_first(n)` (one jitted step): per row and head the live slots in slot order, then
  empty ones, cut to n; with no capacity the shape stays. A head holding more than n live
  slots loses its last ones (the caller's choice), not arbitrary ones."""
  positions = jnp.array([[[-1, 5, -1, 7], [3, -1, 4, 6]]], jnp.int32)   # [B=1, K=2, S=4]
  keys = jnp.arange(8, dtype=jnp.float32).reshape(1, 2, 4, 1)
  layer = LayerCache(keys=keys, values=keys + 100, positions=positions, end=jnp.int32(4),
                     state=keys[..., 0] * 10)
  cut = jax.jit(lambda layer: layer.live_first(2))(layer)
  np.testing.assert_array_equal(cut.positions, [[[5, 7], [3, 4]]])
  np.testing.assert_array_equal(cut.keys[..., 0], [[[1, 3], [4, 6]]])
  np.testing.assert_array_equal(cut.values[..., 0], [[[101, 103], [104, 106]]])
  np.testing.assert_array_equal(cut.state, [[[10, 30], [40, 60]]])
  assert int(cut.end) == 2
  whole = layer.live_first()
  np.testing.assert_array_equal(whole.positions, [[[5, 7, -1, -1], [3, 4, 6, -1]]])
  assert whole.capacity == 4
