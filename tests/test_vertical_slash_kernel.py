"""The vertical-slash sparse prefill kernel against `reference.vertical_slash_attention`
(interpret mode on CPU). The reference is checked against a numpy restatement in
test_loopserve.py (which also runs LoopServe's sparse prefill through this kernel); export
to TPU and CUDA is in test_kernels.py's EXPORTS list."""

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

import kernel_inputs
from kernel_inputs import close

from pallas_kernels import reference
from pallas_kernels import vertical_slash as vs


def _inputs(seed, b, t, h, k, s, d, dtype, pad, lines=0.15):
  """A chunk of the last t of s positions (earlier keys before it), row r left-padded by
  pad[r] (no query and no key there); random lines."""
  rng = kernel_inputs.rng(seed)
  qpos = np.tile(np.arange(s - t, s, dtype=np.int32), (b, 1))
  kpos = np.tile(np.arange(s, dtype=np.int32), (b, k, 1))
  for row, n in enumerate(pad):
    qpos[row, :n] = -1
    kpos[row, :, s - t:s - t + n] = -1
    # Padding takes no position: the row's real tokens are renumbered after it.
    qpos[row, n:] -= n
    kpos[row, :, s - t + n:] -= n
  normal = lambda shape: jnp.asarray(rng.normal(size=shape), dtype)
  vertical = rng.random((b, h, s)) < lines
  slash = rng.random((b, h, s)) < lines
  return (normal((b, t, h, d)), normal((b, k, s, d)), normal((b, k, s, d)), jnp.asarray(qpos),
          jnp.asarray(kpos), jnp.asarray(vertical), jnp.asarray(slash))


def _most(mask):
  return int(np.asarray(mask).sum(-1).max())


CASES = {
    # One head per KV head, one tile, no earlier keys.
    "g1_f32": dict(b=1, t=40, h=2, k=2, s=40, d=16, dtype=jnp.float32, pad=(0,), block_q=None),
    # GQA (group 3), several tiles, earlier keys, left padding in row 1.
    "g3_tiles_f32": dict(b=2, t=45, h=6, k=2, s=70, d=16, dtype=jnp.float32, pad=(0, 9),
                         block_q=16),
    "g2_bf16": dict(b=2, t=33, h=4, k=2, s=50, d=32, dtype=jnp.bfloat16, pad=(5, 0),
                    block_q=16),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(name):
  case = dict(CASES[name])
  dtype, block_q = case.pop("dtype"), case.pop("block_q")
  args = _inputs(3, dtype=dtype, **case)
  nv, ns = _most(args[5]), _most(args[6])
  got = vs.vertical_slash_attention(*args, nv, ns, block_q=block_q)
  want = reference.vertical_slash_attention(*args, nv, ns)
  real = np.asarray(args[3]) >= 0
  close(np.asarray(got, np.float32)[real], np.asarray(want, np.float32)[real], dtype)
  assert not np.asarray(got)[~real].any()   # padding queries: 0


def test_lines_beyond_the_cap_are_dropped_as_in_the_reference():
  """More lines chosen than max_vertical / max_slash: the first chosen ones by index are
  attended (a slash key on a dropped vertical line stays unattended, as the reference)."""
  args = _inputs(5, 1, 30, 4, 2, 30, 16, jnp.float32, (0,), lines=0.4)
  nv, ns = _most(args[5]), _most(args[6])
  assert nv > 4 and ns > 3
  got = vs.vertical_slash_attention(*args, 4, 3, block_q=16)
  close(got, reference.vertical_slash_attention(*args, 4, 3), jnp.float32)
  assert not np.allclose(np.asarray(got), np.asarray(
      reference.vertical_slash_attention(*args, nv, ns)), atol=1e-3)


def test_every_line_is_dense_attention():
  """All vertical lines (or all slash lines) chosen: causal attention over every key."""
  q, keys, values, qpos, kpos, _, _ = _inputs(7, 2, 24, 4, 2, 40, 16, jnp.float32, (0, 6))
  every = jnp.ones((2, 4, 40), bool)
  want = reference.attention(q, keys, values, qpos, kpos)
  for vertical, slash in ((every, ~every), (~every, every), (every, every)):
    got = vs.vertical_slash_attention(q, keys, values, qpos, kpos, vertical, slash, 40, 40,
                                      block_q=16)
    real = np.asarray(qpos) >= 0
    close(np.asarray(got)[real], np.asarray(want)[real], jnp.float32)


def test_queries_out_of_line_see_their_vertical_lines_only():
  """The kernel's contract: a row's real queries at consecutive positions. In a row whose
  positions jump, the queries on the line of the largest position-minus-index are
  attended as usual; the others see their vertical lines only (slash keys are read along
  the line, not gathered per query)."""
  q, keys, values, qpos, kpos, vertical, slash = _inputs(9, 1, 20, 2, 1, 40, 16,
                                                         jnp.float32, (0,))
  qpos = jnp.asarray(np.r_[np.arange(0, 10), np.arange(25, 35)][None].astype(np.int32))
  nv, ns = _most(vertical), _most(slash)
  got = np.asarray(vs.vertical_slash_attention(q, keys, values, qpos, kpos, vertical, slash,
                                               nv, ns, block_q=16))
  want = np.asarray(reference.vertical_slash_attention(q, keys, values, qpos, kpos, vertical,
                                                       slash, nv, ns))
  vertical_only = np.asarray(reference.vertical_slash_attention(
      q, keys, values, qpos, kpos, vertical, jnp.zeros_like(slash), nv, ns))
  close(got[:, 10:], want[:, 10:], jnp.float32)
  close(got[:, :10], vertical_only[:, :10], jnp.float32)
  assert not np.allclose(want[:, :10], vertical_only[:, :10], atol=1e-3)


def test_tpu_interpreter():
  """TPU semantics (SMEM offsets and tile starts, 128-row tiles, D = 128)."""
  args = _inputs(11, 1, 150, 4, 2, 300, 128, jnp.float32, (0,), lines=0.05)
  nv, ns = _most(args[5]), _most(args[6])
  got = vs.vertical_slash_attention(*args, nv, ns, interpret=pltpu.InterpretParams())
  close(got, reference.vertical_slash_attention(*args, nv, ns), jnp.float32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_vertical=0, max_slash=2), "max_vertical=0 must be an int in"),
    (dict(max_vertical=2, max_slash=41), "max_slash=41 must be an int in"),
    (dict(max_vertical=2, max_slash=2, block_q=24), "block_q must be a positive power"),
])
def test_rejects_bad_arguments(kwargs, match):
  args = _inputs(0, 1, 8, 2, 1, 40, 16, jnp.float32, (0,))
  with pytest.raises(ValueError, match=match):
    vs.vertical_slash_attention(*args, **kwargs)


def test_rejects_line_masks_of_another_shape():
  q, keys, values, qpos, kpos, vertical, slash = _inputs(0, 1, 8, 2, 1, 40, 16, jnp.float32,
                                                         (0,))
  with pytest.raises(ValueError, match="vertical and slash must be"):
    vs.vertical_slash_attention(q, keys, values, qpos, kpos, vertical[:, :, :20], slash, 2, 2)
