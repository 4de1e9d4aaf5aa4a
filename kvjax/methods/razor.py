"""RazorAttention: retrieval heads keep the whole cache, every other head keeps sinks, a
recent window and one compensation token (the mean of what it dropped).

Retrieval heads come from a calibration run once per model (`calibrate`): a random token
sequence repeated several times, on which echo heads attend to the previous occurrence of
the current token and induction heads to the token that followed it. The scores are
stored as a small JSON file in kvjax's cache directory, keyed by a fingerprint of the
model's weights, and reloaded on the next run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import fileio
from kvjax.cache.kv_cache import Cache, FlatLayerCache, init_cache
from kvjax.errors import MethodError
from kvjax.loading import assets
from kvjax.methods import base, registry
from kvjax.methods.merging import MergingMethod, slot_weights
from kvjax.model import transformer

CALIBRATION_VERSION = 1


# ---------------------------------------------------------------------------- calibration


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


def model_fingerprint(model) -> str:
  """A short hash of the model's config and a strided sample of every weight: calibration
  files made for other weights are never reused."""
  digest = hashlib.sha256(repr(model.config).encode())
  for leaf in jax.tree_util.tree_leaves(model.params):
    flat = np.asarray(leaf).reshape(-1)
    digest.update(np.ascontiguousarray(flat[::max(1, flat.size // 4096)]).tobytes())
  return digest.hexdigest()[:16]


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
  scores = np.asarray(scores, np.float64)
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


def retrieval_heads(scores: dict, echo_ratio: float, induction_ratio: float
                    ) -> tuple[int, ...]:
  """Per layer, a bitmask of retrieval KV heads: the union of the top `echo_ratio` of all
  (layer, KV head) pairs by echo score and the top `induction_ratio` by induction score
  (at least one head each when the ratio is positive; ties to the earlier pair)."""
  echo, induction = np.asarray(scores["echo"]), np.asarray(scores["induction"])
  layers, k = echo.shape
  chosen = np.zeros(layers * k, bool)
  for values, ratio in ((echo, echo_ratio), (induction, induction_ratio)):
    count = 0 if ratio == 0 else max(1, round(ratio * layers * k))
    order = np.lexsort((np.arange(layers * k), -values.reshape(-1)))
    chosen[order[:count]] = True
  chosen = chosen.reshape(layers, k)
  return tuple(int(sum(1 << h for h in range(k) if chosen[l, h])) for l in range(layers))


# --------------------------------------------------------------------------------- method


@registry.register
@dataclasses.dataclass(frozen=True)
class RazorAttention(MergingMethod):
  """RazorAttention (Tang et al., 2024, arXiv 2407.15891): retrieval heads (echo and
  induction heads found by `calibrate`) keep every token; every other KV head keeps the
  first `sinks` tokens, one compensation token (the mean key and value of the tokens it
  drops, stored at the first dropped token's position and counted as the tokens it stands
  for) and the most recent tokens, `local_capacity` slots in all. Stored head-wise (the
  flat layout), so the non-retrieval heads' savings are real. Decoding appends to every
  head without further eviction, as the official deploy code does.

  heads: per layer, a bitmask of retrieval KV heads; () means "calibrate for the model"
  (`for_model`, which `generate`, `score`, `converse` and the sweep call). Defaults are the
  official code's (golden-stick `ra_config.py`): echo_ratio 0.01, induction_ratio 0.14,
  sinks 4, local_capacity 256, compensation on. Calibration: BOS plus 2500 random ids
  repeated 4 times, shortened to fit the model's context (SmolLM2: 2047 x 4). The
  compensation token's key averages post-RoPE keys of different positions (the paper's
  accepted approximation); in the softmax it counts as one token (no log-count bias).
  """
  name: ClassVar[str] = "razor"
  needs_budget: ClassVar[bool] = False
  headwise: ClassVar[bool] = True
  heads: tuple = ()
  local_capacity: int = 256
  sinks: int = 4
  echo_ratio: float = 0.01
  induction_ratio: float = 0.14
  compensation: bool = True

  def __post_init__(self):
    heads = self.heads
    if isinstance(heads, str):       # from the command line: "3,0,1,..."
      try:
        heads = tuple(int(h) for h in heads.split(",") if h.strip())
      except ValueError:
        heads = None
    if not isinstance(heads, tuple) or not all(
        isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h >= 0
        for h in heads):
      raise MethodError(f"razor heads={self.heads!r} must be a tuple of per-layer bitmasks "
                        f"(ints >= 0) of retrieval KV heads, or () to calibrate")
    object.__setattr__(self, "heads", tuple(int(h) for h in heads))
    base.check_int("sinks", self.sinks, 0)
    base.check_int("local_capacity", self.local_capacity, self.sinks + 2)
    base.check_fraction("echo_ratio", self.echo_ratio)
    base.check_fraction("induction_ratio", self.induction_ratio)

  def for_model(self, model) -> "RazorAttention":
    if self.heads:
      return self
    found = retrieval_heads(calibration(model), self.echo_ratio, self.induction_ratio)
    return dataclasses.replace(self, heads=found)

  def layer_heads(self, layer: int, num_kv_heads: int) -> np.ndarray:
    if not self.heads:
      raise MethodError("razor has no retrieval heads: bind it to a model first "
                        "(kvjax.methods.bind(method, model) calibrates it)")
    if len(self.heads) <= layer or self.heads[layer] >> num_kv_heads:
      raise MethodError(f"razor heads={self.heads} do not fit this model (layer {layer}, "
                        f"{num_kv_heads} KV heads): calibrated for another model?")
    return np.array([(self.heads[layer] >> h) & 1 for h in range(num_kv_heads)], bool)

  def cache_stats(self, cache):
    k = cache.layers[0].num_kv_heads
    retrieval = sum(bin(h).count("1") for h in self.heads)
    return {"retrieval_heads": retrieval, "kv_heads": len(self.heads) * k}

  def compact(self, cand, x, keep):
    del keep
    b, k, s, _ = cand.keys.shape
    if cand.state is None:
      cand = cand.replace(state=self.init_state(cand.positions.shape))
    retrieval = jnp.asarray(self.layer_heads(x.layer, k))[None, :, None]   # [1, K, 1]
    local = min(self.local_capacity, s)
    positions = cand.positions
    valid = positions >= 0
    order = jnp.argsort(jnp.where(valid, positions, jnp.iinfo(jnp.int32).max), axis=-1)
    rank = jnp.argsort(order, axis=-1)                                     # by position
    count = valid.sum(-1, keepdims=True)
    sinks = min(self.sinks, local - 2)
    overflow = count > local
    recent = local - sinks - (1 if self.compensation else 0)
    kept = valid & (~overflow | (rank < sinks) | (rank >= count - recent))
    dropped = valid & ~kept & ~retrieval
    first = jnp.argmax(dropped, axis=-1)[..., None]                        # [B, K, 1]
    comp = (jnp.arange(s) == first) & dropped.any(-1, keepdims=True) & ~retrieval
    if self.compensation:
      weight = jnp.where(dropped, slot_weights(cand), 0.0)
      total = weight.sum(-1, keepdims=True)
      mean = lambda a: jnp.einsum("bks,bksd->bkd", weight, a.astype(jnp.float32))[:, :, None] / (
          jnp.maximum(total, 1.0)[..., None])
      cand = cand.replace(
          keys=jnp.where(comp[..., None], mean(cand.keys), cand.keys).astype(cand.keys.dtype),
          values=jnp.where(comp[..., None], mean(cand.values),
                           cand.values).astype(cand.values.dtype),
          state=jnp.where(comp, total - 1.0, cand.state))
      kept = kept | comp
    # Exactly `local` slots per non-retrieval head: empty slots fill a short row's rest.
    tier = jnp.where(kept, 2, jnp.where(valid, 0, 1))
    _, index = jax.lax.top_k(tier, local)
    local_mask = jnp.zeros((b, k, s), bool).at[
        jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], index].set(True)
    selected = jnp.where(retrieval, True, local_mask)
    n_retrieval = int(self.layer_heads(x.layer, k).sum())
    total_slots = n_retrieval * s + (k - n_retrieval) * local
    return FlatLayerCache.from_selection(cand, selected, total_slots)
