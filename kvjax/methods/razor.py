"""RazorAttention: retrieval heads keep the whole cache, every other head keeps sinks, a
recent window and one compensation token (the mean of what it dropped).

Retrieval heads come from the echo/induction calibration (`kvjax.calibration`), run once
per model and cached on disk; `kvjax.calibration.bind` (called by generate, score,
converse and the sweep) hands its scores to the method.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.kv_cache import FlatLayerCache
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.methods.merging import MergingMethod, slot_weights


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
  (`kvjax.calibration.bind`, which `generate`, `score`, `converse` and the sweep call). Defaults are the
  official code's (golden-stick `ra_config.py`): echo_ratio 0.01, induction_ratio 0.14,
  sinks 4, local_capacity 256, compensation on. Calibration: BOS plus 2500 random ids
  repeated 4 times, shortened to fit the model's context (SmolLM2: 2047 x 4). The
  compensation token's key averages post-RoPE keys of different positions (the paper's
  accepted approximation); in the softmax it counts as one token (no log-count bias).
  """
  name: ClassVar[str] = "razor"
  calibration: ClassVar[str] = "echo_induction"
  needs_budget: ClassVar[bool] = False
  headwise: ClassVar[bool] = True
  trims_padding: ClassVar[bool] = True   # finalize: segments cut to the real context
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
    if not isinstance(self.local_capacity, int) or self.local_capacity < self.sinks + 2:
      raise MethodError(f"razor local_capacity={self.local_capacity!r} must be an integer >= "
                        f"sinks + 2 = {self.sinks + 2} (the sinks, the compensation token and "
                        f"at least one recent token)")
    base.check_fraction("echo_ratio", self.echo_ratio)
    base.check_fraction("induction_ratio", self.induction_ratio)

  def needs_calibration(self) -> bool:
    return not self.heads

  def calibrated(self, scores: dict) -> "RazorAttention":
    return dataclasses.replace(
        self, heads=retrieval_heads(scores, self.echo_ratio, self.induction_ratio))

  def between_chunks(self, cache):
    """Retrieval heads select every candidate slot under jit (empty ones too, the
    worst case); trimmed here so capacities do not compound from chunk to chunk."""
    return cache.replace(layers=tuple(layer.trimmed() for layer in cache.layers))

  def finalize(self, cache, config=None):
    if config is not None and len(self.heads) != config.num_layers:
      raise MethodError(f"razor heads has {len(self.heads)} layer masks; the model has "
                        f"{config.num_layers} layers: calibrated for another model?")
    return self.between_chunks(cache)

  def layer_heads(self, layer: int, num_kv_heads: int) -> np.ndarray:
    if not self.heads:
      raise MethodError("razor has no retrieval heads: bind it to a model first "
                        "(kvjax.calibration.bind(method, model) calibrates it)")
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
