"""The paged layer cache (Quest): every token, plus each page's element-wise key bounds.

Slots are cut into pages of `page_size` consecutive slots. Besides the dense keys and values,
each page stores the element-wise max and min of its keys (post-RoPE), per KV head. A decode
step bounds every page's logit for the new query (sum over channels of max(q * max, q * min):
no key of the page can score higher), keeps the `pages` pages with the highest bounds (and
always the page holding the newest token) and attends over their tokens only, so a decode
step reads pages * page_size keys and values however long the context is. Memory is the
dense cache's plus the bounds (2 / page_size of the keys): Quest saves bandwidth, not memory.
Prefill chunks and appended questions attend densely, as in Quest.

`gqa`: "query" picks pages per query head, as Quest's code does after `repeat_kv` (a KV head
may then be read for several page sets); "max" or "sum" reduce the bounds over each KV head's
query heads, so each KV head reads one page set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.cache.kv_cache import LayerCache, NewTokens, PerHeadSlots, Stats
from kvjax.ops import attention as attention_ops

GQA_MODES = ("query", "max", "sum")


def page_bounds(keys: jax.Array, positions: jax.Array, page_size: int):
  """(max, min) [B, K, P, D] over each page's non-empty slots (-inf / +inf when it has none).
  keys [B, K, S, D] with S a multiple of page_size."""
  b, k, s, d = keys.shape
  pages = keys.reshape(b, k, s // page_size, page_size, d).astype(jnp.float32)
  valid = (positions >= 0).reshape(b, k, s // page_size, page_size, 1)
  return (jnp.where(valid, pages, -jnp.inf).max(3), jnp.where(valid, pages, jnp.inf).min(3))


def logit_bounds(queries: jax.Array, page_max: jax.Array, page_min: jax.Array) -> jax.Array:
  """[B, K, G, P] upper bound of q . k / sqrt(D) over each page's keys; -inf for empty pages.
  queries [B, 1, H, D] (one decode token)."""
  k = page_max.shape[1]
  q = attention_ops.group_heads(queries, k)[:, :, :, 0].astype(jnp.float32)   # [B, K, G, D]
  empty = ~jnp.isfinite(page_max).all(-1)                                      # [B, K, P]
  hi = jnp.where(jnp.isfinite(page_max), page_max, 0.0)[:, :, None]          # [B, K, 1, P, D]
  lo = jnp.where(jnp.isfinite(page_min), page_min, 0.0)[:, :, None]
  qe = q[:, :, :, None, :]
  bound = jnp.maximum(qe * hi, qe * lo).sum(-1) * queries.shape[-1] ** -0.5
  return jnp.where(empty[:, :, None], -jnp.inf, bound)


@struct.dataclass
class PagedLayerCache(PerHeadSlots):
  dense: LayerCache            # every token; capacity a multiple of page_size
  page_max: jax.Array          # [B, K, P, D] float32 element-wise max of each page's keys
  page_min: jax.Array          # [B, K, P, D] float32 element-wise min
  page_size: int = struct.field(pytree_node=False, default=16)
  pages: int = struct.field(pytree_node=False, default=1)   # pages attended per decode step
  gqa: str = struct.field(pytree_node=False, default="query")

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
    return {"dense": self.dense.logical_axes(), "page_max": page, "page_min": page}

  @classmethod
  def from_dense(cls, dense: LayerCache, page_size: int, pages: int,
                 gqa: str = "query") -> "PagedLayerCache":
    """Pages over `dense` (padded with empty slots to a whole number of pages)."""
    dense = dense.replace(state=None)
    short = -dense.capacity % page_size
    end = dense.end
    dense = dense.grow(short).replace(end=end)
    page_max, page_min = page_bounds(dense.keys, dense.positions, page_size)
    return cls(dense=dense, page_max=page_max, page_min=page_min, page_size=page_size,
               pages=pages, gqa=gqa)

  def attend(self, queries, query_positions, pending: NewTokens | None = None,
             want: frozenset = frozenset()):
    if queries.shape[1] != 1 or pending is not None or want:
      return self.dense.attend(queries, query_positions, pending, want)
    return self.decode(queries, query_positions), Stats()

  def selected_slots(self, queries) -> jax.Array:
    """[B, K, G or 1, pages * page_size] slots the decode query reads: the top pages by
    `logit_bounds` and the page of the newest token."""
    bound = logit_bounds(queries, self.page_max, self.page_min)              # [B, K, G, P]
    if self.gqa != "query":
      bound = bound.max(2, keepdims=True) if self.gqa == "max" else bound.sum(2, keepdims=True)
    newest = (self.dense.end - 1) // self.page_size
    bound = bound.at[..., newest].set(jnp.inf)
    _, top = jax.lax.top_k(bound, self.pages)                                 # [B, K, g, n]
    slots = top[..., None] * self.page_size + jnp.arange(self.page_size)
    return slots.reshape(top.shape[:-1] + (-1,))

  def decode(self, queries, query_positions):
    """One new token per row over the selected pages (dense when they cover every page)."""
    d = self.dense
    if self.pages * self.page_size >= d.capacity:
      out, _ = attention_ops.decode(queries, d.keys, d.values, query_positions, d.positions)
      return out
    b, k, _, dim = d.keys.shape
    slots = self.selected_slots(queries)                                      # [B, K, g, n]
    g, n = slots.shape[2], slots.shape[3]
    flat = slots.reshape(b, k, g * n)
    take = lambda a: jnp.take_along_axis(a, flat.reshape(b, k, g * n, *([1] * (a.ndim - 3))),
                                         axis=2)
    keys, values, positions = take(d.keys), take(d.values), take(d.positions)
    # Each query head (or group) is its own "KV head" over its pages.
    keys = keys.reshape(b, k * g, n, dim)
    values = values.reshape(b, k * g, n, values.shape[-1])
    positions = positions.reshape(b, k * g, n)
    out, _ = attention_ops.decode(queries, keys, values, query_positions, positions)
    return out

  def append(self, new: NewTokens) -> "PagedLayerCache":
    """Writes the tokens at `end` and raises/lowers their pages' bounds."""
    t = new.keys.shape[2]
    pages = (self.dense.end + jnp.arange(t)) // self.page_size                 # [T]
    valid = (new.head_positions() >= 0)[..., None]                            # [B, K, T, 1]
    keys = new.keys.astype(jnp.float32)
    return self.replace(
        dense=self.dense.append(new),
        page_max=self.page_max.at[:, :, pages].max(jnp.where(valid, keys, -jnp.inf)),
        page_min=self.page_min.at[:, :, pages].min(jnp.where(valid, keys, jnp.inf)))

  def candidates(self, new: NewTokens) -> LayerCache:
    """Dense candidates for the next prefill chunk (paged again by the method)."""
    return self.dense.candidates(new)

  def select(self, index):
    raise NotImplementedError("a paged cache is compacted through its dense candidates")

  def trimmed(self) -> "PagedLayerCache":
    return self

  def grow(self, room: int) -> "PagedLayerCache":
    room += -(self.capacity + room) % self.page_size    # whole pages
    if room == 0:
      return self
    more = room // self.page_size
    pad = lambda a, value: jnp.pad(a, [(0, 0), (0, 0), (0, more), (0, 0)],
                                   constant_values=value)
    return self.replace(dense=self.dense.grow(room), page_max=pad(self.page_max, -jnp.inf),
                        page_min=pad(self.page_min, jnp.inf))


def analytic_nbytes(batch: int, kv_heads: int, slots: int, head_dim: int, page_size: int,
                    dtype) -> int:
  """A paged layer: the dense keys, values and positions plus two float32 bounds per page
  and channel, and the fill counter."""
  itemsize = jnp.dtype(dtype).itemsize
  heads = batch * kv_heads
  return heads * slots * (2 * head_dim * itemsize + 4) + heads * (
      slots // page_size) * 2 * head_dim * 4 + 4

