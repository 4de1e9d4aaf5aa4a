"""KV caches: immutable pytrees that go into and come out of every forward step."""

from kvjax.cache.kv_cache import (EMPTY_POSITION, Cache, FlatLayerCache, LayerCache, NewTokens,
                                  Stats, cache_nbytes, free_slots, full_cache_nbytes, grow,
                                  init_cache, slots_per_head)

__all__ = ["EMPTY_POSITION", "Cache", "FlatLayerCache", "LayerCache", "NewTokens", "Stats",
           "cache_nbytes", "free_slots", "full_cache_nbytes", "grow", "init_cache",
           "slots_per_head"]
