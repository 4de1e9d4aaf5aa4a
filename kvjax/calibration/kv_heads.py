"""Fewer KV heads by PCA of calibration caches (Yu et al., 2024, "Effectively Compress KV
Heads for LLM", arXiv 2406.07056): an offline conversion into an ordinary GQA model whose
cache is `group` times smaller for every later call.

Per layer, each group of `group` adjacent KV heads becomes one head:
  values: V_grp = [V_1 ... V_g] (N x g*d, over the calibration tokens) is projected on its
    top-d right singular vectors U (g*d x d, "SVD-a": of the cache, not the weights):
    W_v' = sum_i W_v,i U_i (and the bias), and V_i ~ V' U_i^T is folded into the output
    projection of every query head reading head i: W_o,h' = U_i^T W_o,h. Exact algebra; the
    only loss is the PCA's.
  keys (RoPE): a d x d mixing matrix does not commute with the rotation, so U is restricted
    to mix the same RoPE frequency pair across the group's heads: each pair (f, f + d/2)
    is a complex number z_i = k_i[f] + 1j k_i[f + d/2] that RoPE multiplies by e^(j theta m)
    alike for every head; per pair the group's complex cache [N, g] is projected on its top
    complex singular vector c (g): z' = c^H z, and z_i ~ c_i z'. A complex scale commutes
    with the rotation, so it folds before RoPE: W_k' = sum_i conj(c_i) W_k,i per pair, and
    every query head reading head i is scaled by conj(c_i): q.k_i ~ Re(q conj(c_i z')) =
    Re((q conj(c_i)) conj(z')) (strategy (b) of methods_B.md §9, the "same frequency pair"
    restriction). The paper's LoRA fine-tuning after conversion is not done here.
The softmax scale (1/sqrt(d)) is unchanged: the head dim is.

Sigma's DiffQKV (Lin et al., 2025, arXiv 2501.13629), adapted to pretrained models: Sigma
pre-trains with fewer key heads than value heads, its ablations finding keys much less
sensitive to compression than values. Here `values=False` merges the key heads as above
and keeps every value head: the cache stores K/g keys and K values per token (query head i
reads key head i*(K/g)/H and value head i*K/H, Sigma's group sharing). Not adapted: no
training, no augmented Q, no smaller key head dim, no selective value fetching at decode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache.cross_layer import undo_rope
from kvjax.cache.kv_cache import init_cache
from kvjax.errors import ConfigError
from kvjax.model import from_flat_params, to_flat_params, transformer
from kvjax.ops import rope
from kvjax.ops.host import host_array


@dataclasses.dataclass(frozen=True)
class GramProbe:
  """A cache policy that stores nothing and returns, per layer, the Gram matrices of the
  calibration chunk's values ([K/g, g*d, g*d]) and pre-RoPE keys per frequency pair
  ([K/g, d/2, g, g] complex, as real and imaginary parts), over its real tokens."""
  group: int

  def prepare(self, layer, layer_cache, new):
    del layer
    return layer_cache, new, frozenset()

  def update(self, layer, layer_cache, step, stats):
    del layer, layer_cache, stats
    cfg = step.config
    new = step.new
    valid = (new.positions >= 0)[:, None, :, None]                         # [B, 1, T, 1]
    inv_freq = rope.inverse_frequencies(cfg)
    positions = new.head_positions()
    keys = jnp.where(valid, undo_rope(new.keys, positions, inv_freq), 0).astype(jnp.float32)
    values = jnp.where(valid, new.values, 0).astype(jnp.float32)
    b, k, t, d = keys.shape
    g = self.group
    grouped = lambda x: x.reshape(b, k // g, g, t, x.shape[-1])            # [B, K/g, g, T, .]
    v = grouped(values).transpose(0, 1, 3, 2, 4).reshape(b, k // g, t, g * d)
    value_gram = jnp.einsum("bntc,bnte->nce", v, v, precision=jax.lax.Precision.HIGHEST)
    kg = grouped(keys)
    z = kg[..., :d // 2] + 1j * kg[..., d // 2:]                           # [B, K/g, g, T, d/2]
    key_gram = jnp.einsum("bnitf,bnjtf->nfij", z, jnp.conj(z))
    return value_gram, jnp.real(key_gram), jnp.imag(key_gram)

  def finish(self, layers, lengths):
    del lengths
    return tuple(layers)


@functools.partial(jax.jit, static_argnames=("graphdef", "probe"))
def _grams(graphdef, params, tokens, mask, cache, probe: GramProbe):
  return transformer.forward(graphdef, params, tokens, mask, cache, "last", probe)[1]


def check_group(config, group: int) -> None:
  k = config.num_kv_heads
  if not isinstance(group, int) or isinstance(group, bool) or group < 1 or k % group:
    raise ConfigError(f"group={group!r} must divide num_kv_heads={k} (merging {group} KV "
                      f"heads into one)")
  if config.values_per_key_head > 1:
    raise ConfigError(f"the model already has num_value_heads={config.num_value_heads} over "
                      f"num_kv_heads={k} key heads; merge heads of a model with one value "
                      f"head per key head")


def calibration_grams(model, token_batches, group: int) -> list[tuple[np.ndarray, ...]]:
  """Per layer (value Gram [K/g, g*d, g*d], key Gram [K/g, d/2, g, g] complex), float64,
  summed over `token_batches` (an iterable of (tokens [B, T] int32, mask [B, T]))."""
  check_group(model.config, group)
  total = None
  for tokens, mask in token_batches:
    out = _grams(model.graphdef, model.params, jnp.asarray(tokens), jnp.asarray(mask),
                 init_cache(model.config, tokens.shape[0], 0), GramProbe(group))
    out = [(host_array(v).astype(np.float64),
            host_array(re).astype(np.float64) + 1j * host_array(im))
           for v, re, im in out]
    total = out if total is None else [(a[0] + b[0], a[1] + b[1]) for a, b in zip(total, out)]
  return total


def _top_vectors(gram: np.ndarray, count: int) -> np.ndarray:
  """The `count` leading eigenvectors (columns) of a Hermitian Gram matrix."""
  eigenvalues, vectors = np.linalg.eigh(gram)
  return vectors[:, np.argsort(-eigenvalues)[:count]]


def merge_kv_heads(model, grams, group: int, values: bool = True):
  """The model with every `group` adjacent KV heads merged into one (see the module
  docstring), from `calibration_grams`' statistics. values=False merges the key heads
  only (Sigma's DiffQKV adapted): the model keeps every value head, `group` per key head."""
  cfg = model.config
  check_group(cfg, group)
  k, h, d = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
  half = d // 2
  per_kv = h // k
  flat = {name: np.asarray(value, np.float64) for name, value in to_flat_params(model).items()}
  for layer, (value_gram, key_gram) in enumerate(grams):
    p = f"layers.{layer}.attn."
    wq, wk, wv, wo = (flat[p + n + ".kernel"] for n in "qkvo")   # [D, H, d] ... [H, d, D]
    bq, bk, bv = (flat.get(p + n + ".bias") for n in "qkv")
    new_wk = np.zeros(wk.shape[:1] + (k // group, d))
    new_wv = np.zeros(new_wk.shape)
    new_bk = None if bk is None else np.zeros((k // group, d))
    new_bv = None if bv is None else np.zeros((k // group, d))
    wq, wo = wq.copy(), wo.copy()
    bq = None if bq is None else bq.copy()
    for j in range(k // group):
      heads = range(j * group, (j + 1) * group)
      if values:
        u = _top_vectors(value_gram[j], d)                                 # [g*d, d]
        blocks = [u[i * d:(i + 1) * d] for i in range(group)]              # U_i: [d, d]
        new_wv[:, j] = sum(wv[:, kv] @ blocks[i] for i, kv in enumerate(heads))
        if bv is not None:
          new_bv[j] = sum(bv[kv] @ blocks[i] for i, kv in enumerate(heads))
      coefficients = np.stack([_top_vectors(key_gram[j, f], 1)[:, 0] for f in range(half)])
      # coefficients [d/2, g]: c for every frequency pair.
      for i, kv in enumerate(heads):
        a, b = coefficients[:, i].real, coefficients[:, i].imag
        new_wk[:, j, :half] += a * wk[:, kv, :half] + b * wk[:, kv, half:]
        new_wk[:, j, half:] += a * wk[:, kv, half:] - b * wk[:, kv, :half]
        if bk is not None:
          new_bk[j, :half] += a * bk[kv, :half] + b * bk[kv, half:]
          new_bk[j, half:] += a * bk[kv, half:] - b * bk[kv, :half]
        for q_head in range(kv * per_kv, (kv + 1) * per_kv):
          if values:
            wo[q_head] = blocks[i].T @ wo[q_head]
          q1, q2 = wq[:, q_head, :half].copy(), wq[:, q_head, half:].copy()
          wq[:, q_head, :half] = a * q1 + b * q2          # q conj(c_i)
          wq[:, q_head, half:] = a * q2 - b * q1
          if bq is not None:
            b1, b2 = bq[q_head, :half].copy(), bq[q_head, half:].copy()
            bq[q_head, :half] = a * b1 + b * b2
            bq[q_head, half:] = a * b2 - b * b1
    flat.update({p + "q.kernel": wq, p + "k.kernel": new_wk, p + "o.kernel": wo})
    merged_biases = [("q.bias", bq), ("k.bias", new_bk)]
    if values:
      flat[p + "v.kernel"] = new_wv
      merged_biases.append(("v.bias", new_bv))
    for name, value in merged_biases:
      if value is not None:
        flat[p + name] = value
  suffix = f"-kv{k // group}" if values else f"-k{k // group}v{k}"
  new_cfg = cfg.replace(num_kv_heads=k // group, name=f"{cfg.name}{suffix}" if cfg.name else "",
                        num_value_heads=None if values or group == 1 else k)
  dtype = np.dtype(jnp.dtype(cfg.dtype))
  return from_flat_params(new_cfg, {n: jnp.asarray(v, dtype) for n, v in flat.items()},
                          tokenizer=model.tokenizer, source="merge_kv_heads")


def compress_kv_heads(model, token_batches, group: int, values: bool = True):
  """`merge_kv_heads` with Gram matrices measured on `token_batches`."""
  return merge_kv_heads(model, calibration_grams(model, token_batches, group), group, values)
