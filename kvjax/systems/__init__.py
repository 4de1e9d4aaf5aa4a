"""Serving systems around the cache: prefix sharing across an offline batch (BatchLLM),
reusable chunk caches for retrieval-augmented prompts (Cache-Craft), continuous batching
under a cache-memory bound (with an OpenAI-compatible HTTP endpoint and a store of shared
prompt prefixes), and an offload tier (paging policies, a device page buffer, a trained
eviction predictor)."""

from kvjax.systems import offload, paging
from kvjax.systems.chunk_cache import ChunkStore, generate_from_chunks
from kvjax.systems.endpoint import Endpoint, serve_http
from kvjax.systems.prefix_sharing import generate_shared
from kvjax.systems.prefix_store import PrefixStore
from kvjax.systems.prefix_tree import PrefixGroup, group_by_prefix
from kvjax.systems.scheduler import ServedRequest, Server

__all__ = ["ChunkStore", "Endpoint", "PrefixGroup", "PrefixStore", "ServedRequest", "Server",
           "generate_from_chunks", "generate_shared", "group_by_prefix", "offload", "paging",
           "serve_http"]
