"""Tiny random Hugging Face checkpoints (Llama, Qwen2) written with save_pretrained."""

import pathlib

import torch
import transformers

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5)


def save_tiny(kind: str, directory: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
  """Saves a tiny random float32 model ("llama", "llama31" or "qwen2") and returns its dir."""
  torch.manual_seed(seed)
  options = {**TINY, **overrides}
  if kind == "qwen2":
    config = transformers.Qwen2Config(**options, tie_word_embeddings=False,
                                      rope_theta=1e6)
    model = transformers.Qwen2ForCausalLM(config)
  elif kind in ("llama", "llama31"):
    if kind == "llama31":
      options["rope_scaling"] = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=64)
      options["rope_theta"] = 5e5
    config = transformers.LlamaConfig(**options, tie_word_embeddings=(kind == "llama"))
    model = transformers.LlamaForCausalLM(config)
  else:
    raise ValueError(kind)
  # Random init leaves norms at 1 and biases at 0: perturb them so parity covers them too.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  model = model.to(torch.float32).eval()
  model.save_pretrained(directory)
  return directory
