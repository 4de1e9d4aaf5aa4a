"""MPCache: look-once static eviction plus hierarchical clustered selection at decode
(Zeng et al., arXiv 2501.06807; official code zwxandy/MPCache,
`llama_flash_attn_monkey_patch_compression.py` and `utils.py`).

Static stage, once at prefill: the last `static_window` (0.2) of the chunk's queries attend
over the context; a token matters as much as the largest attention any of them gives it,
averaged over all query heads. MPCache keeps the tokens at or above a per-dataset threshold
(1e-8 to 1e-3 in its script); kvjax keeps the budget's top tokens by the same score, which is
that rule with the threshold set by the compression ratio (the reference notes' advice). The
kept set is shared by the layer's KV heads; generated tokens are always kept (real savings:
evicted tokens are gone).

Dynamic stage, every decode step (`kvjax.cache.paged`, pages of `cluster_size / 2` slots):
clusters of `cluster_size` (32) kept tokens are scored by sum_c q_c (alpha max_c +
(1 - alpha) min_c) (alpha 0.6); the top `first_ratio` (0.5) of them plus the first and the
newest cluster let their 16-token halves compete by the same score for `dynamic_ratio` (0.2)
of all halves plus the first and the newest, and the query attends over those tokens only.

Where kvjax differs from the code: the static scores are causal (the code's scoring matmul
has no mask, so its window queries also see later window tokens); the counts of clusters
and halves are fixed from the context after prefill (the code recounts as tokens are
generated); the newest cluster is always kept (the code keeps the last one only when it is
partial); layer-wise index sharing (odd layers reusing the previous even layer's indices,
an MPC cost saving) is not done: each layer selects its own; GQA models select per query
head (`gqa`, as Quest here; the code targets MHA).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from kvjax.cache.paged import GQA_MODES, ClusterSelection, PagedLayerCache, repaged
from kvjax.errors import MethodError
from kvjax.methods import base, registry
from kvjax.methods.quest import READS_MULTIPLE


# Halves a step reads are rounded up as Quest's pages are (`quest.READS_MULTIPLE`: each is
# gathered, then masked past the real count); first-level clusters, which only narrow the
# halves that compete (a top-k and a comparison per half), to a multiple of 8.
CLUSTERS_MULTIPLE = 8


@registry.register
@dataclasses.dataclass(frozen=True)
class MPCache(base.Method):
  """Static eviction by the window's largest head-mean attention, then decode over
  MPCache's two-level clusters (see the module docstring)."""
  name: ClassVar[str] = "mpcache"
  family: ClassVar[str] = "paging"
  static_window: float = 0.2
  alpha: float = 0.6
  cluster_size: int = 32
  first_ratio: float = 0.5
  dynamic_ratio: float = 0.2
  skip_layers: int = 0
  gqa: str = "query"

  def __post_init__(self):
    base.check_fraction("static_window", self.static_window, low_open=True)
    base.check_fraction("alpha", self.alpha)
    base.check_int("cluster_size", self.cluster_size, 2)
    if self.cluster_size % 2:
      raise MethodError(f"mpcache cluster_size={self.cluster_size} must be even (clusters "
                        f"split into halves at the second level)")
    base.check_fraction("first_ratio", self.first_ratio)
    base.check_fraction("dynamic_ratio", self.dynamic_ratio)
    base.check_int("skip_layers", self.skip_layers, 0)
    base.check_choice("gqa", self.gqa, GQA_MODES)

  @property
  def page_size(self) -> int:
    return self.cluster_size // 2

  def score(self, x):
    """[B, K, S]: the largest head-mean attention any of the last `static_window` queries
    gives each slot, the same for every KV head."""
    w = max(1, int(x.queries.shape[1] * self.static_window))
    probs = base.window_attention(x, w)                                  # [B, H, W, S]
    best = probs.mean(1).max(1)                                          # [B, S]
    return jnp.broadcast_to(best[:, None], x.key_positions.shape)

  @property
  def layerwise_prefill(self) -> bool:
    """Without skipped layers every layer's prefill does the same work."""
    return self.skip_layers == 0

  def compact(self, cand, x, keep):
    kept = super().compact(cand, x, keep)
    if x.layer < self.skip_layers:
      return kept.replace(state=None)
    return self._paged(kept)

  def _paged(self, kept):
    """The kept tokens marked paged (`finalize` sets the counts of clusters and halves)."""
    return PagedLayerCache.from_dense(kept, self.page_size, 1, self.gqa,
                                      ClusterSelection(self.alpha, 0))

  @property
  def compacts_ranked(self) -> bool:
    """It ranks as the default top-k; a ranked layer (a layerwise prefill: no skipped
    layers) stays dense until `ranked_cut` marks it paged."""
    return True

  def ranked_cut(self, layer, keep):
    return self._paged(layer.first_slots(keep))

  def selection(self, tokens: int) -> tuple[int, ClusterSelection]:
    """(pages read per step, first-level selection) for a context of `tokens` kept tokens:
    int(ratio x count) as the code's topk, plus the first and the newest."""
    halves = math.ceil(tokens / self.page_size)
    clusters = math.ceil(tokens / self.cluster_size)
    return (int(halves * self.dynamic_ratio) + 2,
            ClusterSelection(self.alpha, int(clusters * self.first_ratio)))

  def finalize(self, cache, config=None):
    """Bucket padding cut; the counts of clusters and halves set from the kept context,
    each rounded up (`PagedLayerCache.rounded_reads`: halves as Quest's pages,
    clusters to a multiple of `CLUSTERS_MULTIPLE`) with the real count traced, so
    that contexts whose counts round alike (a compression ratio's, over prompts of other
    lengths) share one compiled decode loop."""
    del config

    def page(dense, layer):
      del layer
      pages, clustering = self.selection(dense.capacity)
      paged = PagedLayerCache.from_dense(dense, self.page_size, pages, self.gqa, clustering)
      return paged.rounded_reads(READS_MULTIPLE, CLUSTERS_MULTIPLE)

    return repaged(cache, page)

  def cache_stats(self, cache) -> dict:
    paged = [layer for layer in cache.layers if isinstance(layer, PagedLayerCache)]
    if not paged:
      return {}
    # Host reads of the traced real counts.
    return {"tokens_read_per_step": paged[0].pages_read * self.page_size,
            "first_level_clusters": paged[0].clusters_chosen + 2,
            "dense_layers": len(cache.layers) - len(paged)}
