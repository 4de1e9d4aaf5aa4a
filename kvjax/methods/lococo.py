"""LoCoCo: a fixed-size memory per layer; heavy hitters kept, the rest fused by a trained conv.

Reading: the official code (VITA-Group/LoCoCo), `llama/memory_compressor.py`
(`memory_saver`: the partition, the residual weights, the convolution and the mix),
`llama/modeling_llama.py` (when it compresses, where the heavy-hitter scores come from) and
`train.py` (the chunked training loop, which lives in `kvjax.training.lococo` here).

Per layer, the memory holds M slots. When a prefill chunk has been read and the candidates
(the memory, then the chunk) exceed M, each KV head keeps
- M_h = round(M x hh_keep_rate) heavy hitters (round half up): the last `local`
  candidates in slot order (the newest tokens) and the top M_h - local others by hh, hh
  being the chunk's attention probabilities summed over its queries (and over each KV
  head's query group); and
- M_c = M - M_h fused slots made from the m remaining candidates R (in slot order):
    W = (1 - lambda) R_w + lambda softmax_over_R(ReLU(Conv1d(concat(K_R, V_R))))
    K_c = W K_R,  V_c = W V_R
  where the Conv1d maps the 2 d channels of each slot (key then value, post-RoPE) to M_c
  channels, kernel `kernel_size` (21) with same padding, sliding over R's slot axis, its
  weights shared by the heads of a layer; R_w [M_c, m] has one 1 per row, at the top M_c of
  R by hh, rows in slot order; lambda is a trained scalar per layer.
The new memory is [heavy hitters in slot order; fused slots], the code's order, which the
next compression's convolution reads again. The conv's out-channels are M_c, so trained
weights fix M_c: a budget M whose M_c differs is refused, naming both (`layer_budgets`).

What differs from the code, and kvjax's choices:
- Trigger: the code compresses when the cache is longer than M + 16 (its `buffer`), at the
  start of the next forward call; here after each prefill chunk whenever the candidates
  exceed M, so the cache holds exactly M slots per layer and KV head (plus the room for
  questions and generated tokens). Same scores, same candidates: the code's hh is the
  previous chunk's column sums over [memory; previous chunk], which is what this chunk's
  compaction reads.
- Chunks: kvjax's prefill chunks (`prefill_chunk_size`), aligned to the prompt's end (the
  code's to its start). Without it the context is one chunk, compressed once from its own
  attention: the convolution then reads far more tokens than in training (M + block_size
  - M_h), so give the training run's block size, e.g. prefill_chunk_size=128.
- Positions: a fused slot takes the position of its residual token (R_w's 1 in its row).
  Fused keys mix tokens rotated at different positions (the code keeps them as they are);
  the position only places the slot in the causal mask (every later query sees it), and
  residual tokens are distinct, so positions stay unique per head.
- GQA: hh is summed over each KV head's query group (the code's scores are per query head
  and only work for MHA models); DiffQKV value heads are concatenated with the key (the
  conv reads d + r d channels).
- Padding: rows of a left-padded batch whose real candidates fit M keep them all (a budget
  is a cap); otherwise the convolution reads R's real slots as one sequence (the empty
  ones, after it, are the zeros of its same padding) and they take no weight, so a row
  is compressed as the code compresses it alone.
- M_h rounds half up (the code takes M_c = int(M (1 - rate)), which float rounding moves for
  some rates, e.g. 100 x (1 - 0.9) = 9.99...).
- Decode: the code re-compresses whenever 17 tokens have been generated, from the last
  token's attention; here generated (and question) tokens are appended after the M slots
  of the context, so the cache grows by one slot per generated token, as kvjax's other
  prefill-only methods do.
The weights are a `Compressors` in memory or a training run's checkpoint
(`LoCoCo.from_checkpoint`, "lococo:checkpoint=RUN"), refused for another model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.kv_cache import LayerCache
from kvjax.config import ModelConfig
from kvjax.errors import MethodError
from kvjax.methods import attention_gate, base, locret, registry, trained

KIND = "lococo"
PARAM_NAMES = ("conv_weight", "conv_bias", "mix")
DEFAULT_HH_KEEP_RATE = 0.5
DEFAULT_KERNEL_SIZE = 21
DEFAULT_LOCAL = 0


# ----------------------------------------------------------------- sizes

def heavy_slots(budget: int, hh_keep_rate: float) -> int:
  """M_h: the heavy hitters a memory of `budget` slots keeps (round half up)."""
  return int(math.floor(budget * hh_keep_rate + 0.5))


def fused_slots(budget: int, hh_keep_rate: float) -> int:
  """M_c = M - M_h: the slots the remaining tokens are fused into."""
  return budget - heavy_slots(budget, hh_keep_rate)


def channels(config: ModelConfig) -> int:
  """Input channels of the convolution: a slot's key and value side by side."""
  return (1 + config.values_per_key_head) * config.head_dim


# ----------------------------------------------------------------- parameters

def init_compressors(config: ModelConfig, fused: int, kernel_size: int, key,
                     weight_std: float = 1.0, mix: float = 0.5) -> dict:
  """Fresh compressors of every layer: conv_weight [L, M_c, C, k] normal(0, weight_std)
  (the code: N(0, 1)), conv_bias [L, M_c] uniform(+-1/sqrt(C k)) (torch Conv1d's default,
  which the code keeps) and mix [L] (lambda, the code's `normalizer_init` 0.5)."""
  base.check_int("fused slots", fused, 1)
  check_kernel_size(kernel_size)
  base.check_number("weight_std", weight_std, 0)
  base.check_number("mix", mix)
  n, c = config.num_layers, channels(config)
  k_weight, k_bias = jax.random.split(key)
  bound = (c * kernel_size) ** -0.5
  return {"conv_weight": weight_std * jax.random.normal(k_weight, (n, fused, c, kernel_size),
                                                        jnp.float32),
          "conv_bias": jax.random.uniform(k_bias, (n, fused), jnp.float32, -bound, bound),
          "mix": jnp.full((n,), mix, jnp.float32)}


def check_kernel_size(kernel_size) -> None:
  base.check_int("kernel_size", kernel_size, 1)
  if kernel_size % 2 == 0:
    raise MethodError(f"kernel_size={kernel_size} must be odd (same padding keeps one output "
                      f"per slot only for odd kernels; the code uses 21)")


def check_compressors(params, config: ModelConfig) -> None:
  """Refuses compressor parameters whose shapes do not fit `config`."""
  if not isinstance(params, dict) or set(params) != set(PARAM_NAMES):
    keys = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise MethodError(f"lococo parameters must be {sorted(PARAM_NAMES)}; got {keys}")
  shapes = {name: tuple(np.shape(params[name])) for name in PARAM_NAMES}
  n, c = config.num_layers, channels(config)
  weight = shapes["conv_weight"]
  ok = len(weight) == 4 and weight[0] == n and weight[2] == c and weight[3] % 2 == 1
  if ok:
    ok = shapes["conv_bias"] == (n, weight[1]) and shapes["mix"] == (n,)
  if not ok:
    shown = ", ".join(f"{name} {shapes[name]}" for name in PARAM_NAMES)
    raise MethodError(f"lococo parameters of shapes {shown} do not fit this model "
                      f"({config.name or 'unnamed'}): it needs conv_weight ({n}, fused, {c}, "
                      f"odd kernel), conv_bias ({n}, fused) and mix ({n},) for {n} layers of "
                      f"KV heads with {c} key and value channels; trained for another model?")


def layer_compressor(params: dict, layer: int) -> dict:
  return {name: params[name][layer] for name in PARAM_NAMES}


class Compressors(locret.RetainingHeads):
  """Trained compressor weights held in memory, hashable by content (a LoCoCo carrying them
  stays a static jit argument). `meta`: the training run's metadata, or None."""

  def __eq__(self, other):
    return isinstance(other, Compressors) and other.digest == self.digest

  __hash__ = locret.RetainingHeads.__hash__   # defining __eq__ would drop it

  def __repr__(self):
    return f"Compressors({self.digest})"


# ----------------------------------------------------------------- the fusion (pure)

def conv1d_same(x, weight, bias):
  """Conv1d with same padding as torch computes it (cross-correlation): x [N, C, m],
  weight [O, C, k] (k odd), bias [O] -> [N, O, m]."""
  pad = (weight.shape[-1] - 1) // 2
  out = jax.lax.conv_general_dilated(x, weight, (1,), [(pad, pad)],
                                     dimension_numbers=("NCH", "OIH", "NCH"),
                                     precision=jax.lax.Precision.HIGHEST)
  return out + bias[None, :, None]


def fusion_weights(compressor: dict, keys, values, hh, real):
  """(W [B, K, M_c, m] float32, residual [B, K, M_c] int32) of the remaining slots
  keys [B, K, m, D], values [B, K, m, Dv], hh [B, K, m], real [B, K, m] bool.
  W = (1 - lambda) R_w + lambda softmax_m(ReLU(conv(concat(K, V)))); residual: each row's
  R_w slot, the top M_c of hh among the real slots, in slot order."""
  b, k, m, _ = keys.shape
  fused = compressor["conv_weight"].shape[0]
  x = jnp.concatenate([keys.astype(jnp.float32), values.astype(jnp.float32)], axis=-1)
  x = jnp.where(real[..., None], x, 0.0)                                    # [B, K, m, C]
  x = jnp.swapaxes(x.reshape(b * k, m, -1), 1, 2)                           # [BK, C, m]
  logits = jax.nn.relu(conv1d_same(x, compressor["conv_weight"].astype(jnp.float32),
                                   compressor["conv_bias"].astype(jnp.float32)))
  seen = jnp.broadcast_to(real.reshape(b * k, 1, m), logits.shape)
  learned = attention_gate.masked_softmax(logits, seen).reshape(b, k, fused, m)
  _, top = jax.lax.top_k(jnp.where(real, hh.astype(jnp.float32), -jnp.inf), fused)
  residual = jnp.sort(top, axis=-1).astype(jnp.int32)
  one_hot = jax.nn.one_hot(residual, m, dtype=jnp.float32)
  mix = compressor["mix"].astype(jnp.float32)
  return (1.0 - mix) * one_hot + mix * learned, residual


def last_slots(real, count: int):
  """[B, K, S] bool: the last `count` real slots of each head in slot order (the code's
  `local_len` slots at the end of the cache: the newest tokens)."""
  after = jnp.cumsum(real[..., ::-1], axis=-1)[..., ::-1]    # real slots from here to the end
  return real & (after <= count)


def _take(a, index):
  """a [B, K, S, ...] at slots index [B, K, n]."""
  return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 3)), axis=2)


def compress_memory(compressor: dict, keys, values, positions, hh, budget: int,
                    fused: int, local: int):
  """(keys [B, K, M, D], values [B, K, M, Dv], positions [B, K, M]) of the memory that
  candidates keys/values/positions [B, K, S] (S > M = budget, negative positions empty)
  with heavy-hitter scores hh [B, K, S] compress to: the M - fused heavy hitters (the
  last `local` real slots and the top others by hh) in slot order, then the `fused` slots
  (`fusion_weights` over the rest; each at its residual token's position). A row and head
  whose real candidates fit M keeps them all, in slot order, empty slots after them."""
  s = positions.shape[-1]
  heavy = budget - fused
  real = positions >= 0
  prio = jnp.where(real, jnp.where(last_slots(real, local), jnp.inf, hh.astype(jnp.float32)),
                   -jnp.inf)
  _, top = jax.lax.top_k(prio, heavy)
  chosen = jnp.put_along_axis(jnp.zeros(prio.shape, bool), top, True, axis=-1,
                              inplace=False)
  # The rest first (its real slots in slot order, then its empty ones), the heavy hitters
  # last: the convolution reads the real rest as one sequence, and the empty slots after
  # it are the zeros its same padding would add anyway.
  order = jnp.argsort(jnp.where(chosen, 2, jnp.where(real, 0, 1)), axis=-1, stable=True)
  kept, rest = order[..., s - heavy:], order[..., :s - heavy]
  rest_keys, rest_values = _take(keys, rest), _take(values, rest)
  weights, residual = fusion_weights(compressor, rest_keys, rest_values, _take(hh, rest),
                                     _take(real, rest))
  mixed = lambda w, v: jnp.einsum("bkcm,bkmd->bkcd", w, v.astype(jnp.float32),
                                  precision=jax.lax.Precision.HIGHEST).astype(v.dtype)
  memory = (jnp.concatenate([_take(keys, kept), mixed(weights, rest_keys)], axis=2),
            jnp.concatenate([_take(values, kept), mixed(weights, rest_values)], axis=2),
            jnp.concatenate([_take(positions, kept),
                             _take(_take(positions, rest), residual)], axis=2))
  # Rows that fit keep every real candidate (a budget is a cap, not a target).
  first = jnp.argsort(~real, axis=-1, stable=True)[..., :budget]
  whole = (_take(keys, first), _take(values, first), _take(positions, first))
  fits = real.sum(-1) <= budget                                              # [B, K]
  pick = lambda a, b: jnp.where(fits.reshape(fits.shape + (1,) * (a.ndim - 2)), a, b)
  return tuple(pick(a, b) for a, b in zip(whole, memory))


# ----------------------------------------------------------------- the method

@registry.register
@dataclasses.dataclass(frozen=True)
class LoCoCo(trained.TrainedWeights, base.Method):
  """LoCoCo (VITA-Group/LoCoCo): per layer a memory of `budget` slots; after each prefill
  chunk every KV head keeps round(budget x hh_keep_rate) heavy hitters (the chunk's
  accumulated attention) and fuses the other candidates into the remaining slots with
  weights from a trained convolution over their keys and values.

  hh_keep_rate, kernel_size, local: None takes the training run's values (else 0.5, the
  weights' kernel, 0). The trained convolution fixes the number of fused slots, so only
  budgets that give that number work (e.g. the training run's memory size).
  checkpoint: a run directory (or step folder) of `scripts/train.py --method=lococo`, or
  "trained" (kvjax's recipe for the model met, trained on first use: budget 64, prefill
  chunks of 128); compressors: the weights in memory (`Compressors`). Use
  `LoCoCo.from_checkpoint(path)` or method="lococo:checkpoint=PATH". See the module
  docstring for the reading.
  """
  name: ClassVar[str] = "lococo"
  family: ClassVar[str] = "merging"
  needs: ClassVar[frozenset] = frozenset({"column_sums"})
  KIND: ClassVar[str] = KIND
  WEIGHTS_FIELD: ClassVar[str] = "compressors"
  WEIGHTS_TYPE: ClassVar[type] = Compressors
  MISSING: ClassVar[str] = "trained compressors"
  # kvjax.training.pretrained's recipe: its weights serve its memory size only.
  TRAINS_ON_FIRST_USE: ClassVar[bool] = True
  check_shapes = staticmethod(check_compressors)
  reads_context: ClassVar[bool] = True   # its weights, as traced parameters
  wrappable: ClassVar[bool] = False      # its own split of the budget and fused slots
  hh_keep_rate: Any = None
  kernel_size: Any = None
  local: Any = None
  checkpoint: str = ""
  compressors: Any = None

  def __post_init__(self):
    if self.hh_keep_rate is not None:
      base.check_number("hh_keep_rate", self.hh_keep_rate, 0, 1, high_open=True,
                        what="the share of the memory kept as heavy hitters (None: the "
                             "trained one)")
    if self.kernel_size is not None:
      check_kernel_size(self.kernel_size)
    if self.local is not None:
      base.check_int("local", self.local, 0)
    self.check_weights_source()

  def _trained(self, name: str, default):
    hyper = (self.metadata() or {}).get("hyperparameters") or {}
    return hyper.get(name, default)

  def keep_rate(self) -> float:
    """hh_keep_rate in use: the field, else the training run's, else 0.5."""
    if self.hh_keep_rate is not None:
      return float(self.hh_keep_rate)
    return float(self._trained("hh_keep_rate", DEFAULT_HH_KEEP_RATE))

  def local_tokens(self) -> int:
    """The most recent candidates always kept: the field, else the training run's, else 0."""
    return int(self.local if self.local is not None else self._trained("local", DEFAULT_LOCAL))

  def protected_tokens(self, keep):
    del keep
    return self.local_tokens()

  def trained_fused(self) -> int:
    """M_c: the fused slots the weights produce (the convolution's out-channels)."""
    return int(np.shape(self.weights()["conv_weight"])[1])

  def check_budget(self, keep: int, context_length: int) -> None:
    """Refuses a budget the weights cannot fill (its M_c differs from the trained one) or
    whose heavy hitters cannot hold the local tokens. A context that fits is fine."""
    rate, fused = self.keep_rate(), self.trained_fused()
    if keep >= context_length:
      return
    if fused_slots(keep, rate) != fused:
      largest = int(fused / (1.0 - rate)) + 2
      fits = [m for m in range(fused, largest + 1) if fused_slots(m, rate) == fused]
      trained_budget = self._trained("memory_size", None)
      hint = (f"budget={trained_budget}" if trained_budget in fits else
              f"budget in {fits}" if fits else "another hh_keep_rate")
      raise MethodError(
          f"lococo weights{self.where()} fuse into {fused} slots (their convolution's "
          f"out-channels), but budget={keep} at hh_keep_rate={rate} gives "
          f"{fused_slots(keep, rate)} fused slots (budget - round(budget x rate)); use "
          f"{hint} (a compression_ratio sets the budget from the context length, so give "
          f"a budget)")
    if self.local_tokens() > heavy_slots(keep, rate):
      raise MethodError(f"lococo local={self.local_tokens()} exceeds the "
                        f"{heavy_slots(keep, rate)} heavy-hitter slots of budget={keep} at "
                        f"hh_keep_rate={rate}; lower local")

  def layer_budgets(self, config, keep, context_length):
    self.check_model(config)
    weight = np.shape(self.weights()["conv_weight"])
    if self.kernel_size is not None and weight[3] != self.kernel_size:
      raise MethodError(f"lococo kernel_size={self.kernel_size}, but the weights"
                        f"{self.where()} were trained with kernel_size={weight[3]}")
    self.check_budget(keep, context_length)
    return (keep,) * config.num_layers

  def context_params(self, tokenizer, tokens, mask):
    del tokenizer, tokens, mask
    return {"compressors": self.weights()}

  def _compressors(self, x: base.LayerInputs) -> dict:
    if not isinstance(x.params, dict) or "compressors" not in x.params:
      raise MethodError("lococo reads its weights from its parameters "
                        "(LoCoCo.context_params): prefill through kvjax.generate, "
                        "kvjax.score or context.prefill without method_params")
    check_compressors(x.params["compressors"], x.config)
    return x.params["compressors"]

  def heavy_hitter_scores(self, x: base.LayerInputs):
    """[B, K, S] hh: the chunk's attention on each candidate, summed over its queries and
    each KV head's query group."""
    return base.reduce_groups(x.column_sums, x.keys.shape[1], "sum")

  def compact(self, cand, x, keep):
    """The memory of `keep` slots per KV head: heavy hitters, then fused slots."""
    cand = cand.replace(state=None)
    if keep >= cand.capacity:  # everything fits: keep it all, with empty slots up to keep
      return cand.grow(keep - cand.capacity).replace(end=jnp.int32(keep))
    params = self._compressors(x)
    fused = params["conv_weight"].shape[1]
    if fused_slots(keep, self.keep_rate()) != fused:
      # `check_budget` let this budget through: every row's context fits it.
      return cand.replace(state=None).live_first(keep)
    keys, values, positions = compress_memory(
        layer_compressor(params, x.layer), cand.keys, cand.values, cand.positions,
        self.heavy_hitter_scores(x), keep, fused, self.local_tokens())
    return LayerCache(keys=keys, values=values, positions=positions, end=jnp.int32(keep))

  def cache_stats(self, cache) -> dict:
    """Each layer's trained lambda (the learned weights' share of the fusion)."""
    del cache
    return {"mix_per_layer": [float(v) for v in np.asarray(self.weights()["mix"])]}
