"""Quest: query-aware page selection at decode (Tang et al., ICML 2024, arXiv 2406.10774;
official code mit-han-lab/Quest).

The context is kept whole, in pages of `page_size` (16) slots with each page's element-wise
key max and min (`kvjax.cache.paged`). Each decode step bounds every page's logit for the
new query (sum over channels of max(q * max, q * min)) and attends over the tokens of the
top pages only: max(`min_pages`, ceil(budget / page_size)) of them, budget = the
compression ratio's token budget (the eval code's `max(3, token_budget // chunk_size)`, rounded
up here so that a budget of the whole context reads all of it), including the page of
the newest token (Quest's serving code always keeps the last page; its eval code does not).
The first `skip_layers` (2) layers stay dense, as Quest's `_quest_skip_layer`. Prefill and
appended questions attend densely.

Offloaded (`offload`, the default): the paged layers' keys and values live in host memory
and a decode step copies only its pages to the device, so the device holds the dense first
layers, the page bounds (2 / page_size of the keys, float32) and positions;
`context_cache_bytes` counts device bytes and `method_stats["host_bytes"]` the offloaded
ones. `offload=False` keeps everything on the device (Quest's own setting: memory is not
reduced, only what a step reads).

Offload tier (`device_pages` > 0, offloaded only): each paged layer keeps `device_pages`
device frames per row and KV head holding copies of host pages (`kvjax.cache.page_buffer`):
a decode step reads resident pages from their frames and copies only the others from host
memory, evicting by `eviction` ("lru", "predictions": a 1-bit discard prediction with an
LRU fallback, "learned": the same with the bit from a trained model, `predictor`, default
`kvjax.cache.page_predictor.TRAINED`, "hybrid": LSM-GNN's static prior plus recency),
with `victim_pages` victim frames and `prefetch` pages prefetched per step. The tokens
are those of the unbuffered cache; `method_stats` adds the buffer's settings and bytes,
and `decode_method_stats` its hits, faults and prefetches after decoding
(`page_buffer.buffer_counts`). `record_pages` hands every buffered step's requests and
page features to `page_buffer.recording()` (data collection for the learned predictor;
off by default).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import ClassVar

import jax.numpy as jnp

from kvjax.cache.kv_cache import host_nbytes, nbytes
from kvjax.cache.page_buffer import (POLICIES, BufferConfig, BufferedPagedLayerCache,
                                     buffer_counts, buffered)
from kvjax.cache.page_predictor import PagePredictor
from kvjax.cache.paged import GQA_MODES, PagedLayerCache, repaged
from kvjax.errors import MethodError
from kvjax.methods import base, registry


# The pages a step reads are rounded up to a multiple of this (64 tokens at the default
# page size, as `generate`'s reserved slots): SmolLM2 at ratio 0.5 compiled its decode loop
# for each 32 tokens of prompt length (6.6 s at 600 tokens after 520).
READS_MULTIPLE = 4


@registry.register
@dataclasses.dataclass(frozen=True)
class Quest(base.Method):
  """Decode attends over the top pages by key-bound (see the module docstring)."""
  name: ClassVar[str] = "quest"
  family: ClassVar[str] = "paging"
  page_size: int = 16
  min_pages: int = 3
  skip_layers: int = 2
  gqa: str = "query"
  offload: bool = True
  device_pages: int = 0       # the offload tier's frames per row and KV head (0: none)
  eviction: str = "lru"
  prefetch: int = 0
  victim_pages: int = 0
  predictor: PagePredictor | None = None   # eviction="learned"'s model (None: trained)
  record_pages: bool = False
  keep: int = 0   # the token budget, set by `fitted` (`finalize` sizes the reads from it)

  def __post_init__(self):
    base.check_int("page_size", self.page_size, 1)
    base.check_int("min_pages", self.min_pages, 1)
    base.check_int("skip_layers", self.skip_layers, 0)
    base.check_choice("gqa", self.gqa, GQA_MODES)
    base.check_int("device_pages", self.device_pages, 0)
    base.check_choice("eviction", self.eviction, POLICIES)
    base.check_int("prefetch", self.prefetch, 0)
    base.check_int("keep", self.keep, 0)
    base.check_int("victim_pages", self.victim_pages, 0)
    if self.predictor is not None and not isinstance(self.predictor, PagePredictor):
      raise MethodError(f"predictor={self.predictor!r:.80} must be a "
                        "kvjax.cache.page_predictor.PagePredictor or None")
    if self.predictor is not None and self.eviction != "learned":
      raise MethodError(f"predictor is used by eviction='learned' only, got "
                        f"eviction={self.eviction!r}")
    if not isinstance(self.record_pages, bool):
      raise MethodError(f"record_pages={self.record_pages!r:.80} must be True or False")
    if self.device_pages and not self.offload:
      raise MethodError(f"device_pages={self.device_pages} buffers offloaded pages: it needs "
                        "offload=True (or device_pages=0)")

  def buffer_config(self) -> BufferConfig | None:
    """The offload tier's settings, None without one."""
    if not self.device_pages:
      return None
    return BufferConfig(device_pages=self.device_pages, policy=self.eviction,
                        prefetch=self.prefetch, victim_pages=self.victim_pages,
                        predictor=self.predictor, record=self.record_pages)

  def pages(self, keep: int) -> int:
    """Pages a decode step reads for a token budget of `keep`: whole pages covering it
    (a budget of the whole context reads all of it), at least `min_pages`."""
    return max(self.min_pages, -(-keep // self.page_size))

  def fitted(self, keep):
    return self if self.keep == keep else dataclasses.replace(self, keep=keep)

  def decoding(self):
    return dataclasses.replace(self, keep=0) if self.keep else self   # read by finalize

  def budget_free_prefill(self):
    # The prefill keeps every token; `finalize` sizes the reads from the fitted budget
    # (unfitted, from the pages the prefill compiled in).
    return self.decoding() if self.keep else None

  def score(self, x):
    return jnp.zeros(x.key_positions.shape, jnp.float32)   # nothing is evicted

  def compact(self, cand, x, keep):
    """Every candidate is kept; layers from `skip_layers` on are paged (with `keep`'s
    pages, which `finalize` sets again from the fitted budget)."""
    if x.layer < self.skip_layers:
      return cand.replace(state=None)
    return PagedLayerCache.from_dense(cand, self.page_size, self.pages(keep), self.gqa)

  def finalize(self, cache, config=None):
    """The prompt's bucket padding cut (each row's tokens from slot 0), pages rebuilt; a
    layer whose budget covers its whole context stays dense (reads all of it, as the full
    cache, however many tokens decoding adds). Without an offload buffer the pages a step
    reads are rounded up to a multiple of `READS_MULTIPLE`, the real count read and
    attended (`PagedLayerCache.rounded_reads`): budgets that round alike (a compression
    ratio's, over prompts of other lengths) share one compiled decode loop."""
    groups = config.num_heads // config.num_kv_heads if config is not None else 1
    tier = self.buffer_config()
    index = itertools.count()

    def page(dense, layer):
      tag = next(index)
      pages = self.pages(self.keep) if self.keep else layer.pages
      if pages * self.page_size >= dense.capacity:   # reads the whole context: dense
        return dense
      paged = PagedLayerCache.from_dense(dense, layer.page_size, pages, layer.gqa)
      if tier is None:
        paged = paged.rounded_reads(READS_MULTIPLE)
      paged = paged.offload() if self.offload else paged
      return paged if tier is None else buffered(paged, tier, groups, tag)

    return repaged(cache, page)

  def kept_budgets(self, cache, budgets):
    del budgets
    return tuple(int((layer.slot_positions() >= 0).sum(-1).max()) for layer in cache.layers)

  def cache_stats(self, cache) -> dict:
    paged = [layer for layer in cache.layers if isinstance(layer, PagedLayerCache)]
    if not paged:
      return {}
    pages = paged[0].pages_read   # a host read of the traced count, when rounded
    return {"pages_per_step": pages, "page_size": self.page_size,
            "tokens_read_per_step": pages * self.page_size,
            "dense_layers": len(cache.layers) - len(paged),
            "host_bytes": host_nbytes(cache),
            **self._tier_stats(paged)}

  def decode_stats(self, cache) -> dict:
    """The offload tier's counters summed over layers (page_buffer.buffer_counts; all zero
    where no layer has a buffer)."""
    return buffer_counts(cache)

  def _tier_stats(self, paged) -> dict:
    buffers = [layer.buffer for layer in paged if isinstance(layer, BufferedPagedLayerCache)]
    if not buffers:
      return {}
    return {"device_pages": self.device_pages, "eviction": self.eviction,
            "prefetch": self.prefetch, "victim_pages": self.victim_pages,
            "buffer_bytes": sum(nbytes(b) for b in buffers)}
