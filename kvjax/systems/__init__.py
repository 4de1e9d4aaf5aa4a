"""Serving systems around the cache: prefix sharing across an offline batch (BatchLLM),
reusable chunk caches for retrieval-augmented prompts (Cache-Craft), continuous batching
under a cache-memory bound, and an offload tier (paging policies, a device page buffer)."""

from kvjax.systems import offload, paging
from kvjax.systems.chunk_cache import ChunkStore, generate_from_chunks
from kvjax.systems.prefix_sharing import generate_shared
from kvjax.systems.prefix_tree import PrefixGroup, group_by_prefix
from kvjax.systems.scheduler import ServedRequest, Server

__all__ = ["ChunkStore", "PrefixGroup", "ServedRequest", "Server", "generate_from_chunks",
           "generate_shared", "group_by_prefix", "offload", "paging"]
