"""Pallas kernels of kvjax, each with a pure-jnp reference in `reference.py`.

Modules (import them directly; the functions share their modules' names):
  decode_attention: `decode_attention`, `decode_attention_flat`, `merge_partials`.
  flash_attention: `flash_attention` (prefill: T queries over a dense cache, causal by
    positions, key blocks no query of a tile sees are skipped).
  vertical_slash: `vertical_slash_attention` (LoopServe's sparse prefill: each head's
    chosen vertical and slash lines only, slash keys read as contiguous runs).
  window_scores: `window_scores` (observation-window attention statistics).
  compaction: `gather_slots`, `gather_slot_values`.
  quantization: `quantize`, `dequantize`, `pack`, `unpack` (the KIVI format, in jnp),
    `quantize_pack`, `quantized_decode_attention` (kernels).
  channel_pruned: `channel_pruned_decode_attention` (ThinK's pruned key channels).
  gear: `gear_decode_attention` (GEAR's codes + outliers + low-rank factors, rebuilt
    tile by tile), `GearPart`, `key_outlier_logits`.
  cross_layer: `lowrank_decode_attention` (xKV: key tiles rebuilt from the group's basis
    and rotated in the kernel, value coefficients absorbed), `merged_decode_attention`
    (MiniCache: norm x direction tiles; retained slots attended beside them).
  backend: per-platform interpret mode, compiler params and block sizes.
"""
