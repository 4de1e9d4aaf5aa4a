"""Training LoCoCo's compressors: the frozen model reads in chunks through a fused memory.

Reading: the official code (VITA-Group/LoCoCo), `train.py` (the loop over `clean_period`
chunks of `block_size` tokens, one backward per chunk, the cache carried between chunks)
and `llama/modeling_llama.py` (each layer compresses its cache before the chunk's tokens
join it). Each example is read in chunks of `block_size` tokens by the frozen backbone;
at every layer the memory carried from the previous chunk (the last memory, then the
previous chunk's keys and values, with that chunk's heavy-hitter scores) is compressed to
`memory_size` slots by `kvjax.methods.lococo.compress_memory` once it holds more, before
the chunk attends over [memory; chunk]. So chunk c's next-token cross entropy reaches the
convolution and lambda of every layer through the keys and values of its memory. What is
carried to the next chunk (the compressed memory, the chunk's keys and values, their
column sums) sits behind stop_gradient: truncated backpropagation, as the code detaches
the cache. The loss is the mean over chunks of each chunk's mean next-token cross entropy
within the chunk (the code's per-chunk `outputs.loss`; the first chunk has no memory and
no gradient, it only sets the loss's level). The policy protocol carries this without a
model flag: the training "cache" is one `TrainingMemory` per layer.

Differences from the code: only the compressors train (the code also unfreezes the
embeddings and norms, at 5x the learning rate, and offers LoRA for context extension:
neither here, so the backbone stays the model the weights are checked against); no RoPE
scaling (sequences stay within the model's context); one learning rate (the code scales
the memory's by `memory_lr_scale`); the conv weights start N(0, 1) as in the code
(`weight_std`), lambda at 0.5.
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
from kvjax.methods import lococo as lococo_method
from kvjax.methods import trained
from kvjax.model import transformer
from kvjax.sharding import placement_of
from kvjax.training import data as data_lib
from kvjax.training import evaluation
from kvjax.training.loop import Task
from pallas_kernels import reference


@dataclasses.dataclass(frozen=True)
class LoCoCoSettings:
  memory_size: int = 64          # M: slots per layer and KV head (the code's mem_size)
  block_size: int = 128          # tokens per chunk (the code: 512)
  hh_keep_rate: float = 0.5      # share of M kept as heavy hitters
  kernel_size: int = 21          # the convolution's width (odd)
  local: int = 0                 # most recent tokens always kept (the code's local_len)
  weight_std: float = 1.0        # conv weights' initial std (the code: N(0, 1))
  mix_init: float = 0.5          # lambda's initial value (the code's normalizer_init)

  def __post_init__(self):
    validation.integer("memory_size", self.memory_size, 2, error=KvjaxError,
                       what="slots per layer and KV head")
    validation.integer("block_size", self.block_size, 1, error=KvjaxError,
                       what="tokens per chunk")
    validation.number("hh_keep_rate", self.hh_keep_rate, 0, 1, high_open=True,
                      error=KvjaxError, what="the share of the memory kept as heavy hitters")
    validation.integer("kernel_size", self.kernel_size, 1, error=KvjaxError)
    if self.kernel_size % 2 == 0:
      raise KvjaxError(f"kernel_size={self.kernel_size} must be odd (same padding)")
    validation.integer("local", self.local, 0, error=KvjaxError)
    validation.number("weight_std", self.weight_std, 0, low_open=True, error=KvjaxError)
    validation.number("mix_init", self.mix_init, error=KvjaxError)
    if self.fused < 1:
      raise KvjaxError(f"memory_size={self.memory_size} at hh_keep_rate={self.hh_keep_rate} "
                       f"leaves no slot to fuse into; lower hh_keep_rate or raise memory_size")
    if self.local > self.heavy:
      raise KvjaxError(f"local={self.local} exceeds the {self.heavy} heavy-hitter slots of "
                       f"memory_size={self.memory_size} at hh_keep_rate={self.hh_keep_rate}")

  @property
  def heavy(self) -> int:
    return lococo_method.heavy_slots(self.memory_size, self.hh_keep_rate)

  @property
  def fused(self) -> int:
    return lococo_method.fused_slots(self.memory_size, self.hh_keep_rate)


# ----------------------------------------------------------------- the chunked forward pass

def memory_attention(queries, keys, values, query_positions, key_positions):
  """(out [B, T, H, D], hh [B, K, S]) causal attention over keys/values [B, K, S, D] by
  positions, and each slot's probability summed over the queries and each KV head's
  query group (the heavy-hitter scores)."""
  k = keys.shape[1]
  seen = reference.visible(query_positions[:, None, None, :], key_positions[:, :, None, :])
  out, _, probs = reference.grouped_attention(reference.group_heads(queries, k), keys, values,
                                              seen)
  return reference.ungroup_heads(out).astype(queries.dtype), probs.sum(axis=(2, 3))


@struct.dataclass
class TrainingMemory:
  """A layer's memory during training: what the previous chunk left (keys, values
  [B, K, S, D], positions [B, K, S], their hh scores) and the layer's compressor. Its
  `attend` compresses the memory (differentiably) once it holds more than `memory_size`
  slots, then attends the chunk over [memory; chunk]."""
  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  hh: jax.Array
  compressor: dict
  memory_size: int = struct.field(pytree_node=False)
  fused: int = struct.field(pytree_node=False)
  local: int = struct.field(pytree_node=False)

  def attend(self, queries, query_positions, pending, want):
    del want
    keys, values, positions = self.keys, self.values, self.positions
    if positions.shape[-1] > self.memory_size:
      keys, values, positions = lococo_method.compress_memory(
          self.compressor, keys, values, positions, self.hh, self.memory_size, self.fused,
          self.local)
    keys = jnp.concatenate([keys, pending.keys.astype(keys.dtype)], axis=2)
    values = jnp.concatenate([values, pending.values.astype(values.dtype)], axis=2)
    positions = jnp.concatenate([positions, pending.head_positions()], axis=2)
    out, hh = memory_attention(queries, keys, values, query_positions, positions)
    return out, (keys, values, positions, hh)


@dataclasses.dataclass(frozen=True)
class CarryMemory:
  """The cache policy of training: each layer's chunk joins its memory, which is carried
  to the next chunk behind stop_gradient (truncated backpropagation)."""

  def prepare(self, layer, layer_cache, new):
    del layer
    return layer_cache, new, frozenset()

  def update(self, layer, layer_cache, step, stats):
    del layer, step
    keys, values, positions, hh = jax.lax.stop_gradient(stats)
    return layer_cache.replace(keys=keys, values=values, positions=positions, hh=hh)

  def finish(self, layers, lengths):
    return Cache(layers=tuple(layers), lengths=lengths)


CARRY = CarryMemory()


def empty_memory(config: ModelConfig, compressors: dict, batch: int,
                 settings: "LoCoCoSettings", dtype) -> Cache:
  """Every layer's memory before the first chunk: no slots."""
  k, d = config.num_kv_heads, config.head_dim
  layer = lambda index: TrainingMemory(
      keys=jnp.zeros((batch, k, 0, d), dtype),
      values=jnp.zeros((batch, k, 0, config.values_per_key_head * d), dtype),
      positions=jnp.zeros((batch, k, 0), jnp.int32), hh=jnp.zeros((batch, k, 0), jnp.float32),
      compressor=lococo_method.layer_compressor(compressors, index),
      memory_size=settings.memory_size, fused=settings.fused, local=settings.local)
  return Cache(layers=tuple(layer(i) for i in range(config.num_layers)),
               lengths=jnp.zeros((batch,), jnp.int32))


def chunked_logits(graphdef, config: ModelConfig, backbone, compressors, tokens, mask,
                   settings: "LoCoCoSettings") -> list:
  """[B, t, V] logits of each chunk of the token rows [B, T], read through the memory."""
  cache = empty_memory(config, compressors, tokens.shape[0], settings, jnp.dtype(config.dtype))
  out = []
  for start in range(0, tokens.shape[1], settings.block_size):
    piece = slice(start, start + settings.block_size)
    logits, cache = transformer.forward(graphdef, backbone, tokens[:, piece], mask[:, piece],
                                        cache, "all", CARRY)
    out.append(logits)
  return out


# ----------------------------------------------------------------- the loss

def chunk_nll(logits, tokens, mask):
  """(summed next-token NLL, count) within one chunk: token i predicts i + 1."""
  valid = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return (nll * valid).sum(), valid.sum()


def lococo_loss(chunk_logits: list, tokens, mask, block_size: int):
  """(loss, metrics): the mean over chunks (with a prediction) of each chunk's mean
  next-token cross entropy; metrics split the first chunk (no memory) from the others."""
  means, has = [], []
  for i, logits in enumerate(chunk_logits):
    piece = slice(i * block_size, (i + 1) * block_size)
    total, count = chunk_nll(logits, tokens[:, piece], mask[:, piece])
    means.append(total / jnp.maximum(count, 1.0))
    has.append((count > 0).astype(jnp.float32))
  means, has = jnp.stack(means), jnp.stack(has)
  loss = (means * has).sum() / jnp.maximum(has.sum(), 1.0)
  later = (means[1:] * has[1:]).sum() / jnp.maximum(has[1:].sum(), 1.0)
  return loss, {"first_chunk_loss": means[0], "memory_chunks_loss": later}


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "settings"))
def full_loss(compressors, backbone, batch, graphdef, config: ModelConfig,
              settings: LoCoCoSettings):
  """The training loss of a token batch; no gradient flows into `backbone`."""
  logits = chunked_logits(graphdef, config, jax.lax.stop_gradient(backbone), compressors,
                          batch["tokens"], batch["mask"], settings)
  loss, metrics = lococo_loss(logits, batch["tokens"], batch["mask"], settings.block_size)
  return loss, {**metrics, "mix": compressors["mix"].mean()}


def task(model, settings: LoCoCoSettings = LoCoCoSettings(),
         data_settings: data_lib.DataSettings = data_lib.DataSettings(),
         eval_settings: evaluation.EvalSettings | None = None) -> Task:
  """The LoCoCo training task of `model` (its weights frozen): language modelling through
  the compressed memory on the data's token rows (every real token is a target). With
  `eval_settings`, it evaluates LoCoCo with the current weights on held-out essays at its
  memory size, reading them in chunks of its block size (the ratio is not used)."""
  config = model.config
  if data_settings.sequence_length <= settings.block_size:
    raise KvjaxError(f"sequence_length={data_settings.sequence_length} fits one chunk of "
                     f"block_size={settings.block_size}: nothing would read a memory; use "
                     f"several chunks (e.g. sequence_length = 4 x block_size)")

  def batch(position, count):
    return data_lib.batch(data_settings, position, count, model.tokenizer,
                          config.vocab_size)

  def loss(compressors, backbone, micro_batch, key):
    del key
    return full_loss(compressors, backbone, micro_batch, model.graphdef, config, settings)

  def init_params(key):
    return lococo_method.init_compressors(config, settings.fused, settings.kernel_size, key,
                                          settings.weight_std, settings.mix_init)

  identity = trained.model_identity(config)
  meta = {"kind": lococo_method.KIND,
          "hyperparameters": {"memory_size": settings.memory_size,
                              "hh_keep_rate": settings.hh_keep_rate,
                              "kernel_size": settings.kernel_size, "local": settings.local,
                              "block_size": settings.block_size},
          "loss": dataclasses.asdict(settings), "data": dataclasses.asdict(data_settings),
          "model": identity, "model_hash": trained.identity_hash(identity),
          "weights_fingerprint": calibration.model_fingerprint(model)}
  evaluate = None if eval_settings is None else evaluation.method_evaluator(
      model, lambda weights: lococo_method.LoCoCo(
          compressors=lococo_method.Compressors(weights, meta)),
      eval_settings, budget=settings.memory_size, prefill_chunk_size=settings.block_size)
  return Task(init_params=init_params, loss=loss, frozen=model.params, batch=batch, meta=meta,
              evaluate=evaluate, placement=placement_of(model))
