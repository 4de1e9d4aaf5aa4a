"""Per-platform choices for Pallas kernels: interpret mode, compiler params, block sizes.

Every kernel wrapper in this package builds its `pallas_call` inside a function of a
`Target` and hands that function to `dispatch`. `dispatch` stages one branch per platform
with `jax.lax.platform_dependent`, so the choice is made when the computation is lowered,
not when it is traced. That is what makes `jax.export.export(..., platforms=["tpu"])` on a
CPU host produce the real Mosaic kernel (and `platforms=["cuda"]` the Triton one) instead of
the interpreter picked by `jax.default_backend()`.
"""

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# GPU platforms; both get Triton.
GPU_PLATFORMS = ("cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a kernel is being built for.

  Attributes:
    platform: "cpu", "tpu", "cuda" or "rocm": picks block sizes and compiler params.
    interpret: value for `pl.pallas_call(interpret=...)`: False, True, or an
      interpreter-params object such as `pltpu.InterpretParams()`.
  """
  platform: str
  interpret: Any = False

  @property
  def is_gpu(self) -> bool:
    return self.platform in GPU_PLATFORMS

  @property
  def is_tpu(self) -> bool:
    return self.platform == "tpu"

  def pick(self, *, tpu, gpu, cpu):
    """Returns the value for this platform (a block size, a row padding, ...)."""
    if self.is_tpu:
      return tpu
    if self.is_gpu:
      return gpu
    return cpu


def compiler_params(target: Target, *, dimension_semantics: Sequence[str],
                    num_warps: int = 4, num_stages: int = 2):
  """Explicit compiler params for `target`, or None when it has no compiler.

  GPU gets Triton params on purpose: in jax 0.10.2 a GPU `pallas_call` without params goes
  to Mosaic GPU, whose lowering these portable kernels are not written for.
  """
  if target.is_tpu:
    return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))
  if target.is_gpu:
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  return None


def _interpret_platform(interpret) -> str:
  # The TPU interpreter simulates TPU semantics, so it should see TPU block shapes.
  if isinstance(interpret, pltpu.InterpretParams):
    return "tpu"
  return "cpu"


def dispatch(build: Callable[[Target], Callable[..., Any]], *args, interpret=None):
  """Calls `build(target)(*args)` for the platform the computation is lowered for.

  Args:
    build: maps a `Target` to a function of `args`; every target must give results of
      the same shapes and dtypes (they are branches of one `platform_dependent`).
    *args: arrays (pytrees allowed) passed to the built function.
    interpret: None: interpret when lowered for CPU, compile for TPU (Mosaic) and
      GPU (Triton). False: always compile (lowering for CPU then fails, as Pallas has no
      CPU compiler). True or an interpreter-params object: always interpret.

  Limitation: one export for several platforms at once (`platforms=["tpu", "cuda"]`)
  fails, because JAX lowers every branch of a multi-platform conditional for every
  platform and each branch's compiler params fit only its own. Export per platform.
  """
  if interpret is not None and interpret is not False:
    return build(Target(_interpret_platform(interpret), interpret))(*args)
  compiled = {p: build(Target(p, False)) for p in ("tpu",) + GPU_PLATFORMS}
  if interpret is None:
    compiled["cpu"] = build(Target("cpu", True))
    return jax.lax.platform_dependent(*args, **compiled)
  # interpret=False: the default branch lets pallas_call itself report the CPU error.
  return jax.lax.platform_dependent(
      *args, default=build(Target("cpu", False)), **compiled)


# Small helpers shared by the kernel wrappers.


def next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_block(name: str, value: int) -> int:
  """Validates a user-given block size (a positive power of two)."""
  if not isinstance(value, int) or value <= 0 or value & (value - 1):
    raise ValueError(f"{name} must be a positive power of two, got {value!r}.")
  return value


def lane_dim(target: Target, d: int) -> int:
  """Feature width a kernel works at: GPU pads to a power of two >= 16 (Triton loads need
  power-of-two sizes and dots K, N >= 16); zero columns change no dot product."""
  return max(16, next_power_of_2(d)) if target.is_gpu else d


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class KeyTiling:
  """How a key axis of `length` slots is split: grid chunks of inner loop blocks.

  Attributes:
    block: slots per inner-loop step (a power of two).
    chunk: slots per grid program (a multiple of `block`; by default `block` times a
      power of two).
    padded: `length` rounded up to a multiple of `chunk` (wrappers pad with empty slots).
  """
  block: int
  chunk: int
  padded: int

  @property
  def num_chunks(self) -> int:
    return self.padded // self.chunk

  @property
  def blocks_per_chunk(self) -> int:
    return self.chunk // self.block


def tile_keys(target: Target, length: int, block: int | None, *,
              default_block: dict[str, int], chunk_blocks: dict[str, int],
              chunk: int | None = None) -> KeyTiling:
  """Chooses the key tiling for `target`.

  Args:
    target: the platform being built for.
    length: number of slots.
    block: user-given block size, or None for the platform default (shrunk for short
      inputs, but never below 128 on TPU, whose lane tiles are 128 wide).
    default_block, chunk_blocks: per-platform defaults, keyed "tpu", "gpu", "cpu".
    chunk: user-given slots per grid program (a multiple of `block`), or None for the
      platform's blocks per chunk.
  """
  kind = target.pick(tpu="tpu", gpu="gpu", cpu="cpu")
  if block is None:
    floor = 128 if target.is_tpu else 16
    block = min(default_block[kind], max(next_power_of_2(length), floor))
  else:
    check_block("block size", block)
  if chunk is None:
    chunk = block * min(chunk_blocks[kind], next_power_of_2(cdiv(length, block)))
  elif not isinstance(chunk, int) or chunk <= 0 or chunk % block:
    raise ValueError(f"key chunk must be a positive multiple of the block size {block}, "
                     f"got {chunk!r}.")
  return KeyTiling(block=block, chunk=chunk, padded=cdiv(max(length, 1), chunk) * chunk)


def pad_axis(x, axis: int, size: int, value=0):
  """Pads `x` along `axis` at the end up to `size` (no-op, no copy, when already there)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)
