"""Generation and scoring over KV caches."""

from kvjax.generation.generate import GenerationResult, generate
from kvjax.generation.score import score

__all__ = ["GenerationResult", "generate", "score"]
