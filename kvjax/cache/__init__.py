"""KV caches: immutable pytrees that go into and come out of every forward step."""

from kvjax.cache.kv_cache import Cache, LayerCache, cache_nbytes, full_cache_nbytes, init_cache

__all__ = ["Cache", "LayerCache", "cache_nbytes", "full_cache_nbytes", "init_cache"]
