"""Models with fewer key heads than value heads (Sigma's DiffQKV): group sharing against an
ordinary GQA model whose value-head pairs share one key head, the kernels' fallback, real
cache bytes, and which methods run on such a model (the others refuse clearly)."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache.kv_cache import full_cache_nbytes
from kvjax.config import ModelConfig
from kvjax.errors import ConfigError, MethodError
from kvjax.methods import base, registry
from kvjax.model import from_flat_params, to_flat_params
from tiny import jnp_and_kernel_tokens, random_prompts, tiny_chat_model, tiny_config

PROMPTS = random_prompts((30, 50, 27), seed=1)


@pytest.fixture(scope="module")
def pair(smollm2_tokenizer):
  """(GQA model with 4 KV heads where heads 2j and 2j+1 have the same key projection, the
  DiffQKV model storing those 2 key heads once beside the 4 value heads). A real tokenizer:
  KVzip writes its repeat prompt with it."""
  gqa = tiny_chat_model(smollm2_tokenizer, num_heads=8, num_kv_heads=4, qkv_bias=True)
  flat = {k: np.array(v) for k, v in to_flat_params(gqa).items()}
  shared, diff = dict(flat), dict(flat)
  for layer in range(gqa.config.num_layers):
    for name, axis in (("k.kernel", 1), ("k.bias", 0)):
      w = flat[f"layers.{layer}.attn.{name}"]
      keys = np.take(w, [0, 2], axis=axis)
      shared[f"layers.{layer}.attn.{name}"] = np.repeat(keys, 2, axis=axis)
      diff[f"layers.{layer}.attn.{name}"] = keys
  as_jnp = lambda d: {k: jnp.asarray(v) for k, v in d.items()}
  return (from_flat_params(gqa.config, as_jnp(shared), tokenizer=gqa.tokenizer),
          from_flat_params(gqa.config.replace(num_kv_heads=2, num_value_heads=4), as_jnp(diff),
                           tokenizer=gqa.tokenizer))


def test_config_checks_and_round_trip():
  cfg = tiny_config(num_heads=8, num_kv_heads=2, num_value_heads=4)
  assert (cfg.value_heads, cfg.values_per_key_head) == (4, 2)
  assert ModelConfig.from_json(cfg.to_json()) == cfg
  assert tiny_config().value_heads == 2 and tiny_config().values_per_key_head == 1
  assert tiny_config(num_value_heads=2) == tiny_config()    # the same model, one spelling
  with pytest.raises(ConfigError, match="num_value_heads=3 must be a multiple of "
                                        "num_kv_heads=2"):
    tiny_config(num_heads=8, num_kv_heads=2, num_value_heads=3)
  with pytest.raises(ConfigError, match="num_value_heads=16 .* divide num_heads=8"):
    tiny_config(num_heads=8, num_kv_heads=2, num_value_heads=16)
  with pytest.raises(ConfigError, match="num_value_heads=2.0 must be an integer"):
    tiny_config(num_heads=8, num_kv_heads=2, num_value_heads=2.0)


def test_group_sharing_matches_shared_key_gqa(pair):
  """Query head i reads key head i*2/8 and value head i*4/8: exactly what the GQA model
  computes when value heads 2j and 2j+1 share a key projection."""
  gqa, diff = pair
  want = kvjax.score(gqa, [p[:20] for p in PROMPTS], [p[20:] for p in PROMPTS])
  got = kvjax.score(diff, [p[:20] for p in PROMPTS], [p[20:] for p in PROMPTS])
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert (kvjax.generate(diff, PROMPTS, max_new_tokens=8).token_ids
          == kvjax.generate(gqa, PROMPTS, max_new_tokens=8).token_ids)


@pytest.mark.parametrize("method", ["full", "ems", "d2o", "elastic_cache", "adakv", "kvzip"])
def test_kernel_path_gives_the_same_tokens(pair, method, monkeypatch):
  """With the kernels on (interpreted), attention and merging fall back to the references
  where values are wider than keys."""
  kwargs = {} if method == "full" else {"method": method, "compression_ratio": 0.5}
  want, got = jnp_and_kernel_tokens(pair[1], PROMPTS, monkeypatch, max_new_tokens=4, **kwargs)
  assert got == want


def test_cache_stores_each_key_once(pair):
  gqa, diff = pair
  cfg, d, b, s = diff.config, diff.config.head_dim, 3, 40
  keys_and_values = cfg.num_layers * b * s * (cfg.num_kv_heads + cfg.value_heads) * d * 4
  got = full_cache_nbytes(cfg, b, s)
  assert keys_and_values <= got <= 1.05 * keys_and_values
  assert got < 0.8 * full_cache_nbytes(gqa.config, b, s)
  out = kvjax.generate(diff, PROMPTS, max_new_tokens=2)
  assert out.stats["context_cache_bytes"] < 0.8 * kvjax.generate(
      gqa, PROMPTS, max_new_tokens=2).stats["context_cache_bytes"]


UNTRAINED = {"locret": "no trained retaining heads", "attention_gate": "no trained gates",
             "lococo": "no trained compressors"}


@pytest.mark.parametrize("name", registry.available())
def test_every_method_runs_or_refuses(pair, name):
  diff = pair[1]
  method = registry.get(name)
  kwargs = {"compression_ratio": 0.5} if method.needs_budget else {}
  if name in UNTRAINED:   # no weights ship with them: refused by name (their own tests)
    with pytest.raises(MethodError, match=UNTRAINED[name]):
      kvjax.generate(diff, PROMPTS, method=name, max_new_tokens=3, **kwargs)
    return
  if method.family not in base.WIDE_VALUE_FAMILIES:
    with pytest.raises(MethodError, match="num_value_heads=4 over num_kv_heads=2"):
      kvjax.generate(diff, PROMPTS, method=name, max_new_tokens=3, **kwargs)
    return
  out = kvjax.generate(diff, PROMPTS, method=name, max_new_tokens=3, **kwargs)
  assert [len(t) for t in out.token_ids] == [3, 3, 3]
  if method.needs_budget and not method.decode_time:
    full = kvjax.generate(diff, PROMPTS, max_new_tokens=3)
    assert out.stats["context_cache_bytes"] < 0.75 * full.stats["context_cache_bytes"]



def test_conversation_reuses_a_diffqkv_cache(smollm2_tokenizer):
  chat = tiny_chat_model(smollm2_tokenizer, num_heads=8, num_kv_heads=2, num_value_heads=4,
                         max_position_embeddings=2048)
  text = " ".join(f"Fact {i}: the code word is word{i}." for i in range(12))
  turns = ["First?", "Second?"]
  full = kvjax.converse(chat, text, turns, max_new_tokens=4)
  snap = kvjax.converse(chat, text, turns, method="snapkv", compression_ratio=0.5,
                        max_new_tokens=4)
  assert len(full.answers[0]) == len(snap.answers[0]) == 2
  assert snap.stats["context_cache_bytes"] < 0.7 * full.stats["context_cache_bytes"]
