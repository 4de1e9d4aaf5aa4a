"""kvjax: JAX/Pallas LLM inference with KV-cache compression.

    import kvjax
    model = kvjax.load("smollm2-135m")
    result = kvjax.generate(model, "The capital of France is", max_new_tokens=8)
    print(result.texts[0], result.stats["cache_bytes"])
"""

# First, before anything can start JAX's CPU backend (see kvjax/xla_cpu.py).
from kvjax import xla_cpu

xla_cpu.apply_defaults()
xla_cpu.tune_malloc()

from kvjax import methods  # noqa: E402
from kvjax import sharding  # noqa: E402
from kvjax import systems  # noqa: E402
from kvjax import training  # noqa: E402 (trained-on-first-use weights register here)
from kvjax.config import ModelConfig
from kvjax.errors import (CheckpointError, ChecksumError, ConfigError, DownloadError,
                          GenerationError, KvjaxError, UnknownModelError)
from kvjax.generation import ConversationResult, GenerationResult, converse, generate, score
from kvjax.loading.load import available_models, load
from kvjax.model import Model

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ChecksumError", "ConfigError", "ConversationResult",
           "DownloadError", "GenerationError", "GenerationResult", "KvjaxError", "Model", "ModelConfig",
           "UnknownModelError", "available_models", "converse", "generate", "load", "methods", "score",
           "sharding", "systems", "training"]
