"""Prefilled prompt prefixes kept on the device for the server to reuse (automatic prefix
caching): a later request that starts with a stored prefix prefills only its own suffix.

Entries are one-row uncompressed caches, live slots first, keyed by their token ids; the
store keeps at most `max_bytes` of them and drops the least recently used first. A prefix
larger than the whole store is not kept (it is still used by the admission that prefilled
it).
"""

from __future__ import annotations

import collections
from typing import Sequence

from kvjax import validation
from kvjax.cache import kv_cache
from kvjax.errors import GenerationError


class PrefixStore:
  """Prefix caches by token ids, least recently used out beyond `max_bytes`."""

  def __init__(self, max_bytes: int):
    self.max_bytes = validation.integer("prefix_cache_bytes", max_bytes, 1,
                                        error=GenerationError,
                                        what="bytes of stored prefix caches")
    self._entries: collections.OrderedDict = collections.OrderedDict()  # tokens -> cache
    self._bytes: dict = {}
    self.nbytes = 0
    # hits: prefixes reused as stored; misses: prefixes not stored (prefilled), of which
    # `extensions` were prefilled over a shorter stored one (`base`).
    self.hits = self.misses = self.extensions = self.evictions = 0

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, tokens) -> bool:
    return tuple(tokens) in self._entries

  def longest(self, tokens: Sequence[int], most: int) -> int:
    """The length of the longest stored prefix of `tokens` no longer than `most` (0: none).
    Nothing is marked used: `get` does that for the prefix actually taken."""
    best = 0
    for key in self._entries:
      if best < len(key) <= most and tuple(tokens[:len(key)]) == key:
        best = len(key)
    return best

  def get(self, tokens: Sequence[int]):
    """The stored cache of exactly `tokens` (marked most recently used; a hit), or None
    (a miss)."""
    cache = self._take(tokens)
    if cache is None:
      self.misses += 1
    else:
      self.hits += 1
    return cache

  def base(self, tokens: Sequence[int]):
    """The stored cache of exactly `tokens` (marked most recently used), taken to prefill
    a longer prefix over it: counted as an extension of that prefix's miss, not a hit."""
    cache = self._take(tokens)
    if cache is None:
      raise GenerationError(f"no stored prefix of {len(tokens)} tokens to extend "
                            f"(`longest` gives the ones stored)")
    self.extensions += 1
    return cache

  def _take(self, tokens: Sequence[int]):
    key = tuple(tokens)
    cache = self._entries.get(key)
    if cache is not None:
      self._entries.move_to_end(key)
    return cache

  def put(self, tokens: Sequence[int], cache) -> bool:
    """Stores `cache` under `tokens`, dropping least recently used entries to stay within
    `max_bytes`; False (nothing stored or dropped) when it alone is larger than that."""
    key = tuple(tokens)
    size = kv_cache.nbytes(cache)
    if size > self.max_bytes:
      return False
    if key in self._entries:
      self.nbytes -= self._bytes[key]
      del self._entries[key]
    while self._entries and self.nbytes + size > self.max_bytes:
      old, _ = self._entries.popitem(last=False)
      self.nbytes -= self._bytes.pop(old)
      self.evictions += 1
    self._entries[key] = cache
    self._bytes[key] = size
    self.nbytes += size
    return True

  def clear(self) -> None:
    self._entries.clear()
    self._bytes.clear()
    self.nbytes = 0

  def stats(self) -> dict:
    return {"prefixes": len(self._entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
            "hits": self.hits, "misses": self.misses, "extensions": self.extensions,
            "evictions": self.evictions}
