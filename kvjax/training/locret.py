"""Training Locret's retaining heads against causal importance scores (CIS).

Reading: the official code (huangyuxiang03/Locret), `locret/train/data_gen.py` (labels)
and `locret/train/train.py` (loss, optimiser). Labels: the context is read, then the
answer, with eager attention; the code's eager attention returns the attention *logits*
(q k^T / sqrt(d) plus the causal mask, copied before the softmax), and a context token's
label per KV head is their maximum over the answer's queries and the head's query group:
  CIS[l, h, j] = max_{i in answer, g in group(h)} q_i^(g) . k_j / sqrt(d)   (post-RoPE).
One forward pass over [context; answer] gives both the labels and the heads' inputs (the
context's pre-RoPE q, k, v): attention is causal, so the context's states are those of
reading it alone. Loss per layer l and KV head h, over the context's tokens j:
  SmoothL1(R_lh, CIS_lh) averaged over j, then over (l, h) and rows, plus
  0.0025 x sum over layers of mean_{h, j} (R_lh[j] - R_lh[j+1])^2   (smoothness).
Metric, as the code prints it: the overlap of the top 10% tokens by prediction and by
label (`top_overlap`). The backbone is frozen: its outputs sit behind stop_gradient, and
only the heads are arguments of the gradient. The code's optimiser is AdamW (lr 5e-4,
betas 0.9/0.95, weight decay 0.01), 2000 linear warmup steps of 3000, linear decay,
gradient values clipped at 0.5, batch 1 up to 10240 tokens, bf16; kvjax's defaults are
smaller (CPU-sized) and the optimiser is `kvjax.training.optim`'s.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kvjax import calibration, validation
from kvjax.cache.kv_cache import init_cache
from kvjax.errors import KvjaxError
from kvjax.methods import locret as locret_method
from kvjax.methods import trained
from kvjax.model import transformer
from kvjax.sharding import placement_of
from kvjax.training import data as data_lib
from kvjax.training import evaluation
from kvjax.training.loop import Task


@dataclasses.dataclass(frozen=True)
class LocretSettings:
  hidden: int = 1024            # the retaining heads' width (the code's)
  smooth_weight: float = 0.0025
  huber_beta: float = 1.0       # torch SmoothL1Loss's default beta
  top_fraction: float = 0.1     # the metric's top share of tokens

  def __post_init__(self):
    validation.integer("hidden", self.hidden, 1, error=KvjaxError)
    validation.number("smooth_weight", self.smooth_weight, 0, error=KvjaxError)
    validation.number("huber_beta", self.huber_beta, 0, low_open=True, error=KvjaxError)
    validation.number("top_fraction", self.top_fraction, 0, 1, low_open=True,
                      error=KvjaxError)


@dataclasses.dataclass(frozen=True)
class FeatureProbe:
  """A cache policy that stores nothing and returns, per layer, the chunk's retaining-head
  inputs [B, T, F] and its CIS labels [B, K, T] from the answer queries at the positions
  `params["answer_index"]` [B, A] (-1: none)."""

  def prepare(self, layer, layer_cache, new):
    del layer
    return layer_cache, new, frozenset()

  def update(self, layer, layer_cache, step, stats):
    del layer, layer_cache, stats
    features = locret_method.retaining_features(step.config, step.raw_queries,
                                                step.new.keys, step.new.values,
                                                step.new.positions)
    labels = causal_importance(step.queries, step.new.keys, step.params["answer_index"])
    return features, labels

  def finish(self, layers, lengths):
    del lengths
    features, labels = zip(*layers)
    return jnp.stack(features), jnp.stack(labels)          # [L, B, T, F], [L, B, K, T]


def causal_importance(queries, keys, answer_index):
  """[B, K, T] max over the answer queries and each KV head's query group of the
  attention logits q . k / sqrt(d) (post-RoPE queries [B, T, H, D], keys [B, K, T, D]);
  -inf where a row has no answer query."""
  b, t, h, d = queries.shape
  k = keys.shape[1]
  index = jnp.clip(answer_index, 0, t - 1)
  asked = jnp.take_along_axis(queries, index[:, :, None, None], axis=1)    # [B, A, H, D]
  asked = asked.reshape(b, -1, k, h // k, d).astype(jnp.float32)
  logits = jnp.einsum("bakgd,bktd->bkgat", asked, keys.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * d ** -0.5
  valid = (answer_index >= 0)[:, None, None, :, None]
  return jnp.where(valid, logits, -jnp.inf).max(axis=(2, 3))


@functools.partial(jax.jit, static_argnames=("graphdef", "config"))
def features_and_labels(graphdef, config, backbone, tokens, mask, answer_index):
  """([L, B, T, F], [L, B, K, T]) of a batch, behind stop_gradient."""
  _, (features, labels) = transformer.forward(
      graphdef, backbone, tokens, mask, init_cache(config, tokens.shape[0], 0), "last",
      FeatureProbe(), {"answer_index": answer_index})
  return jax.lax.stop_gradient(features), jax.lax.stop_gradient(labels)


def predicted_scores(heads, features):
  """[L, B, K, T] the heads' scores of features [L, B, T, F]."""
  scores = jax.vmap(locret_method.retaining_scores)(heads["w1"], heads["w2"], features)
  return jnp.swapaxes(scores, 2, 3)


def smooth_l1(x, y, beta: float):
  """torch.nn.SmoothL1Loss(reduction='none', beta)."""
  diff = jnp.abs(x - y)
  return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def top_overlap(predicted, labels, context, fraction: float):
  """Mean over (layer, row, head) of |top-k by prediction & top-k by label| / k, k the
  `fraction` of each row's context tokens (at least 1)."""
  n = context.sum(-1)                                                     # [B]
  k = jnp.maximum((fraction * n).astype(jnp.int32), 1)[None, :, None, None]
  rank = lambda s: jnp.argsort(jnp.argsort(
      -jnp.where(context[None, :, None, :], s, -jnp.inf), axis=-1), axis=-1)
  both = (rank(predicted) < k) & (rank(labels) < k)
  return (both.sum(-1) / k[..., 0]).mean()


def locret_loss(heads, features, labels, context, settings: LocretSettings):
  """(loss, metrics) of retaining heads on features [L, B, T, F], labels [L, B, K, T] and
  the context mask [B, T] (the tokens that get labels)."""
  predicted = predicted_scores(heads, features)                          # [L, B, K, T]
  ctx = context[None, :, None, :].astype(jnp.float32)
  safe_labels = jnp.where(ctx > 0, labels, 0.0)
  per_token = smooth_l1(predicted, safe_labels, settings.huber_beta) * ctx
  main = (per_token.sum(-1) / jnp.maximum(ctx.sum(-1), 1)).mean()
  pairs = ctx[..., 1:] * ctx[..., :-1]
  steps = (predicted[..., 1:] - predicted[..., :-1]) ** 2 * pairs
  per_layer = steps.sum(axis=(1, 2, 3)) / jnp.maximum(
      jnp.broadcast_to(pairs, steps.shape).sum(axis=(1, 2, 3)), 1)
  smoothness = per_layer.sum()
  loss = main + settings.smooth_weight * smoothness
  metrics = {"smooth_l1": main, "smoothness": smoothness,
             "top_overlap": top_overlap(predicted, labels, context, settings.top_fraction)}
  return loss, metrics


def full_loss(heads, backbone, batch, graphdef, config, settings: LocretSettings):
  """The training loss from token batches: the frozen backbone's features and labels
  (no gradient flows into `backbone`), then `locret_loss`."""
  features, labels = features_and_labels(graphdef, config, backbone, batch["tokens"],
                                         batch["mask"], batch["answer_index"])
  return locret_loss(heads, features, labels, batch["context"], settings)


def task(model, settings: LocretSettings = LocretSettings(),
         data_settings: data_lib.DataSettings = data_lib.DataSettings(),
         eval_settings: evaluation.EvalSettings | None = None) -> Task:
  """The Locret training task of `model` (its weights frozen); with `eval_settings`, it
  evaluates Locret with the current heads on held-out essays at their ratio."""
  config = model.config
  vocab = config.vocab_size

  def batch(position, count):
    return data_lib.batch(data_settings, position, count, model.tokenizer, vocab)

  def loss(heads, backbone, micro_batch, key):
    del key
    return full_loss(heads, backbone, micro_batch, model.graphdef, config, settings)

  identity = trained.model_identity(config)
  meta = {"kind": locret_method.KIND, "hyperparameters": {"hidden": settings.hidden},
          "loss": dataclasses.asdict(settings), "data": dataclasses.asdict(data_settings),
          "model": identity, "model_hash": trained.identity_hash(identity),
          "weights_fingerprint": calibration.model_fingerprint(model)}
  evaluate = None if eval_settings is None else evaluation.method_evaluator(
      model, lambda heads: locret_method.Locret(heads=locret_method.RetainingHeads(heads, meta)),
      eval_settings)
  return Task(init_params=lambda key: locret_method.init_heads(config, settings.hidden, key),
              loss=loss, frozen=model.params, batch=batch, meta=meta, evaluate=evaluate,
              placement=placement_of(model))
