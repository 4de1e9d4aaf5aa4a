"""Calibration: what a method needs computed from a model once, outside inference.

RazorAttention's retrieval heads come from echo and induction scores measured on a random
token sequence repeated several times: echo heads attend to the previous occurrence of the
current token, induction heads to the token that followed it. Results are stored as small
JSON files in kvjax's cache directory, keyed by a fingerprint of the model's weights, and
reloaded on the next run. `bind` gives a method what it declared it needs
(`Method.calibration`) wherever a method meets a model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import fileio
from kvjax.cache.kv_cache import Cache, init_cache
from kvjax.calibration import compresskv
from kvjax.errors import MethodError
from kvjax.loading import assets
from kvjax.methods import base, registry
from kvjax.model import transformer
from kvjax.ops.host import host_array

CALIBRATION_VERSION = 1


@dataclasses.dataclass(frozen=True)
class HeadProbe:
  """A cache policy that stores nothing and returns, per layer, the echo and induction
  scores [2, K] of every KV head (max over its query heads) on a sequence whose tokens
  1.. repeat with `period` (token 0 is BOS)."""
  period: int
  block: int = 256

  def prepare(self, layer, layer_cache, new):
    del layer
    return layer_cache, new, frozenset()

  def update(self, layer, layer_cache, step, stats):
    del layer, layer_cache, stats
    return head_scores(step.queries, step.new.keys, self.period, self.block)

  def finish(self, layers, lengths):
    del lengths
    return jnp.stack(layers)                                              # [L, 2, K]


def head_scores(queries, keys, period: int, block: int) -> jax.Array:
  """[2, K] echo and induction scores of one layer (batch row 0).

  queries [1, T, H, D] post-RoPE, keys [1, K, T, D]. For a query at position i in a later
  repetition and every earlier copy j = i - m * period >= 1 of its token: echo averages the
  attention probability P[i, j], induction P[i, j + 1], over all such (i, j) pairs.
  """
  _, t, h, d = queries.shape
  k = keys.shape[1]
  q = jnp.swapaxes(queries[0], 0, 1).astype(jnp.float32)                # [H, T, D]
  kk = jnp.repeat(keys[0].astype(jnp.float32), h // k, axis=0)          # [H, T, D]
  blocks = -(-t // block)
  q = jnp.pad(q, ((0, 0), (0, blocks * block - t), (0, 0)))
  copies = max(1, (t - 1) // period)
  slots = jnp.arange(t)

  def one_block(start):
    rows = start + jnp.arange(block)                                      # query positions
    qb = jax.lax.dynamic_slice_in_dim(q, start, block, axis=1)            # [H, b, D]
    logits = jnp.einsum("hbd,htd->hbt", qb, kk, precision=jax.lax.Precision.HIGHEST)
    logits = logits * d ** -0.5
    seen = slots[None, :] <= rows[:, None]                                # [b, T]
    logits = jnp.where(seen[None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)                              # [H, b]
    echo = jnp.zeros((h, block))
    induction = jnp.zeros((h, block))
    count = jnp.zeros((block,))
    for m in range(1, copies + 1):
      j = rows - m * period
      ok = (j >= 1) & (rows < t)
      take = lambda col: jnp.exp(jnp.take_along_axis(
          logits, jnp.clip(col, 0, t - 1)[None, :, None], axis=-1)[..., 0] - lse)
      echo += jnp.where(ok[None], take(j), 0.0)
      induction += jnp.where(ok[None], take(j + 1), 0.0)
      count += ok
    return echo.sum(1), induction.sum(1), count.sum()

  echo, induction, count = jax.lax.map(one_block, jnp.arange(blocks) * block)
  scores = jnp.stack([echo.sum(0), induction.sum(0)]) / jnp.maximum(count.sum(), 1)  # [2, H]
  return scores.reshape(2, k, h // k).max(-1)


def calibration_tokens(config, period: int, repeats: int, seed: int = 0,
                       bos: int | None = None) -> np.ndarray:
  """[1, 1 + period * repeats] int32: BOS, then `period` random ids repeated `repeats`
  times. Ids are drawn from [100, 100 + period) (clipped to the vocabulary): ordinary
  tokens, away from the special ids at the start of most vocabularies."""
  rng = np.random.default_rng(seed)
  low = min(100, config.vocab_size // 10)
  ids = rng.integers(low, min(config.vocab_size, low + period), period)
  bos = ids[0] if bos is None else bos
  return np.concatenate([[bos], np.tile(ids, repeats)]).astype(np.int32)[None]


# id(params) -> (weak reference to those params, config repr, their leaves, fingerprint):
# hashing reads every weight tensor, and chunk caches check the model on every request.
_FINGERPRINTS: dict = {}


def model_fingerprint(model) -> str:
  """A short hash of the model's config and a strided sample of every weight: calibration
  files made for other weights are never reused. Remembered per params object while it
  lives and holds the same weight arrays (an nnx State can be updated in place: a
  replaced array is hashed again)."""
  config = repr(model.config)
  params = model.params
  leaves = jax.tree_util.tree_leaves(params)
  known = _FINGERPRINTS.get(id(params))
  if (known is not None and known[0]() is params and known[1] == config
      and len(known[2]) == len(leaves) and all(a is b for a, b in zip(known[2], leaves))):
    return known[3]
  digest = hashlib.sha256(config.encode())
  for leaf in leaves:
    flat = jnp.ravel(leaf)
    sample = host_array(flat[::max(1, flat.size // 4096)])  # strided on the device
    digest.update(np.ascontiguousarray(sample).tobytes())
  fingerprint = digest.hexdigest()[:16]
  try:
    key = id(params)
    ref = weakref.ref(params, lambda _: _FINGERPRINTS.pop(key, None))
  except TypeError:   # params that cannot be weakly referenced are hashed every time
    return fingerprint
  _FINGERPRINTS[key] = (ref, config, tuple(leaves), fingerprint)
  return fingerprint


def calibrate(model, period: int = 2500, repeats: int = 4, seed: int = 0) -> dict:
  """Echo and induction scores of every (layer, KV head) of `model`: a dict with "echo"
  and "induction" as [num_layers][num_kv_heads] lists. The sequence is shortened (period
  (max_position_embeddings - 1) // repeats) when the model's context cannot hold it."""
  cfg = model.config
  period = max(2, min(period, (cfg.max_position_embeddings - 1) // repeats))
  bos = getattr(model.tokenizer, "bos_token_id", None)
  tokens = calibration_tokens(cfg, period, repeats, seed, bos)
  scores = _probe(model.graphdef, model.params, jnp.asarray(tokens),
                  init_cache(cfg, 1, 0), HeadProbe(period))
  scores = host_array(scores).astype(np.float64)
  return {"version": CALIBRATION_VERSION, "model": cfg.name, "period": period,
          "repeats": repeats, "seed": seed, "echo": scores[:, 0].tolist(),
          "induction": scores[:, 1].tolist()}


@functools.partial(jax.jit, static_argnames=("graphdef", "probe"))
def _probe(graphdef, params, tokens, cache: Cache, probe: HeadProbe):
  return transformer.forward(graphdef, params, tokens, jnp.ones(tokens.shape, bool), cache,
                             "last", probe)[1]


def calibration(model, period: int = 2500, repeats: int = 4, seed: int = 0) -> dict:
  """`calibrate`'s result, read from kvjax's cache directory when this model (by weight
  fingerprint) was calibrated with these settings before, else computed and stored."""
  key = f"{model_fingerprint(model)}-p{period}-r{repeats}-s{seed}"
  path = assets.cache_dir() / "razor" / f"{key}.json"
  stored = fileio.read_json(path)
  if stored is not None and stored.get("version") == CALIBRATION_VERSION:
    return stored
  result = calibrate(model, period, repeats, seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  fileio.write_json_atomic(path, result)
  return result



CALIBRATIONS = {
    "echo_induction": calibration,
    # CompressKV's file is keyed and checked by the fingerprint computed here.
    "compresskv": lambda model: compresskv.calibration(model, model_fingerprint(model)),
    # Trained components check that they were trained for this model and these weights.
    "weights_fingerprint": lambda model: (model.config, model_fingerprint(model)),
}


def bind(method, model) -> base.Method:
  """`methods.get(method)` ready to run on `model` (refused if its layout cannot store the
  model's heads): every calibration it (or the press it wraps) declares is computed once
  per model (then read from disk) and handed to it."""
  method = registry.get(method)
  base.check_model(method, model.config)
  press = getattr(method, "press", None)
  if isinstance(press, base.Method):
    bound = bind(press, model)
    if bound is not press:
      method = dataclasses.replace(method, press=bound)
  if method.calibration is None or not method.needs_calibration():
    return method
  if method.calibration not in CALIBRATIONS:
    raise MethodError(f"{method.label} needs calibration {method.calibration!r}; known: "
                      f"{sorted(CALIBRATIONS)}")
  return method.calibrated(CALIBRATIONS[method.calibration](model))
