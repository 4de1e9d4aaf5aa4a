"""The paged layer cache (Quest): every token, plus each page's element-wise key bounds.

Slots are cut into pages of `page_size` consecutive slots. Besides the dense keys and values,
each page stores the element-wise max and min of its keys (post-RoPE), per KV head. A decode
step bounds every page's logit for the new query (sum over channels of max(q * max, q * min):
no key of the page can score higher), keeps the `pages` pages with the highest bounds (and
always the page holding the newest token) and attends over their tokens only, so a decode
step reads pages * page_size keys and values however long the context is. Memory is the
dense cache's plus the bounds (2 / page_size of the keys): Quest saves bandwidth, not memory.
Prefill chunks and appended questions attend densely, as in Quest.

Offloaded (`offload()`): the dense keys and values live in host memory and only the pages a
decode step selects are copied to the device (one dynamic slice per page, head and row:
XLA reads host memory by dynamic slice, not by gather); bounds and positions stay on the
device, so the device holds 2 / page_size of the keys plus 4 bytes per slot, and a step
moves pages * page_size keys and values. New tokens are written to host memory where they
belong; dense attention (prefill chunks, questions) brings the whole layer over for that
call. `kvjax.cache.kv_cache.nbytes` counts device bytes, `host_nbytes` the offloaded ones.

MPCache's hierarchical selection (`ClusterSelection`) reads the same bounds two levels deep:
clusters of `pages_per_cluster` pages scored by the linear similarity
sum_c q_c (alpha max_c + (1 - alpha) min_c), the best `clusters` of them (and the first and
the newest) let their pages compete by the same similarity for the `pages` read.

Rounded reads (`rounded_reads`, Quest, MPCache): `pages` is a rounded-up size and `reads`
(traced) the real count; a step ranks `pages` pages and reads and attends the first `reads`
of them (the top `reads` pages: lax.top_k ranks ties by the lower index), so contexts whose
counts round alike share one compiled decode step. MPCache's first level is rounded so too:
`clustering.clusters` a rounded-up size, `clusters_read` (traced) the real count.

`gqa`: "query" picks pages per query head, as Quest's code does after `repeat_kv` (a KV head
may then be read for several page sets); "max" or "sum" reduce the bounds over each KV head's
query heads, so each KV head reads one page set.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.kv_cache import EMPTY_POSITION, LayerCache, NewTokens, PerHeadSlots, Stats
from kvjax.ops import attention as attention_ops

GQA_MODES = ("query", "max", "sum")
HOST, DEVICE = jax.memory.Space.Host, jax.memory.Space.Device


def page_bounds(keys: jax.Array, positions: jax.Array, page_size: int):
  """(max, min) [B, K, P, D] over each page's non-empty slots (-inf / +inf when it has none).
  keys [B, K, S, D] with S a multiple of page_size."""
  b, k, s, d = keys.shape
  pages = keys.reshape(b, k, s // page_size, page_size, d).astype(jnp.float32)
  valid = (positions >= 0).reshape(b, k, s // page_size, page_size, 1)
  return (jnp.where(valid, pages, -jnp.inf).max(3), jnp.where(valid, pages, jnp.inf).min(3))


def _finite(bound: jax.Array) -> jax.Array:
  """A page bound with the empty pages' infinities set to 0 (they are masked after)."""
  return jnp.where(jnp.isfinite(bound), bound, 0.0)


def logit_bounds(queries: jax.Array, page_max: jax.Array, page_min: jax.Array) -> jax.Array:
  """[B, K, G, P] upper bound of q . k / sqrt(D) over each page's keys; -inf for empty pages.
  queries [B, 1, H, D] (one decode token)."""
  k = page_max.shape[1]
  q = attention_ops.group_heads(queries, k)[:, :, :, 0].astype(jnp.float32)   # [B, K, G, D]
  empty = ~jnp.isfinite(page_max).all(-1)                                      # [B, K, P]
  qe = q[:, :, :, None, :]
  hi, lo = _finite(page_max)[:, :, None], _finite(page_min)[:, :, None]       # [B, K, 1, P, D]
  bound = jnp.maximum(qe * hi, qe * lo).sum(-1) * queries.shape[-1] ** -0.5
  return jnp.where(empty[:, :, None], -jnp.inf, bound)


def similarity(q: jax.Array, page_max: jax.Array, page_min: jax.Array, alpha: float):
  """[B, K, G, P] MPCache's sum_c q_c (alpha max_c + (1 - alpha) min_c) for q [B, K, G, D];
  -inf for empty pages."""
  empty = ~jnp.isfinite(page_max).all(-1)
  mix = alpha * _finite(page_max) + (1 - alpha) * _finite(page_min)          # [B, K, P, D]
  sim = jnp.einsum("bkgd,bkpd->bkgp", q, mix, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(empty[:, :, None], -jnp.inf, sim)


@dataclasses.dataclass(frozen=True)
class ClusterSelection:
  """MPCache's two levels: `clusters` clusters of `pages_per_cluster` pages kept at the
  first level (besides the first and the newest), scored with weight `alpha` on the max."""
  alpha: float
  clusters: int
  pages_per_cluster: int = 2


# Disallowed second-level pages rank below every allowed one but above empty ones (MPCache
# adds the dtype's lowest value to them).
DISALLOWED = -1e30


def _unit(page_size: int, clustering: ClusterSelection | None) -> int:
  """Slots a paged layer's capacity is a multiple of: whole pages, or whole clusters."""
  return page_size * (clustering.pages_per_cluster if clustering else 1)


def _moved(dense: LayerCache, space) -> LayerCache:
  """The layer with its keys and values in memory `space` (positions stay on the device)."""
  return dense.replace(keys=jax.device_put(dense.keys, space),
                       values=jax.device_put(dense.values, space))


def to_host(dense: LayerCache) -> LayerCache:
  """Host side: the dense layer with its keys and values offloaded (positions on the device)."""
  return _moved(dense, HOST)


def to_device(dense: LayerCache) -> LayerCache:
  """The dense layer with its keys and values on the device (a copy when offloaded)."""
  return _moved(dense, DEVICE)


def read_slots(array: jax.Array, start, size: int, offloaded: bool) -> jax.Array:
  """Slots [start, start + size) of keys or values [B, K, S, D] on the device: one dynamic
  slice (XLA reads host memory by slice, not gather), copied over when `offloaded`."""
  piece = jax.lax.dynamic_slice_in_dim(array, start, size, axis=2)
  return jax.device_put(piece, DEVICE) if offloaded else piece


@struct.dataclass
class PagedLayerCache(PerHeadSlots):
  dense: LayerCache            # every token; capacity a multiple of page_size
  page_max: jax.Array          # [B, K, P, D] float32 element-wise max of each page's keys
  page_min: jax.Array          # [B, K, P, D] float32 element-wise min
  reads: jax.Array | None = None   # int32: the pages read when fewer than `pages` (None: all)
  # int32: the first-level clusters chosen when fewer than `clustering.clusters` (None: all)
  clusters_read: jax.Array | None = None
  page_size: int = struct.field(pytree_node=False, default=16)
  pages: int = struct.field(pytree_node=False, default=1)   # pages attended per decode step
  gqa: str = struct.field(pytree_node=False, default="query")
  clustering: ClusterSelection | None = struct.field(pytree_node=False, default=None)
  offloaded: bool = struct.field(pytree_node=False, default=False)

  @property
  def state(self):
    return None

  @property
  def capacity(self) -> int:
    return self.dense.capacity

  @property
  def positions(self) -> jax.Array:
    return self.dense.positions

  def slot_positions(self) -> jax.Array:
    return self.dense.positions

  def free_slots(self) -> int:
    return self.dense.free_slots()

  def logical_axes(self) -> dict:
    page = ("batch", "kv_heads", "pages", "head_dim")
    return {"dense": self.dense.logical_axes(), "page_max": page, "page_min": page,
            "reads": (), "clusters_read": ()}

  @classmethod
  def from_dense(cls, dense: LayerCache, page_size: int, pages: int, gqa: str = "query",
                 clustering: ClusterSelection | None = None) -> "PagedLayerCache":
    """Pages over `dense` (padded with empty slots to a whole number of pages, or of
    clusters)."""
    dense = dense.replace(state=None)
    end = dense.end
    dense = dense.grow(-dense.capacity % _unit(page_size, clustering)).replace(end=end)
    page_max, page_min = page_bounds(dense.keys, dense.positions, page_size)
    return cls(dense=dense, page_max=page_max, page_min=page_min, page_size=page_size,
               pages=pages, gqa=gqa, clustering=clustering)

  def rounded_reads(self, multiple: int, cluster_multiple: int | None = None
                    ) -> "PagedLayerCache":
    """The layer reading the same pages, with `pages` rounded up to a multiple of
    `multiple` (at most its pages less one, so that it stays paged however it grows) and
    the real count traced (`reads`); MPCache's first-level clusters too, to a multiple of
    `cluster_multiple` (default `multiple`; the count traced as `clusters_read`): contexts
    whose counts round alike share one compiled decode step. Not for an offload buffer."""
    if self.reads is not None:
      raise ValueError("rounded_reads: a paged layer whose reads are not rounded yet")
    up = lambda n, m: -(-n // m) * m
    most = max(self.capacity // self.page_size - 1, self.pages)
    out = self.replace(pages=min(up(self.pages, multiple), most), reads=jnp.int32(self.pages))
    if self.clustering is None:
      return out
    clusters = self.clustering.clusters
    return out.replace(clustering=dataclasses.replace(
        self.clustering, clusters=up(clusters, cluster_multiple or multiple)),
                       clusters_read=jnp.int32(clusters))

  @property
  def clusters_chosen(self) -> int:
    """Host side: MPCache's first-level clusters chosen besides the first and the newest
    (the real count of rounded reads)."""
    return (self.clustering.clusters if self.clusters_read is None
            else int(self.clusters_read))

  @property
  def pages_read(self) -> int:
    """Host side: the pages a decode step reads (the real count of rounded reads)."""
    return self.pages if self.reads is None else int(self.reads)

  def _reduced(self, score: jax.Array) -> jax.Array:
    """[B, K, G, P] -> per query head, or one row per KV head (`gqa`)."""
    if self.gqa == "query":
      return score
    return score.max(2, keepdims=True) if self.gqa == "max" else score.sum(2, keepdims=True)

  def offload(self) -> "PagedLayerCache":
    """Host side: the keys and values moved to host memory."""
    return self.replace(dense=_moved(self.dense, HOST), offloaded=True)

  def on_device(self) -> LayerCache:
    """The dense layer with its keys and values on the device (a copy when offloaded)."""
    return _moved(self.dense, DEVICE) if self.offloaded else self.dense

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    if queries.shape[1] != 1 or pending is not None or want:
      return self.on_device().attend(queries, query_positions, pending, want)
    return self.decode(queries, query_positions), Stats()

  def selected_slots(self, queries) -> jax.Array:
    """[B, K, G or 1, pages * page_size] slots the decode query reads: the top pages by
    `logit_bounds` and the page of the newest token (or MPCache's `_cluster_pages`)."""
    newest = (self.dense.end - 1) // self.page_size
    if self.clustering is not None:
      top = self._cluster_pages(queries, newest)
    else:
      bound = self._reduced(logit_bounds(queries, self.page_max, self.page_min))
      _, top = jax.lax.top_k(bound.at[..., newest].set(jnp.inf), self.pages)  # [B, K, g, n]
    slots = top[..., None] * self.page_size + jnp.arange(self.page_size)
    return slots.reshape(top.shape[:-1] + (-1,))

  def _cluster_pages(self, queries, newest) -> jax.Array:
    """[B, K, g, pages] MPCache: the first level keeps the first cluster, the newest one and
    the `clusters` most similar; their pages, the first page and the newest compete for
    `pages` slots by the same similarity."""
    c, alpha = self.clustering.pages_per_cluster, self.clustering.alpha
    b, k, p, d = self.page_max.shape
    q = attention_ops.group_heads(queries, k)[:, :, :, 0].astype(jnp.float32)   # [B, K, G, D]
    coarse = self._reduced(similarity(
        q, self.page_max.reshape(b, k, p // c, c, d).max(3),
        self.page_min.reshape(b, k, p // c, c, d).min(3), alpha))            # [B, K, g, C]
    coarse = coarse.at[..., 0].set(jnp.inf).at[..., newest // c].set(jnp.inf)
    _, chosen = jax.lax.top_k(coarse, min(self.clustering.clusters + 2, p // c))
    if self.clusters_read is not None:   # the ranked clusters past the real count: none
      rank = jnp.arange(chosen.shape[-1])
      chosen = jnp.where(rank < self.clusters_read + 2, chosen, -1)
    parent = jnp.arange(p) // c
    allowed = (chosen[..., :, None] == parent).any(-2)                       # [B, K, g, P]
    fine = self._reduced(similarity(q, self.page_max, self.page_min, alpha))
    fine = jnp.where(allowed | (fine == -jnp.inf), fine, DISALLOWED)
    _, top = jax.lax.top_k(fine.at[..., 0].set(jnp.inf).at[..., newest].set(jnp.inf),
                           self.pages)
    return top

  def decode(self, queries, query_positions):
    """One new token per row over the selected pages (dense when they cover every page)."""
    if self.pages * self.page_size >= self.capacity:
      d = self.on_device()
      out, _ = attention_ops.decode(queries, d.keys, d.values, query_positions, d.positions)
      return out
    d = self.dense
    b, k, _, dim = d.keys.shape
    slots = self.selected_slots(queries)                                      # [B, K, g, n]
    g, n = slots.shape[2], slots.shape[3]
    flat = slots.reshape(b, k, g * n)
    take = lambda a: jnp.take_along_axis(a, flat.reshape(b, k, g * n, *([1] * (a.ndim - 3))),
                                         axis=2)
    positions = take(d.positions)
    if self.reads is not None:   # the ranked pages past the real count are not read
      rank = jnp.arange(g * n) % n // self.page_size
      positions = jnp.where(rank < self.reads, positions, EMPTY_POSITION)
    if self.offloaded:
      keys, values = self._read_pages(slots[..., ::self.page_size] // self.page_size)
    else:
      keys, values = take(d.keys), take(d.values)
    # Each query head (or group) is its own "KV head" over its pages.
    keys = keys.reshape(b, k * g, n, dim)
    values = values.reshape(b, k * g, n, values.shape[-1])
    positions = positions.reshape(b, k * g, n)
    out, _ = attention_ops.decode(queries, keys, values, query_positions, positions,
                                  stored=False)
    return out

  def _read_pages(self, pages: jax.Array):
    """(keys, values) [B, K, g * n * page_size, D] on the device: the pages [B, K, g, n] of
    each row and KV head copied out of host memory one dynamic slice at a time (the first
    `reads` of each g's n when rounded; the others left zero)."""
    d, ps = self.dense, self.page_size
    b, k, g, n = pages.shape
    flat = pages.reshape(b, k, g * n)
    c = n if self.reads is None else self.reads   # pages read of each g's n

    def read(array):
      out = jnp.zeros((b, k, g * n * ps, array.shape[-1]), array.dtype)

      def body(i, out):
        row, head = i // (k * g * c), (i // (g * c)) % k
        j = (i // c) % g * n + i % c
        page = jax.lax.dynamic_slice(array, (row, head, flat[row, head, j] * ps, 0),
                                     (1, 1, ps, array.shape[-1]))
        return jax.lax.dynamic_update_slice(out, jax.device_put(page, DEVICE),
                                            (row, head, j * ps, 0))

      return jax.lax.fori_loop(0, b * k * g * c, body, out)

    return read(d.keys), read(d.values)

  def append(self, new: NewTokens) -> "PagedLayerCache":
    """Writes the tokens at `end` (in host memory when offloaded) and raises/lowers their
    pages' bounds."""
    t = new.keys.shape[2]
    pages = (self.dense.end + jnp.arange(t)) // self.page_size                 # [T]
    valid = (new.head_positions() >= 0)[..., None]                            # [B, K, T, 1]
    keys = new.keys.astype(jnp.float32)
    stored = new
    if self.offloaded:
      put = lambda a, like: jax.device_put(a.astype(like.dtype), HOST)
      stored = NewTokens(keys=put(new.keys, self.dense.keys),
                         values=put(new.values, self.dense.values), positions=new.positions)
    return self.replace(
        dense=self.dense.append(stored),
        page_max=self.page_max.at[:, :, pages].max(jnp.where(valid, keys, -jnp.inf)),
        page_min=self.page_min.at[:, :, pages].min(jnp.where(valid, keys, jnp.inf)))

  def candidates(self, new: NewTokens) -> LayerCache:
    """Dense candidates for the next prefill chunk (paged again by the method)."""
    return self.on_device().candidates(new)

  def select(self, index):
    raise NotImplementedError("a paged cache is compacted through its dense candidates")

  def trimmed(self) -> "PagedLayerCache":
    return self

  @property
  def unit(self) -> int:
    """Slots the capacity is a multiple of: whole pages, or whole clusters."""
    return _unit(self.page_size, self.clustering)

  def _whole_units(self, room: int) -> int:
    """`room` rounded up so that the capacity after it is whole units."""
    return room + (-(self.capacity + room)) % self.unit

  def grow(self, room: int) -> "PagedLayerCache":
    return self._extended(self._whole_units(room), LayerCache.grow)

  def reserve_for(self, room: int, multiple: int) -> int:
    """The reserved slots (`reserve`) that round the capacity after `grow(room)` up to a
    multiple of `multiple` and of whole pages or clusters (`kv_cache.reserve_rooms`; none
    for a multiple of 1): the capacity follows the context's length, and each new one
    compiled the decode loop anew."""
    if multiple == 1:
      return 0
    grown = self.capacity + self._whole_units(room)
    return (-grown) % (self.unit * -(-multiple // self.unit))   # whole units, >= multiple

  def reserve(self, slots: int) -> "PagedLayerCache":
    """`slots` (whole pages) more reserved slots per head (RESERVED_POSITION: never
    attended; their pages empty, never chosen over a page with a token), only there to give
    the layer a capacity that contexts of other lengths share (appends past `end` may
    still fill them, as any slot past it)."""
    return self._extended(slots, LayerCache.reserve)

  def _extended(self, slots: int, extend) -> "PagedLayerCache":
    """`slots` (whole pages) more slots per head, added to the dense layer by `extend`, and
    their pages empty."""
    if slots == 0:
      return self
    if slots % self.unit:
      raise ValueError(f"slots={slots} must be whole pages (clusters) of {self.unit} slots")
    more = slots // self.page_size
    pad = lambda a, value: jnp.pad(a, [(0, 0), (0, 0), (0, more), (0, 0)],
                                   constant_values=value)
    dense = extend(self.on_device(), slots)
    return self.replace(dense=_moved(dense, HOST) if self.offloaded else dense,
                        page_max=pad(self.page_max, -jnp.inf),
                        page_min=pad(self.page_min, jnp.inf))


def repaged(cache, page):
  """Host side, after prefill: every layer's prompt bucket padding cut (`trimmed`), each
  paged layer rebuilt by `page(dense, layer)` from its trimmed dense layer (a method's final
  page counts; it may return the dense layer itself)."""
  return cache.replace(layers=tuple(
      page(layer.dense.trimmed(), layer) if isinstance(layer, PagedLayerCache)
      else layer.trimmed() for layer in cache.layers))


def analytic_nbytes(batch: int, kv_heads: int, slots: int, head_dim: int, page_size: int,
                    dtype, rounded_reads: bool = False) -> int:
  """A paged layer: the dense keys, values and positions plus two float32 bounds per page
  and channel, the fill counter, and the real count of `rounded_reads`."""
  itemsize = jnp.dtype(dtype).itemsize
  heads = batch * kv_heads
  return heads * slots * (2 * head_dim * itemsize + 4) + heads * (
      slots // page_size) * 2 * head_dim * 4 + 4 + (4 if rounded_reads else 0)



def read_blocks(array: jax.Array, starts: jax.Array, size: int, count=None) -> jax.Array:
  """[B, K, M * size, D] on the device: for each row, head and start [B, K, M], the `size`
  slots of keys or values [B, K, S, D] from that slot on (start + size <= S: a slice past
  the end would be moved back), copied out of host memory one dynamic slice at a time
  (XLA reads host memory by dynamic slice, not by gather). SentenceKV's sentence reads.
  count (traced, <= M): only each row's and head's first `count` blocks are read, the
  others left zero (M is a rounded-up size)."""
  b, k, m = starts.shape
  dim = array.shape[-1]
  n = m if count is None else count

  def body(i, out):
    row, head, j = i // (k * n), (i // n) % k, i % n
    block = jax.lax.dynamic_slice(array, (row, head, starts[row, head, j], 0), (1, 1, size, dim))
    return jax.lax.dynamic_update_slice(out, jax.device_put(block, DEVICE),
                                        (row, head, j * size, 0))

  return jax.lax.fori_loop(0, b * k * n, body, jnp.zeros((b, k, m * size, dim), array.dtype))
