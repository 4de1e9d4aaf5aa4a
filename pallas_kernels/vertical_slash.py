"""Vertical-slash sparse attention for prefill (LoopServe's, after MInference's pattern).

Each query head attends only over its chosen lines: vertical lines (key positions every
query of the head reads) and slash lines (offsets o: query position p reads key position
p - o), each key once, causal. Semantics are `reference.vertical_slash_attention`'s.

What runs where:
  * XLA scatters each KV head's keys and values into position order (slot p holds key
    position p; positions are below S, one prompt's cache), padded by one query tile on
    both sides, gathers each head's vertical keys (at most `max_vertical`, a dense block)
    and lists its slash offsets (at most `max_slash`).
  * The kernel, grid (B, H, query tiles), runs an online softmax first over the tile's
    vertical block (one product), then over the slash offsets one at a time: for offset o
    the tile's keys are the contiguous positions [p0 - o, p0 - o + tile) of the
    position-ordered keys (p0 the tile's first position), one row-wise product each. It
    reads tile x (vertical + slash) keys per head, never tile x S.
  * Contract: a row's real queries hold consecutive positions in row order (a prefill
    chunk continuing a sequence after left padding: kvjax's prefill). A query out of that
    line sees its vertical lines only.
  * TPU has two variants of the kernel (`kv_in_hbm`), same semantics:
    - VMEM-resident (`_kernel`): a KV head's position-ordered keys, values and slash mask
      are whole VMEM blocks, double-buffered: about 2 KiB per position at D = 128
      bfloat16 (the [P, 1] mask is lane-padded), so it fits 16 MiB of scoped VMEM up to
      about 6.7K positions (f32: 3.8K).
    - Keys in HBM (`_hbm_kernel`): the position-ordered keys, values and mask stay in HBM
      (`pl.ANY`); for each slash offset the kernel copies the run it reads into a two-
      slot VMEM buffer (`pltpu.make_async_copy`, one DMA semaphore per array and slot),
      starting offset j + 1's copy before waiting for and computing offset j, and offset
      0's before the vertical block. A copy starts at a multiple of 16 rows (a sublane
      tile) and moves a tile plus 16 rows; the run is then read at its offset inside the
      buffer. VMEM use no longer grows with S (about 1.6 MiB at D = 128 bfloat16 and
      1K vertical lines, most of it the vertical block), which lifts the ~7K limit;
      each tile reads (tile + 16) x D keys and values per slash offset from HBM.
    The automatic choice (`kv_in_hbm=None`) takes HBM when `resident_vmem_bytes` (the
    resident variant's double-buffered blocks) exceeds `VMEM_BUDGET` (14 MiB: 16 MiB of
    default scoped VMEM on v4 / v5e less 2 MiB for temporaries); `keys_in_hbm` says which.
    Both export to Mosaic at 32K positions, and the HBM one matches the reference under
    the TPU interpreter (`pltpu.InterpretParams()`: DMAs, semaphores, race detection);
    neither has run on a TPU yet.
  * GPU reads the position-ordered keys from global memory (one kernel; `kv_in_hbm` is
    ignored there and in the CPU interpreter).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend
from pallas_kernels.decode_attention import (_NEG, key_block, online_softmax_result,
                                             online_softmax_start, online_softmax_step)
from pallas_kernels.flash_attention import check_prefill_args

# Queries per program (rows; one head per program).
_BLOCK_Q = {"tpu": 128, "gpu": 64, "cpu": 32}
_NUM_WARPS = 4
_NUM_STAGES = 2
# Vertical lines per product on TPU.
_BLOCK_V_TPU = 128
# HBM variant: copies start at a multiple of this many rows and move this many more than a
# tile (the sublane tile of 16-bit types; 32-bit ones have 8), so no copy starts mid-tile.
_ALIGN = 16
# Automatic TPU choice: the VMEM-resident kernel when its blocks fit in this many bytes
# (16 MiB of default scoped VMEM on v4 / v5e, less 2 MiB for the kernel's temporaries).
VMEM_BUDGET = 14 * 2**20
# A vertical line's position where there is none: no query reaches it.
_NO_LINE = jnp.iinfo(jnp.int32).max


def _precision(dtype):
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _slash_step(carry, s, seen, vals):
  """One key per row (a slash offset) folded into the online softmax: s, seen [R, 1]."""
  m, l, acc = carry
  s = jnp.where(seen, s, _NEG)
  m_new = jnp.maximum(m, s)
  p = jnp.where(seen, jnp.exp(s - m_new), 0.0)
  alpha = jnp.exp(m - m_new)
  return m_new, alpha * l + p, alpha * acc + p * vals.astype(jnp.float32)


def _vertical(q, qpos, vk_ref, vv_ref, vpos_ref, *, block_q, block_v, scale):
  """The online softmax over the tile's vertical block: (max, sum, acc) after it."""
  precision = _precision(q.dtype)

  def vertical_block(i, carry):
    # block_v lines at a time: one product per block, not one [R, NV] tile (shared memory).
    at = pl.multiple_of(i * block_v, block_v)
    s, vpos, vals = key_block(q, vk_ref, vv_ref, vpos_ref, at, block_v, scale, precision)
    full_qpos = jnp.broadcast_to(qpos, s.shape)
    return online_softmax_step(carry, s, (vpos <= full_qpos) & (full_qpos >= 0), vals,
                               precision)

  return lax.fori_loop(0, vk_ref.shape[0] // block_v, vertical_block,
                       online_softmax_start(block_q, q.shape[-1]))


def _slash_window(first, o, last):
  """Offset o's keys for a tile whose first row is at index `first` of the position-
  ordered keys: (begin, at), begin = first - o the run's first index, `at` it clamped into
  [0, last] (a run that starts elsewhere is masked: at != begin)."""
  begin = first - o
  return begin, jnp.minimum(jnp.maximum(begin, 0), last)


def _slash_update(carry, qf, qpos, in_line, o, begin, at, keys, vals, ok, scale):
  """Offset o folded in: keys, vals [R, D] and ok [R, 1] the run read at index `at`."""
  logits = jnp.sum(qf * keys.astype(jnp.float32), axis=1, keepdims=True) * scale
  seen = ((ok > 0) & (qpos == in_line) & (qpos >= 0) & (in_line - o >= 0) & (at == begin))
  return _slash_step(carry, logits, seen, vals)


def _kernel(start_ref, count_ref, offset_ref, q_ref, qpos_ref, vk_ref, vv_ref, vpos_ref,
            k_ref, v_ref, ok_ref, o_ref, *, block_q, block_v, front, scale):
  """Refs (squeezed): start [1, tiles] int32 (each tile's first row's index into the
  position-ordered keys at offset 0), count [1, 1] (the head's slash lines), offset
  [1, ns] int32 (its chosen offsets first), q [R, D], qpos [R, 1], vertical keys/values
  [NV, D] and positions [1, NV] (_NO_LINE: none), position-ordered keys/values [P, D] and
  ok [P, 1] (1: a key there that no vertical line has)."""
  tile = pl.program_id(2)
  q = q_ref[...]
  qpos = qpos_ref[...]
  carry = _vertical(q, qpos, vk_ref, vv_ref, vpos_ref, block_q=block_q, block_v=block_v,
                    scale=scale)

  first = start_ref[0, tile]
  # Position each row holds if it is in line with the tile's first row.
  in_line = lax.broadcasted_iota(jnp.int32, (block_q, 1), 0) + (first - front)
  qf = q.astype(jnp.float32)
  last = k_ref.shape[0] - block_q

  def slash_line(j, carry):
    o = offset_ref[0, j]
    begin, at = _slash_window(first, o, last)
    rows = pl.ds(at, block_q)
    return _slash_update(carry, qf, qpos, in_line, o, begin, at, k_ref[rows, :],
                         v_ref[rows, :], ok_ref[rows, :], scale)

  m, l, acc = lax.fori_loop(0, count_ref[0, 0], slash_line, carry)
  out, _ = online_softmax_result(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)


def _hbm_kernel(start_ref, count_ref, offset_ref, q_ref, qpos_ref, vk_ref, vv_ref, vpos_ref,
                k_hbm, v_hbm, ok_hbm, o_ref, k_buf, v_buf, ok_buf, sems, *, block_q, block_v,
                front, scale, group, last):
  """`_kernel` with the position-ordered keys, values and ok left in HBM (TPU only).

  k_hbm, v_hbm [B, K, P', D] and ok_hbm [B, H, P', 1] are whole arrays (P' = P + _ALIGN).
  Offset j's run [begin, begin + R) is copied as the aligned rows [base, base + R +
  _ALIGN) (base = at rounded down to _ALIGN) into slot j % 2 of the VMEM buffers k_buf,
  v_buf [2, R + _ALIGN, D] and ok_buf [2, R + _ALIGN, 1]; sems [3, 2] are their DMA
  semaphores. Offset 0's copy starts before the vertical block and runs under it; offset
  j + 1's starts before offset j is waited for and computed.
  """
  b, h, tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kv = lax.div(h, group)
  first = start_ref[0, tile]
  count = count_ref[0, 0]

  def window(j):
    o = offset_ref[0, j]
    begin, at = _slash_window(first, o, last)
    base = pl.multiple_of(at - lax.rem(at, _ALIGN), _ALIGN)   # at >= 0
    return o, begin, at, base

  def copies(j, slot):
    rows = pl.ds(window(j)[3], block_q + _ALIGN)
    return [pltpu.make_async_copy(src.at[b, head, rows], buf.at[slot], sems.at[i, slot])
            for i, (src, head, buf) in enumerate(((k_hbm, kv, k_buf), (v_hbm, kv, v_buf),
                                                  (ok_hbm, h, ok_buf)))]

  @pl.when(count > 0)
  def _():
    for copy in copies(0, 0):
      copy.start()

  q = q_ref[...]
  qpos = qpos_ref[...]
  carry = _vertical(q, qpos, vk_ref, vv_ref, vpos_ref, block_q=block_q, block_v=block_v,
                    scale=scale)
  in_line = lax.broadcasted_iota(jnp.int32, (block_q, 1), 0) + (first - front)
  qf = q.astype(jnp.float32)

  def slash_line(j, carry):
    slot = lax.rem(j, 2)

    @pl.when(j + 1 < count)
    def _():
      for copy in copies(j + 1, 1 - slot):
        copy.start()

    for copy in copies(j, slot):
      copy.wait()
    o, begin, at, base = window(j)
    rows = pl.ds(at - base, block_q)
    return _slash_update(carry, qf, qpos, in_line, o, begin, at, k_buf[slot, rows, :],
                         v_buf[slot, rows, :], ok_buf[slot, rows, :], scale)

  m, l, acc = lax.fori_loop(0, count, slash_line, carry)
  out, _ = online_softmax_result(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)


def _tile_bytes(rows: int, cols: int, itemsize: int) -> int:
  """VMEM bytes of a [rows, cols] buffer: TPU pads rows to the sublane tile (8 rows of 32
  bits) and columns to 128 lanes."""
  sublanes = 8 * max(1, 4 // itemsize)
  return backend.cdiv(rows, sublanes) * sublanes * backend.cdiv(cols, 128) * 128 * itemsize


def resident_vmem_bytes(t: int, s: int, d: int, dtype, max_vertical: int,
                        block_q: int | None = None) -> int:
  """VMEM the TPU kernel with VMEM-resident keys needs (every block double-buffered):
  its position-ordered keys, values and ok mask ([S + 2 R] rows each; the [P, 1] int32 mask
  is lane-padded to 512 bytes a row) dominate, next to the query tile, the vertical block
  and the output tile."""
  r, nv = _tpu_blocks(t, max_vertical, block_q)
  size = jnp.dtype(dtype).itemsize
  positions = s + 2 * r
  per_step = (2 * _tile_bytes(r, d, size)             # queries, output
              + _tile_bytes(r, 1, 4)                  # query positions
              + 2 * _tile_bytes(nv, d, size)          # vertical keys, values
              + _tile_bytes(1, nv, 4)                 # vertical positions
              + 2 * _tile_bytes(positions, d, size)   # position-ordered keys, values
              + _tile_bytes(positions, 1, 4))         # ok
  return 2 * per_step


def keys_in_hbm(t: int, s: int, d: int, dtype, max_vertical: int,
                block_q: int | None = None) -> bool:
  """The automatic TPU choice (`kv_in_hbm=None`): keys, values and ok stay in HBM when the
  VMEM-resident kernel would need more than `VMEM_BUDGET` bytes."""
  return resident_vmem_bytes(t, s, d, dtype, max_vertical, block_q) > VMEM_BUDGET


def _tpu_blocks(t, max_vertical, block_q):
  """TPU (query rows per program, vertical lines padded to a multiple of block_v)."""
  r = block_q or min(_BLOCK_Q["tpu"], max(backend.next_power_of_2(t), 16))
  return r, backend.cdiv(max_vertical, _BLOCK_V_TPU) * _BLOCK_V_TPU


def _impl(queries, keys, values, query_positions, key_positions, vertical, slash, *, target,
          max_vertical, max_slash, block_q, kv_in_hbm):
  b, t, h, d = queries.shape
  k, s = keys.shape[1], keys.shape[2]
  g = h // k
  kind = target.pick(tpu="tpu", gpu="gpu", cpu="cpu")
  r = block_q or min(_BLOCK_Q[kind], max(backend.next_power_of_2(t), 16))
  nt = backend.cdiv(t, r)
  tp, dp = nt * r, backend.lane_dim(target, d)
  # Keys in HBM with manual copies: a TPU choice only (GPU reads global memory anyway).
  if kv_in_hbm is None:
    kv_in_hbm = keys_in_hbm(t, s, d, keys.dtype, max_vertical, block_q)
  hbm = target.is_tpu and kv_in_hbm
  # Position-ordered keys, one tile of padding before and after (slash keys of a tile's
  # first rows start before position 0; a last tile's padding rows run past S): the slot
  # of each position is scattered once and keys and values gathered by it (a position no
  # slot holds reads slot 0, masked).
  # Left in HBM, they get _ALIGN more rows (unheld), so every aligned copy stays inside.
  front, positions = r, s + 2 * r
  length = positions + (_ALIGN if hbm else 0)
  rows, kvs = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
  where = jnp.where((key_positions >= 0) & (key_positions < s), key_positions + front,
                    length)
  slot_at = jnp.full((b, k, length), -1, jnp.int32).at[rows, kvs, where].set(
      jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), key_positions.shape), mode="drop")
  held = slot_at >= 0
  by_position = lambda a: backend.pad_axis(
      jnp.take_along_axis(a, jnp.maximum(slot_at, 0)[..., None], 2), 3, dp)
  pk, pv = by_position(keys), by_position(values)

  # Vertical lines: the chosen key positions (held ones only), a dense block per head,
  # attended block_v lines at a time (padded to a multiple of it).
  block_v = {"tpu": _BLOCK_V_TPU,
             "gpu": min(64, max(16, backend.next_power_of_2(max_vertical))),
             "cpu": min(32, backend.next_power_of_2(max_vertical))}[kind]
  nv = backend.cdiv(max_vertical, block_v) * block_v
  chosen, vpos = lax.top_k(vertical.astype(jnp.float32), max_vertical)  # [B, H, max_vertical]
  per_kv = lambda a: a.reshape(b, k, g * max_vertical)
  take = lambda a: jnp.take_along_axis(a, per_kv(vpos + front)[..., None], 2).reshape(
      b, h, max_vertical, dp)
  vk, vv = take(pk), take(pv)
  vheld = jnp.take_along_axis(held, per_kv(vpos + front), 2).reshape(b, h, max_vertical)
  vline = jnp.where((chosen > 0) & vheld, vpos, _NO_LINE).astype(jnp.int32)
  vk, vv = backend.pad_axis(vk, 2, nv), backend.pad_axis(vv, 2, nv)
  vline = backend.pad_axis(vline, 2, nv, _NO_LINE)

  # Slash lines: the chosen offsets, first (top_k of a mask keeps them first, in index
  # order), and how many; their keys must not be on a vertical line.
  schosen, offsets = lax.top_k(slash.astype(jnp.float32), max_slash)    # [B, H, max_slash]
  counts = jnp.sum(schosen > 0, axis=-1, dtype=jnp.int32)[:, :, None, None]
  on_vertical = jnp.pad(vertical, ((0, 0), (0, 0), (front, length - front - s)))
  ok = (jnp.repeat(held, g, axis=1) & ~on_vertical).astype(jnp.int32)[..., None]

  # Each tile's first row's index at offset 0: where its row's line of positions puts it
  # (a row's real queries are consecutive; padding rows follow the line).
  qpos = backend.pad_axis(query_positions.astype(jnp.int32), 1, tp, -1)
  line = jnp.max(jnp.where(qpos >= 0, qpos - jnp.arange(tp), -tp), axis=1)     # [B]
  line = jnp.where(jnp.any(qpos >= 0, axis=1), line, 0)
  start = (line[:, None] + jnp.arange(nt) * r + front).astype(jnp.int32)[:, None, :]

  q = backend.pad_axis(backend.pad_axis(queries.transpose(0, 2, 1, 3), 3, dp), 2, tp)
  smem = dict(memory_space=pltpu.SMEM) if target.is_tpu else {}
  # lax.div: a program id is never negative, and floor division does not lower on TPU.
  kv_of = lambda i, j, u: (i, lax.div(j, g), 0, 0)
  in_specs = [pl.BlockSpec((None, 1, nt), lambda i, j, u: (i, 0, 0), **smem),
              pl.BlockSpec((None, None, 1, 1), lambda i, j, u: (i, j, 0, 0), **smem),
              pl.BlockSpec((None, None, 1, max_slash), lambda i, j, u: (i, j, 0, 0), **smem),
              pl.BlockSpec((None, None, r, dp), lambda i, j, u: (i, j, u, 0)),
              pl.BlockSpec((None, r, 1), lambda i, j, u: (i, u, 0)),
              pl.BlockSpec((None, None, nv, dp), lambda i, j, u: (i, j, 0, 0)),
              pl.BlockSpec((None, None, nv, dp), lambda i, j, u: (i, j, 0, 0)),
              pl.BlockSpec((None, None, 1, nv), lambda i, j, u: (i, j, 0, 0))]
  kwargs = dict(block_q=r, block_v=block_v, front=front, scale=d ** -0.5)
  if hbm:
    kernel = functools.partial(_hbm_kernel, group=g, last=positions - r, **kwargs)
    in_specs += [pl.BlockSpec(memory_space=pl.ANY)] * 3
    scratch = [pltpu.VMEM((2, r + _ALIGN, dp), pk.dtype),
               pltpu.VMEM((2, r + _ALIGN, dp), pv.dtype),
               pltpu.VMEM((2, r + _ALIGN, 1), jnp.int32),
               pltpu.SemaphoreType.DMA((3, 2))]
  else:
    kernel = functools.partial(_kernel, **kwargs)
    in_specs += [pl.BlockSpec((None, None, positions, dp), kv_of),
                 pl.BlockSpec((None, None, positions, dp), kv_of),
                 pl.BlockSpec((None, None, positions, 1), lambda i, j, u: (i, j, 0, 0))]
    scratch = []
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b, h, tp, dp), queries.dtype),
      grid=(b, h, nt),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, r, dp), lambda i, j, u: (i, j, u, 0)),
      scratch_shapes=scratch,
      interpret=target.interpret,
      compiler_params=backend.compiler_params(
          target, dimension_semantics=("parallel",) * 3, num_warps=_NUM_WARPS,
          num_stages=_NUM_STAGES),
      name="vertical_slash_attention_hbm" if hbm else "vertical_slash_attention",
  )(start, counts, offsets.astype(jnp.int32)[:, :, None, :], q, qpos[:, :, None], vk, vv,
    vline[:, :, None, :], pk, pv, ok)
  return out[:, :, :t, :d].transpose(0, 2, 1, 3)


def _check(cond, message):
  if not cond:
    raise ValueError(message)


@functools.partial(jax.jit, static_argnames=("max_vertical", "max_slash", "block_q",
                                             "kv_in_hbm", "interpret"))
def vertical_slash_attention(queries, keys, values, query_positions, key_positions, vertical,
                             slash, max_vertical: int, max_slash: int, *, block_q=None,
                             kv_in_hbm=None, interpret=None):
  """Causal attention of every query over its head's chosen lines only.

  Args:
    queries: [B, T, H, D] post-RoPE; head `k*G + g` reads KV head `k`.
    keys, values: [B, K, S, D]; key_positions [B, K, S] int32 (negative: empty), every
      position below S (one prompt).
    query_positions: [B, T] int32 (negative: padding, output 0); a row's real queries at
      consecutive positions (see the module's contract).
    vertical: [B, H, S] bool, the chosen key positions; slash: [B, H, S] bool, the chosen
      offsets (query position - key position).
    max_vertical, max_slash: lines attended per head (the first chosen ones by index when
      a head chose more; choose at most these).
    block_q: queries per program, a power of two; None picks per platform.
    kv_in_hbm: TPU only (compiled or `pltpu.InterpretParams()`; GPU and CPU ignore it):
      True leaves the position-ordered keys, values and ok mask in HBM and copies each
      slash offset's run into VMEM; False holds them in VMEM per KV head; None (default)
      chooses HBM when `keys_in_hbm` says the VMEM-resident blocks exceed `VMEM_BUDGET`.
    interpret: see `backend.dispatch`.
  Returns:
    [B, T, H, D] in the queries' dtype: `reference.vertical_slash_attention`.
  """
  check_prefill_args(queries, keys, values, query_positions, key_positions)
  b, h, s = queries.shape[0], queries.shape[2], keys.shape[2]
  _check(vertical.shape == (b, h, s) and slash.shape == (b, h, s),
         f"vertical and slash must be {(b, h, s)}, got {vertical.shape} and {slash.shape}")
  for name, value in (("max_vertical", max_vertical), ("max_slash", max_slash)):
    _check(isinstance(value, int) and 1 <= value <= s,
           f"{name}={value!r} must be an int in [1, S={s}]")
  if block_q is not None:
    backend.check_block("block_q", block_q)
  _check(kv_in_hbm is None or isinstance(kv_in_hbm, bool),
         f"kv_in_hbm must be None or a bool, got {kv_in_hbm!r}")

  def build(target):
    return functools.partial(_impl, target=target, max_vertical=max_vertical,
                             max_slash=max_slash, block_q=block_q, kv_in_hbm=kv_in_hbm)

  return backend.dispatch(build, queries, keys, values, query_positions, key_positions,
                          vertical.astype(bool), slash.astype(bool), interpret=interpret)
