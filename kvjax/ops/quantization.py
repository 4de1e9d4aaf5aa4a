"""KV quantization (KIVI's format): the Pallas kernels on GPU/TPU, their jnp definitions on CPU.

The format (min/max codes, bit-packing, scale and zero shapes) is defined in
`pallas_kernels.quantization`.
"""

from __future__ import annotations

from kvjax.ops.dispatch import use_pallas
from pallas_kernels import quantization as kernels
from pallas_kernels import reference


def quantize(x, *, bits: int, group: int, axis: str, valid=None, scale_dtype=None):
  """x [..., S, D] -> (codes uint32 [..., S, D * bits // 32], scale, zero)."""
  # An empty part (a prompt shorter than the residual window) has nothing to launch.
  fn = kernels.quantize_pack if use_pallas() and x.shape[-2] > 0 else kernels.quantize
  return fn(x, bits=bits, group=group, axis=axis, valid=valid, scale_dtype=scale_dtype)


def dequantize(codes, scale, zero, *, bits: int, group: int, axis: str, dtype):
  return kernels.dequantize(codes, scale, zero, bits=bits, group=group, axis=axis, dtype=dtype)


def decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale,
                     value_zero, key_positions, query_positions, *, bits: int, group: int):
  """One query token per row (query [B, 1, H, D]) over quantized slots [B, K, S]:
  (out [B, 1, H, D], lse [B, K, G]); dequantized inside the kernel on GPU/TPU."""
  b, _, h, d = query.shape
  k = key_positions.shape[1]
  grouped = query.reshape(b, k, h // k, d)
  if use_pallas():
    out, lse = kernels.quantized_decode_attention(
        grouped, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
        key_positions, query_positions[:, 0], bits=bits, group=group)
  else:
    out, lse, _ = reference.quantized_decode_attention(
        grouped, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
        key_positions, query_positions[:, 0], bits=bits, group=group, upcast=False)
  return out.reshape(query.shape).astype(query.dtype), lse
