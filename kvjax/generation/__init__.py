"""Generation and scoring over KV caches."""

from kvjax.generation.conversation import ConversationResult, converse
from kvjax.generation.generate import GenerationResult, generate
from kvjax.generation.score import score

__all__ = ["ConversationResult", "GenerationResult", "converse", "generate", "score"]
