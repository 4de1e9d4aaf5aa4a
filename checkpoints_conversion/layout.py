"""kvjax's canonical parameter layout, and conversion from Hugging Face's tensor layout.

kvjax kernels are input-major (`x @ kernel`) with heads split out; Hugging Face stores
`nn.Linear` weights output-major as [out, in]. GGUF tensors, read in their logical
(reversed `ne`) shape, have Hugging Face's layout too, so both readers end here.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator, NamedTuple

import ml_dtypes
import numpy as np

from kvjax.config import ModelConfig
from kvjax.errors import CheckpointError

# Buffers some exporters save that carry no weights (recomputed from the config).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_MAX_LISTED = 5


class Rule(NamedTuple):
  """How one Hugging Face tensor becomes one kvjax tensor."""
  canonical: str
  hf_shape: tuple[int, ...]
  transpose: bool  # [out, in] -> [in, out] before splitting heads


def numpy_dtype(name: str) -> np.dtype:
  """The numpy dtype for a ModelConfig.dtype string."""
  dtypes = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
  if name not in dtypes:
    raise CheckpointError(f"dtype={name!r} is not supported; allowed: {sorted(dtypes)}")
  return dtypes[name]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Canonical parameter name -> shape, for every parameter the model needs."""
  d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  f, v = config.intermediate_size, config.vocab_size
  shapes = {"embed.embedding": (v, d)}
  for i in range(config.num_layers):
    p = f"layers.{i}."
    shapes[p + "attn_norm.scale"] = (d,)
    shapes[p + "attn.q.kernel"] = (d, h, dh)
    shapes[p + "attn.k.kernel"] = (d, k, dh)
    shapes[p + "attn.v.kernel"] = (d, k, dh)
    if config.qkv_bias:
      shapes[p + "attn.q.bias"] = (h, dh)
      shapes[p + "attn.k.bias"] = (k, dh)
      shapes[p + "attn.v.bias"] = (k, dh)
    shapes[p + "attn.o.kernel"] = (h, dh, d)
    shapes[p + "mlp_norm.scale"] = (d,)
    shapes[p + "mlp.gate.kernel"] = (d, f)
    shapes[p + "mlp.up.kernel"] = (d, f)
    shapes[p + "mlp.down.kernel"] = (f, d)
  shapes["final_norm.scale"] = (d,)
  if not config.tie_embeddings:
    shapes["lm_head.kernel"] = (d, v)
  return shapes


def hf_rules(config: ModelConfig) -> dict[str, Rule]:
  """Hugging Face tensor name -> how it maps onto the canonical layout."""
  d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  f, v = config.intermediate_size, config.vocab_size
  rules = {"model.embed_tokens.weight": Rule("embed.embedding", (v, d), False)}
  for i in range(config.num_layers):
    hf, p = f"model.layers.{i}.", f"layers.{i}."
    rules[hf + "input_layernorm.weight"] = Rule(p + "attn_norm.scale", (d,), False)
    for proj, heads in (("q", h), ("k", k), ("v", k)):
      rules[hf + f"self_attn.{proj}_proj.weight"] = Rule(
          p + f"attn.{proj}.kernel", (heads * dh, d), True)
      if config.qkv_bias:
        rules[hf + f"self_attn.{proj}_proj.bias"] = Rule(p + f"attn.{proj}.bias", (heads * dh,),
                                                         False)
    rules[hf + "self_attn.o_proj.weight"] = Rule(p + "attn.o.kernel", (d, h * dh), True)
    rules[hf + "post_attention_layernorm.weight"] = Rule(p + "mlp_norm.scale", (d,), False)
    rules[hf + "mlp.gate_proj.weight"] = Rule(p + "mlp.gate.kernel", (f, d), True)
    rules[hf + "mlp.up_proj.weight"] = Rule(p + "mlp.up.kernel", (f, d), True)
    rules[hf + "mlp.down_proj.weight"] = Rule(p + "mlp.down.kernel", (d, f), True)
  rules["model.norm.weight"] = Rule("final_norm.scale", (d,), False)
  if not config.tie_embeddings:
    rules["lm_head.weight"] = Rule("lm_head.kernel", (v, d), True)
  return rules


def _listed(names: list[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  more = len(names) - _MAX_LISTED
  return shown + (f" (and {more} more)" if more > 0 else "")


def _check_names(available: set[str], rules: dict[str, Rule], config: ModelConfig,
                 source: str, shown: Callable[[str], str]) -> None:
  missing = [shown(n) for n in sorted(set(rules) - available)]
  if missing:
    raise CheckpointError(f"{source}: missing tensor {missing[0]} ({len(missing)} missing in "
                          f"all: {_listed(missing)}) for a {config.architecture} model with "
                          f"{config.num_layers} layers")
  tied_head = {"lm_head.weight"} if config.tie_embeddings else set()
  extra = sorted(n for n in available - set(rules) - tied_head if not _IGNORED.search(n))
  if extra:
    raise CheckpointError(f"{source}: {len(extra)} unexpected tensors the config does not "
                          f"describe: {_listed([shown(n) for n in extra])}")


def _convert(array: np.ndarray, rule: Rule, canonical_shape: tuple[int, ...],
             dtype: np.dtype) -> np.ndarray:
  # Transposing first and then reshaping splits the output axis into (heads, head_dim)
  # exactly as Hugging Face's `.view(..., heads, head_dim)` does.
  array = array.T if rule.transpose else array
  return np.ascontiguousarray(array.reshape(canonical_shape)).astype(dtype, copy=False)


def canonical_specs(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Canonical name -> (shape, dtype), in the order `iter_canonical_params` yields them."""
  shapes, dtype = expected_shapes(config), numpy_dtype(config.dtype)
  return {rule.canonical: (shapes[rule.canonical], dtype) for rule in hf_rules(config).values()}


def iter_canonical_params(get: Callable[[str], np.ndarray], names: Iterable[str],
                          config: ModelConfig, *, source: str,
                          shown: Callable[[str], str] = str
                          ) -> Iterator[tuple[str, np.ndarray]]:
  """Validates Hugging Face-layout tensors and yields kvjax's canonical ones, one at a time.

  `get(name)` returns one tensor, read lazily, so a consumer that writes each tensor away
  before asking for the next holds one tensor in memory, never the model. `names` are all
  tensors the source holds; `shown` renames a Hugging Face name into the source's own
  naming for error messages. Names are checked before the first tensor is read.
  """
  available = set(names)
  rules = hf_rules(config)
  _check_names(available, rules, config, source, shown)
  if config.tie_embeddings and "lm_head.weight" in available:
    _check_tied_head(get("lm_head.weight"), get("model.embed_tokens.weight"), source, shown)
  shapes = expected_shapes(config)
  dtype = numpy_dtype(config.dtype)
  for name, rule in rules.items():
    array = get(name)
    if not np.issubdtype(array.dtype, np.floating) and array.dtype != ml_dtypes.bfloat16:
      raise CheckpointError(f"{source}: tensor {shown(name)} has dtype {array.dtype}; "
                            f"expected a floating-point dtype (quantized HF checkpoints "
                            f"are not supported)")
    if tuple(array.shape) != rule.hf_shape:
      raise CheckpointError(f"{source}: tensor {shown(name)} has shape {tuple(array.shape)}; "
                            f"expected {rule.hf_shape} from the config")
    converted = _convert(array, rule, shapes[rule.canonical], dtype)
    del array  # Release the source tensor before the consumer sees the converted one,
    yield rule.canonical, converted
    del converted  # and the converted one before the next tensor is read.


def canonical_params(get: Callable[[str], np.ndarray], names: Iterable[str],
                     config: ModelConfig, *, source: str,
                     shown: Callable[[str], str] = str) -> dict[str, np.ndarray]:
  """Every canonical tensor at once (see `iter_canonical_params`)."""
  return dict(iter_canonical_params(get, names, config, source=source, shown=shown))


def _check_tied_head(head: np.ndarray, embedding: np.ndarray, source: str,
                     shown: Callable[[str], str]) -> None:
  # Tied checkpoints sometimes still store the shared matrix twice; a different one
  # means the config's tie_word_embeddings is wrong for these weights.
  if head.shape != embedding.shape or not np.array_equal(head, embedding):
    raise CheckpointError(f"{source}: the config ties embeddings, but tensor "
                          f"{shown('lm_head.weight')} differs from "
                          f"{shown('model.embed_tokens.weight')}; set tie_word_embeddings=false "
                          f"in the config if the model has its own output head")
