"""A trained 1-bit discard predictor for the offload tier's page buffer (the in-jit part).

Paging with Succinct Predictions (Antoniadis et al., ICML 2023) evicts pages flagged "safe
to evict" first: the perfect bit is 1 iff Belady/FitF evicts the page before its next
request (`kvjax.systems.paging.belady_discard_bits`). `page_buffer`'s "learned" policy gets
the bit of every page of a row and KV head, every decode step, from a tiny model over
cheap features (`page_features`, all [B, K, P] arrays the buffer has at the step):

  bound      the page's logit bound for the current query (max over the KV head's query
             heads), min-max normalised over the row and head's pages with tokens (0..1)
  rank       its rank by that bound among those pages, 0 (best) .. 1 (worst)
  requested  1 if the step reads the page
  since      steps since the page was last read (0: this step), log1p-scaled so that 64
             steps or more (or never read) give 1
  frequency  an exponential moving average (decay `EMA_DECAY`) of "read at a step"
  newest     1 for the page the newest token is in
  sink       1 for page 0 (the attention sinks)

The model (`PagePredictor`) is logistic regression (`hidden=0`) or one hidden layer of
`hidden` tanh units, its weights a flat tuple of floats: a frozen, hashable dataclass, so a
buffer carries it as static config and the jitted step compiles the weights in. The bit is
probability > `threshold`.

`TRAINED` is the predictor the library ships: the weights below are written by
kvjax.systems.page_predictor's training on traces of real SmolLM2-135M decodes (Quest,
12 device frames per row and KV head, Belady labels at that capacity, the recording's
censored last-step labels left out; a 4-unit hidden layer). The buffer uses a page's bit
only once the step is done reading it (page_buffer's same-step rule). Reproduce with `python scripts/train_page_predictor.py --write` (see
kvjax.systems.page_predictor for the data, the split and the held-out numbers).

Why static weights rather than traced `method_params` (how trained selectors get theirs):
the model is 37 floats evaluated on every page at every decode step inside the buffer's
eviction loop; compiled in, they cost nothing to pass, and a different predictor is a
different policy (it recompiles, as another `eviction` would).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax import validation
from kvjax.errors import KvjaxError

FEATURES = ("bound", "rank", "requested", "since", "frequency", "newest", "sink")
NUM_FEATURES = len(FEATURES)
EMA_DECAY = 0.8      # the frequency feature's moving average: f <- d f + (1 - d) read
SINCE_SCALE = 64     # steps since the last read at which the feature reaches 1


class PredictorError(KvjaxError):
  """Invalid page-predictor weights or threshold."""


def num_weights(hidden: int) -> int:
  """Weights of a predictor with `hidden` units (0: logistic regression): per hidden unit
  one weight per feature and a bias, then one output weight per unit and a bias."""
  if hidden == 0:
    return NUM_FEATURES + 1
  return hidden * (NUM_FEATURES + 1) + hidden + 1


@dataclasses.dataclass(frozen=True)
class PagePredictor:
  """A discard-bit model (see the module docstring). weights: `num_weights(hidden)` finite
  floats, laid out as (w [F], b) for logistic regression, else (W1 [hidden, F] row-major,
  b1 [hidden], w2 [hidden], b2). threshold: the probability above which a page is safe."""
  weights: tuple
  hidden: int = 0
  threshold: float = 0.5

  def __post_init__(self):
    validation.integer("hidden", self.hidden, 0, 256, error=PredictorError,
                       what="hidden units (0: logistic regression)")
    validation.number("threshold", self.threshold, 0, 1, low_open=True, high_open=True,
                      error=PredictorError, what="the probability above which a page is "
                      "predicted safe to evict")
    if not isinstance(self.weights, tuple):
      raise PredictorError(f"weights={validation.show(self.weights)} must be a tuple of "
                           f"floats (hashable: the jitted step compiles them in)")
    want = num_weights(self.hidden)
    if len(self.weights) != want:
      raise PredictorError(f"weights has {len(self.weights)} values; hidden={self.hidden} "
                           f"with {NUM_FEATURES} features {FEATURES} needs {want}")
    for i, w in enumerate(self.weights):
      validation.number(f"weights[{i}]", w, error=PredictorError)
    object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))

  def logits(self, features: jax.Array) -> jax.Array:
    """[...] the discard logit of features [..., F] (float32)."""
    return predictor_logits(jnp.asarray(self.weights, jnp.float32), self.hidden,
                            features.astype(jnp.float32))

  def bits(self, features: jax.Array) -> jax.Array:
    """[...] bool: probability > threshold."""
    return self.logits(features) > math.log(self.threshold / (1 - self.threshold))


def predictor_logits(weights: jax.Array, hidden: int, features: jax.Array) -> jax.Array:
  """The model as a function of its flat weights (traced in training, constant in the
  buffer): features [..., F] -> logits [...]."""
  f = NUM_FEATURES
  if hidden == 0:
    return features @ weights[:f] + weights[f]
  w1 = weights[:hidden * f].reshape(hidden, f)
  at = hidden * f
  b1, w2, b2 = weights[at:at + hidden], weights[at + hidden:at + 2 * hidden], weights[-1]
  return jnp.tanh(features @ w1.T + b1) @ w2 + b2


def update_history(last_request: jax.Array, frequency: jax.Array, requests: jax.Array,
                   step) -> tuple:
  """(last_request, frequency) [B, K, P] after a step that reads requests [B, K, R]
  (last_request: the step of the last read, -1 never)."""
  b, k, _ = requests.shape
  read = jnp.zeros(last_request.shape, bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], requests].set(True)
  return (jnp.where(read, step, last_request),
          EMA_DECAY * frequency + (1 - EMA_DECAY) * read.astype(jnp.float32))


def page_features(bounds: jax.Array, newest, last_request: jax.Array,
                  frequency: jax.Array, step) -> jax.Array:
  """[B, K, P, F] the features (see the module docstring) from bounds [B, K, P] (the
  current query's logit bound per page, max over query heads; -inf for pages without
  tokens), the newest page's index, and the history after this step's reads
  (`update_history`) at decode step `step`."""
  p = bounds.shape[-1]
  valid = jnp.isfinite(bounds)
  hi = jnp.where(valid, bounds, -jnp.inf).max(-1, keepdims=True)
  lo = jnp.where(valid, bounds, jnp.inf).min(-1, keepdims=True)
  span = jnp.maximum(hi - lo, 1e-6)
  bound = jnp.where(valid, (bounds - lo) / span, 0.0)
  order = jnp.argsort(jnp.where(valid, -bounds, jnp.inf), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True).astype(jnp.float32)
  count = valid.sum(-1, keepdims=True)
  rank = jnp.where(valid, rank / jnp.maximum(count - 1, 1), 1.0)
  since = jnp.where(last_request >= 0, step - last_request, SINCE_SCALE)
  since_f = jnp.minimum(jnp.log1p(since.astype(jnp.float32)) / math.log1p(SINCE_SCALE), 1.0)
  pages = jnp.arange(p)
  newest_f = jnp.broadcast_to(pages == newest, bounds.shape)
  sink = jnp.broadcast_to(pages == 0, bounds.shape)
  return jnp.stack([bound, rank, (since == 0).astype(jnp.float32), since_f,
                    frequency.astype(jnp.float32), newest_f.astype(jnp.float32),
                    sink.astype(jnp.float32)], -1)


# ------------------------------------------------------------------ the shipped weights
# BEGIN TRAINED (written by kvjax.systems.page_predictor.write_trained; do not edit)
TRAINED = PagePredictor(
    weights=(
        -0.1836036741733551, -0.4281233251094818, -0.44988229870796204, -1.7970749139785767,
        0.6796002984046936, 0.9729866981506348, 0.08772492408752441, 0.22856256365776062,
        1.2943718433380127, -0.21507979929447174, 0.7076234221458435, -1.4352895021438599,
        -2.160382032394409, -0.46779555082321167, -0.3466656804084778, -0.2566062808036804,
        1.087144136428833, -1.1702426671981812, -0.02533782832324505, 0.30500930547714233,
        -0.2556903660297394, 0.4765895903110504, -1.7958264350891113, -0.46309906244277954,
        -0.28016889095306396, 0.3191239833831787, 1.1496572494506836, 0.23288598656654358,
        0.8951693177223206, 0.8747844696044922, 0.48559269309043884, 0.03269277885556221,
        -2.0408999919891357, 1.646951675415039, -1.6534451246261597, -1.4989365339279175,
        -0.5695887207984924),
    hidden=4, threshold=0.5)
# END TRAINED
