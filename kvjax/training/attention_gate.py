"""Training Attention-Gate: the frozen model reads with in-context eviction, the gates learn.

Reading: arXiv 2410.12876 as `kvjax.methods.attention_gate` states it (that module's
docstring says which parts are kvjax's choices). One forward pass of the frozen backbone
with every layer's gate in it: at layer l the gate reads the layer's pre-RoPE [q; k; v],
flags each token per KV head (hard forward, f = 1[g > tau]; straight-through backward,
f + (g - stop_gradient(g))), and attention runs with those flags: query i of KV head h's
group sees key j < i only weighted by f_j^h, itself always,
  p_ij = f_ij exp(s_ij) / sum_j' f_ij' exp(s_ij'),   f_ij = f_j^h (j < i), 1 (j = i),
which is exact masking forward (f in {0, 1}) and gives each flag the gradient of its
token's weight backward (bounded: an evicted token counts as at most the best kept one,
see `masked_softmax`). The first `sinks` tokens are always kept, their flags get no
gradient. The masked layer's output feeds the next layer, so later gates
read what in-context eviction left. The policy protocol carries this without a method flag
in the model: the training "cache" is one `GatedLayer` per layer holding that layer's gate
parameters, whose `attend` gates and masks the chunk (nothing is stored).

Loss (kvjax's reading; the paper's exact eviction loss is unverified):
  L = LM + eviction_weight x (eviction rate - target_eviction)^2,
LM the next-token cross entropy over the real tokens, the eviction rate the share of
(layer, KV head, real token) flags that evict (straight-through: the hard rate forward, the
gates' gradient backward). One rate over all layers and heads, so layers and heads may
evict different shares. Gates start keeping everything (bias `keep_logit` > 0): training
starts from the unmodified model. Only the gates are arguments of the gradient; the
backbone sits behind stop_gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import calibration, validation
from kvjax.cache.kv_cache import Cache
from kvjax.config import ModelConfig
from kvjax.errors import KvjaxError
from kvjax.methods import attention_gate as gate_method
from kvjax.methods import trained
from kvjax.model import transformer
from kvjax.ops import attention as attention_ops
from kvjax.sharding import placement_of
from kvjax.training import data as data_lib
from kvjax.training import evaluation
from kvjax.training.loop import Task
from pallas_kernels import reference


@dataclasses.dataclass(frozen=True)
class AttentionGateSettings:
  gate_heads: int = 4            # MHA' heads
  gate_dim: int = 32             # MHA' head dimension
  threshold: float = 0.5         # keep when the gate exceeds it
  sinks: int = 4                 # the first tokens, always kept (0: none)
  target_eviction: float = 0.5   # share of (layer, head, token) flags to evict
  eviction_weight: float = 10.0  # lambda of the eviction loss
  keep_logit: float = 2.0        # the gates' initial bias (> 0: everything kept at first)

  def __post_init__(self):
    validation.integer("gate_heads", self.gate_heads, 1, error=KvjaxError)
    validation.integer("gate_dim", self.gate_dim, 1, error=KvjaxError)
    validation.number("threshold", self.threshold, 0, 1, low_open=True, high_open=True,
                      error=KvjaxError, what="the gate value above which a token is kept")
    validation.integer("sinks", self.sinks, 0, error=KvjaxError,
                       what="first tokens always kept")
    validation.number("target_eviction", self.target_eviction, 0, 1, high_open=True,
                      error=KvjaxError, what="the share of tokens the gates should evict")
    validation.number("eviction_weight", self.eviction_weight, 0, error=KvjaxError)
    validation.number("keep_logit", self.keep_logit, error=KvjaxError)


# ----------------------------------------------------------------- the gated forward pass

def gated_attention(queries, keys, values, positions, keep):
  """[B, T, H, D] causal attention of a chunk over itself with keep flags.

  queries [B, T, H, D] and keys [B, K, T, D] post-RoPE, values [B, K, T, r D], positions
  [B, T] (negative: padding), keep [B, K, T] (straight-through flags, 1/0 forward): query i
  of KV head h's group sees key j < i weighted by keep[h, j], and itself always."""
  k, d = keys.shape[1], queries.shape[-1]
  grouped = reference.group_heads(queries, k)                              # [B, K, G, T, D]
  scores = jnp.einsum("bkgtd,bksd->bkgts", grouped.astype(jnp.float32),
                      keys.astype(jnp.float32)) * d ** -0.5
  seen = attention_ops.visible(positions[:, None, None], positions[:, None, None])
  itself = (positions[:, :, None] == positions[:, None, :])[:, None, None]  # [B,1,1,T,S]
  weights = jnp.where(itself, 1.0, keep[:, :, None, None, :].astype(jnp.float32))
  probs = gate_method.masked_softmax(scores, seen, weights)
  out = reference.weighted_values(probs.astype(values.dtype), values, d, lambda p, v: jnp.einsum(
      "bkgts,bksd->bkgtd", p, v))
  return reference.ungroup_heads(out).astype(queries.dtype)


@struct.dataclass
class GatedLayer:
  """A layer's stand-in for a cache during training: it holds the layer's gate, and its
  `attend` flags the chunk and attends with in-context eviction. It stores nothing; the
  statistics it returns are the gate values and the straight-through flags, [B, T, K]."""
  gate: dict
  config: ModelConfig = struct.field(pytree_node=False)
  threshold: float = struct.field(pytree_node=False)
  sinks: int = struct.field(pytree_node=False)

  def attend(self, queries, query_positions, pending, want):
    del want
    features = gate_method.gate_features(self.config, queries, pending.keys, pending.values,
                                         query_positions)
    probs = jax.nn.sigmoid(gate_method.gate_logits(self.gate, features, query_positions))
    hard = gate_method.keep_flags(probs, self.threshold)
    sink = gate_method.sink_tokens(query_positions, self.sinks)[..., None]
    # Straight-through: exactly the hard flags forward, the gate's gradient backward
    # (none for sinks, which the gate does not decide).
    straight = hard.astype(jnp.float32) + (probs - jax.lax.stop_gradient(probs))
    keep = jnp.where(sink, 1.0, straight)
    out = gated_attention(queries, pending.keys, pending.values, query_positions,
                          jnp.swapaxes(keep, 1, 2))
    return out, (probs, keep)


@dataclasses.dataclass(frozen=True)
class GatedForward:
  """The cache policy of training: each layer's chunk goes to its GatedLayer unstored; the
  forward pass returns every layer's (gate values, flags), stacked [L, B, T, K]."""

  def prepare(self, layer, layer_cache, new):
    del layer
    return layer_cache, new, frozenset()

  def update(self, layer, layer_cache, step, stats):
    del layer, layer_cache, step
    return stats

  def finish(self, layers, lengths):
    del lengths
    probs, keep = zip(*layers)
    return jnp.stack(probs), jnp.stack(keep)


GATED = GatedForward()


def gated_forward(graphdef, config: ModelConfig, backbone, gates, tokens, mask,
                  threshold: float, sinks: int):
  """(logits [B, T, V], gate values [L, B, T, K], straight-through flags [L, B, T, K]) of
  token rows read from the start with every layer's gate evicting in context."""
  layers = tuple(GatedLayer(gate_method.layer_gate(gates, layer), config, threshold, sinks)
                 for layer in range(config.num_layers))
  cache = Cache(layers=layers, lengths=jnp.zeros((tokens.shape[0],), jnp.int32))
  logits, (probs, keep) = transformer.forward(graphdef, backbone, tokens, mask, cache, "all",
                                              GATED)
  return logits, probs, keep


# ----------------------------------------------------------------- the loss

def lm_loss(logits, tokens, mask):
  """Mean next-token cross entropy over the real tokens that have a real successor."""
  valid = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return (nll * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def attention_gate_loss(logits, keep, tokens, mask, settings: AttentionGateSettings):
  """(loss, metrics): LM + eviction_weight x (eviction rate - target)^2; the rate over
  every (layer, KV head, real token) flag of keep [L, B, T, K]."""
  lm = lm_loss(logits, tokens, mask)
  real = jnp.broadcast_to(mask[None, :, :, None], keep.shape).astype(jnp.float32)
  eviction_rate = 1.0 - (keep * real).sum() / jnp.maximum(real.sum(), 1.0)
  eviction = (eviction_rate - settings.target_eviction) ** 2
  loss = lm + settings.eviction_weight * eviction
  return loss, {"lm_loss": lm, "eviction_loss": eviction, "eviction_rate": eviction_rate}


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "settings"))
def full_loss(gates, backbone, batch, graphdef, config: ModelConfig,
              settings: AttentionGateSettings):
  """The training loss of a token batch; no gradient flows into `backbone`."""
  logits, _, keep = gated_forward(graphdef, config, jax.lax.stop_gradient(backbone), gates,
                                  batch["tokens"], batch["mask"], settings.threshold,
                                  settings.sinks)
  return attention_gate_loss(logits, keep, batch["tokens"], batch["mask"], settings)


def task(model, settings: AttentionGateSettings = AttentionGateSettings(),
         data_settings: data_lib.DataSettings = data_lib.DataSettings(),
         eval_settings: evaluation.EvalSettings | None = None) -> Task:
  """The Attention-Gate training task of `model` (its weights frozen): continual
  pretraining on the data's token rows (every real token is an LM target). With
  `eval_settings`, it evaluates the gates on held-out essays (they set their own ratio)."""
  config = model.config

  def batch(position, count):
    return data_lib.batch(data_settings, position, count, model.tokenizer,
                          config.vocab_size)

  def loss(gates, backbone, micro_batch, key):
    del key
    return full_loss(gates, backbone, micro_batch, model.graphdef, config, settings)

  def init_params(key):
    return gate_method.init_gates(config, settings.gate_heads, settings.gate_dim,
                                  settings.keep_logit, key)

  identity = trained.model_identity(config)
  meta = {"kind": gate_method.KIND,
          "hyperparameters": {"gate_heads": settings.gate_heads, "gate_dim": settings.gate_dim,
                              "threshold": settings.threshold, "sinks": settings.sinks},
          "loss": dataclasses.asdict(settings), "data": dataclasses.asdict(data_settings),
          "model": identity, "model_hash": trained.identity_hash(identity),
          "weights_fingerprint": calibration.model_fingerprint(model)}
  evaluate = None if eval_settings is None else evaluation.method_evaluator(
      model, lambda gates: gate_method.AttentionGate(gates=gate_method.GateWeights(gates, meta)),
      eval_settings, with_ratio=False)
  return Task(init_params=init_params, loss=loss, frozen=model.params, batch=batch, meta=meta,
              evaluate=evaluate, placement=placement_of(model))
