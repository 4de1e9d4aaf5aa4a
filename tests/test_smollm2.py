"""Real weights: SmolLM2-135M-Instruct (GGUF from the package registry) end to end.

The reference is Hugging Face transformers' own GGUF loader on the same file: an independent
dequantization, un-permutation and forward pass.
"""

import numpy as np
import pytest
import torch

import kvjax
from kvjax.cache import init_cache
from kvjax.generation import engine

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower from 1887 to 1889. Locally nicknamed 'La dame de fer', it was "
        "constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
        "anniversary of the French Revolution. Although initially criticised by some of "
        "France's leading artists and intellectuals for its design, it has since become a "
        "global cultural icon of France.")


pytestmark = pytest.mark.slow  # the real SmolLM2 weights, here and in transformers


@pytest.fixture(scope="module")
def hf_logprobs(smollm2_transformers, smollm2):
  tokens = smollm2.tokenizer.encode(TEXT)
  with torch.no_grad():
    logits = smollm2_transformers(torch.tensor([tokens])).logits[0].double()
  return tokens, torch.log_softmax(logits, -1).numpy()


def test_config_of_registry_model(smollm2):
  cfg = smollm2.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
          cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
  assert cfg.tie_embeddings and cfg.rope_theta == 1e5
  assert 134_000_000 < smollm2.num_params() < 135_000_000


def test_logits_match_transformers_gguf_loader(smollm2, hf_logprobs):
  tokens, expected = hf_logprobs
  assert len(tokens) >= 64
  cache = init_cache(smollm2.config, 1, len(tokens))
  logits, _ = engine.STEPS.prefill(smollm2, np.asarray([tokens], np.int32),
                                   np.ones((1, len(tokens)), bool), cache, "all")
  logits = np.asarray(logits[0], np.float64)
  got = logits - logits.max(-1, keepdims=True)
  got = got - np.log(np.exp(got).sum(-1, keepdims=True))
  np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
  assert np.abs(got - expected).max() < 1e-3  # measured 1.1e-4 over 120 tokens


def test_score_matches_transformers(smollm2, hf_logprobs):
  tokens, expected = hf_logprobs
  split = 40
  got = kvjax.score(smollm2, tokens[:split], tokens[split:])
  want = expected[np.arange(split - 1, len(tokens) - 1), tokens[split:]]
  np.testing.assert_allclose(got, want, atol=2e-3)


def test_greedy_capital_of_france(smollm2):
  result = kvjax.generate(smollm2, "The capital of France is", chat_template=False,
                          max_new_tokens=4)
  assert result.texts[0].strip().startswith("Paris")


def test_chat_answers_batched_as_alone(smollm2):
  questions = ["What is the capital of France?", "What is the capital of Germany?"]
  result = kvjax.generate(smollm2, questions, max_new_tokens=12)
  assert "Paris" in result.texts[0]
  assert "Berlin" in result.texts[1]
  alone = kvjax.generate(smollm2, questions[1], max_new_tokens=12)
  assert alone.token_ids[0] == result.token_ids[1]


def _tree_stats(root):
  """Every file under root with its size and modification time (ns)."""
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_registry_model_is_converted_once(smollm2, monkeypatch):
  """A second kvjax.load of a registry name reads the cached checkpoint: it neither fetches
  nor converts the GGUF again, nor rewrites the cache entry."""
  from kvjax.loading import converted as converted_lib
  from kvjax.loading import load as load_lib
  converted = load_lib.converted_path("smollm2-135m")
  assert converted_lib.problem(converted) is None
  before = _tree_stats(converted)
  assert before

  def forbidden(what):
    def fail(*args, **kwargs):
      raise AssertionError(f"{what} called: the registry model was converted again")
    return fail

  monkeypatch.setattr(converted_lib, "iter_gguf", forbidden("iter_gguf"))
  monkeypatch.setattr(load_lib.assets, "fetch", forbidden("assets.fetch"))
  monkeypatch.setattr(converted_lib, "build", forbidden("converted.build"))
  again = kvjax.load("smollm2-135m")
  assert _tree_stats(converted) == before
  assert again.config == smollm2.config
  np.testing.assert_array_equal(np.asarray(again.params["embed"]["embedding"]),
                                np.asarray(smollm2.params["embed"]["embedding"]))
