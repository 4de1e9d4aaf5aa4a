"""KV quantization methods: KIVI, alone or on top of any token-selecting method."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kvjax.cache.quantized import QuantizedLayerCache
from kvjax.methods import base, registry, storage

_BITS = (2, 4, 8)


@registry.register
@dataclasses.dataclass(frozen=True)
class KIVI(storage.PressedStorage):
  """KIVI: keys quantized per channel (groups of `group_size` tokens), values per token
  (groups of `group_size` channels), asymmetric `bits`-bit codes, the newest `residual`
  tokens kept in full precision and flushed into the quantized part group by group.

  Defaults from KIVI's LongBench setup: group 32, residual 128 (its example script uses
  32); 2 bits is KIVI-2, 4 bits the README's choice for GQA models. Quantization is
  post-RoPE. `press`: a token-selecting method applied first (SnapKV + KIVI keeps the
  selected tokens, quantized), which then needs a compression_ratio or budget.
  """
  name: ClassVar[str] = "kivi"
  family: ClassVar[str] = "quantization"
  bits: int = 2
  group_size: int = 32
  residual: int = 128
  press: base.Method | str | None = None

  def __post_init__(self):
    base.check_choice("bits", self.bits, _BITS)
    base.check_int("group_size", self.group_size, 1)
    if self.group_size & (self.group_size - 1):
      raise base.MethodError(f"group_size={self.group_size} must be a power of two")
    base.check_int("residual", self.residual, 0)
    self.resolve_press()

  def compact(self, cand, x, keep):
    """Selects with the press (if any), then quantizes all but the newest slots. Without a
    press every candidate is kept, so chunked prefill re-quantizes the same groups (the
    min/max of a dequantized group are its own scale and zero: the codes come back)."""
    self.check_head_dim(cand.keys.shape[-1])
    kept = self.kept(cand, x, keep)
    return QuantizedLayerCache.from_dense(kept, self.bits, self.group_size, self.residual)

  @property
  def compacts_ranked(self):
    # Not for a subclass that compacts otherwise.
    return (type(self).compact is KIVI.compact and self.press is not None
            and self.press.compacts_ranked)

  def compact_ranked(self, cand, x, largest, keep):
    """`compact` at a traced `keep`, at the shapes of a budget of `largest`: the press's
    ranked selection, quantized as `from_dense` would its first `keep` slots; the caller
    cuts the rest (`QuantizedLayerCache.first_slots`)."""
    self.check_head_dim(cand.keys.shape[-1])
    kept = self.press.compact_ranked(cand, x, largest, keep)
    return QuantizedLayerCache.from_dense_prefix(kept, keep, self.bits, self.group_size,
                                                 self.residual)

  def check_head_dim(self, head_dim: int) -> None:
    if head_dim % self.group_size or head_dim * self.bits % 32:
      raise base.MethodError(f"kivi group_size={self.group_size}, bits={self.bits} need a "
                             f"head_dim that is a multiple of the group and of "
                             f"{32 // self.bits}; the model's head_dim is {head_dim}")
