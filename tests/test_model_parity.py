"""Logits parity with Hugging Face transformers on tiny random checkpoints."""

import numpy as np
import pytest
import torch

import kvjax
from hf_models import save_tiny


def _hf_logits(directory, tokens):
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _kvjax_logits(model, tokens):
  from kvjax.cache import init_cache
  from kvjax.generation import engine
  tokens = np.asarray(tokens, np.int32)
  cache = init_cache(model.config, tokens.shape[0], tokens.shape[1])
  logits, _ = engine.STEPS.prefill(model, tokens, np.ones(tokens.shape, bool), cache,
                                   logits="all")
  return np.asarray(logits)


@pytest.mark.parametrize("kind", ["llama", "llama31", "qwen2"])
def test_prefill_logits_match_transformers(kind, tmp_path):
  directory = save_tiny(kind, tmp_path / kind)
  # 96 tokens: past the llama31 config's original context (64), so RoPE scaling matters.
  tokens = np.random.default_rng(1).integers(0, 256, size=(2, 96))
  expected = _hf_logits(directory, tokens)
  model = kvjax.load(directory)
  got = _kvjax_logits(model, tokens)
  assert got.shape == expected.shape
  assert np.abs(got - expected).max() <= 1e-4
  assert np.abs(expected).max() > 1e-2  # the comparison is not between two near-zero arrays


def test_bfloat16_close_to_float32(tmp_path):
  directory = save_tiny("qwen2", tmp_path / "q")
  tokens = np.random.default_rng(2).integers(0, 256, size=(1, 40))
  f32 = _kvjax_logits(kvjax.load(directory), tokens)
  bf16 = _kvjax_logits(kvjax.load(directory, dtype="bfloat16"), tokens)
  assert kvjax.load(directory, dtype="bfloat16").params["embed"]["embedding"].dtype == "bfloat16"
  assert np.abs(f32 - bf16).max() < 0.05 * np.abs(f32).max()
