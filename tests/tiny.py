"""Tiny random kvjax models for fast tests."""

from kvjax.config import ModelConfig
from kvjax.model import random_params


def tiny_config(**overrides) -> ModelConfig:
  options = dict(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5)
  options.update(overrides)
  return ModelConfig(**options)


def tiny_model(seed: int = 0, tokenizer=None, **overrides):
  """Random weights scaled up so logits are far from uniform (greedy choices are stable)."""
  import jax
  model = random_params(tiny_config(**overrides), seed=seed, tokenizer=tokenizer)
  model.params = jax.tree_util.tree_map(lambda x: x * 4 if x.ndim > 1 else x, model.params)
  return model


def tiny_chat_model(tokenizer, **overrides):
  """A tiny random model with a real tokenizer (and its chat template) and its vocabulary."""
  return tiny_model(tokenizer=tokenizer, vocab_size=tokenizer.vocab_size, **overrides)


def random_prompts(lengths, seed: int = 0, vocab: int = 256) -> list[list[int]]:
  """Token-id prompts of the given lengths (reproducible by seed)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


def jnp_and_kernel_tokens(model, prompts, monkeypatch, **generate_kwargs):
  """(token ids on the jnp path, token ids with the Pallas kernels interpreted)."""
  import kvjax
  import jax
  want = kvjax.generate(model, prompts, **generate_kwargs).token_ids
  monkeypatch.setenv("KVJAX_PALLAS", "1")
  # jit reuses a function's trace for the same argument shapes whatever the environment
  # says: without this, the "kernel" run could replay the jnp path's trace.
  jax.clear_caches()
  got = kvjax.generate(model, prompts, **generate_kwargs).token_ids
  jax.clear_caches()
  return want, got


def padded_and_exact(model, prompts, method_module, monkeypatch, reused=False,
                     **generate_kwargs):
  """(padded, exact) generate results, with the method's shape padding
  (`method_module.shared_capacities`; `reused`: as a set taken from an earlier prompt, up
  to a layer's bound over its rounded count) and with it patched off, after checking that
  only the allocation differs: the same tokens and context bytes, the padded allocation
  larger, the exact one its context bytes."""
  import kvjax
  from kvjax.cache import kv_cache
  if reused:   # every other layer up to its bound, the rest 16 over their rounded counts
    monkeypatch.setattr(method_module, "shared_capacities", lambda key, slots, largest: tuple(
        max(n, m) if i % 2 else min(kv_cache.shared_capacity(n, m) + 16, max(n, m))
        for i, (n, m) in enumerate(zip(slots, largest))))
  padded = kvjax.generate(model, prompts, **generate_kwargs)
  monkeypatch.setattr(method_module, "shared_capacities",
                      lambda key, slots, largest: tuple(int(n) for n in slots))
  exact = kvjax.generate(model, prompts, **generate_kwargs)
  assert padded.token_ids == exact.token_ids
  assert padded.stats["context_cache_bytes"] == exact.stats["context_cache_bytes"]
  assert (padded.stats["context_cache_allocated_bytes"]
          > exact.stats["context_cache_allocated_bytes"] == exact.stats["context_cache_bytes"])
  return padded, exact


def greedy_steps(model, prefilled, steps: int):
  """`steps` greedy decode steps over a prefilled context, one call each: ([(tokens,
  logits) per step], the cache after them)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kvjax.generation import engine
  cache, out = prefilled.cache, []
  next_tokens = jnp.argmax(prefilled.logits, -1).astype(jnp.int32)
  for _ in range(steps):
    next_tokens, logits, cache = engine.STEPS.decode(
        model, next_tokens, cache, jax.random.key(0), 1.0, 1.0, True, prefilled.decode_plan)
    out.append((np.asarray(next_tokens), np.asarray(logits)))
  return out, cache


def assert_same_steps(got, want):
  """Step by step (`greedy_steps`, the shorter run's count): equal tokens, close logits."""
  import numpy as np
  for (got_tokens, got_logits), (want_tokens, want_logits) in zip(got, want):
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)


def assert_same_tree(got, want):
  """The same pytree structure and exactly equal leaves."""
  import jax
  import numpy as np
  got_leaves, got_tree = jax.tree_util.tree_flatten(got)
  want_leaves, want_tree = jax.tree_util.tree_flatten(want)
  assert got_tree == want_tree
  for g, w in zip(got_leaves, want_leaves, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def decode_loops_compiled(model, prompt_sets, **generate_kwargs) -> int:
  """Decode loops compiled by `generate` over each prompt set, from an empty cache of
  executables."""
  return generated_counting_loops(model, prompt_sets, **generate_kwargs)[0]


def generated_counting_loops(model, prompt_sets, **generate_kwargs):
  """(decode loops compiled, [generate's result per prompt set]), from an empty cache of
  executables."""
  import kvjax
  from kvjax.generation import engine
  engine.STEPS.clear()
  results = [kvjax.generate(model, prompts, **generate_kwargs) for prompts in prompt_sets]
  return sum(key[0] == "decode_loop" for key in engine.STEPS._executables), results


def reserved_and_unreserved(model, prompt_sets, layout, monkeypatch, **generate_kwargs):
  """`generated_counting_loops` as is, then with `layout.reserve_for` patched to reserve
  nothing: ((loops, results) reserved, (loops, results) unreserved)."""
  reserved = generated_counting_loops(model, prompt_sets, **generate_kwargs)
  monkeypatch.setattr(layout, "reserve_for", lambda self, room, multiple: 0)
  return reserved, generated_counting_loops(model, prompt_sets, **generate_kwargs)
