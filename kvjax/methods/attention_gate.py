"""Attention-Gate: a trained per-layer gate flags each token kept or evicted per KV head.

Reading: Zeng et al., "In-context KV-Cache Eviction for LLMs via Attention-Gate" (arXiv
2410.12876; no public code). The paper's method section could not be read here: this follows
`shared/reference/methods_A.md` §20 (paper-only, sizes unverified) and says where kvjax
chooses. What the paper fixes: a lightweight gate before each attention layer reads the
context through a reduced multi-head attention MHA', a linear layer maps each token to one
value per head, g = sigmoid(.), the flag is f = 1[g > tau] with a straight-through
estimator, a token flagged evicted for head h is invisible to later queries of h (the
current token always sees itself), the loss is the LM loss plus an eviction loss toward a
target rate, flags are per KV head under GQA, and evicted tokens never enter the cache.

kvjax's choices, each marked where the paper may differ:
- Input: the layer's own projections [q; k; v] (pre-RoPE, all heads side by side, as
  Locret's heads read them), not the hidden states X. The cache policy protocol hands a
  policy the projections, never X; they are X times the frozen [Wq Wk Wv] (+ bias), which is
  injective whenever that matrix has rank hidden_size (SmolLM2: 960 features of 576), so the
  gate loses nothing a gate on X could use. The features are RMS-normalised (no scale
  parameter) so one initialisation suits every layer's activation scale.
- MHA' is causal (a token's flag is decided when it is read, from it and what precedes it;
  a gate that saw later tokens would leak the next token into the LM loss), without RoPE,
  `gate_heads` heads of `gate_dim` dimensions; then W_o to one logit per KV head plus a bias.
- Threshold tau = 0.5 by default (logit > 0).
- The first `sinks` (4) tokens are always kept (the reference lists sinks as a safety net
  Attention-Gate composes with). Without them a 40-step SmolLM2-135M run went from LM loss
  about 3 to 10 once eviction began and did not recover; keeping the first 4 tokens (the
  model's attention sinks), the same run recovered. `sinks=0` is the paper's gate alone.

At inference (this module) the gate runs at the end of each prefill chunk over that
chunk's tokens; a KV head keeps the chunk tokens it flags and every token it kept before;
the finished context is stored head-wise (`FlatLayerCache`: each head's segment holds only
what it keeps, so `context_cache_bytes` follows the kept counts). Two differences from
training, both from kvjax's prefill protocol (the compression plan attends a chunk before
the method sees it): inside one prefill chunk tokens attend to their whole chunk (the
flags take effect for later chunks, questions and decode), and MHA' sees one chunk at a
time (exact for a one-chunk prefill, kvjax's default). Question and generated tokens are
all kept (the paper flags decode tokens too; that needs MHA' state for every token).
Training (the in-context masked forward pass and the loss) is `kvjax.training.attention_gate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.kv_cache import EMPTY_POSITION, FlatLayerCache, LayerCache
from kvjax.config import ModelConfig
from kvjax.errors import MethodError
from kvjax.methods import base, locret, registry, trained
from kvjax.ops import attention as attention_ops
from kvjax.ops import rope
from kvjax.ops.host import host_array

KIND = "attention_gate"
GATE_NAMES = ("wq", "wk", "wv", "wo", "bias")
DEFAULT_THRESHOLD = 0.5
DEFAULT_SINKS = 4
NORM_EPS = 1e-6
CHUNK_CAPACITY_MULTIPLE = 64   # between prefill chunks: few distinct shapes to compile


# ----------------------------------------------------------------- the gate (pure functions)

def gate_features(config: ModelConfig, queries, keys, values, positions):
  """[B, T, F] float32 gate inputs [q; k; v] before RoPE of a chunk: queries [B, T, H, D]
  and keys [B, K, T, D] post-RoPE (rotated back here), values [B, K, T, r D], positions
  [B, T]. The same function serves training and inference, so both read identical
  features."""
  raw_queries = rope.apply_rope(queries.astype(jnp.float32), positions,
                                rope.inverse_frequencies(config), inverse=True)
  return locret.retaining_features(config, raw_queries, keys, values, positions)


def masked_softmax(logits, seen, weights=None):
  """Softmax of `logits` over the entries `seen` (bool) of the last axis, each
  exponential scaled by `weights` (straight-through keep flags: 1 or 0 forward, their
  gate's gradient backward). A row that sees nothing is all zeros.

  With weights, the softmax is stabilised by the best *kept* entry, and an evicted entry
  counts as at most that one: forward this changes nothing (evicted entries weigh 0), and
  backward the straight-through gradient of readmitting a dominant evicted token (an
  attention sink, tens of nats ahead) stays bounded instead of growing as exp(its lead)."""
  live = seen if weights is None else seen & (weights > 0)
  top = jnp.max(jnp.where(live, logits, -jnp.inf), axis=-1, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  lead = logits - top
  e = jnp.where(seen, jnp.exp(jnp.where(lead > 0, 0.0, lead)), 0.0)
  if weights is not None:
    e = e * weights
  total = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def gate_logits(gate: dict, features, positions):
  """[B, T, K] one layer's keep logits: MHA' (causal, by positions [B, T], negative =
  padding) over the RMS-normalised features [B, T, F], then W_o and the bias. `gate`
  holds that layer's wq/wk/wv [F, G, E], wo [G, E, K] and bias [K]."""
  x = features.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + NORM_EPS)
  project = lambda w: jnp.einsum("btf,fge->bgte", x, w.astype(jnp.float32))
  q, k, v = project(gate["wq"]), project(gate["wk"]), project(gate["wv"])
  scores = jnp.einsum("bgte,bgse->bgts", q, k) * q.shape[-1] ** -0.5
  seen = attention_ops.visible(positions[:, None], positions[:, None])    # [B, 1, T, S]
  mixed = jnp.einsum("bgts,bgse->btge", masked_softmax(scores, seen), v)
  return (jnp.einsum("btge,gek->btk", mixed, gate["wo"].astype(jnp.float32))
          + gate["bias"].astype(jnp.float32))


def keep_flags(probabilities, threshold: float):
  """Hard flags: a token is kept for a head when its gate exceeds the threshold."""
  return probabilities > threshold


def sink_tokens(positions, sinks: int):
  """[B, T] bool: the first `sinks` positions, kept whatever their gate says."""
  return (positions >= 0) & (positions < sinks)


def layer_gate(gates: dict, layer: int) -> dict:
  """Layer `layer`'s slice of the stacked gate parameters."""
  return {name: gates[name][layer] for name in GATE_NAMES}


def init_gates(config: ModelConfig, heads: int, dim: int, keep_logit: float, key) -> dict:
  """Fresh gates of every layer: wq/wk/wv [L, F, heads, dim] normal(0, 1/sqrt(F)) (unit
  MHA' logits on normalised features), wo [L, heads, dim, K] normal(0, 0.02) and the bias
  [L, K] at `keep_logit`: a positive value keeps every token at the start, so training
  begins from the unmodified model."""
  base.check_int("gate_heads", heads, 1)
  base.check_int("gate_dim", dim, 1)
  base.check_number("keep_logit", keep_logit)
  f, n, kv = locret.feature_size(config), config.num_layers, config.num_kv_heads
  kq, kk, kv_key, ko = jax.random.split(key, 4)
  normal = lambda k, shape, std: std * jax.random.normal(k, shape, jnp.float32)
  return {"wq": normal(kq, (n, f, heads, dim), f ** -0.5),
          "wk": normal(kk, (n, f, heads, dim), f ** -0.5),
          "wv": normal(kv_key, (n, f, heads, dim), f ** -0.5),
          "wo": normal(ko, (n, heads, dim, kv), 0.02),
          "bias": jnp.full((n, kv), keep_logit, jnp.float32)}


def check_gates(params, config: ModelConfig) -> None:
  """Refuses gate parameters whose shapes do not fit `config`."""
  if not isinstance(params, dict) or set(params) != set(GATE_NAMES):
    keys = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise MethodError(f"attention_gate parameters must be {sorted(GATE_NAMES)}; got {keys}")
  shapes = {name: tuple(np.shape(params[name])) for name in GATE_NAMES}
  n, f, k = config.num_layers, locret.feature_size(config), config.num_kv_heads
  wq = shapes["wq"]
  ok = len(wq) == 4 and wq[:2] == (n, f)
  if ok:
    g, e = wq[2:]
    ok = (shapes["wk"] == wq and shapes["wv"] == wq and shapes["wo"] == (n, g, e, k)
          and shapes["bias"] == (n, k))
  if not ok:
    shown = ", ".join(f"{name} {shapes[name]}" for name in GATE_NAMES)
    raise MethodError(f"attention_gate parameters of shapes {shown} do not fit this model "
                      f"({config.name or 'unnamed'}): it needs wq/wk/wv ({n}, {f}, heads, "
                      f"dim), wo ({n}, heads, dim, {k}) and bias ({n}, {k}) for {n} layers "
                      f"of {config.num_heads} query and {k} KV heads of dim "
                      f"{config.head_dim}; trained for another model?")


class GateWeights(locret.RetainingHeads):
  """Trained gate weights held in memory, hashable by content (an AttentionGate carrying
  them stays a static jit argument). `meta`: the training run's metadata, or None."""

  def __eq__(self, other):
    return isinstance(other, GateWeights) and other.digest == self.digest

  __hash__ = locret.RetainingHeads.__hash__   # defining __eq__ would drop it

  def __repr__(self):
    return f"GateWeights({self.digest})"


# ----------------------------------------------------------------- host-side layout

def headwise(layer: LayerCache) -> FlatLayerCache:
  """Host side: a dense layer's real slots stored head by head, each head's segment as long
  as the most that head keeps in any row."""
  kept = layer.positions >= 0
  total = max(int(kept.sum((1, 2)).max()), 1)
  flat = FlatLayerCache.from_selection(layer.replace(state=None), kept, total)
  # A layer that keeps nothing keeps one empty slot: attention needs a slot axis.
  return flat.trimmed() if bool(kept.any()) else flat


def trimmed_to_bucket(layer: LayerCache) -> LayerCache:
  """Host side: a dense layer's real slots first, its capacity cut to a multiple of
  CHUNK_CAPACITY_MULTIPLE that holds them."""
  if not bool((layer.positions >= 0).any()):
    return layer
  trimmed = layer.trimmed()
  bucket = CHUNK_CAPACITY_MULTIPLE
  return trimmed.grow(-(-trimmed.capacity // bucket) * bucket - trimmed.capacity)


def kept_counts(layer) -> np.ndarray:
  """[B, K] real slots each row's KV head holds (dense or head-wise layer)."""
  positions = host_array(layer.positions)
  if isinstance(layer, FlatLayerCache):
    heads = host_array(layer.heads)
    k = layer.num_kv_heads
    return np.stack([((heads == h) & (positions >= 0)).sum(-1) for h in range(k)], -1)
  return (positions >= 0).sum(-1)


# ----------------------------------------------------------------- the method

@registry.register
@dataclasses.dataclass(frozen=True)
class AttentionGate(trained.TrainedWeights, base.Method):
  """Attention-Gate (arXiv 2410.12876): per layer, a trained gate (a small causal MHA' over
  the layer's pre-RoPE [q; k; v], then one sigmoid per KV head) flags each context token
  kept or evicted per KV head; a head's evicted tokens never enter the cache, which is
  stored head-wise, so heads hold different numbers of tokens and memory follows.

  The gate sets the budget: no compression_ratio or budget. threshold: the gate value
  above which a token is kept; sinks: the first tokens always kept (None: the training
  run's values, else 0.5 and 4). checkpoint: a run directory (or step folder) of `scripts/train.py
  --method=attention_gate`; gates: the weights in memory (`GateWeights`). Give one: use
  `AttentionGate.from_checkpoint(path)` or method="attention_gate:checkpoint=PATH".
  See the module docstring for the reading of the paper.
  """
  name: ClassVar[str] = "attention_gate"
  needs_budget: ClassVar[bool] = False
  headwise: ClassVar[bool] = True
  trims_padding: ClassVar[bool] = True   # finalize: each head cut to the tokens it keeps
  KIND: ClassVar[str] = KIND
  WEIGHTS_FIELD: ClassVar[str] = "gates"
  WEIGHTS_TYPE: ClassVar[type] = GateWeights
  MISSING: ClassVar[str] = "trained gates"
  TRAINS_ON_FIRST_USE: ClassVar[bool] = True   # kvjax.training.pretrained's recipe
  check_shapes = staticmethod(check_gates)
  reads_context: ClassVar[bool] = True   # its weights, as traced parameters
  wrappable: ClassVar[bool] = False      # the gate, not a budget, decides what is kept
  threshold: Any = None
  sinks: Any = None
  checkpoint: str = ""
  gates: Any = None

  def __post_init__(self):
    if self.threshold is not None:
      base.check_number("threshold", self.threshold, 0, 1, high_open=True,
                        what="the gate value above which a token is kept (None: the "
                             "trained one)")
    if self.sinks is not None:
      base.check_int("sinks", self.sinks, 0)
    self.check_weights_source()

  def _trained(self, name: str, default):
    """A hyperparameter the gates were trained with (`default` without metadata)."""
    hyper = (self.metadata() or {}).get("hyperparameters") or {}
    return hyper.get(name, default)

  def gate_threshold(self) -> float:
    """The threshold in use: the field, else the training run's, else 0.5."""
    if self.threshold is not None:
      return float(self.threshold)
    return float(self._trained("threshold", DEFAULT_THRESHOLD))

  def gate_sinks(self) -> int:
    """The first tokens always kept: the field, else the training run's, else 4."""
    return int(self.sinks if self.sinks is not None else self._trained("sinks", DEFAULT_SINKS))

  def layer_budgets(self, config, keep, context_length):
    del context_length
    self.check_model(config)
    return (keep,) * config.num_layers

  def context_params(self, tokenizer, tokens, mask):
    del tokenizer, tokens, mask
    return {"gates": self.weights()}

  def new_token_flags(self, x: base.LayerInputs):
    """[B, K, T] bool: the gate keeps the chunk's token t for KV head k, or t is a sink
    (padding never)."""
    if not isinstance(x.params, dict) or "gates" not in x.params:
      raise MethodError("attention_gate reads its weights from its parameters "
                        "(AttentionGate.context_params): prefill through kvjax.generate, "
                        "kvjax.score or context.prefill without method_params")
    check_gates(x.params["gates"], x.config)
    t = x.query_positions.shape[1]
    features = gate_features(x.config, x.queries, x.keys[:, :, -t:], x.values[:, :, -t:],
                             x.query_positions)
    logits = gate_logits(layer_gate(x.params["gates"], x.layer), features, x.query_positions)
    flags = keep_flags(jax.nn.sigmoid(logits), self.gate_threshold())
    sink = sink_tokens(x.query_positions, self.gate_sinks())[:, None, :]
    return (jnp.swapaxes(flags, 1, 2) | sink) & (x.query_positions >= 0)[:, None, :]

  def compact(self, cand, x, keep):
    """Every slot kept before, and the chunk's tokens its gate flags, per KV head; the
    others become empty slots (dense under jit; `finalize` stores the heads apart)."""
    del keep
    flags = self.new_token_flags(x)
    t = flags.shape[-1]
    earlier = jnp.ones(flags.shape[:2] + (cand.capacity - t,), bool)
    kept = jnp.concatenate([earlier, flags], axis=-1)
    return cand.replace(positions=jnp.where(kept, cand.positions, EMPTY_POSITION))

  def between_chunks(self, cache):
    """Empty slots cut, so capacities do not compound from chunk to chunk; capacities are
    rounded up to a multiple of CHUNK_CAPACITY_MULTIPLE so the next chunk's step compiles
    for few shapes (a layer that kept nothing stays as it is)."""
    return cache.replace(layers=tuple(trimmed_to_bucket(layer) for layer in cache.layers))

  def finalize(self, cache, config=None):
    """Each layer stored head-wise: a head's segment holds only the tokens it keeps."""
    del config
    return cache.replace(layers=tuple(headwise(layer) for layer in cache.layers))

  def kept_budgets(self, cache, budgets):
    """Tokens each layer keeps per KV head, on average over rows and heads."""
    del budgets
    return tuple(int(round(kept_counts(layer).mean())) for layer in cache.layers)

  def cache_stats(self, cache) -> dict:
    """The kept share of the context overall and per layer, and the tokens each (layer,
    row, KV head) keeps."""
    lengths = np.maximum(host_array(cache.lengths), 1)[:, None]            # [B, 1]
    counts = [kept_counts(layer) for layer in cache.layers]                 # L x [B, K]
    per_layer = [float((c / lengths).mean()) for c in counts]
    return {"kept_fraction": float(np.mean(per_layer)),
            "kept_fraction_per_layer": per_layer,
            "kept_tokens_per_head": [c.tolist() for c in counts]}
