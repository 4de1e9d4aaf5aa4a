"""GEAR: KIVI quantization plus a sparse outlier matrix plus a low-rank residual."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvjax.cache.gear import GearLayerCache
from kvjax.methods import base, registry, storage

_BITS = (2, 4, 8)
_MAX_OUTLIER_RATIO = 0.5


@registry.register
@dataclasses.dataclass(frozen=True)
class GEAR(storage.PressedStorage):
  """GEAR (Kang et al., 2024): X ~= put(deq(Q(X - S)), S) + A B^T for keys and values.

  Q is KIVI's quantizer (keys per channel in groups of `group_size` tokens, values per token
  in groups of `group_size` channels, asymmetric `bits`-bit codes); S keeps, per vector,
  the ceil(outlier_ratio * length / 2) largest and as many smallest entries exactly (keys:
  per channel over the block's tokens; values: per token over the head's channels); A B^T
  is a rank-`rank` fit of what remains, by `loops` power iterations in float32 with QR at
  the last one (`kvjax.ops.gear`). The prompt's compressed slots form one block with rank
  `rank`; decode tokens wait in a full-precision buffer and are compressed `group_size` at
  a time with rank `decode_rank`; the newest `residual` tokens (plus up to group_size - 1
  not yet flushed, or up to group_size at a decode step without a residual) stay exact.
  Everything is stored and counted in the cache's bytes (`kvjax.cache.gear`).

  Defaults: GEAR's GEAR-KIVI runs in HaoKang-Timmy/GEAR
  (GenerationBench/GenerationTest/run_template_llama-3-8b.sh at efe0bfe: --quantize_bit 2
  --group_size 64 --prefillrank 4 --rank 2 --loop 3 --left 0.02 --streaming_gap 64), and
  its compress_function.py (outliers replaced by the vector's mean before quantizing, the
  residual taken against the quantized block with outliers put back, the power iteration).
  Departures, each a choice the repository leaves open or gets wrong:
  * residual=0 with flushes of group_size tokens reproduces GEAR's streaming buffer (the
    prompt's last T mod 64 tokens stay fp16, and a decode step attends 1..64 fp16 tokens)
    because its gap and its group are both 64: the repository compresses the past's last
    64 tokens when the past's length is a multiple of 64, before appending the step's
    token (GEARLM/Simulated/modeling_llama_new.py, LlamaSdpaAttention.forward), so a full
    buffer is compressed at the step after it filled, never with that step's own token.
    residual > 0 adds KIVI's always-exact recent window.
  * Outlier counts are ceil(ratio * length / 2) per side of each vector of one KV head.
    The repository counts int(ratio * H * D / 2) per side for every vector, for keys too,
    whatever the vector's length (so a 64-token key group keeps ~31% of its entries at
    Llama-3-8B's shape), and its value vectors span all heads' channels. Per head with
    rounding up, a SmolLM2 value head (head_dim 64) keeps 1 + 1 of 64 entries (3.1%).
  * The power iteration starts from U[0, 1) drawn from a fixed key (the repository draws
    a fresh torch.rand each call), so results are reproducible.
  * SmolLM2's head_dim 64 equals group 64: a value token is one quantization group.
  `press`: a token-selecting method applied first (SnapKV + GEAR), which then needs a
  compression_ratio or budget, as with KIVI. Chunked prefill recompresses the earlier
  chunks' reconstruction together with the new chunk (compaction sees dense candidates),
  so a chunked prompt stores an approximation of an approximation.
  """
  name: ClassVar[str] = "gear"
  family: ClassVar[str] = "quantization"
  bits: int = 2
  group_size: int = 64
  rank: int = 4
  decode_rank: int = 2
  loops: int = 3
  outlier_ratio: float = 0.02
  residual: int = 0
  press: base.Method | str | None = None

  def __post_init__(self):
    base.check_choice("bits", self.bits, _BITS)
    base.check_int("group_size", self.group_size, 1)
    if self.group_size & (self.group_size - 1):
      raise base.MethodError(f"group_size={self.group_size} must be a power of two")
    base.check_int("rank", self.rank, 0)
    base.check_int("decode_rank", self.decode_rank, 0, self.group_size)
    base.check_int("loops", self.loops, 1)
    base.check_number("outlier_ratio", self.outlier_ratio, 0, _MAX_OUTLIER_RATIO,
                      what="the fraction of each vector kept as sparse outliers")
    base.check_int("residual", self.residual, 0)
    self.resolve_press()

  def compact(self, cand, x, keep):
    """Selects with the press (if any), then compresses all but the newest slots."""
    self.check_head_dim(cand.keys.shape[-1])
    kept = self.kept(cand, x, keep)
    return GearLayerCache.from_dense(
        kept, bits=self.bits, group=self.group_size, window=self.residual, rank=self.rank,
        decode_rank=self.decode_rank, loops=self.loops, outlier_ratio=self.outlier_ratio)

  def check_head_dim(self, head_dim: int) -> None:
    if head_dim % self.group_size or head_dim * self.bits % 32:
      raise base.MethodError(f"gear group_size={self.group_size}, bits={self.bits} need a "
                             f"head_dim that is a multiple of the group and of "
                             f"{32 // self.bits}; the model's head_dim is {head_dim}")
    for name, rank in (("rank", self.rank), ("decode_rank", self.decode_rank)):
      if rank > head_dim:
        raise base.MethodError(f"gear {name}={rank} must be in [0, head_dim={head_dim}]")
